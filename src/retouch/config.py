"""Frozen configuration dataclasses, one per concern. The CLI's flags are built from their fields and the
resolved config is written next to every output."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from retouch.io import SIZE_POLICIES

RESOLUTIONS = ("native", "input")
"""Working-size policies: ``native`` resizes an image to the model's native pixel area (aspect kept), ``input``
keeps the image's own size (rounded to a size the model takes)."""
OUTPUT_SIZES = ("input", "model")
"""Size of the returned images: the input's (the default) or the size the model worked at."""
MAX_SEED = 2**64
"""Seeds must be in [0, 2**64): what ``torch.Generator.manual_seed`` takes."""


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_type(owner: str, name: str, value: Any, kind: str, *, optional: bool = False) -> None:
    """Raise ``TypeError`` naming ``owner.name`` unless ``value`` is of ``kind`` (int | number | str | bool)."""
    if optional and value is None:
        return
    ok = {"int": _is_int, "number": _is_number, "str": lambda v: isinstance(v, str),
          "bool": lambda v: isinstance(v, bool)}[kind](value)  # fmt: skip
    if not ok:
        what = {"int": "an integer", "number": "a number", "str": "a string", "bool": "True or False"}[kind]
        raise TypeError(
            f"{owner}.{name} must be {what}{' or None' if optional else ''}, got {type(value).__name__} {value!r}"
        )


def _check_options(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{owner}.{name} must be a mapping of option names to values, got {type(value).__name__}")
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise TypeError(f"{owner}.{name}: option names must be strings, got {bad!r}")


def check_seed(seed: Any, label: str = "seed") -> int:
    """``seed`` if it is an integer in [0, 2**64) (what torch's generators take), else a clear error."""
    if not _is_int(seed):
        raise TypeError(f"{label} must be an integer in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{label} must be in [0, 2**64) (what torch's random generators take), got {seed}")
    return seed


def cli_flag(
    flag: str,
    help: str,
    *,
    kind: str = "str",
    bounds: tuple[Any, ...] = (),
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
) -> dict[str, Any]:
    """The command-line flag of a config field, as ``field(metadata=cli_flag(...))``: plain data, turned into an
    argparse argument by :func:`retouch.flags.add_config_flags` (the default is the field's). ``kind``: ``str``,
    ``int`` / ``float`` (checked against ``bounds``: ``(lo, hi)``, ``hi`` None for none; floats may add a third
    item, ``True`` for ``> lo``), ``seed``, ``options`` (repeatable ``KEY=VALUE``, :func:`parse_options`)."""
    if kind not in ("str", "int", "float", "seed", "options"):
        raise ValueError(f"unknown flag kind {kind!r}")
    return {"flag": flag, "help": help, "kind": kind, "bounds": tuple(bounds), "choices": choices, "metavar": metavar}


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

    name: str | None = field(
        default=None, metadata=cli_flag("--inversion", "inversion: ddim, dpmpp, flow_euler, ... (default: solver's)")
    )
    # None: 1.0 (conditional prediction only) unless a preset says otherwise
    guidance: float | None = field(
        default=None,
        metadata=cli_flag("--inversion-guidance", "guidance scale while inverting (1)", kind="float", bounds=(0,)),
    )
    iterations: int = field(
        default=6,
        metadata=cli_flag(
            "--inversion-iterations", "fixed-point iterations (dpmpp inversion)", kind="int", bounds=(0, 1000)
        ),
    )
    sweeps: int = 1
    eta: float = 1.0
    # None: the source prompt (RF-Inversion and MasaCtrl's PIE runs invert with "")
    prompt: str | None = field(
        default=None, metadata=cli_flag("--inversion-prompt", "prompt used while inverting (default: the source)")
    )
    options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata=cli_flag(
            "--inversion-option",
            "inversion option, e.g. --inversion-option gamma=0.5 (repeatable)",
            kind="options",
            metavar="KEY=VALUE",
        ),
    )
    # fraction of the noisiest steps left out (LEDITS++'s / edit-friendly DDPM's "skip"): the grid has
    # int(num_steps * (1 + skip)) steps and only its last num_steps are inverted and sampled; None: the preset's, or 0
    skip: float | None = field(
        default=None,
        metadata=cli_flag(
            "--inversion-skip",
            "leave out the noisiest FRACTION of the steps: invert and sample only the last --steps of "
            "a grid of steps*(1+FRACTION) (LEDITS++ / edit-friendly DDPM's skip; default: the preset's, or 0)",
            kind="float",
            metavar="FRACTION",
        ),
    )

    def __post_init__(self) -> None:
        own = "InversionConfig"
        _check_type(own, "name", self.name, "str", optional=True)
        _check_type(own, "guidance", self.guidance, "number", optional=True)
        _check_type(own, "iterations", self.iterations, "int")
        _check_type(own, "sweeps", self.sweeps, "int")
        _check_type(own, "eta", self.eta, "number")
        _check_type(own, "prompt", self.prompt, "str", optional=True)
        _check_options(own, "options", self.options)
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

    ratio: float = field(
        default=0.0,
        metadata=cli_flag(
            "--merge-ratio", "token merging ratio in self-attention (0=off)", kind="float", bounds=(0, 0.95)
        ),
    )
    max_downsample: int = field(
        default=1,
        metadata=cli_flag(
            "--merge-max-downsample", "UNets: merge only up to this downsampling", kind="int", bounds=(1, 64)
        ),
    )
    random: bool = True

    def __post_init__(self) -> None:
        _check_type("MergeConfig", "ratio", self.ratio, "number")
        _check_type("MergeConfig", "max_downsample", self.max_downsample, "int")
        _check_type("MergeConfig", "random", self.random, "bool")
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
    solver: str | None = field(
        default=None, metadata=cli_flag("--solver", "sampler: ddim, dpmpp, flow_euler, ... (default: model's)")
    )
    num_steps: int | None = field(
        default=None,
        metadata=cli_flag("--steps", "number of sampling steps (default: model's)", kind="int", bounds=(1, 1000)),
    )
    guidance: float | None = field(
        default=None, metadata=cli_flag("--guidance", "guidance scale while sampling", kind="float", bounds=(0,))
    )
    seed: int = field(default=0, metadata=cli_flag("--seed", "random seed, 0 <= seed < 2**64 (default 0)", kind="seed"))
    size_policy: str = field(
        default="resize",
        metadata=cli_flag(
            "--size-policy",
            "how the image is brought to the working size: resize (bicubic), crop (scale and centre-crop) or "
            "strict (refuse any change: the image must already be a size the model takes)",
            choices=SIZE_POLICIES,
        ),
    )
    height: int | None = field(
        default=None,
        metadata=cli_flag("--height", "process at this height (pixels)", kind="int", bounds=(1, None)),
    )
    width: int | None = field(
        default=None, metadata=cli_flag("--width", "process at this width (pixels)", kind="int", bounds=(1, None))
    )
    inversion: InversionConfig = field(default_factory=InversionConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    options: Mapping[str, Any] = field(default_factory=dict)
    # "native": the model's native pixel area, aspect kept; "input": the image's size
    resolution: str = field(
        default="native",
        metadata=cli_flag(
            "--resolution",
            "working size: native (default: the model's native pixel area, e.g. 512x512 for SD 1.x, with the "
            "image's aspect ratio) or input (the image's own size, rounded to a size the model takes)",
            choices=RESOLUTIONS,
        ),
    )
    # "input": images returned at the input's size; "model": at the working size
    output_size: str = field(
        default="input",
        metadata=cli_flag(
            "--output-size",
            "size of the written image: the input's (default) or the working size",
            choices=OUTPUT_SIZES,
        ),
    )

    def __post_init__(self) -> None:
        own = "EditConfig"
        for label, p in (("source", self.source_prompt), ("target", self.target_prompt)):
            if not isinstance(p, str):
                raise TypeError(f"{label} prompt must be a string, got {type(p).__name__}")
        _check_type(own, "method", self.method, "str")
        _check_type(own, "solver", self.solver, "str", optional=True)
        _check_type(own, "num_steps", self.num_steps, "int", optional=True)
        _check_type(own, "guidance", self.guidance, "number", optional=True)
        _check_type(own, "size_policy", self.size_policy, "str")
        _check_type(own, "resolution", self.resolution, "str")
        _check_type(own, "output_size", self.output_size, "str")
        _check_type(own, "height", self.height, "int", optional=True)
        _check_type(own, "width", self.width, "int", optional=True)
        if not isinstance(self.inversion, InversionConfig):
            raise TypeError(
                f"{own}.inversion must be an InversionConfig, got {type(self.inversion).__name__}"
                + ("; build one with InversionConfig(**d)" if isinstance(self.inversion, Mapping) else "")
            )
        if not isinstance(self.merge, MergeConfig):
            raise TypeError(
                f"{own}.merge must be a MergeConfig, got {type(self.merge).__name__}"
                + ("; build one with MergeConfig(**d)" if isinstance(self.merge, Mapping) else "")
            )
        _check_options(own, "options", self.options)
        if self.num_steps is not None and not 1 <= self.num_steps <= 1000:
            raise ValueError(f"num_steps must be an integer in [1, 1000], got {self.num_steps!r}")
        if self.guidance is not None and (not math.isfinite(self.guidance) or self.guidance < 0):
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance}")
        check_seed(self.seed, "seed")
        if self.size_policy not in SIZE_POLICIES:
            raise ValueError(f"unknown size policy {self.size_policy!r}; choose one of {SIZE_POLICIES}")
        if self.resolution not in RESOLUTIONS:
            raise ValueError(f"unknown resolution {self.resolution!r}; choose one of {RESOLUTIONS}")
        if self.output_size not in OUTPUT_SIZES:
            raise ValueError(f"unknown output_size {self.output_size!r}; choose one of {OUTPUT_SIZES}")
        for label, v in (("height", self.height), ("width", self.width)):
            if v is not None and v <= 0:
                raise ValueError(f"{label} must be a positive integer, got {v!r}")

    def with_(self, **changes: Any) -> EditConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["options"] = dict(self.options)
        d["inversion"]["options"] = dict(self.inversion.options)
        return d
