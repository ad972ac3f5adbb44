"""Word <-> token alignment for Prompt-to-Prompt with the offline CLIP BPE and T5 SentencePiece tokenizers."""

from __future__ import annotations

import pytest
import torch

from retouch.control import tokens
from retouch.models.tokenizers import build_clip_tokenizer, build_t5_tokenizer

VOCABULARY = "a an the of on and with red blue green big small circle square triangle cat dog hat photo painting"
WORDS = VOCABULARY.split()  # the known words: one token each
NEW = "zorbleflax"  # not in the vocabulary: several pieces with both tokenizers


@pytest.fixture(scope="module")
def clip():
    return build_clip_tokenizer(WORDS)


@pytest.fixture(scope="module")
def t5():
    return build_t5_tokenizer(WORDS)


@pytest.fixture(params=["clip", "t5"])
def tok(request, clip, t5):
    """``(tokenizer, head)``: ``head`` = number of leading special tokens (CLIP's bos), so words start there."""
    return (clip, 1) if request.param == "clip" else (t5, 0)


def _length(tokenizer) -> int:
    return tokenizer.model_max_length


# ------------------------------------------------------------------------------------------------ tokenize


def test_conventions_are_detected(clip, t5):
    c = tokens.detect_conventions(clip)
    assert (c.adds_bos, c.adds_eos, c.bos_id, c.eos_id, c.pad_id) == (True, True, 0, 1, 1)
    assert (c.word_start_marker, c.word_end_marker, c.lowercases, c.model_max_length) == (None, "</w>", True, 77)
    t = tokens.detect_conventions(t5)
    assert (t.adds_bos, t.adds_eos, t.bos_id, t.eos_id, t.pad_id) == (False, True, None, 1, 0)
    assert (t.word_start_marker, t.word_end_marker, t.lowercases, t.model_max_length) == ("▁", None, False, 120)


def test_single_piece_words_layout(tok):
    tokenizer, head = tok
    tp = tokens.tokenize(tokenizer, "a red circle")
    length = _length(tokenizer)
    assert tp.length == length == len(tp.pieces) == len(tp.word_of_token) == len(tp.valid)
    assert tp.num_real == 3 and tp.num_head == head
    assert list(tp.word_of_token[: head + 4]) == [-1] * head + [0, 1, 2, -1]
    assert set(tp.word_of_token[head + 3 :]) == {-1}
    assert tp.num_valid == head + 4  # bos? + 3 words + eos
    assert tp.valid[: head + 4] == (True,) * (head + 4) and not any(tp.valid[head + 4 :])
    conv = tokens.detect_conventions(tokenizer)
    assert tp.ids[head + 3] == conv.eos_id and set(tp.ids[head + 4 :]) == {conv.pad_id}
    if head:
        assert tp.ids[0] == conv.bos_id
    # Same ids and mask as the pipelines' own padded call.
    enc = tokenizer("a red circle", padding="max_length", max_length=length)
    assert list(tp.ids) == enc["input_ids"]
    assert [int(v) for v in tp.valid] == enc["attention_mask"]
    assert tp.ids_tensor().dtype == torch.long and tp.valid_tensor().sum() == tp.num_valid
    for w, expected in (("a", [head]), ("red", [head + 1]), ("circle", [head + 2])):
        assert tokens.word_token_indices(tokenizer, "a red circle", w) == expected
    assert tokens.word_token_indices(tokenizer, "a red circle", 1) == [head + 1]
    assert tokens.word_token_indices(tokenizer, "a red circle", -1) == [head + 2]


def test_multi_piece_word(tok):
    tokenizer, head = tok
    prompt = f"a {NEW} circle"
    tp = tokens.tokenize(tokenizer, prompt)
    pos = tokens.word_token_indices(tokenizer, prompt, NEW)
    assert len(pos) > 1
    assert pos == list(range(head + 1, head + 1 + len(pos)))  # contiguous, right after "a"
    assert tokens.word_token_indices(tokenizer, prompt, 1) == pos
    assert tokens.word_token_indices(tokenizer, prompt, "circle") == [pos[-1] + 1]
    assert tp.num_real == len(pos) + 2
    assert all(tp.word_of_token[p] == 1 for p in pos)
    # Multi-word queries return the positions of all consecutive words.
    assert tokens.word_token_indices(tokenizer, prompt, f"{NEW} circle") == [*pos, pos[-1] + 1]


def test_all_occurrences_and_custom_length(tok):
    tokenizer, head = tok
    prompt = "a red cat and a red dog"
    assert tokens.word_token_indices(tokenizer, prompt, "red") == [head + 1, head + 5]
    assert tokens.word_token_indices(tokenizer, prompt, "a red") == [head, head + 1, head + 4, head + 5]
    tp = tokens.tokenize(tokenizer, prompt, max_length=12)
    assert tp.length == 12 and tp.num_valid == head + 8
    assert tokens.word_token_indices(tokenizer, prompt, "dog", max_length=12) == [head + 6]


def test_t5_punctuation_and_capitals(t5):
    prompt = "A red Circle, and a blue square."
    tp = tokens.tokenize(t5, prompt)
    assert tp.pieces[:9] == ("▁A", "▁red", "▁Circle", ",", "▁and", "▁a", "▁blue", "▁square", ".")
    assert tp.pieces[9] == "</s>" and tp.words == tuple(prompt.split())  # T5 keeps case
    assert tp.word_of_token[:10] == (0, 1, 2, 2, 3, 4, 5, 6, 6, -1)
    # Case-insensitive, edge punctuation ignored; the comma / full stop token only when asked for.
    assert tokens.word_token_indices(t5, prompt, "circle") == [2]
    assert tokens.word_token_indices(t5, prompt, "Circle,") == [2, 3]
    assert tokens.word_token_indices(t5, prompt, 2) == [2, 3]
    assert tokens.word_token_indices(t5, prompt, "square") == [7]
    assert tokens.word_token_indices(t5, prompt, "square.") == [7, 8]
    assert tokens.word_token_indices(t5, prompt, "a") == [0, 5]  # "A" and "a"
    assert tokens.word_token_indices(t5, prompt, "red circle") == [1, 2]
    # A capitalised unknown word with a full stop: "▁" + characters, then ".".
    prompt = f"{NEW.capitalize()}."
    tp = tokens.tokenize(t5, prompt)
    pos = tokens.word_token_indices(t5, prompt, NEW)
    assert pos == list(range(tp.num_real - 1)) and tp.pieces[tp.num_real - 1] == "."


def test_clip_punctuation_and_capitals(clip):
    prompt = "A red Circle, and a blue square."
    tp = tokens.tokenize(clip, prompt)
    assert tp.words == tuple(prompt.lower().split())  # CLIP lower-cases
    assert tp.pieces[1:10] == (
        "a</w>",
        "red</w>",
        "circle</w>",
        ",</w>",
        "and</w>",
        "a</w>",
        "blue</w>",
        "square</w>",
        ".</w>",
    )
    assert tokens.word_token_indices(clip, prompt, "Circle") == [3]
    assert tokens.word_token_indices(clip, prompt, "circle,") == [3, 4]
    assert tokens.word_token_indices(clip, prompt, "square") == [8]


@pytest.mark.parametrize(
    "prompt",
    ["a red circle", "A red Circle, zorbleflax.", "a cat's hat", "  two  spaces ", "hello-world 12 ünïcode 😀"],
)
def test_offsets_and_prefix_attribution_agree(tok, prompt):
    """The slow-tokenizer fallback (prefix encodings) attributes tokens exactly like the fast offsets path."""
    tokenizer, _ = tok
    conv = tokens.detect_conventions(tokenizer)
    fast = tokens._words_by_offsets(tokenizer, prompt, conv)
    assert fast is not None
    assert fast == tokens._words_by_prefixes(tokenizer, prompt)
    assert all(w >= 0 for w, m in zip(fast[2], fast[1], strict=True) if not m)


def test_slow_path_tokenize(tok, monkeypatch):
    tokenizer, head = tok
    prompt = f"A {NEW} circle."
    expected = tokens.tokenize(tokenizer, prompt)
    monkeypatch.setattr(tokens, "_words_by_offsets", lambda *args: None)
    assert tokens.tokenize(tokenizer, prompt) == expected


# ------------------------------------------------------------------------------------------ replace mapper


def test_replace_mapper_single_pieces_is_identity(tok):
    tokenizer, _ = tok
    m = tokens.replace_mapper(tokenizer, "a red circle", "a blue circle")
    assert m.shape == (_length(tokenizer),) * 2
    assert torch.equal(m, torch.eye(_length(tokenizer)))
    same = f"A {NEW}, on the hat."
    assert torch.equal(tokens.replace_mapper(tokenizer, same, same), torch.eye(_length(tokenizer)))


def test_replace_mapper_moves_attention_to_multi_piece_word(tok):
    tokenizer, head = tok
    source, target = "a red circle", f"a {NEW} circle"
    m = tokens.replace_mapper(tokenizer, source, target)
    length = _length(tokenizer)
    new = tokens.word_token_indices(tokenizer, target, NEW)
    n = len(new)
    red, circle_s, eos_s = head + 1, head + 2, head + 3
    circle_t, eos_t = new[-1] + 1, new[-1] + 2
    # Rows = source, columns = target; the valid source rows keep their mass.
    assert m.shape == (length, length)
    assert torch.allclose(m.sum(1)[: eos_s + 1], torch.ones(eos_s + 1))
    assert torch.allclose(m[red, new], torch.full((n,), 1 / n))
    # A fake attention row over the source tokens lands on the target's columns.
    a_src = torch.zeros(length)
    a_src[red], a_src[circle_s], a_src[eos_s] = 0.6, 0.3, 0.1
    if head:
        a_src[0], a_src[red] = 0.2, 0.4
    a_tgt = a_src @ m
    expected = torch.zeros(length)
    expected[new] = a_src[red] / n
    expected[circle_t], expected[eos_t] = 0.3, 0.1
    if head:
        expected[0] = 0.2
    assert torch.allclose(a_tgt, expected)
    assert torch.isclose(a_tgt.sum(), torch.tensor(1.0))
    # Batched [heads, Q, L] attention re-targets the same way.
    batched = a_src.expand(2, 3, length)
    assert torch.allclose(batched @ m, expected.expand(2, 3, length))


def test_replace_mapper_averages_pieces_into_one_token(tok):
    tokenizer, head = tok
    source, target = f"a {NEW} circle", "a red circle"
    m = tokens.replace_mapper(tokenizer, source, target)
    pieces = tokens.word_token_indices(tokenizer, source, NEW)
    a_src = torch.zeros(_length(tokenizer))
    a_src[pieces] = torch.linspace(0.1, 0.2, len(pieces))
    a_tgt = a_src @ m
    assert torch.isclose(a_tgt[head + 1], a_src[pieces].mean())
    assert torch.allclose(m.sum(0)[head + 1], torch.tensor(1.0))  # the red column averages


def test_replace_mapper_padding(tok):
    """eos maps to eos, padding to padding; masked (zero) source padding stays zero in the target."""
    tokenizer, head = tok
    length = _length(tokenizer)
    for source, target in (("a red circle", f"a {NEW} circle"), (f"a {NEW} circle", "a red circle")):
        src, tgt = tokens.tokenize(tokenizer, source), tokens.tokenize(tokenizer, target)
        m = tokens.replace_mapper(tokenizer, source, target)
        for j in range(tgt.tail_start, length):
            (rows,) = torch.nonzero(m[:, j], as_tuple=True)
            assert rows.tolist() == [min(j - tgt.tail_start + src.tail_start, length - 1)]
        a_src = torch.rand(length) * src.valid_tensor()  # attention masked at padding (T5)
        a_tgt = a_src @ m
        assert torch.all(a_tgt[~tgt.valid_tensor()] == 0)
        # Every valid target column receives attention from a valid source position.
        assert torch.all(m[src.valid_tensor()][:, tgt.valid_tensor()].sum(0) > 0)


def test_replace_mapper_needs_same_word_count(tok):
    tokenizer, _ = tok
    with pytest.raises(ValueError, match="refine"):
        tokens.replace_mapper(tokenizer, "a red circle", "a big red circle")


# ------------------------------------------------------------------------------------------- refine mapper


def test_refine_mapper_added_word(tok):
    tokenizer, h = tok
    mapper, alphas = tokens.refine_mapper(tokenizer, "a red circle", "a big red circle")
    length = _length(tokenizer)
    assert mapper.shape == alphas.shape == (length,)
    assert mapper.dtype == torch.long and alphas.dtype == torch.float32
    # target: [bos] a big red circle eos pad...  <- source: [bos] a red circle eos pad...
    assert mapper[: h + 5].tolist() == list(range(h)) + [h, -1, h + 1, h + 2, h + 3]
    assert alphas[: h + 5].tolist() == [1.0] * (h + 1) + [0.0] + [1.0] * 3
    # Padding: the k-th target padding position takes the k-th source padding position.
    assert mapper[h + 5 :].tolist() == list(range(h + 4, length - 1))
    assert torch.all(alphas[h + 5 :] == 1)


def test_refine_mapper_removed_word(tok):
    tokenizer, h = tok
    length = _length(tokenizer)
    mapper, alphas = tokens.refine_mapper(tokenizer, "a big red circle", "a red circle")
    assert mapper[: h + 4].tolist() == list(range(h)) + [h, h + 2, h + 3, h + 4]
    assert torch.all(alphas == 1)
    # The target is one token shorter: its padding shifts by one, the last position is reused.
    assert mapper[h + 4 :].tolist() == [min(j + 1, length - 1) for j in range(h + 4, length)]


def test_refine_mapper_multi_piece_and_blend(tok):
    tokenizer, h = tok
    source, target = "a red circle on the hat", f"a {NEW} red circle"
    mapper, alphas = tokens.refine_mapper(tokenizer, source, target)
    new = tokens.word_token_indices(tokenizer, target, NEW)
    assert mapper[new].tolist() == [-1] * len(new) and alphas[new].sum() == 0
    red_t, circle_t = new[-1] + 1, new[-1] + 2
    assert mapper[red_t] == h + 1 and mapper[circle_t] == h + 2
    assert mapper[circle_t + 1] == h + 6  # eos <- eos (source "on the hat" removed)
    # P2P's blend: aligned columns from the source, new ones from the target.
    length = _length(tokenizer)
    a_src, a_tgt = torch.rand(4, length), torch.rand(4, length)
    blended = a_src[..., mapper.clamp(min=0)] * alphas + a_tgt * (1 - alphas)
    assert torch.equal(blended[:, new], a_tgt[:, new])
    assert torch.equal(blended[:, red_t], a_src[:, h + 1])


def test_refine_mapper_identity_and_tie_breaking(tok):
    tokenizer, h = tok
    mapper, alphas = tokens.refine_mapper(tokenizer, "a red circle", "a red circle")
    assert torch.equal(mapper, torch.arange(_length(tokenizer))) and torch.all(alphas == 1)
    # Ties go to the latest match: "a cat" keeps its "a" next to "cat".
    mapper, _ = tokens.refine_mapper(tokenizer, "a cat", "a photo of a cat")
    assert mapper[h : h + 5].tolist() == [-1, -1, -1, h, h + 1]
    assert tokens._align([1, 2], [1, 9, 1, 2]) == [(0, 2), (1, 3)]
    assert tokens._align([1, 2, 3], [3, 2, 1]) == [(0, 2)]  # skip source tokens before target tokens


def test_refine_mapper_t5_case_is_a_different_token(t5):
    mapper, alphas = tokens.refine_mapper(t5, "A red circle.", "a red circle.")
    assert mapper[:4].tolist() == [-1, 1, 2, 3] and alphas[0] == 0


# ----------------------------------------------------------------------------------------------- reweight


def test_reweight_vector(tok):
    tokenizer, h = tok
    prompt = f"a red {NEW} circle,"
    w = tokens.reweight_vector(tokenizer, prompt, {"red": 2.0, NEW: 0.5, "circle": -1})
    pieces = tokens.word_token_indices(tokenizer, prompt, NEW)
    expected = torch.ones(_length(tokenizer))
    expected[h + 1] = 2.0
    expected[pieces] = 0.5
    expected[pieces[-1] + 1] = -1.0  # the comma keeps weight 1
    assert torch.equal(w, expected)
    assert torch.equal(tokens.reweight_vector(tokenizer, prompt, {}), torch.ones(_length(tokenizer)))
    with pytest.raises(ValueError, match="'blue' not found"):
        tokens.reweight_vector(tokenizer, prompt, {"blue": 2.0})
    with pytest.raises(ValueError, match="finite"):
        tokens.reweight_vector(tokenizer, prompt, {"red": float("nan")})


# ------------------------------------------------------------------------------------------ changed words


def test_changed_words():
    assert tokens.changed_words("a red circle", "a blue circle") == (["red"], ["blue"])
    assert tokens.changed_words("a circle", "a big red circle") == ([], ["big", "red"])
    assert tokens.changed_words("a big red circle", "a circle") == (["big", "red"], [])
    assert tokens.changed_words("A red Circle.", "a red circle") == ([], [])
    assert tokens.changed_words("a cat on a mat", "a dog on a mat") == (["cat"], ["dog"])


# ------------------------------------------------------------------------------------------------- errors


def test_errors(tok):
    tokenizer, _ = tok
    for bad in ("", "   "):
        with pytest.raises(ValueError, match="empty"):
            tokens.tokenize(tokenizer, bad)
        with pytest.raises(ValueError, match="empty"):
            tokens.replace_mapper(tokenizer, "a red circle", bad)
        with pytest.raises(ValueError, match="empty"):
            tokens.refine_mapper(tokenizer, bad, "a red circle")
        with pytest.raises(ValueError, match="empty"):
            tokens.changed_words(bad, "a red circle")
    with pytest.raises(ValueError, match="more than max_length=4"):
        tokens.tokenize(tokenizer, "a red circle and a dog", max_length=4)
    with pytest.raises(ValueError, match="max_length"):
        tokens.tokenize(tokenizer, " ".join(["red"] * 200))
    with pytest.raises(ValueError, match="max_length"):
        tokens.tokenize(tokenizer, "a red circle", max_length=0)
    with pytest.raises(ValueError, match=r"'blue' not found in prompt 'a red circle'"):
        tokens.word_token_indices(tokenizer, "a red circle", "blue")
    with pytest.raises(ValueError, match="not found"):
        tokens.word_token_indices(tokenizer, "a red circle", "circle red")
    with pytest.raises(ValueError, match="out of range"):
        tokens.word_token_indices(tokenizer, "a red circle", 3)
    with pytest.raises(ValueError, match="empty word"):
        tokens.word_token_indices(tokenizer, "a red circle", " ")
    with pytest.raises(ValueError, match="string or a word index"):
        tokens.word_token_indices(tokenizer, "a red circle", True)
