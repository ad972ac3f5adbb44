"""The one composition point: backbone + inversion + editor + solver -> EditResult.

encode (image -> latent, prompts -> conditioning)       encode_inputs
  -> plan (grid, editor, guidance, mask, token merger)    plan_run
  -> install the editor (reversible)                      attention_editing + Editor.install
  -> invert (latent -> trajectory)                        invert
  -> sample source and target branches in one batch       sample (the shared solvers.sample loop)
  -> decode and report (timings, NFE, config, seed)       decode, make_report
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from retouch import io, masks, schedules, solvers
from retouch.backbones.base import Backbone
from retouch.backbones.memory import check_memory, estimate_edit_memory
from retouch.config import EditConfig, InversionConfig
from retouch.control import Editor, EditState, IdentityEditor, StepContext, attention_editing
from retouch.control.editors import get_editor
from retouch.guided import GuidedModel, HookedModel
from retouch.inversion import get_inversion
from retouch.inversion.direct import base_inversion
from retouch.presets import get_preset
from retouch.solvers import Solver, get_solver
from retouch.types import Conditioning, NoiseGrid, Trajectory

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
Noise = Callable[[Sequence[int]], Tensor]  # shape -> standard-normal latent (the run's only randomness)


class Cancelled(Exception):
    """Raised by a ``progress`` callback to stop an edit between steps (e.g. a Cancel button).

    :func:`edit` lets it through unchanged: every model modification is a context manager, so the backbone
    comes out restored and can run the next edit at once; nothing is decoded or reported.
    """


@dataclass
class EditResult:
    image: Image.Image  # the edited image (target branch)
    reconstruction: Image.Image | None  # the source branch (None when the method runs without one)
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
    source_branch_prompt: str | None = None  # the preset's source-branch prompt (MasaCtrl: ""), else None


def resolve(backbone: Backbone, cfg: EditConfig) -> Resolved:
    """Fill defaults (preset, then backbone) and check that method, solver and inversion fit the family."""
    preset = get_preset(cfg.method)
    if preset is not None and backbone.step_distilled:
        # a few-step distilled model keeps its own steps and guidance unless the user gives them
        # (and one guidance for both branches: a preset's source_guidance is a setting for guided models)
        options = {k: v for k, v in preset.options.items() if k != "source_guidance"}
        preset = dataclasses.replace(preset, num_steps=None, guidance=None, options=options)
    if preset is not None:
        if backbone.family not in preset.families:
            get_editor(preset.editor, backbone.family)  # the editor's own reason first, where it has one
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
                    "skip": preset.inversion_skip if cfg.inversion.skip is None else cfg.inversion.skip,
                }
            ),
            options={**preset.options, **cfg.options},
        )
        editor = preset.editor
        branch_prompt = preset.source_branch_prompt
    else:
        branch_prompt = None
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
    # Direct Inversion runs the sampler's own inversion; other corrected inversions (ddpm) run themselves
    base = base_inversion(solver.name) if inversion.source_correction and inversion.solver == "*" else inv_name
    check_inversion_options(base, cfg.inversion.options)
    if get_inversion(base).solver not in ("*", solver.name):
        log.warning("inverting with %s but sampling with %s: reconstruction will not be exact", base, solver.name)
    steps = cfg.num_steps or backbone.default_steps
    guidance = backbone.default_guidance if cfg.guidance is None else cfg.guidance
    full = cfg.with_(
        solver=solver.name,
        num_steps=steps,
        guidance=guidance,
        inversion=InversionConfig(
            **{
                **cfg.inversion.__dict__,
                "name": inv_name,
                # 0 is a real setting (RF-Inversion inverts at guidance 0); only None means "the default, 1"
                "guidance": 1.0 if cfg.inversion.guidance is None else cfg.inversion.guidance,
                "skip": cfg.inversion.skip or 0.0,
            }
        ),
    )
    return Resolved(
        config=full, editor=editor, solver=solver, inversion=inv_name, base_inversion=base,
        source_correction=inversion.source_correction, num_steps=steps, guidance=guidance,
        source_branch_prompt=branch_prompt,
    )  # fmt: skip


def prepare_image(backbone: Backbone, image: Image.Image, cfg: EditConfig) -> tuple[Image.Image, dict[str, Any]]:
    """Bring the image to the size the model works at.

    ``cfg.height`` / ``cfg.width``: that size (checked against the backbone's size rules). Otherwise, with
    ``cfg.resolution == "native"`` (the default), the model's native pixel area with the image's aspect ratio
    (a 4032x3024 photo on a 512² model works at 584x440); with ``"input"`` or ``size_policy="strict"``, the
    image's own size (the nearest valid one, or refused when strict). The note records the input, working and
    output sizes."""
    policy = backbone.size_policy
    w, h = image.size
    if w <= 0 or h <= 0:
        raise io.ImageError(f"image has no pixels ({w}x{h})")
    if cfg.height is not None or cfg.width is not None:
        target = (cfg.height or h, cfg.width or w)
        policy.check(*target)
    elif cfg.size_policy == "strict":
        policy.check(h, w)
        target = (h, w)
    elif cfg.resolution == "native":
        target = policy.fit_native(h, w)
    else:
        target = policy.fit(h, w)
    img, note = io.fit_size(image, target, cfg.size_policy)
    note["resolution"] = cfg.resolution
    note["native_size"] = [policy.native[1], policy.native[0]]
    note["output_size"] = [w, h] if cfg.output_size == "input" else list(note["model_size"])
    return img, note


def restore_size(img: Image.Image, note: dict[str, Any]) -> Image.Image:
    """An output image at the size the note asks for (bicubic when the model worked at another size)."""
    size = tuple(note["output_size"])
    return img if img.size == size else img.resize(size, Image.Resampling.BICUBIC)


_INVERSION_INTERNAL = frozenset({"model_fn", "z0", "grid", "generator", "uncond", "guidance", "base", "noise"})


def check_inversion_options(name: str, options: Any) -> None:
    """Inversion options against the declared types of the inversion ``name`` actually run."""
    import inspect

    from retouch.control.options import check_options, option_types

    fn = get_inversion(name).invert
    target = fn.func if isinstance(fn, functools.partial) else fn
    extra = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(target).parameters.values())
    table = option_types(
        fn, skip=_INVERSION_INTERNAL | {"iterations", "sweeps", "eta"} if name == "dpmpp" else _INVERSION_INTERNAL
    )
    # ``posterior`` (how edit() encodes the image: "mean" or "sample") is read by edit(), not the inversion
    opts = {k: v for k, v in dict(options).items() if k != "posterior"}
    if options.get("posterior", "mean") not in ("mean", "sample"):
        raise ValueError(f"inversion option posterior must be 'mean' or 'sample', got {options['posterior']!r}")
    check_options(table, opts, f"inversion {name!r}", extra=extra)


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
    noise: Noise | None = None,
) -> Trajectory:
    """Run the inversion ``base`` (for Direct Inversion: the sampler's own) with the configured options."""
    kwargs: dict[str, Any] = dict(inv.options)
    kwargs.pop("posterior", None)  # how the image was encoded (edit()), not an inversion argument
    if base == "dpmpp":
        kwargs.update(iterations=inv.iterations, sweeps=inv.sweeps, eta=inv.eta)
    if base in ("rf_inversion", "ddpm"):
        kwargs["generator"] = generator
    if base == "rf_inversion":
        kwargs["noise"] = noise
    if base == "null_text":
        kwargs.update(uncond=uncond, guidance=guidance)
    return get_inversion(base).invert(model, z0, grid, **kwargs)


def make_merger(backbone: Backbone, cfg: EditConfig) -> Any:
    """The token merger for this run, or None when merging is off."""
    m = cfg.merge
    if m.ratio <= 0:
        return None
    from retouch.merging.settings import TokenMerger

    multiscale = backbone.multiscale  # a UNet: merge only in the finer levels

    def layers(info: Any) -> bool:
        if info.kind not in ("self", "joint", "single"):
            return False
        return not multiscale or info.downsample <= m.max_downsample

    return TokenMerger(ratio=m.ratio, layers=layers, seed=cfg.seed, random_dst=m.random)


def run_mask(
    backbone: Backbone, spec: masks.MaskSpec, cfg: EditConfig, z0: Tensor, cond: Conditioning, grid: NoiseGrid,
    image_hw: tuple[int, int],
) -> tuple[Tensor, int]:  # fmt: skip
    """The latent mask ``[1, 1, h, w]`` of a run and the NFE it cost (auto masks read attention)."""
    latent_hw = (z0.shape[-2], z0.shape[-1])
    if not spec.is_auto:
        return masks.to_latent(masks.fit_mask(spec.array, image_hw, cfg.size_policy), latent_hw, z0.device), 0
    blend = masks.word_blend(backbone, cfg.source_prompt, cfg.target_prompt, spec.words, spec.threshold)
    return masks.auto_mask(backbone, z0, cond, grid, blend, torch.Generator().manual_seed(cfg.seed))


def warn_vocabulary(backbone: Backbone, prompts: list[str]) -> list[str]:
    """Warn when a model trained on ShapesWorld (the embedded models) is given words it never saw; returns the
    problems (empty for other models)."""
    from retouch.models.vocab import model_vocabulary, vocabulary_message, vocabulary_problems

    vocab = model_vocabulary(backbone.name)
    problems = vocabulary_problems(prompts, vocab) if vocab is not None else []
    if problems:
        log.warning("%s", vocabulary_message(backbone.name, problems))
    return problems


@contextmanager
def _torch_convolutions() -> Iterator[None]:
    """CPU convolutions in torch's own kernels rather than oneDNN's (deterministic across thread counts); the
    previous setting is restored on exit."""
    old = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = old


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def encode_inputs(
    backbone: Backbone,
    cfg: EditConfig,
    res: Resolved,
    img: Image.Image,
    source_text: str,
    generator: torch.Generator,
    latent: Tensor | None = None,
) -> tuple[Tensor, Conditioning, Conditioning | None, Conditioning]:
    """The image latent ``z0`` (or the given ``latent``, checked), the branches' conditioning ``[source,
    target]``, the unconditional one (None where no guidance needs it) and the inversion's conditioning."""
    hw = (img.size[1], img.size[0])
    posterior = cfg.inversion.options.get("posterior", "mean")
    if posterior not in ("mean", "sample"):
        raise ValueError(f"inversion option posterior must be 'mean' or 'sample', got {posterior!r}")
    if latent is None:
        pixels = io.pil_to_tensor(img).to(backbone.device)
        # "sample": the VAE posterior drawn from the run's generator first (the references' order)
        z0 = backbone.encode_image(pixels) if posterior == "mean" else backbone.encode_image(pixels, generator)
        z0 = z0.float()
    else:
        f = backbone.vae_scale_factor
        want = (1, backbone.latent_channels, hw[0] // f, hw[1] // f)
        if tuple(latent.shape) != want:
            raise ValueError(f"latent has shape {tuple(latent.shape)}; a {hw[1]}x{hw[0]} image needs {want}")
        z0 = latent.float().to(backbone.device)
    cond = backbone.encode_prompt([source_text, cfg.target_prompt], image_size=hw, guidance=res.guidance)
    need_uncond = backbone.uses_cfg and (
        res.guidance != 1.0 or cfg.inversion.guidance != 1.0 or res.base_inversion == "null_text"
    )
    uncond = backbone.encode_prompt(["", ""], image_size=hw) if need_uncond else None
    inv_prompt = source_text if cfg.inversion.prompt is None else cfg.inversion.prompt
    inv_cond = cond.select([0])
    if inv_prompt != source_text or not backbone.uses_cfg:
        # guidance-distilled models embed the inversion guidance in the conditioning
        inv_cond = backbone.encode_prompt([inv_prompt], image_size=hw, guidance=cfg.inversion.guidance)
    return z0, cond, uncond, inv_cond


def edit(
    backbone: Backbone,
    image: Image.Image,
    cfg: EditConfig,
    *,
    progress: Progress | None = None,
    keep_latents: bool = False,
    record_attention: bool = False,
    mask: Any = None,
    latent: Tensor | None = None,
    noise: Noise | None = None,
    on_step: Callable[[int, Tensor], None] | None = None,
    memory_limit: float | None = None,
    deterministic: bool = True,
) -> EditResult:
    """Edit ``image`` from ``cfg.source_prompt`` to ``cfg.target_prompt`` with ``cfg.method``.

    With the ``identity`` method and equal prompts this is inversion -> reconstruction.

    ``mask`` (white = may change; a file path, image, array or ``"auto:WORDS"``, see :mod:`retouch.masks`)
    keeps the source trajectory outside it at every step. ``latent``: start from this model latent
    ``[1, C, h, w]`` instead of encoding ``image`` (which then only fixes the size), e.g. a reference
    implementation's own encoding in a parity test. ``noise``: where the run's Gaussian draws come from,
    ``shape -> tensor`` (default: ``backbone.randn_latent`` from the seeded generator). ``on_step(i, x)``
    sees the latents of every branch after sampling step ``i`` (read-only; e.g. parity tests).

    ``progress`` is called as ``progress(phase, done, total)`` after each model evaluation of the inversion
    and each sampling step; it may raise :class:`Cancelled` to stop the edit there (the exception
    propagates, the model is restored).

    Args:
        backbone: a loaded :class:`~retouch.backbones.base.Backbone` (``load_backbone``).
        image: a PIL image, a file path, a numpy array ``[H, W(, 3|4)]`` (uint8, or float in [0, 1]) or a
            tensor ``[3, H, W]`` / ``[1, 3, H, W]`` in [0, 1] (see :func:`retouch.io.as_image`).
        cfg: an :class:`~retouch.config.EditConfig`.
        memory_limit: bytes the edit may use on top of the loaded model; ``None``: the memory available on the
            backbone's device; ``float("inf")``: no check. An edit estimated above it is refused before any
            model runs (:mod:`retouch.backbones.memory`).
        deterministic: on the CPU, run convolutions in torch's own kernels instead of oneDNN's: oneDNN picks
            its convolution algorithm by thread count (a 1x1 convolution with bias in the VAE and UNet sums in
            another order with 1 and 2 threads), so the same seed gave images differing in a few pixels between
            ``--threads 1`` and ``--threads 2``. With this (the default) the output is byte-identical whatever
            the thread count; ``False`` keeps oneDNN (faster convolutions on large UNets).
    """
    if not isinstance(backbone, Backbone):
        raise TypeError(
            f"backbone must be a retouch Backbone (from retouch.backbones.load_backbone), got {type(backbone).__name__}"
        )
    if not isinstance(cfg, EditConfig):
        hint = "; build one with EditConfig(**d)" if isinstance(cfg, dict) else ""
        raise TypeError(f"cfg must be an EditConfig, got {type(cfg).__name__}{hint}")
    if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, (int, float))):
        raise TypeError(f"memory_limit must be a number of bytes or None, got {type(memory_limit).__name__}")
    if memory_limit is not None and not memory_limit > 0:
        raise ValueError(f"memory_limit must be > 0 bytes, got {memory_limit}")
    image = io.as_image(image, name="image")
    mask_spec = masks.parse_mask(mask)
    res = resolve(backbone, cfg)
    cfg = res.config
    backbone.check_prompts([cfg.target_prompt])
    backbone.check_prompts([cfg.source_prompt], allow_empty=res.source_branch_prompt is not None)
    warn_vocabulary(backbone, [cfg.source_prompt, cfg.target_prompt])
    img, size_note = prepare_image(backbone, image, cfg)
    estimate = estimate_edit_memory(backbone, (img.size[1], img.size[0]), batch=4 if backbone.uses_cfg else 2)
    check_memory(estimate, backbone.device, memory_limit)
    generator = torch.Generator().manual_seed(cfg.seed)

    with ExitStack() as backend_flags:
        if deterministic and backbone.device.type == "cpu":
            backend_flags.enter_context(_torch_convolutions())
        return _edit(
            backbone, cfg, res, img, size_note, estimate, generator, progress, keep_latents, record_attention,
            mask_spec=mask_spec, latent=latent, noise=noise, on_step=on_step,
        )  # fmt: skip


@dataclass
class Run:
    """What one edit runs with once its inputs are encoded (:func:`plan_run`)."""

    z0: Tensor  # the image latent [1, C, h, w]
    cond: Conditioning  # the branches' conditioning [source, target]
    uncond: Conditioning | None
    inv_cond: Conditioning  # the inversion's conditioning (one row)
    grid: NoiseGrid  # the grid the run inverts and samples on (after the editor's start)
    editor: Editor
    guidance: float | tuple[float, ...]  # one scale, or one per branch (FlowEdit)
    source_branch: bool
    noise: Noise
    latent_mask: Tensor | None = None
    mask_nfe: int = 0
    start: int = 0  # grid steps the editor skips at the noisy end
    recorder: Any = None  # the attention recorder of record_attention
    merger: Any = None


def plan_run(
    backbone: Backbone,
    cfg: EditConfig,
    res: Resolved,
    encoded: tuple[Tensor, Conditioning, Conditioning | None, Conditioning],
    image_hw: tuple[int, int],
    source_text: str,
    generator: torch.Generator,
    timings: dict[str, float],
    *,
    mask_spec: masks.MaskSpec | None,
    noise: Noise | None,
    record_attention: bool,
) -> Run:
    """The run's grid, editor, per-branch guidance, mask and token merger, from the encoded inputs."""
    z0, cond, uncond, inv_cond = encoded
    total = schedules.skipped_steps(res.num_steps, cfg.inversion.skip or 0.0)
    grid = backbone.grid(res.solver.grid, total, (z0.shape[-2], z0.shape[-1]))
    if total != res.num_steps:  # skip: start part-way down the schedule
        grid = schedules.tail(grid, res.num_steps)
    editor: Editor | None = get_editor(res.editor, backbone.family).build(backbone, cfg, dict(cfg.options))
    if noise is None:

        def noise(shape: Sequence[int]) -> Tensor:
            return backbone.randn_latent(shape, generator).to(backbone.device)

    if editor is None:
        editor = IdentityEditor()
    per_branch = editor.branch_guidance(res.guidance)
    guidance: float | tuple[float, ...] = res.guidance
    if per_branch is not None:  # e.g. FlowEdit: its own guidance scale for each branch
        guidance = tuple(per_branch)
        cond = Conditioning.cat(
            [backbone.encode_prompt([p], image_size=image_hw, guidance=g)
             for p, g in zip((source_text, cfg.target_prompt), guidance, strict=True)]
        )  # fmt: skip
    source_branch = bool(editor.source_branch)
    if not source_branch and res.source_correction:
        raise ValueError(f"method {cfg.method!r} runs without a source branch; it cannot pin one (Direct Inversion)")
    recorder = None
    if record_attention:
        from retouch.control.compose import ComposedEditor
        from retouch.control.recorder import AttentionRecorder

        recorder = AttentionRecorder(backbone.text_segments()[0], [cfg.source_prompt, cfg.target_prompt])
        editor = ComposedEditor([editor, recorder])
    latent_mask, mask_nfe = None, 0
    if mask_spec is not None:
        with _timed(timings, "mask"):
            latent_mask, mask_nfe = run_mask(backbone, mask_spec, cfg, z0, cond, grid, image_hw)
    latent_mask = editor.set_mask(latent_mask)  # editors built on a mask (KV-Edit) check and shape it
    start = editor.grid_start(grid.num_steps)
    if start:  # the editor skips the noisiest steps: it inverts and samples on the rest of the grid
        grid = schedules.tail(grid, grid.num_steps - start)
    return Run(
        z0=z0, cond=cond, uncond=uncond, inv_cond=inv_cond, grid=grid, editor=editor, guidance=guidance,
        source_branch=source_branch, noise=noise, latent_mask=latent_mask, mask_nfe=mask_nfe, start=start,
        recorder=recorder, merger=make_merger(backbone, cfg),
    )  # fmt: skip


def invert(
    backbone: Backbone,
    cfg: EditConfig,
    res: Resolved,
    run: Run,
    state: EditState,
    generator: torch.Generator,
    progress: Progress | None,
) -> Trajectory:
    """Invert the image latent on the run's grid (the editor installed: it may record features) and hand the
    trajectory to the editor."""
    n_run = run.grid.num_steps
    state.phase = "invert"
    uncond = run.uncond.select([0]) if run.uncond is not None else None
    model = GuidedModel(backbone, run.grid, run.inv_cond, uncond, cfg.inversion.guidance, state)
    if progress:  # inversions walk the grid from point N (clean) to 0 (noise)
        model.on_eval = lambda k: progress("invert", n_run - k, n_run)
    traj = run_inversion(
        run.z0, run.grid, model, cfg.inversion, res.base_inversion, generator,
        uncond=uncond, guidance=res.guidance, noise=run.noise,
    )  # fmt: skip
    run.editor.begin(traj)
    if progress:
        progress("invert", n_run, n_run)  # close the bar whatever the last k was
    return traj


def sample(
    backbone: Backbone,
    res: Resolved,
    run: Run,
    traj: Trajectory,
    state: EditState,
    generator: torch.Generator,
    *,
    on_step: Callable[[int, Tensor], None] | None,
    progress: Progress | None,
) -> tuple[Tensor, HookedModel, float | tuple[float, ...]]:
    """Sample every branch from the inversion's noise over the run's grid with the shared loop
    (:func:`retouch.solvers.sample`) and the editor's step hooks, or with the editor's own loop where it has
    one; returns the final latents, the model function (which counted the NFE) and the guidance the branches
    ran with."""
    state.phase = "sample"
    editor, grid, latent_mask = run.editor, run.grid, run.latent_mask
    cond = editor.prepare_conditioning(run.cond, run.uncond)  # e.g. Pix2Pix-Zero's edit direction
    uncond, guidance = run.uncond, run.guidance
    if not run.source_branch:  # the reference runs the target alone (e.g. RF-Inversion's own pipeline)
        cond = cond.select([1])
        uncond = uncond.select([1]) if uncond is not None else None
        guidance = guidance[1:] if isinstance(guidance, tuple) else guidance
    guided = GuidedModel(backbone, grid, cond, uncond, guidance, state)
    n_run = grid.num_steps
    latent_hw = (traj.noise.shape[-2], traj.noise.shape[-1])
    # e.g. LEDITS++: its own batch of edit-concept rows; then the editor's prediction hook
    model = HookedModel(editor.wrap_model(guided), guided, editor, n_run, latent_mask)
    x = editor.sample(model, run.z0, grid, run.noise)  # a loop of its own (FlowEdit's inversion-free ODE)
    if x is None:
        solver_state: dict[str, Any] = {"generator": generator}
        if "noise_maps" in traj.extras:  # edit-friendly DDPM inversion: the ddpm solver replays them
            solver_state["noise_maps"] = traj.extras["noise_maps"]
        per_step_uncond = traj.extras.get("uncond_per_step")
        current: list[StepContext] = []

        def before(i: int, x: Tensor) -> Tensor | None:
            state.step = i
            if per_step_uncond is not None:  # null-text / negative-prompt inversion
                guided.set_uncond(per_step_uncond[i].repeat(cond.batch_size))
            step_cond = editor.step_conditioning(guided.context(i, n_run, latent_hw, latent_mask), cond)
            guided.set_cond(cond if step_cond is None else step_cond)  # e.g. per-step embedding mixing
            current[:] = [guided.context(i, n_run, latent_hw, latent_mask)]
            return editor.before_step(current[0], x, model)  # e.g. latent guidance (Pix2Pix-Zero)

        def after(i: int, x: Tensor) -> Tensor:
            if res.source_correction:  # Direct Inversion: pin the source branch to z*_{i+1}
                x = torch.cat([traj.latents[i + 1], x[1:]])
            out = editor.after_step(current[0], x)
            x = x if out is None else out
            if latent_mask is not None:  # keep the source trajectory outside the mask
                x = masks.blend(x, traj.latents[i + 1], latent_mask, range(int(run.source_branch), x.shape[0]))
            if on_step is not None:
                on_step(i, x)
            if progress:
                progress("sample", i + 1, n_run)
            return x

        x = traj.noise.repeat(cond.batch_size, 1, 1, 1)
        x = solvers.sample(model, x, grid, res.solver, before=before, callback=after, state=solver_state)
    state.step = -1
    state.phase = "other"
    return x, model, guidance


def decode(
    backbone: Backbone, x: Tensor, traj: Trajectory, run: Run, size_note: dict[str, Any]
) -> tuple[Image.Image | None, Image.Image]:
    """The source branch's reconstruction (None without one) and the edited image, at the output size; with a
    mask, pixels outside it come from the image's own VAE round trip."""
    decoded = backbone.decode(x.to(backbone.dtype)).float()
    if run.latent_mask is not None:
        round_trip = backbone.decode(traj.latents[-1].to(backbone.dtype)).float()
        decoded = masks.composite(decoded, round_trip, run.latent_mask, first_target=int(run.source_branch))
    recon = restore_size(io.tensor_to_pil(decoded[0]), size_note) if run.source_branch else None
    return recon, restore_size(io.tensor_to_pil(decoded[-1]), size_note)


def make_report(
    backbone: Backbone,
    cfg: EditConfig,
    res: Resolved,
    run: Run,
    traj: Trajectory,
    *,
    sampling_nfe: int,
    guidance: float | tuple[float, ...],
    state: EditState,
    timings: dict[str, float],
    size_note: dict[str, Any],
    estimate: Any,
    mask_spec: masks.MaskSpec | None,
    source_text: str,
) -> dict[str, Any]:
    """The run's report (the sidecar JSON): what ran, its NFE, timings, sizes, memory and mask."""
    report = {
        "model": backbone.name,
        "family": backbone.family,
        "method": cfg.method,
        "editor": res.editor,
        "inversion": res.inversion,
        "solver": res.solver.name,
        "seed": cfg.seed,
        "num_steps": res.num_steps,
        "guidance": list(guidance) if isinstance(guidance, tuple) else res.guidance,
        "source_branch": run.source_branch,
        "source_branch_prompt": source_text,
        "nfe": {
            "inversion": traj.nfe,
            "sampling": sampling_nfe,
            "total": traj.nfe + sampling_nfe + run.mask_nfe,
        },  # fmt: skip
        "timings": {k: round(v, 4) for k, v in timings.items()},
        "size": size_note,
        "memory_estimate": estimate.to_dict(),
        "attention_calls": {
            "total": state.calls,
            "materialised": state.prob_calls,
            "block": state.block_calls,
        },
        "merge": run.merger.report() if run.merger is not None else None,
        "inversion_extras": {k: v for k, v in traj.extras.items() if isinstance(v, (int, float, tuple, list))},
        "config": cfg.to_dict(),
        "device": str(backbone.device),
        "dtype": str(backbone.dtype).removeprefix("torch."),
    }
    if run.mask_nfe:
        report["nfe"]["mask"] = run.mask_nfe
    if run.start:
        report["start_step"] = run.start
    if run.latent_mask is not None or mask_spec is not None:
        report["mask"] = {
            "source": mask_spec.describe() if mask_spec is not None else None,
            "coverage": masks.coverage(run.latent_mask) if run.latent_mask is not None else None,
            "latent_hw": [run.z0.shape[-2], run.z0.shape[-1]],
        }
    return report


def _edit(
    backbone: Backbone,
    cfg: EditConfig,
    res: Resolved,
    img: Image.Image,
    size_note: dict[str, Any],
    estimate: Any,
    generator: torch.Generator,
    progress: Progress | None,
    keep_latents: bool,
    record_attention: bool,
    *,
    mask_spec: masks.MaskSpec | None,
    latent: Tensor | None,
    noise: Noise | None,
    on_step: Callable[[int, Tensor], None] | None,
) -> EditResult:
    """encode -> plan -> install -> invert -> sample -> decode -> report."""
    source_text = cfg.source_prompt if res.source_branch_prompt is None else res.source_branch_prompt
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    hw = (img.size[1], img.size[0])
    with torch.no_grad():
        with _timed(timings, "encode"):
            encoded = encode_inputs(backbone, cfg, res, img, source_text, generator, latent)
        run = plan_run(
            backbone, cfg, res, encoded, hw, source_text, generator, timings,
            mask_spec=mask_spec, noise=noise, record_attention=record_attention,
        )  # fmt: skip
        with attention_editing(backbone, run.editor, merger=run.merger) as state, ExitStack() as hooks:
            state.num_steps = run.grid.num_steps
            hooks.enter_context(run.editor.install(backbone, state))  # e.g. feature injection (reversible)
            with _timed(timings, "invert"):
                traj = invert(backbone, cfg, res, run, state, generator, progress)
            with _timed(timings, "sample"):
                x, model, guidance = sample(
                    backbone, res, run, traj, state, generator, on_step=on_step, progress=progress
                )
        with _timed(timings, "decode"):
            recon_img, edited_img = decode(backbone, x, traj, run, size_note)
    timings["total"] = time.perf_counter() - t_start
    report = make_report(
        backbone, cfg, res, run, traj, sampling_nfe=model.nfe, guidance=guidance, state=state, timings=timings,
        size_note=size_note, estimate=estimate, mask_spec=mask_spec, source_text=source_text,
    )  # fmt: skip
    extras: dict[str, Any] = {}
    if run.latent_mask is not None:
        extras["mask"] = run.latent_mask
    if run.recorder is not None:
        extras["attention_maps"] = dict(zip(("source", "target"), run.recorder.maps(), strict=True))
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
