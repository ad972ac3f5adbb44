"""The words an embedded model was trained on, and the words of a prompt outside them.

The embedded models learned ShapesWorld's caption grammar only (:func:`retouch.worlds.captions.vocabulary`):
"a red circle on a blue background" is in it, "a red circle on a white background" is not ("white" is not a
background colour of the world), and a prompt with such a word is drawn as the nearest scene the model
knows. ``retouch models --vocab NAME`` prints the vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from retouch.models import registry


def model_vocabulary(source: str | Path) -> list[str] | None:
    """The vocabulary of a model trained on ShapesWorld (a folder with ``world.json``: the embedded models and
    models trained with ``python -m training`` (the repository's ``training/``)); ``None`` for any other model."""
    folder = registry.resolve(str(source)) if not isinstance(source, Path) else source
    if not isinstance(folder, Path) or not (folder / registry.WORLD_FILE).is_file():
        return None
    from retouch.worlds.captions import vocabulary

    return vocabulary()


def unknown_words(prompts: Sequence[str], vocab: Sequence[str]) -> list[str]:
    """Words of ``prompts`` (in order, once each) that are not in ``vocab``."""
    from retouch.worlds.captions import tokenize

    known = set(vocab)
    out: list[str] = []
    for prompt in prompts:
        for word in tokenize(prompt):
            if word not in known and word not in out:
                out.append(word)
    return out


def misplaced_words(prompts: Sequence[str]) -> list[str]:
    """Known words in a role the grammar never gives them: the word before ``background`` must be one of the
    background colours (``"a plain white background"`` names a colour only objects have)."""
    from retouch.worlds.captions import tokenize
    from retouch.worlds.shapes import BACKGROUND_COLOURS, PATTERNS

    out: list[str] = []
    for prompt in prompts:
        words = tokenize(prompt)
        for i, word in enumerate(words):
            if word != "background" or i == 0:
                continue
            before = words[i - 1]
            if before not in BACKGROUND_COLOURS and before not in PATTERNS:
                note = f"{before} background (background colours: {', '.join(BACKGROUND_COLOURS)})"
                if note not in out:
                    out.append(note)
    return out


def vocabulary_problems(prompts: Sequence[str], vocab: Sequence[str]) -> list[str]:
    """Unknown words (quoted) and misplaced known ones, for one message."""
    return [repr(w) for w in unknown_words(prompts, vocab)] + misplaced_words(prompts)


def vocabulary_message(model: str, problems: Sequence[str]) -> str:
    return (
        f"the prompts use words the model {model!r} was never trained on: {'; '.join(problems)}. It knows only "
        f"ShapesWorld's caption grammar and draws the nearest scene it knows; see `retouch models --vocab {model}`"
    )
