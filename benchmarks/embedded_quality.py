#!/usr/bin/env python
"""Quality of the embedded models: text-to-image oracle accuracy and inversion → reconstruction PSNR.

For every embedded pipeline (``retouch.models.registry.embedded_names()``):

* **text-to-image**: images from N held-out canonical captions (``training.data.held_out_scenes``: seeds
  7_000_000 + i, i < N, default 500, restricted to the world the model learned, its ``world.json``) with the
  family's default sampler (``training.denoisers.SAMPLING``), judged
  per attribute by the deterministic oracle (``retouch.worlds.oracle.attribute_accuracy``);
* **reconstruction**: held-out renders (a separate range of the held-out seeds) inverted and regenerated
  with ``retouch.editing.reconstruct`` under their canonical caption, for every inversion of the family that
  does not pin the source branch (those reconstruct exactly by construction); the best is reported. The
  VAE-only PSNR (encode → decode) is listed as the ceiling.

Writes ``benchmarks/results/embedded_quality.json`` atomically (machine, commit, settings, numbers).

    HF_HUB_OFFLINE=1 python benchmarks/embedded_quality.py            # full run (500 captions)
    HF_HUB_OFFLINE=1 python benchmarks/embedded_quality.py -n 50 --models shapes-sd --recon-n 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from retouch.bench.provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training code (training/, not installed) is imported from the repository
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "embedded_quality.json"
RECON_OFFSET = 300_000
log = logging.getLogger("embedded_quality")


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def text_to_image(name: str, n: int, seed: int) -> dict[str, Any]:
    """Oracle attribute accuracy of ``n`` generated images."""
    from retouch.worlds import oracle
    from training import data, denoisers

    pipe, family, world = denoisers.load_pipeline(name)
    scenes = data.held_out_scenes(n, max_objects=world["max_objects"])
    t = time.perf_counter()
    images = denoisers.generate(pipe, family, [data.caption_of(s) for s in scenes], seed=seed)
    parsed = [oracle.parse(img) for img in images]  # once: the scores below all read these
    scores = [oracle.compare(p, s) for p, s in zip(parsed, scenes, strict=True)]
    acc = oracle.average_scores(scores)
    by_count = {}
    for k in sorted({len(s.objects) for s in scenes}):
        sub = [r for r, s in zip(scores, scenes, strict=True) if len(s.objects) == k]
        by_count[str(k)] = {"n": len(sub), **{a: round(v, 4) for a, v in oracle.average_scores(sub).items()}}
    return {
        "family": family,
        "n_captions": n,
        "world": world,
        "sampler": denoisers.SAMPLING[family],
        "oracle_accuracy": {k: round(v, 4) for k, v in acc.items()},
        "oracle_accuracy_by_objects": by_count,
        "binding_errors": oracle.binding_errors(parsed, scenes),
        "t2i_seconds": round(time.perf_counter() - t, 1),
    }


def reconstruction(
    name: str, family: str, n: int, inversions: list[str] | None = None, num_steps: int | None = None
) -> dict[str, Any]:
    """Reconstruction PSNR (dB, uint8 images) for each applicable inversion; the best is reported."""
    from PIL import Image

    from retouch.backbones import load_backbone
    from retouch.config import InversionConfig
    from retouch.editing import reconstruct
    from retouch.inversion import INVERSIONS
    from retouch.models import registry
    from retouch.worlds import shapes
    from training import data

    backbone = load_backbone(name)
    world = registry.world_of(registry.resolve(name))
    scenes = data.held_out_scenes(n, offset=RECON_OFFSET, max_objects=world["max_objects"])
    renders = [shapes.render(s) for s in scenes]
    prompts = [data.caption_of(s) for s in scenes]
    per: dict[str, float] = {}
    for inv in INVERSIONS.values():
        if family not in inv.families or inv.source_correction:
            continue
        if inversions and inv.name not in inversions:
            continue
        vals = []
        try:
            for img, prompt in zip(renders, prompts, strict=True):
                res = reconstruct(
                    backbone,
                    Image.fromarray(img),
                    prompt,
                    inversion=InversionConfig(name=inv.name),
                    num_steps=num_steps,
                )
                vals.append(_psnr(img, np.asarray(res.reconstruction.convert("RGB"))))
        except (ValueError, RuntimeError) as exc:  # an inversion that does not fit this model's defaults
            log.warning("%s: inversion %s failed: %s", name, inv.name, exc)
            continue
        per[inv.name] = round(float(np.mean(vals)), 2)
    vae = backbone_vae_psnr(name, renders)
    best = max(per, key=per.get) if per else None
    return {
        "reconstruction_n": n,
        "reconstruction_steps": num_steps or "backbone default",
        "reconstruction_psnr_by_inversion": per,
        "inversion": best,
        "reconstruction_psnr": per.get(best) if best else None,
        "vae_psnr": vae,
    }


@torch.no_grad()
def backbone_vae_psnr(name: str, renders: list[np.ndarray]) -> float:
    """Encode → decode PSNR of the model's own VAE (the ceiling of any inversion)."""
    from diffusers import AutoencoderKL

    from retouch.models import registry
    from training import data

    vae = AutoencoderKL.from_pretrained(str(Path(registry.resolve(name)) / "vae"), torch_dtype=torch.float32)
    x = data.images_to_tensor(renders)
    y = data.tensor_to_images(vae.decode(vae.encode(x).latent_dist.mean).sample)
    return round(float(np.mean([_psnr(a, b) for a, b in zip(renders, y, strict=True)])), 2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--captions", type=int, default=500, help="held-out captions per model")
    p.add_argument("--recon-n", type=int, default=20, help="held-out renders for reconstruction PSNR")
    p.add_argument("--inversions", nargs="*", help="inversions to try (default: all that fit the family)")
    p.add_argument("--recon-steps", type=int, help="inversion/sampling steps (default: the backbone's)")
    p.add_argument("--models", nargs="*", help="embedded names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    from retouch.models import registry
    from training.common import atomic_write_json

    names = args.models or registry.embedded_names()
    for name in names:
        log.info("evaluating %s", name)
        t = time.perf_counter()
        res = text_to_image(name, args.captions, args.seed)
        res.update(reconstruction(name, res["family"], args.recon_n, args.inversions, args.recon_steps))
        res["seconds"] = round(time.perf_counter() - t, 1)
        res.update(commit=git_commit(ROOT), date=time.strftime("%Y-%m-%d %H:%M:%S"), threads=torch.get_num_threads())
        # re-read just before writing: runs for other models may have finished meanwhile (one process per model)
        models: dict[str, Any] = json.loads(args.out.read_text()).get("models", {}) if args.out.exists() else {}
        models[name] = res
        log.info("%s: %s", name, res)
        atomic_write_json(
            args.out,
            {
                "machine": _machine(),
                "commit": git_commit(ROOT),
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "seed": args.seed,
                "models": models,
            },
        )


if __name__ == "__main__":
    main()
