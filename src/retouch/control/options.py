"""Typed method options: each editor's and inversion's options checked against their declared types.

An editor declares its options as a frozen dataclass, a subclass of :class:`EditorOptions` whose fields are
the options (type and default) and whose :meth:`~EditorOptions.validate` holds the value rules (ranges,
choices, step fractions, lists normalised to tuples, lengths that must agree), each written once and naming
the option and the method; its factory takes the built object (``@takes_options(P2POptions)`` over
``make_p2p(backbone, config, o)``). A factory without such a class declares its options as typed keyword
parameters, and :func:`options_class` generates the dataclass from them.

:func:`option_types` reads either form into a small table ``{name: type}``; :func:`check_options` validates
values against it in one place (the inversions use it on their functions' parameters directly).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

from retouch.control.steps import check_steps

_INTERNAL = frozenset({"backbone", "config", "model", "z0", "grid"})


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def declared_options(fn: Any) -> type[EditorOptions] | None:
    """The options dataclass ``fn`` declares: ``fn`` itself when it is one, the class a
    :func:`takes_options` factory takes, else ``None`` (a factory with keyword options)."""
    base = _unwrap(fn)
    if isinstance(base, type) and issubclass(base, EditorOptions):
        return base
    cls = getattr(base, "options", None)
    return cls if isinstance(cls, type) and issubclass(cls, EditorOptions) else None


def option_types(fn: Callable[..., Any], *, skip: frozenset[str] = _INTERNAL) -> dict[str, Any]:
    """``{option name: declared type}`` of a factory's options (``Any`` where nothing is declared): the fields of
    its options dataclass, or its keyword parameters."""
    declared = declared_options(fn)
    if declared is not None:
        fixed = set(fn.keywords) if isinstance(fn, functools.partial) else set()
        return {k: v for k, v in field_types(declared).items() if k not in fixed}
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


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditorOptions:
    """Base of an editor's options: a frozen, keyword-only dataclass, one field per option.

    Building one checks every value against its field's declared type (:func:`check_options`), then runs
    :meth:`validate`, the subclass's value rules. Messages name the option and :attr:`method`.
    """

    method: ClassVar[str] = "editor"  # the method named in messages

    def __post_init__(self) -> None:
        check_options(field_types(type(self)), self.as_kwargs(), f"method {self.method!r}")
        self.validate()

    def validate(self) -> None:
        """The value rules (override); normalise a value with :meth:`normalise`, refuse one with :meth:`error`."""

    def as_kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (normalised values)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def normalise(self, name: str, value: Any) -> None:
        """Replace option ``name`` by its normal form (e.g. a word string by a tuple of words)."""
        object.__setattr__(self, name, value)

    def error(self, name: str, problem: str) -> ValueError:
        """``ValueError("option NAME of method 'M' PROBLEM")``."""
        return ValueError(f"option {name} of method {self.method!r} {problem}")

    # --- shared rules ------------------------------------------------------------------------------------------
    def check_steps(self, *names: str) -> None:
        """Each named option, unless ``None``, is a step count or a fraction (:mod:`retouch.control.steps`)."""
        for name in names:
            value = getattr(self, name)
            if value is not None:
                check_steps(value, f"option {name} of method {self.method!r}")

    def check_choice(self, name: str, choices: Iterable[Any]) -> None:
        choices = tuple(choices)
        if getattr(self, name) not in choices:
            raise self.error(name, f"must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")

    def check_min(self, name: str, low: float, *, strict: bool = False) -> None:
        """Option ``name`` (unless ``None``) is ``>= low`` (``> low`` when ``strict``)."""
        value = getattr(self, name)
        if value is not None and (value <= low if strict else value < low):
            raise self.error(name, f"must be {'>' if strict else '>='} {low}, got {value!r}")


def describe_options(cls: type) -> list[dict[str, Any]]:
    """``[{"name", "type", "default"}]`` of an options dataclass (``type`` in words, as the messages say it;
    no ``default`` key for a required option), for ``retouch methods --json`` and forms."""
    out = []
    for f in dataclasses.fields(cls):
        entry: dict[str, Any] = {"name": f.name, "type": _describe(field_types(cls)[f.name])}
        if f.default is not dataclasses.MISSING:
            entry["default"] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            entry["default"] = f.default_factory()
        out.append(entry)
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """``{field name: declared type}`` of an options dataclass, in field order."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def takes_options(cls: type[EditorOptions]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare that a factory ``fn(backbone, config, options: cls)`` takes its options as ``cls``.

    The factory is then also callable with keywords (``make_p2p(bb, cfg, cross_steps=0.5)`` builds the
    options first); its ``options`` attribute is ``cls`` and its signature lists the options as keywords (for
    code that reads defaults from the signature)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def factory(backbone: Any, config: Any, options: EditorOptions | None = None, /, **kwargs: Any) -> Any:
            if options is None:
                options = cls(**kwargs)
            elif kwargs or not isinstance(options, cls):
                raise TypeError(f"{fn.__name__} takes a {cls.__name__} or keyword options, not both")
            return fn(backbone, config, options)

        hints = field_types(cls)
        params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("backbone", "config")]
        for f in dataclasses.fields(cls):
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            if default is dataclasses.MISSING:
                default = inspect.Parameter.empty
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=hints[f.name]))  # fmt: skip
        factory.__signature__ = inspect.signature(fn).replace(parameters=params)  # type: ignore[attr-defined]
        factory.options = cls  # type: ignore[attr-defined]
        return factory

    return wrap


_GENERATED: dict[tuple[Any, str | None], type[EditorOptions]] = {}


def options_class(fn: Callable[..., Any], name: str | None = None, *, skip: frozenset[str] = _INTERNAL) -> type:
    """The options dataclass of a factory: the one it declares (:func:`takes_options`), or one generated from
    its keyword parameters: one keyword-only field per option, with its declared type and default, checked by
    :func:`check_options` when built, so ``options_class(make_x)(strength="x")`` raises ``ValueError`` naming
    ``strength``.

    ``instance.as_kwargs()`` gives the options back as keyword arguments for ``fn``; ``dataclasses.fields`` lists
    them (names, types, defaults) for help texts and forms. Options without a default are required fields.
    """
    declared = declared_options(fn)
    if declared is not None:
        return declared
    key = (fn, name)
    if skip is _INTERNAL and key in _GENERATED:
        return _GENERATED[key]
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

    cls_name = "".join(part.capitalize() for part in owner.removeprefix("make_").split("_")) + "Options"
    cls = dataclasses.make_dataclass(
        cls_name,
        specs,
        bases=(EditorOptions,),
        frozen=True,
        kw_only=True,
        namespace={"method": owner, "__doc__": f"Options of {owner}."},
    )
    if skip is _INTERNAL:
        _GENERATED[key] = cls
    return cls
