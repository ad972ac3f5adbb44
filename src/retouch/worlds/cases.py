"""Edit cases with ground truth, one generator per PIE-Bench editing type.

``make_edit_case(type_id, seed)`` draws a source scene, applies one edit of the asked type and renders
both scenes, so every case comes with the exact target image an ideal editor would produce. The
prompts are captions of the two scenes in the same (seeded) wording, so they differ only in the
edited words; :func:`~retouch.worlds.captions.bracket_changes` marks those words PIE-style.

Editing types (PIE-Bench ids and folder names):

== ==================== ===========================================================================
0  random               one edit of a random type 1–9, or two attribute edits of one object
1  change object        the shape of one object
2  add object           a new object in a free cell (source has 1–2 objects)
3  delete object        one object removed (source has 2–3 objects)
4  change content       the size of one object
5  change pose          the cell of one object (moved to a free cell)
6  change colour        the colour of one object
7  change material      the fill of one object
8  change background    the background colour, pattern or both
9  change style         flat ↔ pixel art
== ==================== ===========================================================================

The edit mask is the union of the silhouettes (every pixel touched) of the objects that differ
between source and target, before and after; the whole image when the background or the style
changes. The target image equals the source image outside the mask, exactly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from .captions import Wording, bracket_changes, caption, sample_wording
from .shapes import (
    COLOURS,
    FILLS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    STYLES,
    Background,
    Object,
    Scene,
    _draw_distinct,
    check_canvas,
    render,
    render_masks,
    sample_background,
    sample_object,
    sample_scene,
)

logger = logging.getLogger(__name__)

__all__ = ["EDIT_TYPES", "PIE_TYPE_FOLDERS", "EditCase", "check_type_id", "make_edit_case"]

EDIT_TYPES: dict[int, str] = {
    0: "random",
    1: "change object",
    2: "add object",
    3: "delete object",
    4: "change content",
    5: "change pose",
    6: "change colour",
    7: "change material",
    8: "change background",
    9: "change style",
}
"""PIE-Bench editing type ids and what they mean in ShapesWorld."""

PIE_TYPE_FOLDERS: dict[int, str] = {
    0: "0_random_140",
    1: "1_change_object_80",
    2: "2_add_object_80",
    3: "3_delete_object_80",
    4: "4_change_attribute_content_40",
    5: "5_change_attribute_pose_40",
    6: "6_change_attribute_color_40",
    7: "7_change_attribute_material_40",
    8: "8_change_background_80",
    9: "9_change_style_80",
}
"""PIE-Bench's folder name for each editing type (the number is PIE's case count, kept verbatim)."""

_MAX_SEED = 10**11  # the case id is the type digit and the seed on 11 digits


def check_type_id(type_id: int) -> int:
    """Return ``type_id`` as an int, or raise ValueError naming it when it is not 0–9."""
    if isinstance(type_id, bool) or not isinstance(type_id, (int, np.integer)) or int(type_id) not in EDIT_TYPES:
        raise ValueError(f"unknown PIE editing type id {type_id!r}; expected one of 0..9")
    return int(type_id)


@dataclass(frozen=True, eq=False)
class EditCase:
    """One editing task with its exact answer.

    Images are uint8 [H, W, 3]; ``mask`` is bool [H, W] (True = may change). Prompts are plain;
    the ``*_bracketed`` forms mark the changed words with ``[ ]`` as PIE-Bench's mapping file does.
    ``blended_word`` is PIE's "source_word target_word" string (or ""). ``wording`` is the caption
    wording both prompts share.
    """

    case_id: str
    type_id: int
    seed: int
    source_scene: Scene
    target_scene: Scene
    source_image: np.ndarray
    target_image: np.ndarray
    source_prompt: str
    target_prompt: str
    source_prompt_bracketed: str
    target_prompt_bracketed: str
    instruction: str
    blended_word: str
    mask: np.ndarray
    wording: Wording

    @property
    def type_name(self) -> str:
        return EDIT_TYPES[self.type_id]

    @property
    def blended_words(self) -> tuple[str, ...]:
        """``blended_word`` split as PIE-Bench's scripts do: (source word, target word) or ()."""
        return tuple(self.blended_word.split(" ")) if self.blended_word else ()

    @property
    def height(self) -> int:
        return int(self.source_image.shape[0])

    @property
    def width(self) -> int:
        return int(self.source_image.shape[1])


# --------------------------------------------------------------------------------------------------
# Edits: scene -> (target scene, instruction, blended word)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Edit:
    scene: Scene
    instruction: str
    blended_word: str


def _other(rng: np.random.Generator, options, current: str) -> str:
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def _reference(scene: Scene, index: int) -> str:
    """'the red star', with the cell added when another object has the same colour and shape."""
    obj = scene.objects[index]
    same = [o for o in scene.objects if (o.colour, o.shape) == (obj.colour, obj.shape)]
    ref = f"the {obj.colour} {obj.shape}"
    return ref if len(same) == 1 else f"{ref} at the {obj.position}"


def _with_object(scene: Scene, index: int, obj: Object) -> Scene:
    objects = list(scene.objects)
    objects[index] = obj
    return replace(scene, objects=tuple(objects))


def _pick_index(scene: Scene, rng: np.random.Generator) -> int:
    return int(rng.integers(len(scene.objects)))


def _change_shape(scene: Scene, rng: np.random.Generator, index: int | None = None) -> _Edit:
    i = _pick_index(scene, rng) if index is None else index
    obj = scene.objects[i]
    new = replace(obj, shape=_other(rng, SHAPES, obj.shape))
    return _Edit(
        _with_object(scene, i, new), f"turn {_reference(scene, i)} into a {new.shape}", f"{obj.shape} {new.shape}"
    )


def _add_object(scene: Scene, rng: np.random.Generator) -> _Edit:
    free = scene.free_positions()
    new = sample_object(rng, free[int(rng.integers(len(free)))])
    target = replace(scene, objects=(*scene.objects, new))
    return _Edit(target, f"add a {new.size} {new.colour} {new.fill} {new.shape} at the {new.position}", "")


def _delete_object(scene: Scene, rng: np.random.Generator) -> _Edit:
    i = _pick_index(scene, rng)
    target = replace(scene, objects=scene.objects[:i] + scene.objects[i + 1 :])
    return _Edit(target, f"remove {_reference(scene, i)}", "")


def _change_size(scene: Scene, rng: np.random.Generator, index: int | None = None) -> _Edit:
    i = _pick_index(scene, rng) if index is None else index
    obj = scene.objects[i]
    new = replace(obj, size=_other(rng, SIZES, obj.size))
    return _Edit(_with_object(scene, i, new), f"make {_reference(scene, i)} {new.size}", f"{obj.shape} {obj.shape}")


def _change_position(scene: Scene, rng: np.random.Generator, index: int | None = None) -> _Edit:
    i = _pick_index(scene, rng) if index is None else index
    obj = scene.objects[i]
    free = scene.free_positions()
    new = replace(obj, position=free[int(rng.integers(len(free)))])
    return _Edit(
        _with_object(scene, i, new), f"move {_reference(scene, i)} to the {new.position}", f"{obj.shape} {obj.shape}"
    )


def _change_colour(scene: Scene, rng: np.random.Generator, index: int | None = None) -> _Edit:
    i = _pick_index(scene, rng) if index is None else index
    obj = scene.objects[i]
    new = replace(obj, colour=_other(rng, COLOURS, obj.colour))
    return _Edit(_with_object(scene, i, new), f"make {_reference(scene, i)} {new.colour}", f"{obj.shape} {obj.shape}")


def _change_fill(scene: Scene, rng: np.random.Generator, index: int | None = None) -> _Edit:
    i = _pick_index(scene, rng) if index is None else index
    obj = scene.objects[i]
    new = replace(obj, fill=_other(rng, FILLS, obj.fill))
    return _Edit(_with_object(scene, i, new), f"make {_reference(scene, i)} {new.fill}", f"{obj.shape} {obj.shape}")


def _change_background(scene: Scene, rng: np.random.Generator) -> _Edit:
    old = scene.background
    mode = ("colour", "pattern", "both")[int(rng.integers(3))]
    new = old
    while (
        new == old
        or (mode != "pattern" and new.colour == old.colour)
        or (mode != "colour" and new.pattern == old.pattern)
    ):
        drawn = sample_background(rng)
        new = Background(
            colour=drawn.colour if mode != "pattern" else old.colour,
            pattern=drawn.pattern if mode != "colour" else old.pattern,
        )
    target = replace(scene, background=new)
    return _Edit(target, f"change the background to a {new.pattern} {new.colour} background", "")


def _change_style(scene: Scene, rng: np.random.Generator) -> _Edit:
    new = _other(rng, STYLES, scene.style)
    return _Edit(replace(scene, style=new), f"make it {new} style", "")


_OBJECT_EDITS: dict[int, Callable[..., _Edit]] = {
    1: _change_shape,
    4: _change_size,
    5: _change_position,
    6: _change_colour,
    7: _change_fill,
}
_EDITS: dict[int, Callable[[Scene, np.random.Generator], _Edit]] = {
    **_OBJECT_EDITS,
    2: _add_object,
    3: _delete_object,
    8: _change_background,
    9: _change_style,
}


def _random_edit(scene: Scene, rng: np.random.Generator) -> _Edit:
    """Type 0: one edit of a random type, or two attribute edits of the same object."""
    if rng.random() < 0.5:
        feasible = [t for t in _EDITS if not (t == 2 and len(scene.objects) >= MAX_OBJECTS)]
        feasible = [t for t in feasible if not (t == 3 and len(scene.objects) < 2)]
        return _EDITS[feasible[int(rng.integers(len(feasible)))]](scene, rng)
    kinds = sorted(_OBJECT_EDITS)
    first, second = (kinds[j] for j in _draw_distinct(rng, len(kinds), 2))
    i = _pick_index(scene, rng)
    a = _OBJECT_EDITS[first](scene, rng, i)
    b = _OBJECT_EDITS[second](a.scene, rng, i)
    old_shape, new_shape = scene.objects[i].shape, b.scene.objects[i].shape
    # the second instruction must name the object as the first edit left it
    return _Edit(b.scene, f"{a.instruction} and {b.instruction}", f"{old_shape} {new_shape}")


def _source_scene(type_id: int, rng: np.random.Generator) -> Scene:
    if type_id == 2:
        return sample_scene(rng, n_objects=int(rng.integers(1, MAX_OBJECTS)))
    if type_id == 3:
        return sample_scene(rng, n_objects=int(rng.integers(2, MAX_OBJECTS + 1)))
    return sample_scene(rng)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def edit_mask(source: Scene, target: Scene, height: int, width: int) -> np.ndarray:
    """Pixels an exact editor may change: the silhouettes of every object that differs between the
    two scenes (before and after), or the whole image when background or style differ."""
    if source.background != target.background or source.style != target.style:
        return np.ones((height, width), bool)
    mask = np.zeros((height, width), bool)
    changed_src = [i for i, o in enumerate(source.objects) if o not in target.objects]
    changed_tgt = [i for i, o in enumerate(target.objects) if o not in source.objects]
    for scene, indices in ((source, changed_src), (target, changed_tgt)):
        masks = render_masks(scene, height, width)
        for i in indices:
            mask |= masks[i]
    return mask


def make_edit_case(type_id: int, seed: int, height: int = 64, width: int = 64) -> EditCase:
    """Draw one edit case of PIE-Bench type ``type_id`` (0–9) from ``seed``; deterministic.

    The case id is PIE-like: 12 digits, the type digit then the seed (so seeds must be < 10¹¹).
    """
    type_id = check_type_id(type_id)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < _MAX_SEED:
        raise ValueError(f"seed must be an int in [0, 10**11), got {seed!r}")
    check_canvas(height, width)
    rng = np.random.default_rng([type_id, int(seed)])
    source = _source_scene(type_id, rng)
    edit = _random_edit(source, rng) if type_id == 0 else _EDITS[type_id](source, rng)
    target = edit.scene
    wording = sample_wording(rng)
    source_prompt = caption(source, wording=wording)
    target_prompt = caption(target, wording=wording)
    source_bracketed, target_bracketed = bracket_changes(source_prompt, target_prompt)
    case = EditCase(
        case_id=f"{type_id}{int(seed):011d}",
        type_id=type_id,
        seed=int(seed),
        source_scene=source,
        target_scene=target,
        source_image=render(source, height, width),
        target_image=render(target, height, width),
        source_prompt=source_prompt,
        target_prompt=target_prompt,
        source_prompt_bracketed=source_bracketed,
        target_prompt_bracketed=target_bracketed,
        instruction=edit.instruction,
        blended_word=edit.blended_word,
        mask=edit_mask(source, target, height, width),
        wording=wording,
    )
    logger.debug("edit case %s (%s): %s", case.case_id, case.type_name, case.instruction)
    return case
