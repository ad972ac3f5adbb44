"""diffusers' community RF-Inversion pipeline (huggingface/diffusers @ 58eb52c,
``examples/community/pipeline_flux_rf_inversion.py``) on shapes-flux -> parity fixtures.

Usage (the checkout is never committed; only that one file of it is read)::

    git clone --no-checkout https://github.com/huggingface/diffusers /tmp/diffusers
    git -C /tmp/diffusers checkout 58eb52c -- examples/community/pipeline_flux_rf_inversion.py
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reference/rf_inversion.py /tmp/diffusers [--bench 30]

The file runs on the installed diffusers (0.42.1) after :data:`HUNKS`. Settings are its docstring example's
(``invert(num_inversion_steps=28, gamma=0.5)`` with the empty source prompt at guidance 0; ``pipe(start_timestep=0,
stop_timestep=.25, num_inference_steps=28, eta=0.9)`` at the call's default guidance 3.5), seed 0 set before
``invert`` (its VAE posterior sample and ``y_1`` are drawn from the global generator). The noise ``y_1`` is recorded
by a pass-through wrapper of ``torch.randn_like`` and stored as ``noise.0``. ``--bench N`` writes
``benchmarks/results/reference/{rf_inversion_ref,rf_inversion}.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flow_common as C  # noqa: E402

NAME = "rf_inversion"
COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"
REFERENCE = f"huggingface/diffusers@{COMMIT[:7]}:examples/community/pipeline_flux_rf_inversion.py"
FILE = "examples/community/pipeline_flux_rf_inversion.py"
T5_LENGTH = 64  # shapes-flux's T5 length
SETTINGS = {"num_steps": 28, "gamma": 0.5, "eta": 0.9, "start_timestep": 0.0, "stop_timestep": 0.25,
            "guidance": 3.5, "source_prompt": "", "source_guidance": 0.0, "strength": 1.0, "seed": 0,
            "height": 64, "width": 64, "max_sequence_length": T5_LENGTH}  # fmt: skip
HUNKS = [
    C.Hunk(FILE, "            prompt_2=source_prompt,\n            device=device,\n",
           f"            prompt_2=source_prompt,\n            device=device,\n"
           f"            max_sequence_length={T5_LENGTH},\n",
           "invert() encodes the source prompt at T5's default 512 tokens and takes no argument for it; shapes-flux "
           "was trained at 64 (the __call__ side takes max_sequence_length=64 as an argument)"),
]  # fmt: skip
KEEP_EVALS = (0, 1, 27, 28, 29, 55)  # first / last evaluations of inversion (0-27) and sampling (28-55)


def load(scratch: Path) -> Any:
    spec = importlib.util.spec_from_file_location("pipeline_flux_rf_inversion", scratch / FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pipe = mod.RFInversionFluxPipeline.from_pretrained(str(C.flux_folder()), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: Any, case: Any, keep_evals: tuple[int, ...] = ()) -> dict[str, Any]:
    from PIL import Image

    s = SETTINGS
    data = case.load()
    image = Image.fromarray(data.source_image)
    inputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: inputs.append(kw["hidden_states"].detach().clone()), with_kwargs=True
    )
    counter = C.CallCounter(pipe.transformer)
    drawn: list[torch.Tensor] = []
    randn_like = torch.randn_like

    def recording_randn_like(*a: Any, **kw: Any) -> torch.Tensor:  # pass-through: records y_1
        out = randn_like(*a, **kw)
        drawn.append(out.detach().clone())
        return out

    t0 = time.perf_counter()
    with torch.no_grad():
        torch.manual_seed(s["seed"])
        torch.randn_like = recording_randn_like
        try:
            inv, img_lat, ids = pipe.invert(image=image, source_prompt=s["source_prompt"],
                                            source_guidance_scale=s["source_guidance"],
                                            num_inversion_steps=s["num_steps"], gamma=s["gamma"],
                                            height=s["height"], width=s["width"], strength=s["strength"])  # fmt: skip
        finally:
            torch.randn_like = randn_like
        packed = pipe(prompt=case.target_prompt, inverted_latents=inv, image_latents=img_lat,
                      latent_image_ids=ids, height=s["height"], width=s["width"], start_timestep=s["start_timestep"],
                      stop_timestep=s["stop_timestep"], eta=s["eta"], num_inference_steps=s["num_steps"],
                      guidance_scale=s["guidance"], strength=s["strength"], max_sequence_length=T5_LENGTH,
                      output_type="latent").images  # fmt: skip
        # the pipeline's own decode lines (its output_type="pil" branch)
        lat = pipe._unpack_latents(packed, s["height"], s["width"], pipe.vae_scale_factor)
        dec = pipe.vae.decode(lat / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        edited = pipe.image_processor.postprocess(dec, output_type="pil")[0]
    seconds = time.perf_counter() - t0
    hook.remove()
    counter.remove()
    unpack = lambda t: pipe._unpack_latents(t, s["height"], s["width"], pipe.vae_scale_factor)  # noqa: E731
    if len(drawn) != 1:
        raise SystemExit(f"expected one randn_like draw (y_1), saw {len(drawn)}")
    img = C.to_uint8(edited)
    tensors = {"init_latent": unpack(img_lat), "inverted": unpack(inv), "final_latent": lat,
               "image": torch.from_numpy(img), "noise.0": unpack(drawn[0])}  # fmt: skip
    for k in keep_evals:
        tensors[f"eval.{k}"] = inputs[k]
    return {"tensors": tensors, "image": img, "seconds": seconds, "nfe": counter.calls, "items": counter.items}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--bench", type=int, default=0, help="also score this many ShapesBench cases (results rows)")
    ap.add_argument("--recon", type=int, default=0, help="reconstruction (target = source) on this many cases")
    args = ap.parse_args()
    C.setup_threads()
    head = C.check_commit(args.checkout, COMMIT)
    scratch = C.patched_copy(args.checkout, [FILE], HUNKS)
    pipe = load(scratch)
    out = C.FIXTURES / NAME
    cases = C.fixture_cases()
    for case in cases:
        r = run(pipe, case, KEEP_EVALS)
        C.write_case(out, case.case_id, r["tensors"])
        print(case.case_id, r["nfe"], r["items"], f"{r['seconds']:.2f}s")
    C.write_settings(out, reference=REFERENCE, commit=head, hunks=HUNKS, settings=SETTINGS, cases=cases,
                     notes="eval.<k> = the transformer's packed input at its k-th call (0-27 invert, 28-55 edit); "
                           "noise.0 = y_1 (unpacked); init_latent = its VAE posterior sample",
                     extra={"keep_evals": list(KEEP_EVALS)})  # fmt: skip
    if args.bench:
        import bfl_common as B

        cases = C.bench_cases(args.bench)
        runs = [run(pipe, c) for c in cases]
        B.bench_rows(method_ref="rf_inversion", reference=REFERENCE, ref_runs=runs, cases=cases, retouch_methods={
            "rf_inversion_ref": "retouch's reference mode: the pipeline's forward-ODE schedule (model at i/29, "
                                "gaps read from the noisy end), target branch only, VAE posterior sample then y_1 "
                                "from the run's generator (seed 0, as the reference's global one)",
            "rf_inversion": "retouch's preset: forward ODE at the grid's own sigmas, target branch only, posterior "
                            "mean (y_1 is then the generator's first draw)",
        })  # fmt: skip
        print(json.dumps({"ref_mean_seconds": float(np.mean([r["seconds"] for r in runs]))}))
    if args.recon:
        reconstruction(pipe, C.bench_cases(args.recon))
    return 0


def reconstruction(pipe: Any, cases: list[Any]) -> None:
    """Target = source: PSNR of the 'edit' against the source image, reference vs retouch's two schedules."""
    import dataclasses

    import bfl_common as B

    from retouch import io

    out: dict[str, list[float]] = {"reference": [], "rf_inversion_ref": [], "rf_inversion": []}
    for case in cases:
        same = dataclasses.replace(case, target_prompt=case.source_prompt)
        src = case.load().source_image
        out["reference"].append(io.psnr(src, run(pipe, same)["image"]))
        for method in ("rf_inversion_ref", "rf_inversion"):
            out[method].append(io.psnr(src, B.retouch_run(same, method)["image"]))
    row = {
        "reference": REFERENCE, "model": C.FLUX, "cases": len(cases), "case_ids": [c.case_id for c in cases],
        "what": "reconstruction with target prompt = source prompt: mean PSNR (dB) of the output vs the source image",
        **{f"psnr_{k}": round(float(np.mean(v)), 3) for k, v in out.items()},
        "per_case": {k: [round(x, 3) for x in v] for k, v in out.items()},
    }  # fmt: skip
    C.write_json(C.RESULTS.parent / "rf_inversion_reconstruction.json", row)  # own schema, not a results row
    print(json.dumps({k: v for k, v in row.items() if k not in ("per_case", "case_ids")}))


if __name__ == "__main__":
    raise SystemExit(main())
