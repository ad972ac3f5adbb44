"""The auxiliary attribute-binding loss: token labels follow the object phrases, and it trains."""

from __future__ import annotations

import pytest
import torch

from retouch.worlds import captions, shapes
from retouch.worlds.shapes import Background, Object, Scene
from training import binding


def _scene() -> Scene:
    return Scene(
        objects=(
            Object("star", "red", "small", "top left", "striped"),
            Object("circle", "blue", "large", "center", "solid"),
        ),
        background=Background("gray", "checkered"),
        style="flat",
    )


@pytest.fixture(scope="module")
def t5_tokenizer(tmp_path_factory):
    from training import text

    path = tmp_path_factory.mktemp("tok")
    text.build_tokenizers(path)
    return text.load_tokenizers(path)[1]


def test_object_spans_in_every_wording():
    scene = _scene()
    for seed in range(20):
        wording = captions.sample_wording(seed)
        text = captions.caption(scene, wording=wording)
        spans = binding.object_spans(scene, wording, text)
        assert [text[a:b] for a, b in spans] == [captions.describe_object(o, wording) for o in scene.objects]
    with pytest.raises(ValueError, match="not found"):
        binding.object_spans(scene, captions.CANONICAL_WORDING, "a plain gray background")


def test_token_labels_follow_the_object_phrases(t5_tokenizer):
    scene = _scene()
    wording = captions.Wording(layout="background first")
    text = captions.caption(scene, wording=wording)
    labels = binding.token_labels(t5_tokenizer, [text, ""], [scene, None], [wording, None], 64)
    assert labels.shape == (2, 64, len(binding.ATTRIBUTES))
    assert bool((labels[1] == binding.IGNORE).all())
    ids = t5_tokenizer(text, padding="max_length", max_length=64, truncation=True)["input_ids"]
    words = [t5_tokenizer.convert_ids_to_tokens(i).lstrip("▁") for i in ids]
    attrs = list(binding.ATTRIBUTES)

    def row(word: str, nth: int = 0) -> list[int]:
        return labels[0, [i for i, w in enumerate(words) if w == word][nth]].tolist()

    red = [binding.ATTRIBUTES[a].index(getattr(scene.objects[0], a)) for a in attrs]
    blue = [binding.ATTRIBUTES[a].index(getattr(scene.objects[1], a)) for a in attrs]
    # every token of an object's phrase carries all of that object's attributes, the cell words included
    assert row("red") == red and row("left") == red and row("star") == red
    assert row("blue") == blue and row("center") == blue
    # background, style and padding tokens are not supervised
    assert row("gray") == [binding.IGNORE] * len(attrs) and row("flat") == [binding.IGNORE] * len(attrs)
    n_tokens = sum(i != t5_tokenizer.pad_token_id for i in ids)
    assert bool((labels[0, n_tokens:] == binding.IGNORE).all())


def test_causal_labels_only_name_what_was_read(tmp_path_factory):
    """CLIP's tower is causal: a token is labelled only with the attributes whose words it has seen."""
    from transformers import CLIPTokenizerFast

    from training import text as text_stage

    path = tmp_path_factory.mktemp("cliptok")
    text_stage.build_tokenizers(path)
    tok = CLIPTokenizerFast.from_pretrained(str(path / "clip"))
    scene = _scene()
    wording = captions.Wording(adjective_order="size fill colour")
    caption = captions.caption(scene, wording=wording)  # "a small striped red star at the top left and ..."
    labels = binding.token_labels(tok, [caption], [scene], [wording], 77, causal=True)[0]
    words = [t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(tok(caption)["input_ids"])]
    attrs = list(binding.ATTRIBUTES)
    red = [binding.ATTRIBUTES[a].index(getattr(scene.objects[0], a)) for a in attrs]
    ig = binding.IGNORE

    def row(word: str) -> list[int]:
        return labels[words.index(word)].tolist()

    assert row("small") == [ig, ig, red[2], ig, ig]
    assert row("striped") == [ig, ig, red[2], red[3], ig]
    assert row("red") == [ig, red[1], red[2], red[3], ig]
    assert row("star") == row("top") == red[:4] + [ig]  # "top" alone is no cell yet
    assert row("left") == red  # the phrase's last token has read everything
    full = binding.token_labels(tok, [caption], [scene], [wording], 77)[0]
    assert full[words.index("small")].tolist() == red


def test_attribute_ends_locate_each_word():
    obj = _scene().objects[0]
    for seed in range(12):
        wording = captions.sample_wording(seed)
        phrase = captions.describe_object(obj, wording)
        ends = dict(zip(binding.ATTRIBUTES, binding.attribute_ends(obj, wording), strict=True))
        for attr in ("shape", "colour", "size", "fill"):
            value = getattr(obj, attr)
            assert phrase[ends[attr] - len(value) : ends[attr]] == value
        assert ends["position"] == len(phrase)


def test_binding_loss_trains_heads_on_token_states():
    torch.manual_seed(0)
    heads = binding.BindingHeads(16)
    states = torch.randn(4, 10, 16)
    labels = torch.full((4, 10, 5), binding.IGNORE, dtype=torch.long)
    labels[:, :3] = torch.tensor([1, 2, 0, 1, 3])
    opt = torch.optim.Adam(heads.parameters(), lr=0.05)
    first, _ = binding.binding_loss(heads, states, labels)
    for _ in range(30):
        loss, metrics = binding.binding_loss(heads, states, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.1 * float(first.detach()) and metrics["bind_colour"] == 1.0
    none = torch.full_like(labels, binding.IGNORE)
    zero, m = binding.binding_loss(heads, states, none)
    assert float(zero) == 0.0 and m == {}


def test_attribute_vocabularies_match_the_world():
    assert binding.ATTRIBUTES["shape"] == tuple(shapes.SHAPES)
    assert set(binding.ATTRIBUTES["position"]) == set(shapes.POSITIONS)


@pytest.mark.parametrize("layout", ["objects first", "background first"])
def test_scene_labels_follow_the_background_and_style_words(tmp_path_factory, layout):
    """Causal scene labels: a token carries the background pattern once it has read the pattern word, the colour
    once it has read the colour word, the style once it has read the style, and keeps them to the caption's
    end; bidirectional labels cover the words' phrases only. Both layouts of the grammar."""
    from transformers import CLIPTokenizerFast

    from training import text as text_stage

    path = tmp_path_factory.mktemp("cliptok")
    text_stage.build_tokenizers(path)
    tok = CLIPTokenizerFast.from_pretrained(str(path / "clip"))
    scene = _scene()
    wording = captions.Wording(layout=layout)
    caption = captions.caption(scene, wording=wording)
    labels = binding.scene_labels(tok, [caption], [scene], [wording], 77, causal=True)[0]
    words = [t.removesuffix("</w>") for t in tok.convert_ids_to_tokens(tok(caption)["input_ids"])][1:-1]
    asked = ("checkered", "gray", "flat")
    want = [binding.SCENE_ATTRIBUTES[a].index(v) for a, v in zip(binding.SCENE_ATTRIBUTES, asked, strict=True)]
    ig = binding.IGNORE
    rows = labels[1 : 1 + len(words)].tolist()
    at = {w: words.index(w) for w in ("checkered", "gray", "flat")}
    for i, row in enumerate(rows):
        assert row == [want[k] if i >= at[w] else ig for k, w in enumerate(("checkered", "gray", "flat"))], words[i]
    assert bool((labels[1 + len(words) :] == ig).all())  # end token and padding
    full = binding.scene_labels(tok, [caption], [scene], [wording], 77)[0][1 : 1 + len(words)].tolist()
    assert full[at["checkered"]] == [want[0], want[1], ig] and full[at["checkered"] - 1][:2] == want[:2]  # "a"
    assert full[at["flat"]] == [ig, ig, want[2]] and words[at["flat"] + 1] == "style"
    assert full[at["flat"] + 1] == [ig, ig, ig]
