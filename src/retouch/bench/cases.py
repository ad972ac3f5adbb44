"""Benchmark cases shared by PIE-Bench and ShapesBench: metadata up front, images loaded on demand.

A suite produces its full, ordered case list cheaply (PIE: from ``mapping_file.json`` alone; ShapesBench: from
the split's seeds); sharding and case limits pick from that list deterministically, and a case's images are only
read or rendered when a runner reaches it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retouch.worlds import EDIT_TYPES

__all__ = [
    "BenchCase",
    "CaseData",
    "balanced",
    "parse_shard",
    "shard_cases",
    "shard_from_env",
]


@dataclass(frozen=True, eq=False)
class CaseData:
    """The pixels of one case. Images are uint8 ``[H, W, 3]``; ``mask`` is bool ``[H, W]`` (True = edit region),
    decoded with PIE-Bench's border rule (``edit_mask``: the same without it, for masked editing). Ground truth
    (``gt_image``, scenes) exists for ShapesBench only."""

    source_image: np.ndarray
    mask: np.ndarray
    gt_image: np.ndarray | None = None
    source_scene: Any = None
    target_scene: Any = None
    edit_mask: np.ndarray | None = None  # the edit region without PIE's border rule (what a masked edit is given)


@dataclass(frozen=True, eq=False)
class BenchCase:
    """One editing task. ``index`` is its position in the suite's full (unsharded) list, the sort key of results."""

    case_id: str
    index: int
    type_id: int
    source_prompt: str
    target_prompt: str
    instruction: str = ""
    blended_word: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)
    loader: Callable[[], CaseData] | None = None

    @property
    def type_name(self) -> str:
        return EDIT_TYPES.get(self.type_id, str(self.type_id))

    def load(self) -> CaseData:
        if self.loader is None:
            raise ValueError(f"case {self.case_id} has no image loader")
        return self.loader()


def balanced(cases: Sequence[BenchCase], limit: int | None) -> list[BenchCase]:
    """At most ``limit`` cases, taken round-robin over editing types (each type in its own order), returned in
    the original order. ``None`` keeps every case."""
    if limit is None or limit >= len(cases):
        return list(cases)
    if limit < 0:
        raise ValueError(f"the case limit must be >= 0, got {limit}")
    by_type: dict[int, list[BenchCase]] = {}
    for c in cases:
        by_type.setdefault(c.type_id, []).append(c)
    chosen: list[BenchCase] = []
    queues = [list(v) for _, v in sorted(by_type.items())]
    while len(chosen) < limit:
        for q in queues:
            if q and len(chosen) < limit:
                chosen.append(q.pop(0))
    keep = {id(c) for c in chosen}
    return [c for c in cases if id(c) in keep]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0 <= i < n) -> ``(i, n)``."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ValueError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return i, n


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int] | None:
    """The shard of this process from a launcher's environment, or ``None`` when not launched as a group.

    ``torchrun`` / ``torch.distributed`` and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE``; Slurm sets
    ``SLURM_PROCID`` and ``SLURM_NTASKS``.
    """
    env = os.environ if env is None else env
    for rank_key, size_key in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_key in env and size_key in env:
            i, n = int(env[rank_key]), int(env[size_key])
            if n < 1 or not 0 <= i < n:
                raise ValueError(f"bad {rank_key}={i} / {size_key}={n} in the environment")
            return i, n
    return None


def shard_cases(cases: Sequence[BenchCase], shard: tuple[int, int]) -> list[BenchCase]:
    """The deterministic subset of shard ``i`` of ``n``: every n-th case starting at i (balanced over types when
    the list interleaves them, as ShapesBench's does)."""
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"bad shard {i}/{n}")
    return list(cases[i::n])
