"""Captions for ShapesWorld scenes from a small grammar.

A caption names every attribute needed to redraw the scene: for each object its size, colour, fill,
shape and cell; the background pattern and colour; the style. For example (canonical wording)::

    a small red striped star at the top left and a large blue solid circle at the center
    on a checkered gray background, pixel art style

The wording (adjective order, preposition, how objects are joined, where the background goes, how the
style is attached) is a :class:`Wording`; :func:`sample_wording` draws one from a seed. Objects are
listed in ``scene.objects`` order, so two scenes captioned with the same wording differ only in the
words of what changed — which is how edit cases get PIE-Bench-style prompt pairs
(:func:`bracket_changes`). Captions stay under 60 words (CLIP reads 77 tokens).
"""

from __future__ import annotations

import difflib
import logging
import re
from dataclasses import dataclass

import numpy as np

from .shapes import (
    BACKGROUND_COLOURS,
    COLOURS,
    FILLS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Object,
    Scene,
    as_rng,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CANONICAL_WORDING",
    "Wording",
    "bracket_changes",
    "caption",
    "describe_object",
    "sample_wording",
    "strip_brackets",
    "tokenize",
    "vocabulary",
]

_ADJECTIVE_ORDERS = ("size colour fill", "size fill colour")
_PREPOSITIONS = ("at", "in")
_JOINERS = ("comma", "and")
_LAYOUTS = ("objects first", "background first")
_BACKGROUND_PREPOSITIONS = ("on", "against")
_STYLE_FORMS = (", {} style", ", in {} style", " in {} style")

_TOKEN = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")


@dataclass(frozen=True)
class Wording:
    """Free choices of the caption grammar (everything but the scene's content)."""

    adjective_order: str = "size colour fill"
    preposition: str = "at"
    joiner: str = "comma"
    layout: str = "objects first"
    background_preposition: str = "on"
    style_form: str = ", {} style"

    def __post_init__(self) -> None:
        for name, value, options in (
            ("adjective_order", self.adjective_order, _ADJECTIVE_ORDERS),
            ("preposition", self.preposition, _PREPOSITIONS),
            ("joiner", self.joiner, _JOINERS),
            ("layout", self.layout, _LAYOUTS),
            ("background_preposition", self.background_preposition, _BACKGROUND_PREPOSITIONS),
            ("style_form", self.style_form, _STYLE_FORMS),
        ):
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(options)}")


CANONICAL_WORDING = Wording()
"""The wording of ``caption(scene)``."""


def sample_wording(rng: np.random.Generator | int | None = None) -> Wording:
    """Draw every free choice of the grammar uniformly."""
    rng = as_rng(rng)

    def pick(options: tuple[str, ...]) -> str:
        return options[int(rng.integers(len(options)))]

    return Wording(
        adjective_order=pick(_ADJECTIVE_ORDERS),
        preposition=pick(_PREPOSITIONS),
        joiner=pick(_JOINERS),
        layout=pick(_LAYOUTS),
        background_preposition=pick(_BACKGROUND_PREPOSITIONS),
        style_form=pick(_STYLE_FORMS),
    )


def describe_object(obj: Object, wording: Wording = CANONICAL_WORDING, *, with_position: bool = True) -> str:
    """Noun phrase for one object, e.g. ``"a small red striped star at the top left"``."""
    adjectives = {"size": obj.size, "colour": obj.colour, "fill": obj.fill}
    words = " ".join(adjectives[a] for a in wording.adjective_order.split())
    phrase = f"a {words} {obj.shape}"
    if with_position:
        phrase += f" {wording.preposition} the {obj.position}"
    return phrase


def _join(phrases: list[str], joiner: str) -> str:
    if len(phrases) == 1:
        return phrases[0]
    if joiner == "and":
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: np.random.Generator | int | None = None, *, wording: Wording | None = None) -> str:
    """Caption of a scene.

    Args:
        scene: the scene.
        rng: seed or Generator to draw the wording from (:func:`sample_wording`); deterministic.
        wording: an explicit wording (wins over ``rng``). With neither, the canonical wording.
    """
    if not isinstance(scene, Scene):
        raise TypeError(f"expected a Scene, got {type(scene).__name__}")
    if wording is None:
        wording = CANONICAL_WORDING if rng is None else sample_wording(rng)
    objects = _join([describe_object(o, wording) for o in scene.objects], wording.joiner)
    bg = f"a {scene.background.pattern} {scene.background.colour} background"
    style = wording.style_form.format(scene.style)
    if wording.layout == "objects first":
        return f"{objects} {wording.background_preposition} {bg}{style}"
    return f"{bg} with {objects}{style}"


def tokenize(text: str) -> list[str]:
    """Lower-case words and punctuation marks of a caption, the units of :func:`vocabulary`."""
    return [t.lower() for t in _TOKEN.findall(text)]


def vocabulary() -> list[str]:
    """Every token (:func:`tokenize`) the caption grammar can produce, sorted."""
    words: set[str] = {"a", "the", "and", "with", "background", "style", ","}
    words |= set(_PREPOSITIONS) | set(_BACKGROUND_PREPOSITIONS)
    for form in _STYLE_FORMS:
        words |= set(tokenize(form.format("")))
    for group in (SHAPES, tuple(COLOURS), SIZES, FILLS, POSITIONS, tuple(BACKGROUND_COLOURS), PATTERNS, STYLES):
        for item in group:
            words |= set(tokenize(item))
    return sorted(words)


def _spans(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(text)]


def _insert_brackets(text: str, spans: list[tuple[str, int, int]], ranges: list[tuple[int, int]]) -> str:
    out, last = [], 0
    for i1, i2 in ranges:
        start, end = spans[i1][1], spans[i2 - 1][2]
        out += [text[last:start], "[", text[start:end], "]"]
        last = end
    out.append(text[last:])
    return "".join(out)


def bracket_changes(source: str, target: str) -> tuple[str, str]:
    """Mark with ``[ ]`` what differs between two prompts, PIE-Bench style.

    Tokens are aligned with ``difflib``; replaced or deleted spans are bracketed in the source,
    replaced or inserted spans in the target. Removing the brackets gives the prompts back exactly.
    """
    if "[" in source + target or "]" in source + target:
        raise ValueError("prompts must not contain brackets")
    src, tgt = _spans(source), _spans(target)
    matcher = difflib.SequenceMatcher(None, [t[0] for t in src], [t[0] for t in tgt], autojunk=False)
    src_ranges, tgt_ranges = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("replace", "delete"):
            src_ranges.append((i1, i2))
        if tag in ("replace", "insert"):
            tgt_ranges.append((j1, j2))
    return _insert_brackets(source, src, src_ranges), _insert_brackets(target, tgt, tgt_ranges)


def strip_brackets(text: str) -> str:
    """Remove PIE-Bench's ``[ ]`` edit markers, as PIE-Bench's scripts do (nothing else changes)."""
    return text.replace("[", "").replace("]", "")
