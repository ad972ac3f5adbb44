"""Benchmarks: PIE-Bench and ShapesBench cases, PIE-Bench's metrics (exact, plus corrected variants), a resumable,
shardable runner, summaries and HTML reports.

Nothing heavy is imported here; the runner loads models only when it runs.

* :mod:`~retouch.bench.metrics` — PSNR / MSE / SSIM (torchmetrics' definitions) and PIE's background metrics.
* :mod:`~retouch.bench.learned` — DINO structure distance, CLIP score, LPIPS (hub weights; optional extra).
* :mod:`~retouch.bench.pie`, :mod:`~retouch.bench.shapes` — the two suites' cases; ShapesBench's oracle metrics.
* :mod:`~retouch.bench.evaluate` — every metric of one edit.
* :mod:`~retouch.bench.runner` — :func:`run`, :func:`merge`, :class:`BenchConfig`, :class:`MethodSpec`.
* :mod:`~retouch.bench.report` — ``summary.json`` and ``report.html``.
* :mod:`~retouch.bench.cli` — ``retouch bench``.
"""

from retouch.bench.runner import BenchConfig, BenchError, MethodSpec, merge, rebuild_outputs, run

__all__ = ["BenchConfig", "BenchError", "MethodSpec", "merge", "rebuild_outputs", "run"]
