#!/usr/bin/env python
"""Which text-to-image sampler settings to evaluate the embedded models with: a guidance sweep on a validation
range of captions, kept apart from the held-out captions ``embedded_quality.py`` reports on.

Each setting generates images for N validation captions (``training.data.held_out_scenes(n,
offset=500_000)``, the whole world the model learned) and the oracle scores them per attribute, overall and by
object count. ``training.denoisers.SAMPLING`` holds the chosen settings; this file is the evidence.

Writes ``benchmarks/results/sampler_sweep.json`` atomically (one entry per model, merged with earlier runs).

    HF_HUB_OFFLINE=1 python benchmarks/sampler_sweep.py --models shapes-flux -n 100
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from retouch.bench.provenance import git_commit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training code (training/, not installed) is imported from the repository
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "sampler_sweep.json"
VALIDATION_OFFSET = 500_000
log = logging.getLogger("sampler_sweep")

SETTINGS: dict[str, list[dict[str, Any]]] = {
    # Flux is not guidance-distilled: guidance_scale has no effect; true CFG (> 1) needs a negative prompt.
    "flux": [{"true_cfg_scale": g, "negative_prompt": ""} for g in (1.0, 2.0, 4.0, 6.0)],
    "pixart": [{"guidance_scale": g} for g in (2.0, 4.0, 7.0, 10.0)],
    "sd": [{"guidance_scale": g} for g in (2.0, 4.0, 7.0)],
}


def sweep(name: str, n: int, seed: int) -> dict[str, Any]:
    from retouch.worlds import oracle
    from training import data, denoisers

    pipe, family, world = denoisers.load_pipeline(name)
    scenes = data.held_out_scenes(n, offset=VALIDATION_OFFSET, max_objects=world["max_objects"])
    prompts = [data.caption_of(s) for s in scenes]
    rows = []
    for overrides in SETTINGS[family]:
        t = time.perf_counter()
        settings = {**denoisers.SAMPLING[family], **overrides}
        images = denoisers.generate(pipe, family, prompts, seed=seed, **settings)
        acc = oracle.attribute_accuracy(images, scenes)
        rows.append(
            {
                "settings": settings,
                "oracle_accuracy": {k: round(v, 4) for k, v in acc.items()},
                "seconds": round(time.perf_counter() - t, 1),
            }
        )
        log.info("%s %s: %s", name, settings, rows[-1]["oracle_accuracy"])
    return {"family": family, "n_captions": n, "validation_offset": VALIDATION_OFFSET, "rows": rows}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--captions", type=int, default=100, help="validation captions per setting")
    p.add_argument("--models", nargs="*", help="embedded names (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)

    from retouch.models import registry
    from training.common import atomic_write_json

    for name in args.models or registry.embedded_names():
        res = sweep(name, args.captions, args.seed)
        res.update(commit=git_commit(ROOT), date=time.strftime("%Y-%m-%d %H:%M:%S"))
        models: dict[str, Any] = json.loads(args.out.read_text()).get("models", {}) if args.out.exists() else {}
        models[name] = res
        atomic_write_json(args.out, {"seed": args.seed, "models": models})


if __name__ == "__main__":
    main()
