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
from contextlib import contextmanager
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
from retouch.solvers import Solver, get_solver
from retouch.types import Conditioning, NoiseGrid, Pred, Trajectory, to_x0_eps

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

# the sampler each inversion undoes, and the inversion that undoes each sampler
_NATURAL_INVERSION = {"ddim": "ddim", "dpmpp": "dpmpp", "flow_euler": "flow_euler"}


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
        self.batch_cond = Conditioning.cat([uncond, cond]) if self.cfg else cond
        self.state = state
        self.nfe = 0

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
    solver: Solver
    inversion: str
    num_steps: int
    guidance: float


def resolve(backbone: Backbone, cfg: EditConfig) -> Resolved:
    """Fill defaults from the backbone and check that method, solver and inversion fit its family."""
    get_editor(cfg.method, backbone.family)
    inv_name = cfg.inversion.name
    if cfg.solver is not None:
        solver = get_solver(cfg.solver)
    elif inv_name is not None:
        solver = get_solver(get_inversion(inv_name).solver)
    else:
        solver = get_solver(backbone.default_solver)
    if backbone.family not in solver.families:
        raise ValueError(f"solver {solver.name!r} does not apply to {backbone.family} (it supports {solver.families})")
    inv_name = inv_name or _NATURAL_INVERSION.get(solver.name, "flow_euler")
    inversion = get_inversion(inv_name)
    if backbone.family not in inversion.families:
        raise ValueError(
            f"inversion {inv_name!r} does not apply to {backbone.family} (it supports {', '.join(inversion.families)})"
        )
    if inversion.solver != solver.name:
        log.warning("inverting with %s but sampling with %s: reconstruction will not be exact", inv_name, solver.name)
    steps = cfg.num_steps or backbone.default_steps
    guidance = backbone.default_guidance if cfg.guidance is None else cfg.guidance
    full = cfg.with_(
        solver=solver.name,
        num_steps=steps,
        guidance=guidance,
        inversion=InversionConfig(**{**cfg.inversion.__dict__, "name": inv_name}),
    )
    return Resolved(config=full, solver=solver, inversion=inv_name, num_steps=steps, guidance=guidance)


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
    backbone: Backbone, z0: Tensor, grid: NoiseGrid, model: GuidedModel, inv: InversionConfig
) -> Trajectory:
    spec = get_inversion(inv.name or "ddim")
    kwargs: dict[str, Any] = {}
    if spec.name == "dpmpp":
        kwargs = {"iterations": inv.iterations, "sweeps": inv.sweeps, "eta": inv.eta}
    return spec.invert(model, z0, grid, **kwargs)


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
) -> EditResult:
    """Edit ``image`` from ``cfg.source_prompt`` to ``cfg.target_prompt`` with ``cfg.method``.

    With the ``identity`` method and equal prompts this is inversion -> reconstruction.
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
            need_uncond = backbone.uses_cfg and (res.guidance != 1.0 or cfg.inversion.guidance != 1.0)
            uncond = backbone.encode_prompt(["", ""], image_size=hw) if need_uncond else None
            inv_cond = cond.select([0])
            if not backbone.uses_cfg and backbone.family == "flux":
                inv_cond = backbone.encode_prompt([cfg.source_prompt], image_size=hw, guidance=cfg.inversion.guidance)

        latent_hw = (z0.shape[-2], z0.shape[-1])
        grid = backbone.grid(res.solver.grid, res.num_steps, latent_hw)
        editor_spec = get_editor(cfg.method, backbone.family)
        editor = editor_spec.factory(backbone, cfg, **dict(cfg.options))

        with attention_editing(backbone, editor) as state:
            state.num_steps = res.num_steps
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
                traj = run_inversion(backbone, z0, grid, inv_model, cfg.inversion)
            if progress:
                progress("invert", res.num_steps, res.num_steps)

            with _timed(timings, "sample"):
                state.phase = "sample"
                model = GuidedModel(backbone, grid, cond, uncond, res.guidance, state)
                x = traj.noise.repeat(2, 1, 1, 1)
                solver_state: dict[str, Any] = {"generator": generator}
                for i in range(grid.num_steps):
                    state.step = i
                    x = res.solver.step(model, x, grid, i, solver_state)
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
        "inversion": res.inversion,
        "solver": res.solver.name,
        "seed": cfg.seed,
        "num_steps": res.num_steps,
        "guidance": res.guidance,
        "nfe": {"inversion": inv_model.nfe, "sampling": model.nfe, "total": inv_model.nfe + model.nfe},
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "size": size_note,
        "attention_calls": {"total": state.calls, "materialised": state.prob_calls},
        "inversion_extras": {k: v for k, v in traj.extras.items() if isinstance(v, (int, float, tuple, list))},
        "config": cfg.to_dict(),
        "device": str(backbone.device),
        "dtype": str(backbone.dtype).removeprefix("torch."),
    }
    return EditResult(
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
