"""edit() end to end on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from retouch.config import EditConfig, InversionConfig
from retouch.editing import edit, resolve

from conftest import random_image, tiny_backbone

REPORT_KEYS = {"model", "method", "seed", "num_steps", "nfe", "timings", "config", "family", "solver", "inversion"}


@pytest.mark.parametrize("hw", [(32, 32), (32, 64), (64, 32)])
def test_edit_runs_on_every_family_and_aspect(backbone, hw):
    h, w = hw
    res = edit(backbone, random_image(h, w), EditConfig("a red circle", "a blue circle", num_steps=3))
    assert res.image.size == (w, h) and res.reconstruction.size == (w, h)
    assert res.report.keys() >= REPORT_KEYS
    assert res.report["nfe"]["sampling"] == 3
    assert {"encode", "invert", "sample", "decode", "total"} <= res.report["timings"].keys()
    assert res.report["config"]["num_steps"] == 3 and res.report["seed"] == 0


def test_identity_with_equal_prompts_gives_identical_branches(backbone):
    res = edit(backbone, random_image(), EditConfig("a cat", "a cat", num_steps=3), keep_latents=True)
    assert torch.allclose(res.latents[0], res.latents[1], atol=1e-5)


def test_nfe_accounting_per_inversion():
    bb = tiny_backbone("pixart")
    res = edit(bb, random_image(), EditConfig("a", "b", num_steps=5, inversion=InversionConfig(iterations=0)))
    # naive dpmpp inversion: 1 NFE per step plus the 2-NFE look-ahead on the 3 second-order steps
    assert res.report["nfe"] == {"inversion": 5 + 2 * 3, "sampling": 5, "total": 16}
    res = edit(tiny_backbone("sd"), random_image(), EditConfig("a", "b", num_steps=5))
    assert res.report["nfe"]["inversion"] == 5 and res.report["inversion"] == "ddim"


def test_flow_inversion_reconstructs_latent_on_random_sd3():
    """Flipped-Euler inversion is well conditioned even on a random flow model; error falls with steps."""
    bb = tiny_backbone("sd3")
    errs = []
    for n in (5, 20):
        res = edit(bb, random_image(), EditConfig("a dog", "a dog", num_steps=n, guidance=1.0), keep_latents=True)
        z0 = res.trajectory.latents[-1]
        errs.append(float((res.latents[0] - z0).norm() / z0.norm()))
    assert errs[1] < errs[0] and errs[1] < 0.05, errs


def test_defaults_resolve_per_family():
    assert resolve(tiny_backbone("pixart"), EditConfig("a", "b")).solver.name == "dpmpp"
    assert resolve(tiny_backbone("sd"), EditConfig("a", "b")).inversion == "ddim"
    r = resolve(tiny_backbone("flux"), EditConfig("a", "b"))
    assert (r.solver.name, r.inversion) == ("flow_euler", "flow_euler")


def test_attention_layer_tables():
    sd = tiny_backbone("sd").attention_layers()
    kinds = {i.kind for i in sd.values()}
    assert kinds == {"self", "cross"}
    depths = [i.depth for i in sd.values()]
    assert depths == sorted(depths)
    places = [i.place for i in sd.values()]
    assert places.index("mid") > places.index("down") and places.index("up") > places.index("mid")
    first = next(iter(sd.values()))
    assert first.resolution((4, 8)) == (4, 8)
    flux = tiny_backbone("flux").attention_layers()
    assert {i.kind for i in flux.values()} == {"joint", "single"}
    assert all(i.text_first for i in flux.values())
    pix = tiny_backbone("pixart").attention_layers()
    assert all(i.resolution((8, 16)) == (4, 8) for i in pix.values())


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (dict(source_prompt="", target_prompt="x"), "empty"),
        (dict(source_prompt="a " * 200, target_prompt="x"), "too long"),
        (dict(source_prompt="a", target_prompt="b", method="nope"), "unknown method"),
        (dict(source_prompt="a", target_prompt="b", solver="flow_euler"), "does not apply to sd"),
        (dict(source_prompt="a", target_prompt="b", inversion=InversionConfig(name="flow_euler")), "flow"),
        (dict(source_prompt="a", target_prompt="b", height=33), "multiples"),
    ],
)
def test_bad_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        edit(tiny_backbone("sd"), random_image(), EditConfig(**cfg))


def test_config_validation():
    with pytest.raises(ValueError, match="num_steps"):
        EditConfig("a", "b", num_steps=0)
    with pytest.raises(ValueError, match="guidance"):
        EditConfig("a", "b", guidance=float("nan"))
    with pytest.raises(ValueError, match="size policy"):
        EditConfig("a", "b", size_policy="stretch")


def test_size_policy_resizes_or_refuses():
    bb = tiny_backbone("sd")  # multiples of 16 px
    res = edit(bb, random_image(44, 44), EditConfig("a", "b", num_steps=2))  # works at the native 64x64
    assert res.report["size"]["model_size"] == [64, 64] and res.report["size"]["changed"]
    assert res.image.size == (44, 44)  # returned at the input's size
    res = edit(bb, random_image(44, 44), EditConfig("a", "b", num_steps=2, resolution="input", output_size="model"))
    assert res.image.size == (48, 48)  # 44 -> nearest multiple 48
    with pytest.raises(ValueError, match="multiples of 16"):
        edit(bb, random_image(40, 40), EditConfig("a", "b", num_steps=2, size_policy="strict"))
