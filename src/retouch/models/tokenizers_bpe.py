"""Offline byte-pair tokenizers for the tiny Qwen-Image and Sana test models: a Qwen2 byte-level BPE and a
Gemma SentencePiece-style BPE.

Like :mod:`retouch.models.tokenizers`, nothing here touches the network; both builders return the real
``transformers`` classes (``Qwen2Tokenizer``, ``GemmaTokenizer``, backed by ``tokenizers``) with the
checkpoints' pre-tokenisation, special tokens and padding conventions but a small constructed vocabulary in
which every known word is one token:

* **Qwen2** (:func:`build_qwen2_tokenizer`): GPT-2 style byte-level BPE behind Qwen2's pre-tokenisation
  regex, so a word after a space is the single token ``Ġword`` and a word at the start of a line is
  ``word``. ``<|endoftext|>`` is unk, eos and pad; ``<|im_start|>`` / ``<|im_end|>`` are special tokens; no bos.
  The words of QwenImagePipeline's prompt template are in the vocabulary, so its system prefix is the same
  34 tokens as with the real tokenizer (the pipeline drops exactly 34 leading hidden states).
* **Gemma** (:func:`build_gemma_tokenizer`): spaces normalised to ``▁``, BPE with byte fallback; ``<bos>`` is
  prepended, ``<pad>`` pads (the Sana pipeline pads on the right). A word after a space is ``▁word``.

Each word's merges are the closure over its spans (any two adjacent pieces of the word can merge), so every
known word comes out as one token whatever merges fire first; no merge crosses a word boundary.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Sequence

from transformers import GemmaTokenizer, Qwen2Tokenizer

from retouch.models.tokenizers import DEFAULT_WORDS, _closure_merges, _unique, bytes_to_unicode

__all__ = ["QWEN_TEMPLATE_WORDS", "build_gemma_tokenizer", "build_qwen2_tokenizer"]

logger = logging.getLogger(__name__)

# the words of QwenImagePipeline's prompt template (system prefix and assistant suffix)
QWEN_TEMPLATE_WORDS = [
    "system",
    "user",
    "assistant",
    "Describe",
    "the",
    "image",
    "by",
    "detailing",
    "color",
    "shape",
    "size",
    "texture",
    "quantity",
    "text",
    "spatial",
    "relationships",
    "of",
    "objects",
    "and",
    "background",
]
# the words of SanaPipeline's default complex human instruction, so that it tokenizes word by word
SANA_INSTRUCTION_WORDS = [
    "Given",
    "user",
    "prompt",
    "generate",
    "Enhanced",
    "that",
    "provides",
    "detailed",
    "visual",
    "descriptions",
    "suitable",
    "for",
    "image",
    "generation",
    "Evaluate",
    "level",
    "detail",
    "If",
    "is",
    "simple",
    "focus",
    "on",
    "adding",
    "specifics",
    "about",
    "colors",
    "shapes",
    "sizes",
    "textures",
    "spatial",
    "relationships",
    "to",
    "create",
    "vivid",
    "concrete",
    "scenes",
    "already",
    "refine",
    "enhance",
    "existing",
    "details",
    "slightly",
    "without",
    "overcomplicating",
    "Here",
    "are",
    "examples",
    "how",
    "transform",
    "or",
    "prompts",
    "User",
    "Prompt",
    "cat",
    "sleeping",
    "small",
    "fluffy",
    "curled",
    "up",
    "in",
    "round",
    "sleeping",
    "peacefully",
    "warm",
    "sunny",
    "windowsill",
    "surrounded",
    "by",
    "pots",
    "blooming",
    "flowers",
    "busy",
    "city",
    "street",
    "bustling",
    "scene",
    "dusk",
    "featuring",
    "glowing",
    "lamps",
    "diverse",
    "crowd",
    "people",
    "colorful",
    "clothing",
    "double",
    "decker",
    "bus",
    "passing",
    "towering",
    "glass",
    "skyscrapers",
    "Please",
    "only",
    "the",
    "description",
    "for",
    "below",
    "and",
    "avoid",
    "including",
    "any",
    "additional",
    "commentary",
    "evaluations",
]

QWEN_EOT = "<|endoftext|>"
QWEN_IM_START = "<|im_start|>"
QWEN_IM_END = "<|im_end|>"
_GEMMA_SPACE = "\u2581"


def _variants(words: Iterable[str]) -> list[str]:
    return _unique(v for w in words for v in (w.lower(), w.capitalize(), w))


def _bpe_vocab(alphabet: Sequence[str], words: Sequence[Sequence[str]], specials: Sequence[str]):
    vocab: dict[str, int] = {}
    for s in specials:
        vocab.setdefault(s, len(vocab))
    for c in alphabet:
        vocab.setdefault(c, len(vocab))
    merges: dict[tuple[str, str], None] = {}
    for symbols in words:
        for m in _closure_merges(list(symbols)):
            merges.setdefault(m, None)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return vocab, list(merges)


def build_qwen2_tokenizer(words: Iterable[str] | None = None, max_length: int = 1024) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer in which every word of ``words`` (default :data:`DEFAULT_WORDS`, plus
    the prompt template's words) is one token, with or without a leading space, lower-case or Capitalised."""
    byte = bytes_to_unicode()
    alphabet = [byte[b] for b in range(256)]
    space = byte[ord(" ")]
    word_list = _variants([*(DEFAULT_WORDS if words is None else words), *QWEN_TEMPLATE_WORDS])
    symbols = []
    for w in word_list:
        b = "".join(byte[x] for x in w.encode("utf-8"))
        symbols += [list(b), [space, *b]] if len(b) > 1 else [[space, *b]]
    vocab, merges = _bpe_vocab(alphabet, symbols, [QWEN_EOT])
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=QWEN_EOT,
        eos_token=QWEN_EOT,
        pad_token=QWEN_EOT,
        additional_special_tokens=[QWEN_IM_START, QWEN_IM_END],
        model_max_length=max_length,
    )
    logger.debug("Qwen2 tokenizer: %d words, %d merges, vocab %d", len(word_list), len(merges), len(tok))
    return tok


def build_gemma_tokenizer(words: Iterable[str] | None = None, max_length: int = 300) -> GemmaTokenizer:
    """A Gemma BPE tokenizer in which every word of ``words`` (default :data:`DEFAULT_WORDS`, plus the words of
    Sana's default instruction) is one token, with (``▁word``) or without a leading space; right padding."""
    word_list = _variants([*(DEFAULT_WORDS if words is None else words), *SANA_INSTRUCTION_WORDS])
    chars = [c for c in string.printable if not c.isspace()] + [_GEMMA_SPACE, "\n"]
    chars += sorted({c for w in word_list for c in w} - set(chars))
    symbols = []
    for w in word_list:
        symbols += [list(w), [_GEMMA_SPACE, *w]] if len(w) > 1 else [[_GEMMA_SPACE, *w]]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab, merges = _bpe_vocab(chars, symbols, specials)
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=max_length)
    tok.padding_side = "right"
    logger.debug("Gemma tokenizer: %d words, %d merges, vocab %d", len(word_list), len(merges), len(tok))
    return tok
