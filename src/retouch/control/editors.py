"""Registry of attention editors (policies) and their factories.

A factory builds a configured editor for one run: ``factory(backbone, config, **options)``. Options come
from presets and from the CLI's ``--option KEY=VALUE``; unknown options are an error.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from retouch.backbones.base import Backbone, LayerInfo
from retouch.control.compose import ComposedEditor
from retouch.control.contract import AttentionEditor, IdentityEditor
from retouch.control.disentangle import make_disentangle
from retouch.control.kv_edit import LINEAR_ATTENTION_REFUSAL, make_kv_edit
from retouch.control.ledits import make_ledits
from retouch.control.masactrl import MutualSelfAttention
from retouch.control.options import check_options, option_types
from retouch.control.p2p import (
    LocalBlend,
    PromptToPrompt,
    align_prompts,
    below_full_resolution,
    quarter_level,
    word_positions,
)
from retouch.control.p2p_zero import make_p2p_zero
from retouch.control.pnp import make_pnp
from retouch.control.steps import to_steps
from retouch.control.value_replay import InversionValueReplay
from retouch.flowedit import FlowEditMethod
from retouch.inversion.rf import RFReverseControl

log = logging.getLogger(__name__)

ALL_FAMILIES = ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage")


@dataclass(frozen=True)
class EditorSpec:
    name: str
    factory: Callable[..., AttentionEditor | None]
    families: tuple[str, ...]
    description: str
    # family -> why the editor cannot apply there (appended to the refusal; the factory checks it on the model)
    refused: Mapping[str, str] = field(default_factory=dict)

    def build(self, backbone: Backbone, config: Any, options: dict[str, Any]) -> AttentionEditor | None:
        self.check_options(options)
        return self.factory(backbone, config, **options)

    def check_options(self, options: dict[str, Any], owner: str | None = None) -> None:
        """Option names and value types against the factory's declared types (:mod:`retouch.control.options`)."""
        params = inspect.signature(self.factory).parameters
        accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        check_options(option_types(self.factory), options, owner or f"method {self.name!r}", extra=accepts_any)


def _split_words(words: str | Sequence[str] | None) -> list[str]:
    if words is None:
        return []
    return words.split() if isinstance(words, str) else [str(w) for w in words]


def _identity(backbone: Backbone, config: Any, materialize: bool = False) -> AttentionEditor:
    return IdentityEditor(materialize=materialize)


def make_p2p(
    backbone: Backbone,
    config: Any,
    mode: str = "auto",
    cross_steps: float = 0.8,
    self_steps: float = 0.4,
    self_max_tokens: int | None = None,
    blend_words: str | Sequence[Any] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    reweight: dict[str, float] | None = None,
    blend_map_size: int | None = None,
    blend_reweight: float | None = None,
) -> PromptToPrompt:
    """Prompt-to-Prompt. ``blend_words``: "source_word target_word" (PIE-Bench's blended_word) or
    ``[[source words], [target words]]`` enables local blend; ``reweight``: {target word: factor}.

    Resolution constants follow the latent size: self-attention is replaced below the full-resolution level
    (``self_max_tokens`` adds a token cap), local blend reads the layers at ¼ of the latent side at that size
    (``blend_map_size`` overrides the size). ``blend_reweight``: with blend words, also reweight the target
    blend words by this factor (PnP-Inversion's PIE-Bench runs pass ``eq_params`` of 2 on them)."""
    segments = backbone.text_segments()
    src, tgt = config.source_prompt, config.target_prompt
    blend = None
    sw: list[str] = []
    tw: list[str] = []
    if blend_words:
        if isinstance(blend_words, str):
            parts = blend_words.split()
            if len(parts) != 2:
                raise ValueError("blend_words as a string is 'source_word target_word'")
            sw, tw = [parts[0]], [parts[1]]
        else:
            sw, tw = _split_words(blend_words[0]), _split_words(blend_words[1])
    if blend_reweight is not None and tw:
        reweight = {**{w: float(blend_reweight) for w in tw}, **(reweight or {})}
    alignment = align_prompts(segments, src, tgt, mode=mode, reweight=reweight)
    if blend_words:
        blend = LocalBlend(
            word_positions(segments, src, sw),
            word_positions(segments, tgt, tw),
            threshold=blend_threshold,
            start=blend_start,
            map_size=blend_map_size,
            layers=quarter_level(backbone.attention_layers().values()),
        )
    return PromptToPrompt(
        alignment,
        cross_steps=cross_steps,
        self_steps=self_steps,
        self_layers=below_full_resolution(backbone.attention_layers().values()),
        self_max_tokens=self_max_tokens,
        local_blend=blend,
    )


def _attention_kinds(backbone: Backbone) -> tuple[str, ...]:
    kinds = {i.kind for i in backbone.attention_layers().values()}
    return (
        ("self",)
        if "self" in kinds and not kinds & {"joint", "single"}
        else tuple(k for k in ("joint", "single", "self") if k in kinds)
    )


def make_masactrl(
    backbone: Backbone,
    config: Any,
    start_step: float | int | None = None,
    end_step: float | int | None = None,
    start_layer: float | int | None = None,
    share: str = "kv",
) -> MutualSelfAttention:
    """MasaCtrl mutual self-attention (K/V of the source for the target's queries).

    ``start_layer``: first transformer-block depth (int) or fraction of the depth (float < 1); default
    MasaCtrl's 10 of 16 on UNets and the deeper half of DiTs (DiT4Edit's "deep layers carry layout").
    ``start_step``: default MasaCtrl's 4 (of 50); on a step-distilled model the same fraction of its steps."""
    layers = backbone.attention_layers()
    max_depth = max(i.depth for i in layers.values()) + 1
    if start_layer is None:
        start_layer = backbone.masactrl_start_layer  # the adapter's declared default
    first = to_steps(start_layer, max_depth, "start_layer")
    kinds = _attention_kinds(backbone)
    num_steps = int(config.num_steps)
    if start_step is None:
        start_step = 4 / 50 if backbone.step_distilled else 4
    first_step = to_steps(start_step, num_steps, "start_step")
    if first_step >= num_steps:
        log.warning("MasaCtrl start_step=%s leaves none of the %d steps: mutual self-attention is off", start_step,
                    num_steps)  # fmt: skip

    def select(info: LayerInfo) -> bool:
        return info.kind in kinds and info.depth >= first

    if not any(select(i) for i in layers.values()):
        raise ValueError(f"start_layer={start_layer} selects no layer ({max_depth} blocks)")
    return MutualSelfAttention(
        start_step=first_step,
        end_step=None if end_step is None else to_steps(end_step, num_steps, "end_step"),
        layers=select,
        share=share,
    )


def make_unified(
    backbone: Backbone,
    config: Any,
    mode: str = "auto",
    cross_steps: float = 0.4,
    self_steps: float = 0.0,
    blend_words: str | Sequence[Any] | None = None,
    blend_threshold: float = 0.3,
    blend_start: float = 0.2,
    reweight: dict[str, float] | None = None,
    start_step: float | int = 0.1,
    start_layer: float | int | None = 0.5,
) -> ComposedEditor:
    """DiT4Edit's unified attention control: P2P on text attention + mutual self-attention past
    ``start_step`` on blocks from ``start_layer`` (our reconstruction; the paper's code was not released)."""
    p2p = make_p2p(backbone, config, mode=mode, cross_steps=cross_steps, self_steps=self_steps,
                   blend_words=blend_words, blend_threshold=blend_threshold, blend_start=blend_start,
                   reweight=reweight)  # fmt: skip
    masa = make_masactrl(backbone, config, start_step=start_step, start_layer=start_layer)
    return ComposedEditor([p2p, masa])


def make_rf_control(
    backbone: Backbone,
    config: Any,
    eta: float = 0.9,
    start: float = 0.0,
    stop: float = 0.25,
    source_branch: bool = False,
) -> RFReverseControl:
    """RF-Inversion's controlled reverse ODE (guidance of the velocity towards the image latent).

    ``source_branch``: also sample the source prompt beside the target (only for a reconstruction to look at:
    the control never reads it; the paper's pipeline samples the target alone)."""
    return RFReverseControl(eta=eta, start=start, stop=stop, source_branch=bool(source_branch))


def make_value_replay(
    backbone: Backbone, config: Any, inject: int = 2, start_layer: float | int = 20 / 38
) -> InversionValueReplay:
    """RF-Solver-Edit / FireFlow feature sharing as their code does it: values of the single-stream blocks from
    ``start_layer`` (index among them, or a fraction: 20/38 is FLUX.1's ``id > 19``) stored during inversion and
    replayed in the first ``inject`` sampling steps, target branch only."""
    singles = sorted((i for i in backbone.attention_layers().values() if i.kind == "single"), key=lambda i: i.depth)
    if not singles:
        raise ValueError(f"value replay acts on single-stream blocks; {backbone.family} has none")
    first = to_steps(start_layer, len(singles), "start_layer")
    if first >= len(singles):
        raise ValueError(f"start_layer={start_layer} selects none of the {len(singles)} single-stream blocks")
    chosen = {i.name for i in singles[first:]}
    if int(inject) < 0:
        raise ValueError(f"inject must be >= 0 steps, got {inject}")
    # more than num_steps means every step, as the references' inject lists do
    return InversionValueReplay(inject=min(int(inject), int(config.num_steps)), layers=lambda info: info.name in chosen)


def make_flowedit(
    backbone: Backbone,
    config: Any,
    n_max: int = 24,
    n_min: int = 0,
    n_avg: int = 1,
    source_guidance: float | None = None,
) -> FlowEditMethod:
    """FlowEdit's inversion-free ODE; the run's guidance is the target scale, ``source_guidance`` the source's
    (default: the run's guidance; the presets give the papers' scales, and a step-distilled model, which runs
    without guidance, keeps one scale for both branches).
    ``n_max`` above the number of steps integrates every step (as the reference's ``T_steps - i > n_max`` test)."""
    n_max = min(int(n_max), int(config.num_steps))
    if not 0 <= int(n_min) <= n_max:
        raise ValueError(
            f"FlowEdit needs 0 <= n_min <= n_max (= {n_max} at {config.num_steps} steps), got n_min={n_min}"
        )
    if source_guidance is None:
        run = getattr(config, "guidance", None)
        source_guidance = backbone.default_guidance if run is None else run
    return FlowEditMethod(n_max=n_max, n_min=int(n_min), n_avg=int(n_avg), source_guidance=float(source_guidance))


EDITORS: dict[str, EditorSpec] = {
    s.name: s
    for s in (
        EditorSpec("identity", _identity, ALL_FAMILIES,
                   "no attention control: regenerates the inverted latent (reconstruction)"),
        EditorSpec("p2p", make_p2p, ALL_FAMILIES,
                   "Prompt-to-Prompt: replace/refine/reweight of text attention, self-attention injection, "
                   "local blend (cross-attention on SD/PixArt, image->text block of joint attention on SD3/Flux)"),
        EditorSpec("masactrl", make_masactrl, ALL_FAMILIES,
                   "MasaCtrl mutual self-attention (SD/PixArt); source image K/V injection in joint attention "
                   "(SD3/Flux)"),
        EditorSpec("rf_control", make_rf_control, ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage"),
                   "RF-Inversion's controlled reverse ODE: velocity pulled towards the image latent (eta)"),
        EditorSpec("value_replay", make_value_replay, ("flux",),
                   "RF-Solver-Edit / FireFlow feature sharing as released: single-stream values stored during "
                   "inversion, replayed in the first sampling steps (target branch only)"),
        EditorSpec("flowedit", make_flowedit, ALL_FAMILIES,
                   "FlowEdit: inversion-free ODE on the difference of target and source velocities (flow view of "
                   "the grid on SD / PixArt)"),
        EditorSpec("unified", make_unified, ALL_FAMILIES,
                   "DiT4Edit unified attention control: P2P + mutual self-attention on deep blocks"),
        EditorSpec("pnp", make_pnp, ALL_FAMILIES,
                   "Plug-and-Play: source block-output (feature) and self-attention Q/K injection (UNet decoder "
                   "layers on SD; middle block / deeper-half image tokens on PixArt, SD3, Flux)"),
        EditorSpec("p2p_zero", make_p2p_zero, ALL_FAMILIES,
                   "Pix2Pix-Zero: embedding edit direction + cross-attention guidance of the target latent "
                   "(text cross-attention on SD/PixArt, image->text block of joint attention on SD3/Flux)"),
        EditorSpec("disentangle", make_disentangle, ALL_FAMILIES,
                   "Wu et al. text-embedding disentanglement: per-step mixing of neutral (source) and target "
                   "embeddings; weights optimised with a directional CLIP + content loss, or loaded (weights=)"),
        EditorSpec("ledits", make_ledits, ("sd", "pixart"),
                   "LEDITS++ semantic guidance: unconditional prediction plus one masked guidance term per edit "
                   "concept (own scale / threshold / direction; implicit masks from cross-attention and noise "
                   "estimates); use with the ddpm inversion"),
        EditorSpec("kv_edit", make_kv_edit, ("pixart", "sd3", "flux", "qwenimage", "flux2", "zimage"),
                   "KV-Edit: background keys / values cached while inverting, foreground regenerated against them, "
                   "background latent pasted back (needs a mask); inversion_free=true for the cache-free variant",
                   refused={"sana": LINEAR_ATTENTION_REFUSAL}),
    )
}  # fmt: skip


def get_editor(name: str, family: str | None = None) -> EditorSpec:
    try:
        spec = EDITORS[name]
    except KeyError:
        from retouch.presets import PRESETS

        raise ValueError(f"unknown method {name!r}; choose one of {sorted({*EDITORS, *PRESETS})}") from None
    if family is not None and family not in spec.families:
        why = spec.refused.get(family)
        raise ValueError(
            f"method {name!r} does not support the {family} family (it supports {', '.join(spec.families)})"
            + (f": {why}" if why else "")
        )
    return spec
