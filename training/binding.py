"""An auxiliary attribute-binding loss on the T5's token states, for joint T5 + denoiser training.

Why: the embedded denoisers draw one-object scenes well but bind attributes to the wrong object in scenes of
two or three (the colours, shapes, … asked for appear, at the right cells, assigned at random). The text
tokens reach the denoiser without positions of their own (Flux's text ids are zeros, PixArt's cross-attention
has none), so which adjective goes with which "top left" must already be in the T5's token states; a T5
trained only contrastively on pooled captions does not put it there.

The loss: every token of an object's phrase ("a small red striped star at the top left") predicts, through
linear heads, *all* of that object's attributes (shape, colour, size, fill, cell). The adjective tokens then
carry the cell and the cell tokens the adjectives, so a denoiser attending to either finds the whole object.
Tokens outside object phrases (background, style, padding) are not supervised. The heads are training-only;
the shipped T5 stays a stock ``T5EncoderModel``.

Scene labels (:func:`scene_labels`, ``SCENE_ATTRIBUTES``): the same kind of loss for the scene-wide words, the
background's pattern and colour and the style. shapes-clip's contrastive phase left "lined" and "checkered"
with almost the same token states (its image tower hardly told the two patterns apart), so SD, which reads
those states, drew one for the other half the time; these labels make the text tower keep them apart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retouch.worlds import captions
from retouch.worlds.shapes import BACKGROUND_COLOURS, COLOURS, FILLS, PATTERNS, POSITIONS, SHAPES, SIZES, STYLES, Scene

__all__ = [
    "ATTRIBUTES",
    "SCENE_ATTRIBUTES",
    "BindingHeads",
    "attribute_ends",
    "binding_loss",
    "object_spans",
    "scene_labels",
    "token_labels",
]

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES),
    "colour": tuple(COLOURS),
    "size": tuple(SIZES),
    "fill": tuple(FILLS),
    "position": tuple(POSITIONS),
}
SCENE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "background_pattern": tuple(PATTERNS),
    "background_colour": tuple(BACKGROUND_COLOURS),
    "style": tuple(STYLES),
}
IGNORE = -100


class BindingHeads(nn.Module):
    """One linear classifier per attribute over a token state (``attributes``: ``ATTRIBUTES`` or
    ``SCENE_ATTRIBUTES``)."""

    def __init__(self, width: int, attributes: dict[str, tuple[str, ...]] = ATTRIBUTES) -> None:
        super().__init__()
        self.heads = nn.ModuleDict({a: nn.Linear(width, len(v)) for a, v in attributes.items()})

    def forward(self, states: torch.Tensor) -> dict[str, torch.Tensor]:
        return {a: head(states) for a, head in self.heads.items()}


def object_spans(scene: Scene, wording: captions.Wording, text: str) -> list[tuple[int, int]]:
    """Character span of each object's phrase in ``text`` (its caption under ``wording``), in object order."""
    spans, start = [], 0
    for obj in scene.objects:
        phrase = captions.describe_object(obj, wording)
        at = text.find(phrase, start)
        if at < 0:
            raise ValueError(f"object phrase {phrase!r} not found in caption {text!r}")
        spans.append((at, at + len(phrase)))
        start = at + len(phrase)
    return spans


def attribute_ends(obj: Any, wording: captions.Wording) -> list[int]:
    """Where, in the object's phrase (:func:`captions.describe_object`), the word of each attribute
    (``ATTRIBUTES`` order) ends: the position's only at the end of the phrase ("top" alone is no cell)."""
    phrase = captions.describe_object(obj, wording)
    ends, cursor = {}, 0
    for attr in (*wording.adjective_order.split(), "shape"):
        at = phrase.find(str(getattr(obj, attr)), cursor)
        if at < 0:  # the grammar changed under this function
            raise ValueError(f"{attr} {getattr(obj, attr)!r} not found in {phrase!r}")
        cursor = ends[attr] = at + len(str(getattr(obj, attr)))
    ends["position"] = len(phrase)
    return [ends[a] for a in ATTRIBUTES]


def _captions(
    tokenizer: Any, texts: list[str], scenes: list[Scene | None], wordings: list[captions.Wording | None], length: int
) -> Iterator[tuple[int, str, Scene, captions.Wording, list[tuple[int, tuple[int, int]]]]]:
    """The labelled captions (a ``None`` scene or wording, a dropped caption, is skipped), each with its
    real tokens' indices and character spans, tokenised exactly as the pipelines do (padding to ``length``,
    truncation)."""
    enc = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_offsets_mapping=True)
    for b, (text, scene, wording) in enumerate(zip(texts, scenes, wordings, strict=True)):
        if scene is not None and wording is not None:
            tokens = [(t, (s, e)) for t, (s, e) in enumerate(enc["offset_mapping"][b]) if e > s]  # no specials, pads
            yield b, text, scene, wording, tokens


def token_labels(
    tokenizer: Any,
    texts: list[str],
    scenes: list[Scene | None],
    wordings: list[captions.Wording | None],
    length: int,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """``(B, length, 5)`` class indices (``ATTRIBUTES`` order) of the object each token belongs to, ``-100``
    elsewhere; tokenised exactly as the pipelines do (padding to ``length``, truncation). A ``None`` scene
    (a dropped caption) gets no labels.

    ``causal``: for an encoder whose tokens see only the tokens before them (CLIP's text tower), a token is
    labelled with an attribute only once the attribute's word has been read (at or before the token's end);
    the phrase's last token then carries all five. A bidirectional encoder (T5) labels every phrase token with
    all of them."""
    labels = torch.full((len(texts), length, len(ATTRIBUTES)), IGNORE, dtype=torch.long)
    for b, text, scene, wording, tokens in _captions(tokenizer, texts, scenes, wordings, length):
        spans = object_spans(scene, wording, text)
        values = [[ATTRIBUTES[a].index(getattr(obj, a)) for a in ATTRIBUTES] for obj in scene.objects]
        ends = [attribute_ends(obj, wording) for obj in scene.objects] if causal else None
        for t, (s, e) in tokens:
            for i, ((lo, hi), vals) in enumerate(zip(spans, values, strict=True)):
                if lo <= s < hi:
                    row = torch.tensor(vals)
                    if ends is not None:
                        row[torch.tensor([lo + end > e for end in ends[i]])] = IGNORE
                    labels[b, t] = row
                    break
    return labels


def _scene_words(scene: Scene, wording: captions.Wording, text: str) -> list[tuple[int, int]]:
    """Character span, in ``text``, of the word of each scene attribute (``SCENE_ATTRIBUTES`` order) and of
    the phrase it belongs to: the background's pattern and colour in "a checkered gray background", the
    style in its style phrase (", pixel art style")."""
    bg = f"a {scene.background.pattern} {scene.background.colour} background"
    style = wording.style_form.format(scene.style)
    at_bg, at_style = text.find(bg), text.rfind(style)
    if at_bg < 0 or at_style < 0:  # the grammar changed under this function
        raise ValueError(f"background {bg!r} or style {style!r} not found in caption {text!r}")
    pattern_end = at_bg + 2 + len(scene.background.pattern)
    colour_end = pattern_end + 1 + len(scene.background.colour)
    style_end = at_style + style.index(scene.style) + len(scene.style)
    return [(at_bg, pattern_end), (at_bg, colour_end), (at_style, style_end)]


def scene_labels(
    tokenizer: Any,
    texts: list[str],
    scenes: list[Scene | None],
    wordings: list[captions.Wording | None],
    length: int,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """``(B, length, 3)`` class indices (``SCENE_ATTRIBUTES`` order) of the scene-wide attributes, ``-100`` where
    a token is not labelled; tokenised as :func:`token_labels`.

    ``causal`` (CLIP's text tower): every token from the end of the attribute's word to the end of the caption
    is labelled (a token knows what it has read, and the later tokens, which a denoiser also attends to, keep
    it). Otherwise the tokens of the word's phrase, from its start to the word's end, are."""
    labels = torch.full((len(texts), length, len(SCENE_ATTRIBUTES)), IGNORE, dtype=torch.long)
    for b, text, scene, wording, tokens in _captions(tokenizer, texts, scenes, wordings, length):
        words = _scene_words(scene, wording, text)
        values = [SCENE_ATTRIBUTES[a].index(v) for a, v in zip(SCENE_ATTRIBUTES, _scene_values(scene), strict=True)]
        for t, (s, e) in tokens:
            for i, ((lo, hi), value) in enumerate(zip(words, values, strict=True)):
                if (e >= hi) if causal else (lo <= s < hi):
                    labels[b, t, i] = value
    return labels


def _scene_values(scene: Scene) -> tuple[str, str, str]:
    return scene.background.pattern, scene.background.colour, scene.style


def binding_loss(
    heads: BindingHeads, states: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of the heads over the labelled tokens, and the token accuracy per attribute."""
    labels = labels.to(states.device)
    logits = heads(states.float())
    losses, metrics = [], {}
    for i, (attr, logit) in enumerate(logits.items()):
        target = labels[..., i]
        mask = target != IGNORE
        if not bool(mask.any()):
            continue
        losses.append(F.cross_entropy(logit[mask], target[mask]))
        metrics[f"bind_{attr}"] = float((logit[mask].argmax(-1) == target[mask]).float().mean())
    if not losses:
        return states.sum() * 0.0, metrics
    return torch.stack(losses).mean(), metrics
