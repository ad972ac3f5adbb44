"""Pix2Pix-Zero (Parmar et al., SIGGRAPH 2023): an edit direction in text-embedding space plus
cross-attention guidance, on every backbone family.

1. **Edit direction** (paper §3.2): ``Δc_edit = mean_j E(t_j) − mean_i E(s_i)`` over target sentences ``t_j``
   and source sentences ``s_i`` (the paper's GPT-3 sentence banks; PIE-Bench runs use the one source and
   one target prompt). The target branch is conditioned on ``c_edit = c + Δc_edit`` where ``c`` is the
   source branch's (input caption's) embedding — the target branch starts from the *source* description,
   as in the paper. With the default one-sentence banks ``c_edit`` equals ``E(target)`` up to rounding; the
   direction matters when the banks are lists (``source_sentences`` / ``target_sentences``). It is added
   to every floating-point conditioning tensor (token embeddings, pooled embeddings); terms that do not
   depend on the text (SDXL time ids, PixArt resolution, Flux guidance) cancel. T5 padding masks of the
   edited row become the union of the caption's and the target sentences' masks.

2. **Cross-attention guidance** (paper §3.3): at every step, before the normal update, the target
   latent takes one gradient step ``x_t ← x_t − λ_xa ∇_{x_t} Σ_layers ‖M^edit_t − M^ref_t‖²`` (SGD,
   ``xa_guidance`` = 0.1) where ``M^ref_t`` are the *source* branch's text-attention maps at the same step
   (the reconstruction pass of the paper) and ``M^edit_t`` the target's, both of the conditional row. The
   per-layer distance is summed over pixels and tokens and averaged over heads, as released. Then the
   normal (CFG) step runs on the guided latent.

   Text-attention maps: image queries → text keys of cross-attention (SD, PixArt), or the image→text block
   of joint / single-stream attention (SD3, Flux: no text cross-attention; on Flux there is no CFG batch
   either and the only row is the conditional one). Memory: the guidance runs two batch-1 forwards (source
   without gradients, target with), records maps only of the selected layers and only for this step, stops
   the forward after the last selected layer, and on joint attention keeps only the image→text block in the
   autograd graph (the full softmax row is recomputed in backward). ``nfe`` counts the two extra forwards.

**Direct Inversion (PnP-Inversion's ``direct+p2pzero``).** The paper-faithful plug-in pins only the source
branch to the inversion latents and leaves the target untouched (our default). The PnP-Inversion repository
(``models/pix2pix_zero/edit_pipeline.py``) also adds the *source* offsets ``o_t = z*_{t-1} − step(z_t)``
to the edited (target) trajectory ("add-source"), a discrepancy with its paper's description; set
``add_source_offset=True`` to reproduce it (first-order solvers ``ddim`` / ``flow_euler`` only).

**The released guidance step (``released_guidance=True``).** The released code (diffusers'
``StableDiffusionPix2PixZeroPipeline``, PnP-Inversion's ``edit_pipeline.py``, the authors' repository) does the
SGD step on the CFG *batch* ``[x, x]``: the loss is the mean over both halves' heads (the unconditional half's maps
compared with the reference pass's unconditional maps), each half's latent moves by its own gradient (so by half
of what a one-half loss would give), the conditional prediction is taken at the conditional half's moved latent,
the unconditional one at the unconditional half's, and the step continues from the *unconditional* half's latent
(``x_in.chunk(2)[0]``). At the first step the unconditional maps equal the reference's, so the latent the step
continues from is unguided. ``released_guidance=True`` reproduces this (``ddim+p2pzero_ref``); the default is the
paper's description (one gradient step of the conditional maps' distance on the target latent).

Not reproduced: Pix2Pix-Zero's inversion noise regularisation (auto-correlation / KL terms) — the engine's
inversions are used instead — and BLIP captioning (the source prompt plays the caption).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from retouch.backbones.base import Backbone, LayerInfo
from retouch.control.context import AttnContext
from retouch.control.contract import Editor, GuidedPrediction, StepContext, WrappedModel
from retouch.control.options import EditorOptions, takes_options
from retouch.control.steps import count_of
from retouch.solvers import ddim_update
from retouch.types import Conditioning, Point, Pred

if TYPE_CHECKING:
    from retouch.guided import GuidedModel

log = logging.getLogger(__name__)

TEXT_KINDS = ("cross", "joint", "single")


class _StopForward(Exception):
    """Raised by the recorder once the last selected layer has been seen (the rest of the forward is unused)."""


def edit_direction(backbone: Backbone, source: Sequence[str], target: Sequence[str]) -> dict[str, Tensor]:
    """``Δc = mean E(target) − mean E(source)`` for every floating conditioning tensor (paper §3.2); for
    integer tensors (padding masks) the element-wise maximum over the target sentences."""
    backbone.check_prompts([*source, *target])
    with torch.no_grad():
        es, et = backbone.encode_prompt(list(source)), backbone.encode_prompt(list(target))
    out: dict[str, Tensor] = {}
    for key, t in et.tensors.items():
        if t.is_floating_point():
            out[key] = t.float().mean(0) - es.tensors[key].float().mean(0)
        else:
            out[key] = t.amax(0)
    return out


def apply_direction(cond: Conditioning, direction: dict[str, Tensor], *, base: int = 0) -> Conditioning:
    """Rows 1.. of ``cond`` become ``cond[base] + Δc`` (masks: union with the target sentences' masks)."""
    new: dict[str, Tensor] = {}
    for key, t in cond.tensors.items():
        d = direction.get(key)
        if d is None:
            new[key] = t
            continue
        row = t[base]
        edited = (row.float() + d.to(row.device)).to(t.dtype) if t.is_floating_point() else torch.maximum(row, d)
        new[key] = torch.cat([t[: base + 1], edited.unsqueeze(0).expand(t.shape[0] - 1, *row.shape)])
    return Conditioning(new, cond.static)


def _image_text_block(q: Tensor, k: Tensor, img: slice, txt: slice) -> Tensor:
    """Image-query → text-key block of ``softmax(q k^T / sqrt d)`` over *all* keys: ``[B, h, N_img, T]``."""
    scores = (q[:, :, img] @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    return scores.softmax(-1)[..., txt]


class PixToPixZero(Editor):
    """The Pix2Pix-Zero editor (see module docstring).

    Args:
        direction: output of :func:`edit_direction`.
        xa_guidance: step size of the cross-attention guidance (paper: 0.1).
        guidance_steps: number of first sampling steps with guidance (all by default).
        layers: text-attention layers whose maps enter the loss.
        add_source_offset: PnP-Inversion's "add-source" variant (see module docstring).
    """

    def __init__(
        self,
        direction: dict[str, Tensor],
        *,
        xa_guidance: float = 0.1,
        guidance_steps: int,
        layers: Sequence[LayerInfo],
        add_source_offset: bool = False,
        released_guidance: bool = False,
        negative: Conditioning | None = None,
    ) -> None:
        self.direction = direction
        self.xa_guidance = xa_guidance
        self.guidance_steps = guidance_steps
        self.layers = {i.name: i for i in layers}
        self.add_source_offset = add_source_offset
        self.released_guidance = released_guidance
        self.negative = negative  # every row's unconditional conditioning (negative_source), or None
        self._cond_latents: Tensor | None = None  # released_guidance: the conditional half's guided latents
        self._maps: dict[str, Tensor] | None = None  # set while recording one forward
        self._source_step: Tensor | None = None
        self.last_loss: tuple[float, float] | None = None  # (map distance, squared gradient norm) of the last step

    # --- conditioning ----------------------------------------------------------------------------
    def prepare_conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        return apply_direction(cond, self.direction)

    # --- recording policy --------------------------------------------------------------------------
    def applies(self, ctx: AttnContext) -> bool:
        return self._maps is not None and ctx.layer.name in self.layers

    def needs_probs(self, ctx: AttnContext) -> bool:
        return ctx.layer.kind == "cross"  # masked (PixArt T5) maps come from the engine's softmax

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        if ctx.layer.kind != "cross":
            seq = q.shape[2]
            img, txt = ctx.image_slice(seq), ctx.text_slice(seq)
            if q.requires_grad:
                block = checkpoint(_image_text_block, q, k, img, txt, use_reentrant=False)
            else:
                block = _image_text_block(q, k, img, txt)
            self._record(block, ctx)
        return q, k, v

    def edit_probs(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        self._record(probs, ctx)
        return probs

    def _record(self, maps: Tensor, ctx: AttnContext) -> None:
        assert self._maps is not None
        self._maps[ctx.layer.name] = maps[ctx.layout.row(0, True)].float()  # [h, N_img, T]
        if len(self._maps) == len(self.layers):
            raise _StopForward

    def _text_maps(self, model: GuidedPrediction, x: Tensor, timestep: Tensor, cond: Conditioning) -> dict:
        """Maps of the selected layers for one conditional row (batch 1, no CFG); the forward stops after the
        last of them."""
        self._maps = {}
        try:
            model.predict_rows(x, timestep, cond, frozen=x.requires_grad)
        except _StopForward:
            pass
        finally:
            maps, self._maps = self._maps, None
        missing = set(self.layers) - set(maps)
        if missing:
            raise RuntimeError(f"Pix2Pix-Zero: no attention maps recorded for {sorted(missing)[:3]}")
        return maps

    @staticmethod
    def map_distance(maps: dict[str, Tensor], ref: dict[str, Tensor]) -> Tensor:
        """``Σ_layers mean_heads Σ_{pixels, tokens} (M − M_ref)²`` (Pix2Pix-Zero's released loss)."""
        return sum(((maps[n] - ref[n]) ** 2).sum((-2, -1)).mean() for n in ref)  # type: ignore[return-value]

    def attention_loss(
        self, ctx: StepContext, x: Tensor, model: GuidedPrediction, *, grad: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Distance between the target rows' and the source row's text-attention maps at the step of ``ctx``
        (its conditioning ``ctx.cond``); with ``grad`` also its gradient w.r.t. the target latents ``x[1:]``."""
        cond = ctx.cond
        if cond is None:
            raise ValueError("Pix2Pix-Zero guidance needs the step's conditioning (StepContext.cond)")
        t = ctx.timestep
        with torch.no_grad():
            ref = self._text_maps(model, x[:1], t, cond.select([0]))
        total = x.new_zeros(())
        grads = []
        for b in range(1, x.shape[0]):
            with torch.enable_grad() if grad else torch.no_grad():
                xt = x[b : b + 1].detach().requires_grad_(grad)
                loss = self.map_distance(self._text_maps(model, xt, t, cond.select([b])), ref)
                if grad:
                    grads.append(torch.autograd.grad(loss, xt)[0])
            total = total + loss.detach()
        return total, torch.cat(grads) if grad else None

    def _released_step(self, ctx: StepContext, x: Tensor, model: GuidedPrediction) -> Tensor:
        """The released code's SGD step on the CFG batch (module docstring): returns the unconditional half's
        guided latents and keeps the conditional half's for :meth:`wrap_model`'s prediction."""
        if ctx.uncond is None or ctx.cond is None:
            raise ValueError("released_guidance needs classifier-free guidance (guidance != 1)")
        t = ctx.timestep
        halves = (ctx.uncond, ctx.cond)
        with torch.no_grad():
            refs = [self._text_maps(model, x[:1], t, h.select([0])) for h in halves]
        moved: list[list[Tensor]] = [[x[:1]], [x[:1]]]
        total = x.new_zeros(())
        with torch.enable_grad():
            for b in range(1, x.shape[0]):
                for h, (half, ref) in enumerate(zip(halves, refs, strict=True)):
                    xt = x[b : b + 1].detach().requires_grad_(True)
                    # the batch loss is the mean over 2 x heads: each half carries half of its own head mean
                    loss = 0.5 * self.map_distance(self._text_maps(model, xt, t, half.select([b])), ref)
                    g = torch.autograd.grad(loss, xt)[0]
                    moved[h].append(x[b : b + 1] - self.xa_guidance * g.to(x.dtype))
                    total = total + loss.detach()
        self.last_loss = (float(total), float("nan"))
        self._cond_latents = torch.cat(moved[1])
        return torch.cat(moved[0])

    def take_cond_latents(self) -> Tensor | None:
        """The conditional half's latents of the released guidance step, once (None when none is pending)."""
        xc, self._cond_latents = self._cond_latents, None
        return xc

    def wrap_model(self, model: GuidedModel) -> GuidedPrediction:
        if self.negative is not None:
            if model.uncond is None:
                raise ValueError("negative_source needs classifier-free guidance (guidance != 1)")
            dev = next(iter(model.uncond.tensors.values())).device
            model.set_uncond(self.negative.to(device=dev).repeat(model.uncond.batch_size))
        return _HalfLatents(model, self) if self.released_guidance else model

    # --- loop hooks ----------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext, x: Tensor, model: GuidedPrediction) -> Tensor | None:
        """Cross-attention guidance: one SGD step on the target latents (paper §3.3)."""
        if ctx.step >= self.guidance_steps or self.xa_guidance == 0 or x.shape[0] < 2:
            return None
        if self.released_guidance:
            return self._released_step(ctx, x, model)
        loss, g = self.attention_loss(ctx, x, model, grad=True)  # counted in the model's NFE
        assert g is not None
        self.last_loss = (float(loss), float((g**2).sum()))
        return torch.cat([x[:1], x[1:] - self.xa_guidance * g.to(x.dtype)])

    def modify_prediction(self, ctx: StepContext, x: Tensor, p: Pred) -> Pred:
        if self.add_source_offset:  # the source row's uncorrected first-order step, for the offset
            self._source_step = ddim_update(Pred(x0=p.x0[:1], eps=p.eps[:1]), ctx.grid, ctx.step)
        return p

    def after_step(self, ctx: StepContext, x: Tensor) -> Tensor | None:
        if not self.add_source_offset or self._source_step is None:
            return None
        offset = x[:1] - self._source_step  # x[0] is already pinned to z*_{i+1}: o_i = z*_{i+1} − step(z_i)
        self._source_step = None
        return torch.cat([x[:1], x[1:] + offset])


class _HalfLatents(WrappedModel):
    """The guided model with the conditional half evaluated at the editor's conditional latents when it has set
    them for this step (``released_guidance``); otherwise the model itself."""

    inner: GuidedModel

    def __init__(self, model: GuidedModel, editor: PixToPixZero) -> None:
        super().__init__(model)
        self._editor = editor

    def __call__(self, x: Tensor, at: Point) -> Pred:
        xc = self._editor.take_cond_latents()
        if xc is None or xc.shape != x.shape:
            return self.inner(x, at)
        return self.inner(x, at, x_cond=xc)


def _text_layers(backbone: Backbone, start_layer: float | int) -> list[LayerInfo]:
    layers = [i for i in backbone.attention_layers().values() if i.kind in TEXT_KINDS]
    if not layers:
        raise ValueError(f"the {backbone.family} backbone has no text-attention layer for Pix2Pix-Zero guidance")
    depth = max(i.depth for i in layers) + 1
    first = count_of(start_layer, depth)
    chosen = [i for i in layers if i.depth >= first]
    if not chosen:
        raise ValueError(f"start_layer={start_layer!r} selects no text-attention layer ({depth} blocks)")
    return chosen


@dataclass(frozen=True, kw_only=True)
class P2PZeroOptions(EditorOptions):
    """Pix2Pix-Zero (:func:`make_p2p_zero`); a sentence bank is normalised to a non-empty tuple of sentences."""

    method: ClassVar[str] = "p2p_zero"
    source_sentences: str | Sequence[str] | None = None
    target_sentences: str | Sequence[str] | None = None
    xa_guidance: float = 0.1
    guidance_steps: float | int = 1.0
    start_layer: float | int = 0
    add_source_offset: bool = False
    released_guidance: bool = False
    negative_source: bool = False

    def validate(self) -> None:
        for name in ("source_sentences", "target_sentences"):
            value = getattr(self, name)
            if value is not None:
                bank = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
                if not bank:
                    raise self.error(name, "must hold at least one sentence")
                self.normalise(name, bank)
        self.check_min("xa_guidance", 0)
        self.check_steps("guidance_steps", "start_layer")


@takes_options(P2PZeroOptions)
def make_p2p_zero(backbone: Backbone, config: Any, o: P2PZeroOptions) -> PixToPixZero:
    """Pix2Pix-Zero (Parmar et al. 2023).

    Options:
        source_sentences / target_sentences: sentence bank(s) for the edit direction (default: the source /
            target prompt, as PIE-Bench runs).
        xa_guidance: cross-attention guidance step size (0.1; 0 disables guidance).
        guidance_steps: fraction (float) or count (int) of the first steps with guidance (all).
        start_layer: first block depth (int) or depth fraction (float) of the text-attention layers in the loss
            (0: all, as the paper on SD; raise it on large DiTs to save memory and time).
        add_source_offset: with Direct Inversion, also add the source offsets to the target (PnP-Inversion's
            released variant; ``ddim`` / ``flow_euler`` solvers only).
        released_guidance: the released code's guidance step on the CFG batch (module docstring).
        negative_source: the unconditional rows use the source prompt (the caption), as PnP-Inversion's
            ``run_editing_pix2pix_zero.py`` passes ``negative_prompt=prompt_str``.
    """
    src = list(o.source_sentences or (config.source_prompt,))
    tgt = list(o.target_sentences or (config.target_prompt,))
    if o.add_source_offset:  # a rule on the run's configuration (its inversion and solver), not on the options
        inv = getattr(getattr(config, "inversion", None), "name", None)
        from retouch.inversion import get_inversion

        pinned = inv is not None and get_inversion(inv).source_correction and inv != "ddpm"
        if not pinned or config.solver not in ("ddim", "flow_euler"):
            raise ValueError(
                "add_source_offset needs Direct Inversion (direct+p2pzero) with the ddim or flow_euler solver, "
                f"got inversion={inv!r}, solver={config.solver!r}"
            )
    return PixToPixZero(
        edit_direction(backbone, src, tgt),
        xa_guidance=float(o.xa_guidance),
        guidance_steps=count_of(o.guidance_steps, int(config.num_steps)),
        layers=_text_layers(backbone, o.start_layer),
        add_source_offset=o.add_source_offset,
        released_guidance=o.released_guidance,
        negative=_encode_one(backbone, config.source_prompt) if o.negative_source else None,
    )


def _encode_one(backbone: Backbone, text: str) -> Conditioning:
    with torch.no_grad():
        return backbone.encode_prompt([text])
