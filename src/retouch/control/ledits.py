"""LEDITS++ (Brack et al., CVPR 2024): semantic guidance with implicit masks, on an edit-friendly inversion.

The image is inverted with the edit-friendly DDPM inversion (:mod:`retouch.inversion.ddpm`, usually of the
empty prompt). While sampling, the target branch's prediction is not classifier-free guidance towards a target
prompt but the unconditional prediction plus one guidance term per *edit concept* (paper, eq. 12)::

    eps = eps_u + sum_c  s_c * d_c * M_c * (eps_c - eps_u)        d_c = -1 for a concept to remove, else +1

where ``M_c`` is the concept's implicit mask. Two masks are combined (paper §3.3):

* ``M1`` (attention): the cross-attention of the concept's tokens, averaged over heads and over the cross
  layers at the map resolution (the UNet's 1/4-latent layers outside the middle block, diffusers' choice; every
  cross layer of a DiT), smoothed with a 3x3 Gaussian and thresholded at its ``threshold``-quantile;
* ``M2`` (noise): where the magnitude of the concept's guidance (summed over channels) is at or above its
  ``threshold``-quantile.

``masks="intersect"`` (the default) uses ``M1 * M2`` at timesteps ``<= noise_mask_after`` (800) and ``M1`` alone
before; ``"attention"`` uses ``M1``, ``"noise"`` ``M2``. Each concept has its own scale, threshold, direction,
warm-up and cool-down steps.

The guidance runs on the model's raw output (eps, or v for v-prediction models), as diffusers' pipeline does.
The batch of one model call is ``[source (unconditional), target (unconditional), concept 1, ..., concept E]``;
the source branch is the reconstruction (the ``ddpm`` inversion pins it to its trajectory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from retouch.backbones.base import Backbone, LayerInfo
from retouch.control import tokens
from retouch.control.context import AttnContext
from retouch.control.contract import Editor, GuidedPrediction, WrappedModel
from retouch.control.options import EditorOptions, takes_options
from retouch.types import Conditioning, Point, Pred, to_x0_eps

log = logging.getLogger(__name__)

MASKS = ("intersect", "attention", "noise")
ATTENTION_TOKENS = ("concept", "diffusers")


@dataclass(frozen=True)
class Concept:
    """One edit concept of LEDITS++ and its settings (paper eq. 12: ``s_e``, ``lambda``, direction)."""

    prompt: str
    reverse: bool = False
    scale: float = 10.0
    threshold: float = 0.75
    warmup: int = 0
    cooldown: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"an edit concept must be a non-empty prompt, got {self.prompt!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"edit threshold must be a quantile in [0, 1], got {self.threshold}")
        if not self.scale >= 0:
            raise ValueError(f"edit scale must be >= 0 (use reverse=true to remove a concept), got {self.scale}")
        if self.warmup < 0 or (self.cooldown is not None and self.cooldown < 0):
            raise ValueError("warmup and cooldown must be step counts >= 0")

    def active(self, step: int) -> bool:
        return step >= self.warmup and (self.cooldown is None or step < self.cooldown)


def derive_concepts(source: str, target: str, mode: str = "words") -> list[tuple[str, bool]]:
    """Edit concepts from a prompt pair. ``"words"``: the target's new words (added) and the source's dropped
    words (removed, ``reverse=True``), each joined into one concept. ``"prompts"``: the whole target prompt
    (added) and the whole source prompt (removed)."""
    if mode == "prompts":
        if source == target:
            raise ValueError("source and target prompts are the same: give the edit concepts (edit_prompts=...)")
        return [(target, False), (source, True)]
    if mode != "words":
        raise ValueError(f"concepts must be 'words' or 'prompts', got {mode!r}")
    removed, added = tokens.changed_words(source, target)
    out: list[tuple[str, bool]] = []
    if added:
        out.append((" ".join(added), False))
    if removed:
        out.append((" ".join(removed), True))
    if not out:
        raise ValueError("source and target prompts are the same: give the edit concepts (edit_prompts=...)")
    return out


def gaussian_smooth(maps: Tensor) -> Tensor:
    """3x3 Gaussian smoothing of ``[B, h, w]`` maps with reflected borders (LEDITS++'s M1 smoothing).

    The kernel is diffusers' ``LeditsGaussianSmoothing`` (size 3, sigma 0.5, whose exponent reads
    ``((x - mean) / (2 sigma))^2``): per axis ``[e^-1, 1, e^-1]``, normalised, outer product.
    """
    k1 = torch.tensor([torch.e**-1, 1.0, torch.e**-1], dtype=torch.float32, device=maps.device)
    k2 = k1[:, None] * k1[None, :]
    k2 = (k2 / k2.sum()).to(maps.dtype)
    mode = "reflect" if min(maps.shape[-2:]) > 1 else "replicate"
    padded = F.pad(maps[:, None], (1, 1, 1, 1), mode=mode)
    return F.conv2d(padded, k2[None, None])[:, 0]


def quantile_mask(values: Tensor, q: float) -> Tensor:
    """``values >= quantile_q(values)`` per batch row of ``[B, ...]`` (linear interpolation), as float."""
    flat = values.flatten(1).float()
    thr = torch.quantile(flat, q, dim=1).to(values.dtype)
    return (values >= thr.view(-1, *([1] * (values.ndim - 1)))).to(values.dtype)


class SemanticGuidance(Editor):
    """The LEDITS++ editor: records the concepts' cross-attention and guides the target branch.

    As an attention editor it only *reads* probabilities (image-query / text-key maps of the concept rows at
    the map layers, during sampling); :meth:`wrap_model` gives the loop the model function that builds the
    concept batch and applies eq. 12.
    """

    def __init__(
        self,
        concepts: Sequence[Concept],
        token_positions: Sequence[Sequence[int]],
        map_layers: Callable[[LayerInfo], bool],
        *,
        masks: str = "intersect",
        noise_mask_after: float = 800.0,
        base_prompt: str = "",
    ) -> None:
        if not concepts:
            raise ValueError("LEDITS++ needs at least one edit concept")
        if len(token_positions) != len(concepts) or any(not p for p in token_positions):
            raise ValueError("every edit concept needs the token positions of its attention map")
        self.concepts = list(concepts)
        self.positions = [list(p) for p in token_positions]
        self.map_layers = map_layers
        self.masks = masks
        self.noise_mask_after = noise_mask_after
        self.base_prompt = base_prompt
        self._sums: Tensor | None = None  # [E, N_img, T] head-summed probabilities of this step
        self._count = 0
        self._map_hw: tuple[int, int] | None = None
        self.mask_fraction: list[list[float]] = [[] for _ in self.concepts]  # per concept, per active step

    # --- attention-editor protocol (read-only) ----------------------------------------------------------
    @property
    def _uses_attention(self) -> bool:
        return self.masks in ("intersect", "attention")

    def applies(self, ctx: AttnContext) -> bool:
        return (
            self._uses_attention
            and ctx.phase == "sample"
            and ctx.layer.kind == "cross"
            and ctx.layout.branches == 2 + len(self.concepts)
            and self.map_layers(ctx.layer)
        )

    def needs_probs(self, ctx: AttnContext) -> bool:
        return True

    def edit_probs(self, probs: Tensor, ctx: AttnContext) -> Tensor:
        rows = probs[2 : 2 + len(self.concepts)].float().sum(1)  # [E, N_img, T], heads summed
        self._sums = rows if self._sums is None else self._sums + rows
        self._count += probs.shape[1]
        self._map_hw = ctx.image_hw
        return probs

    # --- guidance -------------------------------------------------------------------------------------
    def _attention_mask(self, c: int, threshold: float, latent_hw: tuple[int, int]) -> Tensor:
        if self._sums is None or self._map_hw is None:
            raise RuntimeError("LEDITS++ attention masks: no cross-attention map was recorded this step")
        m = self._sums[c][:, self.positions[c]].sum(-1) / self._count  # [N_img], mean over layers x heads
        m = gaussian_smooth(m.reshape(1, *self._map_hw))
        mask = quantile_mask(m, threshold)  # [1, h, w]
        return F.interpolate(mask[:, None], size=latent_hw)  # nearest, [1, 1, H, W]

    def guidance(self, step: int, timestep: float, uncond: Tensor, concept_out: Tensor) -> Tensor:
        """Eq. 12's guidance term for one latent: ``uncond`` ``[1, C, H, W]``, ``concept_out`` ``[E, C, H, W]``."""
        total = torch.zeros_like(uncond)
        latent_hw = (uncond.shape[-2], uncond.shape[-1])
        for c, con in enumerate(self.concepts):
            if not con.active(step):
                continue
            g = (concept_out[c : c + 1] - uncond) * (-con.scale if con.reverse else con.scale)
            mask = None
            if self._uses_attention:
                mask = self._attention_mask(c, con.threshold, latent_hw)
            if self.masks == "noise" or (self.masks == "intersect" and timestep <= self.noise_mask_after):
                noise = quantile_mask(g.abs().sum(1, keepdim=True), con.threshold)
                mask = noise if mask is None else noise * mask
            g = g * mask
            self.mask_fraction[c].append(float(mask.mean()))
            total = total + g
        self._sums, self._count = None, 0
        return total

    def wrap_model(self, guided: GuidedPrediction) -> SemanticGuidanceModel:  # type: ignore[override]
        return SemanticGuidanceModel(guided, self)


class SemanticGuidanceModel(WrappedModel):
    """``model_fn(x, point) -> Pred`` for ``x = [source, target]``: one model call on
    ``[x_src | uncond, x_tgt | uncond, x_tgt | concept_1 .. concept_E]``; the target's prediction is eq. 12."""

    def __init__(self, guided: GuidedPrediction, editor: SemanticGuidance) -> None:
        super().__init__(guided)
        self.editor = editor
        self._cond: Conditioning | None = None

    def _conditioning(self, latent_hw: tuple[int, int]) -> Conditioning:
        if self._cond is None:
            f = self.backbone.vae_scale_factor
            hw = (latent_hw[0] * f, latent_hw[1] * f)
            prompts = [self.editor.base_prompt, *(c.prompt for c in self.editor.concepts)]
            enc = self.backbone.encode_prompt(prompts, image_size=hw)
            self._cond = Conditioning.cat([enc.select([0]), enc])  # [src uncond, tgt uncond, concepts]
        return self._cond

    def __call__(self, x: Tensor, at: Point) -> Pred:
        if x.shape[0] != 2:
            raise ValueError(f"LEDITS++ guides one target branch: expected [source, target] latents, got {x.shape[0]}")
        latent_hw = (x.shape[-2], x.shape[-1])
        cond = self._conditioning(latent_hw)
        n_concepts = len(self.editor.concepts)
        batch = torch.cat([x[:1], x[1:2].expand(1 + n_concepts, *x.shape[1:])])
        # one forward of rows of its own: attention editors see the layout of 2 + E branches, counted in NFE
        raw = self.predict_rows(batch, at.timestep, cond).float()
        uncond = raw[1:2]
        target = uncond + self.editor.guidance(at.step, float(at.timestep), uncond, raw[2:])
        return to_x0_eps(torch.cat([raw[:1], target]), x, at.alpha, at.sigma, self.backbone.prediction)


def map_layer_selector(backbone: Backbone, downsample: int | None = None) -> Callable[[LayerInfo], bool]:
    """The cross layers LEDITS++ reads its attention masks from: those outside a UNet's middle block at
    ``downsample`` (default: 4 where the denoiser has such layers, as diffusers' pipeline takes 1/4-latent maps;
    else the coarsest one it has, i.e. every cross layer of a single-resolution DiT)."""
    cross = [i for i in backbone.attention_layers().values() if i.kind == "cross" and i.place != "mid"]
    if not cross:
        raise ValueError(f"LEDITS++ attention masks need cross-attention layers; {backbone.family} has none")
    sizes = {i.downsample for i in cross}
    if downsample is None:
        downsample = 4 if 4 in sizes else max(sizes)
    if downsample not in sizes:
        raise ValueError(f"map_downsample={downsample}: the cross layers are at downsample {sorted(sizes)}")

    def select(info: LayerInfo) -> bool:
        return info.kind == "cross" and info.place != "mid" and info.downsample == downsample

    return select


def _per_concept(value: Any, n: int) -> list[Any]:
    """One value per concept: a checked list as it is, a single value repeated."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def concept_token_positions(backbone: Backbone, prompt: str, mode: str) -> list[int]:
    """Positions of a concept's tokens in its encoded sequence. ``"concept"``: the prompt's own tokens.
    ``"diffusers"``: positions ``1 .. L-2`` of the padded sequence, which is what diffusers 0.42's pipeline
    sums (``return_length`` counts the padding, so its ``num_edit_tokens`` is ``L - 2`` for every concept)."""
    seg = backbone.text_segments()[0]
    tp = tokens.tokenize(seg.tokenizer, prompt, max_length=seg.length)
    if mode == "concept":
        return [seg.offset + i for i in range(tp.num_head, tp.num_head + tp.num_real)]
    if mode == "diffusers":
        return [seg.offset + i for i in range(1, tp.length - 1)]
    raise ValueError(f"attention_tokens must be one of {ATTENTION_TOKENS}, got {mode!r}")


PER_CONCEPT = ("reverse", "scales", "thresholds", "warmup", "cooldown")


@dataclass(frozen=True, kw_only=True)
class LeditsOptions(EditorOptions):
    """LEDITS++ (:func:`make_ledits`). ``edit_prompts`` is normalised to a tuple; each per-concept option is one
    value for all concepts or a list (normalised to a tuple) with one per concept."""

    method: ClassVar[str] = "ledits"
    edit_prompts: str | Sequence[str] | None = None
    reverse: bool | Sequence[bool] = False
    scales: float | Sequence[float] = 10.0
    thresholds: float | Sequence[float] = 0.75
    warmup: int | Sequence[int] = 0
    cooldown: int | Sequence[int | None] | None = None
    masks: str = "intersect"
    noise_mask_after: float = 800.0
    map_downsample: int | None = None
    attention_tokens: str = "concept"
    concepts: str = "words"
    base_prompt: str = ""

    def validate(self) -> None:
        if self.edit_prompts is not None:
            prompts = (self.edit_prompts,) if isinstance(self.edit_prompts, str) else tuple(self.edit_prompts)
            if not prompts or not all(p.strip() for p in prompts):
                raise self.error("edit_prompts", f"must be one or more non-empty prompts, got {self.edit_prompts!r}")
            self.normalise("edit_prompts", prompts)
        lengths: dict[str, int] = {}
        for name in PER_CONCEPT:
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                self.normalise(name, tuple(value))
                lengths[name] = len(value)
        if self.edit_prompts is not None:
            lengths = {"edit_prompts": len(self.edit_prompts), **lengths}
        if len(set(lengths.values())) > 1:
            first, *others = lengths.items()
            name, n = next((k, v) for k, v in others if v != first[1])
            raise self.error(name, f"has {n} values but {first[0]} has {first[1]}: give one value per edit concept")
        self.check_choice("masks", MASKS)
        self.check_choice("attention_tokens", ATTENTION_TOKENS)
        self.check_choice("concepts", ("words", "prompts"))


@takes_options(LeditsOptions)
def make_ledits(backbone: Backbone, config: Any, o: LeditsOptions) -> SemanticGuidance:
    """LEDITS++ semantic guidance. ``edit_prompts``: one concept or a list (default: the target prompt's new
    words, plus the source prompt's dropped words as a concept to remove); ``reverse``, ``scales``,
    ``thresholds``, ``warmup``, ``cooldown``: one value for all concepts or one per concept (``reverse=true``
    removes a concept); ``masks``: ``intersect`` | ``attention`` | ``noise``; ``concepts``: how concepts are
    derived from the prompts when ``edit_prompts`` is not given (``words`` | ``prompts``); ``base_prompt``: the
    prompt of the "unconditional" prediction the concepts are added to (diffusers' ``negative_prompt``; default
    empty; ``"source"`` means the source prompt — then invert under it too, ``--inversion-prompt``)."""
    if not backbone.uses_cfg:
        raise ValueError(f"LEDITS++ guides with unconditional predictions; {backbone.family} has none (no CFG)")
    if o.edit_prompts is None:
        pairs = derive_concepts(config.source_prompt, config.target_prompt, o.concepts)
        prompts = [p for p, _ in pairs]
        directions = [r for _, r in pairs]
        for name in PER_CONCEPT:  # the lists agree with each other (LeditsOptions); here with the derived count
            value = getattr(o, name)
            if isinstance(value, tuple) and len(value) != len(prompts):
                raise ValueError(f"{name} has {len(value)} values for {len(prompts)} edit concepts (derived from "
                                 f"the prompts: {prompts})")  # fmt: skip
        if o.reverse is not False:
            directions = _per_concept(o.reverse, len(prompts))
    else:
        prompts = list(o.edit_prompts)
        directions = _per_concept(o.reverse, len(prompts))
    n = len(prompts)
    backbone.check_prompts(prompts)
    values = zip(
        prompts,
        directions,
        _per_concept(o.scales, n),
        _per_concept(o.thresholds, n),
        _per_concept(o.warmup, n),
        _per_concept(o.cooldown, n),
        strict=True,
    )
    concepts = [
        Concept(p, reverse=bool(r), scale=float(s), threshold=float(t), warmup=int(w), cooldown=c)
        for p, r, s, t, w, c in values
    ]
    positions = [concept_token_positions(backbone, c.prompt, o.attention_tokens) for c in concepts]
    selector = map_layer_selector(backbone, o.map_downsample) if o.masks != "noise" else (lambda info: False)
    log.info("LEDITS++ concepts: %s", [(c.prompt, "-" if c.reverse else "+") for c in concepts])
    base = config.source_prompt if o.base_prompt == "source" else o.base_prompt
    return SemanticGuidance(
        concepts, positions, selector, masks=o.masks, noise_mask_after=o.noise_mask_after, base_prompt=base
    )
