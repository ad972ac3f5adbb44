"""``retouch bench``: the command-line face of :mod:`retouch.bench.runner`.

Sub-commands::

    retouch bench shapes --methods ddim+p2p,direct+p2p --cases 20 --out runs/shapes
    retouch bench pie --data PIE/data --methods ddim+p2p --model CompVis/stable-diffusion-v1-4 --out runs/pie
    retouch bench merge runs/a runs/b --out runs/ab          # or: retouch bench merge runs/x (its shard-* folders)
    retouch bench report runs/shapes                          # rebuild summary.json + report.html
    retouch bench export-shapes --out shapes_pie --cases 100  # a ShapesBench split in PIE-Bench's layout

Sharding: ``--shard i/n`` (0 <= i < n) runs one shard into ``OUT/shard-i-of-n``; the last shard to finish merges
them into ``OUT``. ``--shard auto`` takes ``RANK`` / ``WORLD_SIZE`` from ``accelerate launch`` or ``torchrun``
(``SLURM_PROCID`` / ``SLURM_NTASKS`` under Slurm); with ``--device cuda`` each process then uses
``cuda:$LOCAL_RANK``. Example on 4 GPUs::

    accelerate launch --num_processes 4 -m retouch.bench shapes --methods ddim+p2p --out runs/s --shard auto \\
        --device cuda

Killed runs resume: run the same command again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from retouch.bench.cases import parse_shard, shard_from_env

log = logging.getLogger(__name__)

__all__ = ["add_bench_parser", "main", "run_bench"]

EXIT_ERROR = 1


def _add_run_args(p: argparse.ArgumentParser, suite: str) -> None:
    from retouch.flags import device as _device
    from retouch.flags import seed as _seed
    from retouch.flags import threads as _threads
    from retouch.models.registry import DEFAULT_MODEL

    p.add_argument("--methods", help="comma-separated methods (presets / editors, see `retouch methods`)")
    p.add_argument("--methods-file", help="JSON list of method specs {label, method, options, solver, ...}")
    p.add_argument("--out", "-o", required=True, help="output folder (results.jsonl, summary.json, report.html)")
    p.add_argument(
        "--cases",
        type=int,
        default=None,
        help="number of cases (default: "
        + ("every case of the data folder)" if suite == "pie" else f"{_shapes_default_cases()}, the dev split's size)"),
    )
    p.add_argument(
        "--seed", type=_seed, default=0, help="edit seed; for ShapesBench also the split (0 = public dev split)"
    )
    p.add_argument(
        "--model", "-m", help=f"embedded model name, local diffusers folder or hub id (default: {DEFAULT_MODEL})"
    )
    p.add_argument("--steps", type=int, default=None, help="sampling steps for every method (default: method's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale for every method")
    p.add_argument("--types", default=None, help="editing types to keep, e.g. 1,2,6 (default: all)")
    p.add_argument("--shard", default=None, help="I/N: run shard I of N (0-based); 'auto': from RANK/WORLD_SIZE")
    p.add_argument("--device", default=None, type=_device, help="torch device for the model (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--metrics-device", default=None, help="device of the metric models (default: --device)")
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="CPU threads for torch (default: 1 for the embedded models, whose ops are too small to gain from "
        "more; torch's choice otherwise)",
    )
    p.add_argument("--skip-learned", action="store_true", help="skip metrics that need hub weights (null + note)")
    p.add_argument(
        "--clip-model",
        default=None,
        help="CLIP weights (hub id or folder); default "
        + ("openai/clip-vit-large-patch14" if suite == "pie" else "the embedded shapes-clip"),
    )
    if suite == "pie":
        p.add_argument("--data", required=True, help="PIE-Bench data folder (mapping_file.json, annotation_images/)")
        p.add_argument("--dino-model", default="facebook/dino-vitb8", help="DINO ViT-B/8 weights (hub id or folder)")
    else:
        p.add_argument("--resolution", type=int, default=64, help="ShapesWorld canvas side (default 64)")
    p.add_argument(
        "--lpips",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="LPIPS-SqueezeNet (needs torchvision + torchmetrics or lpips; default: on for pie, off for shapes)",
    )
    p.add_argument("--no-blend", action="store_true", help="do not pass blended words to P2P's local blend")
    p.add_argument(
        "--mask", action="store_true", help="masked editing: give every edit its case's mask (no PIE border rule)"
    )
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="editor option for all methods")
    p.add_argument("--no-images", action="store_true", help="do not save images (the report then has no grid)")
    p.add_argument("--report-per-type", type=int, default=2, help="cases per editing type in the report grid")
    p.add_argument("--retry-errors", action="store_true", help="run again the rows that ended in an error")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print summary.json's methods on stdout")
    p.add_argument("--strict", action="store_true",
                   help="exit with status 1 when any row failed (a run whose rows all failed always does)")  # fmt: skip


def _shapes_default_cases() -> int:
    from retouch.bench.shapes import DEV_SPLIT_SIZE

    return DEV_SPLIT_SIZE


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``bench`` and its sub-commands to the ``retouch`` parser's sub-parsers."""
    p = subparsers.add_parser(
        "bench",
        help="run benchmarks (PIE-Bench, ShapesBench), merge shards, rebuild reports",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="bench_command", required=True)
    _add_run_args(sub.add_parser("pie", help="PIE-Bench (needs its data folder)"), "pie")
    _add_run_args(sub.add_parser("shapes", help="ShapesBench (ShapesWorld edit cases with ground truth)"), "shapes")
    m = sub.add_parser("merge", help="merge run folders / shard folders into one result")
    m.add_argument("inputs", nargs="+", help="run folders, or folders holding shard-* folders")
    m.add_argument("--out", "-o", default=None, help="output folder (default: the single input)")
    r = sub.add_parser("report", help="rebuild summary.json and report.html from results.jsonl")
    r.add_argument("folder")
    r.add_argument("--markdown", action="store_true", help="print the summary as Markdown tables (for docs)")
    e = sub.add_parser("export-shapes", help="write a ShapesBench split in PIE-Bench's on-disk layout")
    e.add_argument("--out", "-o", required=True)
    e.add_argument("--cases", type=int, default=100)
    e.add_argument("--seed", type=int, default=0, help="split seed (0 = public dev split)")
    e.add_argument("--resolution", type=int, default=64)
    return p


def _options(items: list[str]) -> dict[str, Any]:
    from retouch.config import parse_options

    return parse_options(items)


def _default_model() -> str:
    from retouch.models import registry

    return registry.default_model()


def config_from_args(args: argparse.Namespace) -> Any:
    """A :class:`~retouch.bench.runner.BenchConfig` from parsed ``bench pie|shapes`` arguments."""
    from retouch.bench.runner import BenchConfig, MethodSpec

    if bool(args.methods) == bool(args.methods_file):
        raise ValueError("give --methods a,b,... or --methods-file FILE (one of them)")
    methods = MethodSpec.parse_list(args.methods) if args.methods else MethodSpec.from_file(args.methods_file)
    device = args.device
    if args.shard == "auto":
        shard = shard_from_env() or (0, 1)
        local = os.environ.get("LOCAL_RANK")
        if device == "cuda" and local is not None:
            device = f"cuda:{int(local)}"
    elif args.shard:
        shard = parse_shard(args.shard)
    else:
        shard = (0, 1)
    types = None
    if args.types:
        try:
            types = tuple(sorted({int(t) for t in args.types.split(",") if t.strip()}))
        except ValueError:
            raise ValueError(f"--types expects comma-separated ids 0..9, got {args.types!r}") from None
    return BenchConfig(
        suite=args.bench_command,
        methods=methods,
        out=args.out,
        model=args.model or _default_model(),
        cases=args.cases,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        data=getattr(args, "data", None),
        types=types,
        shard=shard,
        device=device,
        dtype=args.dtype,
        metrics_device=args.metrics_device,
        skip_learned=args.skip_learned,
        clip_model=args.clip_model,
        dino_model=getattr(args, "dino_model", "facebook/dino-vitb8"),
        lpips=args.lpips,
        blend=not args.no_blend,
        resolution=getattr(args, "resolution", 64),
        options=_options(args.option),
        save_images=not args.no_images,
        report_per_type=args.report_per_type,
        retry_errors=args.retry_errors,
        mask=args.mask,
    )


def _progress(disabled: bool):
    if disabled or not sys.stderr.isatty():
        return None, None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None, None
    bar = tqdm(total=0, unit="edit", file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int, row: dict[str, Any]) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(f"{row['case_id']} {row['method']}" + (" ERROR" if row.get("error") else ""))
        bar.refresh()

    return update, bar


def _print_summary(folder: Path, as_json: bool) -> None:
    summary = json.loads((folder / "summary.json").read_text())
    if as_json:
        print(json.dumps(summary["methods"], indent=2))
        return
    keys = ("structure_distance", "psnr_bg", "ssim_bg", "clip_whole", "clip_edited", "edit_success", "gt_psnr",
            "seconds", "nfe")  # fmt: skip
    info = summary["metrics_info"]
    print(f"{summary['n_cases']} cases, {summary['n_rows']} rows -> {folder}")
    print("method".ljust(24) + "".join(k[:12].rjust(13) for k in keys))
    for label, m in summary["methods"].items():
        cells = []
        for k in keys:
            v = m["metrics"].get(k)
            cells.append("-".rjust(13) if v is None else f"{v * info[k]['scale']:.2f}".rjust(13))
        print(label[:23].ljust(24) + "".join(cells) + (f"   ({m['n_errors']} errors)" if m["n_errors"] else ""))
    print(f"report: {folder / 'report.html'}")


def _failure_status(folder: Path, strict: bool) -> int:
    """0, or 1 when every row failed (or, with ``strict``, any row); failures are counted on stderr."""
    summary = json.loads((folder / "summary.json").read_text())
    rows = summary.get("n_rows", 0)
    errors = sum(m.get("n_errors", 0) for m in summary.get("methods", {}).values())
    if not errors:
        return 0
    if errors >= rows:
        print(f"retouch: error: all {rows} rows failed (see the error of each row in {folder / 'results.jsonl'})",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    print(f"retouch: {errors} of {rows} rows failed (see {folder / 'results.jsonl'}; --retry-errors runs them again)",
          file=sys.stderr)  # fmt: skip
    return EXIT_ERROR if strict else 0


def run_bench(args: argparse.Namespace) -> int:
    """Run a ``bench`` sub-command; returns the exit status (errors are printed as one line)."""
    from retouch.bench import runner

    try:
        if args.bench_command == "merge":
            out = Path(args.out) if args.out else None
            if out is None:
                if len(args.inputs) != 1:
                    raise ValueError("merging several folders needs --out")
                out = Path(args.inputs[0])
            folder = runner.merge(args.inputs, out)
            _print_summary(folder, False)
            return 0
        if args.bench_command == "report":
            folder = runner.rebuild_outputs(args.folder)
            if args.markdown:
                from retouch.bench.report import EXTRA_COLUMNS, OFFICIAL_COLUMNS, render_markdown

                summary = json.loads((folder / "summary.json").read_text())
                print(render_markdown(summary, OFFICIAL_COLUMNS))
                print(render_markdown(summary, EXTRA_COLUMNS))
                return 0
            _print_summary(folder, False)
            return 0
        if args.bench_command == "export-shapes":
            from retouch.bench.shapes import export_split

            path = export_split(args.out, args.seed, args.cases, resolution=args.resolution)
            print(f"wrote {args.cases} ShapesBench cases (split {args.seed}) to {path.parent}")
            return 0
        cfg = config_from_args(args)
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        from retouch.flags import set_threads

        set_threads(args.threads, cfg.model)
        update, bar = _progress(args.no_progress)
        try:
            folder = runner.run(cfg, progress=update)
        finally:
            if bar is not None:
                bar.close()
        if cfg.sharded and folder == cfg.run_dir:
            print(
                f"shard {cfg.shard[0]}/{cfg.shard[1]} done -> {folder}; the last shard to finish merges into {cfg.out}"
            )
            return 0
        _print_summary(folder, args.json)
        return _failure_status(folder, args.strict)
    except (ValueError, OSError) as err:  # BenchError and MetricUnavailable are ValueErrors
        print(f"retouch: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("retouch: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    """``python -m retouch.bench ...`` (the same as ``retouch bench ...``)."""
    parser = argparse.ArgumentParser(prog="retouch")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = [a for a in argv if a in ("-v", "--verbose")]
    rest = [a for a in argv if a not in ("-v", "--verbose")]
    if not rest or rest[0] != "bench":  # `python -m retouch.bench shapes ...` and `... bench shapes ...` alike
        rest = ["bench", *rest]
    args = parser.parse_args([*verbose, *rest])
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return run_bench(args)
