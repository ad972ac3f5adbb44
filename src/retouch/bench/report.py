"""Summaries (``summary.json``) and the HTML report (``report.html``) of a benchmark run's rows.

``summary.json``::

    {"suite": "shapes", "n_cases": 20, "n_rows": 40, "config": {...}, "metrics_info": {...}, "evaluator": {...},
     "methods": {"ddim+p2p": {"n_rows": 20, "n_errors": 0,
                              "metrics": {"structure_distance": 0.012, "psnr_bg": 24.1, ..., "seconds": 1.9, "nfe": 6},
                              "counts": {"psnr_bg": 14, ...},            # rows that had a value (PIE skips "nan")
                              "missing": {"lpips_bg": "why it is null"},
                              "by_type": {"0": {"n_rows": 2, "metrics": {...}, "counts": {...}}, ...}}}}

Values are raw means over the rows that have the metric (``metrics_info[key]["scale"]`` is the factor PIE's
tables print them at: structure ×10³, LPIPS ×10³, MSE ×10⁴, SSIM ×10²).
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from retouch.bench.evaluate import METRIC_INFO, SUMMARY_METRICS
from retouch.bench.metrics import mean_of
from retouch.worlds import EDIT_TYPES

__all__ = ["render_html", "render_markdown", "summarize"]


def _value(row: Mapping[str, Any], key: str) -> float | None:
    v = row.get(key) if key in ("seconds", "nfe") else (row.get("metrics") or {}).get(key)
    return None if v is None else float(v)


def _aggregate(rows: Sequence[Mapping[str, Any]]) -> tuple[dict[str, float | None], dict[str, int]]:
    means: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    ok = [r for r in rows if not r.get("error")]
    for key in SUMMARY_METRICS:
        means[key], counts[key] = mean_of([_value(r, key) for r in ok])
    return means, counts


def _reason(rows: Sequence[Mapping[str, Any]], key: str) -> str:
    ok = [r for r in rows if not r.get("error")]
    if not ok:
        return "no row of this method finished without an error"
    notes = Counter((r.get("notes") or {}).get(key, "not computed") for r in ok)
    return notes.most_common(1)[0][0]


def summarize(
    rows: Iterable[Mapping[str, Any]],
    *,
    suite: str,
    methods: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    evaluator: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-method means overall and by editing type (see the module docstring). ``methods`` fixes the order;
    methods found only in the rows follow alphabetically."""
    rows = list(rows)
    labels = list(dict.fromkeys([*methods, *sorted({r["method"] for r in rows} - set(methods))]))
    out: dict[str, Any] = {
        "suite": suite,
        "n_cases": len({r["case_id"] for r in rows}),
        "n_rows": len(rows),
        "config": dict(config or {}),
        "evaluator": dict(evaluator or {}),
        "metrics_info": METRIC_INFO,
        "methods": {},
    }
    for label in labels:
        mine = [r for r in rows if r["method"] == label]
        means, counts = _aggregate(mine)
        by_type: dict[str, Any] = {}
        for type_id in sorted({int(r["type_id"]) for r in mine}):
            typed = [r for r in mine if int(r["type_id"]) == type_id]
            t_means, t_counts = _aggregate(typed)
            by_type[str(type_id)] = {
                "name": EDIT_TYPES.get(type_id, str(type_id)),
                "n_rows": len(typed),
                "metrics": t_means,
                "counts": t_counts,
            }
        out["methods"][label] = {
            "n_rows": len(mine),
            "n_errors": sum(1 for r in mine if r.get("error")),
            "errors": sorted({str(r["error"]) for r in mine if r.get("error")})[:5],
            "metrics": means,
            "counts": counts,
            "missing": {k: _reason(mine, k) for k, v in means.items() if v is None},
            "by_type": by_type,
        }
    return out


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

OFFICIAL_COLUMNS = (
    "structure_distance", "psnr_bg", "lpips_bg", "mse_bg", "ssim_bg", "clip_whole", "clip_edited",
    "edit_success", "gt_psnr", "seconds", "nfe",
)  # fmt: skip
EXTRA_COLUMNS = (
    "structure_distance_corrected", "psnr_bg_corrected", "mse_bg_corrected", "edit_applied", "edit_preserved",
    "recon_psnr", "clip_source", "oracle_source_ok",
)  # fmt: skip
BAR_METRICS = ("edit_success", "psnr_bg", "gt_psnr", "clip_edited", "structure_distance", "ssim_bg")
SHORT_TYPE_NAMES = {0: "random", 1: "object", 2: "add", 3: "delete", 4: "content", 5: "pose", 6: "colour",
                    7: "material", 8: "backgr.", 9: "style"}  # fmt: skip
PALETTE = ("#3b6fb6", "#d9822b", "#3a9a5b", "#b63b6f", "#7a5cc4", "#8c8c3b", "#2aa3a3", "#c44a3b")

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right;font-size:13px}
th{background:#f1f1f1} td.l,th.l{text-align:left}
.grid img{width:128px;height:128px;image-rendering:pixelated;object-fit:contain;display:block}
.grid td{vertical-align:top;text-align:center;font-size:11px}
.note{color:#666;font-size:12px} svg text{font-size:10px;font-family:system-ui,sans-serif}
"""


def _fmt(value: float | None, key: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    v = value * METRIC_INFO.get(key, {}).get("scale", 1)
    return f"{v:.0f}" if key == "nfe" else f"{v:.2f}"


def _header(key: str) -> str:
    info = METRIC_INFO.get(key, {})
    scale = info.get("scale", 1)
    suffix = {1e2: " ×10²", 1e3: " ×10³", 1e4: " ×10⁴"}.get(scale, "")
    if key.startswith("edit_") or key == "oracle_source_ok":
        suffix = " %"
    arrow = "↑" if info.get("better") == "higher" else "↓"
    return html.escape(f"{info.get('label', key)}{suffix} {arrow}")


def _table(summary: Mapping[str, Any], columns: Sequence[str]) -> str:
    methods = summary["methods"]
    cols = [c for c in columns if any(m["metrics"].get(c) is not None for m in methods.values())]
    if not cols:
        return "<p class=note>no values</p>"
    head = "".join(f"<th>{_header(c)}</th>" for c in cols)
    body = []
    for label, m in methods.items():
        cells = "".join(f"<td>{_fmt(m['metrics'].get(c), c)}</td>" for c in cols)
        body.append(
            f"<tr><th class=l>{html.escape(label)}</th><td>{m['n_rows']}</td><td>{m['n_errors']}</td>{cells}</tr>"
        )
    return f"<table><tr><th class=l>method</th><th>rows</th><th>errors</th>{head}</tr>{''.join(body)}</table>"


def render_markdown(summary: Mapping[str, Any], columns: Sequence[str] = OFFICIAL_COLUMNS) -> str:
    """A Markdown table of the summary's methods (metric scales and arrows as in the HTML report)."""
    methods = summary["methods"]
    cols = [c for c in columns if any(m["metrics"].get(c) is not None for m in methods.values())]
    head = "| method | rows | errors | " + " | ".join(html.unescape(_header(c)) for c in cols) + " |"
    lines = [head, "|---" * (len(cols) + 3) + "|"]
    for label, m in methods.items():
        cells = " | ".join(_fmt(m["metrics"].get(c), c) for c in cols)
        lines.append(f"| {label} | {m['n_rows']} | {m['n_errors']} | {cells} |")
    return "\n".join(lines) + "\n"


def _bars(summary: Mapping[str, Any], key: str) -> str:
    methods = list(summary["methods"].items())
    types = sorted({int(t) for _, m in methods for t in m["by_type"]})
    values = {
        (label, t): m["by_type"].get(str(t), {}).get("metrics", {}).get(key) for label, m in methods for t in types
    }
    present = [v for v in values.values() if v is not None]
    if not present:
        return ""
    scale = METRIC_INFO.get(key, {}).get("scale", 1)
    top = max(max(v * scale for v in present), 1e-9)
    lo = min(0.0, min(v * scale for v in present))
    span = top - lo
    group_w, bar_w, height, pad = max(24, 12 * len(methods) + 8), 12, 120, 30
    width = pad + group_w * len(types) + 10
    parts = [f'<svg width="{width}" height="{height + 40}" role="img" aria-label="{html.escape(key)} by type">']
    parts.append(f'<line x1="{pad}" y1="{height}" x2="{width}" y2="{height}" stroke="#999"/>')
    parts.append(f'<text x="2" y="10">{_fmt(top / scale, key)}</text>')
    for ti, t in enumerate(types):
        x0 = pad + ti * group_w + 4
        for mi, (label, _) in enumerate(methods):
            v = values[(label, t)]
            if v is None:
                continue
            h = (v * scale - lo) / span * (height - 10) if span > 0 else 0
            colour = PALETTE[mi % len(PALETTE)]
            parts.append(
                f'<rect x="{x0 + mi * bar_w}" y="{height - h:.1f}" width="{bar_w - 2}" height="{h:.1f}" '
                f'fill="{colour}"><title>{html.escape(label)} · type {t}: {_fmt(v, key)}</title></rect>'
            )
        parts.append(f'<text x="{x0}" y="{height + 14}">{t}</text>')
        parts.append(f'<text x="{x0}" y="{height + 26}">{html.escape(SHORT_TYPE_NAMES.get(t, ""))}</text>')
    parts.append("</svg>")
    return f"<div><b>{_header(key)}</b><br>{''.join(parts)}</div>"


def _legend(summary: Mapping[str, Any]) -> str:
    items = [
        f'<span style="display:inline-block;width:10px;height:10px;background:{PALETTE[i % len(PALETTE)]}"></span> '
        f"{html.escape(label)}"
        for i, label in enumerate(summary["methods"])
    ]
    return "<p>" + " &nbsp; ".join(items) + "</p>"


def _img(path: str | None, title: str) -> str:
    if not path:
        return "<td>–</td>"
    return f'<td><img src="{html.escape(path)}" alt="{html.escape(title)}" title="{html.escape(title)}"></td>'


def _grid(rows: Sequence[Mapping[str, Any]], methods: Sequence[str], per_type: int) -> str:
    by_case: dict[str, dict[str, Mapping[str, Any]]] = {}
    order: list[Mapping[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r.get("case_index", 0), r["case_id"])):
        if r["case_id"] not in by_case:
            by_case[r["case_id"]] = {}
            order.append(r)
        by_case[r["case_id"]][r["method"]] = r
    shown: Counter[int] = Counter()
    head = "<th>case</th><th>source</th>" + "".join(
        f"<th>{html.escape(m)}<br>reconstruction</th><th>{html.escape(m)}<br>edit</th>" for m in methods
    )
    has_gt = any((r.get("images") or {}).get("gt") for r in rows)
    head += "<th>ground truth</th>" if has_gt else ""
    lines = []
    for first in order:
        t = int(first["type_id"])
        if shown[t] >= per_type:
            continue
        shown[t] += 1
        images = first.get("images") or {}
        desc = (
            f"<b>{html.escape(first['case_id'])}</b><br>type {t} ({html.escape(EDIT_TYPES.get(t, ''))})<br>"
            f"{html.escape(first.get('source_prompt', ''))}<br>→ {html.escape(first.get('target_prompt', ''))}"
        )
        cells = [f'<td class=l style="max-width:220px">{desc}</td>', _img(images.get("source"), "source")]
        for m in methods:
            r = by_case[first["case_id"]].get(m)
            im = (r or {}).get("images") or {}
            cells += [_img(im.get("recon"), f"{m} reconstruction"), _img(im.get("edit"), f"{m} edit")]
        if has_gt:
            cells.append(_img(images.get("gt"), "ground truth"))
        lines.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table class=grid><tr>{head}</tr>{''.join(lines)}</table>"


def render_html(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], *, per_type: int = 2) -> str:
    """The report page: tables, per-type bars (inline SVG) and image grids (images beside the page)."""
    methods = list(summary["methods"])
    cfg = summary.get("config", {})
    missing = {k: v for m in summary["methods"].values() for k, v in m.get("missing", {}).items()}
    notes = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>" for k, v in sorted(missing.items()))
    bars = "".join(_bars(summary, k) for k in BAR_METRICS)
    ev = summary.get("evaluator", {})
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>retouch bench: {html.escape(summary["suite"])}</title>
<style>{_CSS}</style></head><body>
<h1>retouch bench — {html.escape(summary["suite"])}</h1>
<p>{summary["n_cases"]} cases, {summary["n_rows"]} rows; model <code>{html.escape(str(cfg.get("model")))}</code>,
steps {html.escape(str(cfg.get("steps")))}, seed {html.escape(str(cfg.get("seed")))}.
Structure: {html.escape(str(ev.get("structure")))}; CLIP: {html.escape(str(ev.get("clip")))};
LPIPS: {html.escape(str(ev.get("lpips")))}.</p>
<h2>PIE-Bench metrics (official definitions)</h2>
<p class=note>Background metrics on masked full frames, as PIE-Bench's evaluator; means skip its "nan" rows.</p>
{_table(summary, OFFICIAL_COLUMNS)}
<h2>Corrected and extra metrics</h2>
<p class=note>Background-only PSNR / MSE; DINO input in [0, 1]; oracle breakdown; reconstruction PSNR.</p>
{_table(summary, EXTRA_COLUMNS)}
<h2>By editing type</h2>{_legend(summary)}<div style="display:flex;flex-wrap:wrap;gap:18px">{bars}</div>
<h2>Examples</h2>{_grid(rows, methods, per_type)}
<h2>Notes</h2><ul class=note>{notes or "<li>none</li>"}</ul>
</body></html>
"""
