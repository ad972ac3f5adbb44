"""Check retouch's memory estimate (``retouch.backbones.memory``) against measured peaks.

For each embedded model and working size, a fresh process loads the model, notes its resident memory, runs one
edit at that size and reports its peak resident memory (``ru_maxrss``); the growth is what the estimate models.
Results: ``benchmarks/results/memory_estimate.json``.

    .venv/bin/python benchmarks/memory_estimate.py [--models shapes-flux,shapes-sd] [--sizes 64,128,256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from PIL import Image
from retouch.backbones import load_backbone
from retouch.backbones.memory import estimate_edit_memory
from retouch.config import EditConfig
from retouch.editing import edit
model, size = sys.argv[1], int(sys.argv[2])

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

bb = load_backbone(model)
img = Image.open("examples/colour.png").convert("RGB")
cfg = EditConfig(open("examples/colour.source.txt").read().strip(), open("examples/colour.target.txt").read().strip(),
                 method="direct+p2p", num_steps=3, height=size, width=size)
edit(bb, img, cfg.with_(height=None, width=None, num_steps=1))  # warm-up at the native size (lazy allocations)
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
edit(bb, img, cfg)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
est = estimate_edit_memory(bb, (size, size), batch=4 if bb.uses_cfg else 2)
print(json.dumps({"model": model, "size": size, "rss_before": before, "peak_before": peak_before, "peak": peak,
                  "measured_growth": peak - max(before, peak_before), "estimate": est.to_dict()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="shapes-flux,shapes-sd")
    ap.add_argument("--sizes", default="64,128,256")
    ap.add_argument("--out", default="benchmarks/results/memory_estimate.json")
    args = ap.parse_args()
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for model in args.models.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            out = subprocess.run([sys.executable, "-c", CHILD, model, str(size)], capture_output=True, text=True,
                                 env=env, check=True)  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            est = row["estimate"]["total_bytes"]
            row["ratio_estimate_to_measured"] = round(est / max(row["measured_growth"], 1), 2)
            rows.append(row)
            print(f"{model} {size}x{size}: measured +{row['measured_growth'] / 2**20:.0f} MiB, "
                  f"estimated {est / 2**20:.0f} MiB (x{row['ratio_estimate_to_measured']})")  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    main()
