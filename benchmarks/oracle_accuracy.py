#!/usr/bin/env python
"""The ShapesWorld oracle's attribute accuracy on rendered scenes under the degradations a generated or saved
image goes through: the evidence behind the table in ``retouch.worlds.oracle``'s docstring.

Conditions: clean renders; Gaussian noise σ = 8/255; PIL Gaussian blur (radius 0.5 or 1.0) then that noise;
JPEG quality 75 (4:2:0 chroma); 64×128 canvases clean and blurred + noisy; and **thick objects**: every
object's painted pixels grown by one pixel in its own colour (background untouched), the kind of drawing error
a generative model makes, which must not change what the oracle reads as the global style.

Scenes ``sample_scene(seed)``, seeds 20000 + i. Writes ``benchmarks/results/oracle_accuracy.json`` atomically.

    python benchmarks/oracle_accuracy.py -n 1000
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from retouch.bench.provenance import git_commit
from retouch.worlds import attribute_accuracy, render, sample_scene, thicken_objects

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "oracle_accuracy.json"
SEED0 = 20_000


def noisy(image: np.ndarray, seed: int, sigma: float = 8.0, blur: float = 0.0) -> np.ndarray:
    """PIL Gaussian blur of radius ``blur`` (if any), then Gaussian noise of ``sigma`` levels."""
    out = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(blur))) if blur else image
    return np.clip(np.rint(out + np.random.default_rng(seed).normal(0.0, sigma, out.shape)), 0, 255).astype(np.uint8)


def jpeg(image: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


CONDITIONS: dict[str, tuple[tuple[int, int], Callable]] = {
    "64x64 clean": ((64, 64), lambda im, sc, seed: im),
    "64x64 noise 8": ((64, 64), lambda im, sc, seed: noisy(im, seed)),
    "64x64 blur 0.5 + noise 8": ((64, 64), lambda im, sc, seed: noisy(im, seed, blur=0.5)),
    "64x64 blur 1.0 + noise 8": ((64, 64), lambda im, sc, seed: noisy(im, seed, blur=1.0)),
    "64x64 jpeg 75": ((64, 64), lambda im, sc, seed: jpeg(im)),
    "64x64 thick objects": ((64, 64), lambda im, sc, seed: thicken_objects(im, sc)),
    "64x128 clean": ((64, 128), lambda im, sc, seed: im),
    "64x128 blur 0.5 + noise 8": ((64, 128), lambda im, sc, seed: noisy(im, seed, blur=0.5)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--scenes", type=int, default=1000)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.scenes < 1:
        p.error("--scenes must be >= 1")
    seeds = range(SEED0, SEED0 + args.scenes)
    scenes = [sample_scene(s) for s in seeds]
    rows = {}
    for name, ((h, w), transform) in CONDITIONS.items():
        t0 = time.perf_counter()
        images = [transform(render(sc, h, w), sc, seed) for sc, seed in zip(scenes, seeds, strict=True)]
        acc = attribute_accuracy(images, scenes)
        rows[name] = {k: round(v, 4) for k, v in acc.items()}
        print(f"{name:28s} {time.perf_counter() - t0:6.1f}s  " + " ".join(f"{k} {v:.4f}" for k, v in acc.items()))
    seed_range = [SEED0, SEED0 + args.scenes - 1]
    result = {"n_scenes": args.scenes, "seeds": seed_range, "commit": git_commit(ROOT), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
