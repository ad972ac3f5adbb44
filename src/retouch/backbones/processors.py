"""Attention processors that route the attention product through an ``attend`` callback.

Each class reproduces one diffusers processor's projections exactly (adapted from diffusers 0.42.1:
``AttnProcessor2_0``, ``JointAttnProcessor2_0`` and ``FluxAttnProcessor``) and replaces only the call to
``scaled_dot_product_attention`` with ``attend(q, k, v, layer, attn_mask=..., num_text=...)`` on
``[B, heads, S, d]`` tensors. ``tests/test_parity.py`` fails if upstream's output drifts from ours.

:class:`RoutingProcessor` holds what every routing processor (these and the newer families' in their adapters)
shares: the layer, the ``attend`` callback, the token-merging callback, and the small steps around them.
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


def split_heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    """``[B, N, heads * d] -> [B, heads, N, d]`` (diffusers' ``view(...).transpose(1, 2)``)."""
    return x.view(x.shape[0], -1, heads, head_dim).transpose(1, 2)


def norm_qk(q: Tensor, k: Tensor, norm_q: Any, norm_k: Any) -> tuple[Tensor, Tensor]:
    """The optional query / key norms of an attention module (``None``: no norm)."""
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    return q, k


def project_out(attn: Any, hidden: Tensor) -> Tensor:
    """``attn.to_out``: the output projection, then its dropout where the module has one."""
    hidden = attn.to_out[0](hidden)
    if len(attn.to_out) > 1:
        hidden = attn.to_out[1](hidden)
    return hidden


def text_first_heads(
    attn: Any, qkv: tuple[Tensor, Tensor, Tensor], text_qkv: tuple[Tensor, Tensor, Tensor] | None, rotary: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """The attention inputs of Flux-style blocks (Flux.1 and Flux.2, as their diffusers processors): projections
    ``[B, S, heads * d]`` split into heads ``[B, S, heads, d]`` and QK-normed; in double-stream blocks the text
    projections ``text_qkv`` (normed with the added norms) go first; then the rotary embedding on queries and keys."""
    from diffusers.models.embeddings import apply_rotary_emb

    query, key, value = qkv
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # [B, N, h, d]
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if text_qkv is not None:
        eq, ek, ev = text_qkv
        eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
        ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
        ev = ev.unflatten(-1, (-1, attn.head_dim))
        query, key, value = (torch.cat([e, x], dim=1) for e, x in ((eq, query), (ek, key), (ev, value)))
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return query, key, value  # [B, T + N, h, d]


class RoutingProcessor:
    """Base of retouch's attention processors: ``layer`` is the :class:`LayerInfo` handed to ``attend`` (and to
    ``merge``), ``attend(q, k, v, layer, **kw)`` computes attention on ``[B, heads, S, d]`` tensors, ``merge``
    reduces image tokens ``[B, N, C] -> ([B, N', C], plan)`` (``plan`` None: nothing merged, else
    ``plan.unmerge`` restores the token count and ``plan.kept_index`` names the kept tokens). Subclasses write
    only their family's projections."""

    def __init__(self, layer: LayerInfo, attend: Attend, merge: Merge | None = None) -> None:
        self.layer = layer
        self.attend = attend
        self.merge = _no_merge if merge is None else merge

    def attend_tokens(self, query: Tensor, key: Tensor, value: Tensor, **kwargs: Any) -> Tensor:
        """``attend`` on token-major ``[B, S, heads, d]`` tensors; returns ``[B, S, heads, d]``."""
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.layer, **kwargs)
        return out.transpose(1, 2)  # [B, S, h, d]

    def merge_after_text(self, hidden: Tensor, n_txt: int, rotary: Any, rot_txt: int) -> tuple[Tensor, Any, Any]:
        """Merge the image tokens that follow the ``n_txt`` text tokens of ``hidden`` (a ``[text; image]``
        sequence); the rotary tables (a tuple of ``[S, ...]`` tensors, or None) cover ``rot_txt`` text tokens then
        the image, and keep the rows of the kept tokens. Returns ``(hidden, plan, rotary)``."""
        merged, plan = self.merge(hidden[:, n_txt:], self.layer)
        if plan is None:
            return hidden, None, rotary
        hidden = torch.cat([hidden[:, :n_txt], merged], dim=1)
        if rotary is not None:
            keep = plan.kept_index[0].to(rotary[0].device) + rot_txt
            idx = torch.cat([torch.arange(rot_txt, device=keep.device), keep])
            rotary = tuple(e[idx] for e in rotary)
        return hidden, plan, rotary


def unmerge_after_text(hidden: Tensor, plan: Any, n_txt: int) -> Tensor:
    """Undo :meth:`RoutingProcessor.merge_after_text` on a block output ``[B, n_txt + N', C]``."""
    if plan is None:
        return hidden
    return torch.cat([hidden[:, :n_txt], plan.unmerge(hidden[:, n_txt:])], dim=1)


class StandardProcessor(RoutingProcessor):
    """For diffusers ``Attention`` modules (UNet self/cross, PixArt self/cross); mirrors ``AttnProcessor2_0``.

    In self-attention layers ``merge`` may reduce the image tokens before the projections (token merging);
    the output is unmerged back after ``to_out``.
    """

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
        query, key, value = (split_heads(x, attn.heads, head_dim) for x in (query, key, value))  # [B, h, N, d]
        query, key = norm_qk(query, key, attn.norm_q, attn.norm_k)

        hidden_states = self.attend(query, key, value, self.layer, attn_mask=attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = project_out(attn, hidden_states.to(query.dtype))
        if plan is not None:
            hidden_states = plan.unmerge(hidden_states)  # [B, N, C]
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class JointProcessor(RoutingProcessor):
    """For SD3's joint attention; mirrors ``JointAttnProcessor2_0``. Sequence = [image; text].

    Token merging acts on the image stream only (text tokens are never merged).
    """

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
        n_img = hidden_states.shape[1]
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (split_heads(x, attn.heads, head_dim) for x in (query, key, value))  # [B, h, N_img, d]
        query, key = norm_qk(query, key, attn.norm_q, attn.norm_k)
        num_text = 0
        if encoder_hidden_states is not None:
            cq, ck, cv = (
                split_heads(proj(encoder_hidden_states), attn.heads, head_dim)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            )
            cq, ck = norm_qk(cq, ck, attn.norm_added_q, attn.norm_added_k)
            num_text = cq.shape[2]
            query = torch.cat([query, cq], dim=2)  # [B, h, N_img + N_txt, d]
            key = torch.cat([key, ck], dim=2)
            value = torch.cat([value, cv], dim=2)

        hidden_states = self.attend(query, key, value, self.layer, attn_mask=None, num_text=num_text)

        hidden_states = hidden_states.transpose(1, 2).reshape(hidden_states.shape[0], -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = hidden_states[:, :n_img], hidden_states[:, n_img:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = project_out(attn, hidden_states)
        if plan is not None:
            hidden_states = plan.unmerge(hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class FluxProcessor(RoutingProcessor):
    """For Flux double- and single-stream attention; mirrors ``FluxAttnProcessor``. Sequence = [text; image].

    Single-stream blocks receive the already concatenated sequence; the number of text tokens (the T5 length)
    then arrives as the ``num_text`` argument, which the backbone passes in the transformer's
    ``joint_attention_kwargs`` (:func:`routing_kwargs`); without it (a forward from the stock pipeline) it
    counts as 0.
    """

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: Tensor | None = None,
        num_text: int | None = None,
    ):
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        # token merging on the image tokens; rotary position inputs follow the kept tokens. num_text None: a
        # forward from outside the backbone's predict (the stock pipeline), the text length counts as 0
        n_txt_single = 0 if encoder_hidden_states is not None else int(num_text or 0)
        n_txt = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else n_txt_single
        hidden_states, plan, image_rotary_emb = self.merge_after_text(
            hidden_states, n_txt_single, image_rotary_emb, n_txt
        )

        query, key, value, eq, ek, ev = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        text = (eq, ek, ev) if attn.added_kv_proj_dim is not None else None
        query, key, value = text_first_heads(attn, (query, key, value), text, image_rotary_emb)  # [B, N, h, d]

        out = self.attend_tokens(query, key, value, attn_mask=attention_mask, num_text=n_txt)  # [B, N, h, d]
        hidden_states = out.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [n_txt, hidden_states.shape[1] - n_txt], dim=1
            )
            hidden_states = project_out(attn, hidden_states.contiguous())
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            if plan is not None:
                hidden_states = plan.unmerge(hidden_states)
            return hidden_states, encoder_hidden_states
        return unmerge_after_text(hidden_states, plan, n_txt_single)


def routing_kwargs(denoiser: Any, processor_type: type, num_text: int) -> dict[str, Any] | None:
    """The ``joint_attention_kwargs`` that give retouch's routing processors the text length of this forward
    (``{"num_text": n}``), or None when none of ``denoiser``'s processors is one (diffusers' own processors
    would warn about an argument they do not take)."""
    if any(isinstance(p, processor_type) for p in denoiser.attn_processors.values()):
        return {"num_text": int(num_text)}
    return None
