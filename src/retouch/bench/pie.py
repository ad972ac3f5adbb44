"""PIE-Bench cases from its on-disk layout.

Layout (PIE-Bench's ``data`` folder)::

    DATA/mapping_file.json            {"000000000000": {"image_path": "0_random_140/000000000000.jpg",
                                                         "original_prompt", "editing_prompt" (changed words in [ ]),
                                                         "editing_instruction", "editing_type_id" ("0".."9"),
                                                         "blended_word" ("src tgt" or ""), "mask" (RLE)}, ...}
    DATA/annotation_images/<image_path>

The mapping is read up front (cheap); each case's image is read, and its mask decoded with the border rule, only
when the runner reaches it. ``retouch.worlds.load_pie`` reads the same layout eagerly; this index uses its
``mask_decode`` and ``strip_brackets`` so both agree by construction. ShapesBench splits exported with
``retouch.worlds.export_pie`` carry ``gt_image_path`` (under ``DATA/gt_images/``), which is used when present.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from retouch.bench.cases import BenchCase, CaseData, balanced
from retouch.worlds import mask_decode, strip_brackets

log = logging.getLogger(__name__)

__all__ = ["MAPPING_FILE", "load_output_image", "pie_cases", "read_mapping"]

MAPPING_FILE = "mapping_file.json"
IMAGE_DIR = "annotation_images"
GT_DIR = "gt_images"


def read_mapping(data: str | Path) -> dict[str, dict]:
    """``mapping_file.json`` of a PIE-Bench folder; raises FileNotFoundError / ValueError with the path."""
    path = Path(data) / MAPPING_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {MAPPING_FILE} in {data} (pass PIE-Bench's data folder with --data)")
    with open(path, encoding="utf-8") as f:
        mapping = json.load(f)
    if not isinstance(mapping, dict):
        raise ValueError(f"{path} must hold a JSON object keyed by case id")
    return mapping


def _read_rgb(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


def _type_id(case_id: str, item: dict) -> int:
    try:
        t = int(str(item["editing_type_id"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"case {case_id}: bad editing_type_id {item.get('editing_type_id')!r}") from None
    if not 0 <= t <= 9:
        raise ValueError(f"case {case_id}: editing_type_id {t} is not in 0..9")
    return t


def pie_cases(
    data: str | Path,
    *,
    types: set[int] | frozenset[int] | None = None,
    limit: int | None = None,
    border: bool = True,
) -> list[BenchCase]:
    """The cases of a PIE-Bench folder in id order (``types`` keeps those editing types; ``limit`` takes that many,
    round-robin over types). Prompts have their brackets stripped; ``border`` is PIE's boundary rule."""
    root = Path(data)
    mapping = read_mapping(root)
    cases: list[BenchCase] = []
    for case_id in sorted(mapping):
        item = mapping[case_id]
        type_id = _type_id(case_id, item)
        if types is not None and type_id not in types:
            continue
        for key in ("image_path", "original_prompt", "editing_prompt", "mask"):
            if key not in item:
                raise ValueError(f"case {case_id} in {root / MAPPING_FILE} has no {key!r}")
        image_path = root / IMAGE_DIR / item["image_path"]
        gt_path = root / GT_DIR / item["gt_image_path"] if item.get("gt_image_path") else None

        def load(image_path: Path = image_path, gt_path: Path | None = gt_path, rle: list = item["mask"]) -> CaseData:
            image = _read_rgb(image_path)
            h, w = image.shape[:2]
            return CaseData(
                source_image=image,
                mask=mask_decode(rle, h, w, border=border),
                gt_image=_read_rgb(gt_path) if gt_path is not None else None,
                edit_mask=mask_decode(rle, h, w, border=False),
            )

        cases.append(
            BenchCase(
                case_id=case_id,
                index=len(cases),
                type_id=type_id,
                source_prompt=strip_brackets(item["original_prompt"]),
                target_prompt=strip_brackets(item["editing_prompt"]),
                instruction=item.get("editing_instruction", "") or "",
                blended_word=item.get("blended_word", "") or "",
                meta={"image_path": item["image_path"]},
                loader=load,
            )
        )
    chosen = balanced(cases, limit)
    return [replace(c, index=i) for i, c in enumerate(chosen)]


def load_output_image(path: str | Path, size: int = 512) -> np.ndarray:
    """Read a method's output file as PIE's evaluator does: a non-square file (PIE's scripts save
    ``[instruction | gt | reconstruction | edit]`` side by side) is cropped to its bottom-right ``size``² tile."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w != h:
            im = im.crop((w - size, h - size, w, h))
        return np.asarray(im).copy()
