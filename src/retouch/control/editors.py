"""Registry of attention editors (policies) and their factories.

A factory builds a configured editor for one run: ``factory(backbone, config, options)``, where ``options`` is
the editor's frozen options dataclass (:class:`~retouch.control.options.EditorOptions`), built and validated
from the dict that presets, the CLI's ``--option KEY=VALUE``, the app and the Python API give
(:meth:`EditorSpec.build`); unknown options are an error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from retouch.backbones.base import Backbone, LayerInfo
from retouch.control.compose import ComposedEditor
from retouch.control.contract import AttentionEditor, IdentityEditor
from retouch.control.disentangle import make_disentangle
from retouch.control.kv_edit import LINEAR_ATTENTION_REFUSAL, make_kv_edit
from retouch.control.ledits import make_ledits
from retouch.control.masactrl import MutualSelfAttention
from retouch.control.options import (
    EditorOptions,
    check_options,
    declared_options,
    option_types,
    options_class,
    takes_options,
)
from retouch.control.p2p import (
    MODES,
    LocalBlend,
    PromptToPrompt,
    align_prompts,
    below_full_resolution,
    quarter_level,
    word_positions,
)
from retouch.control.p2p_zero import make_p2p_zero
from retouch.control.pnp import make_pnp
from retouch.control.steps import count_of
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

    @property
    def options(self) -> type[EditorOptions]:
        """The editor's options dataclass (declared with the factory, or generated from its keywords)."""
        return options_class(self.factory, self.name)

    def make_options(self, options: Mapping[str, Any], owner: str | None = None) -> EditorOptions:
        """The options object: unknown names and wrong types raise ``ValueError`` naming ``owner`` (default the
        method), then the dataclass's value rules run."""
        self.check_options(options, owner)
        return self.options(**options)

    def build(self, backbone: Backbone, config: Any, options: Mapping[str, Any]) -> AttentionEditor | None:
        opts = self.make_options(options)
        if declared_options(self.factory) is None:  # a factory with keyword options
            return self.factory(backbone, config, **opts.as_kwargs())
        return self.factory(backbone, config, opts)

    def check_options(self, options: Mapping[str, Any], owner: str | None = None) -> None:
        """Option names and value types only (the value rules run in :meth:`make_options`)."""
        check_options(option_types(self.options), options, owner or f"method {self.name!r}")


def _identity(backbone: Backbone, config: Any, materialize: bool = False) -> AttentionEditor:
    return IdentityEditor(materialize=materialize)


def _text_rules(o: P2POptions | UnifiedOptions) -> None:
    """P2P's rules, shared by the unified control: ``mode`` a P2P mode, step fractions in [0, 1], and
    ``blend_words`` ("source_word target_word" or ``[source words, target words]``, each a string of words or a
    list) normalised to ``((source words), (target words))``, or ``None`` when empty (no local blend)."""
    o.check_choice("mode", MODES)
    for name in ("cross_steps", "self_steps"):
        if not 0.0 <= getattr(o, name) <= 1.0:
            raise o.error(name, f"must be a fraction in [0, 1], got {getattr(o, name)}")
    words = o.blend_words
    if not words:
        o.normalise("blend_words", None)
    elif isinstance(words, str):
        if len(words.split()) != 2:
            raise o.error("blend_words", f"as a string is 'source_word target_word', got {words!r}")
        o.normalise("blend_words", tuple((w,) for w in words.split()))
    elif len(words) != 2 or not all(isinstance(w, (str, list, tuple)) for w in words):
        raise o.error("blend_words", f"as a list is [source words, target words], got {words!r}")
    else:
        o.normalise("blend_words", tuple(tuple(w.split() if isinstance(w, str) else map(str, w)) for w in words))


@dataclass(frozen=True, kw_only=True)
class P2POptions(EditorOptions):
    """Prompt-to-Prompt (:func:`make_p2p`)."""

    method: ClassVar[str] = "p2p"
    mode: str = "auto"
    cross_steps: float = 0.8
    self_steps: float = 0.4
    self_max_tokens: int | None = None
    blend_words: str | Sequence[Any] | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    reweight: dict[str, float] | None = None
    blend_map_size: int | None = None
    blend_reweight: float | None = None

    def validate(self) -> None:
        _text_rules(self)


@takes_options(P2POptions)
def make_p2p(backbone: Backbone, config: Any, o: P2POptions) -> PromptToPrompt:
    """Prompt-to-Prompt. ``blend_words``: "source_word target_word" (PIE-Bench's blended_word) or
    ``[[source words], [target words]]`` enables local blend; ``reweight``: {target word: factor}.

    Resolution constants follow the latent size: self-attention is replaced below the full-resolution level
    (``self_max_tokens`` adds a token cap), local blend reads the layers at ¼ of the latent side at that size
    (``blend_map_size`` overrides the size). ``blend_reweight``: with blend words, also reweight the target
    blend words by this factor (PnP-Inversion's PIE-Bench runs pass ``eq_params`` of 2 on them)."""
    segments = backbone.text_segments()
    src, tgt = config.source_prompt, config.target_prompt
    sw, tw = o.blend_words or ((), ())
    reweight = o.reweight
    if o.blend_reweight is not None and tw:
        reweight = {**{w: float(o.blend_reweight) for w in tw}, **(reweight or {})}
    alignment = align_prompts(segments, src, tgt, mode=o.mode, reweight=reweight)
    blend = None
    if o.blend_words:
        blend = LocalBlend(
            word_positions(segments, src, list(sw)),
            word_positions(segments, tgt, list(tw)),
            threshold=o.blend_threshold,
            start=o.blend_start,
            map_size=o.blend_map_size,
            layers=quarter_level(backbone.attention_layers().values()),
        )
    return PromptToPrompt(
        alignment,
        cross_steps=o.cross_steps,
        self_steps=o.self_steps,
        self_layers=below_full_resolution(backbone.attention_layers().values()),
        self_max_tokens=o.self_max_tokens,
        local_blend=blend,
    )


def _attention_kinds(backbone: Backbone) -> tuple[str, ...]:
    kinds = {i.kind for i in backbone.attention_layers().values()}
    return (
        ("self",)
        if "self" in kinds and not kinds & {"joint", "single"}
        else tuple(k for k in ("joint", "single", "self") if k in kinds)
    )


@dataclass(frozen=True, kw_only=True)
class MasaCtrlOptions(EditorOptions):
    """MasaCtrl (:func:`make_masactrl`); step and layer options are counts or fractions (``control/steps.py``)."""

    method: ClassVar[str] = "masactrl"
    start_step: float | int | None = None
    end_step: float | int | None = None
    start_layer: float | int | None = None
    share: str = "kv"

    def validate(self) -> None:
        self.check_steps("start_step", "end_step", "start_layer")
        self.check_choice("share", ("kv", "v"))


@takes_options(MasaCtrlOptions)
def make_masactrl(backbone: Backbone, config: Any, o: MasaCtrlOptions) -> MutualSelfAttention:
    """MasaCtrl mutual self-attention (K/V of the source for the target's queries).

    ``start_layer``: first transformer-block depth (int) or fraction of the depth (float); default
    MasaCtrl's 10 of 16 on UNets and the deeper half of DiTs (DiT4Edit's "deep layers carry layout").
    ``start_step``: default MasaCtrl's 4 (of 50); on a step-distilled model the same fraction of its steps.
    ``share``: ``kv`` (MasaCtrl) or ``v`` (RF-Solver-Edit's value injection)."""
    layers = backbone.attention_layers()
    max_depth = max(i.depth for i in layers.values()) + 1
    start_layer = backbone.masactrl_start_layer if o.start_layer is None else o.start_layer  # adapter's default
    first = count_of(start_layer, max_depth)
    kinds = _attention_kinds(backbone)
    num_steps = int(config.num_steps)
    start_step = (4 / 50 if backbone.step_distilled else 4) if o.start_step is None else o.start_step
    first_step = count_of(start_step, num_steps)
    if first_step >= num_steps:
        log.warning("MasaCtrl start_step=%s leaves none of the %d steps: mutual self-attention is off", start_step,
                    num_steps)  # fmt: skip

    def select(info: LayerInfo) -> bool:
        return info.kind in kinds and info.depth >= first

    if not any(select(i) for i in layers.values()):
        raise ValueError(f"start_layer={start_layer} selects no layer ({max_depth} blocks)")
    return MutualSelfAttention(
        start_step=first_step,
        end_step=None if o.end_step is None else count_of(o.end_step, num_steps),
        layers=select,
        share=o.share,
    )


@dataclass(frozen=True, kw_only=True)
class UnifiedOptions(EditorOptions):
    """DiT4Edit's unified control (:func:`make_unified`): the P2P options it passes on, and MasaCtrl's steps."""

    method: ClassVar[str] = "unified"
    mode: str = "auto"
    cross_steps: float = 0.4
    self_steps: float = 0.0
    blend_words: str | Sequence[Any] | None = None
    blend_threshold: float = 0.3
    blend_start: float = 0.2
    reweight: dict[str, float] | None = None
    start_step: float | int = 0.1
    start_layer: float | int | None = 0.5

    def validate(self) -> None:
        _text_rules(self)
        self.check_steps("start_step", "start_layer")


@takes_options(UnifiedOptions)
def make_unified(backbone: Backbone, config: Any, o: UnifiedOptions) -> ComposedEditor:
    """DiT4Edit's unified attention control: P2P on text attention + mutual self-attention past
    ``start_step`` on blocks from ``start_layer`` (our reconstruction; the paper's code was not released)."""
    p2p_names = {f.name for f in fields(P2POptions)}
    p2p = make_p2p(backbone, config, **{k: v for k, v in o.as_kwargs().items() if k in p2p_names})
    masa = make_masactrl(backbone, config, start_step=o.start_step, start_layer=o.start_layer)
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


@dataclass(frozen=True, kw_only=True)
class ValueReplayOptions(EditorOptions):
    """RF-Solver-Edit / FireFlow value replay (:func:`make_value_replay`)."""

    method: ClassVar[str] = "value_replay"
    inject: int = 2
    start_layer: float | int = 20 / 38

    def validate(self) -> None:
        self.check_min("inject", 0)
        self.check_steps("start_layer")


@takes_options(ValueReplayOptions)
def make_value_replay(backbone: Backbone, config: Any, o: ValueReplayOptions) -> InversionValueReplay:
    """RF-Solver-Edit / FireFlow feature sharing as their code does it: values of the single-stream blocks from
    ``start_layer`` (index among them, or a fraction: 20/38 is FLUX.1's ``id > 19``) stored during inversion and
    replayed in the first ``inject`` sampling steps, target branch only."""
    singles = sorted((i for i in backbone.attention_layers().values() if i.kind == "single"), key=lambda i: i.depth)
    if not singles:
        raise ValueError(f"value replay acts on single-stream blocks; {backbone.family} has none")
    first = count_of(o.start_layer, len(singles))
    if first >= len(singles):
        raise ValueError(f"start_layer={o.start_layer} selects none of the {len(singles)} single-stream blocks")
    chosen = {i.name for i in singles[first:]}
    # more than num_steps means every step, as the references' inject lists do
    return InversionValueReplay(inject=min(o.inject, int(config.num_steps)), layers=lambda info: info.name in chosen)


@dataclass(frozen=True, kw_only=True)
class FlowEditOptions(EditorOptions):
    """FlowEdit (:func:`make_flowedit`)."""

    method: ClassVar[str] = "flowedit"
    n_max: int = 24
    n_min: int = 0
    n_avg: int = 1
    source_guidance: float | None = None

    def validate(self) -> None:
        self.check_min("n_max", 0)
        self.check_min("n_min", 0)
        if self.n_min > self.n_max:
            raise self.error("n_min", f"must be <= n_max ({self.n_max}), got {self.n_min}")
        self.check_min("n_avg", 1)
        self.check_min("source_guidance", 0)


@takes_options(FlowEditOptions)
def make_flowedit(backbone: Backbone, config: Any, o: FlowEditOptions) -> FlowEditMethod:
    """FlowEdit's inversion-free ODE; the run's guidance is the target scale, ``source_guidance`` the source's
    (default: the run's guidance; the presets give the papers' scales, and a step-distilled model, which runs
    without guidance, keeps one scale for both branches).
    ``n_max`` above the number of steps integrates every step (as the reference's ``T_steps - i > n_max`` test)."""
    n_max = min(o.n_max, int(config.num_steps))
    if o.n_min > n_max:  # n_min <= n_max holds (FlowEditOptions): only the run's step count can break it
        raise ValueError(f"FlowEdit's n_min={o.n_min} exceeds the {config.num_steps} steps of this run")
    source_guidance = o.source_guidance
    if source_guidance is None:
        run = getattr(config, "guidance", None)
        source_guidance = backbone.default_guidance if run is None else run
    return FlowEditMethod(n_max=n_max, n_min=o.n_min, n_avg=o.n_avg, source_guidance=float(source_guidance))


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
