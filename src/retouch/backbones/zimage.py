"""Z-Image (ZImageTransformer2DModel) behind ``ZImagePipeline`` (Z-Image, Z-Image-Turbo).

Read from diffusers 0.42.1:

* **Sequence.** Image tokens (2x2 patches of the 16-channel Flux.1-style latent) and caption tokens are each
  padded to a multiple of 32 with learned pad tokens; the image tokens pass a *noise refiner* (self-attention
  over image tokens, ``noise_refiner.*.attention``), the caption a *context refiner* (text-only attention,
  ``context_refiner.*.attention``), then ``layers.*.attention`` run single-stream attention over
  ``[image; caption]`` (image first). Captions keep only their valid tokens, so two prompts of different
  length give rows of different length: the batch is padded and masked.
* **Conditioning.** Qwen3's second-to-last hidden state of the chat-templated prompt. Conditioning stores the
  captions padded to ``max_sequence_length`` with their lengths; :meth:`ZImageBackbone.predict` hands the
  transformer only the valid tokens, as the pipeline does.
* **Prediction and time.** The transformer is given ``t = 1 - sigma`` and predicts ``x0 - eps``; the pipeline
  negates it into the flow velocity ``eps - x0``.
* **Distillation.** Read from the scheduler config: Z-Image-Turbo's disables dynamic shifting (see
  :class:`ZImageBackbone`); then 8 steps and no CFG are the defaults.
* **Guidance.** True CFG, written ``pos + g (pos - neg)`` by the pipeline: retouch's ``u + w (c - u)`` with
  ``w = g + 1``. Z-Image-Turbo runs at ``g = 0`` (``w = 1``, no CFG) with 8 steps.
* **Grid.** ``sigmas = linspace(1, 1/N, N)`` with Flux's resolution shift ``mu`` (applied only when the scheduler
  uses dynamic shifting; Turbo's config has a static ``shift = 3``).

Editors see the single-stream layers as kind ``"single"`` with the image first (``text_first=False``) and the
noise refiner as kind ``"self"``. The context refiner is not listed: no editor acts on text-to-text attention.
When the image tokens need padding (``(H/16)(W/16)`` not a multiple of 32), the processor hands ``attend`` the
sequence reordered as ``[image; caption; image padding]`` (attention is order-free once RoPE is applied; the
mask follows), so that editors always find the ``h*w`` image tokens first and the caption right after them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo, SizePolicy
from retouch.backbones.common import (
    TransformerBackbone,
    numbered_blocks,
    pad_tokens,
    parse_layer_names,
    square_size_policy,
)
from retouch.backbones.flowgrid import ChatTemplateText, explicit_sigma_flow_grid
from retouch.backbones.processors import Attend, Merge, RoutingProcessor, norm_qk, project_out
from retouch.schedules import flux_shift_mu
from retouch.types import Conditioning, NoiseGrid, Prediction

_NAME = re.compile(r"^(noise_refiner|context_refiner|layers)\.(\d+)\.attention$")
SEQ_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: each sample's image and caption tokens are padded to it


def _rotary(x: Tensor, freqs_cis: Tensor) -> Tensor:
    """Z-Image's complex rotary embedding on ``[B, S, h, d]`` (as ``ZSingleStreamAttnProcessor``)."""
    out = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(out * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)


class ZImageProcessor(RoutingProcessor):
    """For Z-Image's ``Attention`` modules; mirrors diffusers 0.42.1's ``ZSingleStreamAttnProcessor`` and routes
    the attention product through ``attend`` (see the module docstring for the token order editors see).

    Token merging acts on the real image tokens; rotary frequencies and the key mask follow the kept tokens.
    """

    def __init__(self, layer: LayerInfo, attend: Attend, image_tokens: Any, merge: Merge | None = None) -> None:
        super().__init__(layer, attend, merge)
        self.image_tokens = image_tokens  # () -> (real image tokens N, padded image tokens X)

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        freqs_cis: Tensor | None = None,
    ) -> Tensor:
        n_img, n_pad_img = self.image_tokens()
        s = hidden_states.shape[1]
        n_img = min(n_img, s)
        merged, plan = self.merge(hidden_states[:, :n_img], self.layer)
        if plan is not None:
            keep = plan.kept_index[0].to(hidden_states.device)
            hidden_states = torch.cat([merged, hidden_states[:, n_img:]], dim=1)
            idx = torch.cat([keep, torch.arange(n_img, s, device=keep.device)])
            if freqs_cis is not None:
                freqs_cis = freqs_cis[:, idx]
            if attention_mask is not None and attention_mask.ndim == 2:
                attention_mask = attention_mask[:, idx]
            n_real = merged.shape[1]
        else:
            n_real = n_img
        s = hidden_states.shape[1]

        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))  # [B, S, h, d]
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        query, key = norm_qk(query, key, attn.norm_q, attn.norm_k)
        if freqs_cis is not None:
            query, key = _rotary(query, freqs_cis), _rotary(key, freqs_cis)
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]

        # editors find the real image tokens first and the caption right after them
        extra = n_pad_img - n_img if self.layer.kind == "single" else 0
        order = None
        if extra > 0:
            order = torch.cat([
                torch.arange(n_real, device=query.device),
                torch.arange(n_real + extra, s, device=query.device),
                torch.arange(n_real, n_real + extra, device=query.device),
            ])  # fmt: skip
            query, key, value = query[:, order], key[:, order], value[:, order]
            if attention_mask is not None:
                attention_mask = attention_mask[..., order]
        num_text = s - n_real if self.layer.kind == "single" else 0
        out = self.attend_tokens(query, key, value, attn_mask=attention_mask, num_text=num_text)  # [B, S, h, d]
        if order is not None:
            out = out[:, torch.argsort(order)]
        hidden = out.flatten(2, 3).to(query.dtype)
        hidden = project_out(attn, hidden)
        if plan is not None:
            hidden = torch.cat([plan.unmerge(hidden[:, :n_real]), hidden[:, n_real:]], dim=1)
        return hidden


class ZImageBackbone(ChatTemplateText, TransformerBackbone):
    family = "zimage"
    chat_model = "Z-Image"
    prediction = Prediction.FLOW
    default_solver = "flow_euler"

    def __init__(self, pipe: Any, *, name: str | None = None) -> None:
        super().__init__(pipe, name=name)
        self.max_sequence_length = 512
        self._image_tokens = (0, 0)
        # Z-Image's configs carry no distillation flag (Turbo and base share the architecture, and the pipeline
        # refuses extra config keys). Z-Image-Turbo's scheduler config turns dynamic shifting off (static
        # shift 3); that is what marks the distilled model here.
        self.step_distilled = not bool(pipe.scheduler.config.get("use_dynamic_shifting", False))
        self.default_steps = 8 if self.step_distilled else 50
        # retouch's w = the pipeline's guidance_scale + 1 (pipeline default 5.0; Turbo: 0.0 -> no CFG)
        self.default_guidance = 1.0 if self.step_distilled else 6.0

    @property
    def patch_size(self) -> int:
        return int(self.pipe.transformer.config.all_patch_size[0])

    @property
    def size_policy(self) -> SizePolicy:
        mult = self.vae_scale_factor * self.patch_size
        return square_size_policy(mult, 1024, 4096)

    def _template_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        return list(self.tokenizer(text)["input_ids"])

    def encode_prompt(
        self, prompts: Sequence[str], *, image_size: tuple[int, int] | None = None, guidance: float | None = None
    ) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        caps = torch.cat([pad_tokens(e[None], self.max_sequence_length) for e in embeds])
        lengths = torch.tensor([e.shape[0] for e in embeds], device=caps.device)
        return Conditioning({"cap_feats": caps.to(self.dtype), "cap_lengths": lengths})

    def image_seq_len(self, latent_hw: tuple[int, int]) -> int:
        return (latent_hw[0] // self.patch_size) * (latent_hw[1] // self.patch_size)

    def grid(self, kind: str, num_steps: int, latent_hw: tuple[int, int]) -> NoiseGrid:
        from retouch import schedules

        schedules.check_steps(num_steps)
        cfg = self.scheduler_config
        mu = flux_shift_mu(self.image_seq_len(latent_hw), cfg)
        return explicit_sigma_flow_grid(cfg, num_steps, mu)

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        b = x.shape[0]
        n = self.image_seq_len((x.shape[-2], x.shape[-1]))
        self._image_tokens = (n, n + (-n) % SEQ_MULTIPLE)
        caps = cond.tensors["cap_feats"]
        lengths = cond.tensors["cap_lengths"].tolist()
        t = ((1000 - timestep.to(x.device, torch.float32)) / 1000).reshape(1).expand(b).to(self.dtype)
        out = self.pipe.transformer(
            list(x.to(self.dtype).unsqueeze(2).unbind(0)),  # [C, 1, h, w] each
            t,
            [caps[i, : lengths[i]] for i in range(b)],
            return_dict=False,
        )[0]
        return -torch.stack(out).squeeze(2)  # the model predicts x0 - eps

    def attn_processors(self) -> dict[str, Any]:
        """ZImageTransformer2DModel has no ``attn_processors``: its ``Attention`` modules are walked instead."""
        from diffusers.models.attention_processor import Attention

        return {
            f"{name}.processor": m.processor
            for name, m in self.pipe.transformer.named_modules()
            if isinstance(m, Attention)
        }

    def set_attn_processors(self, processors: Mapping[str, Any]) -> None:
        tr = self.pipe.transformer
        for key, proc in processors.items():
            tr.get_submodule(key.removesuffix(".processor")).set_processor(proc)

    def attention_layers(self) -> dict[str, LayerInfo]:
        order = {"noise_refiner": 0, "layers": 1}
        parsed = parse_layer_names(self.attn_processors(), _NAME, "Z-Image transformer")
        # context_refiner: text-only attention, no editor acts on it
        entries = [(order[m.group(1)], int(m.group(2)), name) for m, name in parsed if m.group(1) in order]
        out: dict[str, LayerInfo] = {}
        for depth, (stage, _, name) in enumerate(sorted(entries)):
            kind, place = ("self", "refiner") if stage == 0 else ("single", "single")
            out[name] = LayerInfo(name=name, kind=kind, depth=depth, place=place, downsample=self.patch_size)
        return out

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """``layers.*`` return the unified ``[image; caption]`` sequence ``[B, S, D]`` (kind ``"sequence"``,
        image first: its first ``h*w`` tokens are the image)."""
        n = len(self.pipe.transformer.layers)
        return numbered_blocks("layers", n, kind="sequence", place="single", downsample=self.patch_size)

    def make_processor(self, layer: LayerInfo, attend: Attend, merge: Merge | None = None) -> Any:
        return ZImageProcessor(layer, attend, lambda: self._image_tokens, merge)

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        out["step_distilled"] = self.step_distilled
        return out
