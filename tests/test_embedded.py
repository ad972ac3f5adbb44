"""The shipped embedded models: listed, loadable by the stock diffusers classes offline, keeping the conventions
third-party code for those pipelines assumes, and usable by `retouch edit` on the example images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers  # noqa: E402
import torch  # noqa: E402

from retouch.cli import main  # noqa: E402
from retouch.models import registry  # noqa: E402

PIPELINES = {
    "shapes-sd": "StableDiffusionPipeline",
    "shapes-pixart": "PixArtAlphaPipeline",
    "shapes-flux": "FluxPipeline",
}
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    path = registry.resolve(name)
    cls = getattr(diffusers, json.loads((Path(path) / "model_index.json").read_text())["_class_name"])
    return cls.from_pretrained(str(path), torch_dtype=torch.float32, local_files_only=True)


def test_models_json_lists_the_three_pipelines(capsys):
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {m["name"]: m for m in info["embedded"]}
    for name, cls in PIPELINES.items():
        assert names[name]["pipeline"] == cls and Path(names[name]["card"]).is_file()
    assert registry.default_model() == "shapes-flux"


def test_total_weights_stay_under_60_mb():
    total = sum(p.stat().st_size for p in registry.embedded_dir().rglob("*.safetensors"))
    assert total <= 60 * 2**20, f"{total / 2**20:.1f} MiB"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_stock_pipeline_loads_with_the_family_conventions(name):
    pipe = _load(name)
    assert type(pipe).__name__ == PIPELINES[name]
    vae = pipe.vae.config
    assert vae.scaling_factor > 0 and vae.sample_size == 64
    world = registry.world_of(name)
    assert 1 <= world["max_objects"] <= 3
    if name == "shapes-sd":
        unet = pipe.unet.config
        assert list(unet.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
        assert list(unet.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
        assert unet.mid_block_type in (None, "UNetMidBlock2DCrossAttn") and unet.layers_per_block == 2
        assert unet.in_channels == vae.latent_channels
        sched = pipe.scheduler.config
        assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
        assert sched.num_train_timesteps == 1000 and sched.prediction_type == "epsilon"
        assert pipe.tokenizer.model_max_length == 77
        n_blocks = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith("transformer_blocks.0"))
        assert n_blocks == 16
    elif name == "shapes-pixart":
        tr = pipe.transformer.config
        assert tr.out_channels == 2 * tr.in_channels == 2 * vae.latent_channels  # learned-sigma layout
        assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    else:
        tr = pipe.transformer.config
        assert tr.guidance_embeds and tr.in_channels == 4 * vae.latent_channels
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_edit_of_an_example_writes_image_and_sidecar(name, tmp_path, capsys):
    case = json.loads((EXAMPLES / "examples.json").read_text())[0]
    out = tmp_path / "edit.png"
    rc = main(["edit", str(EXAMPLES / case["image"]), "--source", case["source"], "--target", case["target"],
               "--model", name, "--steps", "3", "-o", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["model"] and sidecar["num_steps"] == 3 and sidecar["nfe"]["total"] > 0


def _preset_cases() -> list[tuple[str, str]]:
    from retouch.presets import PRESETS

    cases = []
    for name, preset in sorted(PRESETS.items()):
        model = next((f"shapes-{f}" for f in ("sd", "pixart", "flux") if f in preset.families), None)
        if model is not None:
            cases.append((name, model))
    return cases


@pytest.mark.parametrize(("method", "name"), _preset_cases())
def test_every_preset_edits_an_embedded_model(method, name, tmp_path, capsys):
    from PIL import Image

    from retouch.presets import PRESETS

    case = json.loads((EXAMPLES / "examples.json").read_text())[0]
    out = tmp_path / "edit.png"
    extra = []
    if PRESETS[method].editor == "kv_edit":  # mask-based presets need a mask: the centre quarter
        w, h = Image.open(EXAMPLES / case["image"]).size
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (w // 4, h // 4, w // 4 + w // 2, h // 4 + h // 2))
        mask.save(tmp_path / "mask.png")
        extra = ["--mask", str(tmp_path / "mask.png")]
    rc = main(["edit", str(EXAMPLES / case["image"]), "--source", case["source"], "--target", case["target"],
               "--model", name, "--method", method, "--steps", "2", "-o", str(out), "--no-progress",
               *extra])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    sidecar = json.loads(out.with_name(out.name + ".json").read_text())
    assert sidecar["method"] == method and out.is_file()
