"""RF-Solver-Edit's official code (wangjiangshan0725/RF-Solver-Edit @ 3388e29) on shapes-flux -> parity fixtures.

Usage (the checkout is never committed; clone it anywhere outside the repository)::

    git clone https://github.com/wangjiangshan0725/RF-Solver-Edit /tmp/RF-Solver-Edit
    git -C /tmp/RF-Solver-Edit checkout 3388e29
    .venv/bin/pip install einops        # their model code needs it (not a retouch dependency)
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reference/rf_solver_edit.py /tmp/RF-Solver-Edit [--bench 30]

It copies ``FLUX_Image_Edit/src/flux`` into a scratch dir under /tmp, applies :data:`HUNKS`, loads shapes-flux's
weights into their ``Flux`` module (``bfl_common``: every parameter maps; the script checks that their transformer
and diffusers' agree on a random input) and replays their ``edit.py`` main on the fixture cases with the settings
of their ``run_boy.sh`` (15 steps, guidance 2, inject 2). Fixtures go to ``tests/fixtures/reference/rf_solver_edit``;
``--bench N`` also scores N ShapesBench cases (reference vs retouch's ``rf_solver_ref`` and ``rf_solver``) and writes
``benchmarks/results/reference/{rf_solver_ref,rf_solver}.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bfl_common as B  # noqa: E402
import flow_common as C  # noqa: E402

NAME = "rf_solver_edit"
COMMIT = "3388e299cae6ab0a3ee9eceb09911a4543a48576"
REFERENCE = f"wangjiangshan0725/RF-Solver-Edit@{COMMIT[:7]}"
SRC = "FLUX_Image_Edit/src"
FILES = [f"{SRC}/flux/{f}" for f in ("__init__.py", "math.py", "model.py", "sampling.py", "modules/layers.py",
                                     "modules/conditioner.py")]  # fmt: skip
SETTINGS = {"num_steps": 15, "guidance": 2.0, "inject": 2, "inversion_guidance": 1.0, "seed": 0,
            "single_blocks_from": "20/38 of the single-stream blocks (FLUX.1: id > 19 of 38; shapes-flux: id > 1 of 4)",
            "source": "FLUX_Image_Edit/src/run_boy.sh"}  # fmt: skip


def hunks(n_single: int) -> list[C.Hunk]:
    first = round(20 / 38 * n_single)  # FLUX.1's id > 19 of 38 single blocks, at our depth
    return [
        C.Hunk(f"{SRC}/flux/modules/layers.py", ".cuda()", ".to(v.device)",
               "stored values are moved back to the model's device; the code hard-codes CUDA, we run on CPU"),
        C.Hunk(f"{SRC}/flux/modules/layers.py", "info['id'] > 19", f"info['id'] > {first - 1}",
               f"injection in the single-stream blocks from 20 of FLUX.1's 38: the same fraction of shapes-flux's "
               f"{n_single} is from block {first} (scale-equivalent; with > 19 nothing would be injected)", count=2),
        C.Hunk(f"{SRC}/flux/sampling.py", "math.ceil(height / 16)", "math.ceil(height / 8)",
               "unpack assumes 16 pixels per token (8x VAE, 2x2 packing); shapes-flux's VAE downsamples 4x"),
        C.Hunk(f"{SRC}/flux/sampling.py", "math.ceil(width / 16)", "math.ceil(width / 8)",
               "as above, for the width"),
    ]  # fmt: skip


KEEP_EVALS = (0, 1, 29, 30, 31, 59)  # first / last evaluations of inversion (0-29) and sampling (30-59)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--bench", type=int, default=0, help="also score this many ShapesBench cases (results rows)")
    args = ap.parse_args()
    C.setup_threads()
    head = C.check_commit(args.checkout, COMMIT)
    from diffusers import FluxTransformer2DModel

    n_single = FluxTransformer2DModel.load_config(str(C.flux_folder() / "transformer"))["num_single_layers"]
    hk = hunks(n_single)
    scratch = C.patched_copy(args.checkout, FILES, hk)
    pipe, model = B.load(scratch / SRC)
    diff = B.check_model(model, pipe)
    print(f"their Flux vs diffusers' on our weights: max |diff| = {diff:.2e}")
    if diff > 1e-4:
        raise SystemExit("their transformer does not reproduce diffusers' on our weights: the weight map is wrong")
    info = {"inject_step": SETTINGS["inject"]}
    out = C.FIXTURES / NAME
    cases = C.fixture_cases()
    for case in cases:
        r = B.run(denoise_name="denoise", model=model, pipe=pipe, case=case, num_steps=SETTINGS["num_steps"],
                  guidance=SETTINGS["guidance"], info_settings=info, keep_evals=KEEP_EVALS)  # fmt: skip
        C.write_case(out, case.case_id, r["tensors"])
        print(case.case_id, r["nfe"], r["items"], f"{r['seconds']:.2f}s", len(r["stored_features"]), "stored values")
    C.write_settings(out, reference=REFERENCE, commit=head, hunks=hk, settings=SETTINGS, cases=cases,
                     notes="their transformer, loops and injection code on shapes-flux's weights; conditioning, "
                           "VAE and fp32 plumbing as bfl_common.py says; eval.<k> = their model's input tokens at "
                           "the k-th evaluation (0-29 inversion, 30-59 sampling)",
                     extra={"model_check_max_abs_diff": diff, "keep_evals": list(KEEP_EVALS)})  # fmt: skip
    if args.bench:
        cases = C.bench_cases(args.bench)
        runs = [B.run(denoise_name="denoise", model=model, pipe=pipe, case=c, num_steps=SETTINGS["num_steps"],
                      guidance=SETTINGS["guidance"], info_settings=info) for c in cases]  # fmt: skip
        B.bench_rows(method_ref="rf_solver", reference=REFERENCE, ref_runs=runs, cases=cases, retouch_methods={
            "rf_solver_ref": "retouch's reference mode (value replay from the inversion, target branch only, "
                             "run_boy.sh settings, the VAE posterior sampled from the run's generator as the "
                            "reference does)",
            "rf_solver": "retouch's own preset: 28 steps, guidance 3.5, source branch sampled beside the target and "
                         "its image values shared in the deeper half of all blocks for the first 20% of the steps",
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
