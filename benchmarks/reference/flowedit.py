"""FlowEdit's official code (fallenshock/FlowEdit @ 457f402, ``FlowEdit_utils.py``) on shapes-flux -> parity fixtures.

Usage (the checkout is never committed)::

    git clone https://github.com/fallenshock/FlowEdit /tmp/FlowEdit
    git -C /tmp/FlowEdit checkout 457f402
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reference/flowedit.py /tmp/FlowEdit [--bench 30]

``FlowEditFLUX`` runs on the installed diffusers (0.42.1) after :data:`HUNKS`, with ``FLUX_exp.yaml``'s settings
(T_steps 28, n_avg 1, source / target guidance 1.5 / 5.5, n_min 0, n_max 24, seed 10). The driver does what their
``run_script.py`` does around it (seed ``random`` / ``numpy`` / ``torch``, ``image_processor.preprocess``, the
posterior *mode*, ``(z - shift) * scale``; decode ``z / scale + shift`` and ``postprocess``), in fp32 on CPU
(their script uses fp16 on GPU). ``trace.<i>`` stores their edit latent after step ``i`` (recorded through the
transformer's input: see :func:`run`). ``--bench N`` writes ``benchmarks/results/reference/flowedit.json``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flow_common as C  # noqa: E402

NAME = "flowedit"
COMMIT = "457f40239845d41391ef04d294bb0f1c02525fcf"
REFERENCE = f"fallenshock/FlowEdit@{COMMIT[:7]}"
FILE = "FlowEdit_utils.py"
T5_LENGTH = 64
SETTINGS = {"T_steps": 28, "n_avg": 1, "src_guidance_scale": 1.5, "tar_guidance_scale": 5.5, "n_min": 0,
            "n_max": 24, "seed": 10, "negative_prompt": "", "max_sequence_length": T5_LENGTH,
            "source": "FLUX_exp.yaml"}  # fmt: skip
HUNKS = [
    C.Hunk(FILE, "x_src.shape[2]*pipe.vae_scale_factor//2, x_src.shape[3]*pipe.vae_scale_factor//2",
           "x_src.shape[2]*pipe.vae_scale_factor, x_src.shape[3]*pipe.vae_scale_factor",
           "diffusers >= 0.32 keeps the real VAE factor in FluxPipeline.vae_scale_factor (it was 2x before); "
           "with //2 the image ids cover a quarter of the tokens (fallenshock/FlowEdit#4)"),
    C.Hunk(FILE, "        prompt=src_prompt,\n        prompt_2=None,\n        device=device,\n    )",
           f"        prompt=src_prompt,\n        prompt_2=None,\n        device=device,\n"
           f"        max_sequence_length={T5_LENGTH},\n    )",
           "the Flux path encodes prompts at T5's default 512 tokens; shapes-flux was trained at 64"),
    C.Hunk(FILE, "        prompt=tar_prompt,\n        prompt_2=None,\n        device=device,\n    )",
           f"        prompt=tar_prompt,\n        prompt_2=None,\n        device=device,\n"
           f"        max_sequence_length={T5_LENGTH},\n    )",
           "as above, for the target prompt"),
]  # fmt: skip
KEEP_STEPS = (4, 5, 15, 27)  # the first integrated step is T_steps - n_max = 4


def load(scratch: Path) -> tuple[Any, Any]:
    from diffusers import FluxPipeline

    C.import_path(scratch)
    import FlowEdit_utils as fe  # noqa: N813

    pipe = FluxPipeline.from_pretrained(str(C.flux_folder()), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, fe


def run(pipe: Any, fe: Any, case: Any, keep_steps: tuple[int, ...] = ()) -> dict[str, Any]:
    from PIL import Image

    s = SETTINGS
    data = case.load()
    # their edit latent zt_edit after step i is recoverable from the transformer's inputs at step i+1:
    # zt_tar - zt_src = zt_edit - x_src (calls alternate source, target)
    inputs: list[torch.Tensor] = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: inputs.append(kw["hidden_states"].detach().clone()), with_kwargs=True
    )
    counter = C.CallCounter(pipe.transformer)
    drawn: list[torch.Tensor] = []
    randn_like = torch.randn_like

    def recording_randn_like(*a: Any, **kw: Any) -> torch.Tensor:  # pass-through: records the forward noise
        out = randn_like(*a, **kw)
        drawn.append(out.detach().clone())
        return out

    t0 = time.perf_counter()
    with torch.no_grad():
        random.seed(s["seed"])
        np.random.seed(s["seed"])
        torch.manual_seed(s["seed"])
        image = pipe.image_processor.preprocess(Image.fromarray(data.source_image))
        x0 = pipe.vae.encode(image).latent_dist.mode()
        x0 = (x0 - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        torch.randn_like = recording_randn_like
        try:
            z = fe.FlowEditFLUX(pipe, pipe.scheduler, x0, case.source_prompt, case.target_prompt,
                                s["negative_prompt"], s["T_steps"], s["n_avg"], s["src_guidance_scale"],
                                s["tar_guidance_scale"], s["n_min"], s["n_max"])  # fmt: skip
        finally:
            torch.randn_like = randn_like
        dec = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        edited = pipe.image_processor.postprocess(dec, output_type="pil")[0]
    seconds = time.perf_counter() - t0
    hook.remove()
    counter.remove()
    img = C.to_uint8(edited)
    h, w = data.source_image.shape[:2]
    unpack = lambda t: pipe._unpack_latents(t, h, w, pipe.vae_scale_factor)  # noqa: E731
    first = s["T_steps"] - s["n_max"]
    tensors = {"init_latent": x0, "final_latent": z, "image": torch.from_numpy(img)}
    for k, eps in enumerate(drawn):
        tensors[f"noise.{k}"] = unpack(eps)
    for i in keep_steps:
        j = i + 1 - first  # the step whose inputs carry zt_edit after step i
        if i == s["T_steps"] - 1:
            tensors[f"trace.{i}"] = z
        elif 0 <= j < len(drawn):
            tensors[f"trace.{i}"] = x0 + unpack(inputs[2 * j + 1] - inputs[2 * j])
    return {"tensors": tensors, "image": img, "seconds": seconds, "nfe": counter.calls, "items": counter.items}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path)
    ap.add_argument("--bench", type=int, default=0, help="also score this many ShapesBench cases (results rows)")
    args = ap.parse_args()
    C.setup_threads()
    head = C.check_commit(args.checkout, COMMIT)
    scratch = C.patched_copy(args.checkout, [FILE], HUNKS)
    pipe, fe = load(scratch)
    out = C.FIXTURES / NAME
    cases = C.fixture_cases()
    for case in cases:
        r = run(pipe, fe, case, KEEP_STEPS)
        C.write_case(out, case.case_id, r["tensors"])
        print(case.case_id, r["nfe"], r["items"], f"{r['seconds']:.2f}s")
    C.write_settings(out, reference=REFERENCE, commit=head, hunks=HUNKS, settings=SETTINGS, cases=cases,
                     notes="init_latent = the posterior mode as run_script.py; noise.<k> = the k-th forward noise "
                           "(unpacked); trace.<i> = zt_edit after step i, read back from the transformer's inputs "
                           "of step i+1 (zt_tar - zt_src = zt_edit - x_src; the last is the output)",
                     extra={"keep_steps": list(KEEP_STEPS)})  # fmt: skip
    if args.bench:
        import bfl_common as B

        cases = C.bench_cases(args.bench)
        runs = [run(pipe, fe, c) for c in cases]
        B.bench_rows(method_ref="flowedit", reference=REFERENCE, ref_runs=runs, cases=cases, retouch_methods={
            "flowedit": "retouch's preset (FLUX_exp.yaml settings): source and target in one batch of 2 per step "
                        "instead of two calls of 1; retouch seeds its own generator with the run's seed "
                        "(the reference seeds torch's global one with 10)",
        })  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
