"""Text-embedding disentanglement (Wu et al., "Uncovering the Disentanglement Capability in Text-to-Image
Diffusion Models", CVPR 2023) on every backbone family.

**Mixing** (paper §3, code ``plms.py``): at sampling step ``i`` (0 = noisiest) the target branch is
conditioned on ``c(i) = λ_i c_neutral + (1 − λ_i) c_target`` where ``c_neutral`` is the source prompt's
embedding (the neutral description, e.g. "a photo of a person") and ``c_target`` the target prompt's (the
description with the attribute, "... smiling"). Every floating-point conditioning tensor is mixed (token and
pooled embeddings); integer padding masks (PixArt's T5) are the neutral's at ``λ = 1``, the target's at
``λ = 0`` and their union in between. Initialisation: ``λ_i = 1`` for ``i < t*`` (``t_star``, default
0.4 N: the code's 20 of 50) and ``lambda_after`` (0) afterwards.

**Optimisation** (paper §3, code ``plms_sampling_optimize_*``): the ``N`` weights are trained with Adam
(lr 0.05) through the *whole* sampling chain of the target branch from the image's inversion ``x_T``, with

    L = 1 − cos(E_I(x_ref) − E_I(x_edit), E_T(c_neutral) − E_T(c_target))  +  content_weight · L_content

where ``x_ref`` is the chain's output at ``λ ≡ 1`` (the neutral-prompt reconstruction), ``E_I`` / ``E_T``
the CLIP image / text embeddings (L2-normalised before the differences, as directional CLIP losses do) and
``L_content`` a perceptual distance between ``x_edit`` and ``x_ref``. Differences from the released code:

* the perceptual loss uses the **CLIP vision tower's intermediate hidden states** (sum over four evenly spaced
  layers of the mean L1 distance) instead of VGG-16 relu1_2…relu4_3 — no torchvision dependency;
* CLIP inputs are resized to the CLIP's image size and normalised with its mean / std (the code skips the
  normalisation);
* the code's real-image "fixed noise" (per-step noise forcing the λ ≡ 1 chain through noisy copies of the
  image for the 33 noisiest steps) is not reproduced: the chain is the engine's deterministic sampler from the
  inversion, so ``x_ref`` is the plain reconstruction (use Direct Inversion for the source branch);
* each model call of the chain is gradient-checkpointed (``checkpointing=True``): memory is one latent per
  step instead of the ~48 GB the paper's README asks for; the cost is one extra forward per step.

**Reuse** (claimed by the paper, never shipped by its code): :meth:`MixingWeights.save` writes λ with the
prompts / steps metadata (safetensors or JSON, atomically); the ``disentangle`` editor with ``weights=PATH``
applies saved λ to any other image without optimisation.
:func:`retouch.mixing_weights.optimise_mixing_weights` trains λ on one image.

CLIP: any ``transformers.CLIPModel`` folder (``clip_model=PATH``); on the embedded models
``src/retouch/models/embedded/shapes-clip`` is used when it exists.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from retouch.backbones.base import Backbone
from retouch.control.contract import Editor, StepContext
from retouch.control.installer import EditState
from retouch.control.options import EditorOptions, takes_options
from retouch.control.steps import to_steps
from retouch.guided import GuidedModel, frozen
from retouch.solvers import sample
from retouch.types import Conditioning, Trajectory

log = logging.getLogger(__name__)

FORMAT = "retouch.mixing-weights/1"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# --- mixing ------------------------------------------------------------------------------------------
def init_lambdas(num_steps: int, t_star: float | int = 0.4, after: float = 0.0) -> Tensor:
    """Wu et al.'s initialisation: ``λ_i = 1`` for ``i < t*`` else ``after`` (t*: fraction or step count)."""
    k = to_steps(t_star, num_steps, "t_star")
    lam = torch.full((num_steps,), float(after))
    lam[: min(k, num_steps)] = 1.0
    return lam


def mix_conditioning(neutral: Conditioning, target: Conditioning, lam: Tensor | float) -> Conditioning:
    """``c = λ c_neutral + (1 − λ) c_target`` (Wu et al. §3) for floating tensors; masks as in the module doc.

    Differentiable in ``λ`` (a 0-d tensor or a float)."""
    value = float(lam.detach()) if isinstance(lam, Tensor) else float(lam)
    out: dict[str, Tensor] = {}
    for key, tt in target.tensors.items():
        tn = neutral.tensors[key]
        if tt.is_floating_point():
            lt = lam.to(tt.dtype) if isinstance(lam, Tensor) else lam
            out[key] = lt * tn + (1 - lt) * tt
        elif value == 1.0:
            out[key] = tn
        elif value == 0.0:
            out[key] = tt
        else:
            out[key] = torch.maximum(tn, tt)
    return Conditioning(out, target.static)


# --- weights on disk ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixingWeights:
    """Learned mixing weights ``λ`` (one per sampling step) and how they were obtained."""

    lambdas: Tensor  # [num_steps]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return int(self.lambdas.shape[0])

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: ``.json`` → JSON, anything else → safetensors (metadata as JSON strings)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "num_steps": self.num_steps, **dict(self.meta)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            if path.suffix.lower() == ".json":
                payload = {"format": FORMAT, "lambdas": self.lambdas.tolist(), "meta": meta}
                Path(tmp).write_text(json.dumps(payload, indent=2))
            else:
                from safetensors.torch import save_file

                save_file(
                    {"lambdas": self.lambdas.detach().float().cpu().contiguous()},
                    tmp,
                    metadata={k: json.dumps(v) for k, v in meta.items()},
                )
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MixingWeights:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"mixing weights file {path} does not exist")
        try:
            if path.suffix.lower() == ".json":
                payload = json.loads(path.read_text())
                lam = torch.tensor(payload["lambdas"], dtype=torch.float32)
                meta = dict(payload.get("meta", {}))
            else:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    lam = f.get_tensor("lambdas").float()
                    meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
        except (KeyError, ValueError, OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path} is not a mixing-weights file: {exc}") from None
        if meta.get("format") != FORMAT or lam.ndim != 1:
            raise ValueError(f"{path} is not a {FORMAT} file")
        return cls(lam, meta)


def save_weights(path: str | os.PathLike[str], lambdas: Tensor, **meta: Any) -> Path:
    """Write ``λ`` and its metadata (prompts, steps, ...) to ``path`` (see :meth:`MixingWeights.save`)."""
    return MixingWeights(lambdas.detach().float().cpu(), meta).save(path)


# --- CLIP objective --------------------------------------------------------------------------------------
def default_clip_path() -> Path | None:
    from retouch.models import registry

    p = Path(registry.embedded_dir()) / "shapes-clip"
    return p if (p / "config.json").is_file() else None


class ClipObjective:
    """Directional CLIP loss and a CLIP-vision perceptual content loss (see module docstring)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        content_layers: int = 4,
        name: str = "clip",
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        n = int(model.config.vision_config.num_hidden_layers)
        self.layers = sorted({max(1, round(n * (k + 1) / content_layers)) for k in range(content_layers)})
        self.size = int(model.config.vision_config.image_size)
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ClipObjective:
        """Load a ``transformers.CLIPModel`` folder (tokenizer and, if present, preprocessor config)."""
        from transformers import AutoTokenizer, CLIPModel

        p = Path(path)
        try:
            model = CLIPModel.from_pretrained(str(path)).float()  # fp16 checkpoints: optimise in fp32
            tok = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as exc:
            raise ValueError(f"clip_model {str(path)!r} is not a loadable CLIPModel folder: {exc}") from None
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = p / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        return cls(model, tok, mean=mean, std=std, name=str(path))

    def to(self, device: torch.device) -> ClipObjective:
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def text_embedding(self, prompts: Sequence[str]) -> Tensor:
        m = self.model
        max_len = int(m.config.text_config.max_position_embeddings)
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=max_len,
                             return_tensors="pt")  # fmt: skip
        dev = self.mean.device
        out = m.text_model(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev))
        return F.normalize(m.text_projection(out.pooler_output).float(), dim=-1)

    def text_direction(self, neutral: str, target: str) -> Tensor:
        """``E_T(c_neutral) − E_T(c_target)``."""
        with torch.no_grad():
            e = self.text_embedding([neutral, target])
        d = e[0] - e[1]
        if float(d.norm()) < 1e-8:
            raise ValueError("the source and target prompts give the same CLIP text embedding: nothing to optimise")
        return d

    def image_features(self, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``[B, 3, H, W]`` in [-1, 1] -> (normalised CLIP image embedding, selected hidden states)."""
        x = (pixels.float() + 1) / 2
        x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        m = self.model
        out = m.vision_model(pixel_values=x, output_hidden_states=True)
        emb = F.normalize(m.visual_projection(out.pooler_output).float(), dim=-1)
        return emb, [out.hidden_states[i].float() for i in self.layers]

    def loss(
        self, edit: Tensor, reference: tuple[Tensor, list[Tensor]], text_dir: Tensor, content_weight: float
    ) -> tuple[Tensor, dict[str, float]]:
        """``1 − cos(E_I(ref) − E_I(edit), text_dir) + content_weight · Σ_l mean|h_l(edit) − h_l(ref)|``."""
        emb, hidden = self.image_features(edit)
        ref_emb, ref_hidden = reference
        direction = 1 - F.cosine_similarity(ref_emb - emb, text_dir[None], dim=-1).mean()
        content = sum(F.l1_loss(h, r) for h, r in zip(hidden, ref_hidden, strict=True))
        total = direction + content_weight * content
        return total, {"direction": float(direction.detach()), "content": float(content.detach())}


def load_clip(clip_model: Any, device: torch.device) -> ClipObjective:
    """``clip_model``: a :class:`ClipObjective`, a CLIPModel folder, or ``None`` (the embedded shapes-clip)."""
    if isinstance(clip_model, ClipObjective):
        return clip_model.to(device)
    if clip_model is None:
        clip_model = default_clip_path()
        if clip_model is None:
            raise ValueError(
                "optimising the mixing weights needs a CLIP model: pass clip_model=PATH (a transformers CLIPModel "
                "folder), or weights=PATH to apply saved weights, or epochs=0 to use the t* schedule as is"
            )
    return ClipObjective.from_pretrained(clip_model).to(device)


# --- the differentiable target-branch chain -------------------------------------------------------------------
@dataclass(frozen=True)
class ChainSetup:
    """Everything needed to regenerate the target branch for given ``λ``."""

    backbone: Backbone
    trajectory: Trajectory
    cond: Conditioning  # rows [neutral (source), target]
    uncond: Conditioning | None  # one row (or None without CFG)
    guidance: float
    solver: str
    seed: int = 0
    checkpointed: bool = True

    def sample(self, lambdas: Tensor) -> Tensor:
        """Run the chain from the inversion's ``x_T`` with ``c(i) = λ_i c_neutral + (1 − λ_i) c_target``."""
        traj = self.trajectory
        grid = traj.grid
        if lambdas.shape[0] != grid.num_steps:
            raise ValueError(f"{lambdas.shape[0]} mixing weights for a {grid.num_steps}-step grid")
        neutral, target = self.cond.select([0]), self.cond.select([1])
        model = GuidedModel(self.backbone, grid, target, self.uncond, self.guidance, checkpointed=self.checkpointed)
        per_step_uncond = traj.extras.get("uncond_per_step")

        def mix(i: int, x: Tensor) -> None:
            if per_step_uncond is not None and model.cfg:
                model.set_uncond(per_step_uncond[i])
            model.set_cond(mix_conditioning(neutral, target, lambdas[i]))

        state: dict[str, Any] = {"generator": torch.Generator().manual_seed(self.seed)}
        return sample(model, traj.noise[:1].float(), grid, self.solver, before=mix, state=state)

    def decode(self, latents: Tensor) -> Tensor:
        bb = self.backbone

        def run(z: Tensor) -> Tensor:
            return bb.decode(z.to(bb.dtype)).float()

        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(run, latents, use_reentrant=False)
        return run(latents)


def optimise_lambdas(
    chain: ChainSetup,
    objective: ClipObjective,
    prompts: tuple[str, str],
    init: Tensor,
    *,
    epochs: int = 10,
    lr: float = 0.05,
    content_weight: float = 0.05,
) -> tuple[Tensor, list[float]]:
    """Adam on ``λ`` through the whole chain (Wu et al. §3; code ``plms_sampling_optimize_edit``).

    Returns the optimised ``λ`` and the loss of each epoch, evaluated *before* that epoch's update."""
    if epochs < 0 or lr <= 0:
        raise ValueError("epochs must be >= 0 and lr > 0")
    bb = chain.backbone
    text_dir = objective.text_direction(*prompts)
    with torch.no_grad():
        ref_img = chain.decode(chain.sample(torch.ones_like(init)))
        reference = objective.image_features(ref_img)
    lam = init.clone().float().requires_grad_(True)
    opt = torch.optim.Adam([lam], lr=lr)
    history: list[float] = []
    for epoch in range(epochs):
        with torch.enable_grad(), frozen(bb.denoiser, bb.vae, objective.model):
            img = chain.decode(chain.sample(lam))
            loss, parts = objective.loss(img, reference, text_dir, content_weight)
            (grad,) = torch.autograd.grad(loss, lam)
        if not math.isfinite(float(loss)):
            raise FloatingPointError(f"mixing-weight loss is not finite at epoch {epoch}")
        history.append(float(loss))
        log.info("disentangle epoch %d: loss %.5f (%s)", epoch, float(loss), parts)
        lam.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
    return lam.detach(), history


# --- the editor --------------------------------------------------------------------------------------------
class EmbeddingMixing(Editor):
    """Per-step mixing of the target branch's conditioning (``step_conditioning``); optimises ``λ`` in
    ``prepare_conditioning`` when no weights were given (needs the inversion, hence after ``begin``)."""

    def __init__(
        self,
        backbone: Backbone,
        config: Any,
        *,
        lambdas: Tensor | None,
        init: Tensor,
        epochs: int,
        lr: float,
        content_weight: float,
        clip_model: Any,
        checkpointing: bool,
        save_to: str | None,
        on_weights: Callable[[MixingWeights], None] | None,
        meta: Mapping[str, Any],
    ) -> None:
        self.backbone = backbone
        self.config = config
        self.lambdas = lambdas
        self.init = init
        self.epochs = epochs
        self.lr = lr
        self.content_weight = content_weight
        self.clip_model = clip_model
        self.checkpointing = checkpointing
        self.save_to = save_to
        self.on_weights = on_weights
        self.meta = dict(meta)
        self.history: list[float] = []
        self._trajectory: Trajectory | None = None
        self._state: EditState | None = None

    @contextmanager
    def install(self, backbone: Backbone, state: EditState) -> Iterator[None]:
        self._state = state  # to mark the optimisation's forwards as outside the sampling loop
        try:
            yield
        finally:
            self._state = None

    def begin(self, trajectory: Trajectory) -> None:
        self._trajectory = trajectory

    @property
    def weights(self) -> MixingWeights:
        if self.lambdas is None:
            raise RuntimeError("the mixing weights are not known yet (optimised when the edit runs)")
        return MixingWeights(self.lambdas.detach().float().cpu(), {**self.meta, "loss_history": self.history})

    def save_weights(self, path: str | os.PathLike[str]) -> Path:
        """Write ``λ`` with the prompts / steps metadata (safetensors, or JSON for a ``.json`` path)."""
        return self.weights.save(path)

    def prepare_conditioning(self, cond: Conditioning, uncond: Conditioning | None) -> Conditioning:
        if self.lambdas is None:
            self.lambdas = self._optimise(cond, uncond)
        if self.save_to:
            self.save_weights(self.save_to)
        if self.on_weights is not None:
            self.on_weights(self.weights)
        return cond

    def _optimise(self, cond: Conditioning, uncond: Conditioning | None) -> Tensor:
        if self.epochs == 0:
            return self.init
        if self._trajectory is None:
            raise RuntimeError("disentangle: optimisation needs the inversion (begin() was not called)")
        cfg = self.config
        objective = load_clip(self.clip_model, self.backbone.device)
        chain = ChainSetup(
            backbone=self.backbone, trajectory=self._trajectory, cond=cond,
            uncond=uncond.select([1]) if uncond is not None else None, guidance=float(cfg.guidance),
            solver=str(cfg.solver), seed=int(cfg.seed), checkpointed=self.checkpointing,
        )  # fmt: skip
        state = self._state
        phase = state.phase if state is not None else "other"
        if state is not None:
            state.phase = "other"  # no attention editor may act on the optimisation's forwards
        try:
            lam, self.history = optimise_lambdas(
                chain, objective, (cfg.source_prompt, cfg.target_prompt), self.init,
                epochs=self.epochs, lr=self.lr, content_weight=self.content_weight,
            )  # fmt: skip
        finally:
            if state is not None:
                state.phase = phase
        self.meta.update(clip_model=objective.name, epochs=self.epochs, lr=self.lr, content_weight=self.content_weight)
        return lam

    def step_conditioning(self, ctx: StepContext, cond: Conditioning) -> Conditioning:
        """Rows ``[neutral, target] -> [neutral, λ_i neutral + (1 − λ_i) target]``."""
        assert self.lambdas is not None
        i = ctx.step
        if i >= self.lambdas.shape[0]:
            raise ValueError(f"step {i} has no mixing weight ({self.lambdas.shape[0]} weights)")
        neutral = cond.select([0])
        mixed = [mix_conditioning(neutral, cond.select([b]), self.lambdas[i]) for b in range(1, cond.batch_size)]
        return Conditioning.cat([neutral, *mixed])


@dataclass(frozen=True, kw_only=True)
class DisentangleOptions(EditorOptions):
    """Embedding disentanglement (:func:`make_disentangle`); ``lambdas`` is normalised to a tuple of floats."""

    method: ClassVar[str] = "disentangle"
    weights: str | None = None
    lambdas: Sequence[float] | None = None
    t_star: float | int = 0.4
    lambda_after: float = 0.0
    epochs: int = 10
    lr: float = 0.05
    content_weight: float = 0.05
    clip_model: Any = None
    checkpointing: bool = True
    save_to: str | None = None
    on_weights: Callable[[MixingWeights], None] | None = None

    def validate(self) -> None:
        if self.weights is not None and self.lambdas is not None:
            raise self.error(
                "weights", "cannot be given with lambdas: give either weights= (a file) or lambdas= (values), not both"
            )
        if self.lambdas is not None:
            self.normalise("lambdas", tuple(float(v) for v in self.lambdas))
        self.check_steps("t_star")
        self.check_min("epochs", 0)
        self.check_min("lr", 0, strict=True)
        self.check_min("content_weight", 0)


@takes_options(DisentangleOptions)
def make_disentangle(backbone: Backbone, config: Any, o: DisentangleOptions) -> EmbeddingMixing:
    """Text-embedding disentanglement (Wu et al. 2023): mix the source (neutral) and target embeddings per step.

    Options:
        weights: path of saved mixing weights to apply as they are (no optimisation; the step count must match).
        lambdas: explicit ``λ`` values, one per step (no optimisation).
        t_star / lambda_after: the initialisation ``λ_i = 1`` for ``i < t*`` (fraction or count), else
            ``lambda_after``; used as is with ``epochs=0``.
        epochs / lr / content_weight: Adam optimisation of ``λ`` on this image (10 / 0.05 / 0.05, the paper's).
        clip_model: a transformers CLIPModel folder (default: the embedded shapes-clip when installed).
        checkpointing: gradient checkpointing of each model call in the chain (memory ~ one latent per step).
        save_to: write the ``λ`` used (optimised or not) to this path (``.json`` or safetensors).
        on_weights: Python API: called with the :class:`MixingWeights` once they are known.
    """
    weights = o.weights
    num_steps = int(config.num_steps)
    meta = {
        "source_prompt": config.source_prompt,
        "target_prompt": config.target_prompt,
        "num_steps": num_steps,
        "solver": config.solver,
        "guidance": config.guidance,
        "model": backbone.name,
        "family": backbone.family,
        "t_star": o.t_star,
        "lambda_after": o.lambda_after,
    }
    fixed: Tensor | None = None
    if weights is not None:
        saved = MixingWeights.load(weights)
        if saved.num_steps != num_steps:
            raise ValueError(
                f"{weights} holds {saved.num_steps} mixing weights but this edit has {num_steps} steps; "
                f"run with num_steps={saved.num_steps}"
            )
        for key in ("source_prompt", "target_prompt"):
            if saved.meta.get(key) not in (None, meta[key]):
                log.warning("applying mixing weights learned for %s %r to %r", key, saved.meta.get(key), meta[key])
        fixed = saved.lambdas
        meta["weights_from"] = str(weights)
    elif o.lambdas is not None:
        fixed = torch.tensor(o.lambdas, dtype=torch.float32)
        if fixed.shape[0] != num_steps:  # a rule on the run's step count
            raise ValueError(f"lambdas has {fixed.shape[0]} values for {num_steps} steps")
    return EmbeddingMixing(
        backbone, config, lambdas=fixed, init=init_lambdas(num_steps, o.t_star, o.lambda_after), epochs=o.epochs,
        lr=float(o.lr), content_weight=float(o.content_weight), clip_model=o.clip_model,
        checkpointing=o.checkpointing, save_to=o.save_to, on_weights=o.on_weights, meta=meta,
    )  # fmt: skip
