"""Offline tokenizers for the tiny test models: a CLIP byte-level BPE and a T5 SentencePiece-style Unigram.

Nothing here touches the network. Both builders produce real ``transformers`` tokenizer classes (backed by
the ``tokenizers`` library) with the same pre-tokenisation, special tokens and padding conventions as the
checkpoints used by Stable Diffusion / SD3 / Flux (CLIP) and PixArt / SD3 / Flux (T5), but with a small,
constructed vocabulary:

* **CLIP** (:func:`build_clip_tokenizer`). Vocabulary = ``<|startoftext|>`` (id 0, bos), ``<|endoftext|>``
  (id 1, eos, also unk and **pad**, as in ``openai/clip-vit-large-patch14`` used by SD 1.x), the 256
  byte-level characters, the same 256 with the ``</w>`` end-of-word suffix, then the tokens created by the
  constructed merges. Every known word becomes the single token ``word</w>``; any other word falls back to
  shorter pieces (down to single bytes), so multi-piece words occur naturally.
* **T5** (:func:`build_t5_tokenizer`). Unigram model with ``<pad>`` (id 0), ``</s>`` (id 1, eos),
  ``<unk>`` (id 2), no bos, the word-start piece ``▁``, single-character pieces, and one ``▁word`` piece per
  known word (lower-case and Capitalised, since T5 is case-sensitive). Unknown words split into ``▁`` plus
  character pieces (or a known-word prefix plus characters).

Both round-trip through ``save_pretrained`` / ``from_pretrained`` offline (transformers >= 5 writes a
``tokenizer.json`` and reloads it without sentencepiece).
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Sequence

from tokenizers.models import BPE
from transformers import CLIPTokenizer, T5TokenizerFast

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "DEFAULT_WORDS",
    "T5_EOS",
    "T5_PAD",
    "T5_UNK",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "bytes_to_unicode",
]

logger = logging.getLogger(__name__)

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
_CLIP_SUFFIX = "</w>"

T5_PAD = "<pad>"
T5_EOS = "</s>"
T5_UNK = "<unk>"
_T5_SPACE = "\u2581"  # "▁", SentencePiece's word-start marker

# Unigram log-probabilities. A whole-word piece (-5) must beat every multi-piece segmentation of the same
# word (each extra piece costs at least -10), so a known word is always one piece.
_T5_WORD_SCORE = -5.0
_T5_CAPITALISED_SCORE = -5.5
_T5_CHAR_SCORE = -10.0

# A few hundred common English words plus the vocabulary of typical edit prompts (colours, shapes, animals,
# objects, materials, styles, scene words). Kept as an immutable tuple: it is data, not state.
_DEFAULT_WORDS_TEXT = """
a an the this that these those some one two three four five six seven eight nine ten many few several
of in on at to from with without by for into onto over under above below behind beside between near
inside outside through across along around against up down out off left right top bottom front back
middle center centre side corner edge and or but not no yes is are was were be been being has have had
do does did will would can could should may might must very more most less least much too also only
just still even again then now here there where when what which who whose how why all each every both
other another same different such it its he she they them his her their we our you your i my me
photo photograph picture image painting drawing sketch illustration render rendering portrait
landscape closeup close view shot scene style art artwork poster cartoon anime comic watercolor
watercolour oil pencil charcoal pixel digital realistic photorealistic detailed sharp blurry
vintage retro modern futuristic abstract minimalist cinematic dramatic soft bright dark light
high low quality resolution lighting shadow shadows reflection background foreground texture pattern
red orange yellow green blue purple violet pink brown black white gray grey silver gold golden
beige cyan magenta teal navy maroon turquoise colorful colourful
circle square triangle rectangle star heart diamond hexagon oval cross ring sphere cube cone cylinder
pyramid shape shapes dot dots line lines stripe stripes striped spotted checkered
cat cats dog dogs puppy kitten horse horses cow cows pig sheep goat bird birds duck chicken eagle
owl parrot penguin fish shark whale dolphin lion tiger bear panda wolf fox rabbit mouse rat squirrel
deer elephant giraffe zebra monkey gorilla frog turtle snake lizard butterfly bee spider insect
animal animals pet
man woman men women boy girl child children baby person people face hair eyes eye smile smiling
hand hands head body king queen knight robot astronaut doctor chef soldier teacher student
car cars truck bus bicycle bike motorcycle train plane airplane boat ship rocket
house home building tower castle church bridge road street city town village room kitchen window
door wall floor roof table chair sofa bed lamp clock book books cup mug bottle glass plate bowl
vase box bag hat shirt dress shoe shoes glasses umbrella ball toy computer phone camera guitar
piano sign flag balloon candle
tree trees flower flowers rose roses grass leaf leaves forest garden park field mountain mountains
hill river lake sea ocean beach island desert sand rock rocks stone sky cloud clouds sun moon stars
rain snow snowy rainy sunny cloudy fog foggy storm wind fire water ice sunset sunrise night day
morning evening spring summer autumn fall winter
apple apples banana orange cake bread pizza burger sandwich fruit fruits coffee tea food cookie
wooden wood metal metallic plastic paper stone brick marble glass leather fabric cotton wool steel
iron golden crystal
big small large tiny huge little tall short long wide narrow thick thin round flat old new young
happy sad angry old beautiful pretty cute ugly clean dirty wet dry hot cold warm cool fast slow
full empty open closed broken heavy light
sitting standing running walking jumping flying swimming sleeping eating drinking holding
wearing looking playing riding reading lying
make made change turn replace remove add put place move paint color colour into instead
"""
DEFAULT_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_DEFAULT_WORDS_TEXT.split()))


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, the byte-level alphabet of GPT-2 / CLIP BPE.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (control characters, space, ...) map to
    ``chr(256 + n)`` in byte order, so that no BPE symbol is whitespace or a control character. This is the
    mapping the ``tokenizers`` ``ByteLevel`` pre-tokenizer applies.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    mapping: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _unique(words: Iterable[str]) -> list[str]:
    """Strip and de-duplicate ``words`` keeping first-seen order; drop empty strings."""
    seen: dict[str, None] = {}
    for word in words:
        word = word.strip()
        if word:
            seen.setdefault(word, None)
    return list(seen)


# --------------------------------------------------------------------------------------------------- CLIP


def _clip_base_vocab() -> dict[str, int]:
    """The 514-entry base vocabulary: bos, eos, 256 byte characters, and the same with ``</w>``."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab: dict[str, int] = {CLIP_BOS: 0, CLIP_EOS: 1}
    for symbol in alphabet + [c + _CLIP_SUFFIX for c in alphabet]:
        vocab[symbol] = len(vocab)
    return vocab


def _clip_symbols(byte_word: str) -> list[str]:
    """Initial BPE symbols of a byte-level word: one per character, ``</w>`` on the last."""
    symbols = list(byte_word)
    symbols[-1] += _CLIP_SUFFIX
    return symbols


def _chain_merges(symbols: Sequence[str]) -> list[tuple[str, str]]:
    """Left-to-right merge chain ``(s0, s1), (s0s1, s2), ...`` that joins ``symbols`` into one token."""
    merges = []
    acc = symbols[0]
    for symbol in symbols[1:]:
        merges.append((acc, symbol))
        acc += symbol
    return merges


def _closure_merges(symbols: Sequence[str]) -> list[tuple[str, str]]:
    """Every merge ``(s_i..s_k, s_k+1..s_j)`` over every span and split point of ``symbols``.

    With these merges present, any two adjacent pieces of the word can merge, so whatever other merges fire
    first, BPE always ends with the whole word as one token. Shorter spans come first (lower rank).
    """
    n = len(symbols)
    merges = []
    for length in range(2, n + 1):
        for start in range(n - length + 1):
            end = start + length
            for split in range(start + 1, end):
                merges.append(("".join(symbols[start:split]), "".join(symbols[split:end])))
    return merges


def _clip_byte_words(words: Sequence[str]) -> list[str]:
    """Normalise and pre-tokenise each word exactly as :class:`CLIPTokenizer` does; return byte-level strings.

    Raises:
        ValueError: if a word is not a single pre-token (e.g. contains a space, digits or punctuation next to
            letters) and therefore cannot become one token.
    """
    probe = CLIPTokenizer(vocab=_clip_base_vocab(), merges=[])
    normalizer = probe.backend_tokenizer.normalizer
    pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    out = []
    for word in words:
        pieces = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(word))
        if len(pieces) != 1:
            raise ValueError(
                f"word {word!r} pre-tokenises into {len(pieces)} pieces {[p for p, _ in pieces]}; "
                "CLIP words must be a single run of letters, a single digit or a single run of punctuation"
            )
        out.append(pieces[0][0])
    return out


def _clip_merges(byte_words: Sequence[str], base_vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Construct BPE merges so that each byte-level word is encoded as the single token ``word</w>``.

    Start with one left-to-right chain per word. Chains of different words interfere (a bigram that starts
    one word may fire inside another and strand its chain), so every word that does not come out as one
    token gets the full closure of merges over its spans, which is conflict-proof; repeat until all pass.
    """
    merges: dict[tuple[str, str], None] = {}
    for byte_word in byte_words:
        for merge in _chain_merges(_clip_symbols(byte_word)):
            merges.setdefault(merge, None)

    closed: set[str] = set()
    for _ in range(len(byte_words) + 1):
        vocab = dict(base_vocab)
        for left, right in merges:
            vocab.setdefault(left + right, len(vocab))
        model = BPE(vocab=vocab, merges=list(merges), end_of_word_suffix=_CLIP_SUFFIX, continuing_subword_prefix="")
        failing = [w for w in byte_words if w not in closed and len(model.tokenize(w)) != 1]
        if not failing:
            return list(merges)
        logger.debug("CLIP BPE: %d words need closure merges: %s", len(failing), failing[:10])
        for byte_word in failing:
            closed.add(byte_word)
            for merge in _closure_merges(_clip_symbols(byte_word)):
                merges.setdefault(merge, None)
    raise RuntimeError("CLIP BPE merge construction did not converge")  # unreachable: closures never fail


def build_clip_tokenizer(words: Iterable[str] | None = None, max_length: int = 77) -> CLIPTokenizer:
    """Build a CLIP byte-level BPE tokenizer offline, with every word of ``words`` a single token.

    Args:
        words: Words to make single tokens (lower-cased, as CLIP lower-cases its input). Each must be one
            CLIP pre-token: a run of letters (any script), one digit, or one run of punctuation. ``None``
            uses :data:`DEFAULT_WORDS`.
        max_length: ``model_max_length`` (77 for CLIP). Pipelines pad to it.

    Returns:
        A :class:`transformers.CLIPTokenizer` with bos ``<|startoftext|>`` = 0 and eos ``<|endoftext|>`` = 1;
        pad and unk are also ``<|endoftext|>`` (pad = eos, as in the SD 1.x CLIP tokenizer), so a text
        encoder must pool at the *first* eos (set ``CLIPTextConfig(bos_token_id=0, eos_token_id=1,
        pad_token_id=1)``). Vocabulary size is ``len(tokenizer)``.

    Raises:
        ValueError: if a word cannot become a single token.
    """
    word_list = _unique(w.lower() for w in (DEFAULT_WORDS if words is None else words))
    base_vocab = _clip_base_vocab()
    byte_words = _unique(_clip_byte_words(word_list))
    merges = _clip_merges(byte_words, base_vocab)
    vocab = dict(base_vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    logger.debug("CLIP tokenizer: %d words, %d merges, vocab %d", len(byte_words), len(merges), len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=max_length,
    )


# ----------------------------------------------------------------------------------------------------- T5


def build_t5_tokenizer(words: Iterable[str] | None = None, max_length: int = 120) -> T5TokenizerFast:
    """Build a T5 SentencePiece-style Unigram tokenizer offline, with every word of ``words`` one piece.

    Args:
        words: Words that become single ``▁word`` pieces; each is added lower-case and Capitalised (T5 is
            case-sensitive, and prompts often start with a capital). Must not contain whitespace. ``None``
            uses :data:`DEFAULT_WORDS`.
        max_length: ``model_max_length`` (120 as in PixArt-α). Pipelines pass their own ``max_length``.

    Returns:
        A :class:`transformers.T5TokenizerFast` with ``<pad>`` = 0, ``</s>`` = 1 (eos, appended to every
        sequence), ``<unk>`` = 2, no bos and no sentinel ``<extra_id_*>`` tokens. Pieces: ``▁``, single
        printable ASCII characters (plus any other character used in ``words``), then the word pieces.
        Characters outside that set become ``<unk>``.

    Raises:
        ValueError: if a word contains whitespace.
    """
    word_list = _unique(w.lower() for w in (DEFAULT_WORDS if words is None else words))
    for word in word_list:
        if any(c.isspace() for c in word):
            raise ValueError(f"T5 word {word!r} contains whitespace; each word must become one '▁word' piece")

    pieces: dict[str, float] = {T5_PAD: 0.0, T5_EOS: 0.0, T5_UNK: 0.0, _T5_SPACE: _T5_CHAR_SCORE}
    chars = [c for c in string.printable if not c.isspace()]
    chars += sorted({c for w in word_list for c in w + w.capitalize()} - set(chars))
    for char in chars:
        pieces.setdefault(char, _T5_CHAR_SCORE)
    for word in word_list:
        pieces.setdefault(_T5_SPACE + word, _T5_WORD_SCORE)
    for word in word_list:
        pieces.setdefault(_T5_SPACE + word.capitalize(), _T5_CAPITALISED_SCORE)

    logger.debug("T5 tokenizer: %d words, %d pieces", len(word_list), len(pieces))
    return T5TokenizerFast(
        vocab=list(pieces.items()),
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=max_length,
    )
