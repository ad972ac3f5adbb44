#!/bin/bash
# The ShapesBench runs behind docs/results.md (public dev split, seed 0), offline on the embedded models.
# Each run resumes if killed; `retouch bench report DIR --markdown` prints its tables.
#   bash benchmarks/shapesbench/run.sh [OUT]        (default OUT=runs/shapesbench)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/shapesbench}
HERE=benchmarks/shapesbench
R=".venv/bin/retouch"
export HF_HUB_OFFLINE=1
# Direct Inversion vs DDIM inversion under P2P, MasaCtrl, PnP and P2P-Zero (shapes-sd), all ten edit types
$R bench shapes --model shapes-sd --methods-file $HERE/sd_methods.json --cases 10 --steps 25 --out "$OUT/sd" --no-progress
# direct+p2p vs ddim+p2p on colour and object edits only (types 6 and 1), 20 cases each
$R bench shapes --model shapes-sd --methods ddim+p2p,direct+p2p --types 1,6 --cases 40 --steps 25 \
    --out "$OUT/sd-colour-object" --no-progress
# DiT4Edit on shapes-pixart: DPM-Solver++ vs DDIM inversion at equal steps, merging on / off, Direct Inversion
$R bench shapes --model shapes-pixart --methods-file $HERE/pixart_methods.json --cases 10 --out "$OUT/pixart" --no-progress
# RF-Inversion / RF-Solver / FireFlow vs plain flow-Euler inversion on shapes-flux
$R bench shapes --model shapes-flux --methods-file $HERE/flux_methods.json --cases 10 --out "$OUT/flux" --no-progress
# Colour edits (type 6) across backbones: direct+p2p vs ddim+p2p on shapes-flux and shapes-pixart, 20 cases each
for m in flux pixart; do
  $R bench shapes --model shapes-$m --methods direct+p2p,ddim+p2p --types 6 --cases 20 --out "$OUT/colour-$m" --no-progress
done
