"""KV-Edit (Zhu et al. 2025, "KV-Edit: Training-Free Image Editing for Precise Background Preservation").

Given a user mask, the background must come back exactly and the foreground is regenerated in context:

1. **Inversion with a background K/V cache.** While the source latent is inverted, every self / joint / single
   attention layer stores the keys and values of the *background* image tokens at each grid point. With
   ``attn_mask`` (the paper's mask-guided inversion) foreground and background image tokens do not attend to
   each other during the inversion (text tokens see everything), so the cached background never saw the object.
2. **Foreground-only denoising.** While sampling, the target branch's background keys and values are replaced
   by the cached ones of the same grid point, so its foreground queries attend to their own keys / values plus
   the source's background (``attn_scale`` adds that bias to the background keys' logits, the paper's
   "attention scale" against seams). ``skip`` starts the sampling that many steps into the grid (from the
   inverted latent there, or, with ``re_init``, from the clean latent noised afresh inside the mask).
3. **Paste.** After every step the target latent is blended with the inversion trajectory outside the mask
   (retouch's generic mask path, :mod:`retouch.masks`); the trajectory ends at the input latent, so outside
   the (binarised) mask the output latent equals the input latent exactly.

``inversion_free`` is the paper's inversion-free variant (constant memory in the number of steps): at each
grid point the source latent is noised afresh, ``z_src = (1-s) x0 + s n`` (one noise ``n`` for every step, as
the released code), the target is ``z_tar = z_src + z_fe - x0`` and one batched call evaluates both, the
target's background keys / values taken from the source row of the same call (no cache); the foreground
latent ``z_fe`` then moves by ``dt (v_tar - v_src)`` inside the mask.

Where this departs from the paper and its code (see docs/methods.md): the target branch is computed over the
whole token sequence and its background keys / values overwritten (the foreground's output is the same as a
foreground-only forward: no background query reaches a foreground token; the compute saving of dropping the
background tokens is not taken, since retouch's batch carries the source branch at full length anyway); the
cache is keyed by grid point (the released code reads the K/V of the next cleaner point, an off-by-one that
retouch takes only where the inversion never evaluated a point, e.g. point 0 of a flow-Euler inversion).
Family knowledge (which layers attend over image tokens, where text sits in a joint sequence) comes from the
layers' :class:`~retouch.backbones.base.LayerInfo` and the context, never from the family's name.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.control.context import AttnContext, BatchLayout
from retouch.control.contract import Editor, GuidedPrediction, StepContext
from retouch.control.options import EditorOptions, takes_options
from retouch.control.steps import count_of

log = logging.getLogger(__name__)

IMAGE_KINDS = ("self", "joint", "single")

LINEAR_ATTENTION_REFUSAL = (
    "its image self-attention is linear (ReLU kernel, as Sana's), and KV-Edit's mask-guided inversion and "
    "attention scale are additive biases on softmax logits, which a linear layer does not compute; KV-Edit is "
    "refused there rather than run without them (the generic mask path works with any method, e.g. "
    "--method direct+p2p --mask PATH)"
)


def check_backbone(backbone: Any) -> None:
    """Refuse a model whose image attention KV-Edit cannot act on (from its layer table, not its name)."""
    image_layers = [i for i in backbone.attention_layers().values() if i.kind in IMAGE_KINDS]
    if not image_layers:
        raise ValueError(f"kv_edit needs self / joint attention over image tokens; {backbone.family} has none")
    linear = [i.name for i in image_layers if i.linear]
    if linear:
        raise ValueError(
            f"kv_edit cannot run on {backbone.family}: {LINEAR_ATTENTION_REFUSAL} (linear layers: "
            f"{', '.join(linear[:3])}{', ...' if len(linear) > 3 else ''})"
        )


class KVEdit(Editor):
    """The KV-Edit policy (module docstring). Built by :func:`make_kv_edit`; needs a mask (``set_mask``)."""

    needs_mask = True

    def __init__(
        self,
        *,
        skip: int = 4,
        re_init: bool = False,
        attn_mask: bool = False,
        attn_scale: float = 1.0,
        inversion_free: bool = False,
        cache_device: str | None = None,
        seed: int = 0,
        source_cond: Any = None,
    ) -> None:
        # the values are checked by KVEditOptions
        self.skip = skip
        self.re_init = re_init
        self.attn_mask = attn_mask
        self.attn_scale = float(attn_scale)
        self.inversion_free = inversion_free
        self.cache_device = torch.device(cache_device) if cache_device else None
        self.seed = seed
        self.source_cond = source_cond  # inversion-free: the source row's conditioning (its own guidance)
        self.mask: Tensor | None = None  # [1, 1, h, w], 0/1
        self.cache: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        self.cache_layout: BatchLayout | None = None
        self._tokens: dict[tuple[int, int], tuple[Tensor, Tensor, Tensor]] = {}
        self._bias: dict[tuple, Tensor] = {}
        self.z0: Tensor | None = None
        self.noise: Tensor | None = None
        self._before: Tensor | None = None
        self.z_fe: Tensor | None = None

    # --- hooks the editing loop calls ----------------------------------------------------------------------
    def set_mask(self, mask: Tensor | None) -> Tensor:
        """Take the run's latent mask; KV-Edit binarises it as the paper does (any coverage -> foreground)."""
        if mask is None:
            raise ValueError("kv_edit needs a mask: --mask PATH (white = may change) or --mask auto:WORDS")
        self.mask = (mask > 0).to(mask.dtype)
        if float(self.mask.sum()) == 0:
            log.warning("kv_edit: the mask is empty; the output will be the input")
        return self.mask

    def grid_start(self, num_steps: int) -> int:
        if self.skip >= num_steps:
            raise ValueError(f"kv_edit skip={self.skip} leaves no step of {num_steps}")
        return self.skip

    def prepare_conditioning(self, cond: Any, uncond: Any) -> Any:
        if self.inversion_free and self.source_cond is not None:
            from retouch.types import Conditioning

            return Conditioning.cat([self.source_cond.to(device=_device(cond)), cond.select(range(1, cond.batch_size))])
        return cond

    def begin(self, trajectory: Any) -> None:
        self.z0 = trajectory.latents[-1]
        if self.re_init or self.inversion_free:
            g = torch.Generator().manual_seed(self.seed)
            self.noise = torch.randn(self.z0.shape, generator=g).to(self.z0.device, self.z0.dtype)
        if self.inversion_free:
            self.z_fe = self.z0.clone()

    def before_step(self, ctx: StepContext, x: Tensor, model: GuidedPrediction) -> Tensor | None:
        i, grid = ctx.step, ctx.grid
        if self.inversion_free:
            z_src = grid.alphas[i] * self.z0 + grid.sigmas[i] * self.noise
            z_tar = z_src + self.z_fe - self.z0
            x = torch.cat([z_src, z_tar.expand(x.shape[0] - 1, -1, -1, -1)])
            self._before = x
            return x
        if self.re_init and i == 0:  # the paper's re-initialisation of the foreground noise
            fresh = grid.alphas[0] * self.z0 + grid.sigmas[0] * self.noise
            out = x.clone()
            m = self.mask.to(x.dtype)[0]
            for r in range(1, x.shape[0]):
                out[r] = x[r] + m * (fresh[0] - x[r])
            return out
        return None

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | None:
        if not self.inversion_free:
            return None
        before = self._before
        v_src_dt = x[0] - before[0]
        v_tar_dt = x[1] - before[1]
        self.z_fe = self.z_fe + self.mask[0].to(x.dtype) * (v_tar_dt - v_src_dt)
        out = torch.cat([self.z0, self.z_fe.expand(x.shape[0] - 1, -1, -1, -1)])
        return out

    # --- attention -------------------------------------------------------------------------------------------
    def applies(self, ctx: AttnContext) -> bool:
        if ctx.layer.kind not in IMAGE_KINDS or self.mask is None:
            return False
        if ctx.phase == "invert":
            return not self.inversion_free and ctx.point >= 0 and ctx.stage != "mid"  # on-grid evaluations
        return ctx.phase == "sample" and ctx.layout.branches >= 2

    def _token_sets(self, ctx: AttnContext, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(foreground flags [N], foreground index, background index) of this layer's image-token grid: a token
        is foreground when any latent cell it covers is."""
        hw = ctx.image_hw
        if hw not in self._tokens:
            d = ctx.layer.downsample
            m = F.max_pool2d(self.mask.float(), d, stride=d, ceil_mode=True) if d > 1 else self.mask.float()
            if tuple(m.shape[-2:]) != hw:
                raise ValueError(f"kv_edit: mask grid {tuple(m.shape[-2:])} does not match the tokens {hw}")
            fg = (m[0, 0] > 0).flatten().to(device)
            self._tokens[hw] = (fg, torch.nonzero(fg).flatten(), torch.nonzero(~fg).flatten())
        return self._tokens[hw]

    def _image_span(self, ctx: AttnContext, seq_len: int, n_tokens: int) -> slice:
        span = ctx.image_slice(seq_len)
        n = len(range(*span.indices(seq_len)))
        if n > n_tokens and ctx.layer.kind == "self":
            # a padded image sequence (Z-Image's noise refiner: [image; pad tokens]); adapters hand the image
            # tokens first, and the pads stay the row's own, like text in a joint sequence
            return slice(span.indices(seq_len)[0], span.indices(seq_len)[0] + n_tokens)
        if n != n_tokens:
            raise ValueError(
                f"kv_edit: {n} image tokens at {ctx.layer.name}, expected {n_tokens} (token merging is not "
                "compatible with kv_edit)"
            )
        return span

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        fg, _, bg = self._token_sets(ctx, k.device)
        if bg.numel() == 0:
            return q, k, v
        span = self._image_span(ctx, k.shape[-2], fg.numel())
        bg_seq = bg + span.start  # positions of the background tokens in the key sequence
        if ctx.phase == "invert":
            n = ctx.num_steps
            if ctx.point < n:  # the clean end point is never sampled from
                dev = self.cache_device or k.device
                self.cache[(ctx.layer.name, ctx.point)] = (k[:, :, bg_seq].to(dev), v[:, :, bg_seq].to(dev))
                self.cache_layout = ctx.layout
            return q, k, v
        layout = ctx.layout
        k, v = k.clone(), v.clone()
        if self.inversion_free:
            for cond in (False, True) if layout.cfg else (True,):
                src = layout.row(0, cond)
                for b in range(1, layout.branches):
                    r = layout.row(b, cond)
                    k[r, :, bg_seq] = k[src, :, bg_seq]
                    v[r, :, bg_seq] = v[src, :, bg_seq]
            return q, k, v
        ck, cv = self._cached(ctx)
        inv = self.cache_layout
        for cond in (False, True) if layout.cfg else (True,):
            c = inv.row(0, cond) if inv.cfg else 0
            for b in range(1, layout.branches):
                r = layout.row(b, cond)
                k[r, :, bg_seq] = ck[c].to(k.device, k.dtype)
                v[r, :, bg_seq] = cv[c].to(v.device, v.dtype)
        return q, k, v

    def _cached(self, ctx: AttnContext) -> tuple[Tensor, Tensor]:
        name = ctx.layer.name
        hit = self.cache.get((name, ctx.step))
        if hit is not None:
            return hit
        later = sorted(p for (n, p) in self.cache if n == name and p > ctx.step)
        if not later:
            raise ValueError(f"kv_edit: no cached keys / values for {name} at step {ctx.step} (was it inverted?)")
        return self.cache[(name, later[0])]

    def logit_bias(self, ctx: AttnContext, q: Tensor, k: Tensor) -> Tensor | None:
        """An additive bias on the attention logits, broadcast to ``[B, h, Nq, Nk]`` (or None):

        * mask-guided inversion (``attn_mask``; the inversion pass, or the source row of the inversion-free
          variant): image queries see only the image keys of their own side of the mask (and all text);
        * ``attn_scale``: ``+attn_scale`` on the background keys for the target rows while sampling."""
        fg, _, bg = self._token_sets(ctx, k.device)
        if bg.numel() == 0:
            return None
        nq, nk = q.shape[-2], k.shape[-2]
        span = self._image_span(ctx, nk, fg.numel())
        sampling = ctx.phase == "sample"
        guided = self.attn_mask and (not sampling or self.inversion_free) and bool(fg.any())
        scaled = sampling and self.attn_scale != 0
        if not guided and not scaled:
            return None
        key = (ctx.layer.kind, ctx.image_hw, nq, nk, ctx.phase, ctx.layout, guided, scaled, str(k.device), k.dtype)
        bias = self._bias.get(key)
        if bias is not None:
            return bias
        layout = ctx.layout
        rows = q.shape[0]
        bias = torch.zeros(rows, 1, nq if guided else 1, nk, dtype=k.dtype, device=k.device)
        if guided:
            side = torch.full((nk,), -1, dtype=torch.long, device=k.device)  # -1: text (sees / is seen by all)
            side[span] = fg.long()
            block = (side[:nq, None] >= 0) & (side[None, :] >= 0) & (side[:nq, None] != side[None, :])
            src_rows = [layout.row(0, c) for c in ((False, True) if layout.cfg else (True,))] if sampling else None
            for r in src_rows if src_rows is not None else range(rows):
                bias[r, 0].masked_fill_(block, float("-inf"))
        if scaled:
            bg_seq = bg + span.start
            for c in (False, True) if layout.cfg else (True,):
                for b in range(1, layout.branches):
                    bias[layout.row(b, c), 0, :, bg_seq] += self.attn_scale
        self._bias[key] = bias
        return bias


def _device(cond: Any) -> torch.device:
    return next(iter(cond.tensors.values())).device


@dataclass(frozen=True, kw_only=True)
class KVEditOptions(EditorOptions):
    """KV-Edit (:func:`make_kv_edit`); ``skip`` is a step count or a fraction (``control/steps.py``)."""

    method: ClassVar[str] = "kv_edit"
    skip: int | float = 4
    re_init: bool = False
    attn_mask: bool = False
    attn_scale: float = 1.0
    inversion_free: bool = False
    cache_device: str | None = None
    source_guidance: float | None = None

    def validate(self) -> None:
        self.check_steps("skip")
        if not abs(self.attn_scale) <= 1e3:  # NaN fails too
            raise self.error("attn_scale", f"must be a finite number (|x| <= 1000), got {self.attn_scale}")
        if self.inversion_free and self.re_init:
            raise self.error(
                "re_init", "applies to the inversion-based KV-Edit; the inversion-free one has no inversion"
            )


@takes_options(KVEditOptions)
def make_kv_edit(backbone: Any, config: Any, o: KVEditOptions) -> KVEdit:
    """KV-Edit. ``skip``: steps (int) or fraction of the steps (float) not run at the noisy end;
    ``re_init``: start the foreground from freshly noised input instead of the inverted latent; ``attn_mask``:
    mask-guided inversion; ``attn_scale``: logit bias towards the background keys; ``inversion_free``: the
    inversion-free variant (flow families); ``cache_device``: where the background K/V cache lives (e.g. "cpu"
    to keep accelerator memory flat); ``source_guidance``: inversion-free, the source row's embedded guidance
    (guidance-distilled models; CFG models use the sampling guidance for both rows)."""
    check_backbone(backbone)
    source_cond = None
    if o.inversion_free and o.source_guidance is not None:
        source_cond = backbone.encode_prompt([config.source_prompt], guidance=float(o.source_guidance))
    return KVEdit(
        skip=count_of(o.skip, int(config.num_steps)),
        re_init=o.re_init,
        attn_mask=o.attn_mask,
        attn_scale=float(o.attn_scale),
        inversion_free=o.inversion_free,
        cache_device=o.cache_device,
        seed=int(config.seed),
        source_cond=source_cond,
    )
