#!/usr/bin/env python
"""Self-attention with token merging vs plain self-attention at 4096 image tokens.

One self-attention layer as a DiT / U-Net block runs it: q/k/v projections, fused
``scaled_dot_product_attention``, output projection (all with bias, random weights). Widths: PixArt-XL-2
(hidden 1152, 16 heads) and SD 1.5's first U-Net level (320, 8 heads; 4096 tokens = a 512² image).

For every width × batch × ratio the merged path is timed end to end, planning included, exactly as a merging
processor runs it on every call: ``plan_merge`` on the source-branch rows (the even rows: ``[src, tgt]`` for
batch 2, ``[uncond src, uncond tgt, cond src, cond tgt]`` for batch 4), ``plan.merge`` of the hidden states,
attention on ``N − r`` tokens, ``plan.unmerge``. Variants run interleaved round-robin (so background load hits
all of them alike); the first call of each is a warm-up that, on CPU, also records peak memory with the
profiler's allocation events (``tracemalloc`` does not see torch's CPU allocator); on CUDA peak memory is
``torch.cuda.max_memory_allocated`` over every timed call. Peak memory is reported above what was live before
the call (inputs and weights excluded, output included).

Writes ``benchmarks/results/merge_attention.json`` atomically and prints a summary table.

    python benchmarks/merge_attention.py                         # CPU default, ~3-4 min on 2 busy cores
    python benchmarks/merge_attention.py --device cuda           # fp16 on GPU, more repeats
    python benchmarks/merge_attention.py --widths 320:8 --batches 2 --repeats 2   # quick look
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from retouch.bench.provenance import cpu_model, git_commit
from retouch.io import save_json
from retouch.merging.kernels import MergePlan, plan_merge

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "merge_attention.json"
TARGET_RATIO, TARGET_SPEEDUP = 0.75, 1.8


class SelfAttention(nn.Module):
    """q/k/v/out projections around fused SDPA, the shape of diffusers' ``Attention`` for self-attention."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).transpose(1, 2) for f in (self.to_q, self.to_k, self.to_v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # [B, heads, n, d]
        return self.to_out(o.transpose(1, 2).reshape(b, n, c))


# ------------------------------------------------------------------------------------------------ machine


def _machine(device: torch.device) -> dict[str, Any]:
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


# ------------------------------------------------------------------------------------------------ measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak of torch's CPU allocations while ``fn`` runs, above what was live before, from profiler events."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
    except (AttributeError, RuntimeError):  # private profiler API moved: report no number rather than a wrong one
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _run_variant(
    attn: SelfAttention, x: Tensor, grid: tuple[int, int], ratio: float | None, seed: int, proportional: bool
) -> tuple[dict[str, float], MergePlan | None]:
    """One call of the variant: plain attention (``ratio=None``) or plan → merge → attention → unmerge.

    Returns per-stage wall times (synchronised) and the plan.
    """
    device = x.device
    if ratio is None:
        _sync(device)
        t0 = time.perf_counter()
        attn(x)
        _sync(device)
        return {"attention": time.perf_counter() - t0}, None
    generator = torch.Generator(device=device).manual_seed(seed)
    _sync(device)
    t0 = time.perf_counter()
    plan = plan_merge(x[0::2], grid, ratio, generator=generator)  # the source-branch rows
    _sync(device)
    t1 = time.perf_counter()
    merged = plan.merge(x)  # [B, N - r, C]
    _sync(device)
    t2 = time.perf_counter()
    out = attn(merged, plan.attention_bias(x.dtype) if proportional and not plan.is_identity else None)
    _sync(device)
    t3 = time.perf_counter()
    plan.unmerge(out)  # [B, N, C]
    _sync(device)
    t4 = time.perf_counter()
    return {"plan": t1 - t0, "merge": t2 - t1, "attention": t3 - t2, "unmerge": t4 - t3}, plan


def bench_config(
    width: int,
    heads: int,
    batch: int,
    ratios: list[float],
    grid: tuple[int, int],
    *,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    seed: int,
    proportional: bool,
) -> list[dict[str, Any]]:
    """Time plain attention and every ratio for one width × batch; rows of the results table."""
    torch.manual_seed(seed)
    attn = SelfAttention(width, heads).to(device=device, dtype=dtype).eval()
    n = grid[0] * grid[1]
    x = torch.randn(batch, n, width, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)
    variants: list[float | None] = [None, *ratios]
    stages: dict[int, list[dict[str, float]]] = {i: [] for i in range(len(variants))}
    peaks: dict[int, int | None] = {}
    plans: dict[int, MergePlan | None] = {}

    with torch.inference_mode():
        for rep in range(warmup + repeats):
            for i, ratio in enumerate(variants):  # round-robin: background load hits every variant alike
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                if rep == 0 and device.type == "cpu":  # warm-up call doubles as the memory measurement
                    peaks[i] = _cpu_peak_bytes(lambda r=ratio: _run_variant(attn, x, grid, r, seed, proportional))
                    continue
                times, plans[i] = _run_variant(attn, x, grid, ratio, seed, proportional)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) - base
                    peaks[i] = max(peaks.get(i) or 0, peak)
                if rep >= warmup:
                    stages[i].append(times)

    rows = []
    plain_time = statistics.median(sum(s.values()) for s in stages[0])
    for i, ratio in enumerate(variants):
        totals = [sum(s.values()) for s in stages[i]]
        total = statistics.median(totals)
        stage_median = {k: statistics.median(s[k] for s in stages[i]) for k in stages[i][0]}
        row: dict[str, Any] = {
            "width": width,
            "heads": heads,
            "batch": batch,
            "tokens": n,
            "variant": "plain" if ratio is None else "merged",
            "requested_ratio": ratio,
            "time_s": total,
            "times_s": totals,
            "stages_s": stage_median,
            "peak_memory_bytes": peaks.get(i),
            "speedup": plain_time / total,
        }
        plan = plans.get(i)
        if plan is not None:
            without_plan = total - stage_median["plan"]
            row.update(
                applied_ratio=plan.applied_ratio,
                stride=list(plan.stride),
                merged_tokens=plan.num_kept,
                speedup_without_plan=plain_time / without_plan,
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ main


def _summary(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| width | heads | batch | variant | ratio req → applied | stride | tokens | time (s) | plan (s) "
        "| speed-up | speed-up w/o plan | peak mem (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        merged = r["variant"] == "merged"
        ratio = f"{r['requested_ratio']:.2f} → {r['applied_ratio']:.4f}" if merged else "—"
        mem = "n/a" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:.0f}"
        lines.append(
            f"| {r['width']} | {r['heads']} | {r['batch']} | {r['variant']} | {ratio} "
            f"| {'x'.join(map(str, r['stride'])) if merged else '—'} | {r.get('merged_tokens', r['tokens'])} "
            f"| {r['time_s']:.3f} | {r['stages_s']['plan'] if merged else 0:.3f} | {r['speedup']:.2f}x "
            f"| {r['speedup_without_plan'] if merged else 1:.2f}x | {mem} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                        help="default: float32 on cpu, float16 on cuda")  # fmt: skip
    parser.add_argument("--grid", type=int, nargs=2, default=[64, 64], metavar=("H", "W"), help="token grid")
    parser.add_argument("--widths", nargs="+", default=["1152:16", "320:8"], help="width:heads pairs")
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.5, 0.75, 0.8])
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per variant (cpu 2, cuda 20)")
    parser.add_argument("--proportional", action="store_true", help="add log(size) to the logits (ToMe eq. 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "float16"))
    repeats = args.repeats or (2 if device.type == "cpu" else 20)
    warmup = 1 if device.type == "cpu" else 3
    grid = (args.grid[0], args.grid[1])
    widths = [tuple(int(v) for v in spec.split(":")) for spec in args.widths]
    machine = _machine(device)

    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for width, heads in widths:
        for batch in args.batches:
            t0 = time.perf_counter()
            rows += bench_config(
                width, heads, batch, args.ratios, grid, device=device, dtype=dtype, repeats=repeats,
                warmup=warmup, seed=args.seed, proportional=args.proportional,
            )  # fmt: skip
            print(f"width {width} batch {batch}: {time.perf_counter() - t0:.1f}s", flush=True)
    machine["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    at_target = [r for r in rows if r["variant"] == "merged" and r["requested_ratio"] == TARGET_RATIO]
    payload = {
        "benchmark": "merge_attention",
        "description": "self-attention (q/k/v/out projections + SDPA): plan+merge+attention+unmerge vs plain",
        "machine": machine,
        "commit": git_commit(ROOT),
        "settings": {
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "grid_hw": list(grid),
            "tokens": math.prod(grid),
            "widths": [{"width": w, "heads": h} for w, h in widths],
            "batches": args.batches,
            "ratios": args.ratios,
            "repeats": repeats,
            "warmup": warmup,
            "timing": "median wall time of the timed calls, variants interleaved round-robin",
            "plan_metric": "hidden states of the even batch rows (source branch); one plan shared by all rows",
            "dst_choice": f"random per cell, torch.Generator seeded {args.seed}",
            "proportional_attention": args.proportional,
            "peak_memory": (
                "torch.profiler allocation events (tracemalloc does not see torch's CPU allocator)"
                if device.type == "cpu"
                else "torch.cuda.max_memory_allocated"
            )
            + ", above the memory live before the call",
            "wall_s": time.perf_counter() - start,
        },
        "target": {
            "ratio": TARGET_RATIO,
            "self_attention_speedup": TARGET_SPEEDUP,
            "measured": [{k: r[k] for k in ("width", "batch", "speedup", "speedup_without_plan")} for r in at_target],
            "met": all(r["speedup"] >= TARGET_SPEEDUP for r in at_target) if at_target else None,
        },
        "results": rows,
    }
    save_json(payload, args.out)
    print(_summary(rows))
    verdict = {True: "met", False: "NOT met", None: "not measured"}[payload["target"]["met"]]
    print(f"target ≥{TARGET_SPEEDUP}x self-attention speed-up at ratio {TARGET_RATIO}: {verdict}")
    print(f"wrote {args.out} ({payload['settings']['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
