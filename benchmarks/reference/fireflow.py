"""FireFlow's official code (HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing @ 98588a6)
on shapes-flux -> parity fixtures.

Usage (the checkout is never committed; clone it anywhere outside the repository)::

    git clone https://github.com/HolmesShuan/FireFlow-Fast-Inversion-of-Rectified-Flow-for-Image-Semantic-Editing \
        /tmp/FireFlow
    git -C /tmp/FireFlow checkout 98588a6
    .venv/bin/pip install einops        # their model code needs it (not a retouch dependency)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reference/fireflow.py /tmp/FireFlow [--bench 30]

As ``rf_solver_edit.py`` (their ``Flux`` module on shapes-flux's weights, see ``bfl_common.py``), with their
``denoise_fireflow`` for inversion and sampling and the settings of their ``src/run_boy.sh`` "Fast Editing" run:
8 steps, guidance 2, inject 1, ``--start_layer_index 0 --end_layer_index 37`` (every single-stream block of FLUX.1;
here every one of shapes-flux's, given through their ``info`` dict, no code change), ``reuse_v 1``
(``replace_v``). ``--bench N`` writes ``benchmarks/results/reference/{fireflow_ref,fireflow}.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bfl_common as B  # noqa: E402
import flow_common as C  # noqa: E402

NAME = "fireflow"
COMMIT = "98588a6f87662d73d8f9722294ad1fcf02ed211d"
REFERENCE = f"HolmesShuan/FireFlow@{COMMIT[:7]}"
SRC = "src"
FILES = [f"{SRC}/flux/{f}" for f in ("__init__.py", "math.py", "model.py", "sampling.py", "modules/layers.py",
                                     "modules/conditioner.py")]  # fmt: skip
SETTINGS = {"num_steps": 8, "guidance": 2.0, "inject": 1, "inversion_guidance": 1.0, "seed": 0,
            "single_blocks": "all (FLUX.1: 0..37; shapes-flux: 0..3)", "reuse_v": 1, "editing_strategy": "replace_v",
            "sampling_strategy": "fireflow", "source": "src/run_boy.sh (Fast Editing)"}  # fmt: skip
HUNKS = [
    C.Hunk(f"{SRC}/flux/modules/layers.py", ".cuda()", ".to(x.device)",
           "stored features are moved back to the model's device; the code hard-codes CUDA, we run on CPU", count=7),
    C.Hunk(f"{SRC}/flux/sampling.py", "math.ceil(height / 16)", "math.ceil(height / 8)",
           "unpack assumes 16 pixels per token (8x VAE, 2x2 packing); shapes-flux's VAE downsamples 4x"),
    C.Hunk(f"{SRC}/flux/sampling.py", "math.ceil(width / 16)", "math.ceil(width / 8)", "as above, for the width"),
]  # fmt: skip
KEEP_EVALS = (0, 1, 8, 9, 10, 17)  # first / last evaluations of inversion (0-8) and sampling (9-17)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--bench", type=int, default=0, help="also score this many ShapesBench cases (results rows)")
    args = ap.parse_args()
    C.setup_threads()
    head = C.check_commit(args.checkout, COMMIT)
    scratch = C.patched_copy(args.checkout, FILES, HUNKS)
    pipe, model = B.load(scratch / SRC)
    diff = B.check_model(model, pipe)
    print(f"their Flux vs diffusers' on our weights: max |diff| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("their transformer does not reproduce diffusers' on our weights: the weight map is wrong")
    n_single = len(model.single_blocks)
    info = {"inject_step": SETTINGS["inject"], "start_layer_index": 0, "end_layer_index": n_single - 1,
            "reuse_v": 1, "editing_strategy": "replace_v", "qkv_ratio": [1.0, 1.0, 1.0]}  # fmt: skip
    out = C.FIXTURES / NAME
    cases = C.fixture_cases()
    for case in cases:
        r = B.run(denoise_name="denoise_fireflow", model=model, pipe=pipe, case=case, num_steps=SETTINGS["num_steps"],
                  guidance=SETTINGS["guidance"], info_settings=info, keep_evals=KEEP_EVALS)  # fmt: skip
        C.write_case(out, case.case_id, r["tensors"])
        print(case.case_id, r["nfe"], r["items"], f"{r['seconds']:.2f}s", len(r["stored_features"]), "stored values")
    C.write_settings(out, reference=REFERENCE, commit=head, hunks=HUNKS, settings=SETTINGS, cases=cases,
                     notes="their transformer, loops and injection code on shapes-flux's weights; conditioning, "
                           "VAE and fp32 plumbing as bfl_common.py says; eval.<k> = their model's input tokens at "
                           "the k-th evaluation (0-8 inversion, 9-17 sampling)",
                     extra={"model_check_max_abs_diff": diff, "keep_evals": list(KEEP_EVALS)})  # fmt: skip
    if args.bench:
        cases = C.bench_cases(args.bench)
        runs = [B.run(denoise_name="denoise_fireflow", model=model, pipe=pipe, case=c,
                      num_steps=SETTINGS["num_steps"], guidance=SETTINGS["guidance"], info_settings=info)
                for c in cases]  # fmt: skip
        B.bench_rows(method_ref="fireflow", reference=REFERENCE, ref_runs=runs, cases=cases, retouch_methods={
            "fireflow_ref": "retouch's reference mode (value replay from the inversion, target branch only, "
                            "run_boy.sh settings, the VAE posterior sampled from the run's generator as the "
                            "reference does)",
            "fireflow": "retouch's own preset: 28 steps, guidance 3.5, source branch sampled beside the target and "
                        "its image values shared in the deeper half of all blocks for the first 20% of the steps",
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
