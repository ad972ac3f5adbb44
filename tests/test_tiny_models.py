"""Offline tokenizers and tiny random pipelines of every family (fast: a few seconds on 2 CPU cores)."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from diffusers import DiffusionPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

from retouch.models.tiny import FAMILIES, save_tiny_pipeline, tiny_pipeline
from retouch.models.tokenizers import DEFAULT_WORDS, build_clip_tokenizer, build_t5_tokenizer

# (family, factory kwargs) of every variant exercised below.
VARIANTS = [
    ("sd", {}),
    ("sd", {"prediction_type": "v_prediction"}),
    ("sdxl", {}),
    ("pixart", {}),
    ("pixart", {"conditioned": True}),
    ("sd3", {}),
    ("flux", {}),
]
VARIANT_IDS = ["sd", "sd-v", "sdxl", "pixart", "pixart-conditioned", "sd3", "flux"]
SIZES = [(32, 32), (32, 64)]  # (height, width) in pixels: square and non-square
UNKNOWN_WORDS = ["hippopotamus", "chartreuse", "xylophonist"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbid hub access even if huggingface_hub was imported before the environment variable was set."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _run(pipe: DiffusionPipeline, family: str, height: int, width: int, steps: int = 2) -> torch.Tensor:
    """Run the stock pipeline on a fixed prompt and seed; return images ``[B, 3, H, W]`` in [0, 1]."""
    kwargs: dict = {
        "num_inference_steps": steps,
        "height": height,
        "width": width,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(0),
    }
    if family == "pixart":
        kwargs["use_resolution_binning"] = False
    if family in ("sd3", "flux"):
        kwargs["max_sequence_length"] = 32
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe("a photo of a red cat", **kwargs).images


@pytest.fixture(scope="module", params=VARIANTS, ids=VARIANT_IDS)
def variant(request: pytest.FixtureRequest) -> tuple[str, dict, DiffusionPipeline]:
    family, kwargs = request.param
    return family, kwargs, tiny_pipeline(family, **kwargs)


# ------------------------------------------------------------------------------------------------ pipelines


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_pipeline_runs_finite(variant: tuple[str, dict, DiffusionPipeline], height: int, width: int) -> None:
    family, _, pipe = variant
    images = _run(pipe, family, height, width)
    assert images.shape == (1, 3, height, width)
    assert torch.isfinite(images).all()
    assert images.std() > 0


def test_save_and_reload_offline(variant: tuple[str, dict, DiffusionPipeline], tmp_path: Path) -> None:
    family, kwargs, pipe = variant
    path = save_tiny_pipeline(family, tmp_path / family, **kwargs)
    assert (path / "model_index.json").is_file()
    reloaded = DiffusionPipeline.from_pretrained(path)
    assert type(reloaded) is type(pipe)
    expected = _run(pipe, family, 32, 64)
    torch.testing.assert_close(_run(reloaded, family, 32, 64), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_factories_are_deterministic_and_leave_global_rng_alone(family: str) -> None:
    rng_before = torch.get_rng_state()
    first = tiny_pipeline(family, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)
    second = tiny_pipeline(family, seed=3)
    other = tiny_pipeline(family, seed=4)
    name = "unet" if hasattr(first, "unet") else "transformer"
    a, b, c = (getattr(p, name).state_dict() for p in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    text_a, text_b = first.text_encoder.state_dict(), second.text_encoder.state_dict()
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)


def test_unknown_family_names_valid_ones() -> None:
    with pytest.raises(ValueError, match="sd, sdxl, pixart, sd3, flux"):
        tiny_pipeline("kandinsky")


def test_bad_options_raise() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_pipeline("sd", prediction_type="sample")
    with pytest.raises(ValueError, match="sample_size == 128"):
        tiny_pipeline("pixart", conditioned=True, sample_size=8)


def test_architectural_features(variant: tuple[str, dict, DiffusionPipeline]) -> None:
    family, kwargs, pipe = variant
    if family in ("sd", "sdxl"):
        names = list(pipe.unet.attn_processors)
        for level in ("down_blocks.0", "down_blocks.1"):  # two resolutions, self- and cross-attention
            assert any(n.startswith(level) and n.endswith("attn1.processor") for n in names)
            assert any(n.startswith(level) and n.endswith("attn2.processor") for n in names)
        assert pipe.scheduler.config.prediction_type == kwargs.get("prediction_type", "epsilon")
        assert pipe.vae_scale_factor == 8
    elif family == "pixart":
        cfg = pipe.transformer.config
        assert cfg.out_channels == 2 * cfg.in_channels
        assert pipe.transformer.use_additional_conditions == kwargs.get("conditioned", False)
        assert pipe.scheduler.config.algorithm_type == "dpmsolver++"
    elif family == "sd3":
        assert pipe.scheduler.config.shift == 3.0
        assert pipe.vae.config.shift_factor is not None
    elif family == "flux":
        cfg = pipe.transformer.config
        assert cfg.num_layers >= 1 and cfg.num_single_layers >= 1 and cfg.guidance_embeds
        assert cfg.in_channels == 4 * pipe.vae.config.latent_channels
        assert pipe.scheduler.config.use_dynamic_shifting


# ----------------------------------------------------------------------------------------------- tokenizers


def test_clip_known_words_are_single_tokens() -> None:
    tok = build_clip_tokenizer()
    for word in DEFAULT_WORDS:
        assert tok.tokenize(word) == [word + "</w>"], word
        assert tok.tokenize(word.upper()) == [word + "</w>"], word  # CLIP lower-cases


def test_clip_custom_words_and_unknown_words() -> None:
    tok = build_clip_tokenizer(["Zebra", "café", "hippo", "pot"])
    assert tok.tokenize("zebra café") == ["zebra</w>", "cafÃ©</w>"]
    for word in UNKNOWN_WORDS:
        pieces = tok.tokenize(word)
        assert len(pieces) > 1, word
        assert "".join(pieces) == word + "</w>"  # pieces concatenate back to the word
    with pytest.raises(ValueError, match="pre-tokenises"):
        build_clip_tokenizer(["t-shirt"])


def test_clip_specials_padding_and_roundtrip(tmp_path: Path) -> None:
    tok = build_clip_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.model_max_length == 77
    ids = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 77
    assert ids[:6] == [0, *tok.convert_tokens_to_ids(["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"])]
    assert ids[6:] == [1] * 71  # eos, then pad = eos
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"

    tok.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tok)
    assert reloaded.model_max_length == 77
    for text in ["a photo of a cat", "a xylophonist in chartreuse"]:
        assert reloaded(text).input_ids == tok(text).input_ids
    assert build_clip_tokenizer().get_vocab() == tok.get_vocab()  # deterministic


def test_t5_known_unknown_words() -> None:
    tok = build_t5_tokenizer()
    for word in DEFAULT_WORDS:
        assert tok.tokenize(word) == ["▁" + word], word
        assert tok.tokenize(word.capitalize()) == ["▁" + word.capitalize()], word
    for word in UNKNOWN_WORDS:
        pieces = tok.tokenize(word)
        assert len(pieces) > 1, word
        assert "".join(pieces) == "▁" + word
    custom = build_t5_tokenizer(["xylophonist"])
    assert custom.tokenize("xylophonist Xylophonist") == ["▁xylophonist", "▁Xylophonist"]
    assert custom.tokenize("cat") == ["▁", "c", "a", "t"]  # not in the custom list
    with pytest.raises(ValueError, match="whitespace"):
        build_t5_tokenizer(["two words"])


def test_t5_specials_padding_and_roundtrip(tmp_path: Path) -> None:
    tok = build_t5_tokenizer()
    assert tok.bos_token_id is None
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok.model_max_length == 120
    ids = tok("A photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(ids) == 120
    assert tok.convert_ids_to_tokens(ids[:6]) == ["▁A", "▁photo", "▁of", "▁a", "▁cat", "</s>"]
    assert ids[6:] == [0] * 114
    assert tok.decode(ids, skip_special_tokens=True) == "A photo of a cat"

    tok.save_pretrained(tmp_path)
    reloaded = T5TokenizerFast.from_pretrained(tmp_path)
    assert len(reloaded) == len(tok)
    assert reloaded.model_max_length == 120
    for text in ["A photo of a cat", "a xylophonist in chartreuse"]:
        assert reloaded(text).input_ids == tok(text).input_ids
    assert build_t5_tokenizer().get_vocab() == tok.get_vocab()


def test_clip_minimal_vocab() -> None:
    tok = build_clip_tokenizer(["cat"])
    assert len(tok) == 514 + 2  # bos, eos, 2 x 256 byte symbols, then "ca" and "cat</w>"
    assert tok.tokenize("cat cap") == ["cat</w>", "ca", "p</w>"]
