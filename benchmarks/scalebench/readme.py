"""benchmarks/results/README.md, rendered from every JSON file in the results folder."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalebench.specs import RESULTS_DIR, _size_str


def _mib(b: float | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "n/a" if v is None else format(v, fmt)


def _scale_section(data: Mapping[str, Any]) -> list[str]:
    m = data.get("machine", {})
    lines = [
        f"### `{data.get('model')}` (scale_{data.get('model')}.json)",
        "",
        f"Machine: {m.get('device_name')} · {m.get('cpu_count')} cores · torch {m.get('torch')} "
        f"({m.get('torch_threads')} threads) · diffusers {m.get('diffusers')} · device `{m.get('device')}` · "
        f"commit `{m.get('commit')}`",
        "",
        *[line for note in data.get("notes", []) for line in (f"Note: {note}", "")],
    ]
    for e in data.get("entries", []):
        if "error" in e:
            lines += [f"* {_size_str(e.get('size_hw', [0, 0]))}: **failed** ({e['error']})", ""]
            continue
        b = e["blocks"]
        depth = f"{b['used']} of {b['full']} blocks" if b["reduced"] else "full depth"
        rows = e["variants"][0].get("batch_rows")
        lines += [
            f"**{_size_str(e['size_hw'])}** ({e['image_tokens']} image tokens, {e['text_tokens']} text tokens, "
            f"{depth}, {e['parameters'] / 1e6:,.0f}M params, {e['dtype']}, batch {rows} rows, "
            f"{e['nfe_timed']} timed NFE(s) after {e['warmup']} warm-up) · load average "
            f"{e['load_average_start']} → {e['load_average_end']} · {e['wall_s']:.0f} s",
            "",
            "| variant | step | s / NFE | × plain | peak MiB | full maps (+blocks) / attn calls | merge applied |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in e["variants"]:
            mat = "—"
            if v.get("attention_calls") is not None:
                blocks = f" (+{v['block_calls']})" if v.get("block_calls") else ""
                mat = f"{v['materialised_calls']}{blocks} / {v['attention_calls']}"
            mg = v.get("merge") or {}
            applied = f"{mg['applied_ratio']:.3f}" if mg else "—"
            lines.append(
                f"| {v['name']} | {'—' if v['step'] is None else v['step']} | {v['seconds_per_nfe']:.2f} "
                f"| {v['vs_plain']:.3f} | {_mib(v['peak_memory_bytes'])} | {mat} | {applied} |"
            )
        lines += [
            "",
            "| preset | overhead (worst step) | run-average bound | run average | active steps "
            "| layers touched / reading probabilities | memory × plain | ≤ 1.10 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for o in e["overheads"]:
            lines.append(
                f"| {o['preset']} | {o['overhead']:.3f} | {o['run_overhead_bound']:.3f} "
                f"| {_f(o['run_overhead'], '.3f')} "
                f"| {o['active_steps']} / {o['num_steps']} | {o['layers_touched']} / {o['layers_materialised']} "
                f"of {o['attention_layers']} | {_f(o['memory_ratio'])} | {'yes' if o['met'] else '**no**'} |"
            )
        if e["merging"]:
            lines += ["", "| merging | ratio req → applied | NFE speed-up | memory × unmerged |", "|---|---|---|---|"]
            for g in e["merging"]:
                lines.append(
                    f"| {g['preset'] or '(no editor)'} | {g['requested_ratio']:g} → {_f(g['applied_ratio'], '.3f')} "
                    f"| {g['speedup']:.2f}× | {_f(g['memory_ratio'])} |"
                )
        lines.append("")
    runs = data.get("edit_runs", [])
    if runs:
        lines += [
            "Whole edits (`retouch.editing.edit` on the random backbone):",
            "",
            "| size | blocks | method | merge | steps | NFE inv + sample | materialised / attention calls | wall s "
            "| peak MiB | retained MiB | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            for x in r.get("runs", []):
                if "error" in x:
                    lines.append(f"| {_size_str(r['size_hw'])} | | {r['method']} | | {x.get('num_steps')} "
                                 f"| **failed: {x['error']}** | | | | | |")  # fmt: skip
                    continue
                lines.append(
                    f"| {_size_str(r['size_hw'])} | {x['blocks']['used']} / {x['blocks']['full']} | {r['method']} "
                    f"| {r['merge_ratio']:g} | {x['num_steps']} | {x['nfe']['inversion']} + {x['nfe']['sampling']} "
                    f"| {x['attention_calls']['materialised']} / {x['attention_calls']['total']} | {x['wall_s']:.0f} "
                    f"| {_mib(x['peak_memory_bytes'])} | {_mib(x['retained_bytes'])} "
                    f"| {x['load_average_start']} |"
                )
            s = r.get("summary") or {}
            if s.get("growth_last") is not None:
                verdict = "flat" if s["flat"] else "**grows**"
                lines.append(
                    f"| | | | | {s['steps'][-2]} → {s['steps'][-1]} steps: peak × {s['growth_last']:.3f} "
                    f"({verdict}; {s['steps'][0]} → {s['steps'][-1]}: × {_f(s['growth'], '.3f')}) | | | | | | |"
                )
        lines.append("")
    return lines


def _quality_section(name: str, data: Mapping[str, Any]) -> list[str]:
    """``embedded_quality.json``: oracle accuracy and reconstruction PSNR per embedded model."""
    attrs = ("count", "position", "shape", "colour", "size", "fill", "background_colour", "background_pattern", "style")
    lines = [f"### {name} (`benchmarks/embedded_quality.py`)", "",
             "| model | captions | world | " + " | ".join(attrs) + " | reconstruction dB (inversion) | VAE dB |",
             "|---" * (len(attrs) + 5) + "|"]  # fmt: skip
    for model, r in sorted((data.get("models") or {}).items()):
        acc = r.get("oracle_accuracy") or {}
        world = (r.get("world") or {}).get("max_objects", "?")
        lines.append(
            f"| {model} | {r.get('n_captions')} | {'one object' if world == 1 else f'up to {world} objects'} | "
            + " | ".join(f"{100 * acc[a]:.0f}%" if a in acc else "–" for a in attrs)
            + f" | {_f(r.get('reconstruction_psnr'), '.1f')} ({r.get('inversion')}) | {_f(r.get('vae_psnr'), '.1f')} |"
        )
    return [*lines, ""]


def _other_section(name: str, data: Mapping[str, Any]) -> list[str]:
    if "models" in data and name.startswith("embedded_quality"):
        return _quality_section(name, data)
    m = data.get("machine", {})
    target = data.get("target")
    lines = [f"### {name}", "", f"{data.get('description', data.get('benchmark', ''))}", ""]
    if m:
        lines += [f"Machine: {m.get('device_name', m.get('device'))} · {m.get('cpu_count')} cores · load average "
                  f"{m.get('load_average_start')} → {m.get('load_average_end')}", ""]  # fmt: skip
    if isinstance(target, Mapping):
        lines += [f"Target: `{json.dumps({k: v for k, v in target.items() if k != 'measured'})}`", ""]
    return lines


def write_readme(results_dir: Path = RESULTS_DIR) -> Path:
    """Regenerate ``README.md`` in ``results_dir`` from every JSON file there (atomically)."""
    files = sorted(results_dir.glob("*.json"))
    lines = [
        "# Benchmark results",
        "",
        "<!-- generated by benchmarks/scale.py from the JSON files in this folder; do not edit by hand -->",
        "",
        "Random weights at the published configs' sizes (no download); CPU timings are wall-clock on a shared "
        "machine, so every table carries the load average it ran under; a variant's time is the fastest of its "
        "timed NFEs (background load only adds time; the JSON has every time and the median). "
        "`× plain` is the NFE time relative to "
        "plain sampling (diffusers' processors, no control) with the same batch; **overhead** is issue 4's "
        "edit NFE / plain NFE at the step where the editor touches the most layers, and the *run-average bound* "
        "spreads it over the preset's schedule (worst-step time on every active step, routed time elsewhere). "
        "Merging speed-up = preset NFE / preset + merging NFE. Peak memory is above what was resident before "
        "the call (weights excluded).",
        "",
    ]
    scale = [f for f in files if f.name.startswith("scale_")]
    if scale:
        lines += ["## Scale (`benchmarks/scale.py`)", ""]
        for f in scale:
            with contextlib.suppress(json.JSONDecodeError, OSError):
                lines += _scale_section(json.loads(f.read_text()))
    others = [f for f in files if not f.name.startswith("scale_")]
    if others:
        lines += ["## Other benchmarks", ""]
        for f in others:
            with contextlib.suppress(json.JSONDecodeError, OSError):
                lines += _other_section(f.name, json.loads(f.read_text()))
    path = results_dir / "README.md"
    fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".README.md.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
