"""Registry of attention editors (policies). Issue-level methods add themselves here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from retouch.control.context import AttentionEditor, IdentityEditor

ALL_FAMILIES = ("sd", "pixart", "sd3", "flux")


@dataclass(frozen=True)
class EditorSpec:
    name: str
    factory: Callable[..., AttentionEditor | None]
    families: tuple[str, ...]
    description: str


def _identity(backbone: Any, config: Any, **options: Any) -> AttentionEditor:
    return IdentityEditor(**options)


EDITORS: dict[str, EditorSpec] = {
    "identity": EditorSpec(
        "identity",
        _identity,
        ALL_FAMILIES,
        "no attention control: regenerates the inverted latent (reconstruction)",
    ),
}


def get_editor(name: str, family: str | None = None) -> EditorSpec:
    try:
        spec = EDITORS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(EDITORS)}") from None
    if family is not None and family not in spec.families:
        raise ValueError(
            f"method {name!r} does not support the {family} family (it supports {', '.join(spec.families)})"
        )
    return spec
