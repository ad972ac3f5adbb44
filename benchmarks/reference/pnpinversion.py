"""Golden outputs of PnPInversion (cure-lab/PnPInversion, Ju et al. ICLR 2024) on the embedded shapes-sd model.

    .venv/bin/pip install einops            # MasaCtrl's code imports it (no torchvision needed: see the edits)
    .venv/bin/python benchmarks/reference/pnpinversion.py --git-dir /path/to/PnPInversion[.git] \\
        [--methods directinversion+p2p,ddim+p2p,directinversion+masactrl,ddim+masactrl,directinversion+pnp,\\
                   directinversion+pix2pix-zero]

The reference is exported from ``--git-dir`` at ``COMMIT`` into a scratch folder, the plumbing edits of ``EDITS``
(each with its reason) are applied, and its own entry points run as ``run_editing_p2p.py`` and
``run_editing_masactrl.py`` / ``run_editing_pnp.py`` call them (PIE-Bench settings: 50 DDIM steps, CFG 7.5,
cross 0.4 / self 0.6, local blend on the blended words with a reweight of 2 on the target word; MasaCtrl step 4,
layer 10, "" as the source prompt; PnP features for 80% and self-attention Q/K for 50% of the steps, the source
branch under "" without guidance, the target's negative prompt ``PNP_NEGATIVE``; Pix2Pix-Zero with guidance 0.1
and the source prompt as BLIP's caption) on the ShapesWorld cases of ``sd_common.CASES``. Outputs:
``tests/fixtures/reference/pnpinversion/
<method>/<case>.safetensors`` (inverted noise ``x_T``, final latents of both branches, the target branch after
the steps of ``STEPS_KEPT``), ``<case>.png`` (the edited panel) and ``settings.json`` (commit, edits, settings,
cases, denoiser calls / batch items, seconds).

Recording is done by pass-through wrappers around the reference's own functions (they return what they got).
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sd_common as sc  # noqa: E402

REPO = "cure-lab/PnPInversion"
COMMIT = "07f97f448150e2ca220bebd54c8f687c5c50c67a"
FILES = [
    "models/p2p_editor.py",
    "models/p2p",
    "models/masactrl",
    "utils/utils.py",
    "run_editing_masactrl.py",
    "run_editing_pnp.py",
    "run_editing_pix2pix_zero.py",
    "models/pix2pix_zero",
]
METHODS = (
    "directinversion+p2p",
    "ddim+p2p",
    "directinversion+masactrl",
    "ddim+masactrl",
    "directinversion+pnp",
    "directinversion+pix2pix-zero",
)
# PnP's negative prompt for the target branch (run_editing_pnp.py's run_pnp), recorded in the settings
PNP_NEGATIVE = "ugly, blurry, black, low res, unrealistic"


def edits(latent: int, vae_factor: int, scale: float) -> list[sc.Edit]:
    """The plumbing edits for diffusers 0.42.1, the shapes-sd folder and 64-px images on CPU.

    ``latent``: latent side L (16); resolution constants are the scale-equivalent ones (the 512-px constants
    encode UNet levels: 32**2 = (L/2)^2, 16 = L/4, 64 = L)."""
    model = '__import__("os").environ["RETOUCH_SHAPES_SD"]'
    fp32 = 'torch_dtype=__import__("torch").float32'
    q = "(L//2)**2".replace("L", str(latent))
    return [
        # --- P2P attention hook (models/p2p/attention_control.py) -----------------------------------------------
        sc.Edit("models/p2p/attention_control.py", "def forward(x, context=None, mask=None, **kwargs):",
                "def forward(x, encoder_hidden_states=None, attention_mask=None, context=None, mask=None, **kwargs):\n"
                "            context = encoder_hidden_states if encoder_hidden_states is not None else context\n"
                "            mask = attention_mask if attention_mask is not None else mask",
                "diffusers >= 0.12 passes the text as encoder_hidden_states= (the shim the same repo uses in "
                "models/masactrl/masactrl_utils.py); without it cross-attention would run as self-attention"),
        sc.Edit("models/p2p/attention_control.py", "self.reshape_heads_to_batch_dim(", "self.head_to_batch_dim(",
                "renamed in diffusers (same math)", count=3),
        sc.Edit("models/p2p/attention_control.py", "self.reshape_batch_dim_to_heads(", "self.batch_to_head_dim(",
                "renamed in diffusers (same math)"),
        sc.Edit("models/p2p/attention_control.py", "if net_.__class__.__name__ == 'CrossAttention':",
                "if net_.__class__.__name__ in ('CrossAttention', 'Attention'):",
                "the class is called Attention in diffusers >= 0.15; otherwise nothing is hooked (silent no-op)"),
        sc.Edit("models/p2p/attention_control.py", "LATENT_SIZE = (64, 64)", f"LATENT_SIZE = ({latent}, {latent})",
                "the latent side at 64 px (local blend upsamples its mask to the latent)"),
        sc.Edit("models/p2p/attention_control.py", "-1, 1, 16, 16, MAX_NUM_WORDS)",
                f"-1, 1, {latent // 4}, {latent // 4}, MAX_NUM_WORDS)",
                "local blend's maps are the L/4 level's (16 at 512 px); scale-equivalent constant"),
        sc.Edit("models/p2p/attention_control.py", "<= 32 ** 2", f"<= {q}",
                "'below the full-resolution level' is (L/2)^2 tokens (32^2 at 512 px); scale-equivalent constant",
                count=2),
        sc.Edit("models/p2p/attention_control.py", 'device="cuda"', 'device="cpu"',
                "make_controller does not pass its device on; CPU torch", count=6),
        # --- sizes, VAE scale, text panel (utils/utils.py, p2p_guidance_forward.py) ---------------------------
        sc.Edit("models/p2p/p2p_guidance_forward.py", "height = width = 512", "height = width = 64",
                "64-px images", count=4),
        sc.Edit("utils/utils.py", ".resize((512, 512))", ".resize((64, 64))", "64-px images (a no-op on 64-px input)"),
        sc.Edit("utils/utils.py", "height // 8, width // 8", f"height // {vae_factor}, width // {vae_factor}",
                "the shapes VAE downsamples 4x, not 8x", count=2),
        sc.Edit("utils/utils.py", "0.18215", repr(scale), "the folder's vae.config.scaling_factor", count=2),
        sc.Edit("utils/utils.py", "import matplotlib.pyplot as plt\nfrom matplotlib.backends.backend_agg import "
                "FigureCanvasAgg\n", "", "used only by txt_draw (the decorative text panel, stubbed below)"),
        sc.Edit("utils/utils.py", "    plt.figure(dpi=300,figsize=(1,1))",
                "    return np.full((64, 64, 3), 255, np.uint8)\n    plt.figure(dpi=300,figsize=(1,1))",
                "text panel: Image.ANTIALIAS is gone in Pillow 10 and the panel is 512 px (decorative only)"),
        sc.Edit("models/p2p_editor.py", '"CompVis/stable-diffusion-v1-4"', model, "the local shapes-sd folder"),
        sc.Edit("models/p2p_editor.py", "scheduler=self.scheduler).to(device)",
                f"scheduler=self.scheduler, {fp32}).to(device)",
                "the embedded folder stores fp16 weights; CPU runs them in fp32 (as retouch does)"),
        # --- MasaCtrl ---------------------------------------------------------------------------------------------
        sc.Edit("run_editing_masactrl.py", '"CompVis/stable-diffusion-v1-4"', model, "the local shapes-sd folder"),
        sc.Edit("run_editing_masactrl.py", "scheduler=self.scheduler).to(device)",
                f"scheduler=self.scheduler, {fp32}).to(device)", "fp16 folder, fp32 on CPU"),
        sc.Edit("run_editing_masactrl.py", "from torchvision.io import read_image\n",
                "def read_image(path):\n"
                "    from PIL import Image\n"
                "    return torch.from_numpy(np.array(Image.open(path).convert('RGB'))).permute(2, 0, 1)\n",
                "torchvision does not import beside torch 2.13 CPU: read_image of an RGB PNG as uint8 CHW"),
        sc.Edit("run_editing_masactrl.py", "F.interpolate(image, (512, 512))", "F.interpolate(image, (64, 64))",
                "64-px images (a no-op on 64-px input)"),
        sc.Edit("models/masactrl/diffuser_utils.py", "height=512,\n        width=512,",
                "height=64,\n        width=64,", "64-px images"),
        sc.Edit("models/masactrl/diffuser_utils.py", "height//8, width//8",
                f"height//{vae_factor}, width//{vae_factor}", "the shapes VAE downsamples 4x"),
        sc.Edit("models/masactrl/diffuser_utils.py", "0.18215", repr(scale), "the folder's scaling_factor", count=3),
        sc.Edit("models/masactrl/masactrl_utils.py", "import cv2\n", "", "unused import"),
        sc.Edit("models/masactrl/masactrl_utils.py", "from torchvision.utils import save_image\n", "",
                "unused here (mask-saving variants only); torchvision does not import beside torch 2.13 CPU"),
        sc.Edit("models/masactrl/masactrl.py", "from torchvision.utils import save_image\n", "",
                "unused here (mask-saving variants only)"),
        # --- Plug-and-Play (run_editing_pnp.py) -------------------------------------------------------------------
        sc.Edit("run_editing_pnp.py", "import torchvision.transforms as T\n",
                "class T:  # torchvision.transforms shim (torchvision does not import beside torch 2.13 CPU)\n"
                "    @staticmethod\n"
                "    def Resize(size):\n"
                "        return lambda im: im if im.size == (size, size) else im.resize((size, size))\n"
                "    @staticmethod\n"
                "    def ToTensor():\n"
                "        return lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float().div(255)\n",
                "torchvision does not import beside torch 2.13 CPU: ToTensor of an RGB image (uint8 HWC -> float CHW "
                "/ 255, its definition) and Resize (a no-op on the square 64-px inputs)"),
        sc.Edit("run_editing_pnp.py", "T.Resize(512)", "T.Resize(64)", "64-px images (a no-op on 64-px input)"),
        sc.Edit("run_editing_pnp.py", "image.resize((512, 512),", "image.resize((64, 64),",
                "64-px images (get_data's image is unused by the edit)"),
        sc.Edit("run_editing_pnp.py", "0.18215", repr(scale), "the folder's vae.config.scaling_factor", count=3),
        sc.Edit("run_editing_pnp.py", "torch_dtype=torch.float16", "torch_dtype=torch.float32",
                "the embedded folder stores fp16 weights; CPU runs them in fp32 (as retouch does)", count=4),
        sc.Edit("run_editing_pnp.py", 'revision="fp16",', "",
                "a local folder has no fp16 revision branch (the weights are the same)", count=2),
        sc.Edit("run_editing_pnp.py", 'def get_text_embeds(self, prompt, negative_prompt, device="cuda"):',
                'def get_text_embeds(self, prompt, negative_prompt, device="cpu"):', "CPU torch"),
        sc.Edit("run_editing_pnp.py", 'def __init__(self, model_key,n_timesteps=NUM_DDIM_STEPS,device="cuda"):',
                'def __init__(self, model_key,n_timesteps=NUM_DDIM_STEPS,device="cpu"):', "CPU torch"),
        sc.Edit("run_editing_pnp.py", '.to("cuda")\n        pipe.enable_xformers_memory_efficient_attention()',
                '.to("cpu")',
                "CPU torch, no xformers: the layers PnP does not patch run diffusers' default attention (same math)"),
        sc.Edit("run_editing_pnp.py", 'enumerate(self.scheduler.timesteps, desc="Sampling")',
                "enumerate(self.scheduler.timesteps)",
                "a bug of the released file: enumerate() takes no desc= (TypeError); upstream PnP wraps it in tqdm"),
        sc.Edit("run_editing_pnp.py", 'model_key = "runwayml/stable-diffusion-v1-5"', f"model_key = {model}",
                "the local shapes-sd folder"),
        # --- Pix2Pix-Zero (run_editing_pix2pix_zero.py, models/pix2pix_zero/) -----------------------------------
        sc.Edit("run_editing_pix2pix_zero.py", "from lavis.models import load_model_and_preprocess\n", "",
                "BLIP captioning (LAVIS, its weights) is unavailable offline; the source prompt is the caption"),
        sc.Edit("run_editing_pix2pix_zero.py", "# load the BLIP model\nmodel_blip, vis_processors, _ = "
                "load_model_and_preprocess(name=\"blip_caption\", \n",
                "if False:\n  _ = dict(name=\"blip_caption\", \n", "no BLIP model (see above)"),
        sc.Edit("run_editing_pix2pix_zero.py",
                'prompt_str = model_blip.generate({"image": vis_processors["eval"](image_gt)'
                '.unsqueeze(0).to(device)})[0]',
                "prompt_str = prompt_src", "the source prompt plays BLIP's caption (ShapesWorld prompts are captions)",
                count=2),
        sc.Edit("run_editing_pix2pix_zero.py", "'CompVis/stable-diffusion-v1-4')", f"{model}, {fp32})",
                "the local shapes-sd folder; it stores fp16 weights, CPU runs them in fp32 (as retouch does)",
                count=2),
        sc.Edit("run_editing_pix2pix_zero.py", "image_size=[512,512]", "image_size=[64,64]",
                "64-px images (a no-op resize on 64-px input)", count=2),
        sc.Edit("models/pix2pix_zero/base_pipeline.py", "from transformers import CLIPFeatureExtractor, CLIPTextModel",
                "from transformers import CLIPImageProcessor as CLIPFeatureExtractor, CLIPTextModel",
                "CLIPFeatureExtractor was renamed CLIPImageProcessor in transformers (type hint only here)"),
        sc.Edit("models/pix2pix_zero/base_pipeline.py", "logging, randn_tensor, replace_example_docstring",
                "logging, replace_example_docstring\nfrom diffusers.utils.torch_utils import randn_tensor",
                "randn_tensor moved to diffusers.utils.torch_utils (same function)"),
        sc.Edit("models/pix2pix_zero/base_pipeline.py", "0.18215", repr(scale), "the folder's scaling_factor"),
        sc.Edit("models/pix2pix_zero/scheduler.py", "from diffusers.utils import BaseOutput, randn_tensor",
                "from diffusers.utils import BaseOutput\nfrom diffusers.utils.torch_utils import randn_tensor",
                "randn_tensor moved to diffusers.utils.torch_utils (same function)"),
        sc.Edit("models/pix2pix_zero/ddim_inv.py", "0.18215", repr(scale), "the folder's scaling_factor"),
        sc.Edit("models/pix2pix_zero/cross_attention.py", "from diffusers.models.attention import CrossAttention",
                "from diffusers.models.attention_processor import Attention as CrossAttention",
                "the class is called Attention in diffusers >= 0.15"),
        sc.Edit("models/pix2pix_zero/cross_attention.py",
                "attn.prepare_attention_mask(attention_mask, sequence_length)",
                "attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)",
                "diffusers >= 0.13 takes the batch size too (the mask is None here: a no-op either way)"),
        sc.Edit("models/pix2pix_zero/cross_attention.py", 'if module_name == "CrossAttention":',
                'if module_name in ("CrossAttention", "Attention"):',
                "the class is called Attention in diffusers >= 0.15; otherwise no processor is set (silent no-op)"),
        sc.Edit("models/pix2pix_zero/edit_pipeline.py", 'if module_name == "CrossAttention" and',
                'if module_name in ("CrossAttention", "Attention") and',
                "the class is called Attention in diffusers >= 0.15; otherwise no map is read (no guidance)", count=2),
        sc.Edit("models/pix2pix_zero/edit_pipeline.py", "self.unet.in_channels", "self.unet.config.in_channels",
                "the attribute moved to the config in diffusers"),
    ]  # fmt: skip


def setup_seed(seed: int = 1234) -> None:
    """run_editing_p2p.py / run_editing_masactrl.py's setup_seed (CPU part)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Recorder:
    """Pass-through wrappers that keep the reference's intermediate values."""

    def __init__(self) -> None:
        self.steps: list[torch.Tensor] = []  # latents after each sampling step (as the reference holds them)
        self.noise: torch.Tensor | None = None
        self.decoded: list[torch.Tensor] = []

    def reset(self) -> None:
        self.__init__()


def wrap(obj: Any, name: str, after: Any) -> None:
    fn = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        after(out, *args, **kwargs)
        return out

    setattr(obj, name, wrapper)


class SumCounter:
    """Several counters read as one (PnP's inversion and edit run on two separately loaded UNets)."""

    def __init__(self, *counters: sc.Counter) -> None:
        self.counters = counters

    @property
    def calls(self) -> int:
        return sum(c.calls for c in self.counters)

    @property
    def items(self) -> int:
        return sum(c.items for c in self.counters)

    def reset(self) -> None:
        for c in self.counters:
            c.reset()


def run(git_dir: str, methods: list[str], out_root: Path) -> None:
    sc.setup()
    folder = sc.shapes_sd_folder()
    latent = sc.latent_side(folder)
    vae_factor = 64 // latent
    scale = sc.scaling_factor(folder)
    scratch = Path(tempfile.mkdtemp(prefix="pnpinversion-"))
    sc.export(git_dir, COMMIT, FILES, scratch)
    applied = sc.apply_edits(scratch, edits(latent, vae_factor, scale))
    import os

    os.environ["RETOUCH_SHAPES_SD"] = str(folder)
    sys.path.insert(0, str(scratch))
    rec = Recorder()

    p2p_methods = [m for m in methods if m.endswith("+p2p")]
    masa_methods = [m for m in methods if m.endswith("+masactrl")]
    runners: list[tuple[str, Any, Any]] = []
    if p2p_methods:
        pe = importlib.import_module("models.p2p_editor")
        fwd = importlib.import_module("models.p2p.p2p_guidance_forward")
        inv = importlib.import_module("models.p2p.inversion")
        for fn in ("p2p_guidance_diffusion_step", "direct_inversion_p2p_guidance_diffusion_step"):
            wrap(fwd, fn, lambda out, *a, **k: rec.steps.append(out.detach().clone()))
        for cls in (inv.NullInversion, inv.DirectInversion):
            wrap(cls, "invert", lambda out, *a, **k: setattr(rec, "noise", out[2][-1].detach().clone()))

        def keep_decoded(out: Any, *a: Any, **k: Any) -> None:
            rec.decoded.append((k["latents"] if "latents" in k else a[-1]).detach().clone())

        wrap(pe, "latent2image", keep_decoded)
        editor = pe.P2PEditor(p2p_methods, torch.device("cpu"), num_ddim_steps=50)
        counter = sc.Counter(editor.ldm_stable.unet)

        def p2p_call(method: str, path: str, case: Any) -> Any:
            w = case.blended_words
            return editor(
                method, image_path=path, prompt_src=case.source_prompt, prompt_tar=case.target_prompt,
                guidance_scale=7.5, cross_replace_steps=0.4, self_replace_steps=0.6,
                blend_word=((w[0],), (w[1],)) if w else None,
                eq_params={"words": (w[1],), "values": (2,)} if w else None,
                proximal="l0", quantile=0.75, use_inversion_guidance=True, recon_lr=1, recon_t=400,
            )  # fmt: skip

        runners += [(m, p2p_call, counter) for m in p2p_methods]
    if masa_methods:
        rm = importlib.import_module("run_editing_masactrl")
        du = importlib.import_module("models.masactrl.diffuser_utils")
        inv = importlib.import_module("models.p2p.inversion")
        wrap(inv.DirectInversion, "invert", lambda out, *a, **k: setattr(rec, "noise", out[2][-1].detach().clone()))
        wrap(du.MasaCtrlPipeline, "step", lambda out, *a, **k: rec.steps.append(out[0].detach().clone()))
        wrap(du.MasaCtrlPipeline, "invert", lambda out, *a, **k: setattr(rec, "noise", out[0].detach().clone()))
        wrap(du.MasaCtrlPipeline, "latent2image", lambda out, *a, **k: rec.decoded.append(a[1].detach().clone()))
        meditor = rm.MasaCtrlEditor(masa_methods, torch.device("cpu"))
        mcounter = sc.Counter(meditor.model.unet)

        def masa_call(method: str, path: str, case: Any) -> Any:
            return meditor(method, path, case.source_prompt, case.target_prompt, 7.5, step=4, layper=10)

        runners += [(m, masa_call, mcounter) for m in masa_methods]

    pnp_methods = [m for m in methods if m.endswith("+pnp")]
    if pnp_methods:
        # importing run_editing_pnp.py builds its two models (Preprocess for the inversion, PNP for the edit)
        rp = importlib.import_module("run_editing_pnp")
        wrap(rp.PNP, "denoise_step", lambda out, *a, **k: rec.steps.append(out.detach().clone()))
        wrap(rp.Preprocess, "extract_latents", lambda out, *a, **k: setattr(rec, "noise", out[0][-1].detach().clone()))
        wrap(rp.PNP, "decode_latent", lambda out, *a, **k: rec.decoded.append(a[1].detach().clone()))
        pcounter = SumCounter(sc.Counter(rp.model.unet), sc.Counter(rp.pnp.unet))

        def pnp_call(method: str, path: str, case: Any) -> Any:
            return rp.edit_image_directinversion_PnP(path, case.source_prompt, case.target_prompt, guidance_scale=7.5)

        runners += [(m, pnp_call, pcounter) for m in pnp_methods]
    zero_methods = [m for m in methods if m.endswith("+pix2pix-zero")]
    if zero_methods:
        # importing run_editing_pix2pix_zero.py builds its inversion pipeline and its editing pipeline
        rz = importlib.import_module("run_editing_pix2pix_zero")
        di = importlib.import_module("models.pix2pix_zero.ddim_inv")
        ep = importlib.import_module("models.pix2pix_zero.edit_pipeline")
        wrap(di.DDIMInversion, "__call__", lambda out, *a, **k: setattr(rec, "noise", out[0][-1].detach().clone()))
        wrap(ep.EditingPipeline, "decode_latents", lambda out, *a, **k: rec.decoded.append(a[1].detach().clone()))
        zcounter = SumCounter(sc.Counter(rz.pipe.unet), sc.Counter(rz.edit_pipe.unet))

        def zero_call(method: str, path: str, case: Any) -> Any:
            return rz.edit_image_directinversion_pix2pix_zero(path, case.source_prompt, case.target_prompt, 7.5)

        runners += [(m, zero_call, zcounter) for m in zero_methods]

    cases = sc.case_list()
    with tempfile.TemporaryDirectory() as tmp:
        for method, call, counter in runners:
            out_dir = out_root / method
            out_dir.mkdir(parents=True, exist_ok=True)
            per_case = []
            for case in cases:
                path = str(Path(tmp) / f"{case.case_id}.png")
                sc.write_image(Path(path), case.source_image)
                rec.reset()
                counter.reset()
                setup_seed(1234)
                panel, seconds = sc.timed(lambda: call(method, path, case))  # noqa: B023
                image = np.asarray(panel)[:, 192:256]  # the edited panel (4th of 4)
                final = rec.decoded[-1]
                # the last 50 recorded steps are the edit pass (earlier ones: reconstruction / image_fixed passes)
                steps = rec.steps[-50:]
                tensors = {"noise": rec.noise, "final": final}
                if steps:  # Pix2Pix-Zero's loop is not a function of its own: no per-step latents
                    tensors.update({f"step_{k}": steps[k][-1:] for k in sc.STEPS_KEPT})
                sc.write_tensors(out_dir / f"{case.case_id}.safetensors", tensors)
                sc.write_image(out_dir / f"{case.case_id}.png", image)
                per_case.append({**sc.case_info(case), "seconds": round(seconds, 3), "unet_calls": counter.calls,
                                 "unet_items": counter.items})  # fmt: skip
                print(f"{method} {case.case_id}: {seconds:.1f}s, {counter.calls} calls / {counter.items} items")
            settings = {
                "reference": f"{REPO}@{COMMIT}",
                "method": method,
                "model": "shapes-sd (embedded)",
                "num_steps": 50,
                "guidance": 7.5,
                "settings": (
                    {
                        "cross_replace_steps": 0.4,
                        "self_replace_steps": 0.6,
                        "blend_word": "case.blended_word",
                        "eq_params": {"words": "target blended word", "values": [2]},
                        "is_replace_controller": False,
                    }
                    if method.endswith("+p2p")
                    else {"step": 4, "layper": 10, "source_branch_prompt": ""}
                    if method.endswith("+masactrl")
                    else {
                        "xa_guidance": 0.1,
                        "caption": "source prompt (no BLIP)",
                        "negative_prompt": "caption",
                        "inversion_guidance": 1,
                        "lambda_ac": 20,
                        "lambda_kl": 20,
                        "num_reg_steps": 5,
                        "num_ac_rolls": 5,
                        "vae": "posterior sample (torch's global generator)",
                    }
                    if method.endswith("+pix2pix-zero")
                    else {
                        "pnp_f_t": 0.8,
                        "pnp_attn_t": 0.5,
                        "source_branch_prompt": "",
                        "source_branch_guidance": 1.0,
                        "negative_prompt": PNP_NEGATIVE,
                        "inversion_prompt": "source",
                    }
                ),  # fmt: skip
                "seed": 1234,
                "steps_kept": list(sc.STEPS_KEPT) if rec.steps else [],
                "latent_side": latent,
                "edits": applied,
                "cases": per_case,
                "torch": torch.__version__,
                "diffusers": importlib.import_module("diffusers").__version__,
            }
            sc.write_json(out_dir / "settings.json", settings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--git-dir", required=True, help=f"a git directory holding {REPO} at {COMMIT}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(sc.FIXTURES / "pnpinversion"))
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    run(args.git_dir, methods, Path(args.out))


if __name__ == "__main__":
    main()
