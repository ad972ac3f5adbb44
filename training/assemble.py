"""Assemble trained checkpoints into the embedded model folders (stock diffusers / transformers layouts).

Weights are stored as float16 safetensors to keep the package small; the stock classes load them back in
float32 with ``torch_dtype=torch.float32``. A denoiser that is still training is assembled from the EMA
weights of its latest checkpoint, and its card says so.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from retouch.models import registry
from training import cards
from training.common import RunDir, atomic_write_json
from training.denoisers import T5_FOLDER, starting_t5
from training.pipelines import Components, build_denoiser, build_pipeline, load_components

logger = logging.getLogger(__name__)

__all__ = ["assemble", "assemble_clip", "load_denoiser", "load_t5"]


def load_denoiser(family: str, run: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The EMA denoiser of the latest checkpoint in ``run`` and a summary (step, wall time, config, evals).

    A run directory that came back from another machine without its (large) ``checkpoint.pt`` is read from
    its ``final`` folder (the EMA weights the run ended with) and ``metrics.json``.
    """
    run = RunDir(Path(run))
    config = json.loads((run.path / "config.json").read_text())
    model = build_denoiser(family, config["denoiser"])
    if run.checkpoint.exists():
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        weights = state["ema"]["denoiser"] if state.get("ema") else state["modules"]["denoiser"]
        step, wall, train = int(state["step"]), float(state["wall_s"]), state.get("config", config.get("train"))
    elif (run.path / "final" / "config.json").exists() and (run.path / "metrics.json").exists():
        weights = type(model).from_pretrained(str(run.path / "final"), torch_dtype=torch.float32).state_dict()
        metrics = json.loads((run.path / "metrics.json").read_text())
        step, wall, train = int(metrics["step"]), float(metrics["wall_s"]), config.get("train")
    else:
        raise FileNotFoundError(f"{run.path}: neither checkpoint.pt nor final/ + metrics.json")
    model.load_state_dict(weights)
    model.eval().requires_grad_(False)
    # one row per step (a run stopped right after a timed evaluation evaluates that step again at its end)
    evals = list({e["step"]: e for e in run.read_log("evals.jsonl") if e["step"] <= step}.values())
    curve = run.read_log("curve.jsonl")
    info = {
        "family": family,
        "size": config.get("size"),
        "step": step,
        "wall_s": wall,
        "train": train,
        "denoiser_config": config["denoiser"],
        "evals": evals,
        "final_loss": next((r["loss"] for r in reversed(curve) if r["step"] <= step), None),
        "pool_size": config.get("pool_size"),
        "world": config.get("world", {"max_objects": 3}),
        "offset_noise": config.get("offset_noise", {"strength": 0.0, "from_step": 0}),
        "device": config.get("device"),
        "init_from": config.get("init_from"),
        "object_loss_weight": config.get("object_loss_weight", 1.0),
        "timestep_weighting": config.get("timestep_weighting", "eps"),
        "train_text_encoder": config.get("train_text_encoder", False),
        "binding_loss_weight": config.get("binding_loss_weight", 0.0),
        # runs older than shapes-clip's binding phase did not record the tower: phase 1 was the only one
        "clip_tower": config.get("clip_tower", "phase 1"),
    }
    return model, info


def load_t5(family: str, run: str | Path, comps: Components) -> Any:
    """The T5 a PixArt / Flux run's denoiser goes with: the EMA T5 of the latest checkpoint when the run trains
    it, else the run's ``final_t5``, else the T5 of the folder it started from, else the components' T5."""
    from transformers import T5EncoderModel

    run = RunDir(Path(run))
    if run.checkpoint.exists():
        state = torch.load(run.checkpoint, map_location="cpu", weights_only=False)
        weights = (state.get("ema") or state["modules"]).get("text_encoder")
        if weights is not None:
            t5 = copy.deepcopy(comps.t5)
            t5.load_state_dict(weights)
            return t5.eval().requires_grad_(False)
    if (run.path / "final_t5" / "config.json").exists():
        return T5EncoderModel.from_pretrained(str(run.path / "final_t5")).float().eval()
    init = (json.loads((run.path / "config.json").read_text()).get("init_from") or {}).get("path")
    return starting_t5(family, comps, init if init and Path(init).exists() else None).eval()


def training_record(info: dict[str, Any]) -> dict[str, Any]:
    """The part of a run's summary that a model folder keeps in ``training.json`` (what a later phase cites)."""
    keys = (
        "family",
        "size",
        "step",
        "wall_s",
        "train",
        "pool_size",
        "world",
        "offset_noise",
        "device",
        "init_from",
        "object_loss_weight",
        "timestep_weighting",
        "train_text_encoder",
        "binding_loss_weight",
        "clip_tower",
    )
    return {k: info.get(k) for k in keys}


def _fp16_save(pipe: Any, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16)
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def assemble(
    family: str, *, run: str | Path, components: str | Path, dest: str | Path | None = None, card: bool = True
) -> Path:
    """Write the ``shapes-<family>`` pipeline folder from the run's latest checkpoint (EMA weights)."""
    dest = Path(dest) if dest is not None else registry.embedded_dir() / f"shapes-{family}"
    comps = copy.copy(load_components(components))
    model, info = load_denoiser(family, run)
    if family in T5_FOLDER:
        comps.t5 = load_t5(family, run, comps)
    pipe = build_pipeline(family, model, comps)
    previous_card = (dest / "README.md").read_text() if (dest / "README.md").exists() else None
    _fp16_save(pipe, dest)
    registry.write_world(dest, info["world"])
    atomic_write_json(dest / "training.json", training_record(info))
    if card:
        cards.write_pipeline_card(dest, info, Path(components), previous=previous_card)
    logger.info("assembled %s at step %d into %s", family, info["step"], dest)
    return dest


def assemble_clip(components: str | Path, dest: str | Path | None = None, card: bool = True) -> Path:
    """Copy shapes-clip (CLIPModel + tokenizer + image processor) into the embedded folder, float16."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    src = Path(components) / "clip" / "final"
    dest = Path(dest) if dest is not None else registry.embedded_dir() / "shapes-clip"
    previous_card = (dest / "README.md").read_text() if (dest / "README.md").exists() else None
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    CLIPModel.from_pretrained(str(src)).to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    CLIPTokenizer.from_pretrained(str(src)).save_pretrained(tmp)
    CLIPImageProcessor.from_pretrained(str(src)).save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    if card:
        cards.write_clip_card(dest, Path(components), previous=previous_card)
    return dest
