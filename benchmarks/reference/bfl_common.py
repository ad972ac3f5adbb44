"""Running RF-Solver-Edit's and FireFlow's official code (Black Forest Labs' ``flux`` package layout) on shapes-flux.

Their model code is BFL's ``Flux`` module, not diffusers'. It *can* run our weights: shapes-flux is a
``FluxTransformer2DModel`` whose parameters map one to one onto BFL's modules (the inverse of diffusers'
``convert_flux_to_diffusers.py``: q/k/v concatenated into ``qkv`` / ``linear1``, the final norm's scale and shift
swapped). So the references run *their* transformer, *their* sampling loops and *their* feature-injection code.
Plumbing that is not theirs:

* text conditioning: their ``HFEmbedder`` loads a hub T5 (512 tokens) and CLIP; we hand their ``prepare`` two
  callables over the diffusers pipeline's own encoders (T5 at shapes-flux's 64 tokens, CLIP pooled output), the
  same computation on our local weights;
* the autoencoder: theirs is BFL's ``AutoEncoder``; we use shapes-flux's ``AutoencoderKL`` with the same
  arithmetic as their ``encode`` / ``decode`` (a posterior *sample*, then ``(z - shift) * scale``; decode
  ``z / scale + shift``), seeded;
* fp32 on CPU instead of bf16 on GPU (their ``encode`` casts the latent to bf16 and decodes under bf16 autocast).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flow_common as C
import numpy as np
import torch


def convert_weights(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """diffusers ``FluxTransformer2DModel`` state dict -> BFL ``Flux`` state dict."""
    sd = transformer.state_dict()
    out: dict[str, torch.Tensor] = {}

    def lin(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        if f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def cat(dst: str, srcs: Sequence[str]) -> None:
        out[f"{dst}.weight"] = torch.cat([sd[f"{s}.weight"] for s in srcs])
        out[f"{dst}.bias"] = torch.cat([sd[f"{s}.bias"] for s in srcs])

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    for bfl, dif in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder"),
                     ("vector_in", "text_embedder")):  # fmt: skip
        lin(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
        lin(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for i in range(len(transformer.transformer_blocks)):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        lin(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        cat(f"{d}.img_attn.qkv", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"])
        cat(f"{d}.txt_attn.qkv", [f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"])
        out[f"{d}.img_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.img_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
        out[f"{d}.txt_attn.norm.query_norm.scale"] = sd[f"{s}.attn.norm_added_q.weight"]
        out[f"{d}.txt_attn.norm.key_norm.scale"] = sd[f"{s}.attn.norm_added_k.weight"]
        lin(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        lin(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        lin(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        lin(f"{d}.img_mlp.2", f"{s}.ff.net.2")
        lin(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        lin(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")
    for i in range(len(transformer.single_transformer_blocks)):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        lin(f"{d}.modulation.lin", f"{s}.norm.linear")
        cat(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        lin(f"{d}.linear2", f"{s}.proj_out")
        out[f"{d}.norm.query_norm.scale"] = sd[f"{s}.attn.norm_q.weight"]
        out[f"{d}.norm.key_norm.scale"] = sd[f"{s}.attn.norm_k.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    scale_b, shift_b = sd["norm_out.linear.bias"].chunk(2)
    out["final_layer.adaLN_modulation.1.bias"] = torch.cat([shift_b, scale_b])
    lin("final_layer.linear", "proj_out")
    return out


def bfl_model(pipe: Any) -> torch.nn.Module:
    """Their ``flux.model.Flux`` with shapes-flux's weights (strict load: every parameter mapped)."""
    from flux.model import Flux, FluxParams

    tr = pipe.transformer
    c = tr.config
    hidden = c.num_attention_heads * c.attention_head_dim
    params = FluxParams(
        in_channels=c.in_channels, vec_in_dim=c.pooled_projection_dim, context_in_dim=c.joint_attention_dim,
        hidden_size=hidden, mlp_ratio=tr.single_transformer_blocks[0].proj_mlp.out_features / hidden,
        num_heads=c.num_attention_heads, depth=c.num_layers, depth_single_blocks=c.num_single_layers,
        axes_dim=list(c.axes_dims_rope), theta=10_000, qkv_bias=True, guidance_embed=c.guidance_embeds,
    )  # fmt: skip
    model = Flux(params).float().eval()
    model.load_state_dict(convert_weights(tr), strict=True)
    return model


def check_model(model: torch.nn.Module, pipe: Any) -> float:
    """Max |BFL(x) - diffusers(x)| on a random input: their transformer on our weights is the same function."""
    from flux.sampling import prepare

    t5, clip = encoders(pipe)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, pipe.vae.config.latent_channels, 16, 16, generator=g)
    inp = prepare(t5, clip, lat, prompt="a red circle on a blue background")
    t = torch.full((1,), 0.6)
    gd = torch.full((1,), 2.0)
    with torch.no_grad():
        ours = model(img=inp["img"], img_ids=inp["img_ids"], txt=inp["txt"], txt_ids=inp["txt_ids"], y=inp["vec"],
                     timesteps=t, guidance=gd, info={"inject": False, "id": 0, "type": ""})[0]  # fmt: skip
        ref = pipe.transformer(hidden_states=inp["img"], timestep=t, guidance=gd, pooled_projections=inp["vec"],
                               encoder_hidden_states=inp["txt"], txt_ids=inp["txt_ids"][0], img_ids=inp["img_ids"][0],
                               return_dict=False)[0]  # fmt: skip
    return float((ours - ref).abs().max())


def encoders(pipe: Any, max_sequence_length: int = 64) -> tuple[Any, Any]:
    """Stand-ins for their HFEmbedder(T5) and HFEmbedder(CLIP): prompts -> [B, L, D] / [B, D]."""

    def t5(prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return pipe._get_t5_prompt_embeds(prompt=prompts, max_sequence_length=max_sequence_length, device="cpu")

    def clip(prompts: str | list[str]) -> torch.Tensor:
        prompts = [prompts] if isinstance(prompts, str) else prompts
        return pipe._get_clip_prompt_embeds(prompt=prompts, device="cpu")

    return t5, clip


def encode(pipe: Any, image: np.ndarray, seed: int) -> torch.Tensor:
    """Their ``encode``: pixels in [-1, 1] -> posterior sample -> ``(z - shift) * scale`` (seeded, fp32)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 127.5 - 1
    torch.manual_seed(seed)
    vae = pipe.vae
    z = vae.encode(x).latent_dist.sample()
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


def decode(pipe: Any, latent: torch.Tensor) -> np.ndarray:
    vae = pipe.vae
    x = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    return (127.5 * (x[0].permute(1, 2, 0) + 1.0)).to(torch.uint8).numpy()  # as their edit.py: byte() truncates


class EvalRecorder:
    """Forward pre-hook on their model: the latent tokens and timestep of every evaluation (changes nothing)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inputs: list[torch.Tensor] = []
        self.times: list[float] = []
        self._h = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.inputs.append(kwargs["img"].detach().clone())
        self.times.append(float(kwargs["timesteps"][0]))

    def remove(self) -> None:
        self._h.remove()


def run(
    *,
    denoise_name: str,
    model: torch.nn.Module,
    pipe: Any,
    case: Any,
    num_steps: int,
    guidance: float,
    info_settings: dict[str, Any],
    seed: int = 0,
    keep_evals: Sequence[int] = (),
) -> dict[str, Any]:
    """Their edit.py ``main`` for one case: encode, prepare, schedule, invert (guidance 1), sample, unpack, decode."""
    sampling = importlib.import_module("flux.sampling")
    denoise = getattr(sampling, denoise_name)
    t5, clip = encoders(pipe)
    data = case.load()
    rec = EvalRecorder(model)
    counter = C.CallCounter(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        init = encode(pipe, data.source_image, seed)
        info: dict[str, Any] = {"feature_path": "unused", "feature": {}, **info_settings}
        inp = sampling.prepare(t5, clip, init, prompt=case.source_prompt)
        inp_target = sampling.prepare(t5, clip, init, prompt=case.target_prompt)
        timesteps = sampling.get_schedule(num_steps, inp["img"].shape[1], shift=True)
        z, info = denoise(model, **inp, timesteps=timesteps, guidance=1, inverse=True, info=info)
        n_inv = len(rec.inputs)
        inp_target["img"] = z
        timesteps = sampling.get_schedule(num_steps, inp_target["img"].shape[1], shift=True)
        x, _ = denoise(model, **inp_target, timesteps=timesteps, guidance=guidance, inverse=False, info=info)
        h, w = data.source_image.shape[:2]
        final = sampling.unpack(x.float(), w, h)
        image = decode(pipe, final)
    seconds = time.perf_counter() - t0
    rec.remove()
    counter.remove()
    tensors = {
        "init_latent": init,
        "inverted": sampling.unpack(z.float(), w, h),
        "final_latent": final,
        "image": torch.from_numpy(image),
    }
    for k in keep_evals:
        tensors[f"eval.{k}"] = rec.inputs[k]
    return {
        "tensors": tensors,
        "image": image,
        "seconds": seconds,
        "nfe": counter.calls,
        "items": counter.items,
        "inversion_evals": n_inv,
        "eval_times": rec.times,
        "stored_features": sorted(info["feature"]),
    }


def load(checkout_src: Path) -> tuple[Any, torch.nn.Module]:
    from diffusers import FluxPipeline

    C.import_path(checkout_src)
    pipe = FluxPipeline.from_pretrained(str(C.flux_folder()), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, bfl_model(pipe)


def retouch_run(case: Any, method: str, *, latent: torch.Tensor | None = None, seed: int = 0) -> dict[str, Any]:
    """retouch's preset on one case (timed, with the denoiser's calls and batch items counted)."""
    from PIL import Image

    from retouch.config import EditConfig
    from retouch.editing import edit

    bb = retouch_backbone()
    data = case.load()
    counter = C.CallCounter(bb.denoiser)
    t0 = time.perf_counter()
    res = edit(bb, Image.fromarray(data.source_image), EditConfig(case.source_prompt, case.target_prompt,
               method=method, seed=seed), latent=latent, keep_latents=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    counter.remove()
    return {"image": C.to_uint8(res.image), "seconds": seconds, "nfe": counter.calls, "items": counter.items,
            "result": res}  # fmt: skip


_BACKBONE: list[Any] = []


def retouch_backbone() -> Any:
    if not _BACKBONE:
        from retouch.backbones import load_backbone

        _BACKBONE.append(load_backbone(C.FLUX, device="cpu", dtype="fp32"))
    return _BACKBONE[0]


def bench_rows(
    *,
    method_ref: str,
    reference: str,
    ref_runs: Sequence[dict[str, Any]],
    cases: Sequence[Any],
    retouch_methods: dict[str, str],
) -> None:
    """Score the reference's images and retouch's presets on the same cases; one results row per preset."""
    ref_score = C.score(cases, [r["image"] for r in ref_runs])
    ref = {**ref_score, "seconds": float(np.mean([r["seconds"] for r in ref_runs])),
           "nfe": ref_runs[0]["nfe"], "items": ref_runs[0]["items"]}  # fmt: skip
    for method, notes in retouch_methods.items():
        ours_runs = [retouch_run(c, method) for c in cases]
        ours_score = C.score(cases, [r["image"] for r in ours_runs])
        ours = {**ours_score, "seconds": float(np.mean([r["seconds"] for r in ours_runs])),
                "nfe": ours_runs[0]["nfe"], "items": ours_runs[0]["items"]}  # fmt: skip
        row = C.result_row(method=method, reference=reference, cases=cases, ref=ref, ours=ours, notes=notes)
        C.write_json(C.RESULTS / f"{method}.json", row)
        print(json.dumps({k: v for k, v in row.items() if k != "case_ids"}))
