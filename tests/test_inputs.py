"""Every input a person may give gets a clear answer: sizes, paths, flags, API types, benchmarks, model folders.

Most checks fail before any model loads; the few that run an edit use the tiny random SD model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retouch import io
from retouch.cli import main
from retouch.config import EditConfig, InversionConfig, MergeConfig

from conftest import random_image, tiny_backbone


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from retouch.models.tiny import save_tiny_pipeline

    return Path(save_tiny_pipeline("sd", tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture
def image_file(tmp_path):
    p = tmp_path / "in.png"
    random_image(32, 32).save(p)
    return p


def _edit(*args: str) -> list[str]:
    return ["edit", *args, "--no-progress"]


# --- sizes ------------------------------------------------------------------------------------------------------
def test_native_area_keeps_aspect_and_multiple():
    from retouch.backbones.base import SizePolicy

    sd15 = SizePolicy(multiple=8, min_side=8, max_side=2048, native=(512, 512))
    h, w = sd15.fit_native(3024, 4032)  # a 4032x3024 phone photo
    assert h % 8 == 0 and w % 8 == 0
    assert abs(h * w / 512**2 - 1) < 0.03 and abs(w / h - 4 / 3) < 0.02
    assert sd15.fit_native(32, 32) == (512, 512)  # small images come up to the native area too
    tiny = SizePolicy(multiple=16, min_side=16, max_side=4096, native=(64, 64))
    assert tiny.fit_native(10000, 10000) == (64, 64)


def test_edit_works_at_native_size_and_returns_input_size():
    from retouch.editing import edit

    bb = tiny_backbone("sd")  # native 64x64, sides multiples of 16
    cfg = EditConfig("a cat", "a dog", num_steps=2)
    out = edit(bb, random_image(48, 96), cfg)
    size = out.report["size"]
    assert size["input_size"] == [96, 48] and size["output_size"] == [96, 48]
    mw, mh = size["model_size"]
    assert (mw, mh) == (96, 48)  # 96x48 is the native 64x64 area with the aspect kept
    small = edit(bb, random_image(16, 32), cfg)
    assert small.report["size"]["model_size"] == [96, 48] and small.image.size == (32, 16)
    kept = edit(bb, random_image(16, 32), cfg.with_(resolution="input", output_size="model"))
    assert kept.report["size"]["model_size"] == [32, 16] and kept.image.size == (32, 16)


def test_memory_estimate_refuses_naming_the_flag():
    from retouch.backbones.memory import MemoryLimitError, estimate_edit_memory
    from retouch.editing import edit

    bb = tiny_backbone("sd")
    small, big = estimate_edit_memory(bb, (64, 64)), estimate_edit_memory(bb, (512, 512))
    assert 0 < small.total < big.total  # grows with the latent tokens
    with pytest.raises(MemoryLimitError, match="--max-memory"):
        edit(bb, random_image(32, 32), EditConfig("a", "b", num_steps=1), memory_limit=1000)


def test_cli_refuses_an_edit_above_max_memory(tmp_path, image_file, tiny_model_dir, capsys):
    out = tmp_path / "o.png"
    rc = main(_edit(str(image_file), "-s", "a", "-t", "b", "--model", str(tiny_model_dir), "--height", "1024",
                    "--width", "1024", "--max-memory", "0.01", "-o", str(out)))  # fmt: skip
    assert rc == 1
    err = capsys.readouterr().err
    assert "--max-memory" in err and "GiB" in err and "no output written" in err
    assert not out.exists()


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    random_image(8, 8).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_decompression_bomb_is_refused_by_api_and_cli(tmp_path, tiny_model_dir, capsys):
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 13000, 13000)  # above retouch's limit, below PIL's own
    with pytest.raises(io.ImageError, match="169 megapixels, more than the 150 megapixels .* decompression bomb"):
        io.load_image(bomb)
    _png_claiming(bomb, 60000, 60000)  # above PIL's limit too
    with pytest.raises(io.ImageError, match="decompression bomb"):
        io.load_image(bomb)
    rc = main(_edit(str(bomb), "-s", "a", "-t", "b", "--model", str(tiny_model_dir), "-o", str(tmp_path / "o.png")))
    assert rc == 1 and "decompression bomb" in capsys.readouterr().err


def test_image_inputs_of_every_kind():
    arr = (np.random.default_rng(0).random((6, 5, 3)) * 255).astype(np.uint8)
    assert io.as_image(arr).size == (5, 6)
    assert io.as_image(arr[..., 0]).mode == "RGB"
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    assert np.array_equal(np.asarray(io.as_image(t)), arr)
    assert io.as_image(t[None]).size == (5, 6)
    with pytest.raises(io.ImageError, match=r"\[0, 1\]"):
        io.as_image(t * 2 - 1)
    with pytest.raises(io.ImageError, match="no pixels"):
        io.as_image(Image.new("RGB", (0, 0)))
    with pytest.raises(io.ImageError, match="no pixels"):
        io.as_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(TypeError, match="PIL image, a file path, a numpy array"):
        io.as_image(None)
    with pytest.raises(TypeError, match="file path"):
        io.load_image(Image.new("RGB", (4, 4)))


# --- Python API types -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image", "exc", "match"),
    [
        (None, TypeError, "image must be a PIL image"),
        ({"a": 1}, TypeError, "image must be a PIL image"),
        (np.zeros((0, 0, 3), np.uint8), io.ImageError, "no pixels"),
        ("/nonexistent/x.png", io.ImageError, "not found"),
    ],
)
def test_edit_checks_its_image(image, exc, match):
    from retouch.editing import edit

    with pytest.raises(exc, match=match):
        edit(tiny_backbone("sd"), image, EditConfig("a", "b", num_steps=1))


def test_edit_takes_arrays_tensors_and_paths(tmp_path):
    from retouch.editing import edit

    bb = tiny_backbone("sd")
    cfg = EditConfig("a", "b", num_steps=1, resolution="input")
    img = random_image(32, 32)
    ref = edit(bb, img, cfg).image
    img.save(tmp_path / "i.png")
    arr = np.array(img)
    for given in (arr, torch.from_numpy(arr).permute(2, 0, 1).float() / 255, str(tmp_path / "i.png")):
        assert np.array_equal(np.asarray(edit(bb, given, cfg).image), np.asarray(ref))


def test_edit_checks_backbone_and_config():
    from retouch.editing import edit

    with pytest.raises(TypeError, match="Backbone"):
        edit("shapes-sd", random_image(), EditConfig("a", "b"))
    with pytest.raises(TypeError, match=r"EditConfig\(\*\*d\)"):
        edit(tiny_backbone("sd"), random_image(), {"source_prompt": "a", "target_prompt": "b"})


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"seed": 2**64}, ValueError, r"2\*\*64"),
        ({"seed": -1}, ValueError, r"2\*\*64"),
        ({"seed": 1.5}, TypeError, "seed must be an integer"),
        ({"options": None}, TypeError, "options must be a mapping"),
        ({"inversion": {"name": "ddim"}}, TypeError, r"InversionConfig\(\*\*d\)"),
        ({"merge": 0.5}, TypeError, "MergeConfig"),
        ({"num_steps": True}, TypeError, "num_steps must be an integer"),
        ({"num_steps": "10"}, TypeError, "num_steps must be an integer"),
        ({"guidance": "7"}, TypeError, "guidance must be a number"),
        ({"method": None}, TypeError, "method must be a string"),
        ({"height": 64.0}, TypeError, "height must be an integer"),
        ({"resolution": "huge"}, ValueError, "unknown resolution"),
        ({"output_size": "big"}, ValueError, "unknown output_size"),
    ],
)
def test_edit_config_checks_every_field(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EditConfig("a", "b", **kwargs)


def test_sub_configs_check_types():
    with pytest.raises(TypeError, match="iterations must be an integer"):
        InversionConfig(iterations=2.5)
    with pytest.raises(TypeError, match="options must be a mapping"):
        InversionConfig(options=["gamma=1"])
    with pytest.raises(TypeError, match="random must be True or False"):
        MergeConfig(random="yes")
    assert EditConfig("a", "b", seed=2**64 - 1, num_steps=np.int64(3)).seed == 2**64 - 1


# --- typed options ------------------------------------------------------------------------------------------------
def test_editor_options_are_typed():
    from retouch.control.editors import get_editor
    from retouch.editing import check_inversion_options

    p2p = get_editor("p2p")
    p2p.check_options({"cross_steps": 0.4, "self_steps": 3, "blend_words": "cat dog", "reweight": {"dog": 2.0}})
    with pytest.raises(ValueError, match="option cross_steps of method 'p2p' must be a number, got list"):
        p2p.check_options({"cross_steps": [1, 2, 3]})
    with pytest.raises(ValueError, match="option reweight .* mapping"):
        p2p.check_options({"reweight": "dog"})
    with pytest.raises(ValueError, match="unknown option"):
        p2p.check_options({"crossteps": 0.4})
    with pytest.raises(ValueError, match="option add_source_offset .* true/false"):
        get_editor("p2p_zero").check_options({"add_source_offset": "yes"})
    check_inversion_options("rf_inversion", {"gamma": 0.5})
    with pytest.raises(ValueError, match="option gamma of inversion 'rf_inversion' must be a number, got str"):
        check_inversion_options("rf_inversion", {"gamma": "abc"})
    with pytest.raises(ValueError, match="unknown option"):
        check_inversion_options("ddim", {"gamma": 0.5})


def test_cli_option_types_fail_before_the_model_loads(tmp_path, image_file, capsys):
    args = _edit(str(image_file), "-s", "a", "-t", "b", "--model", str(tmp_path / "no-model"), "-o",
                 str(tmp_path / "o.png"), "--method", "direct+p2p", "--option", "cross_steps=[1,2,3]")  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--option" in err and "cross_steps" in err and "'<='" not in err


# --- outputs: never destroy, never half-write ------------------------------------------------------------------
def test_output_equal_to_input_is_refused(tmp_path, image_file, capsys):
    before = image_file.read_bytes()
    assert main(_edit(str(image_file), "-s", "a", "-t", "b", "-o", str(image_file))) == 1
    assert "is the input image" in capsys.readouterr().err
    link = tmp_path / "link.png"
    link.symlink_to(image_file)
    assert main(["invert", str(link), "-p", "a", "-o", str(image_file), "--no-progress"]) == 1
    assert "is the input image" in capsys.readouterr().err
    assert main(_edit(str(image_file), "-s", "a", "-t", "b", "-o", str(link))) == 1
    assert image_file.read_bytes() == before


@pytest.mark.parametrize("case", ["sidecar_is_dir", "output_parent_is_file", "attention_under_file"])
def test_unwritable_outputs_fail_before_the_model_loads(tmp_path, image_file, case, capsys):
    out = tmp_path / "o.png"
    extra: list[str] = []
    if case == "sidecar_is_dir":
        (tmp_path / "o.png.json").mkdir()
    elif case == "output_parent_is_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "o.png"
    else:
        (tmp_path / "f").write_text("x")
        extra = ["--save-attention", str(tmp_path / "f" / "maps")]
    # a model that does not exist: the checks must answer before anything tries to load it
    rc = main(_edit(str(image_file), "-s", "a", "-t", "b", "--model", str(tmp_path / "nomodel"), "-o", str(out),
                    *extra))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "nomodel" not in err
    assert not out.exists() or out.is_dir()
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("*.partial"))


def test_write_all_is_all_or_nothing(tmp_path, monkeypatch):
    old = tmp_path / "a.txt"
    old.write_text("old")

    def boom(p):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        io.write_all([(old, lambda p: p.write_text("new")), (tmp_path / "b.txt", boom)])
    assert old.read_text() == "old" and not (tmp_path / "b.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]

    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):  # the second destination's rename fails: the first is put back
        if str(dst).endswith("b.txt"):
            calls["n"] += 1
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", flaky)
    with pytest.raises(OSError, match="rename failed"):
        io.write_all([(old, lambda p: p.write_text("new")), (tmp_path / "b.txt", lambda p: p.write_text("b"))])
    monkeypatch.undo()
    assert calls["n"] == 1 and old.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    done: list[Path] = []
    io.write_all([(old, lambda p: p.write_text("new")), (tmp_path / "b.txt", lambda p: p.write_text("b"))], done)
    assert old.read_text() == "new" and done == [old, tmp_path / "b.txt"]
    assert oct(os.stat(old).st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_sidecar_failure_leaves_nothing(tmp_path, image_file, tiny_model_dir, monkeypatch, capsys):
    out = tmp_path / "o.png"
    real = io.json_writer

    def failing(obj):
        def write(p):
            real(obj)(p)
            raise KeyboardInterrupt  # an interrupt while the sidecar is written

        return write

    monkeypatch.setattr(io, "json_writer", failing)
    rc = main(_edit(str(image_file), "-s", "a", "-t", "b", "--model", str(tiny_model_dir), "--steps", "1",
                    "-o", str(out), "--save-attention", str(tmp_path / "maps")))  # fmt: skip
    assert rc == 130 and "no output written" in capsys.readouterr().err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [image_file]  # no image, sidecar, map or temporary


def test_ctrl_c_at_start_up_exits_cleanly(monkeypatch, capsys):
    import retouch.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["methods"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


# --- flags --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "banana"], "argument --device: unknown device 'banana'; this machine has: cpu"),
        (["--device", "meta:99"], "argument --device"),
        (["--threads", "0"], "argument --threads"),
        (["--threads", "100000"], "argument --threads"),
        (["--seed", str(2**64)], "argument --seed: must be in [0, 2**64)"),
        (["--seed", "-1"], "argument --seed"),
        (["--seed", "abc"], "argument --seed"),
        (["--steps", "0"], "argument --steps"),
        (["--guidance", "nan"], "argument --guidance"),
        (["--height", "-4"], "argument --height"),
        (["--merge-ratio", "2"], "argument --merge-ratio"),
        (["--max-memory", "0"], "argument --max-memory"),
        (["--resolution", "huge"], "argument --resolution"),
    ],
)
def test_flags_are_checked_where_parsed(image_file, flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(_edit(str(image_file), "-s", "a", "-t", "b", *flags))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unavailable_accelerator_names_what_the_machine_has(image_file, capsys):
    from retouch.cli import machine_devices

    if len(machine_devices()) > 1:
        pytest.skip("this machine has an accelerator")
    with pytest.raises(SystemExit):
        main(_edit(str(image_file), "-s", "a", "-t", "b", "--device", "cuda"))
    assert "is not available on this machine; it has: cpu" in capsys.readouterr().err


def test_threads_past_the_cores_are_capped_with_a_warning(monkeypatch, caplog):
    import retouch.cli as cli

    before = torch.get_num_threads()
    monkeypatch.setattr(cli, "cpu_cores", lambda: 2)
    try:
        with caplog.at_level("WARNING", logger="retouch"):
            cli._set_threads(64, "not-embedded")
        assert torch.get_num_threads() == 2
        assert "more than the 2 CPU cores" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    from retouch import __version__

    assert capsys.readouterr().out.strip() == f"retouch {__version__}"


# --- damaged models -------------------------------------------------------------------------------------------------
def test_pickled_weights_are_refused_unread(tmp_path, tiny_model_dir, image_file, capsys):
    from retouch.backbones import load_backbone

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    te = bad / "text_encoder"
    (te / "model.safetensors").unlink()
    (te / "pytorch_model.bin").write_bytes(b"\x80\x04 not even a pickle")  # never unpickled, only named
    with pytest.raises(ValueError, match=r"component 'text_encoder' has only pickled weights \(pytorch_model.bin\)"):
        load_backbone(str(bad))
    assert main(_edit(str(image_file), "-s", "a", "-t", "b", "--model", str(bad), "-o", str(tmp_path / "o.png"))) == 1
    err = capsys.readouterr().err
    assert "text_encoder" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_truncated_safetensors_names_the_component(tmp_path, tiny_model_dir):
    from retouch.backbones import load_backbone

    bad = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, bad)
    weights = next((bad / "unet").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"component 'unet': .* is truncated"):
        load_backbone(str(bad))
    (bad / "unet" / "config.json").write_text("{not json")
    weights.write_bytes(data)
    with pytest.raises(ValueError, match=r"component 'unet': config.json is not valid JSON"):
        load_backbone(str(bad))


# --- embedded vocabulary ----------------------------------------------------------------------------------------
def test_vocabulary_problems_name_the_words():
    from retouch.models.vocab import model_vocabulary, vocabulary_problems
    from retouch.worlds.captions import vocabulary

    vocab = vocabulary()
    ok = "a small red solid circle at the center on a plain gray background, flat style"
    assert vocabulary_problems([ok], vocab) == []
    problems = vocabulary_problems(["a red circle on a white background", "a banana"], vocab)
    assert problems[0] == "'banana'" and "white background" in problems[1]
    assert model_vocabulary("runwayml/stable-diffusion-v1-5") is None


def test_strict_refuses_unknown_words_before_loading(tmp_path, image_file, capsys):
    from retouch.models import registry

    if "shapes-flux" not in registry.embedded_names():
        pytest.skip("embedded models not installed")
    rc = main(_edit(str(image_file), "-s", "a red circle on a white background", "-t", "a blue circle on a white "
                    "background", "--model", "shapes-flux", "--strict", "-o", str(tmp_path / "o.png")))  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 1 and "white background" in err and "retouch models --vocab shapes-flux" in err
    assert main(["models", "--vocab", "shapes-flux", "--json"]) == 0
    assert "mint" in json.loads(capsys.readouterr().out)["vocabulary"]
    assert main(["models", "--vocab", str(tmp_path)]) == 1


def test_examples_are_in_the_vocabulary():
    from retouch.models.vocab import vocabulary_problems
    from retouch.worlds.captions import vocabulary

    examples = Path(__file__).parent.parent / "examples"
    prompts = [p.read_text() for p in sorted(examples.glob("*.txt"))]
    assert prompts and vocabulary_problems(prompts, vocabulary()) == []


# --- benchmarks -----------------------------------------------------------------------------------------------------
def test_bench_refuses_methods_the_family_cannot_run(tmp_path):
    from retouch.bench.runner import BenchConfig, BenchError, MethodSpec, run

    cfg = BenchConfig(suite="shapes", methods=MethodSpec.parse_list("dit4edit,direct+p2p"), out=str(tmp_path / "r"),
                      model="tiny-sd", cases=2, skip_learned=True)  # fmt: skip
    with pytest.raises(BenchError, match="dit4edit runs on pixart"):
        run(cfg, backbone=tiny_backbone("sd"))
    assert not (tmp_path / "r" / "results.jsonl").exists()


def test_bench_exit_status_counts_failures(tmp_path, tiny_model_dir, capsys):
    args = ["bench", "shapes", "--methods", "ddim+p2p", "--model", str(tiny_model_dir), "--cases", "2", "--steps",
            "1", "--skip-learned", "--no-images", "--no-progress", "--option", "blend_words=nothing here"]  # fmt: skip
    rc = main([*args, "--out", str(tmp_path / "all-failed")])
    assert rc == 1 and "all 2 rows failed" in capsys.readouterr().err


def test_bench_help_names_the_real_default_model(capsys):
    from retouch.models.registry import DEFAULT_MODEL

    with pytest.raises(SystemExit):
        main(["bench", "shapes", "--help"])
    assert f"(default: {DEFAULT_MODEL})" in capsys.readouterr().out


def test_repair_removes_undecodable_lines_and_keeps_a_copy(tmp_path):
    from retouch.bench.runner import ResultsLog

    path = tmp_path / "results.jsonl"
    good = json.dumps({"case_id": "c0", "method": "m"})
    path.write_text(f"{good}\n{{not json}}\n\xff garbage\n" + json.dumps({"case_id": "c1", "method": "m"}) + "\n")
    rows = ResultsLog(path).read(repair=True)
    assert [r["case_id"] for r in rows] == ["c0", "c1"]
    assert path.read_text().splitlines() == [good, json.dumps({"case_id": "c1", "method": "m"})]
    copies = list(tmp_path.glob("results.jsonl.bad-*"))
    assert len(copies) == 1 and "{not json}" in copies[0].read_text()


def test_api_warns_about_unknown_words_on_embedded_models(caplog):
    from retouch.editing import warn_vocabulary
    from retouch.models import registry

    if "shapes-flux" not in registry.embedded_names():
        pytest.skip("embedded models not installed")

    class Named:
        name = "shapes-flux"

    with caplog.at_level("WARNING"):
        assert warn_vocabulary(Named(), ["a red circle on a white background", "a blue circle"])
    assert "white background" in caplog.text and "retouch models --vocab shapes-flux" in caplog.text
    Named.name = "tiny-sd"
    assert warn_vocabulary(Named(), ["a banana"]) == []


# --- determinism across thread counts --------------------------------------------------------------------------
@pytest.mark.slow
def test_same_seed_is_byte_identical_whatever_the_thread_count():
    """oneDNN's CPU convolutions sum in an order that depends on the thread count (shapes-sd's images differed in
    a few pixels between 1 and 2 threads); edit() runs torch's own kernels by default and restores the flag."""
    from retouch.backbones import load_backbone
    from retouch.editing import edit
    from retouch.models import registry

    if "shapes-sd" not in registry.embedded_names():
        pytest.skip("embedded models not installed")
    bb = load_backbone("shapes-sd")
    examples = Path(__file__).parent.parent / "examples"
    img = Image.open(examples / "colour.png")
    source, target = ((examples / f"colour.{k}.txt").read_text().strip() for k in ("source", "target"))
    cfg = EditConfig(source, target, method="direct+p2p", num_steps=6)
    before = torch.get_num_threads()
    flag = torch.backends.mkldnn.enabled
    try:
        images = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            images.append(np.asarray(edit(bb, img, cfg).image))
        assert torch.backends.mkldnn.enabled == flag
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(images[0], images[1])
