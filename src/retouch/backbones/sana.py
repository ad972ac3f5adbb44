"""Sana (SanaTransformer2DModel + Gemma 2): linear self-attention, softmax cross-attention, DC-AE latents.

What differs from PixArt, the other cross-attention DiT:

* **Self-attention is linear** (ReLU kernel, Katharopoulos et al. 2020): ``out_i = Σ_j φ(q_i)·φ(k_j) v_j /
  Σ_j φ(q_i)·φ(k_j)`` with ``φ = ReLU``, computed as ``φ(Q)(φ(K)ᵀ V)`` without any ``N × N`` map. Those
  layers are ``LayerInfo(kind="self", linear=True)``. Editors that act on queries, keys and values apply
  there unchanged (P2P's self-attention copy, MasaCtrl's K/V injection, PnP's Q/K injection: all are
  ``edit_qkv``); an editor that asks for the softmax probabilities of such a layer is refused with an error by
  the engine (the layer has no softmax map; materialising the kernel map would make it quadratic). The
  cross-attention layers (``attn2``) are ordinary softmax attention over the Gemma tokens, so P2P's text-map
  rewrite, local blend, Pix2Pix-Zero's guidance and the attention recorder work as on PixArt.
* **Text**: Gemma 2 hidden states, 300 tokens padded on the right with an attention mask. The conditional
  prompt is prefixed with the pipeline's "complex human instruction" and the sequence cut to ``[bos, last
  299]``, which puts one instruction token (the instruction's last) between bos and the prompt: the prompt's
  tokens start at text position 2. Empty prompts are encoded as the pipeline encodes its negative prompt
  (no instruction), so classifier-free guidance matches the stock pipeline.
* **Latents**: DC-AE (``AutoencoderDC``, 32x, 32 channels, ``scaling_factor`` only, deterministic encoder),
  patch 1, no packing, learned 2D positions only through the convolutional feed-forward (no RoPE).
* **Grid**: Sana ships ``DPMSolverMultistepScheduler`` with ``use_flow_sigmas`` (flow sigmas shifted by
  ``flow_shift``; the model is told the integer ``int(1000 σ)``, multiplied by the transformer's
  ``timestep_scale``); the prediction is the flow velocity. Every flow solver walks that grid.
* **Guidance**: true classifier-free guidance. A transformer with a guidance embedding (``guidance_embeds``:
  Sana-Sprint, run by ``SanaSprintPipeline``'s consistency sampler, which is not an invertible ODE) is refused.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo, SizePolicy, TextSegment
from retouch.backbones.common import TransformerBackbone, numbered_blocks, parse_layer_names, sample_size_policy
from retouch.backbones.processors import RoutingProcessor, norm_qk, project_out, split_heads
from retouch.types import Conditioning, NoiseGrid, Prediction

_NAME = re.compile(r"^transformer_blocks\.(\d+)\.(attn\d)$")


class SanaLinearProcessor(RoutingProcessor):
    """For Sana's linear self-attention; mirrors diffusers 0.42.1 ``SanaLinearAttnProcessor2_0`` (projections,
    optional QK norm over the flat width) and hands ``[B, heads, N, d]`` queries, keys and values to ``attend``,
    which runs the ReLU-kernel attention for a ``linear`` layer. Token merging reduces the image tokens before
    the projections and unmerges after ``to_out``."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:  # fmt: skip
        original_dtype = hidden_states.dtype
        hidden_states, plan = self.merge(hidden_states, self.layer)  # [B, N', C]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = norm_qk(query, key, attn.norm_q, attn.norm_k)
        query, key, value = (split_heads(x, attn.heads, x.shape[-1] // attn.heads) for x in (query, key, value))
        out = self.attend(query, key, value, self.layer)  # [B, h, N, d]
        hidden_states = project_out(attn, out.transpose(1, 2).flatten(2, 3).to(original_dtype))
        if plan is not None:
            hidden_states = plan.unmerge(hidden_states)
        if original_dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


class SanaCrossProcessor(RoutingProcessor):
    """For Sana's softmax cross-attention; mirrors diffusers 0.42.1 ``SanaAttnProcessor2_0`` (QK norm, when
    present, over the flat width before the head split) and routes the product through ``attend``. Text keys:
    token merging does not apply."""

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:  # fmt: skip
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b, n_ctx, _ = context.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, n_ctx, b)
            attention_mask = attention_mask.view(b, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        query, key = norm_qk(query, key, attn.norm_q, attn.norm_k)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (split_heads(x, attn.heads, head_dim) for x in (query, key, value))  # [B, h, N|T, d]
        out = self.attend(query, key, value, self.layer, attn_mask=attention_mask)
        hidden_states = out.transpose(1, 2).reshape(b, -1, attn.heads * head_dim).to(query.dtype)
        return project_out(attn, hidden_states) / attn.rescale_output_factor


class SanaBackbone(TransformerBackbone):
    family = "sana"
    prediction = Prediction.FLOW
    default_solver = "dpmpp"
    default_guidance = 4.5
    default_steps = 20
    max_sequence_length = 300

    def __init__(self, pipe: Any, *, name: str | None = None) -> None:
        super().__init__(pipe, name=name)
        if pipe.transformer.config.guidance_embeds:
            raise ValueError(
                "this Sana transformer is guidance-distilled (guidance_embeds, Sana-Sprint); retouch supports the "
                "classifier-free-guided Sana models of SanaPipeline"
            )
        if getattr(pipe, "tokenizer", None) is not None:
            pipe.tokenizer.padding_side = "right"  # the pipeline sets it too, before every encode

    @property
    def max_prompt_tokens(self) -> int:
        return self.max_sequence_length - 1  # bos + instruction tail + prompt fit in 300

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.patch_size)

    @property
    def size_policy(self) -> SizePolicy:
        return sample_size_policy(self)

    @property
    def instruction(self) -> list[str]:
        """The stock pipeline's default complex human instruction (read from its ``__call__`` signature)."""
        import inspect

        param = inspect.signature(type(self.pipe).__call__).parameters.get("complex_human_instruction")
        return list(param.default or []) if param is not None else []

    def text_segments(self) -> list[TextSegment]:
        """The bare prompt tokenizes as ``[bos, prompt...]``. In the model's sequence ``[bos, last 299 tokens of
        instruction + prompt]`` the prompt starts right after bos when the instruction's trailing space merges
        into the prompt's first token (Gemma: ``"Prompt: a"`` -> ``... ":", "▁a"``), one later otherwise; this is
        probed, not assumed. (The first word is then ``▁a`` where the bare prompt has ``a``: one token either way.)"""
        offset = self._prompt_start() - 1 if self.instruction else 0
        return [TextSegment(self.tokenizer, offset, self.max_sequence_length - offset)]

    def _prompt_start(self) -> int:
        """Position of the prompt's first token in the encoded (instruction-prefixed, selected) sequence."""
        chi = "\n".join(self.instruction)
        alone = self.tokenizer(chi)["input_ids"]
        joined = self.tokenizer(chi + "a")["input_ids"]
        common = next((i for i, (x, y) in enumerate(zip(alone, joined, strict=False)) if x != y), len(alone))
        # the pipeline keeps [bos] + tokens from index len(alone) - 1 on (max_length = len(alone) + 298)
        return common - (len(alone) - 1) + 1

    # --- latents --------------------------------------------------------------------------------------
    def encode_image(self, pixels: Tensor) -> Tensor:
        vae = self.vae
        lat = vae.encode(pixels.to(vae.device, vae.dtype)).latent
        return (lat * vae.config.scaling_factor).to(self.dtype)

    def decode(self, latents: Tensor) -> Tensor:
        vae = self.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample

    # --- conditioning ---------------------------------------------------------------------------------
    def encode_prompt(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> Conditioning:
        embs, masks = [], []
        for p in prompts:  # one at a time: empty prompts are encoded without the instruction
            emb, mask = self._encode_one(p)
            embs.append(emb)
            masks.append(mask)
        emb, mask = torch.cat(embs), torch.cat(masks)
        return Conditioning({"encoder_hidden_states": emb, "encoder_attention_mask": mask})

    def _encode_one(self, prompt: str) -> tuple[Tensor, Tensor]:
        if not prompt:
            return self.pipe._get_gemma_prompt_embeds(
                [prompt], self.device, self.dtype, max_sequence_length=self.max_sequence_length,
                complex_human_instruction=None,
            )  # fmt: skip
        emb, mask, _, _ = self.pipe.encode_prompt(
            [prompt],
            do_classifier_free_guidance=False,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.instruction,
        )
        return emb, mask

    # --- denoising ------------------------------------------------------------------------------------
    def grid(self, kind: str, num_steps: int, latent_hw: tuple[int, int]) -> NoiseGrid:
        """The stock pipeline's grid for every solver: the DPM-Solver scheduler's flow sigmas (``use_flow_sigmas``,
        ``flow_shift``; integer timesteps), or a FlowMatchEuler scheduler's grid when the pipeline has one."""
        from retouch import schedules

        schedules.check_steps(num_steps)
        cfg = self.scheduler_config
        if not cfg.get("use_flow_sigmas"):
            return schedules.flow_grid(cfg, num_steps, image_seq_len=self.image_seq_len(latent_hw))
        return flow_sigma_grid(cfg, num_steps)

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        tr = self.pipe.transformer
        t = timestep.to(x.device).reshape(1).expand(x.shape[0]) * tr.config.timestep_scale
        out = tr(
            x.to(self.dtype),
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            encoder_attention_mask=cond.tensors["encoder_attention_mask"],
            timestep=t,
            return_dict=False,
        )[0]
        if tr.config.out_channels // 2 == x.shape[1]:  # learned sigma (not in released Sana models)
            out = out.chunk(2, dim=1)[0]
        return out

    # --- attention ------------------------------------------------------------------------------------
    def attention_layers(self) -> dict[str, LayerInfo]:
        parsed = parse_layer_names(self.pipe.transformer.attn_processors, _NAME, "Sana transformer")
        out: dict[str, LayerInfo] = {}
        for depth, which, name in sorted((int(m.group(1)), m.group(2), name) for m, name in parsed):
            linear = which == "attn1"
            out[name] = LayerInfo(name=name, kind="self" if linear else "cross", depth=depth, place="dit",
                                  downsample=self.patch_size, linear=linear)  # fmt: skip
        return out

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """``transformer_blocks.*``; each returns the image tokens ``[B, N_img, D]`` (kind ``"dit"``)."""
        n = len(self.pipe.transformer.transformer_blocks)
        return numbered_blocks("transformer_blocks", n, kind="dit", place="dit", downsample=self.patch_size)

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return (SanaLinearProcessor if layer.linear else SanaCrossProcessor)(layer, attend, merge)


def flow_sigma_grid(config: Any, num_steps: int) -> NoiseGrid:
    """The grid of ``DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=s)`` as ``set_timesteps(N)``
    makes it: ``σ`` shifted like SD3's flows, timesteps ``int(1000 σ)`` (what the model is told), final σ 0,
    ``α = 1 - σ``; multistep solvers take a first-order last step as diffusers does."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler.from_config(dict(config))
    sched.set_timesteps(num_steps)
    sigmas = sched.sigmas.to(torch.float32)
    timesteps = torch.cat([sched.timesteps.to(torch.float32), torch.tensor([0.0])])
    c = sched.config
    lof = bool(c.euler_at_final or (c.lower_order_final and num_steps < 15) or c.final_sigmas_type == "zero")
    return NoiseGrid(timesteps=timesteps, alphas=1 - sigmas, sigmas=sigmas, kind="flow", lower_order_final=lof)
