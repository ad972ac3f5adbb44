"""Stages ``tokenizers``, ``clip`` and ``t5``: the text side of the embedded models.

* ``tokenizers``: a CLIP BPE (77 tokens) and a T5 Unigram (120 tokens, PixArt-α's length) built offline on
  :func:`retouch.worlds.shapes.vocabulary` with :mod:`retouch.models.tokenizers`.
* ``clip`` (**shapes-clip**): a small :class:`~transformers.CLIPModel` (ViT on 64×64, patch 8; causal text
  transformer with bos 0 / eos 1 / pad 1, pooled at the first eos) trained with CLIP's symmetric InfoNCE on
  (render, caption with varied wording). Its text tower is the frozen text encoder of shapes-sd and
  shapes-flux. Text is fed without an attention mask, as Stable Diffusion pipelines do; because the text
  transformer is causal, padding to the longest caption during training gives exactly the hidden states of
  the first tokens of a 77-token input.
* ``t5``: a small :class:`~transformers.T5EncoderModel` trained as a second text tower against the *frozen*
  CLIP image tower (mean-pooled encoder states → linear head → CLIP's joint space), so its token features
  describe the picture. The head is kept in the run directory only.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from retouch.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer
from retouch.worlds import shapes
from training import data
from training.common import RunDir, TrainConfig, atomic_write_json, count_params, step_rng, train_loop

logger = logging.getLogger(__name__)

__all__ = [
    "build_clip",
    "build_t5",
    "build_tokenizers",
    "clip_binding_eval",
    "clip_eval",
    "has_binding_phase",
    "load_tokenizers",
    "t5_eval",
    "train_clip",
    "train_clip_binding",
    "train_t5",
]

CLIP_LENGTH = 77
T5_LENGTH = 120


def build_tokenizers(out: str | Path, words: Sequence[str] | None = None) -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """Build both tokenizers on the caption vocabulary and save them to ``out/clip`` and ``out/t5``."""
    out = Path(out)
    words = list(words) if words is not None else data.vocabulary()
    clip_tok = build_clip_tokenizer(words, max_length=CLIP_LENGTH)
    t5_tok = build_t5_tokenizer(words, max_length=T5_LENGTH)
    clip_tok.save_pretrained(out / "clip")
    t5_tok.save_pretrained(out / "t5")
    lengths = [
        len(clip_tok(data.caption_of(s, np.random.default_rng(i))).input_ids)
        for i, s in enumerate(data.held_out_scenes(200))
    ]
    atomic_write_json(
        out / "metrics.json",
        {"words": len(words), "clip_vocab": len(clip_tok), "t5_vocab": len(t5_tok), "max_clip_tokens": max(lengths)},
    )
    logger.info("tokenizers: %d words, CLIP vocab %d, T5 vocab %d", len(words), len(clip_tok), len(t5_tok))
    return clip_tok, t5_tok


def load_tokenizers(path: str | Path) -> tuple[CLIPTokenizer, T5TokenizerFast]:
    """Load the tokenizers saved by :func:`build_tokenizers`."""
    path = Path(path)
    return CLIPTokenizer.from_pretrained(str(path / "clip")), T5TokenizerFast.from_pretrained(str(path / "t5"))


def build_clip(vocab_size: int, width: int = 128, layers: int = 4, heads: int = 4, proj: int = 128) -> CLIPModel:
    """A small CLIPModel: ViT 64×64/8 and a causal text transformer of the same width."""
    common = {
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": "quick_gelu",
    }
    config = CLIPConfig(
        text_config={
            **common,
            "vocab_size": vocab_size,
            "max_position_embeddings": CLIP_LENGTH,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            "projection_dim": proj,
        },
        vision_config={**common, "image_size": 64, "patch_size": 8, "num_channels": 3, "projection_dim": proj},
        projection_dim=proj,
    )
    return CLIPModel(config)


def build_t5(vocab_size: int, width: int = 128, layers: int = 4, heads: int = 4) -> T5EncoderModel:
    """A small T5 v1.1-style encoder (gated-GELU feed-forward, relative position buckets)."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_kv=width // heads,
        d_ff=2 * width,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=False,
    )
    return T5EncoderModel(config)


def _clip_text(model: CLIPModel, tok: CLIPTokenizer, captions: Sequence[str], device: torch.device) -> torch.Tensor:
    ids = tok(list(captions), padding="longest", truncation=True, max_length=CLIP_LENGTH, return_tensors="pt")
    return model.get_text_features(input_ids=ids.input_ids.to(device))


def _features(out: Any) -> torch.Tensor:
    """transformers 5 may return a model output instead of a tensor from ``get_*_features``."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


def _variants(scene: shapes.Scene, rng: np.random.Generator) -> dict[str, list[shapes.Scene]]:
    """For each attribute, the scene followed by every valid scene that differs only in that attribute
    (object attributes on one random object)."""
    import dataclasses

    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    out: dict[str, list[shapes.Scene]] = {}

    def with_obj(o: shapes.Object) -> shapes.Scene:
        objs = list(scene.objects)
        objs[i] = o
        return dataclasses.replace(scene, objects=tuple(objs))

    choices = {"shape": shapes.SHAPES, "colour": tuple(shapes.COLOURS), "size": shapes.SIZES, "fill": shapes.FILLS}
    for attr, values in choices.items():
        out[attr] = [scene] + [
            with_obj(dataclasses.replace(obj, **{attr: v})) for v in values if v != getattr(obj, attr)
        ]
    free = scene.free_positions()
    out["position"] = [scene] + [with_obj(dataclasses.replace(obj, position=p)) for p in free]
    bg = scene.background
    out["background_colour"] = [scene] + [
        dataclasses.replace(scene, background=dataclasses.replace(bg, colour=c))
        for c in shapes.BACKGROUND_COLOURS
        if c != bg.colour
    ]
    out["background_pattern"] = [scene] + [
        dataclasses.replace(scene, background=dataclasses.replace(bg, pattern=p))
        for p in shapes.PATTERNS
        if p != bg.pattern
    ]
    out["style"] = [scene] + [dataclasses.replace(scene, style=s) for s in shapes.STYLES if s != scene.style]
    return out


@torch.no_grad()
def _zero_shot(image_emb: torch.Tensor, scenes: Sequence[shapes.Scene], encode_text, seed: int) -> dict[str, float]:
    """Zero-shot attribute accuracy: the true caption must score highest among its one-attribute variants."""
    rng = np.random.default_rng(seed)
    hits: dict[str, list[float]] = {}
    for k, scene in enumerate(scenes):
        for attr, variants in _variants(scene, rng).items():
            if len(variants) < 2:
                continue
            t = F.normalize(encode_text([data.caption_of(v) for v in variants]), dim=-1)
            sims = t @ image_emb[k]
            hits.setdefault(attr, []).append(float(int(sims.argmax()) == 0))
    return {f"zs_{a}": float(np.mean(v)) for a, v in hits.items()}


@torch.no_grad()
def _retrieval(img: torch.Tensor, txt: torch.Tensor) -> dict[str, float]:
    sims = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    target = torch.arange(len(sims))
    return {
        "i2t_top1": float((sims.argmax(1) == target).float().mean()),
        "t2i_top1": float((sims.argmax(0) == target).float().mean()),
    }


@torch.no_grad()
def clip_eval(
    model: CLIPModel, tok: CLIPTokenizer, n: int = 200, device: torch.device | None = None
) -> dict[str, float]:
    """Zero-shot attribute accuracy (per attribute, ``zs_*``) and retrieval top-1 on ``n`` held-out scenes."""
    device = device or torch.device("cpu")
    scenes = data.held_out_scenes(n, offset=200_000)
    img = _features(model.get_image_features(pixel_values=data.render_batch(scenes).to(device)))
    txt = _features(_clip_text(model, tok, [data.caption_of(s) for s in scenes], device))
    out = _retrieval(img, txt)
    out.update(
        _zero_shot(
            F.normalize(img, dim=-1), scenes, lambda caps: _features(_clip_text(model, tok, caps, device)), seed=1
        )
    )
    return out


def train_clip(
    out: str | Path,
    cfg: TrainConfig,
    *,
    tokenizers: str | Path,
    resume: bool = True,
    width: int = 128,
    layers: int = 4,
    eval_n: int = 200,
    device: torch.device | None = None,
) -> CLIPModel:
    """Train shapes-clip; writes ``out/final`` (CLIPModel + tokenizer + image processor) and metrics."""
    device = device or torch.device("cpu")
    run = RunDir(Path(out))
    clip_tok, _ = load_tokenizers(tokenizers)
    model = build_clip(len(clip_tok), width=width, layers=layers).to(device)
    logger.info("CLIP: %d parameters", count_params(model))

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = step_rng(cfg.seed, step)
        scenes = data.sample_scenes(rng, cfg.batch_size)
        captions = [data.caption_of(s, rng) for s in scenes]
        ids = clip_tok(captions, padding="longest", return_tensors="pt").input_ids.to(device)
        res = model(input_ids=ids, pixel_values=data.render_batch(scenes).to(device), return_loss=True)
        return res.loss, {"logit_scale": float(model.logit_scale.detach().exp())}

    def eval_fn(step: int, modules: dict[str, nn.Module]) -> dict[str, float]:
        return clip_eval(modules["clip"], clip_tok, n=min(eval_n, 100), device=device)

    result = train_loop(run, {"clip": model}, loss_fn, cfg, resume=resume, eval_fn=eval_fn)
    model.eval()
    metrics = {
        "step": result["step"],
        "wall_s": round(result["wall_s"], 1),
        "train": dict(cfg.__dict__),
        "params": count_params(model),
        "text_params": count_params(model.text_model),
        **clip_eval(model, clip_tok, n=eval_n, device=device),
    }
    final = run.path / "final"
    model.save_pretrained(final)
    clip_tok.save_pretrained(final)
    CLIPImageProcessor(
        size={"shortest_edge": 64},
        crop_size={"height": 64, "width": 64},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        do_convert_rgb=True,
    ).save_pretrained(final)
    atomic_write_json(run.path / "metrics.json", metrics)
    logger.info("CLIP done: %s", metrics)
    return model


def has_binding_phase(metrics: dict[str, Any]) -> bool:
    """Whether a shapes-clip run's ``metrics.json`` is that of the binding phase (:func:`train_clip_binding`)."""
    return "anchor_weight" in metrics


def _relative_sq_error(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``‖x − reference‖² / ‖reference‖²`` over the whole batch."""
    return (x - reference).pow(2).sum() / reference.pow(2).sum()


def clip_binding_eval(
    text_model: nn.Module,
    reference: nn.Module,
    heads: nn.Module,
    tok: Any,
    n: int = 200,
    device: torch.device | None = None,
    scene_heads: nn.Module | None = None,
    start: nn.Module | None = None,
) -> dict[str, float]:
    """Token-level binding accuracy (``bind_*``; with ``scene_heads`` also of the scene labels) of
    ``text_model`` on ``n`` held-out captions with varied wording, and how far its pooled output moved from
    ``reference``'s (mean cosine, relative squared error); with ``start``, how far its token states moved from
    that tower's (``token_rel_sq_error``, over the real tokens)."""
    from retouch.worlds import captions as grammar
    from training import binding

    device = device or torch.device("cpu")
    scenes = data.held_out_scenes(n, offset=300_000)
    rng = np.random.default_rng(3)
    wordings = [grammar.sample_wording(rng) for _ in scenes]
    texts = [grammar.caption(s, wording=w) for s, w in zip(scenes, wordings, strict=True)]
    ids = tok(texts, padding="max_length", max_length=CLIP_LENGTH, truncation=True, return_tensors="pt").input_ids
    ids = ids.to(device)
    labels = binding.token_labels(tok, texts, list(scenes), wordings, CLIP_LENGTH, causal=True)
    with torch.no_grad():
        out, ref = text_model(input_ids=ids), reference(input_ids=ids)
        _, metrics = binding.binding_loss(heads, out.last_hidden_state, labels)
        if scene_heads is not None:
            scene = binding.scene_labels(tok, texts, list(scenes), wordings, CLIP_LENGTH, causal=True)
            metrics.update(binding.binding_loss(scene_heads, out.last_hidden_state, scene)[1])
        cos = F.cosine_similarity(out.pooler_output, ref.pooler_output, dim=-1).mean()
        rel = _relative_sq_error(out.pooler_output, ref.pooler_output)
        if start is not None:
            real = ids != tok.pad_token_id
            moved = _relative_sq_error(out.last_hidden_state[real], start(input_ids=ids).last_hidden_state[real])
            metrics["token_rel_sq_error"] = float(moved)
    return {**metrics, "pooled_cosine": float(cos), "pooled_rel_sq_error": float(rel)}


def train_clip_binding(
    out: str | Path,
    cfg: TrainConfig,
    *,
    clip: str | Path,
    resume: bool = True,
    anchor_weight: float = 10.0,
    scene_weight: float = 0.0,
    init_text: str | Path | None = None,
    token_anchor_weight: float = 0.0,
    eval_n: int = 200,
    device: torch.device | None = None,
) -> CLIPModel:
    """shapes-clip's second phase: fine-tune the text tower so its token states bind attributes to objects,
    keeping its pooled output (the joint-space embedding, Flux's pooled input) where it was.

    Loss: :func:`training.binding.binding_loss` on the last hidden states with causal labels (a token
    predicts the attributes of its object that it has read), plus ``anchor_weight`` × the squared error of the
    pooled output relative to the frozen phase-1 tower's, plus ``scene_weight`` × the same binding loss on the
    scene labels (:func:`training.binding.scene_labels`: background pattern and colour, style; 0 = off).
    The image tower and projections do not change. Writes ``out/final`` (the whole CLIPModel + tokenizer +
    image processor) and ``metrics.json``.

    ``init_text``: a shapes-clip folder (an earlier binding run's ``final``) whose text tower starts this run
    instead of phase 1's; ``token_anchor_weight`` × the relative squared error of every token state against
    that starting tower's keeps the states a denoiser was trained on (0 = off). This adds the scene labels to
    a tower SD already reads without moving the rest: a tower re-trained from phase 1 lands elsewhere (token
    states 1.3× their norm away), and SD's UNet drew nothing right on it.
    """
    from transformers import CLIPTokenizerFast

    from retouch.worlds import captions as grammar
    from training import binding

    device = device or torch.device("cpu")
    run = RunDir(Path(out))
    model = CLIPModel.from_pretrained(str(clip)).float().to(device).requires_grad_(False)
    reference = copy.deepcopy(model.text_model).eval()  # the frozen phase-1 tower
    tok = CLIPTokenizerFast.from_pretrained(str(clip))  # offsets for the labels; same ids as the slow tokenizer
    clip_tok = CLIPTokenizer.from_pretrained(str(clip))
    # phase 1 as it was: its run's record and the same evaluation, now
    phase1 = {**_run_record(clip), **clip_eval(model, clip_tok, n=eval_n, device=device)}
    if init_text is not None:
        model.text_model.load_state_dict(CLIPModel.from_pretrained(str(init_text)).float().text_model.state_dict())
    start = copy.deepcopy(model.text_model).eval() if token_anchor_weight > 0 else None  # frozen starting tower
    text = model.text_model.requires_grad_(True).train()
    width = model.config.text_config.hidden_size
    heads = binding.BindingHeads(width).to(device)
    modules: dict[str, nn.Module] = {"text": text, "heads": heads}
    if scene_weight > 0:
        modules["scene_heads"] = binding.BindingHeads(width, binding.SCENE_ATTRIBUTES).to(device)

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = step_rng(cfg.seed, step)
        scenes = data.sample_scenes(rng, cfg.batch_size)
        wordings = [grammar.sample_wording(rng) for _ in scenes]
        texts = [grammar.caption(s, wording=w) for s, w in zip(scenes, wordings, strict=True)]
        ids = tok(texts, padding="longest", truncation=True, max_length=CLIP_LENGTH, return_tensors="pt").input_ids
        ids = ids.to(device)
        # causal tower: the states of a 77-token input's first tokens are those of the shorter padded one
        labels = binding.token_labels(tok, texts, scenes, wordings, CLIP_LENGTH, causal=True)[:, : ids.shape[1]]
        res = text(input_ids=ids)
        with torch.no_grad():
            ref = reference(input_ids=ids).pooler_output
        bind, metrics = binding.binding_loss(heads, res.last_hidden_state, labels)
        anchor = _relative_sq_error(res.pooler_output, ref)
        loss = bind + anchor_weight * anchor
        parts = {"binding": float(bind.detach()), "anchor": float(anchor.detach())}
        if start is not None:
            with torch.no_grad():
                start_states = start(input_ids=ids).last_hidden_state
            token_anchor = _relative_sq_error(res.last_hidden_state, start_states)
            loss = loss + token_anchor_weight * token_anchor
            parts["token_anchor"] = float(token_anchor.detach())
        if "scene_heads" in modules:
            scene = binding.scene_labels(tok, texts, scenes, wordings, CLIP_LENGTH, causal=True)[:, : ids.shape[1]]
            scene_loss, scene_metrics = binding.binding_loss(modules["scene_heads"], res.last_hidden_state, scene)
            loss = loss + scene_weight * scene_loss
            parts["scene"] = float(scene_loss.detach())
            metrics.update(scene_metrics)
        return loss, {**parts, **metrics}

    def eval_fn(step: int, trained: dict[str, nn.Module]) -> dict[str, float]:
        return clip_binding_eval(
            trained["text"], reference, trained["heads"], tok, n=min(eval_n, 100), device=device,
            scene_heads=trained.get("scene_heads"), start=start,
        )  # fmt: skip

    result = train_loop(run, modules, loss_fn, cfg, resume=resume, eval_fn=eval_fn)
    trained = result["ema"]["text"]
    model.text_model.load_state_dict(trained.state_dict())
    model.eval()
    metrics = {
        "step": result["step"],
        "wall_s": round(result["wall_s"], 1),
        "train": dict(cfg.__dict__),
        "anchor_weight": anchor_weight,
        "scene_weight": scene_weight,
        "from": str(clip),
        "phase1": phase1,
        **_init_text_record(init_text, token_anchor_weight),
        **clip_binding_eval(
            model.text_model,
            reference,
            result["ema"]["heads"],
            tok,
            n=eval_n,
            device=device,
            scene_heads=result["ema"].get("scene_heads"),
            start=start,
        ),
        **clip_eval(model, clip_tok, n=eval_n, device=device),
    }
    final = run.path / "final"
    model.save_pretrained(final)
    clip_tok.save_pretrained(final)
    CLIPImageProcessor.from_pretrained(str(clip)).save_pretrained(final)
    atomic_write_json(run.path / "metrics.json", metrics)
    logger.info("CLIP binding phase done: %s", metrics)
    return model


def _init_text_record(init_text: str | Path | None, token_anchor_weight: float) -> dict[str, Any]:
    """The metrics keys naming the tower a binding run started from (and that run's own record, for the
    cards' retrain commands)."""
    if init_text is None:
        return {}
    record = _run_record(init_text)
    record.pop("phase1", None)
    return {"init_text": str(init_text), "init_text_run": record, "token_anchor_weight": token_anchor_weight}


def _run_record(folder: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` of the run whose ``final`` is ``folder`` ({} for any other folder)."""
    parent = Path(folder).parent / "metrics.json"
    return json.loads(parent.read_text()) if Path(folder).name == "final" and parent.exists() else {}


class _T5Head(nn.Module):
    """Mean pooling over real tokens → linear map to the CLIP joint space (kept out of the T5 folder)."""

    def __init__(self, width: int, proj: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, proj)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(10.0))))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
        return self.proj((hidden * m).sum(1) / m.sum(1).clamp_min(1))


def _t5_embed(
    t5: T5EncoderModel, head: _T5Head, tok: T5TokenizerFast, captions: Sequence[str], device: torch.device
) -> torch.Tensor:
    enc = tok(list(captions), padding="longest", truncation=True, max_length=T5_LENGTH, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    return head(t5(input_ids=ids, attention_mask=mask).last_hidden_state, mask)


@torch.no_grad()
def t5_eval(
    t5: T5EncoderModel,
    head: _T5Head,
    tok: T5TokenizerFast,
    clip: CLIPModel,
    n: int = 200,
    device: torch.device | None = None,
) -> dict[str, float]:
    """The CLIP metrics with the T5 tower as text encoder (against the frozen CLIP image tower)."""
    device = device or torch.device("cpu")
    scenes = data.held_out_scenes(n, offset=200_000)
    img = _features(clip.get_image_features(pixel_values=data.render_batch(scenes).to(device)))
    txt = _t5_embed(t5, head, tok, [data.caption_of(s) for s in scenes], device)
    out = _retrieval(img, txt)
    out.update(
        _zero_shot(F.normalize(img, dim=-1), scenes, lambda caps: _t5_embed(t5, head, tok, caps, device), seed=1)
    )
    return out


def train_t5(
    out: str | Path,
    cfg: TrainConfig,
    *,
    tokenizers: str | Path,
    clip: str | Path,
    resume: bool = True,
    width: int = 128,
    layers: int = 4,
    eval_n: int = 200,
    device: torch.device | None = None,
) -> T5EncoderModel:
    """Train the T5 text tower against the frozen shapes-clip image tower; writes ``out/final``."""
    device = device or torch.device("cpu")
    run = RunDir(Path(out))
    _, t5_tok = load_tokenizers(tokenizers)
    clip_model = CLIPModel.from_pretrained(str(clip)).to(device).eval().requires_grad_(False)
    t5 = build_t5(len(t5_tok), width=width, layers=layers).to(device)
    head = _T5Head(width, clip_model.config.projection_dim).to(device)
    logger.info("T5: %d parameters", count_params(t5))

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rng = step_rng(cfg.seed, step)
        scenes = data.sample_scenes(rng, cfg.batch_size)
        captions = [data.caption_of(s, rng) for s in scenes]
        with torch.no_grad():
            img = F.normalize(
                _features(clip_model.get_image_features(pixel_values=data.render_batch(scenes).to(device))), dim=-1
            )
        txt = F.normalize(_t5_embed(t5, head, t5_tok, captions, device), dim=-1)
        logits = head.logit_scale.exp().clamp(max=100) * txt @ img.T
        target = torch.arange(len(logits), device=device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return loss, {}

    def eval_fn(step: int, modules: dict[str, nn.Module]) -> dict[str, float]:
        return t5_eval(modules["t5"], modules["head"], t5_tok, clip_model, n=min(eval_n, 100), device=device)

    result = train_loop(run, {"t5": t5, "head": head}, loss_fn, cfg, resume=resume, eval_fn=eval_fn)
    t5.eval()
    metrics = {
        "step": result["step"],
        "wall_s": round(result["wall_s"], 1),
        "train": dict(cfg.__dict__),
        "params": count_params(t5),
        **t5_eval(t5, head, t5_tok, clip_model, n=eval_n, device=device),
    }
    t5.save_pretrained(run.path / "final")
    t5_tok.save_pretrained(run.path / "final")
    atomic_write_json(run.path / "metrics.json", metrics)
    logger.info("T5 done: %s", metrics)
    return t5
