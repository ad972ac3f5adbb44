"""ShapesBench: ShapesWorld edit cases of PIE-Bench's ten editing types, with exact ground truth.

Splits. Case ``i`` of split ``seed`` (``n`` cases) has editing type ``types[i % len(types)]`` (all ten by default,
so every split is balanced over types) and is ``make_edit_case(type, seed · 10⁶ + i // len(types))``. Split 0 is
the **public development split** (:data:`DEV_SPLIT_SIZE` cases by default); any other seed in 1..99999 gives a
fresh split (disjoint case seeds). The same case is the same bytes everywhere: ShapesWorld renders
deterministically.

Masks go through PIE-Bench's format (RLE, decoded with the border rule), so the background metrics mean exactly
what they mean on PIE-Bench.

Edit success is judged by the ShapesWorld oracle (:func:`retouch.worlds.parse`), no learned weights: the edited
image is parsed back into a scene and compared with the ground-truth target scene. Scenes are reduced to sets of
facts (background colour, background pattern, style, which cells hold an object, and each object's shape, colour,
size and fill by cell). With S the source's facts, T the target's and P the parsed edit's:

* ``edit_success`` = the whole parsed scene equals the target (:func:`retouch.worlds.compare`'s ``scene``), i.e.
  the asked change happened and nothing else changed (P = T);
* ``edit_applied`` = the change happened: every fact of T − S is in P and no fact of S − T is;
* ``edit_preserved`` = nothing else changed: every fact of S ∩ T is in P and P holds no fact outside S ∪ T.

(``edit_success`` = ``edit_applied`` and ``edit_preserved``.) ``oracle_source_ok`` checks the parser on the
source image itself (1 on every ShapesWorld render).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retouch.bench.cases import BenchCase, CaseData
from retouch.worlds import EDIT_TYPES, compare, export_pie, make_edit_case, mask_decode, mask_encode, parse

log = logging.getLogger(__name__)

__all__ = [
    "DEV_SPLIT_SEED",
    "DEV_SPLIT_SIZE",
    "export_split",
    "oracle_metrics",
    "scene_facts",
    "shapes_cases",
    "split_specs",
]

DEV_SPLIT_SEED = 0
"""The public development split."""
DEV_SPLIT_SIZE = 100
"""Default number of cases of a split (10 per editing type)."""
SPLIT_STRIDE = 1_000_000
"""Case seeds of split ``s`` are ``s · SPLIT_STRIDE + j`` (so splits never share a case)."""
MAX_SPLIT_SEED = 99_999  # make_edit_case takes seeds < 10**11


def split_specs(seed: int, n: int, types: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """``(type_id, case_seed)`` of the ``n`` cases of split ``seed``, balanced over ``types`` (default all ten)."""
    if not 0 <= seed <= MAX_SPLIT_SEED:
        raise ValueError(f"ShapesBench split seeds are 0..{MAX_SPLIT_SEED}, got {seed}")
    if n < 0 or n >= SPLIT_STRIDE:
        raise ValueError(f"a split holds 0..{SPLIT_STRIDE - 1} cases, got {n}")
    kinds = sorted(EDIT_TYPES) if types is None else sorted(set(types))
    if not kinds or any(t not in EDIT_TYPES for t in kinds):
        raise ValueError(f"editing types must be in 0..9, got {types}")
    return [(kinds[i % len(kinds)], seed * SPLIT_STRIDE + i // len(kinds)) for i in range(n)]


def shapes_cases(
    seed: int = DEV_SPLIT_SEED,
    n: int = DEV_SPLIT_SIZE,
    *,
    resolution: int = 64,
    types: Sequence[int] | None = None,
    border: bool = True,
) -> list[BenchCase]:
    """The cases of ShapesBench split ``seed``; images are rendered when a case is loaded.

    Prompts, instruction and blended word are drawn with the case (cheap); ``resolution`` is the square canvas.
    """
    cases = []
    for index, (type_id, case_seed) in enumerate(split_specs(seed, n, types)):
        meta_case = make_edit_case(type_id, case_seed, resolution, resolution)

        def load(type_id: int = type_id, case_seed: int = case_seed) -> CaseData:
            case = make_edit_case(type_id, case_seed, resolution, resolution)
            mask = mask_decode(mask_encode(case.mask), case.height, case.width, border=border)
            return CaseData(
                source_image=case.source_image,
                mask=mask,
                gt_image=case.target_image,
                source_scene=case.source_scene,
                target_scene=case.target_scene,
                edit_mask=case.mask,
            )

        cases.append(
            BenchCase(
                case_id=meta_case.case_id,
                index=index,
                type_id=type_id,
                source_prompt=meta_case.source_prompt,
                target_prompt=meta_case.target_prompt,
                instruction=meta_case.instruction,
                blended_word=meta_case.blended_word,
                meta={"case_seed": case_seed, "split_seed": seed, "resolution": resolution},
                loader=load,
            )
        )
    return cases


def export_split(out: str | Path, seed: int = DEV_SPLIT_SEED, n: int = DEV_SPLIT_SIZE, *, resolution: int = 64) -> Path:
    """Write split ``seed`` in PIE-Bench's layout (plus ``gt_images/``); returns the mapping file's path."""
    cases = (make_edit_case(t, s, resolution, resolution) for t, s in split_specs(seed, n))
    return export_pie(cases, out)


def scene_facts(scene: Any) -> frozenset[tuple[str, ...]]:
    """A scene (:class:`~retouch.worlds.Scene` or :class:`~retouch.worlds.ParsedScene`) as a set of facts."""
    facts: set[tuple[str, ...]] = {
        ("background colour", scene.background.colour),
        ("background pattern", scene.background.pattern),
        ("style", scene.style),
    }
    for obj in scene.objects:
        facts.add(("object at", obj.position))
        for attr in ("shape", "colour", "size", "fill"):
            facts.add((attr, obj.position, getattr(obj, attr)))
    return frozenset(facts)


def oracle_metrics(edited: np.ndarray, source_scene: Any, target_scene: Any) -> dict[str, float]:
    """``edit_success``, ``edit_applied`` and ``edit_preserved`` (0/1) of an edited uint8 image (module docstring)."""
    parsed = parse(edited)
    s, t, p = scene_facts(source_scene), scene_facts(target_scene), scene_facts(parsed)
    applied = (t - s) <= p and not ((s - t) & p)
    preserved = (s & t) <= p and p <= (s | t)
    success = compare(parsed, target_scene)["scene"] == 1.0
    if success != (applied and preserved):  # the two definitions agree; a mismatch is a bug worth hearing about
        log.warning(
            "oracle: compare() says success=%s but the facts say applied=%s preserved=%s", success, applied, preserved
        )
    return {"edit_success": float(success), "edit_applied": float(applied), "edit_preserved": float(preserved)}


def oracle_source_ok(source: np.ndarray, source_scene: Any) -> float:
    """1 when the oracle reads the source image back as its scene."""
    return float(compare(parse(source), source_scene)["scene"] == 1.0)


def type_counts(cases: Iterable[BenchCase]) -> dict[int, int]:
    out: dict[int, int] = {}
    for c in cases:
        out[c.type_id] = out.get(c.type_id, 0) + 1
    return dict(sorted(out.items()))
