"""Frozen configuration dataclasses, one per concern. The CLI's flags are built from their fields and the
resolved config is written next to every output."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from retouch.io import SIZE_POLICIES


def parse_options(items: Sequence[str], flag: str = "--option") -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{k: json(v) or the raw string}`` (CLI method / inversion options)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@dataclass(frozen=True)
class InversionConfig:
    """How the source image is inverted.

    ``name``: registry name (``ddim``, ``dpmpp``, ``flow_euler``...); ``guidance``: CFG scale during inversion
    (1 = conditional prediction only, the usual choice); ``iterations``/``sweeps``/``eta``: fixed-point
    settings of corrected inversions (``dpmpp``).
    """

    name: str | None = None
    guidance: float | None = None  # None: 1.0 (conditional prediction only) unless a preset says otherwise
    iterations: int = 6
    sweeps: int = 1
    eta: float = 1.0
    prompt: str | None = None  # None: the source prompt (RF-Inversion and MasaCtrl's PIE runs invert with "")
    options: Mapping[str, Any] = field(default_factory=dict)
    # fraction of the noisiest steps left out (LEDITS++'s / edit-friendly DDPM's "skip"): the grid has
    # int(num_steps * (1 + skip)) steps and only its last num_steps are inverted and sampled; None: the preset's, or 0
    skip: float | None = None

    def __post_init__(self) -> None:
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise ValueError(f"inversion guidance must be a finite number >= 0, got {self.guidance}")
        if self.iterations < 0 or self.sweeps < 1:
            raise ValueError("inversion iterations must be >= 0 and sweeps >= 1")
        if not 0 < self.eta <= 1:
            raise ValueError(f"inversion eta must be in (0, 1], got {self.eta}")
        if self.skip is not None and not (math.isfinite(self.skip) and 0 <= self.skip < 10):
            raise ValueError(f"inversion skip must be a fraction >= 0 (of the steps run), got {self.skip}")


@dataclass(frozen=True)
class MergeConfig:
    """Token merging (ToMe) in self / joint attention.

    ``ratio``: fraction of image tokens merged away (0 = off, up to 0.95; the stride is chosen so the ratio is
    really applied); ``max_downsample``: on UNets, merge only in layers at most this much downsampled (tomesd's
    default 1 = the highest-resolution blocks; DiTs merge in every block); ``random``: random destination
    token per cell (seeded) instead of the top-left one.
    """

    ratio: float = 0.0
    max_downsample: int = 1
    random: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 0.95:
            raise ValueError(f"merge ratio must be in [0, 0.95], got {self.ratio}")
        if self.max_downsample < 1:
            raise ValueError(f"merge max_downsample must be >= 1, got {self.max_downsample}")


@dataclass(frozen=True)
class EditConfig:
    """One edit. ``None`` fields take the backbone's defaults when the config is resolved."""

    source_prompt: str
    target_prompt: str
    method: str = "identity"
    solver: str | None = None
    num_steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    size_policy: str = "resize"
    height: int | None = None
    width: int | None = None
    inversion: InversionConfig = field(default_factory=InversionConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for label, p in (("source", self.source_prompt), ("target", self.target_prompt)):
            if not isinstance(p, str):
                raise TypeError(f"{label} prompt must be a string")
        if self.num_steps is not None and not (isinstance(self.num_steps, int) and 1 <= self.num_steps <= 1000):
            raise ValueError(f"num_steps must be an integer in [1, 1000], got {self.num_steps!r}")
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(f"unknown size policy {self.size_policy!r}; choose one of {SIZE_POLICIES}")
        for label, v in (("height", self.height), ("width", self.width)):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{label} must be a positive integer, got {v!r}")

    def with_(self, **changes: Any) -> EditConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["inversion"]["options"] = dict(self.inversion.options)
        return d
