"""ShapesWorld: the procedural scene world used by the embedded models, its captions and its oracle.

Pure numpy + PIL; nothing is loaded at import.

* :mod:`~retouch.worlds.shapes` — scenes (:class:`Scene`, :class:`Object`, :class:`Background`),
  seeded sampling and deterministic rendering.
* :mod:`~retouch.worlds.captions` — captions from a small grammar, its vocabulary, PIE-style brackets.
* :mod:`~retouch.worlds.oracle` — :func:`parse` an image back into a scene, :func:`compare` to the truth.
* :mod:`~retouch.worlds.cases` — edit cases with exact ground truth for PIE-Bench editing types 0–9.
* :mod:`~retouch.worlds.pie_format` — PIE-Bench's on-disk format: masks, export, loading.
"""

from .captions import (
    CANONICAL_WORDING,
    Wording,
    bracket_changes,
    caption,
    describe_object,
    sample_wording,
    strip_brackets,
    tokenize,
    vocabulary,
)
from .cases import EDIT_TYPES, PIE_TYPE_FOLDERS, EditCase, edit_mask, make_edit_case
from .oracle import (
    ATTRIBUTES,
    ParsedObject,
    ParsedScene,
    attribute_accuracy,
    average_scores,
    binding_errors,
    compare,
    parse,
)
from .pie_format import PieRecord, export_pie, load_pie, mask_decode, mask_encode
from .shapes import (
    BACKGROUND_COLOURS,
    COLOURS,
    FILLS,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    STYLES,
    Background,
    Object,
    Scene,
    render,
    render_masks,
    sample_scene,
    thicken_objects,
)

__all__ = [
    "ATTRIBUTES",
    "BACKGROUND_COLOURS",
    "CANONICAL_WORDING",
    "COLOURS",
    "EDIT_TYPES",
    "FILLS",
    "PATTERNS",
    "PIE_TYPE_FOLDERS",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "Background",
    "EditCase",
    "Object",
    "ParsedObject",
    "ParsedScene",
    "PieRecord",
    "Scene",
    "Wording",
    "attribute_accuracy",
    "binding_errors",
    "average_scores",
    "bracket_changes",
    "caption",
    "compare",
    "describe_object",
    "edit_mask",
    "export_pie",
    "load_pie",
    "make_edit_case",
    "mask_decode",
    "mask_encode",
    "parse",
    "render",
    "render_masks",
    "thicken_objects",
    "sample_scene",
    "sample_wording",
    "strip_brackets",
    "tokenize",
    "vocabulary",
]
