"""Plug-and-Play diffusion features (Tumanyan et al., CVPR 2023) on every backbone family.

PnP translates an image by injecting the *source* branch's internal representations into the *target*
branch while it is generated under the target prompt (paper §4, "Plug-and-Play Diffusion Features"):

* **feature injection** — the output ``f_t`` of a spatial block of the target branch is replaced by the
  source branch's ``f*_t`` for the first ``feature_steps`` of sampling (``tau_f = 0.8``);
* **self-attention injection** — the target's self-attention *queries and keys* (not values) are replaced
  by the source's, i.e. the self-attention map ``A_t = softmax(Q_t K_t^T / sqrt d)`` becomes the source's
  ``A*_t`` while the target's own values are kept, for the first ``attn_steps``
  (``tau_A = 0.5``).

Both act per CFG half: the unconditional target row receives the unconditional source row, the conditional
target row the conditional source row. Features go through removable forward hooks (:meth:`PlugAndPlay.install`,
restored on exit whatever happens); Q/K injection goes through ``edit_qkv``, so the fused
``scaled_dot_product_attention`` path stays.

Per-family defaults (``feature_layers`` / ``attn_layers`` override them):

* SD UNet: the PnP layers — feature ``up_blocks.1.resnets.1``; Q/K on the decoder's self-attention layers
  except the first transformer of the decoder (for SD 1.x: ``up_blocks.1.attentions.1-2`` and
  ``up_blocks.2-3.attentions.*``, as released);
* PixArt: feature = output of the middle transformer block; Q/K on self-attention of the deeper half;
* SD3 / Flux: feature = image stream (element 1) of the middle block; Q/K of the *image tokens* of joint
  (and Flux single-stream) attention in the deeper half, text tokens untouched. (Our choice: the paper
  defines PnP for the SD UNet only. A DiT has no skip connections, so a late feature injection would erase
  the target prompt's effect; the middle block leaves the deeper half to the target prompt.)

On UNets the injected feature is the block's *residual branch* (``conv2``'s output, before the skip
connection is added), as the released code (``register_conv_control_efficient``) does; the target keeps its own
skip path. ``feature_point="output"`` injects the whole block output instead (and is what DiT blocks always do).

The released PnP / PnP-Inversion setup (``run_editing_pnp.py``) runs the source ("pnp guidance") row under the
empty prompt without CFG and gives the target a negative prompt; by default the source branch here is the
engine's (source prompt, same guidance). ``source_prompt=""`` and ``negative_prompt="ugly, blurry, black, low
res, unrealistic"`` (the ``direct+pnp_ref`` preset) reproduce the released code: the inversion still runs under
the user's source prompt, the source branch is conditioned on ``source_prompt`` in both CFG halves (its guided
prediction is then its conditional one: no CFG) and the target's unconditional row on ``negative_prompt``. With
Direct Inversion (``direct+pnp``) the source latents are pinned to the inversion latents ``z*_t`` — exactly how
PnP Inversion plugs into PnP.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from retouch.backbones.base import Backbone, LayerInfo
from retouch.control.context import AttnContext, BatchLayout
from retouch.control.contract import Editor
from retouch.control.options import EditorOptions, takes_options
from retouch.control.steps import count_of
from retouch.types import Conditioning

log = logging.getLogger(__name__)

LayerSpec = str | Sequence[str] | float | int | None


def copy_source_rows(t: Tensor, layout: BatchLayout, positions: slice | None = None) -> Tensor:
    """Return ``t`` (``[halves*branches, ...]``) with every target row replaced by the source row of the
    same CFG half, optionally only over ``positions`` of dim 2 (``[B, heads, S, d]`` token slices)."""
    out = t.clone()
    idx = (slice(None), positions) if positions is not None else ()
    for cond in (False, True) if layout.cfg else (True,):
        src = layout.row(0, cond)
        for b in range(1, layout.branches):
            out[(layout.row(b, cond), *idx)] = t[(src, *idx)]
    return out


def _depth_select(infos: Sequence[LayerInfo], first: float | int) -> list[LayerInfo]:
    max_depth = max(i.depth for i in infos) + 1
    start = count_of(first, max_depth)  # checked by PnPOptions
    return [i for i in infos if i.depth >= start]


def default_feature_layers(backbone: Backbone) -> list[str]:
    """PnP's feature block(s): the backbone's declared default (:meth:`Backbone.pnp_feature_layers`)."""
    return backbone.pnp_feature_layers()


def default_attn_layers(backbone: Backbone) -> list[str]:
    """PnP's Q/K-injection layers: the backbone's declared default (:meth:`Backbone.pnp_attention_layers`)."""
    return backbone.pnp_attention_layers()


def _resolve_layers(spec: LayerSpec, table: dict[str, LayerInfo], default: list[str], label: str) -> list[str]:
    """``None``: the default; a number: every entry of ``table`` from that depth (index or fraction);
    a string / list of strings: module paths (validated)."""
    if spec is None:
        return default
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        chosen = [i.name for i in _depth_select(list(table.values()), spec)]
        if not chosen:
            raise ValueError(f"{label}={spec!r} selects no layer")
        return chosen
    names = [spec] if isinstance(spec, str) else [str(s) for s in spec]
    unknown = [n for n in names if n not in table]
    if unknown:
        sample = ", ".join(list(table)[:6])
        raise ValueError(f"{label}: unknown module path(s) {unknown}; known e.g. {sample} ...")
    return names


class PlugAndPlay(Editor):
    """The PnP editor: feature injection (forward hooks) + self-attention Q/K injection (``edit_qkv``).

    Args:
        feature_layers: module paths (keys of ``backbone.feature_blocks()``) whose output is injected.
        feature_kinds: their ``LayerInfo.kind`` (``"resnet"``/``"dit"``: tensor output; ``"joint"``/``"single"``:
            ``(text, image)`` tuple whose element 1 is injected).
        feature_steps: number of first sampling steps with feature injection.
        attn_layers: attention module paths with Q/K injection.
        attn_steps: number of first sampling steps with Q/K injection.
    """

    def __init__(
        self,
        *,
        feature_layers: dict[str, str],
        feature_steps: int,
        attn_layers: Sequence[str],
        attn_steps: int,
        sequence_layers: dict[str, LayerInfo] | None = None,
        hook_paths: dict[str, str] | None = None,
        backbone: Backbone | None = None,
        source_prompt: str | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        if (source_prompt is not None or negative_prompt is not None) and backbone is None:
            raise ValueError("source_prompt / negative_prompt need the backbone to encode them")
        self.hook_paths = dict(hook_paths or {})  # feature block -> module hooked (its residual branch)
        self.backbone = backbone
        self.source_prompt = source_prompt
        self.negative_prompt = negative_prompt
        self.feature_layers = dict(feature_layers)
        self.feature_steps = feature_steps
        self.attn_layers = frozenset(attn_layers)
        self.attn_steps = attn_steps
        self.sequence_layers = dict(sequence_layers or {})  # LayerInfo of "sequence" feature blocks
        self.injected_features = 0  # number of hook calls that replaced target rows (diagnostics)

    # --- attention policy -------------------------------------------------------------------------
    def applies(self, ctx: AttnContext) -> bool:
        return (
            ctx.phase == "sample"
            and ctx.layout.branches >= 2
            and 0 <= ctx.step < self.attn_steps
            and ctx.layer.name in self.attn_layers
        )

    def edit_qkv(self, q: Tensor, k: Tensor, v: Tensor, ctx: AttnContext) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention injection (§4): target Q, K <- source Q, K (image tokens only in joint attention)."""
        img = ctx.image_slice(q.shape[2]) if ctx.layer.kind in ("joint", "single") else None
        return copy_source_rows(q, ctx.layout, img), copy_source_rows(k, ctx.layout, img), v

    # --- the released code's prompts (reference mode) ---------------------------------------------------
    def _encode(self, text: str, like: Conditioning) -> Conditioning:
        assert self.backbone is not None
        with torch.no_grad():
            enc = self.backbone.encode_prompt([text])
        return enc.to(device=like.tensors[next(iter(like.tensors))].device)

    def prepare_conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        """``source_prompt``: the source branch's conditioning (the inversion keeps the user's source prompt)."""
        if self.source_prompt is None:
            return cond
        return Conditioning.cat([self._encode(self.source_prompt, cond), cond.select(list(range(1, cond.batch_size)))])

    def wrap_model(self, model: Any) -> Any:
        """``source_prompt``: the source row's unconditional half gets it too (CFG then returns its conditional
        prediction); ``negative_prompt``: the target rows' unconditional half."""
        if self.source_prompt is None and self.negative_prompt is None:
            return model
        uncond = model.uncond
        if uncond is None:
            raise ValueError("source_prompt / negative_prompt need classifier-free guidance (guidance != 1)")
        rows = [self._encode(self.source_prompt, uncond) if self.source_prompt is not None else uncond.select([0])]
        for b in range(1, uncond.batch_size):
            rows.append(self._encode(self.negative_prompt, uncond) if self.negative_prompt is not None
                        else uncond.select([b]))  # fmt: skip
        model.set_uncond(Conditioning.cat(rows))
        return model

    # --- feature injection ------------------------------------------------------------------------
    def _hook(self, kind: str, state: Any, info: LayerInfo | None = None) -> Callable[..., Any]:
        tuple_out = kind in ("joint", "single")

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            if state.phase != "sample" or not 0 <= state.step < self.feature_steps:
                return None
            layout: BatchLayout = state.layout
            feats = output[1] if tuple_out else output
            if layout.branches < 2 or feats is None or feats.shape[0] != layout.size:
                return None
            self.injected_features += 1
            if kind == "sequence":  # [B, S, D] text + image tokens: inject the image tokens only
                h, w = info.resolution(state.latent_hw)
                n = feats.shape[1]
                img = slice(n - h * w, n) if info.text_first else slice(0, h * w)
                out = feats.clone()
                out[:, img] = copy_source_rows(feats[:, img], layout)
                return out
            feats = copy_source_rows(feats, layout)
            return (output[0], feats, *output[2:]) if tuple_out else feats

        return hook

    @contextmanager
    def install(self, backbone: Backbone, state: Any) -> Iterator[None]:
        """Register the feature hooks; remove them on exit (also on error)."""
        den = backbone.denoiser
        handles = []
        try:
            for name, kind in self.feature_layers.items():
                hook = self._hook(kind, state, self.sequence_layers.get(name))
                handles.append(den.get_submodule(self.hook_paths.get(name, name)).register_forward_hook(hook))
            yield
        finally:
            for h in handles:
                h.remove()


@dataclass(frozen=True, kw_only=True)
class PnPOptions(EditorOptions):
    """Plug-and-Play (:func:`make_pnp`); the layer options are resolved against the model by the factory."""

    method: ClassVar[str] = "pnp"
    feature_steps: float | int = 0.8
    attn_steps: float | int = 0.5
    feature_layers: LayerSpec = None
    attn_layers: LayerSpec = None
    feature_point: str = "residual"
    source_prompt: str | None = None
    negative_prompt: str | None = None

    def validate(self) -> None:
        self.check_steps("feature_steps", "attn_steps")
        for name in ("feature_layers", "attn_layers"):  # a depth (count or fraction), or module path(s)
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                self.check_steps(name)
            elif value is not None and not isinstance(value, str):
                self.normalise(name, tuple(str(v) for v in value))
        self.check_choice("feature_point", ("residual", "output"))


@takes_options(PnPOptions)
def make_pnp(backbone: Backbone, config: Any, o: PnPOptions) -> PlugAndPlay:
    """Plug-and-Play (Tumanyan et al. 2023).

    Options:
        feature_steps: fraction (float) or count (int) of the first steps with feature injection (0.8).
        attn_steps: fraction or count of the first steps with self-attention Q/K injection (0.5).
        feature_layers: module path(s) of ``backbone.feature_blocks()``, a depth (int) / depth fraction (float)
            from which every feature block is injected, or ``[]`` for none; default per family (module doc).
        attn_layers: attention module path(s), or a depth / depth fraction of self / joint / single layers;
            ``[]`` for none; default per family.
        feature_point: ``"residual"`` (UNet blocks: the residual branch before the skip is added, as released)
            or ``"output"`` (the whole block output; DiT blocks always).
        source_prompt: the source branch's prompt (``""`` in the released code); ``None``: the engine's.
        negative_prompt: the target's unconditional prompt (the released code's
            ``"ugly, blurry, black, low res, unrealistic"``); ``None``: the engine's empty prompt.
    """
    feature_layers, attn_layers = o.feature_layers, o.attn_layers
    try:
        blocks = backbone.feature_blocks()
    except NotImplementedError as exc:
        raise ValueError(f"Plug-and-Play needs feature blocks: {exc}") from None
    num_steps = int(config.num_steps)
    feats = _resolve_layers(
        feature_layers, blocks, default_feature_layers(backbone) if feature_layers is None else [], "feature_layers"
    )
    attn_table = {n: i for n, i in backbone.attention_layers().items() if i.kind in ("self", "joint", "single")}
    attn = _resolve_layers(
        attn_layers, attn_table, default_attn_layers(backbone) if attn_layers is None else [], "attn_layers"
    )
    log.debug("PnP on %s: features %s, Q/K on %d layers", backbone.family, feats, len(attn))
    hook_paths = {}
    if o.feature_point == "residual":
        for n in feats:
            branch = backbone.residual_branch(n) if blocks[n].kind == "resnet" else None
            if branch is not None:
                hook_paths[n] = branch
    return PlugAndPlay(
        feature_layers={n: blocks[n].kind for n in feats},
        feature_steps=count_of(o.feature_steps, num_steps),
        attn_layers=attn,
        attn_steps=count_of(o.attn_steps, num_steps),
        sequence_layers={n: blocks[n] for n in feats if blocks[n].kind == "sequence"},
        hook_paths=hook_paths,
        backbone=backbone if o.source_prompt is not None or o.negative_prompt is not None else None,
        source_prompt=o.source_prompt,
        negative_prompt=o.negative_prompt,
    )
