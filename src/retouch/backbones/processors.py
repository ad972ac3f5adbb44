"""Attention processors that route the attention product through an ``attend`` callback.

Each class reproduces one diffusers processor's projections exactly (adapted from diffusers 0.42.1:
``AttnProcessor2_0``, ``JointAttnProcessor2_0`` and ``FluxAttnProcessor``) and replaces only the call to
``scaled_dot_product_attention`` with ``attend(q, k, v, layer, attn_mask=..., num_text=...)`` on
``[B, heads, S, d]`` tensors. ``tests/test_parity.py`` fails if upstream's output drifts from ours.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from retouch.backbones.base import LayerInfo

Attend = Callable[..., Tensor]
Merge = Callable[[Tensor, LayerInfo], tuple[Tensor, Any]]


def _no_merge(hidden: Tensor, layer: LayerInfo) -> tuple[Tensor, Any]:
    return hidden, None


class StandardProcessor:
    """For diffusers ``Attention`` modules (UNet self/cross, PixArt self/cross); mirrors ``AttnProcessor2_0``.

    In self-attention layers ``merge`` may reduce the image tokens before the projections (token merging);
    the output is unmerged back after ``to_out``.
    """

    def __init__(self, layer: LayerInfo, attend: Attend, merge: Merge = _no_merge) -> None:
        self.layer = layer
        self.attend = attend
        self.merge = merge

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args,
        **kwargs,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        plan = None
        if encoder_hidden_states is None and attention_mask is None and input_ndim == 3:
            hidden_states, plan = self.merge(hidden_states, self.layer)  # [B, N', C]

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, h, N, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, self.layer, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if plan is not None:
            hidden_states = plan.unmerge(hidden_states)  # [B, N, C]
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointProcessor:
    """For SD3's joint attention; mirrors ``JointAttnProcessor2_0``. Sequence = [image; text].

    Token merging acts on the image stream only (text tokens are never merged).
    """

    def __init__(self, layer: LayerInfo, attend: Attend, merge: Merge = _no_merge) -> None:
        self.layer = layer
        self.attend = attend
        self.merge = merge

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *args,
        **kwargs,
    ):
        hidden_states, plan = self.merge(hidden_states, self.layer)  # image tokens [B, N', C]
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # [B, h, N_img, d]
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        num_text = 0
        if encoder_hidden_states is not None:
            cq = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            ck = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            cv = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            num_text = cq.shape[2]
            query = torch.cat([query, cq], dim=2)  # [B, h, N_img + N_txt, d]
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)

        hidden_states = self.attend(query, key, value, self.layer, attn_mask=None, num_text=num_text)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            n_img = residual.shape[1]
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if plan is not None:
            hidden_states = plan.unmerge(hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxProcessor:
    """For Flux double- and single-stream attention; mirrors ``FluxAttnProcessor``. Sequence = [text; image].

    Single-stream blocks receive the already concatenated sequence; the number of text tokens (the T5 length)
    then arrives as the ``num_text`` argument, which the backbone passes in the transformer's
    ``joint_attention_kwargs`` (:func:`routing_kwargs`); without it (a forward from the stock pipeline) it
    counts as 0.
    """

    def __init__(self, layer: LayerInfo, attend: Attend, merge: Merge = _no_merge) -> None:
        self.layer = layer
        self.attend = attend
        self.merge = merge

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | None = None,
        num_text: int | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        # token merging on the image tokens; rotary position inputs follow the kept tokens. num_text None: a
        # forward from outside the backbone's predict (the stock pipeline), the text length counts as 0
        n_txt_single = 0 if encoder_hidden_states is not None else int(num_text or 0)
        image = hidden_states[:, n_txt_single:]
        merged, plan = self.merge(image, self.layer)
        if plan is not None:
            hidden_states = torch.cat([hidden_states[:, :n_txt_single], merged], dim=1)
            if image_rotary_emb is not None:
                n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else n_txt_single
                keep = plan.kept_index[0].to(image_rotary_emb[0].device) + n_txt
                idx = torch.cat([torch.arange(n_txt, device=keep.device), keep])
                image_rotary_emb = tuple(e[idx] for e in image_rotary_emb)

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, N, h, d]
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        num_text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else n_txt_single

        out = self.attend(
            query.transpose(1, 2),
            key.transpose(1, 2),
            value.transpose(1, 2),
            self.layer,
            attn_mask=attention_mask,
            num_text=num_text,
        )  # [B, h, N, d]
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]],
                dim=1,
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            if plan is not None:
                hidden_states = plan.unmerge(hidden_states)
            return hidden_states, encoder_hidden_states
        if plan is not None:
            hidden_states = torch.cat(
                [hidden_states[:, :n_txt_single], plan.unmerge(hidden_states[:, n_txt_single:])], dim=1
            )
        return hidden_states


def routing_kwargs(denoiser: Any, processor_type: type, num_text: int) -> dict[str, Any] | None:
    """The ``joint_attention_kwargs`` that give retouch's routing processors the text length of this forward
    (``{"num_text": n}``), or None when none of ``denoiser``'s processors is one (diffusers' own processors
    would warn about an argument they do not take)."""
    if any(isinstance(p, processor_type) for p in denoiser.attn_processors.values()):
        return {"num_text": int(num_text)}
    return None
