"""Command-line flag types shared by ``retouch`` (:mod:`retouch.cli`) and ``retouch bench``
(:mod:`retouch.bench.cli`): every flag is checked where it is parsed, and argparse prints one line naming it.

It imports neither command module, so they can share it without importing each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import typing
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "add_config_flags",
    "config_from_flags",
    "cpu_cores",
    "device",
    "float_in",
    "int_in",
    "machine_devices",
    "seed",
    "set_threads",
    "threads",
]


def int_in(lo: int, hi: int | None, what: str = "an integer") -> Any:
    """An argparse type: an integer (decimal, or 0x / 0b / 0o) in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 0) if text.strip().lower().startswith(("0x", "0b", "0o")) else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**64), what torch's generators take."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**64), got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 2**64) (0 <= seed <= 18446744073709551615, what torch's generators take), got {value}"
        )
    return value


def float_in(lo: float, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """An argparse type: a finite number ``>= lo`` (``> lo`` with ``lo_open``) and ``<= hi``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
            low = f"> {lo}" if lo_open else f">= {lo}"
            raise argparse.ArgumentTypeError(f"must be a finite number {low}{'' if hi is None else f' and <= {hi}'}"
                                             f", got {text}")  # fmt: skip
        return value

    return parse


def machine_devices() -> list[str]:
    """The devices torch can use on this machine: ``cpu`` and each accelerator (``<type>:<index>``)."""
    import torch

    out = ["cpu"]
    acc = getattr(torch, "accelerator", None)
    if acc is not None and acc.is_available():
        kind = acc.current_accelerator().type
        out += [f"{kind}:{i}" for i in range(acc.device_count())]
    return out


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (the message lists the ones it has)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; this machine has: {', '.join(machine_devices())}"
        ) from None
    if dev.type == "cpu":
        return text
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    count = getattr(backend, "device_count", None)
    try:
        ok = bool(available and available()) and (dev.index is None or count is None or dev.index < count())
    except (RuntimeError, AssertionError):
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(
            f"device {text!r} is not available on this machine; it has: {', '.join(machine_devices())}"
        )
    return text


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def threads(text: str) -> int:
    """An argparse type: a thread count in [1, 4096] (:func:`set_threads` caps it at the cores)."""
    return int_in(1, 4096, "a thread count")(text)


def set_threads(threads: int | None, model: str, *, cores: int | None = None) -> None:
    """Set torch's CPU threads: 1 by default for the embedded models; at most the CPU cores (``cores``, default
    :func:`cpu_cores`; a larger count is capped, with a warning: oversubscribed cores run many times slower, and
    huge counts crash OpenMP).

    Raises:
        ValueError: for a count below 1.
    """
    import torch

    from retouch.models import registry

    if threads is None and model in registry.embedded_names():
        threads = 1
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        cores = cpu_cores() if cores is None else cores
        if threads > cores:
            log.warning("--threads %d is more than the %d CPU cores of this machine; using %d", threads, cores, cores)
            threads = cores
        torch.set_num_threads(threads)


# --- flags from the config dataclasses ------------------------------------------------------------------------
def _config_fields(cls: type) -> Iterator[tuple[tuple[str, ...], dataclasses.Field[Any]]]:
    """``(path, field)`` of every field of the config dataclass ``cls`` that declares a flag
    (:func:`retouch.config.cli_flag`), nested configs included, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if "flag" in f.metadata:
            yield (f.name,), f
        elif dataclasses.is_dataclass(hints.get(f.name)):
            for path, sub in _config_fields(hints[f.name]):
                yield (f.name, *path), sub


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _argparse_type(meta: Mapping[str, Any]) -> Any:
    kind, bounds = meta["kind"], meta["bounds"]
    if kind == "int":
        return int_in(*bounds) if bounds else int
    if kind == "float":
        if not bounds:
            return float
        lo, hi, lo_open = (*bounds, None, False)[:3] if len(bounds) < 3 else bounds
        return float_in(lo, hi, lo_open=bool(lo_open))
    if kind == "seed":
        return seed
    return None


def add_config_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the config dataclass ``cls`` (and its nested configs) that declares one: its
    name, help, metavar, choices and check come from the field's :func:`~retouch.config.cli_flag`, its default
    from the field."""
    for _, f in _config_fields(cls):
        meta = f.metadata
        kwargs: dict[str, Any] = {"help": meta["help"], "dest": _dest(meta["flag"])}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta["kind"] == "options":
            kwargs.update(action="append", default=[])
        else:
            kwargs["default"] = f.default
            if meta["choices"] is not None:
                kwargs["choices"] = list(meta["choices"])
            if (kind := _argparse_type(meta)) is not None:
                kwargs["type"] = kind
        parser.add_argument(meta["flag"], **kwargs)


def config_from_flags(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """An instance of the config dataclass ``cls`` from the parsed flags of :func:`add_config_flags`, with
    ``values`` for the fields that have no flag; nested configs are built the same way (their flagless fields
    keep their defaults). Options flags are parsed with :func:`retouch.config.parse_options`.

    Raises:
        ValueError: for a malformed ``KEY=VALUE`` option, and whatever the config's own checks raise.
    """
    from retouch.config import parse_options

    hints = typing.get_type_hints(cls)
    kwargs = dict(values)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "flag" in meta:
            raw = getattr(args, _dest(meta["flag"]))
            kwargs[f.name] = parse_options(raw, meta["flag"]) if meta["kind"] == "options" else raw
        elif dataclasses.is_dataclass(hints.get(f.name)) and f.name not in kwargs:
            sub = hints[f.name]
            if any(True for _ in _config_fields(sub)):
                kwargs[f.name] = config_from_flags(sub, args)
    return cls(**kwargs)
