"""Golden outputs of diffusers' community null-text inversion pipeline on the embedded shapes-sd model.

    .venv/bin/python benchmarks/reference/null_text_community.py --git-dir /path/to/diffusers[.git] [--steps 10]

``examples/community/pipeline_null_text_inversion.py`` (``NullTextPipeline``) is exported from ``--git-dir`` at
``COMMIT`` into a scratch folder and patched with ``EDITS``. Per ShapesWorld case of ``sd_common.CASES``:
``invert(image, source, num_inner_steps=10, early_stop_epsilon=1e-5)`` (its README's values), then the pipeline's
own sampling with the optimised per-step null embeddings, once with the target prompt (its edit: a prompt swap,
no attention control) and once with the source prompt (the reconstruction). Fewer steps than the README's 50
keep the CPU cost of the optimisation bounded (``--steps``, recorded). Fixtures under
``tests/fixtures/reference/null_text_community/``: ``<case>.safetensors`` (``noise``, the null embeddings of a
few steps, final latents of the edit and of the reconstruction), ``<case>.png`` (the edit) and ``settings.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd_common as sc  # noqa: E402

REPO = "huggingface/diffusers"
COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"  # the file's last change is d184291 (2024-01-05)
FILE = "examples/community/pipeline_null_text_inversion.py"


def edits(scale: float) -> list[sc.Edit]:
    return [
        sc.Edit(FILE, "latents = latents * 0.18215", f"latents = latents * {scale!r}",
                "the folder's vae.config.scaling_factor (SD 1.x's 0.18215 is hard-coded)"),
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--git-dir", required=True, help=f"a git directory holding {REPO} at {COMMIT}")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=str(sc.FIXTURES / "null_text_community"))
    args = ap.parse_args()
    sc.setup()
    from diffusers import DDIMScheduler

    folder = sc.shapes_sd_folder()
    scratch = Path(tempfile.mkdtemp(prefix="nulltext-"))
    sc.export(args.git_dir, COMMIT, [FILE], scratch)
    applied = sc.apply_edits(scratch, edits(sc.scaling_factor(folder)))
    spec = importlib.util.spec_from_file_location("pipeline_null_text_inversion", scratch / FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe = mod.NullTextPipeline.from_pretrained(folder, scheduler=scheduler, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    counter = sc.Counter(pipe.unet)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kept = sorted({0, args.steps // 2, args.steps - 1})
    per_case = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in sc.case_list():
            path = Path(tmp) / f"{case.case_id}.png"  # a fresh path: no stale <image>.pt cache
            sc.write_image(path, case.source_image)
            counter.reset()
            torch.manual_seed(0)

            def run(case=case, path=path):  # the timed edit: invert + sample under the target prompt
                x_t, unc = pipe.invert(str(path), case.source_prompt, num_inner_steps=10, early_stop_epsilon=1e-5,
                                       num_inference_steps=args.steps)  # fmt: skip
                edit = pipe(case.target_prompt, unc, x_t, num_inference_steps=args.steps, guidance_scale=7.5,
                            output_type="latent").images  # fmt: skip
                return x_t, unc, edit

            (x_t, unc, edit), seconds = sc.timed(run)
            calls = counter.calls
            recon = pipe(case.source_prompt, unc, x_t, num_inference_steps=args.steps, guidance_scale=7.5,
                         output_type="latent").images  # fmt: skip
            with torch.no_grad():
                image = pipe.vae.decode(edit / pipe.vae.config.scaling_factor).sample
            image = ((image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            tensors = {"noise": x_t, "final_target": edit, "final_source": recon}
            tensors.update({f"null_{k}": unc[k] for k in kept})
            sc.write_tensors(out / f"{case.case_id}.safetensors", tensors)
            sc.write_image(out / f"{case.case_id}.png", np.ascontiguousarray(image))
            per_case.append({**sc.case_info(case), "seconds": round(seconds, 3), "unet_calls": calls})
            print(f"null-text {case.case_id}: {seconds:.1f}s, {calls} UNet calls")
    sc.write_json(out / "settings.json", {
        "reference": f"{REPO}@{COMMIT}:{FILE}",
        "method": "null-text inversion + prompt swap",
        "model": "shapes-sd (embedded)",
        "num_steps": args.steps,
        "guidance": 7.5,
        "settings": {"num_inner_steps": 10, "early_stop_epsilon": 1e-5, "lr": "1e-2 * (1 - i / 100)"},
        "null_steps_kept": kept,
        "edits": applied,
        "cases": per_case,
        "torch": torch.__version__,
        "diffusers": importlib.import_module("diffusers").__version__,
    })  # fmt: skip


if __name__ == "__main__":
    main()
