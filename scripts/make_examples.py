"""Write the example ShapesWorld edit cases in examples/ (deterministic; rerun to regenerate)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from retouch.worlds import make_edit_case

EXAMPLES = [("colour", 6, 3), ("shape", 1, 5), ("background", 8, 2), ("fill", 7, 4)]


EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def main(out: Path = EXAMPLES_DIR) -> None:
    out.mkdir(exist_ok=True)
    index = []
    for name, type_id, seed in EXAMPLES:
        case = make_edit_case(type_id, seed)
        Image.fromarray(case.source_image).save(out / f"{name}.png")
        Image.fromarray(case.target_image).save(out / f"{name}.target.png")
        entry = {
            "image": f"{name}.png",
            "ground_truth": f"{name}.target.png",
            "source": case.source_prompt,
            "target": case.target_prompt,
            "blend_words": case.blended_word,
            "type_id": case.type_id,
            "instruction": case.instruction,
        }
        (out / f"{name}.source.txt").write_text(case.source_prompt + "\n")
        (out / f"{name}.target.txt").write_text(case.target_prompt + "\n")
        index.append(entry)
    (out / "examples.json").write_text(json.dumps(index, indent=2) + "\n")


if __name__ == "__main__":
    main()
