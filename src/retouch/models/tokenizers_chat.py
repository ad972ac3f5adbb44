"""Offline byte-level BPE tokenizers with chat templates, for the tiny Flux.2 and Z-Image test pipelines.

The real checkpoints encode prompts with decoder-only language models through a chat template: Qwen3
(Z-Image, Flux.2 klein; ``Qwen2TokenizerFast``, GPT-2 style byte-level BPE whose word-initial pieces carry the
``Ġ`` space marker) and Mistral Small 3 (Flux.2 dev; a Tekken byte-level BPE behind a processor whose template
takes ``[{"type": "text", "text": ...}]`` contents). Nothing here touches the network: the vocabulary is the 256
byte characters, every word of :data:`~retouch.models.tokenizers.DEFAULT_WORDS` with and without the leading
space marker as one token (closure merges, as in :func:`~retouch.models.tokenizers.build_clip_tokenizer`), and
the chat special tokens. The chat templates reproduce the token layout of the real ones around the prompt
(a fixed prefix, the prompt, a fixed suffix); the Flux.2 dev template puts a system message first, as the
pipeline does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast

from retouch.models.tokenizers import DEFAULT_WORDS, bytes_to_unicode

__all__ = ["MISTRAL_CHAT_TEMPLATE", "QWEN3_CHAT_TEMPLATE", "build_mistral_tokenizer", "build_qwen_tokenizer"]

logger = logging.getLogger(__name__)

_SPACE = bytes_to_unicode()[ord(" ")]  # "Ġ"

# Qwen3's template, reduced to what the pipelines use: user turns, the generation prompt, and the empty think
# block that ``enable_thinking=False`` adds (Flux.2 klein); Z-Image calls it with ``enable_thinking=True``.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

# Mistral Small 3.x's layout: <s>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]user[/INST]; contents are lists of
# {"type": "text", "text": ...} parts as the Pixtral processor takes them.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set text = message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _closure(symbols: list[str]) -> list[tuple[str, str]]:
    n = len(symbols)
    out = []
    for length in range(2, n + 1):
        for start in range(n - length + 1):
            end = start + length
            for split in range(start + 1, end):
                out.append(("".join(symbols[start:split]), "".join(symbols[split:end])))
    return out


def _byte_level_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """256 byte characters, then every word (and ``Ġword``) as one token through closure merges."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges: dict[tuple[str, str], None] = {}
    to_uni = bytes_to_unicode()
    for word in dict.fromkeys(w.strip() for w in words if w.strip()):
        for form in (word, " " + word):
            symbols = [to_uni[b] for b in form.encode("utf-8")]
            for merge in _closure(symbols):
                merges.setdefault(merge, None)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, list(merges)


def build_qwen_tokenizer(words: Iterable[str] | None = None, max_length: int = 512) -> Qwen2TokenizerFast:
    """A Qwen2/Qwen3-style tokenizer: byte-level BPE, ``<|endoftext|>`` as pad, ``<|im_start|>`` /
    ``<|im_end|>`` chat tokens, Qwen3's chat template (see :data:`QWEN3_CHAT_TEMPLATE`), right padding."""
    vocab, merges = _byte_level_vocab(DEFAULT_WORDS if words is None else words)
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        vocab.setdefault(special, len(vocab))
    tok = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=max_length,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.padding_side = "right"
    logger.debug("Qwen-style tokenizer: %d tokens", len(tok))
    return tok


def build_mistral_tokenizer(words: Iterable[str] | None = None, max_length: int = 512) -> PreTrainedTokenizerFast:
    """A Mistral-Small-3-style tokenizer: byte-level BPE with ``<s>`` (bos), ``</s>`` (eos), ``<pad>``,
    ``[INST]`` / ``[/INST]`` / ``[SYSTEM_PROMPT]`` / ``[/SYSTEM_PROMPT]`` and a chat template that accepts
    the processor's list-of-parts contents (see :data:`MISTRAL_CHAT_TEMPLATE`), right padding."""
    vocab, merges = _byte_level_vocab(DEFAULT_WORDS if words is None else words)
    specials = ["<s>", "</s>", "<pad>", "<unk>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    for special in specials:
        vocab.setdefault(special, len(vocab))
    base = Qwen2TokenizerFast(vocab=vocab, merges=merges, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=base.backend_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=specials[4:],
        model_max_length=max_length,
    )
    tok.chat_template = MISTRAL_CHAT_TEMPLATE
    tok.padding_side = "right"
    return tok
