#!/bin/bash
# The ShapesBench runs behind docs/results.md's "Edit-friendly DDPM inversion and LEDITS++" section (public dev
# split, seed 0, 10 cases = one per editing type), offline on the embedded models. Resumable; print the tables
# with `retouch bench report DIR --markdown`.
#   bash benchmarks/shapesbench/run_ddpm_ledits.sh [OUT]        (default OUT=runs/shapesbench)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/shapesbench}
HERE=benchmarks/shapesbench
R=".venv/bin/retouch"
export HF_HUB_OFFLINE=1
for m in sd pixart; do
  $R bench shapes --model shapes-$m --methods-file $HERE/ddpm_ledits_$m.json --cases 10 \
      --out "$OUT/ddpm-ledits-$m" --no-progress
done
