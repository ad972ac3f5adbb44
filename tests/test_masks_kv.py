"""User masks (generic source-trajectory blend, auto masks, CLI / API / bench) and KV-Edit on tiny random models.

The identities here hold whatever the weights: outside the mask the target follows the source trajectory at
every step and ends on the input latent exactly; KV-Edit's foreground does not see the target's background.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kv_checks import check_foreground_attends_to_cached_background
from retouch import io, masks
from retouch.cli import main
from retouch.config import EditConfig
from retouch.editing import edit, prepare_image

from conftest import random_image, tiny_backbone

SRC = "a red circle on a blue background"
TGT = "a green circle on a blue background"
DIT = ("pixart", "sd3", "flux")


def _square(size: int = 64, lo: int = 16, hi: int = 48) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[lo:hi, lo:hi] = 1.0  # latent cells 2..5 of 8: whole 2x2 tokens at patch 2
    return m


def _edit(bb, method, mask, steps=4, **kw):
    cfg = EditConfig(SRC, TGT, method=method, num_steps=steps, **kw)
    return edit(bb, random_image(64, 64), cfg, mask=mask, keep_latents=True)


# --- mask files and arrays -----------------------------------------------------------------------------------
def test_parse_and_fit_masks(tmp_path):
    path = tmp_path / "m.png"
    Image.fromarray((_square(40, 10, 30) * 255).astype(np.uint8)).save(path)
    spec = masks.parse_mask(str(path))
    assert spec.array.shape == (40, 40) and spec.array.max() == 1.0 and spec.source == str(path)
    assert masks.parse_mask("auto:red, circle").words == ("red", "circle")
    assert masks.parse_mask(np.ones((4, 4), bool)).array.dtype == np.float32
    assert masks.parse_mask(np.full((4, 4), 255, np.uint8)).array.max() == 1.0
    with pytest.raises(io.ImageError, match="mask: image not found"):
        masks.parse_mask(str(tmp_path / "missing.png"))
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        masks.parse_mask(np.full((4, 4), 2.0))
    with pytest.raises(ValueError, match="at least one word"):
        masks.parse_mask("auto:")
    # any size is brought to the model's size by the image's policy; strict refuses a different size
    assert masks.fit_mask(spec.array, (64, 32), "resize").shape == (64, 32)
    assert masks.fit_mask(spec.array, (64, 32), "crop").shape == (64, 32)
    with pytest.raises(io.ImageError, match="give a mask of that size"):
        masks.fit_mask(spec.array, (64, 64), "strict")
    # at the latent a cell is as editable as its most editable pixel; soft values are kept
    soft = np.zeros((8, 8), np.float32)
    soft[:, :4] = 0.5
    soft[0, 5] = 1.0
    assert masks.to_latent(soft, (1, 2)).flatten().tolist() == [0.5, 1.0]


def test_generic_mask_keeps_the_source_trajectory_at_every_step(monkeypatch, family):
    """Every preset family: after each step the target equals the inversion latent of that point outside the
    mask (a soft mask blends in between), and the output latent is the input latent there, exactly."""
    bb = tiny_backbone(family)
    soft = _square() * 0.5
    soft[16:32, 16:32] = 1.0
    seen = []
    real = masks.blend

    def spy(x, reference, mask, rows):
        out = real(x, reference, mask, rows)
        seen.append((out, reference, mask))
        return out

    monkeypatch.setattr(masks, "blend", spy)
    for method in ("direct+p2p", "ddim+masactrl"):
        seen.clear()
        res = _edit(bb, method, soft)
        traj = res.trajectory.latents
        assert len(seen) == len(traj) - 1
        for i, (out, ref, m) in enumerate(seen):
            assert ref is traj[i + 1]
            outside = (m[0, 0] == 0).expand_as(out[1])
            assert torch.equal(out[1][outside], ref[0][outside])
        m = res.extras["mask"][0, 0]
        assert ((m > 0) & (m < 1)).any()  # soft cells exist
        z0 = traj[-1][0]
        assert torch.equal(res.latents[1][:, m == 0], z0[:, m == 0])
        assert not torch.allclose(res.latents[1][:, m == 1], z0[:, m == 1])  # inside, the edit acts
        assert res.report["mask"]["source"] == "array"


def test_full_mask_changes_nothing_and_empty_mask_returns_the_input():
    bb = tiny_backbone("sd3")
    free = _edit(bb, "direct+p2p", None)
    full = _edit(bb, "direct+p2p", np.ones((64, 64), np.float32))
    assert torch.equal(free.latents, full.latents)
    empty = _edit(bb, "direct+p2p", np.zeros((64, 64), np.float32))
    assert torch.equal(empty.latents[1], empty.trajectory.latents[-1][0])


def test_auto_mask_from_word_attention(family):
    bb = tiny_backbone(family)
    res = _edit(bb, "direct+p2p", "auto:circle")
    m = res.extras["mask"]
    assert m.shape == (1, 1, 8, 8) and set(m.unique().tolist()) <= {0.0, 1.0}
    nfe = res.report["nfe"]
    assert 1 <= nfe["mask"] <= 3 and res.report["mask"]["source"] == "auto:circle"
    assert nfe["total"] == nfe["inversion"] + nfe["sampling"] + nfe["mask"]
    with pytest.raises(ValueError, match="in neither prompt"):
        _edit(bb, "direct+p2p", "auto:hexagon")


# --- KV-Edit --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", DIT)
@pytest.mark.parametrize(
    "method,options",
    [
        ("kv_edit", {}),
        ("kv_edit", {"attn_mask": True, "re_init": True, "skip": 0}),
        ("kv_edit_inf", {"attn_mask": True}),
    ],
)
def test_kv_edit_output_equals_the_input_latent_outside_the_mask(family, method, options):
    if method == "kv_edit_inf" and family == "pixart":
        pytest.skip("the inversion-free variant is for flow models")
    bb = tiny_backbone(family)
    res = _edit(bb, method, _square(), steps=6, options={"skip": 1, **options})
    img, _ = prepare_image(bb, random_image(64, 64), EditConfig(SRC, TGT))
    with torch.backends.mkldnn.flags(enabled=False):  # the convolution kernels edit() runs on the CPU
        z0 = bb.encode_image(io.pil_to_tensor(img)).float()[0]  # the input latent, encoded afresh
    m = res.extras["mask"][0, 0]
    assert set(m.unique().tolist()) == {0.0, 1.0}  # KV-Edit binarises
    out = res.latents[1]
    assert torch.equal(out[:, m == 0], z0[:, m == 0])  # the background latent is the input latent, bit for bit
    assert not torch.allclose(out[:, m == 1], z0[:, m == 1], atol=1e-3)  # the foreground was regenerated
    assert res.report.get("start_step", 0) == options.get("skip", 1)
    if method == "kv_edit_inf":
        assert res.report["nfe"]["inversion"] == 0


def test_kv_edit_needs_a_mask_and_refuses_pixart_inversion_free():
    bb = tiny_backbone("flux")
    with pytest.raises(ValueError, match="kv_edit needs a mask"):
        _edit(bb, "kv_edit", None)
    with pytest.raises(ValueError, match="does not support the pixart family"):
        _edit(tiny_backbone("pixart"), "kv_edit_inf", _square())
    with pytest.raises(ValueError, match="does not support the sd family"):
        _edit(tiny_backbone("sd"), "kv_edit", _square())


@pytest.mark.parametrize("family", DIT)
def test_kv_edit_foreground_attends_to_the_cached_background(family):
    """With the cache filled at a grid point, the target's foreground prediction does not depend on the
    target's own background latent (its background keys / values are the cached ones); without KV-Edit it
    does. A target identical to the cached source reproduces the source's prediction everywhere."""
    bb = tiny_backbone(family)
    cfg = EditConfig(SRC, SRC, num_steps=4)
    with torch.no_grad():
        cond = bb.encode_prompt([SRC, SRC], image_size=(64, 64), guidance=1.0)
        z0 = bb.encode_image(io.pil_to_tensor(random_image(64, 64))).float()
        grid = bb.grid("flow" if bb.family != "pixart" else "ddim", 4, (8, 8))
        lat = masks.to_latent(_square(), (8, 8))
    check_foreground_attends_to_cached_background(bb, cfg, cond, z0, grid, lat)


# --- CLI, API listing, bench ----------------------------------------------------------------------------------
def test_methods_json_lists_kv_presets(capsys):
    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    presets = {p["name"]: p for p in info["presets"]}
    assert set(presets["kv_edit"]["families"]) == {"pixart", "sd3", "flux", "qwenimage", "flux2", "zimage"}
    assert set(presets["kv_edit_inf"]["families"]) == {"sd3", "flux", "qwenimage", "flux2", "zimage"}
    assert not info["matrix"]["kv_edit"]["sana"] and not info["matrix"]["kv_edit"]["sd"]
    assert presets["kv_edit"]["num_steps"] == 28 and presets["kv_edit"]["options"]["skip"] * 28 == pytest.approx(4)
    assert "none" in {i["name"] for i in info["inversions"]}


def test_cli_mask_and_save_mask(tmp_path, capsys):
    from retouch.models.tiny import save_tiny_pipeline

    model = str(save_tiny_pipeline("flux", tmp_path / "tiny-flux"))
    image = tmp_path / "in.png"
    random_image(64, 64).save(image)
    mask = tmp_path / "mask.png"
    Image.fromarray((_square(100, 25, 75) * 255).astype(np.uint8)).save(mask)  # another size: resized
    out, saved = tmp_path / "out.png", tmp_path / "used.png"
    args = ["edit", str(image), "-s", SRC, "-t", TGT, "-m", model, "--steps", "3", "--no-progress", "--json"]
    assert main([*args, "--method", "kv_edit", "--option", "skip=1", "--mask", str(mask), "-o", str(out),
                 "--save-mask", str(saved)]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["mask"]["source"] == str(mask) and report["mask_file"] == str(saved)
    used = np.asarray(Image.open(saved))
    assert used.shape == (64, 64) and set(np.unique(used)) == {0, 255}
    assert json.loads((tmp_path / "out.png.json").read_text())["mask"]["coverage"] > 0
    assert main([*args, "--mask", str(tmp_path / "nope.png")]) == 1
    assert "mask: image not found" in capsys.readouterr().err
    assert main([*args, "--save-mask", str(saved)]) == 1
    assert "--save-mask needs --mask" in capsys.readouterr().err


def test_bench_mask_flag_passes_case_masks(tmp_path):
    from retouch.bench.runner import BenchConfig, MethodSpec, ResultsLog, run

    bb = tiny_backbone("flux")
    out = tmp_path / "run"
    cfg = BenchConfig(suite="shapes", methods=(MethodSpec("kv_edit", options={"skip": 1}),), out=str(out), cases=2,
                      steps=3, model="tiny-flux", skip_learned=True, mask=True, save_images=False)  # fmt: skip
    run(cfg, backbone=bb)
    rows = ResultsLog(out / "results.jsonl").read()
    assert len(rows) == 2 and all(r["error"] is None for r in rows)
    unmasked = BenchConfig(**{**cfg.__dict__, "mask": False, "out": str(tmp_path / "plain")})
    run(unmasked, backbone=bb)
    err = ResultsLog(tmp_path / "plain" / "results.jsonl").read()
    assert all("needs a mask" in r["error"] for r in err)


# --- benchmark scripts ----------------------------------------------------------------------------------------
def _script(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}_kv", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_scale_times_kv_edit_and_its_memory_runs(tmp_path):
    scale = _script("scale")
    presets = ["kv_edit", "kv_edit_inf"]
    scale.run_benchmark([("tiny-sd3", (64, 64))], [scale.EditRun.parse("tiny-flux@64x64/kv_edit_inf/s2,4")],
                        presets=presets, ratios=[], nfe=1, warmup=0, isolate=False, results_dir=tmp_path)  # fmt: skip
    entry = json.loads((tmp_path / "scale_tiny-sd3.json").read_text())["entries"][0]
    assert [o["preset"] for o in entry["overheads"]] == presets
    for v in entry["variants"]:
        assert v["finite"] and v["seconds_per_nfe"] > 0
    (run,) = json.loads((tmp_path / "scale_tiny-flux.json").read_text())["edit_runs"]
    assert [r["num_steps"] for r in run["runs"]] == [2, 4] and all(r["nfe"]["inversion"] == 0 for r in run["runs"])


def test_new_editors_script_skips_unknown_methods_and_writes_markdown(caplog):
    ne = _script("new_editors")
    with caplog.at_level("INFO", logger="new_editors"):
        methods = ne.parse_methods("plain,kv_edit@mask,not_a_method,kv_edit_inf", "shapes-pixart", "pixart")
    assert methods == [("kv_edit@mask", "kv_edit", True)]
    assert "not in the registry" in caplog.text and "does not support the pixart family" in caplog.text
    with pytest.raises(SystemExit, match="@mask"):
        ne.parse_methods("kv_edit@brush", "shapes-flux", "flux")
    rows = [{"method": "kv_edit@mask", "edit_success": 1.0, "psnr_out": 30.0, "psnr_out_ceiling": 31.0,
             "psnr_in_gt": None, "nfe": 10, "seconds": 1.0, "edit_applied": 1.0, "edit_preserved": 1.0},
            {"method": "kv_edit@mask", "error": "ValueError: x"}]  # fmt: skip
    summary = ne.summarise(rows, ["kv_edit@mask"])
    assert summary["kv_edit@mask"]["rows"] == 2 and summary["kv_edit@mask"]["errors"] == 1
    payload = {"config": {"command": "", "seed": 0, "cases": 1, "dilate": 0}, "torch_threads": 1,
               "load_average": None, "models": [{"model": "m", "summary": summary}]}  # fmt: skip
    text = ne.markdown(payload)
    assert "| kv_edit@mask | 2 | 1 | 100 |" in text and "30.00 (31.00)" in text


def test_kv_edit_with_attention_recording_keeps_its_mask(tmp_path):
    """--save-attention composes a recorder with the editor: the mask hooks pass through the composition."""
    bb = tiny_backbone("flux")
    cfg = EditConfig(SRC, TGT, method="kv_edit", num_steps=4, options={"skip": 1})
    res = edit(bb, random_image(64, 64), cfg, mask=_square(), keep_latents=True, record_attention=True)
    m = res.extras["mask"][0, 0]
    assert set(m.unique().tolist()) == {0.0, 1.0} and res.report["start_step"] == 1
    assert torch.equal(res.latents[1][:, m == 0], res.trajectory.latents[-1][0][:, m == 0])
    assert res.extras["attention_maps"]["target"]
