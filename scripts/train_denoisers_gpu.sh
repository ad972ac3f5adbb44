#!/usr/bin/env bash
# Train the three embedded denoisers at once on one CUDA GPU: one training phase that starts from the
# embedded models' weights (--init-from) and writes run directories under OUT_DIR.
#
#   scripts/train_denoisers_gpu.sh OUT_DIR MINUTES [extra `python -m training` flags...]
#
# Each family runs in its own process (small models leave most of the GPU idle, so three share it well).
# The shared components (VAE, text encoders) come from --components (default runs/). When the environment
# variable OUT is set (a results folder that travels back from a lent GPU machine), each run directory is
# packed there without its large checkpoint and pool: `final/` (EMA weights), logs and metrics, which is
# what `python -m training assemble --run DIR` needs. PYTHON names the interpreter (default python3).
set -u
out=${1:?usage: $0 OUT_DIR MINUTES [flags...]}
minutes=${2:?usage: $0 OUT_DIR MINUTES [flags...]}
shift 2
root=$(cd "$(dirname "$0")/.." && pwd)
export HF_HUB_OFFLINE=1 PYTHONPATH="$root:$root/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
pids=()
for fam in sd pixart flux; do
  extra=()
  [ "$fam" = sd ] && extra=(--offset-noise 0.2)
  "${PYTHON:-python3}" -m training "$fam" --out "$out/$fam" \
    --init-from "$root/src/retouch/models/embedded/shapes-$fam" --minutes "$minutes" "${extra[@]}" "$@" \
    >"$out/$fam.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
for fam in sd pixart flux; do
  tail -n 3 "$out/$fam.log"
  if [ -n "${OUT:-}" ]; then
    cp "$out/$fam.log" "$OUT/$fam.log"
    tar -C "$out" --exclude checkpoint.pt --exclude pool.pt -cf "$OUT/$fam.tar" "$fam"
  fi
done
exit $rc
