"""Typed method options: each editor's and inversion's options checked against their declared types.

The declared types are the annotations of the factory (``make_p2p(backbone, config, cross_steps: float = 0.8,
...)``) or of the inversion function; :func:`option_types` reads them into a small table ``{name: type}`` and
:func:`check_options` validates values against it in one place, naming the option in every message.
:func:`options_class` turns the same table into a frozen dataclass per editor (validated by that one check).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

_INTERNAL = frozenset({"backbone", "config", "model", "z0", "grid"})


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def option_types(fn: Callable[..., Any], *, skip: frozenset[str] = _INTERNAL) -> dict[str, Any]:
    """``{option name: declared type}`` of a factory's keyword options (``Any`` where nothing is declared)."""
    base = _unwrap(fn)
    try:
        hints = typing.get_type_hints(base)
    except (NameError, TypeError):  # an annotation that does not resolve: check names only
        hints = {}
    fixed = set(fn.keywords) if isinstance(fn, functools.partial) else set()
    out: dict[str, Any] = {}
    for name, p in inspect.signature(base).parameters.items():
        if name in skip or name in fixed or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = hints.get(name, Any)
    return out


def _describe(tp: Any) -> str:
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true/false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set, frozenset) or origin is not None and _is_abc(origin, "Sequence"):
        args = typing.get_args(tp)
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or origin is not None and _is_abc(origin, "Mapping"):
        args = typing.get_args(tp)
        return f"a mapping of {_describe(args[0])} to {_describe(args[1])}" if len(args) == 2 else "a mapping"
    if origin is not None and _is_abc(origin, "Callable"):
        return "a function (Python API only)"
    return getattr(tp, "__name__", str(tp))


def _is_abc(origin: Any, name: str) -> bool:
    import collections.abc as cabc

    abc = getattr(cabc, name)
    try:
        return issubclass(origin, abc)
    except TypeError:
        return False


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the declared type ``tp`` (ints pass for floats; bools only for bools)."""
    if tp is Any or tp is object:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is not None and (origin in (list, tuple, set, frozenset) or _is_abc(origin, "Sequence")):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if not args or args[-1] is Ellipsis and len(args) == 2 and args[0] is Any:
            return True
        if origin is tuple and len(args) != 2 or origin is tuple and args[-1] is not Ellipsis:
            return len(args) == len(value) and all(matches(v, a) for v, a in zip(value, args, strict=True))
        return all(matches(v, args[0]) for v in value)
    if origin is not None and (origin is dict or _is_abc(origin, "Mapping")):
        if not isinstance(value, Mapping):
            return False
        args = typing.get_args(tp)
        if len(args) != 2:
            return True
        return all(matches(k, args[0]) and matches(v, args[1]) for k, v in value.items())
    if origin is not None and _is_abc(origin, "Callable"):
        return callable(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # a type this checker does not know: leave it to the factory


def check_options(table: Mapping[str, Any], options: Mapping[str, Any], owner: str, *, extra: bool = False) -> None:
    """Validate ``options`` against ``table`` (:func:`option_types`): unknown names (unless ``extra``) and
    values of the wrong type raise ``ValueError`` naming the option, the method and what it takes."""
    unknown = sorted(set(options) - set(table))
    if unknown and not extra:
        raise ValueError(f"unknown option(s) {unknown} for {owner}; it takes {sorted(table)}")
    for name, value in options.items():
        tp = table.get(name, Any)
        if not matches(value, tp):
            raise ValueError(f"option {name} of {owner} must be {_describe(tp)}, got {type(value).__name__} {value!r}")


def options_class(fn: Callable[..., Any], name: str | None = None, *, skip: frozenset[str] = _INTERNAL) -> type:
    """A frozen dataclass of ``fn``'s options: one keyword-only field per option, with its declared type and
    default; building one validates the values with :func:`check_options` (the one place options are checked),
    so ``options_class(make_p2p)(cross_steps="x")`` raises ``ValueError`` naming ``cross_steps``.

    ``instance.as_kwargs()`` gives the options back as keyword arguments for ``fn``; ``dataclasses.fields`` lists
    them (names, types, defaults) for help texts and forms. Options without a default are required fields.
    """
    base = _unwrap(fn)
    table = option_types(fn, skip=skip)
    params = inspect.signature(base).parameters
    owner = name or getattr(base, "__name__", "options")
    specs: list[tuple[str, Any, Any]] = []
    for option, tp in table.items():
        default = params[option].default
        if default is inspect.Parameter.empty:
            specs.append((option, tp, dataclasses.field()))
        elif isinstance(default, (list, dict, set)):
            specs.append((option, tp, dataclasses.field(default_factory=functools.partial(copy.deepcopy, default))))
        else:
            specs.append((option, tp, dataclasses.field(default=default)))

    def __post_init__(self: Any) -> None:
        check_options(table, self.as_kwargs(), f"method {owner!r}")

    def as_kwargs(self: Any) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    cls_name = "".join(part.capitalize() for part in owner.removeprefix("make_").split("_")) + "Options"
    return dataclasses.make_dataclass(
        cls_name,
        specs,
        frozen=True,
        kw_only=True,
        namespace={"__post_init__": __post_init__, "as_kwargs": as_kwargs, "__doc__": f"Options of {owner}."},
    )
