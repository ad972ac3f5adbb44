"""Shared training machinery: devices, seeded per-step randomness, run directories, atomic checkpoints, logs.

Every stage of :mod:`training` trains with :func:`train_loop`, which

* draws the randomness of step ``k`` from generators seeded by ``(seed, k)`` (:func:`step_generator`), so a
  run resumed from a checkpoint at step ``k`` continues exactly as the uninterrupted run would have;
* writes ``checkpoint.pt`` atomically (temporary file + ``os.replace``) every ``checkpoint_every_s`` seconds
  and at the end, holding the trainable modules, the optimizer, the EMA copy, the step and the wall time;
* appends one JSON line per logged step to ``curve.jsonl`` (step, loss, learning rate, wall seconds) and
  every evaluation to ``evals.jsonl``; a resume truncates nothing, it only skips lines of steps it repeats.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "RunDir",
    "TrainConfig",
    "atomic_write_json",
    "atomic_torch_save",
    "count_params",
    "device_name",
    "lr_at",
    "pick_device",
    "step_generator",
    "step_rng",
    "train_loop",
]


def pick_device(threads: int = 2) -> torch.device:
    """CUDA when present (TF32 matmuls), else the CPU; either way ``threads`` intra-op CPU threads (the machine
    is shared)."""
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.device("cuda")
    return torch.device("cpu")


def device_name(device: torch.device | str) -> str:
    """Human-readable name of the device a run trained on (the GPU's name, or the CPU model)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from retouch.bench.provenance import cpu_model

    return f"cpu: {cpu_model()}"


def step_rng(seed: int, step: int, stream: int = 0) -> np.random.Generator:
    """numpy Generator for step ``step`` of a run seeded ``seed`` (``stream`` separates independent uses)."""
    return np.random.default_rng([seed, step, stream])


def step_generator(seed: int, step: int, device: torch.device | str = "cpu", stream: int = 0) -> torch.Generator:
    """torch Generator for step ``step`` of a run seeded ``seed``; same value on every resume."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng([seed, step, stream, 7]).integers(2**62)))
    return g


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def atomic_write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class TrainConfig:
    """Optimisation settings shared by every stage (AdamW, linear warm-up, cosine or constant after)."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 300
    min_lr_ratio: float = 0.1
    decay: str = "cosine"  # "cosine" to min_lr_ratio*lr at `steps`, or "constant"
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema: float = 0.0  # 0 = no EMA; else the decay (with a 1 - 1/(step/10+1) warm-up)
    seed: int = 0
    log_every: int = 10
    checkpoint_every_s: float = 180.0
    eval_every_s: float = 0.0  # 0 = only at the end
    max_minutes: float = 0.0  # 0 = no limit; else stop (with a checkpoint) after this much wall time in this call
    stop_at: int = 0  # 0 = run to `steps`; else stop (with a checkpoint) at this step, the schedule still over `steps`

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or self.stop_at < 0:
            raise ValueError(f"invalid training config {self}")
        if self.decay not in ("cosine", "constant"):
            raise ValueError(f"decay must be 'cosine' or 'constant', got {self.decay!r}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup`` steps, then cosine (or constant)."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.decay == "constant" or cfg.steps <= cfg.warmup:
        return cfg.lr
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class RunDir:
    """A run directory: ``checkpoint.pt``, ``curve.jsonl``, ``evals.jsonl``, ``config.json``."""

    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    def log(self, name: str, record: Mapping[str, Any]) -> None:
        """Append one JSON line to ``name`` (e.g. ``curve.jsonl``)."""
        with open(self.path / name, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def read_log(self, name: str) -> list[dict[str, Any]]:
        """All records of a JSONL log (empty if missing)."""
        p = self.path / name
        if not p.exists():
            return []
        return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


LossFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[int, Mapping[str, nn.Module]], Mapping[str, Any]]


def train_loop(
    run: RunDir,
    modules: Mapping[str, nn.Module],
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    resume: bool = True,
    eval_fn: EvalFn | None = None,
    extra_params: Iterable[nn.Parameter] = (),
) -> dict[str, Any]:
    """Optimise every parameter of ``modules`` (plus ``extra_params``) with AdamW on ``loss_fn(step)``.

    Args:
        run: the run directory (checkpoint and logs).
        modules: named trainable modules; their state dicts are checkpointed under these names.
        loss_fn: ``step -> (scalar loss, metrics)``; must draw its randomness from
            :func:`step_rng` / :func:`step_generator` with the step so resumes are exact.
        cfg: optimisation settings.
        resume: continue from ``run.checkpoint`` when it exists.
        eval_fn: ``(step, modules) -> metrics``, called every ``cfg.eval_every_s`` seconds and at the end
            (also when stopped by ``max_minutes``),
            with the EMA modules when EMA is on; results go to ``evals.jsonl``.

    Returns:
        ``{"step", "wall_s", "loss", "ema"}``; ``ema`` maps names to the EMA modules (or the modules).
    """
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad] + list(extra_params)
    fused = bool(params) and all(p.is_cuda for p in params)  # one kernel per step on a GPU
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=fused or None)
    ema = {k: copy.deepcopy(m).requires_grad_(False) for k, m in modules.items()} if cfg.ema > 0 else None
    step, wall = 0, 0.0
    if resume and run.checkpoint.exists():
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        if ema is not None and state.get("ema"):
            for k, m in ema.items():
                m.load_state_dict(state["ema"][k])
        if state.get("extra") is not None:
            with torch.no_grad():
                for p, v in zip(extra_params, state["extra"], strict=True):
                    p.copy_(v)
        opt.load_state_dict(state["optimizer"])
        step, wall = int(state["step"]), float(state["wall_s"])
        logger.info("resumed %s at step %d (%.0f s)", run.path, step, wall)
    logged_steps = {r["step"] for r in run.read_log("curve.jsonl")}

    def save() -> None:
        atomic_torch_save(
            {
                "modules": {k: m.state_dict() for k, m in modules.items()},
                "ema": {k: m.state_dict() for k, m in ema.items()} if ema is not None else None,
                "extra": [p.detach().clone() for p in extra_params] or None,
                "optimizer": opt.state_dict(),
                "step": step,
                "wall_s": wall,
                "config": asdict(cfg),
            },
            run.checkpoint,
        )

    def evaluate() -> None:
        if eval_fn is None:
            return
        target = ema if ema is not None else modules
        for m in target.values():
            m.eval()
        t = time.perf_counter()
        metrics = dict(eval_fn(step, target))
        for m in modules.values():
            m.train()
        record = {"step": step, "wall_s": round(wall, 1), "eval_s": round(time.perf_counter() - t, 1), **metrics}
        run.log("evals.jsonl", record)
        logger.info("eval step %d: %s", step, record)

    for m in modules.values():
        m.train()
    start = time.perf_counter()
    last_ckpt = last_eval = time.perf_counter()
    loss_val = float("nan")
    running: list[float] = []
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
    while step < end:
        t0 = time.perf_counter()
        lr = lr_at(cfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, metrics = loss_fn(step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema, 1 - 1 / (step / 10 + 1))
            for k, m in modules.items():
                _ema_update(ema[k], m, decay)
        step += 1
        wall += time.perf_counter() - t0
        loss_val = float(loss.detach())
        running.append(loss_val)
        if step % cfg.log_every == 0 or step == end:
            if step not in logged_steps:
                rec = {"step": step, "loss": float(np.mean(running)), "lr": lr, "wall_s": round(wall, 2)}
                rec.update({k: round(float(v), 5) for k, v in metrics.items()})
                run.log("curve.jsonl", rec)
            running.clear()
        now = time.perf_counter()
        if now - last_ckpt >= cfg.checkpoint_every_s:
            save()
            last_ckpt = now
        if cfg.eval_every_s > 0 and now - last_eval >= cfg.eval_every_s:
            evaluate()
            last_eval = time.perf_counter()
        if cfg.max_minutes > 0 and now - start >= cfg.max_minutes * 60:
            logger.info("time limit reached at step %d", step)
            break
    save()
    evaluate()
    return {"step": step, "wall_s": wall, "loss": loss_val, "ema": ema if ema is not None else dict(modules)}
