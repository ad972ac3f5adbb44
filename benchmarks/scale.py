#!/usr/bin/env python
"""Per-NFE latency, peak memory, attention-control overhead and merging speed-up at the real models' sizes.

The denoisers are built from their published configs (typed in :data:`MODELS`) with **random weights**: no
download, and a random network of the right shape costs the same time and memory as the trained one. Text
encoders and VAEs are not built: the real backbone adapters (``SDBackbone``, ``PixArtBackbone``,
``SD3Backbone``, ``FluxBackbone``) wrap a minimal pipeline-like object holding the denoiser, the real
scheduler class, offline tokenizers from :mod:`retouch.models.tokenizers` (P2P's word alignment needs them)
and a VAE stand-in that only carries a config; prompts and images become random tensors of the shapes the
real encoders produce (:class:`RandomIO`).

What is timed is one NFE exactly as :func:`retouch.editing.edit` runs it while sampling: a
:class:`~retouch.editing.GuidedModel` call on the 2-branch batch (source + target, times 2 with CFG) inside
:func:`~retouch.control.attention_editing`, at the sampling step where the editor touches the most layers
(the *worst step*, found by asking the editor's own ``applies`` / ``needs_probs`` for every step). Variants
per model and size, run interleaved round-robin so that background load hits all of them alike:

* ``plain``: diffusers' own attention processors, no control (the baseline);
* ``routed``: retouch's processors with no editor (the cost of routing alone; also what a step outside the
  editor's schedule costs);
* ``<preset>``: each editing preset's editor (``direct+p2p``, ``direct+masactrl``, ``dit4edit`` on PixArt,
  ``rf_solver``'s value injection on SD3 / Flux, ``kv_edit`` on the DiTs and ``kv_edit_inf`` on SD3 / Flux with
  :func:`bench_mask`, KV-Edit's cache filled for the timed point by one untimed inversion-phase call), worst step;
* ``<preset>+merge<r>``: the same with token merging (``MergeConfig(ratio=r)`` through ``make_merger``);
* ``merge<r>``: merging with no editor, at the largest ratio.

Derived: **overhead** = edit NFE time / plain NFE time (issue 4's target: ≤ 1.10 for P2P and MasaCtrl-style
presets), an upper bound of the overhead averaged over the preset's whole sampling schedule (worst-step time
on every step the editor is active, ``routed`` time elsewhere; ``--phases`` times every distinct phase for the
exact average), and the **merging speed-up** = preset NFE time / preset+merge NFE time.

**Edit runs** call :func:`retouch.editing.edit` itself (inversion + sampling + editor + merger) on the random
backbone: peak memory vs number of steps (2, 4, 8 by default, the engine must keep attention maps only per
step, so the peak must be flat) and a 1024×2048 PixArt-config edit.

Every measurement runs in a fresh subprocess (one per model × size, one per edit run; the process's maximum
resident set is recorded too). Peak memory of a call is what it allocates above what was allocated before it
(weights and inputs excluded, outputs included): on CPU the bytes glibc's ``malloc`` has handed out, sampled
every 2 ms by a thread (:class:`PeakMeter`), on CUDA ``torch.cuda.max_memory_allocated``.

Results: ``benchmarks/results/scale_<model>.json`` (written atomically; new entries replace those of the same
size / depth / device / dtype, others are kept, ``--fresh`` starts over) and ``benchmarks/results/README.md``,
regenerated from every JSON file in that folder.

    python benchmarks/scale.py                                   # the default scope (see DEFAULT_JOBS)
    python benchmarks/scale.py --models sd3 flux --sizes 512     # SD3 / Flux at reduced depth
    python benchmarks/scale.py --models pixart --sizes 1024 --blocks full --nfe 3 --device cuda
    python benchmarks/scale.py --readme-only                     # regenerate the markdown from the JSON
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

# the parts live in benchmarks/scalebench/, one concern per module; this file is the entry point (also when it is
# loaded by path, as the tests do)
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from scalebench.edits import EditRun, summarise_steps  # noqa: E402
from scalebench.isolation import run_isolated, run_job  # noqa: E402
from scalebench.meter import machine_info  # noqa: E402
from scalebench.readme import write_readme  # noqa: E402
from scalebench.results import merge_results, write_json  # noqa: E402
from scalebench.specs import (  # noqa: E402
    DEFAULT_EDIT_RUNS,
    DEFAULT_JOBS,
    MODELS,
    OVERHEAD_TARGET,
    RESULTS_DIR,
    ModelSpec,
    _size_str,
    parse_size,
)

log = logging.getLogger("scale")

# ============================================================================================ main


def run_benchmark(
    jobs: Sequence[tuple[str, tuple[int, int]]],
    edit_runs: Sequence[EditRun] = (),
    *,
    blocks: Mapping[str, str] | None = None,
    presets: Sequence[str] | None = None,
    ratios: Sequence[float] = (0.5, 0.75),
    nfe: int = 1,
    warmup: int = 1,
    phases: bool = False,
    statistic: str = "min",
    device: str = "cpu",
    dtype: str | None = None,
    threads: int | None = None,
    isolate: bool = True,
    results_dir: Path = RESULTS_DIR,
    fresh: bool = False,
    runner: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run the NFE jobs and edit runs, fold them into ``scale_<model>.json`` files, regenerate the README.

    ``isolate``: one fresh process per job (honest peak memory); the smoke test runs in-process.
    Returns the written payloads by model.
    """
    blocks = dict(blocks or {})
    runner = runner or (run_isolated if isolate else run_job)
    if threads:
        torch.set_num_threads(threads)
    machine = machine_info(torch.device(device))
    if threads:
        machine["torch_threads"] = threads
    common = {"device": device, "dtype": dtype, "threads": threads}
    entries: dict[str, list[dict[str, Any]]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    for model, size in jobs:
        spec = MODELS[model]
        job = {
            "kind": "nfe", "model": model, "size": list(size), "blocks": blocks.get(model) or blocks.get("*"),
            "presets": [p for p in presets if _preset_fits(p, spec)] if presets else None, "ratios": list(ratios),
            "nfe": nfe, "warmup": warmup, "phases": phases, "statistic": statistic, **common,
        }  # fmt: skip
        log.info("%s @ %s (blocks %s)", model, _size_str(size), job["blocks"] or spec.default_blocks.get(size, "full"))
        t0 = time.perf_counter()
        entry = runner(job)
        if "error" in entry:
            entry = {"size_hw": list(size), "blocks": {"used": job["blocks"]}, "device": device, **entry}
        log.info("%s @ %s done in %.0fs", model, _size_str(size), time.perf_counter() - t0)
        entries.setdefault(model, []).append(entry)
    for er in edit_runs:
        spec = MODELS[er.model]
        er_blocks = er.blocks or blocks.get(er.model) or blocks.get("*")
        records = []
        for steps in er.steps:
            job = {
                "kind": "edit", "model": er.model, "size": list(er.size), "blocks": er_blocks, "method": er.method,
                "num_steps": steps, "merge": er.merge, "inversion_iterations": er.inversion_iterations, **common,
            }  # fmt: skip
            log.info("edit %s @ %s %s, %d steps", er.model, _size_str(er.size), er.method, steps)
            rec = runner(job)
            if "error" in rec:
                rec = {"num_steps": steps, **rec}
            records.append(rec)
        ok = next((r for r in records if "error" not in r), {})
        runs.setdefault(er.model, []).append(
            {
                "size_hw": list(er.size),
                "blocks": ok.get("blocks", {"used": er_blocks}),
                "method": er.method,
                "merge_ratio": er.merge,
                "device": device,
                "runs": records,
                "summary": summarise_steps(records) if len(er.steps) > 1 else None,
            }
        )
    written = {}
    for model in {*entries, *runs}:
        path = results_dir / f"scale_{model}.json"
        if fresh and path.exists():
            path.unlink()
        written[model] = merge_results(path, model, machine, entries.get(model, []), runs.get(model, []))
    write_readme(results_dir)
    return written


def _preset_fits(preset: str, spec: ModelSpec) -> bool:
    from retouch.presets import get_preset

    p = get_preset(preset)
    return p is None or spec.family in p.families


def _parse_blocks(values: Sequence[str]) -> dict[str, str]:
    out = {}
    for v in values:
        model, _, val = v.rpartition("=")
        out[model or "*"] = val
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), help="default: the DEFAULT_JOBS scope")
    parser.add_argument("--sizes", nargs="+", help="N or HxW (height x width); default: each model's sizes")
    parser.add_argument("--blocks", nargs="+", default=[],
                        help="depth: 'full', 'N' (PixArt/SD3), 'D:S' (Flux double:single), or MODEL=VALUE; "
                             "default: a per-size reduced depth for the DiTs (see MODELS)")  # fmt: skip
    parser.add_argument("--presets", nargs="+", help="editing presets to time (default: each model's)")
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.75], help="token-merging ratios")
    parser.add_argument("--nfe", type=int, default=None, help="timed NFEs per variant (cpu 1, cuda 3)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up NFEs (cpu 1, cuda 3)")
    parser.add_argument("--phases", action="store_true", help="time every phase of each preset's schedule")
    parser.add_argument("--statistic", choices=["min", "median"], default="min",
                        help="summary of a variant's timed NFEs (min: load only adds time)")  # fmt: skip
    parser.add_argument("--edit-runs", nargs="*", default=None,
                        help="MODEL@HxW[/bBLOCKS][/METHOD][/sSTEPS,...][/mRATIO]; default: DEFAULT_EDIT_RUNS "
                             "(of the chosen models); give none to skip")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results of the models run")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per job (peaks less honest)")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme-only", action="store_true", help="only regenerate README.md from the JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if args.worker:
        logging.getLogger("retouch").setLevel(logging.WARNING)
        result = run_job(json.loads(args.worker))
        write_json(Path(args.worker_out), result)
        return
    if args.readme_only:
        print(f"wrote {write_readme(args.results)}")
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    cuda = args.device.startswith("cuda")
    if args.models or args.sizes:
        models = args.models or sorted({m for m, _ in DEFAULT_JOBS})
        jobs = [
            (m, s) for m in models for s in ([parse_size(x) for x in args.sizes] if args.sizes else MODELS[m].sizes)
        ]
    else:
        models = sorted({m for m, _ in DEFAULT_JOBS})
        jobs = list(DEFAULT_JOBS)
    if args.edit_runs is None:
        edit_runs = [EditRun.parse(t) for t in DEFAULT_EDIT_RUNS if EditRun.parse(t).model in models]
    else:
        edit_runs = [EditRun.parse(t) for t in args.edit_runs]
    t0 = time.perf_counter()
    written = run_benchmark(
        jobs, edit_runs, blocks=_parse_blocks(args.blocks), presets=args.presets, ratios=args.ratios,
        nfe=args.nfe or (3 if cuda else 1), warmup=args.warmup or (3 if cuda else 1), phases=args.phases,
        statistic=args.statistic,
        device=args.device, dtype=args.dtype, threads=args.threads, isolate=not args.in_process,
        results_dir=args.results, fresh=args.fresh,
    )  # fmt: skip
    for model, payload in written.items():
        for e in payload["entries"]:
            for o in e.get("overheads", []):
                print(
                    f"{model} {_size_str(e['size_hw'])} {o['preset']}: overhead {o['overhead']:.3f} "
                    f"(run bound {o['run_overhead_bound']:.3f}) target <= {OVERHEAD_TARGET}: "
                    f"{'met' if o['met'] else 'NOT met'}"
                )
    print(f"wrote {', '.join(f'scale_{m}.json' for m in written)} and README.md in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
