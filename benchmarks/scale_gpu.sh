#!/usr/bin/env bash
# Real-scale rows on one CUDA GPU: the newer families at their published configs' full depth (random weights,
# built on the GPU in bf16). One scale.py run per model, so that each model's JSON is written as soon as it is
# done; each run is bounded in time. Results go to benchmarks/results/scale_<model>.json (merged with the
# entries already there); regenerate the README table with `python benchmarks/scale.py --readme-only`.
#
#   PYTHONPATH=src bash benchmarks/scale_gpu.sh [MODEL ...]
#
# The committed rows (2026-12-04, one H200) came from: zimage flux2-klein qwenimage sana (this script) and
# sd35-large (the same flags with merge ratios 0.5 and 0.75 and --warmup 2). flux2-dev and sd35-medium ran out of
# the session's device time; their committed rows are CPU rows at reduced depth (the command is in each JSON's
# "notes" and in the README), to be replaced by this script's full-depth GPU rows when a GPU is available. KV-Edit cannot run beside token merging (its cache is per token), so its GPU rows
# need `--ratios` with no value: `--models flux --presets kv_edit kv_edit_inf --ratios`.
set -u
py=${PYTHON:-python3}
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(zimage flux2-klein qwenimage sana sd35-medium sd35-large flux2-dev)
for model in "${models[@]}"; do
    echo "== $(date +%T) $model"
    timeout 120 "$py" benchmarks/scale.py --device cuda --dtype bf16 --nfe 2 --warmup 1 --sizes 1024 --blocks full \
        --ratios 0.75 --edit-runs --models "$model" || echo "== $model failed or timed out (exit $?)"
done
