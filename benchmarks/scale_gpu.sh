#!/usr/bin/env bash
# Real-scale rows on one CUDA GPU: the newer families at their published configs' full depth (random weights,
# built on the GPU in bf16) and KV-Edit on Flux.1 at 1024². Each job is bounded in time; a job that fails or runs
# out of time is reported and the next one runs. Results go to benchmarks/results/scale_<model>.json (merged with
# the entries already there); regenerate the README table with `python benchmarks/scale.py --readme-only`.
#
#   PYTHONPATH=src bash benchmarks/scale_gpu.sh
set -u
py=${PYTHON:-python3}
job() {
    local limit=$1
    shift
    echo "== $(date +%T) scale.py $*"
    timeout "$limit" "$py" benchmarks/scale.py --device cuda --dtype bf16 --nfe 2 --warmup 2 --sizes 1024 \
        --blocks full "$@" || echo "== job failed or timed out (exit $?): $*"
}
job 90 --models zimage flux2-klein --edit-runs zimage@1024x1024/bfull/direct+p2p/s2,4,8
job 90 --models sana sd35-medium --edit-runs sana@1024x1024/bfull/direct+p2p/s2,4,8
job 90 --models qwenimage --edit-runs qwenimage@1024x1024/bfull/direct+p2p/s2,4,8
job 80 --models sd35-large --edit-runs
job 80 --models flux2-dev --edit-runs flux2-dev@1024x1024/bfull/rf_inversion/s2,4,8
job 90 --models flux --presets kv_edit kv_edit_inf --ratios --edit-runs \
    flux@1024x1024/bfull/kv_edit/s7,14,28 flux@1024x1024/bfull/kv_edit_inf/s7,14,28
