"""The one composition point: backbone + inversion + editor + solver -> EditResult.

encode (image -> latent, prompts -> conditioning)
  -> invert (latent -> trajectory)
  -> install the editor (reversible)
  -> solve source and target branches in one batch with classifier-free guidance
  -> decode and report (timings, NFE, config, seed)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from retouch import io
from retouch.backbones.base import Backbone
from retouch.config import EditConfig, InversionConfig
from retouch.control import BatchLayout, EditState, attention_editing
from retouch.control.editors import get_editor
from retouch.inversion import get_inversion
from retouch.inversion.direct import base_inversion
from retouch.presets import get_preset
from retouch.solvers import Solver, get_solver
from retouch.types import Conditioning, NoiseGrid, Pred, Trajectory, to_x0_eps

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


class Cancelled(Exception):
    """Raised by a ``progress`` callback to stop an edit between steps (e.g. a Cancel button).

    :func:`edit` lets it through unchanged: every model modification is a context manager, so the backbone
    comes out restored and can run the next edit at once; nothing is decoded or reported.
    """


class GuidedModel:
    """``model_fn(x, k) -> Pred`` over a backbone: batches CFG, counts NFE, keeps math in float32."""

    def __init__(
        self,
        backbone: Backbone,
        grid: NoiseGrid,
        cond: Conditioning,
        uncond: Conditioning | None,
        guidance: float,
        state: EditState | None = None,
    ) -> None:
        self.backbone = backbone
        self.grid = grid
        self.cond = cond
        self.guidance = guidance
        self.cfg = backbone.uses_cfg and uncond is not None and guidance != 1.0
        self.uncond = uncond
        self.batch_cond = Conditioning.cat([uncond, cond]) if self.cfg else cond
        self.state = state
        self.nfe = 0
        self.on_eval: Callable[[int], None] | None = None

    def set_uncond(self, uncond: Conditioning) -> None:
        """Replace the unconditional conditioning (per-step embeddings of null-text inversion)."""
        self.uncond = uncond
        if self.cfg:
            self.batch_cond = Conditioning.cat([uncond, self.cond])

    def set_cond(self, cond: Conditioning) -> None:
        """Replace the conditional conditioning (per-step prompt mixing)."""
        if cond.batch_size != self.cond.batch_size:
            raise ValueError("replacement conditioning must keep the batch size")
        self.cond = cond
        self.batch_cond = Conditioning.cat([self.uncond, cond]) if self.cfg else cond

    @property
    def layout(self) -> BatchLayout:
        return BatchLayout(branches=self.cond.batch_size, cfg=self.cfg)

    def raw(self, x: Tensor, timestep: Tensor) -> Tensor:
        if x.shape[0] != self.cond.batch_size:
            raise ValueError(f"latent batch {x.shape[0]} does not match the {self.cond.batch_size} prompts")
        if self.state is not None:
            self.state.layout = self.layout
            self.state.latent_hw = (x.shape[-2], x.shape[-1])
        self.nfe += 1
        inp = torch.cat([x, x]) if self.cfg else x
        out = self.backbone.predict(inp, timestep, self.batch_cond).float()
        if not self.cfg:
            return out
        u, c = out.chunk(2)
        return u + self.guidance * (c - u)

    def __call__(self, x: Tensor, k: int) -> Pred:
        if self.on_eval is not None:
            self.on_eval(k)
        g = self.grid
        raw = self.raw(x, g.timesteps[k])
        return to_x0_eps(raw, x, g.alphas[k], g.sigmas[k], self.backbone.prediction)

    def at_sigma(self, x: Tensor, sigma: Tensor, i: int) -> Pred:
        """Evaluate off-grid on a flow grid (midpoint solvers)."""
        if self.grid.kind != "flow":
            raise ValueError("off-grid evaluation needs a flow model")
        raw = self.raw(x, sigma * 1000)
        return to_x0_eps(raw, x, 1 - sigma, sigma, self.backbone.prediction)


@dataclass
class EditResult:
    image: Image.Image  # the edited image (target branch)
    reconstruction: Image.Image  # the source branch
    report: dict[str, Any]
    latents: Tensor | None = None  # final latents [branches, C, h, w]
    trajectory: Trajectory | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Resolved:
    """An EditConfig with every default filled in for one backbone."""

    config: EditConfig
    editor: str
    solver: Solver
    inversion: str
    base_inversion: str  # the inversion actually run (differs from ``inversion`` for "direct")
    source_correction: bool
    num_steps: int
    guidance: float


def resolve(backbone: Backbone, cfg: EditConfig) -> Resolved:
    """Fill defaults (preset, then backbone) and check that method, solver and inversion fit the family."""
    preset = get_preset(cfg.method)
    if preset is not None:
        if backbone.family not in preset.families:
            raise ValueError(
                f"method {cfg.method!r} does not support the {backbone.family} family "
                f"(it supports {', '.join(preset.families)})"
            )
        cfg = cfg.with_(
            solver=cfg.solver or preset.solver,
            num_steps=cfg.num_steps or preset.num_steps,
            guidance=preset.guidance if cfg.guidance is None else cfg.guidance,
            inversion=InversionConfig(
                **{
                    **cfg.inversion.__dict__,
                    "name": cfg.inversion.name or preset.inversion,
                    "prompt": preset.inversion_prompt if cfg.inversion.prompt is None else cfg.inversion.prompt,
                    "guidance": preset.inversion_guidance if cfg.inversion.guidance is None else cfg.inversion.guidance,
                    "options": {**preset.inversion_options, **cfg.inversion.options},
                }
            ),
            options={**preset.options, **cfg.options},
        )
        editor = preset.editor
    else:
        editor = cfg.method
    get_editor(editor, backbone.family)
    inv_name = cfg.inversion.name
    if cfg.solver is not None:
        solver = get_solver(cfg.solver)
    elif inv_name is not None and get_inversion(inv_name).solver != "*":
        solver = get_solver(get_inversion(inv_name).solver)
    else:
        solver = get_solver(backbone.default_solver)
    if backbone.family not in solver.families:
        raise ValueError(f"solver {solver.name!r} does not apply to {backbone.family} (it supports {solver.families})")
    inv_name = inv_name or base_inversion(solver.name)
    inversion = get_inversion(inv_name)
    if backbone.family not in inversion.families:
        raise ValueError(
            f"inversion {inv_name!r} does not apply to {backbone.family} (it supports {', '.join(inversion.families)})"
        )
    base = base_inversion(solver.name) if inversion.source_correction else inv_name
    if get_inversion(base).solver not in ("*", solver.name):
        log.warning("inverting with %s but sampling with %s: reconstruction will not be exact", base, solver.name)
    steps = cfg.num_steps or backbone.default_steps
    guidance = backbone.default_guidance if cfg.guidance is None else cfg.guidance
    full = cfg.with_(
        solver=solver.name,
        num_steps=steps,
        guidance=guidance,
        inversion=InversionConfig(
            **{**cfg.inversion.__dict__, "name": inv_name, "guidance": cfg.inversion.guidance or 1.0}
        ),
    )
    return Resolved(
        config=full, editor=editor, solver=solver, inversion=inv_name, base_inversion=base,
        source_correction=inversion.source_correction, num_steps=steps, guidance=guidance,
    )  # fmt: skip


def prepare_image(backbone: Backbone, image: Image.Image, cfg: EditConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Apply the size policy: the requested size, or the nearest size the backbone takes."""
    policy = backbone.size_policy
    w, h = image.size
    if cfg.height is not None or cfg.width is not None:
        target = (cfg.height or h, cfg.width or w)
        policy.check(*target)
    elif cfg.size_policy == "strict":
        policy.check(h, w)
        target = (h, w)
    else:
        target = policy.fit(h, w)
    return io.fit_size(image, target, cfg.size_policy)


def run_inversion(
    z0: Tensor,
    grid: NoiseGrid,
    model: GuidedModel,
    inv: InversionConfig,
    base: str,
    generator: torch.Generator,
    *,
    uncond: Conditioning | None = None,
    guidance: float = 1.0,
) -> Trajectory:
    """Run the inversion ``base`` (for Direct Inversion: the sampler's own) with the configured options."""
    kwargs: dict[str, Any] = dict(inv.options)
    if base == "dpmpp":
        kwargs.update(iterations=inv.iterations, sweeps=inv.sweeps, eta=inv.eta)
    if base == "rf_inversion":
        kwargs["generator"] = generator
    if base == "null_text":
        kwargs.update(uncond=uncond, guidance=guidance)
    return get_inversion(base).invert(model, z0, grid, **kwargs)


class HookedModel:
    """A model function whose on-grid predictions pass through an editor's ``modify_prediction``."""

    def __init__(self, model: GuidedModel, hook: Callable[..., Pred], num_steps: int) -> None:
        self.model = model
        self.hook = hook
        self.num_steps = num_steps

    @property
    def nfe(self) -> int:
        return self.model.nfe

    def __call__(self, x: Tensor, k: int) -> Pred:
        return self.hook(k, x, self.model(x, k), self.model.grid, self.num_steps)

    def at_sigma(self, x: Tensor, sigma: Tensor, i: int) -> Pred:
        return self.model.at_sigma(x, sigma, i)


def make_merger(backbone: Backbone, cfg: EditConfig) -> Any:
    """The token merger for this run, or None when merging is off."""
    m = cfg.merge
    if m.ratio <= 0:
        return None
    from retouch.merging.settings import TokenMerger

    unet = backbone.family == "sd"

    def layers(info: Any) -> bool:
        if info.kind not in ("self", "joint", "single"):
            return False
        return not unet or info.downsample <= m.max_downsample

    return TokenMerger(ratio=m.ratio, layers=layers, seed=cfg.seed, random_dst=m.random)


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def edit(
    backbone: Backbone,
    image: Image.Image,
    cfg: EditConfig,
    *,
    progress: Progress | None = None,
    keep_latents: bool = False,
    record_attention: bool = False,
) -> EditResult:
    """Edit ``image`` from ``cfg.source_prompt`` to ``cfg.target_prompt`` with ``cfg.method``.

    With the ``identity`` method and equal prompts this is inversion -> reconstruction. ``progress`` is called
    as ``progress(phase, done, total)`` after each model evaluation of the inversion and each sampling step; it
    may raise :class:`Cancelled` to stop the edit there (the exception propagates, the model is restored).
    """
    res = resolve(backbone, cfg)
    cfg = res.config
    backbone.check_prompts([cfg.source_prompt, cfg.target_prompt])
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    generator = torch.Generator().manual_seed(cfg.seed)

    with torch.no_grad():
        with _timed(timings, "encode"):
            img, size_note = prepare_image(backbone, io.to_rgb(image), cfg)
            pixels = io.pil_to_tensor(img).to(backbone.device)
            z0 = backbone.encode_image(pixels).float()
            hw = (img.size[1], img.size[0])
            cond = backbone.encode_prompt([cfg.source_prompt, cfg.target_prompt], image_size=hw, guidance=res.guidance)
            need_uncond = backbone.uses_cfg and (
                res.guidance != 1.0 or cfg.inversion.guidance != 1.0 or res.base_inversion == "null_text"
            )
            uncond = backbone.encode_prompt(["", ""], image_size=hw) if need_uncond else None
            inv_prompt = cfg.source_prompt if cfg.inversion.prompt is None else cfg.inversion.prompt
            inv_cond = cond.select([0])
            if inv_prompt != cfg.source_prompt or not backbone.uses_cfg:
                # guidance-distilled models embed the inversion guidance in the conditioning
                inv_cond = backbone.encode_prompt([inv_prompt], image_size=hw, guidance=cfg.inversion.guidance)

        latent_hw = (z0.shape[-2], z0.shape[-1])
        grid = backbone.grid(res.solver.grid, res.num_steps, latent_hw)
        editor = get_editor(res.editor, backbone.family).build(backbone, cfg, dict(cfg.options))
        recorder = None
        if record_attention:
            from retouch.control.compose import ComposedEditor
            from retouch.control.recorder import AttentionRecorder

            recorder = AttentionRecorder(backbone.text_segments()[0], [cfg.source_prompt, cfg.target_prompt])
            editor = ComposedEditor([e for e in (editor, recorder) if e is not None])
        after_step = getattr(editor, "after_step", None)

        merger = make_merger(backbone, cfg)
        with attention_editing(backbone, editor, merger=merger) as state, ExitStack() as hooks:
            state.num_steps = res.num_steps
            if hasattr(editor, "install"):  # e.g. feature injection through forward hooks (reversible)
                hooks.enter_context(editor.install(backbone, state))
            with _timed(timings, "invert"):
                state.phase = "invert"
                inv_model = GuidedModel(
                    backbone,
                    grid,
                    inv_cond,
                    uncond.select([0]) if uncond is not None else None,
                    cfg.inversion.guidance,
                    state,
                )
                if progress:  # inversions walk the grid from point N (clean) to 0 (noise)
                    inv_model.on_eval = lambda k: progress("invert", res.num_steps - k, res.num_steps)
                traj = run_inversion(
                    z0, grid, inv_model, cfg.inversion, res.base_inversion, generator,
                    uncond=uncond.select([0]) if uncond is not None else None, guidance=res.guidance,
                )  # fmt: skip
            if hasattr(editor, "begin"):
                editor.begin(traj)
            if progress:
                progress("invert", res.num_steps, res.num_steps)  # close the bar whatever the last k was

            with _timed(timings, "sample"):
                state.phase = "sample"
                if hasattr(editor, "prepare_conditioning"):  # e.g. Pix2Pix-Zero's edit direction
                    cond = editor.prepare_conditioning(cond, uncond)
                model = GuidedModel(backbone, grid, cond, uncond, res.guidance, state)
                guided = model
                if hasattr(editor, "modify_prediction"):
                    model = HookedModel(model, editor.modify_prediction, res.num_steps)
                x = traj.noise.repeat(2, 1, 1, 1)
                solver_state: dict[str, Any] = {"generator": generator}
                per_step_uncond = traj.extras.get("uncond_per_step")
                for i in range(grid.num_steps):
                    state.step = i
                    if per_step_uncond is not None:  # null-text / negative-prompt inversion
                        guided.set_uncond(per_step_uncond[i].repeat(cond.batch_size))
                    if hasattr(editor, "step_conditioning"):  # e.g. per-step embedding mixing
                        step_cond = editor.step_conditioning(i, cond)
                        guided.set_cond(cond if step_cond is None else step_cond)
                    if hasattr(editor, "before_step"):  # e.g. latent guidance (Pix2Pix-Zero)
                        out = editor.before_step(i, x, guided, grid)
                        x = x if out is None else out
                    x = res.solver.step(model, x, grid, i, solver_state)
                    if res.source_correction:  # Direct Inversion: pin the source branch to z*_{i+1}
                        x = torch.cat([traj.latents[i + 1], x[1:]])
                    if after_step is not None:
                        out = after_step(i, x, state)
                        x = x if out is None else out
                    if progress:
                        progress("sample", i + 1, grid.num_steps)
                state.step = -1
                state.phase = "other"

        with _timed(timings, "decode"):
            decoded = backbone.decode(x.to(backbone.dtype)).float()
            recon_img = io.tensor_to_pil(decoded[0])
            edited_img = io.tensor_to_pil(decoded[1])

    timings["total"] = time.perf_counter() - t_start
    report = {
        "model": backbone.name,
        "family": backbone.family,
        "method": cfg.method,
        "editor": res.editor,
        "inversion": res.inversion,
        "solver": res.solver.name,
        "seed": cfg.seed,
        "num_steps": res.num_steps,
        "guidance": res.guidance,
        "nfe": {"inversion": traj.nfe, "sampling": model.nfe, "total": traj.nfe + model.nfe},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "size": size_note,
        "attention_calls": {
            "total": state.calls,
            "materialised": state.prob_calls,
            "block": state.block_calls,
        },
        "merge": merger.report() if merger is not None else None,
        "inversion_extras": {k: v for k, v in traj.extras.items() if isinstance(v, (int, float, tuple, list))},
        "config": cfg.to_dict(),
        "device": str(backbone.device),
        "dtype": str(backbone.dtype).removeprefix("torch."),
    }
    extras: dict[str, Any] = {}
    if recorder is not None:
        extras["attention_maps"] = dict(zip(("source", "target"), recorder.maps(), strict=True))
    return EditResult(
        extras=extras,
        image=edited_img,
        reconstruction=recon_img,
        report=report,
        latents=x if keep_latents else None,
        trajectory=traj if keep_latents else None,
    )


def reconstruct(backbone: Backbone, image: Image.Image, prompt: str, **overrides: Any) -> EditResult:
    """Invert ``image`` under ``prompt`` and regenerate it (identity editor, equal prompts)."""
    cfg = EditConfig(source_prompt=prompt, target_prompt=prompt, method="identity", **overrides)
    return edit(backbone, image, cfg)
