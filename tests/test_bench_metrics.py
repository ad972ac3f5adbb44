"""PIE-Bench metrics against hand-computed values, on a small synthetic data set in PIE-Bench's on-disk format."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from retouch.bench import metrics as M
from retouch.bench.cases import balanced, parse_shard, shard_cases, shard_from_env
from retouch.bench.evaluate import NAN_NOTE, Evaluator
from retouch.bench.learned import (
    ClipScorer,
    DinoStructure,
    LpipsScorer,
    MetricUnavailable,
    ViTKeys,
    clip_score,
    pie_dino_resize,
)
from retouch.bench.pie import load_output_image, pie_cases

H = W = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run faster on one thread than on two contended ones; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_pie(root, items: dict[str, dict], images: dict[str, np.ndarray]) -> None:
    """A PIE-Bench-format folder: mapping_file.json + annotation_images/<image_path> (PNG, lossless)."""
    for case_id, item in items.items():
        path = root / "annotation_images" / item["image_path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[case_id]).save(path)
    (root / "mapping_file.json").write_text(json.dumps(items))


@pytest.fixture(scope="module")
def pie_dir(tmp_path_factory):
    """Three cases: a band mask (rows 16-23), a full mask ("nan"), an empty RLE (border only)."""
    root = tmp_path_factory.mktemp("pie")
    src = np.full((H, W, 3), 100, np.uint8)
    items = {
        "600000000001": {
            "image_path": "6_change_attribute_color_40/1_artificial/1_animal/600000000001.png",
            "original_prompt": "a [red] circle on a gray background",
            "editing_prompt": "a [blue] circle on a gray background",
            "editing_instruction": "make the circle blue",
            "editing_type_id": "6",
            "blended_word": "circle circle",
            "mask": [16 * W, 8 * W],
        },
        "900000000002": {
            "image_path": "9_change_style_80/900000000002.png",
            "original_prompt": "a photo of a circle",
            "editing_prompt": "a [watercolor] painting of a circle",
            "editing_instruction": "",
            "editing_type_id": "9",
            "blended_word": "",
            "mask": [0, H * W + 50],  # the run is cut at the end of the array
        },
        "000000000003": {
            "image_path": "0_random_140/000000000003.png",
            "original_prompt": "a circle",
            "editing_prompt": "a [big] circle",
            "editing_instruction": "",
            "editing_type_id": "0",
            "blended_word": "",
            "mask": [],
        },
    }
    _write_pie(root, items, dict.fromkeys(items, src))
    return root


def _edited() -> np.ndarray:
    """The source plus 10 levels on a 4x4 background patch and plus 50 over the edit band."""
    out = np.full((H, W, 3), 100, np.uint8)
    out[10:14, 10:14] += 10
    out[16:24] += 50
    return out


# --------------------------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------------------------


def test_pie_loader_reads_the_real_layout(pie_dir):
    cases = pie_cases(pie_dir)
    assert [c.case_id for c in cases] == ["000000000003", "600000000001", "900000000002"]  # id order
    c = cases[1]
    assert (c.type_id, c.index) == (6, 1)  # the string type id is parsed
    assert c.source_prompt == "a red circle on a gray background"  # brackets stripped
    assert c.target_prompt == "a blue circle on a gray background"
    assert c.blended_word == "circle circle"
    data = c.load()
    assert data.source_image.shape == (H, W, 3) and data.gt_image is None
    mask = data.mask
    # the border rule: first / last rows and columns are forced to "edit"
    assert mask[0].all() and mask[-1].all() and mask[:, 0].all() and mask[:, -1].all()
    assert mask[16:24].all() and not mask[1:16, 1:-1].any() and not mask[24:-1, 1:-1].any()
    assert int((~mask).sum()) == 660  # 1024 - (band 256 + border 108)
    assert cases[2].load().mask.all()
    assert pie_cases(pie_dir, types={6, 9}, limit=None)[0].case_id == "600000000001"
    assert [c.type_id for c in pie_cases(pie_dir, limit=2)] == [0, 6]  # round-robin over types


def test_missing_mapping_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="mapping_file.json"):
        pie_cases(tmp_path)


def test_output_crop_rule(tmp_path):
    """PIE's scripts save [instruction | gt | recon | edit]; the evaluator keeps the bottom-right square."""
    strip = np.zeros((16, 64, 3), np.uint8)
    strip[:, 48:] = 200
    Image.fromarray(strip).save(tmp_path / "out.png")
    out = load_output_image(tmp_path / "out.png", size=16)
    assert out.shape == (16, 16, 3) and (out == 200).all()


# --------------------------------------------------------------------------------------------------------------
# pixel metrics
# --------------------------------------------------------------------------------------------------------------


def test_background_psnr_mse_quirk_vs_corrected(pie_dir):
    data = pie_cases(pie_dir)[1].load()
    edited = _edited()
    d2 = (10 / 255) ** 2  # squared error of one value of the 4x4 patch; the +50 band is masked out
    off = M.pie_background_metrics(data.source_image, edited, data.mask)
    fixed = M.background_only_metrics(data.source_image, edited, data.mask)
    # official: the error averaged over ALL 3·32·32 values of the masked frames
    assert off["mse_bg"] == pytest.approx(16 * 3 * d2 / (3 * H * W), rel=1e-5)
    assert off["psnr_bg"] == pytest.approx(10 * math.log10(H * W / (16 * d2)), abs=1e-4)
    # corrected: over the 660 background pixels only
    assert fixed["mse_bg_corrected"] == pytest.approx(16 * d2 / 660, rel=1e-9)
    assert fixed["psnr_bg_corrected"] == pytest.approx(10 * math.log10(660 / (16 * d2)), abs=1e-9)
    # the quirk is exactly the background fraction
    assert off["mse_bg"] == pytest.approx(fixed["mse_bg_corrected"] * 660 / (H * W), rel=1e-5)
    assert off["psnr_bg"] > fixed["psnr_bg_corrected"]
    assert 0 < off["ssim_bg"] < 1


def test_nan_rule_when_the_mask_covers_everything(pie_dir):
    case = pie_cases(pie_dir)[2]
    data = case.load()
    assert M.pie_background_metrics(data.source_image, _edited(), data.mask) == {
        "psnr_bg": None, "mse_bg": None, "ssim_bg": None,
    }  # fmt: skip
    values, notes = Evaluator().evaluate(case, data, _edited())
    for k in ("psnr_bg", "mse_bg", "ssim_bg", "psnr_bg_corrected", "mse_bg_corrected"):
        assert values[k] is None and notes[k] == NAN_NOTE
    assert notes["edit_success"].startswith("no ground-truth scene")


def test_psnr_mse_of_known_tensors():
    x = torch.zeros(1, 3, 4, 4)
    y = torch.full((1, 3, 4, 4), 0.1)
    assert M.mse(x, y) == pytest.approx(0.01, rel=1e-6)
    assert M.psnr(x, y) == pytest.approx(20.0, abs=1e-4)
    assert M.psnr(x, x) == math.inf and M.cap_psnr(math.inf) == M.PSNR_CAP
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255
    assert M.psnr_uint8(a, b) == pytest.approx(10 * math.log10(12), abs=1e-9)


def test_gaussian_window_matches_the_formula():
    g = M.gaussian_window(11, 1.5)
    d = np.arange(-5, 6)
    k = np.exp(-(d**2) / (2 * 1.5**2))
    k /= k.sum()
    np.testing.assert_allclose(g.numpy(), np.outer(k, k), rtol=1e-12)
    assert g.sum().item() == pytest.approx(1.0)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.4, 0.6
    x, y = (torch.full((1, 3, 16, 16), v, dtype=torch.float64) for v in (a, b))
    c1 = 0.01**2
    assert M.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)
    assert M.ssim(x, x) == pytest.approx(1.0)


def test_ssim_matches_a_naive_window_loop():
    """Gaussian-weighted statistics window by window, averaged over the positions whose window fits."""
    rng = np.random.default_rng(0)
    x = rng.random((1, 2, 14, 15))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    w = M.gaussian_window(11, 1.5).numpy()
    c1, c2 = 0.01**2, 0.03**2
    vals = []
    for c in range(2):
        for i in range(14 - 10):
            for j in range(15 - 10):
                px, py = x[0, c, i : i + 11, j : j + 11], y[0, c, i : i + 11, j : j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx = max((w * px * px).sum() - mx**2, 0)
                vy = max((w * py * py).sum() - my**2, 0)
                cov = (w * px * py).sum() - mx * my
                vals.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert M.ssim(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(float(np.mean(vals)), rel=1e-10)
    with pytest.raises(ValueError, match="at least 11x11"):
        M.ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_self_similarity_and_structure_distance():
    keys = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])
    s = M.self_similarity(keys)
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, r, 0], [0, 1, r, 0], [r, r, 1, 0], [0, 0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(s, expected)  # the zero key: 0 / clamp(0, 1e-8) = 0
    other = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    # S changes at (0,1), (1,0) by 1 and at (1,2), (2,1) by 0 -> 2 / 16
    assert M.structure_distance_from_keys(keys, other) == pytest.approx(2 / 16)


# --------------------------------------------------------------------------------------------------------------
# learned metrics with tiny random models (the hub-id path is the same code)
# --------------------------------------------------------------------------------------------------------------


def test_dino_resize_follows_torchvision():
    assert pie_dino_resize(512, 512) == (224, 224)
    assert pie_dino_resize(480, 640) == (224, 298)
    assert pie_dino_resize(640, 480) == (298, 224)
    assert pie_dino_resize(100, 1000) == (48, 480)  # the longer side capped at max_size


@pytest.fixture(scope="module")
def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=224,
                    patch_size=16)  # fmt: skip
    return ViTModel(cfg, add_pooling_layer=False).eval()


def test_dino_structure_distance_keys_and_input_quirk(tiny_vit):
    dino = DinoStructure(tiny_vit)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    # PIE's input: uint8 -> float 0..255 -> bilinear resize to 224 (no antialias) -> ImageNet normalisation
    x = torch.from_numpy(a.astype(np.float32)).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(dino.preprocess(a), x)
    # keys of the last layer, recomputed by hand from its input hidden state
    with torch.no_grad():
        hidden = tiny_vit(pixel_values=x, output_hidden_states=True).hidden_states[-2]  # input of the last layer
        mods = dict(tiny_vit.named_modules())
        norm = next(m for n, m in mods.items() if n.endswith("1.layernorm_before"))
        kproj = next(m for n, m in mods.items() if n.endswith(("1.attention.k_proj", "1.attention.attention.key")))
        keys = kproj(norm(hidden))[0]
    assert keys.shape == (1 + (224 // 16) ** 2, 32)  # every token, CLS included, heads concatenated
    torch.testing.assert_close(dino.image_keys(a), keys)
    d = dino.distance(a, b)
    d_fixed = dino.distance(a, b, unit_range=True)
    assert d > 0 and d_fixed > 0 and d != pytest.approx(d_fixed)  # the 0..255 quirk changes the number
    assert dino.distance(a, a) == 0.0
    assert ViTKeys(tiny_vit, 0).layer == 0 and dino.keys.layer == 1


def test_dino_loads_from_a_folder_and_finds_keys_by_name(tiny_vit, tmp_path):
    tiny_vit.save_pretrained(tmp_path / "vit")
    a = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    b = a[::-1].copy()
    loaded = DinoStructure.from_pretrained(str(tmp_path / "vit"))
    assert loaded.distance(a, b) == pytest.approx(DinoStructure(tiny_vit).distance(a, b), rel=1e-6)
    from retouch.bench.learned import _KEY_PROJ

    for name in ("encoder.layer.11.attention.attention.key", "layers.11.attention.k_proj",
                 "vision_model.encoder.layers.3.self_attn.k_proj"):  # fmt: skip
        assert _KEY_PROJ.search(name)
    assert not _KEY_PROJ.search("encoder.layer.11.attention.attention.query")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel saved like shapes-clip (model + tokenizer + image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from retouch.models.tokenizers import build_clip_tokenizer

    tok = build_clip_tokenizer()
    common = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    cfg = CLIPConfig(
        text_config={**common, "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**common, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_clip_score_is_100_times_clamped_cosine(tiny_clip_dir):
    scorer = ClipScorer.from_pretrained(str(tiny_clip_dir))
    img = np.random.default_rng(2).integers(0, 256, (H, W, 3), dtype=np.uint8)
    text = "a small red circle"
    with torch.no_grad():
        fi = scorer.image_features(img)
        ft = scorer.text_features(text)
    cos = torch.nn.functional.cosine_similarity(fi, ft).item()
    assert scorer.score(img, text) == pytest.approx(100 * max(cos, 0.0), abs=1e-4)
    assert clip_score(fi, -ft) == pytest.approx(100 * max(-cos, 0.0), abs=1e-4)  # negative cosines -> 0
    mask = np.zeros((H, W), bool)
    mask[8:24, 8:24] = True
    blacked = np.uint8(img * mask[..., None])
    assert scorer.score(img, text, mask=mask) == pytest.approx(scorer.score(blacked, text), abs=1e-6)
    assert scorer.image_keys(img).shape == (1 + (32 // 8) ** 2, 32)
    assert scorer.structure_distance(img, img) == 0.0


def test_evaluator_with_learned_components(pie_dir, tiny_vit, tiny_clip_dir):
    dino = DinoStructure(tiny_vit)
    clip = ClipScorer.from_pretrained(str(tiny_clip_dir))
    ev = Evaluator(
        structure=lambda a, b: dino.distance(a, b),
        structure_corrected=lambda a, b: dino.distance(a, b, unit_range=True),
        clip=clip,
    )
    case = pie_cases(pie_dir)[1]
    data = case.load()
    values, notes = ev.evaluate(case, data, _edited(), reconstruction=data.source_image)
    assert values["structure_distance"] == pytest.approx(dino.distance(data.source_image, _edited()))
    assert values["clip_whole"] == pytest.approx(clip.score(_edited(), case.target_prompt))
    assert values["clip_edited"] == pytest.approx(clip.score(_edited(), case.target_prompt, mask=data.mask))
    assert values["clip_source"] == pytest.approx(clip.score(data.source_image, case.source_prompt))
    assert values["recon_psnr"] == M.PSNR_CAP
    assert "lpips_bg" in notes and "gt_psnr" in notes and "structure_distance" not in notes


def test_missing_weights_raise_a_clear_error(tmp_path):
    with pytest.raises(MetricUnavailable, match="retouch-tests/no-such-dino"):
        DinoStructure.from_pretrained("retouch-tests/no-such-dino")
    with pytest.raises(MetricUnavailable, match="--skip-learned"):
        ClipScorer.from_pretrained(str(tmp_path / "no-clip"))
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - the CPU torch here cannot import it
        with pytest.raises(MetricUnavailable, match="torchvision"):
            LpipsScorer.load()
    ev = Evaluator.for_pie(skip_learned=True)
    assert ev.missing["structure_distance"] == "skipped (--skip-learned)"


# --------------------------------------------------------------------------------------------------------------
# sharding helpers
# --------------------------------------------------------------------------------------------------------------


def test_shard_helpers(pie_dir):
    cases = pie_cases(pie_dir)
    assert parse_shard("1/3") == (1, 3)
    for bad in ("3/3", "-1/2", "a/b", "1"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)
    parts = [shard_cases(cases, (i, 2)) for i in range(2)]
    assert sorted(c.case_id for p in parts for c in p) == sorted(c.case_id for c in cases)
    assert shard_from_env({"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert shard_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) == (0, 2)
    assert shard_from_env({}) is None
    assert balanced(cases, 0) == []
