"""PIE-Bench on-disk format: write ShapesWorld edit cases like PIE-Bench, read either back.

Layout (PIE-Bench's, plus the ground truth)::

    <root>/mapping_file.json
    <root>/annotation_images/<type folder>/<id>.png     source images ("image_path" is relative to
                                                          annotation_images/, as in PIE-Bench)
    <root>/gt_images/<type folder>/<id>.png             exact target images ("gt_image_path",
                                                          relative to gt_images/; ours only)

``mapping_file.json`` maps a 12-digit id to ``image_path``, ``original_prompt`` and
``editing_prompt`` (changed words in ``[ ]``), ``editing_instruction``, ``editing_type_id`` (a string
"0"–"9"), ``blended_word`` ("source_word target_word" or "") and ``mask`` (run-length code, below),
plus our ``gt_image_path``.

Mask run-length code (PIE-Bench's ``mask_decode``): a flat list ``[start0, len0, start1, len1, ...]``
over the row-major H×W mask; pixels ``start .. start+len-1`` are 1 (the run is cut at the end of the
array); then, "to avoid annotation errors in boundary", the first and last rows and columns are set
to 1. 1 = region to edit.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .captions import strip_brackets
from .cases import PIE_TYPE_FOLDERS, EditCase, check_type_id

logger = logging.getLogger(__name__)

__all__ = ["MAPPING_FILE", "PieRecord", "export_pie", "load_pie", "mask_decode", "mask_encode"]

MAPPING_FILE = "mapping_file.json"
IMAGE_DIR = "annotation_images"
GT_DIR = "gt_images"


# --------------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------------


def mask_encode(mask: np.ndarray) -> list[int]:
    """Run-length code of a 2-D mask (nonzero = 1): ``[start0, len0, start1, len1, ...]`` over the
    row-major flattening, runs in increasing order. Inverse of ``mask_decode(..., border=False)``."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    flat = np.concatenate([[0], (mask.ravel() != 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))  # run starts and ends alternate
    starts, ends = edges[0::2], edges[1::2]
    out = np.empty(2 * len(starts), dtype=np.int64)
    out[0::2], out[1::2] = starts, ends - starts
    return [int(v) for v in out]


def mask_decode(rle: Iterable[int], height: int = 512, width: int = 512, border: bool = True) -> np.ndarray:
    """Decode a PIE-Bench mask as PIE-Bench's ``mask_decode`` does; bool [H, W] (True = edit).

    Each run is clipped at the end of the array (a run starting past the end is empty); with
    ``border=True`` (PIE-Bench's behaviour) the first and last rows and columns are then set.
    """
    values = [int(v) for v in rle]
    if len(values) % 2:
        raise ValueError(f"mask code must hold (start, length) pairs, got {len(values)} numbers")
    if any(v < 0 for v in values):
        raise ValueError("mask code must not hold negative numbers")
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}×{width}")
    length = height * width
    flat = np.zeros(length, bool)
    for start, run in zip(values[0::2], values[1::2], strict=True):
        end = min(start + run, length)  # PIE: splice_len = min(len, length - start)
        if end > start:
            flat[start:end] = True
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = True
        mask[:, 0] = mask[:, -1] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


def export_pie(cases: Iterable[EditCase], out_dir: str | os.PathLike) -> Path:
    """Write edit cases in PIE-Bench's layout (see the module docstring); returns the mapping file.

    Every file is written to a temporary name and renamed, so readers never see half a file. An
    existing mapping file in ``out_dir`` is replaced (its images are left alone). Raises ValueError
    on duplicate case ids.
    """
    root = Path(out_dir)
    mapping: dict[str, dict] = {}
    for case in cases:
        if not isinstance(case, EditCase):
            raise TypeError(f"expected EditCase, got {type(case).__name__}")
        type_id = check_type_id(case.type_id)
        if case.case_id in mapping:
            raise ValueError(f"duplicate case id {case.case_id}")
        rel = f"{PIE_TYPE_FOLDERS[type_id]}/{case.case_id}.png"
        _atomic_write_bytes(root / IMAGE_DIR / rel, _png_bytes(case.source_image))
        _atomic_write_bytes(root / GT_DIR / rel, _png_bytes(case.target_image))
        mapping[case.case_id] = {
            "image_path": rel,
            "original_prompt": case.source_prompt_bracketed,
            "editing_prompt": case.target_prompt_bracketed,
            "editing_instruction": case.instruction,
            "editing_type_id": str(type_id),
            "blended_word": case.blended_word,
            "mask": mask_encode(case.mask),
            "gt_image_path": rel,
        }
    path = root / MAPPING_FILE
    _atomic_write_bytes(path, json.dumps(mapping, indent=1, sort_keys=True).encode("utf-8"))
    logger.info("wrote %d PIE-format cases to %s", len(mapping), root)
    return path


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PieRecord:
    """One case read from a PIE-Bench-format directory (PIE-Bench itself or ours).

    ``image`` and ``gt_image`` are uint8 [H, W, 3]; ``mask`` is bool [H, W] decoded at the image's
    size. Prompts have their brackets removed; the ``*_bracketed`` fields keep them.
    """

    case_id: str
    image_path: Path
    image: np.ndarray
    source_prompt: str
    target_prompt: str
    source_prompt_bracketed: str
    target_prompt_bracketed: str
    instruction: str
    type_id: int
    blended_words: tuple[str, ...]
    mask: np.ndarray
    gt_image_path: Path | None = None
    gt_image: np.ndarray | None = None


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB")).copy()
    except OSError as err:
        raise OSError(f"cannot read image {path}: {err}") from err


def load_pie(
    root: str | os.PathLike, *, type_ids: Iterable[int] | None = None, border: bool = True
) -> Iterator[PieRecord]:
    """Yield the cases of a PIE-Bench-format directory in id order.

    Reads PIE-Bench's own ``data`` directory (512×512 jpg, no ground truth) as well as
    :func:`export_pie`'s output. ``type_ids`` keeps only those editing types; ``border`` is passed to
    :func:`mask_decode` (PIE-Bench decodes with the border forced on).
    """
    root = Path(root)
    path = root / MAPPING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MAPPING_FILE} in {root}")
    with open(path, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold a JSON object keyed by case id")
    wanted = None if type_ids is None else {check_type_id(t) for t in type_ids}
    for case_id in sorted(mapping):
        item = mapping[case_id]
        try:
            type_id = check_type_id(int(item["editing_type_id"]))
        except (TypeError, ValueError) as err:
            raise ValueError(f"case {case_id}: bad editing_type_id {item.get('editing_type_id')!r}") from err
        if wanted is not None and type_id not in wanted:
            continue
        image_path = root / IMAGE_DIR / item["image_path"]
        image = _read_image(image_path)
        gt_path = root / GT_DIR / item["gt_image_path"] if item.get("gt_image_path") else None
        gt_image = _read_image(gt_path) if gt_path is not None else None
        blended = item.get("blended_word", "") or ""
        yield PieRecord(
            case_id=case_id,
            image_path=image_path,
            image=image,
            source_prompt=strip_brackets(item["original_prompt"]),
            target_prompt=strip_brackets(item["editing_prompt"]),
            source_prompt_bracketed=item["original_prompt"],
            target_prompt_bracketed=item["editing_prompt"],
            instruction=item.get("editing_instruction", ""),
            type_id=type_id,
            blended_words=tuple(blended.split(" ")) if blended else (),
            mask=mask_decode(item["mask"], image.shape[0], image.shape[1], border=border),
            gt_image_path=gt_path,
            gt_image=gt_image,
        )
