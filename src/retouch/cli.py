"""The ``retouch`` command: thin layer from flags to configs to :mod:`retouch.editing`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# flag types live in retouch.flags, so that `retouch bench` (retouch.bench.cli) shares them without importing
# this module; cpu_cores is looked up here at call time (tests patch it)
from retouch.flags import cpu_cores
from retouch.flags import device as _device
from retouch.flags import float_in as _float_in
from retouch.flags import machine_devices as machine_devices  # re-exported: part of the module's API
from retouch.flags import threads as _threads

log = logging.getLogger("retouch")

EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 1."""


def _parse_options(items: Sequence[str], flag: str = "--option") -> dict[str, Any]:
    from retouch.config import parse_options

    try:
        return parse_options(items, flag)
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _default_model() -> str:
    from retouch.models import registry

    try:
        return registry.default_model()
    except ValueError as exc:
        raise CliError(str(exc)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", help="embedded model name, local diffusers folder or hub id (default: shapes-flux)")
    p.add_argument("--device", default=None, type=_device,
                   help="torch device, e.g. cpu or an accelerator such as cuda:1 (default: cpu)")  # fmt: skip
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="model precision")
    p.add_argument("--offload", action="store_true", help="CPU offload of model components (needs --device)")
    p.add_argument(
        "--threads",
        type=_threads,
        default=None,
        help="CPU threads for torch, at most the CPU cores (more are capped, with a warning; default: 1 for the "
        "small embedded models, whose ops are too small to gain from more; torch's default otherwise)",
    )


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="input image file")
    p.add_argument("-o", "--output", help="output image path (a JSON sidecar is written at OUTPUT.json)")
    from retouch.config import EditConfig
    from retouch.flags import add_config_flags

    add_config_flags(p, EditConfig)  # --steps, --seed, --solver, --inversion*, sizes, --merge-*: EditConfig's fields
    p.add_argument(
        "--max-memory",
        type=_float_in(0, lo_open=True),
        default=None,
        metavar="GIB",
        help="memory (GiB) an edit may use beyond the loaded model (default: what the device has available); "
        "larger estimated edits are refused before the model runs",
    )
    p.add_argument("--onednn", action="store_true",
                   help="CPU: oneDNN convolutions (faster on large UNets, but results then differ in a few pixels "
                   "between thread counts; default: torch's own, byte-identical whatever --threads)")  # fmt: skip
    p.add_argument("--strict", action="store_true",
                   help="refuse prompts with words an embedded model was never trained on (default: warn)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_model_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retouch", description="Training-free text-guided image editing with diffusion and flow models."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    from retouch import __version__

    parser.add_argument("--version", action="version", version=f"retouch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("edit", help="edit an image from a source prompt to a target prompt")
    _add_run_args(p)
    p.add_argument("--source", "-s", required=True, help="prompt describing the input image")
    p.add_argument("--target", "-t", required=True, help="prompt describing the wanted edit")
    p.add_argument(
        "--method",
        default=None,
        help="editing method or preset (see `retouch methods`; default per family: direct+p2p on SD/SD3, "
        "dit4edit on PixArt, rf_inversion on Flux)",
    )
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --option cross_steps=0.4 (repeatable)",
    )
    p.add_argument("--save-attention", metavar="DIR", default=None,
                   help="write per-word text-attention heatmaps of both branches to DIR")  # fmt: skip
    p.add_argument("--mask", default=None, metavar="PATH|auto:WORDS",
                   help="edit only where the mask is white (any size, resized like the image; soft masks allowed); "
                   "auto:WORDS derives it from those words' cross-attention")  # fmt: skip
    p.add_argument("--save-mask", default=None, metavar="PATH", help="write the mask that was used (PNG)")

    p = sub.add_parser("invert", help="invert an image and regenerate it; prints the reconstruction PSNR")
    _add_run_args(p)
    p.add_argument("--prompt", "-p", required=True, help="prompt describing the input image")

    p = sub.add_parser("models", help="list model families and embedded models")
    p.add_argument("--json", action="store_true")
    p.add_argument("--vocab", metavar="NAME", default=None,
                   help="print the words embedded model NAME was trained on (its caption grammar)")  # fmt: skip

    p = sub.add_parser("methods", help="list inversions, solvers and editing methods with their families")
    p.add_argument("--json", action="store_true")

    from retouch.bench.cli import add_bench_parser

    add_bench_parser(sub)
    _add_app_parser(sub)
    return parser


def _add_app_parser(sub: Any) -> None:
    from retouch.app import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES

    p = sub.add_parser("app", help="interactive web editor (needs the app extra: pip install -e '.[app]')")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    p.add_argument("--port", type=int, default=7860, help="port (0: a free port)")
    p.add_argument("--workdir", default="retouch-app", help="the app's working folder: uploads, results, cache")
    p.add_argument("--queue-size", type=int, default=16, help="runs waiting at most; more are refused politely")
    p.add_argument("--max-upload-bytes", type=int, default=DEFAULT_MAX_UPLOAD_BYTES, help="largest upload in bytes")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest upload in pixels (w*h)")
    p.add_argument("--keep-edits", type=int, default=200, help="result folders kept in the working folder")


def cmd_app(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:  # not imported here: gradio reads its settings at import
        raise CliError("the app needs gradio: pip install -e '.[app]' (make install does)")
    from retouch.app.server import launch
    from retouch.app.service import AppConfig

    if args.offload:
        raise CliError("--offload is not supported by the app")
    config = AppConfig(
        model=args.model, host=args.host, port=args.port, workdir=args.workdir, queue_size=args.queue_size,
        max_upload_bytes=args.max_upload_bytes, max_pixels=args.max_pixels, keep_edits=args.keep_edits,
        device=args.device, dtype=args.dtype, threads=args.threads,
    )  # fmt: skip
    demo, url = launch(config)
    print(f"retouch app: serving {config.model or _default_model()} at {url} (Ctrl+C to stop)", flush=True)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0


# --- listing commands ------------------------------------------------------------------------------------
def models_info() -> dict[str, Any]:
    from retouch.backbones import FAMILIES
    from retouch.models import registry

    return {
        "families": {k: dict(v) for k, v in FAMILIES.items()},
        "embedded": registry.embedded_info(),
        "default": registry.DEFAULT_MODEL,
    }


def methods_info() -> dict[str, Any]:
    from retouch.backbones import FAMILIES
    from retouch.control.editors import EDITORS
    from retouch.control.options import describe_options
    from retouch.inversion import INVERSIONS
    from retouch.presets import PRESETS
    from retouch.solvers import SOLVERS

    families = tuple(FAMILIES)
    matrix = {m.name: {f: f in m.families for f in families} for m in (*EDITORS.values(), *PRESETS.values())}
    return {
        "families": list(families),
        "presets": [
            {
                "name": p.name,
                "families": list(p.families),
                "editor": p.editor,
                "inversion": p.inversion,
                "solver": p.solver,
                "num_steps": p.num_steps,
                "guidance": p.guidance,
                "options": dict(p.options),
                "description": p.description,
            }
            for p in PRESETS.values()
        ],
        "matrix": matrix,
        "inversions": [
            {"name": i.name, "families": list(i.families), "solver": i.solver, "description": i.description}
            for i in INVERSIONS.values()
        ],
        "solvers": [
            {
                "name": s.name,
                "families": list(s.families),
                "order": s.order,
                "nfe_per_step": s.nfe_per_step,
                "description": s.description,
            }
            for s in SOLVERS.values()
        ],
        "editors": [
            {
                "name": e.name,
                "families": list(e.families),
                "description": e.description,
                "options": describe_options(e.options),
            }
            for e in EDITORS.values()
        ],
    }


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_models(args: argparse.Namespace) -> int:
    if args.vocab is not None:
        from retouch.models import registry
        from retouch.models.vocab import model_vocabulary

        vocab = model_vocabulary(args.vocab)
        if vocab is None:
            known = ", ".join(registry.embedded_names()) or "none installed"
            raise CliError(
                f"{args.vocab!r} is not a ShapesWorld model (no world.json); --vocab takes an embedded model: {known}"
            )
        if args.json:
            print(json.dumps({"model": args.vocab, "vocabulary": vocab}, indent=2))
        else:
            print(f"{args.vocab} knows these words (ShapesWorld's caption grammar), e.g.")
            print('  "a small red striped star at the top left on a checkered gray background, pixel art style"')
            print("  " + " ".join(vocab))
        return 0
    info = models_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("families:")
    _print_table([(f"  {k}", v["description"]) for k, v in info["families"].items()])
    print("embedded models:")
    if info["embedded"]:
        _print_table([(f"  {m['name']}", m["pipeline"] or m.get("architecture") or "") for m in info["embedded"]])
    else:
        print("  (none installed)")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    info = methods_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for section in ("presets", "inversions", "solvers", "editors"):
        print(f"{section}:")
        _print_table([(f"  {m['name']}", ",".join(m["families"]), m["description"]) for m in info[section]])
    return 0


# --- running commands ------------------------------------------------------------------------------------
def _output_path(args: argparse.Namespace, suffix: str) -> Path:
    """The output path, checked before any work: a known image extension, not the input (symlinks and hard
    links included), and the image, its sidecar and the attention folder all writable."""
    from PIL import Image

    from retouch import io

    out = Path(args.output) if args.output else Path(f"{Path(args.image).stem}_{suffix}.png")
    if out.suffix.lower() not in Image.registered_extensions():
        raise CliError(f"unknown image extension for --output {out}; use .png, .jpg or .webp")
    src = Path(args.image)
    sidecar = Path(str(out) + ".json")
    for path, label in ((out, "--output"), (sidecar, "the sidecar")):
        same = path.resolve() == src.resolve()
        if not same and path.exists() and src.exists():
            same = os.path.samefile(path, src)
        if same:
            raise CliError(f"{label} {path} is the input image; retouch never overwrites its input, give another path")
    try:
        io.check_writable(out, "--output")
        io.check_writable(sidecar, "the sidecar (OUTPUT.json)")
        attention = getattr(args, "save_attention", None)
        if attention is not None:
            io.check_writable(attention, "--save-attention", directory=True)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    return out


def _progress(disabled: bool):
    if disabled:
        return None
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def update(phase: str, done: int, total: int) -> None:
        bar = bars.get(phase)
        if bar is None:
            bar = bars[phase] = tqdm(total=total, desc=phase, leave=False, file=sys.stderr, unit="step")
        if bar.disable or done < bar.n:
            return
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bar.disable = True

    return update


def _check_vocabulary(model: str, prompts: Sequence[str], strict: bool) -> None:
    from retouch.models.vocab import model_vocabulary, vocabulary_message, vocabulary_problems

    vocab = model_vocabulary(model)
    if vocab is None:
        return
    problems = vocabulary_problems(prompts, vocab)
    if not problems:
        return
    if strict:
        raise CliError(vocabulary_message(model, problems) + " (refused: --strict)")
    # without --strict, edit() itself warns (for the Python API too)


def _check_method_options(spec: Any, options: dict[str, Any], method: str) -> None:
    from retouch.presets import get_preset

    preset = get_preset(method)  # the rules that relate options see the preset's values beside the user's
    try:
        spec.make_options({**(preset.options if preset is not None else {}), **options}, f"method {method!r}")
    except ValueError as exc:
        raise CliError(f"--option: {exc}") from None


def _run(args: argparse.Namespace, source: str, target: str, method: str, options: dict[str, Any], suffix: str):
    from retouch import io
    from retouch.backbones import load_backbone
    from retouch.config import EditConfig
    from retouch.control.editors import get_editor
    from retouch.editing import edit
    from retouch.flags import config_from_flags
    from retouch.presets import get_preset

    out = _output_path(args, suffix)
    image = io.load_image(args.image)  # fails before any model is loaded
    if method is not None:
        preset = get_preset(method)
        spec = get_editor(preset.editor if preset is not None else method)
        _check_method_options(spec, options, method)
    _parse_options(args.inversion_option, "--inversion-option")  # a malformed option: one line, before the model
    cfg = config_from_flags(
        EditConfig, args, source_prompt=source, target_prompt=target, method=method or "identity", options=options
    )
    from retouch import masks

    mask = masks.parse_mask(getattr(args, "mask", None))  # a bad mask file fails before any model is loaded
    save_mask = getattr(args, "save_mask", None)
    if save_mask is not None:
        if mask is None:
            raise CliError("--save-mask needs --mask")
        if Path(save_mask).resolve() == Path(args.image).resolve():
            raise CliError(f"--save-mask {save_mask} is the input image; give another path")
        try:
            from retouch.io import check_writable

            check_writable(save_mask, "--save-mask")
        except ValueError as exc:
            raise CliError(str(exc)) from None
    model = args.model or _default_model()
    _check_vocabulary(model, [source, target], args.strict)
    _set_threads(args.threads, model)
    backbone = load_backbone(model, device=args.device, dtype=args.dtype, offload=args.offload)
    if method is None:
        from retouch.presets import DEFAULT_METHOD

        cfg = cfg.with_(method=DEFAULT_METHOD[backbone.family])
        preset = get_preset(cfg.method)
        spec = get_editor(preset.editor if preset is not None else cfg.method)
        _check_method_options(spec, options, cfg.method)
    result = edit(
        backbone,
        image,
        cfg,
        progress=_progress(args.no_progress),
        record_attention=getattr(args, "save_attention", None) is not None,
        mask=mask,
        memory_limit=None if args.max_memory is None else args.max_memory * 1024**3,
        deterministic=not args.onednn,
    )
    return image, out, result


def _set_threads(threads: int | None, model: str) -> None:
    """:func:`retouch.flags.set_threads` with this module's :func:`cpu_cores` and a one-line error."""
    from retouch.flags import set_threads

    try:
        set_threads(threads, model, cores=cpu_cores())
    except ValueError as exc:
        raise CliError(str(exc)) from None


def attention_map_images(result: Any) -> dict[str, Any]:
    """``{file name: PIL image}``: one heatmap per word and branch, and a labelled strip per branch."""
    from PIL import Image, ImageDraw

    from retouch.control.recorder import heatmap_rgb

    files: dict[str, Any] = {}
    images = {"source": result.reconstruction, "target": result.image}
    for branch, maps in result.extras.get("attention_maps", {}).items():
        base = images[branch]
        if base is None:  # the method ran without a source branch
            continue
        w, h = base.size
        tiles = [base]
        for key, m in maps.items():
            heat = Image.fromarray(heatmap_rgb(m)).resize((w, h), Image.Resampling.BICUBIC)
            tile = Image.blend(base, heat, 0.6)
            files[f"{branch}_{key}.png"] = tile
            tiles.append(tile)
        scale = max(1, 128 // max(h, 1))
        label_h = 14
        strip = Image.new("RGB", (len(tiles) * w * scale, h * scale + label_h), (255, 255, 255))
        draw = ImageDraw.Draw(strip)
        labels = ["image", *(k.split("_", 1)[1] for k in maps)]
        for j, (tile, label) in enumerate(zip(tiles, labels, strict=True)):
            strip.paste(tile.resize((w * scale, h * scale), Image.Resampling.NEAREST), (j * w * scale, label_h))
            draw.text((j * w * scale + 2, 1), label[:12], fill=(0, 0, 0))
        files[f"{branch}.png"] = strip
    return files


def save_attention_maps(directory: Path, result: Any) -> list[Path]:
    """Write one heatmap per word and branch, and a labelled strip per branch (image | words...), all or none."""
    from retouch import io

    files = attention_map_images(result)
    return io.write_all([(directory / name, io.image_writer(img, name)) for name, img in files.items()])


def _write_outputs(args: argparse.Namespace, out: Path, image, report: dict[str, Any], result: Any = None) -> None:
    """Image, sidecar and attention maps, all or nothing (see :func:`retouch.io.write_all`)."""
    from retouch import io

    items = [(out, io.image_writer(image, out))]
    attention = getattr(args, "save_attention", None)
    if attention is not None and result is not None:
        files = attention_map_images(result)
        report["attention_maps"] = [str(Path(attention) / name) for name in files]
        items += [(Path(attention) / name, io.image_writer(img, name)) for name, img in files.items()]
    save_mask = getattr(args, "save_mask", None)
    if save_mask is not None and result is not None:
        from retouch import masks

        w, h = image.size
        report["mask_file"] = str(save_mask)
        items.append((Path(save_mask), io.image_writer(masks.mask_image(result.extras["mask"], (h, w)), save_mask)))
    items.insert(1, (Path(str(out) + ".json"), io.json_writer(report)))
    io.write_all(items, committed=args.written)


def cmd_edit(args: argparse.Namespace) -> int:
    options = _parse_options(args.option)
    _, out, result = _run(args, args.source, args.target, args.method, options, "edited")
    report = {**result.report, "input": str(args.image), "output": str(out)}
    _write_outputs(args, out, result.image, report, result)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"edited image written to {out} ({report['nfe']['total']} NFE, {report['timings']['total']:.1f} s)")
    return 0


def cmd_invert(args: argparse.Namespace) -> int:
    from retouch import io

    image, out, result = _run(args, args.prompt, args.prompt, "identity", {}, "reconstruction")
    size = result.reconstruction.size
    reference = image if image.size == size else io.fit_size(image, (size[1], size[0]), args.size_policy)[0]
    value = io.psnr(reference, result.reconstruction)
    report = {**result.report, "input": str(args.image), "output": str(out), "psnr": value, "psnr_size": list(size)}
    _write_outputs(args, out, result.reconstruction, report)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"reconstruction written to {out}")
        print(f"PSNR {value:.2f} dB")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from retouch.bench.cli import run_bench

    return run_bench(args)


COMMANDS = {"edit": cmd_edit, "invert": cmd_invert, "models": cmd_models, "methods": cmd_methods, "bench": cmd_bench,
            "app": cmd_app}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """The ``retouch`` command. Ctrl-C at any moment (start-up, model loading, sampling, writing) exits with
    status 130 and one line saying what was written."""
    written: list[Path] = []
    try:
        return _main(argv, written)
    except KeyboardInterrupt:
        if written:
            print(f"retouch: interrupted after writing {', '.join(map(str, written))}", file=sys.stderr)
        else:
            print("retouch: interrupted; no output written", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None, written: list[Path]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.written = written
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if args.command in ("edit", "invert", "app"):
            import diffusers.utils.logging as dlog
            import transformers.utils.logging as tlog

            dlog.disable_progress_bar()
            tlog.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except CliError as exc:
        print(f"retouch: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, TypeError, OSError) as exc:
        if args.verbose:
            log.exception("failed")
        where = f"; wrote {', '.join(map(str, written))}" if written else "; no output written"
        print(f"retouch: error: {exc}{where if args.command in ('edit', 'invert') else ''}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
