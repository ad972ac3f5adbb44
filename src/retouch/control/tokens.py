"""Word <-> token alignment for Prompt-to-Prompt, for CLIP byte-level BPE and T5 SentencePiece tokenizers.

Everything here is a pure function of a prompt and a tokenizer that is passed in; nothing is cached and no
model is touched. The tokenizer's conventions are detected by probing it (:func:`detect_conventions`), never
hard-coded:

* **CLIP** (SD 1.x / SDXL / SD3 / Flux CLIP): lower-cases, adds ``<|startoftext|>`` (bos) and
  ``<|endoftext|>`` (eos), pads (usually with eos) to 77, and marks a word's *last* piece with the suffix
  ``</w>``; punctuation is split off a word as its own pre-token (``"circle,"`` -> ``circle</w> ,</w>``).
* **T5** (PixArt 120 tokens, SD3 / Flux up to 512): case-sensitive, no bos, appends ``</s>``, pads with
  ``<pad>`` (masked out by the attention mask), and marks a word's *first* piece with the prefix ``▁``.

Conventions used throughout:

* **Words** are ``prompt.split()`` (whitespace words, so ``"circle,"`` is one word whose tokens include
  the comma). A token belongs to the word its characters come from; bos / eos / padding belong to no word.
* **Layout.** A tokenized prompt of length ``L`` is ``[head | content | tail]``: ``head`` = the leading
  special tokens (bos; empty for T5), ``content`` = the prompt's own tokens, ``tail`` = eos and padding.
  Padding is on the right.
* **Word matching** (:func:`word_token_indices`, :func:`reweight_vector`, :func:`changed_words`) is
  case-insensitive and ignores punctuation at the edges of a word, so ``"circle"`` finds ``"Circle,"`` and
  ``"circle."``. When the query itself has no edge punctuation, the punctuation-only tokens at the edges of
  the matched word (the ``","`` of ``"circle,"``) are left out of the returned positions.
* **Replace mapper orientation.** ``M[s, t]`` is the weight of *source* token ``s`` in *target* token ``t``:
  rows index the source sequence, columns the target sequence, and ``A_tgt = A_src @ M`` re-targets the key
  (last) axis of cross-attention probabilities ``A_src [..., Q, L]``. Column ``t`` of ``A_tgt`` is
  ``sum_s A_src[..., s] * M[s, t]``.
* **Refine mapper.** ``mapper[t]`` is the source position whose attention column target position ``t``
  takes, or ``-1`` for a new target token (then ``alphas[t] = 0``); P2P blends
  ``A_tgt = A_src[..., mapper.clamp(min=0)] * alphas + A_tgt * (1 - alphas)``.
* **Tail (eos + padding) correspondence**, shared by both mappers: the ``k``-th tail position of the target
  takes the ``k``-th tail position of the source, so eos maps to eos and padding to padding; when the target
  is shorter than the source its last tail positions have no counterpart and take the last source position
  ``L - 1``. With equal token counts this is the identity.
"""

from __future__ import annotations

import bisect
import math
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "TokenizedPrompt",
    "TokenizerConventions",
    "changed_words",
    "detect_conventions",
    "refine_mapper",
    "reweight_vector",
    "replace_mapper",
    "tokenize",
    "word_token_indices",
]

# Needleman-Wunsch scores, as in Prompt-to-Prompt: with gap 0 and mismatch -1 a mismatch is never better than
# a deletion plus an insertion, so the optimum is a longest common subsequence of the two sequences.
_GAP = 0
_MATCH = 1
_MISMATCH = -1

# ``model_max_length`` of a tokenizer that has no limit is a huge sentinel (1e30); treat anything above this
# as "no limit".
_NO_LIMIT = 1_000_000

_PROBE = "a"  # a word that is a single known piece in every real vocabulary


# ------------------------------------------------------------------------------------------------ conventions


@dataclass(frozen=True)
class TokenizerConventions:
    """What a tokenizer does around the text, detected by probing it (see :func:`detect_conventions`).

    Attributes:
        adds_bos: whether encoding adds a leading special token (CLIP: yes, T5: no).
        adds_eos: whether encoding adds a trailing special token (both: yes).
        bos_id: id of the leading special token, ``None`` without one.
        eos_id: id of the trailing special token, ``None`` without one.
        pad_id: id used for padding (``pad_token_id``, else ``eos_id``); ``None`` if the tokenizer has neither.
        word_start_marker: text a word's first piece starts with (SentencePiece ``"▁"``), or ``None``.
        word_end_marker: text a word's last piece ends with (CLIP ``"</w>"``), or ``None``.
        lowercases: whether the tokenizer lower-cases its input (CLIP: yes, T5: no).
        model_max_length: ``tokenizer.model_max_length``, ``None`` when the tokenizer sets no limit.
    """

    adds_bos: bool
    adds_eos: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    word_start_marker: str | None
    word_end_marker: str | None
    lowercases: bool
    model_max_length: int | None


def _encode(tokenizer: Any, text: str, special: bool) -> tuple[list[int], list[int]]:
    """Encode ``text`` without padding or truncation; return ``(ids, special_tokens_mask)``."""
    enc = tokenizer(text, add_special_tokens=special, return_special_tokens_mask=True, truncation=False)
    ids = list(enc["input_ids"])
    mask = list(enc.get("special_tokens_mask") or [0] * len(ids))
    return ids, mask


def detect_conventions(tokenizer: Any) -> TokenizerConventions:
    """Probe ``tokenizer`` for its bos / eos / pad tokens, word markers and case handling.

    Encodes ``"a"`` (which special tokens surround it), ``"a a"`` (how a non-initial word's pieces are marked:
    ``"▁a"`` -> word-start marker ``"▁"``, ``"a</w>"`` -> word-end marker ``"</w>"``) and ``"A"`` (lower-casing).
    """
    ids, mask = _encode(tokenizer, _PROBE, special=True)
    n_head = 0
    while n_head < len(ids) and mask[n_head]:
        n_head += 1
    n_tail = 0
    while n_tail < len(ids) - n_head and mask[len(ids) - 1 - n_tail]:
        n_tail += 1
    bos_id = ids[0] if n_head else None
    eos_id = ids[-1] if n_tail else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    # Markers, from the pieces of the second word of "a a" (the first word may be marked differently, e.g.
    # GPT-2 style tokenizers mark only non-initial words).
    one, _ = _encode(tokenizer, _PROBE, special=False)
    two, _ = _encode(tokenizer, f"{_PROBE} {_PROBE}", special=False)
    second = "".join(tokenizer.convert_ids_to_tokens(two[len(one) :])) if two[: len(one)] == one else ""
    start_marker = end_marker = None
    at = second.find(_PROBE)
    if at >= 0:
        start_marker = second[:at] or None
        end_marker = second[at + len(_PROBE) :] or None

    upper, _ = _encode(tokenizer, _PROBE.upper(), special=False)
    lowercases = upper == one and tokenizer.unk_token_id not in one

    max_len = getattr(tokenizer, "model_max_length", None)
    max_len = int(max_len) if isinstance(max_len, int | float) and 0 < max_len < _NO_LIMIT else None
    return TokenizerConventions(
        adds_bos=bool(n_head),
        adds_eos=bool(n_tail),
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        word_start_marker=start_marker,
        word_end_marker=end_marker,
        lowercases=lowercases,
        model_max_length=max_len,
    )


# ------------------------------------------------------------------------------------------------ tokenize


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt tokenized and padded to ``length`` tokens, with every token position attributed to a word.

    Attributes:
        prompt: the prompt as given.
        words: ``prompt.split()`` after the tokenizer's own normalisation (lower-cased for CLIP).
        ids: token ids, padded on the right to ``length``.
        pieces: the token strings (``convert_ids_to_tokens``) of ``ids``.
        word_of_token: per position, the index into ``words`` of the word the token comes from; ``-1`` for
            bos, eos and padding.
        valid: per position, whether the token is not padding: bos, the prompt's tokens and eos (for T5 this
            is the attention mask the text encoder and the transformer use; CLIP-conditioned U-Nets attend to
            the padding as well, but it is still marked invalid here).
        num_real: number of the prompt's own tokens (excluding bos / eos / padding).
        num_head: number of leading special tokens (1 for CLIP's bos, 0 for T5); real tokens occupy positions
            ``num_head .. num_head + num_real - 1``.
    """

    prompt: str
    words: tuple[str, ...]
    ids: tuple[int, ...]
    pieces: tuple[str, ...]
    word_of_token: tuple[int, ...]
    valid: tuple[bool, ...]
    num_real: int
    num_head: int

    @property
    def length(self) -> int:
        """Padded length ``L``."""
        return len(self.ids)

    @property
    def num_valid(self) -> int:
        """Number of non-padding positions (bos + real tokens + eos)."""
        return sum(self.valid)

    @property
    def tail_start(self) -> int:
        """First position after the real tokens (eos, or the first padding position)."""
        return self.num_head + self.num_real

    def word_tokens(self, index: int) -> list[int]:
        """Token positions of word ``index`` (an index into :attr:`words`), in order."""
        return [i for i, w in enumerate(self.word_of_token) if w == index]

    def ids_tensor(self) -> Tensor:
        """``ids`` as an int64 tensor ``[L]``."""
        return torch.tensor(self.ids, dtype=torch.long)

    def valid_tensor(self) -> Tensor:
        """``valid`` as a bool tensor ``[L]``."""
        return torch.tensor(self.valid, dtype=torch.bool)

    def word_of_token_tensor(self) -> Tensor:
        """``word_of_token`` as an int64 tensor ``[L]``."""
        return torch.tensor(self.word_of_token, dtype=torch.long)


def _check_prompt(prompt: object, what: str = "prompt") -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"{what} must be a string, got {type(prompt).__name__}")
    if not prompt.split():
        raise ValueError(f"{what} is empty: {prompt!r}")
    return prompt


def _resolve_length(conv: TokenizerConventions, max_length: int | None) -> int:
    if max_length is None:
        if conv.model_max_length is None:
            raise ValueError("the tokenizer sets no model_max_length; pass max_length")
        return conv.model_max_length
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    return max_length


def _word_spans(prompt: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of ``prompt.split()``'s words (same whitespace test as ``str.split``)."""
    spans = []
    start = None
    for i, ch in enumerate(prompt):
        if ch.isspace():
            if start is not None:
                spans.append((start, i))
                start = None
        elif start is None:
            start = i
    if start is not None:
        spans.append((start, len(prompt)))
    return spans


def _words_by_offsets(
    tokenizer: Any, prompt: str, conv: TokenizerConventions
) -> tuple[list[int], list[int], list[int]] | None:
    """``(ids, special_mask, word_of_token)`` from a fast tokenizer's character offsets; ``None`` if unsupported.

    A token belongs to the word holding its first non-space character. A token covering no character (or only
    whitespace, e.g. a lone SentencePiece ``"▁"``) joins the next word when the tokenizer marks word starts and
    the previous word when it marks word ends.
    """
    if not getattr(tokenizer, "is_fast", False):
        return None
    try:
        enc = tokenizer(
            prompt,
            add_special_tokens=True,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            truncation=False,
        )
    except (NotImplementedError, ValueError, TypeError):
        return None
    ids = list(enc["input_ids"])
    special = list(enc["special_tokens_mask"])
    offsets = list(enc["offset_mapping"])
    spans = _word_spans(prompt)
    starts = [s for s, _ in spans]

    words: list[int | None] = []
    for is_special, (s, e) in zip(special, offsets, strict=True):
        if is_special:
            words.append(-1)
            continue
        first = next((c for c in range(s, min(e, len(prompt))) if not prompt[c].isspace()), None)
        words.append(None if first is None else bisect.bisect_right(starts, first) - 1)

    backward = conv.word_end_marker is not None and conv.word_start_marker is None
    resolved = [w for w in words if w is not None and w >= 0]
    if not resolved and any(w is None for w in words):
        return None
    owner: list[int] = []
    for i, w in enumerate(words):
        if w is None:
            after = next((x for x in words[i + 1 :] if x is not None and x >= 0), None)
            before = next((x for x in reversed(words[:i]) if x is not None and x >= 0), None)
            w = (before if before is not None else after) if backward else (after if after is not None else before)
        owner.append(-1 if w is None else w)
    return ids, special, owner


def _words_by_prefixes(tokenizer: Any, prompt: str) -> tuple[list[int], list[int], list[int]]:
    """``(ids, special_mask, word_of_token)`` for any word-local tokenizer (e.g. slow ones without offsets).

    Word ``k`` owns the tokens that encoding ``" ".join(words[: k + 1])`` adds to the encoding of
    ``" ".join(words[:k])``. Both CLIP BPE and SentencePiece never let a token cross whitespace, so each
    prefix encoding is a prefix of the full encoding; this is checked.
    """
    ids, special = _encode(tokenizer, prompt, special=True)
    content = [i for i, m in zip(ids, special, strict=True) if not m]
    words = prompt.split()
    owner: list[int] = []
    for k in range(len(words)):
        prefix, _ = _encode(tokenizer, " ".join(words[: k + 1]), special=False)
        if len(prefix) < len(owner) or prefix != content[: len(prefix)]:
            raise ValueError(
                f"cannot attribute tokens to words: the tokenizer does not encode word prefixes of {prompt!r} "
                "as prefixes of the whole prompt"
            )
        owner += [k] * (len(prefix) - len(owner))
    if len(owner) != len(content):
        raise ValueError(f"cannot attribute tokens to words: {len(content) - len(owner)} tokens of {prompt!r} unused")
    it = iter(owner)
    return ids, special, [-1 if m else next(it) for m in special]


def tokenize(tokenizer: Any, prompt: str, max_length: int | None = None) -> TokenizedPrompt:
    """Tokenize ``prompt`` as the text encoder sees it and attribute each token position to a word.

    Args:
        tokenizer: a ``transformers`` tokenizer (fast or slow; CLIP BPE, T5 SentencePiece, ...).
        prompt: the prompt; words are ``prompt.split()``.
        max_length: padded length ``L``; defaults to ``tokenizer.model_max_length`` (77 for CLIP, 120 for the
            PixArt T5; Flux / SD3 pipelines pass their own T5 length).

    Raises:
        ValueError: if the prompt is empty, needs more than ``max_length`` tokens (including bos / eos), or the
            tokenizer pads on the left or has no padding token.
    """
    _check_prompt(prompt)
    conv = detect_conventions(tokenizer)
    length = _resolve_length(conv, max_length)
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError("only right-padding tokenizers are supported (tokenizer.padding_side == 'left')")
    if conv.pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")

    found = _words_by_offsets(tokenizer, prompt, conv)
    ids, special, owner = found if found is not None else _words_by_prefixes(tokenizer, prompt)
    if len(ids) > length:
        raise ValueError(
            f"prompt needs {len(ids)} tokens (with special tokens), more than max_length={length}: {prompt!r}"
        )
    num_head = 0
    while num_head < len(special) and special[num_head]:
        num_head += 1
    num_real = sum(1 for m in special if not m)
    if any(special[num_head : num_head + num_real]):
        raise ValueError(f"special tokens inside the encoded prompt {prompt!r}: {ids}")

    n_pad = length - len(ids)
    ids = ids + [conv.pad_id] * n_pad
    words = prompt.split()
    if conv.lowercases:
        words = [w.lower() for w in words]
    return TokenizedPrompt(
        prompt=prompt,
        words=tuple(words),
        ids=tuple(ids),
        pieces=tuple(tokenizer.convert_ids_to_tokens(ids)),
        word_of_token=tuple(owner + [-1] * n_pad),
        valid=tuple([True] * (length - n_pad) + [False] * n_pad),
        num_real=num_real,
        num_head=num_head,
    )


# ------------------------------------------------------------------------------------------- word matching


def _is_punct(ch: str) -> bool:
    return unicodedata.category(ch).startswith("P")


def _word_key(word: str) -> str:
    """Matching key: case-folded, punctuation stripped from both ends (kept if the word is only punctuation)."""
    folded = word.casefold()
    i, j = 0, len(folded)
    while i < j and _is_punct(folded[i]):
        i += 1
    while j > i and _is_punct(folded[j - 1]):
        j -= 1
    return folded[i:j] or folded


def _piece_is_punct(tokenizer: Any, conv: TokenizerConventions, piece: str) -> bool:
    """Whether a token piece decodes to punctuation only (``",</w>"``, ``"."``); markers are stripped first."""
    if conv.word_start_marker and piece.startswith(conv.word_start_marker):
        piece = piece[len(conv.word_start_marker) :]
    if conv.word_end_marker and piece.endswith(conv.word_end_marker):
        piece = piece[: -len(conv.word_end_marker)]
    if not piece:
        return False
    text = tokenizer.convert_tokens_to_string([piece]).strip()
    return bool(text) and all(_is_punct(c) for c in text)


def _matched_positions(
    tokenizer: Any, conv: TokenizerConventions, tp: TokenizedPrompt, word: int, query_word: str
) -> list[int]:
    """Positions of prompt word ``word`` matched by ``query_word``, without the edge punctuation tokens the
    query does not ask for (kept all if that would leave nothing)."""
    positions = tp.word_tokens(word)
    lo, hi = 0, len(positions)
    if not _is_punct(query_word[0]):
        while lo < hi and _piece_is_punct(tokenizer, conv, tp.pieces[positions[lo]]):
            lo += 1
    if not _is_punct(query_word[-1]):
        while hi > lo and _piece_is_punct(tokenizer, conv, tp.pieces[positions[hi - 1]]):
            hi -= 1
    return positions[lo:hi] if hi > lo else positions


def _positions_in(tokenizer: Any, tp: TokenizedPrompt, word_or_index: str | int) -> list[int]:
    """:func:`word_token_indices` on an already tokenized prompt."""
    if isinstance(word_or_index, bool) or not isinstance(word_or_index, int | str):
        raise ValueError(f"word must be a string or a word index, got {word_or_index!r}")
    n_words = len(tp.words)
    if isinstance(word_or_index, int):
        if not -n_words <= word_or_index < n_words:
            raise ValueError(f"word index {word_or_index} out of range: {tp.prompt!r} has {n_words} words")
        index = word_or_index % n_words
        positions = tp.word_tokens(index)
        if not positions:
            raise ValueError(f"word {index} ({tp.words[index]!r}) of {tp.prompt!r} has no tokens")
        return positions

    query = word_or_index.split()
    if not query:
        raise ValueError(f"empty word {word_or_index!r} for prompt {tp.prompt!r}")
    conv = detect_conventions(tokenizer)
    keys = [_word_key(w) for w in tp.words]
    wanted = [_word_key(w) for w in query]
    found: set[int] = set()
    matched = False
    for start in range(n_words - len(query) + 1):
        if keys[start : start + len(query)] == wanted:
            matched = True
            for offset, q in enumerate(query):
                found.update(_matched_positions(tokenizer, conv, tp, start + offset, q))
    if not matched:
        raise ValueError(f"word {word_or_index!r} not found in prompt {tp.prompt!r} (words: {list(tp.words)})")
    if not found:
        raise ValueError(f"word {word_or_index!r} of prompt {tp.prompt!r} has no tokens")
    return sorted(found)


def word_token_indices(
    tokenizer: Any, prompt: str, word_or_index: str | int, max_length: int | None = None
) -> list[int]:
    """Token positions (in the padded sequence, so offset by bos for CLIP) of a word of ``prompt``.

    Args:
        tokenizer: the tokenizer feeding the attention layers.
        prompt: the prompt.
        word_or_index: a word index into ``prompt.split()`` (negative counts from the end; returns all of the
            word's tokens), or a string of one or more words. A string matches every occurrence of its words
            as consecutive prompt words, case-insensitively and ignoring edge punctuation (``"circle"``
            matches ``"Circle,"``); edge punctuation tokens are returned only if the query has them too.
        max_length: padded length (see :func:`tokenize`).

    Returns:
        Sorted positions.

    Raises:
        ValueError: if the word is not in the prompt (the message names it and the prompt), the index is out
            of range, or the prompt is invalid (see :func:`tokenize`).
    """
    return _positions_in(tokenizer, tokenize(tokenizer, prompt, max_length), word_or_index)


# ------------------------------------------------------------------------------------------------ alignment


def _align(source: Sequence[object], target: Sequence[object]) -> list[tuple[int, int]]:
    """Needleman-Wunsch global alignment (gap 0, match 1, mismatch -1); returns the matched ``(i_src, i_tgt)``.

    Tie-breaking is deterministic: the traceback from the end prefers a match, then skipping a source
    element (deletion), then skipping a target element (insertion). Among equally good alignments a target
    element is therefore matched to the latest possible source element before it is given up (``"a cat"`` ->
    ``"a photo of a cat"`` aligns ``"a cat"`` with the final ``"a cat"``). Only equal elements are matched.
    """
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        score[i][0] = i * _GAP
    for j in range(1, m + 1):
        score[0][j] = j * _GAP
    for i in range(1, n + 1):
        row, prev, a = score[i], score[i - 1], source[i - 1]
        for j in range(1, m + 1):
            diag = prev[j - 1] + (_MATCH if a == target[j - 1] else _MISMATCH)
            row[j] = max(diag, prev[j] + _GAP, row[j - 1] + _GAP)

    pairs = []
    i, j = n, m
    while i > 0 and j > 0:
        same = source[i - 1] == target[j - 1]
        if score[i][j] == score[i - 1][j - 1] + (_MATCH if same else _MISMATCH):
            if same:
                pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j] + _GAP:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


def _tail_source(position: int, src: TokenizedPrompt, tgt: TokenizedPrompt) -> int:
    """Source position for target tail ``position``: the same rank in the source tail, clamped to ``L - 1``."""
    return min(position - tgt.tail_start + src.tail_start, src.length - 1)


def _pair(tokenizer: Any, source: str, target: str, max_length: int | None) -> tuple[TokenizedPrompt, TokenizedPrompt]:
    _check_prompt(source, "source prompt")
    _check_prompt(target, "target prompt")
    return tokenize(tokenizer, source, max_length), tokenize(tokenizer, target, max_length)


def replace_mapper(tokenizer: Any, source: str, target: str, max_length: int | None = None) -> Tensor:
    """Token mapper ``M [L, L]`` for P2P word swap between prompts with the same number of words.

    ``M[s, t]`` is the weight of source position ``s`` in target position ``t`` (rows = source, columns =
    target), so ``A_tgt = A_src @ M`` re-targets cross-attention probabilities ``A_src [..., Q, L]``. Word
    ``k`` of the source maps to word ``k`` of the target: if both have the same number of tokens, piece ``i``
    maps to piece ``i`` (weight 1; an unchanged word maps identically); otherwise every source piece maps to
    every target piece with weight ``1 / max(m, n)`` (``m`` source, ``n`` target pieces): a one-token word
    that becomes ``n`` pieces splits its attention ``1/n`` to each, and ``m`` pieces that become one token are
    averaged. Rows of words therefore sum to 1 whenever the target word has at least as many pieces. bos maps
    to bos, and eos / padding map by the tail correspondence described in the module docstring (the identity
    when both prompts have the same number of tokens).

    Raises:
        ValueError: if the prompts have different numbers of words (use :func:`refine_mapper`), or on an
            invalid prompt.
    """
    src, tgt = _pair(tokenizer, source, target, max_length)
    if len(src.words) != len(tgt.words):
        raise ValueError(
            f"word swap needs the same number of words, got {len(src.words)} in {source!r} and "
            f"{len(tgt.words)} in {target!r}; use refine_mapper for added or removed words"
        )
    length = src.length
    mapper = torch.zeros(length, length)
    for position in range(src.num_head):
        mapper[position, position] = 1.0
    for position in range(tgt.tail_start, length):
        mapper[_tail_source(position, src, tgt), position] += 1.0
    for k in range(len(src.words)):
        s_pos, t_pos = src.word_tokens(k), tgt.word_tokens(k)
        if not s_pos or not t_pos:
            continue
        if len(s_pos) == len(t_pos):
            mapper[s_pos, t_pos] = 1.0
        else:
            mapper[torch.tensor(s_pos)[:, None], torch.tensor(t_pos)[None, :]] = 1.0 / max(len(s_pos), len(t_pos))
    return mapper


def refine_mapper(tokenizer: Any, source: str, target: str, max_length: int | None = None) -> tuple[Tensor, Tensor]:
    """Alignment of the target tokens to the source tokens for P2P refinement (added / removed words).

    The prompts' own tokens are globally aligned by token id (Needleman-Wunsch: gap 0, match 1, mismatch -1,
    deterministic tie-breaking, see :func:`_align`); bos maps to bos, and eos / padding by the tail
    correspondence of the module docstring (the identity when both prompts have the same number of tokens).

    Returns:
        ``(mapper, alphas)``: ``mapper [L]`` int64, the source position for each target position, ``-1`` for a
        target token with no aligned source token (a new word); ``alphas [L]`` float32, 1 where ``mapper`` is a
        source position and 0 where it is ``-1``. Apply as
        ``A_tgt = A_src[..., mapper.clamp(min=0)] * alphas + A_tgt * (1 - alphas)``.

    Raises:
        ValueError: on an invalid prompt (see :func:`tokenize`).
    """
    src, tgt = _pair(tokenizer, source, target, max_length)
    length = src.length
    mapper = torch.full((length,), -1, dtype=torch.long)
    for position in range(tgt.num_head):
        mapper[position] = position
    for position in range(tgt.tail_start, length):
        mapper[position] = _tail_source(position, src, tgt)
    s0, t0 = src.num_head, tgt.num_head
    pairs = _align(src.ids[s0 : src.tail_start], tgt.ids[t0 : tgt.tail_start])
    for i_src, i_tgt in pairs:
        mapper[t0 + i_tgt] = s0 + i_src
    return mapper, (mapper >= 0).float()


def reweight_vector(
    tokenizer: Any, prompt: str, words_to_values: Mapping[str, float], max_length: int | None = None
) -> Tensor:
    """P2P reweighting vector ``[L]``: each key's token positions (as :func:`word_token_indices` finds them)
    get its value, every other position 1. Later keys win where keys overlap.

    Raises:
        ValueError: if a key is not in the prompt, a value is not a finite number, or the prompt is invalid.
    """
    tp = tokenize(tokenizer, prompt, max_length)
    weights = torch.ones(tp.length)
    for word, value in words_to_values.items():
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"weight for {word!r} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"weight for {word!r} must be finite, got {value!r}")
        weights[_positions_in(tokenizer, tp, word)] = number
    return weights


def changed_words(source: str, target: str) -> tuple[list[str], list[str]]:
    """Words only in ``source`` and words only in ``target``, in prompt order, by a global alignment of the
    whitespace words (same scores as :func:`refine_mapper`; words compared case-insensitively and ignoring
    edge punctuation). A swapped word appears in both lists. Returns the words as written in the prompts.

    Raises:
        ValueError: if either prompt is empty.
    """
    src_words = _check_prompt(source, "source prompt").split()
    tgt_words = _check_prompt(target, "target prompt").split()
    pairs = _align([_word_key(w) for w in src_words], [_word_key(w) for w in tgt_words])
    kept_src = {i for i, _ in pairs}
    kept_tgt = {j for _, j in pairs}
    removed = [w for i, w in enumerate(src_words) if i not in kept_src]
    added = [w for j, w in enumerate(tgt_words) if j not in kept_tgt]
    return removed, added
