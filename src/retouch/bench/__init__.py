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

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from retouch.bench.runner import BenchConfig, BenchError, MethodSpec, merge, rebuild_outputs, run

__all__ = ["BenchConfig", "BenchError", "MethodSpec", "merge", "rebuild_outputs", "run"]


def __getattr__(name: str) -> Any:
    """Lazy exports, so that ``retouch --help`` (which imports the bench CLI) does not import torch."""
    if name in __all__:
        from retouch.bench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'retouch.bench' has no attribute {name!r}")
