"""The `retouch` command: listings, edit/invert outputs and sidecars, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from retouch.cli import main

from conftest import random_image


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from retouch.models.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline("sd", tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture
def image_file(tmp_path):
    p = tmp_path / "in.png"
    random_image(32, 32).save(p)
    return p


def test_methods_json_lists_engine_methods(capsys):
    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    inversions = {m["name"]: m for m in info["inversions"]}
    assert {"ddim", "dpmpp", "flow_euler"} <= inversions.keys()
    flow = set(inversions["flow_euler"]["families"])
    assert {"sd3", "flux"} <= flow and not {"sd", "pixart"} & flow
    assert {"ddim", "dpmpp", "flow_euler"} <= {s["name"] for s in info["solvers"]}
    assert "identity" in {e["name"] for e in info["editors"]}


def test_models_json_lists_families(capsys):
    assert main(["models", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"sd", "pixart", "sd3", "flux"} <= info["families"].keys()
    assert isinstance(info["embedded"], list)


def test_console_script_runs():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "retouch.cli", "methods", "--json"], capture_output=True, text=True, env=env, check=True
    )
    assert "dpmpp" in out.stdout


def test_edit_writes_image_and_sidecar(tmp_path, image_file, tiny_model_dir, capsys):
    out = tmp_path / "edited.png"
    rc = main(
        ["edit", str(image_file), "--source", "a cat", "--target", "a dog", "--model", tiny_model_dir,
         "--steps", "3", "--seed", "7", "-o", str(out), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert out.is_file()
    report = json.loads((tmp_path / "edited.png.json").read_text())
    assert {"model", "method", "seed", "num_steps", "nfe", "timings", "config"} <= report.keys()
    assert report["seed"] == 7 and report["num_steps"] == 3 and report["nfe"]["total"] == 6
    assert report["method"] == "direct+p2p"  # the SD family's default method
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited.png", "edited.png.json", "in.png"]


def test_invert_prints_psnr(tmp_path, image_file, tiny_model_dir, capsys):
    out = tmp_path / "rec.png"
    rc = main(["invert", str(image_file), "--prompt", "a cat", "--model", tiny_model_dir, "--steps", "2",
               "-o", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    assert "PSNR" in capsys.readouterr().out
    report = json.loads((tmp_path / "rec.png.json").read_text())
    assert report["method"] == "identity" and isinstance(report["psnr"], float)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "", "--target", "b"], "empty"),
        (["--source", "a", "--target", "b", "--method", "nope"], "unknown method"),
        (["--source", "a", "--target", "b", "--solver", "flow_euler"], "does not apply"),
        (["--source", "a", "--target", "b", "--steps", "0"], "argument --steps"),
        (["--source", "a", "--target", "b", "--option", "novalue"], "KEY=VALUE"),
        (["--source", "a " * 100, "--target", "b"], "too long"),
    ],
)
def test_bad_edit_input_fails_cleanly(tmp_path, image_file, tiny_model_dir, capsys, args, message):
    out = tmp_path / "o.png"
    try:
        rc = main(["edit", str(image_file), "--model", tiny_model_dir, "-o", str(out), "--no-progress", *args])
    except SystemExit as exc:  # flags checked where argparse parses them (usage error, status 2)
        rc = exc.code
    assert rc != 0
    assert message in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "o.png.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["in.png"]


def test_bad_files_and_models(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "x.txt").write_text("not an image")
    assert main(["edit", str(tmp_path / "x.txt"), "-s", "a", "-t", "b", "--model", tiny_model_dir]) == 1
    assert "not an image" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "missing.png"), "-s", "a", "-t", "b", "--model", tiny_model_dir]) == 1
    assert "not found" in capsys.readouterr().err
    random_image().save(tmp_path / "i.png")
    assert main(["edit", str(tmp_path / "i.png"), "-s", "a", "-t", "b", "--model", str(tmp_path)]) == 1
    assert "model_index.json" in capsys.readouterr().err
    assert main(["edit", str(tmp_path / "i.png"), "-s", "a", "-t", "b", "-o", str(tmp_path / "o.xyz"),
                 "--model", tiny_model_dir]) == 1  # fmt: skip
    assert "extension" in capsys.readouterr().err


def test_unknown_flag_is_a_usage_error(image_file):
    with pytest.raises(SystemExit) as exc:
        main(["edit", str(image_file), "-s", "a", "-t", "b", "--frobnicate"])
    assert exc.value.code == 2


def test_edit_with_preset_and_attention_maps(tmp_path, image_file, tiny_model_dir, capsys):
    out = tmp_path / "e.png"
    maps = tmp_path / "maps"
    rc = main(["edit", str(image_file), "-s", "a red circle", "-t", "a blue circle", "--model", tiny_model_dir,
               "--method", "direct+p2p", "--steps", "3", "-o", str(out), "--save-attention", str(maps),
               "--option", "cross_steps=0.5", "--no-progress"])  # fmt: skip
    assert rc == 0
    report = json.loads((tmp_path / "e.png.json").read_text())
    assert report["method"] == "direct+p2p" and report["inversion"] == "direct"
    assert report["config"]["options"]["cross_steps"] == 0.5
    names = sorted(p.name for p in maps.iterdir())
    assert "target.png" in names and "source.png" in names
    assert any(n.startswith("target_") and n.endswith("_blue.png") for n in names)
    assert any(n.startswith("source_") and n.endswith("_red.png") for n in names)


def test_methods_json_has_presets_matrix(capsys):
    assert main(["methods", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    names = {p["name"] for p in info["presets"]}
    assert {"dit4edit", "direct+p2p", "ddim+p2p", "direct+masactrl", "rf_inversion", "rf_solver", "fireflow",
            "null_text+p2p"} <= names  # fmt: skip
    assert info["matrix"]["dit4edit"] == {f: f == "pixart" for f in info["families"]}
