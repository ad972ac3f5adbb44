"""The app's engine side on tiny models (no browser): cancellation, forms, uploads, the same edit as the engine.

The served app (gradio) is checked through gradio's client in test_app_server.py and in a real browser in
test_app_browser.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from retouch.app.service import (
    FILE_OPTIONS,
    AppConfig,
    CancelBoard,
    EditorService,
    EditRequest,
    UploadError,
    prompt_diff,
)
from retouch.cli import methods_info
from retouch.config import EditConfig
from retouch.editing import Cancelled, edit, resolve

from conftest import random_image, tiny_backbone


def _processors(bb) -> dict:
    return dict(bb.denoiser.attn_processors)


@pytest.mark.parametrize("family", ["sd", "flux"])
def test_progress_callback_cancels_between_steps_and_leaves_the_model_restored(family):
    bb = tiny_backbone(family)
    image = random_image()
    cfg = EditConfig("a red circle", "a blue circle", method="p2p", num_steps=4, seed=3)
    reference = np.asarray(edit(bb, image, cfg).image)
    before = _processors(bb)
    calls: list[tuple[str, int]] = []

    def progress(phase: str, done: int, total: int) -> None:
        calls.append((phase, done))
        if phase == "sample" and done == 2:
            raise Cancelled("stop")

    with pytest.raises(Cancelled, match="stop"):
        edit(bb, image, cfg, progress=progress)
    assert calls[-1] == ("sample", 2)  # nothing ran after the cancelled step
    assert ("invert", 4) in calls  # the inversion reported its steps first
    after = _processors(bb)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    # the shared model runs the next edit exactly as before
    assert np.array_equal(np.asarray(edit(bb, image, cfg).image), reference)


@pytest.fixture
def service(tmp_path):
    return EditorService(tiny_backbone("sd"), AppConfig(workdir=str(tmp_path / "wd")), model_name="tiny-sd")


@pytest.fixture
def image_file(tmp_path):
    p = tmp_path / "in.png"
    random_image(32, 32, seed=1).save(p)
    return str(p)


def test_method_menu_is_the_registry_filtered_by_family(service):
    info = methods_info()
    expected = {name for name, fams in info["matrix"].items() if fams["sd"]}
    names = [m.name for m in service.methods()]
    assert set(names) == expected and len(names) == len(set(names))
    assert "rf_inversion" not in names and "direct+p2p" in names
    assert all(m.description for m in service.methods())
    with pytest.raises(ValueError, match="not available for the sd family"):
        service.check_method("rf_inversion")


def test_method_defaults_are_the_engines(service):
    d = service.method_defaults("ddim+p2p")
    res = resolve(service.backbone, EditConfig("a", "a", method="ddim+p2p"))
    assert (d.steps, d.guidance, d.inversion) == (res.num_steps, res.guidance, res.inversion)
    # the preset's PIE-Bench settings (cross 0.4) over the editor's own defaults (blend threshold 0.3)
    assert d.options["cross_steps"] == 0.4 and d.options["blend_threshold"] == 0.3
    assert "cross_steps=0.4" in d.options_text().splitlines()
    preset = service.method_defaults("direct+pnp").options
    assert preset["feature_steps"] == 0.8 and preset["attn_steps"] == 0.5
    assert not FILE_OPTIONS & service.method_defaults("disentangle").options.keys()


def _req(image, **kw) -> EditRequest:
    base = dict(image=image, source="a red circle", target="a blue circle", method="ddim+p2p", steps=3)
    return EditRequest(**{**base, **kw})


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"source": "  "}, "source prompt is empty"),
        ({"target": ""}, "target prompt is empty"),
        ({"method": "rf_inversion"}, "not available for the sd family"),
        ({"method": "nonsense"}, "not available"),
        ({"options": "cross_steps=abc"}, "option cross_steps: expected a number"),
        ({"options": "blend_threshold"}, "expects KEY=VALUE"),
        ({"options": "weights=/etc/passwd"}, "read or write files"),
        ({"options": "save_to=/tmp/x"}, "read or write files"),
        ({"steps": 2.5}, "steps must be a whole number"),
        ({"steps": 0}, "num_steps must be an integer in"),
        ({"guidance": -1.0}, "guidance must be a finite number"),
        ({"seed": -4}, r"seed must be in \[0, 2\*\*64\)"),
        ({"inversion": "flow_euler"}, "does not apply to sd"),
        ({"merge_ratio": 0.99}, "merge ratio must be in"),
    ],
)
def test_bad_form_values_are_clear_errors(service, image_file, changes, message):
    with pytest.raises(ValueError, match=message):
        service.build_config(_req(image_file, **changes))


def test_options_pass_only_what_differs_from_the_defaults(service, image_file):
    text = service.method_defaults("ddim+p2p").options_text() + "\nblend_words=circle circle\n# a comment\n"
    cfg = service.build_config(_req(image_file, options=text))
    assert dict(cfg.options) == {"blend_words": "circle circle"}


def test_uploads_are_read_within_limits(tmp_path, image_file):
    small = EditorService(
        tiny_backbone("sd"), AppConfig(workdir=str(tmp_path / "wd"), max_pixels=500, max_upload_bytes=10_000)
    )
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG not really" * 20)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(Path(image_file).read_bytes()[:200])
    big = tmp_path / "big.bin"
    big.write_bytes(b"0" * 20_000)
    with pytest.raises(UploadError, match="not an image this server can decode"):
        small.read_upload(str(garbage))
    with pytest.raises(UploadError, match="corrupt or truncated"):
        EditorService(tiny_backbone("sd"), AppConfig(workdir=str(tmp_path / "wd"))).read_upload(str(truncated))
    with pytest.raises(UploadError, match="at most 0.0 MiB"):
        small.read_upload(str(big))
    with pytest.raises(UploadError, match="32x32 pixels; this server takes at most 500"):
        small.read_upload(image_file)
    with pytest.raises(UploadError, match="no input image"):
        small.read_upload(None)
    with pytest.raises(UploadError, match="no longer on the server"):
        small.read_upload(str(tmp_path / "gone.png"))


def test_a_run_is_the_engines_edit_and_writes_inside_the_workdir(service, image_file):
    req = _req(image_file, options="blend_words=circle circle", seed=5)
    out = service.run(req)
    cfg = EditConfig("a red circle", "a blue circle", method="ddim+p2p", num_steps=3, seed=5,
                     options={"blend_words": "circle circle"})  # fmt: skip
    from retouch.io import load_image

    direct = edit(service.backbone, load_image(image_file), cfg, record_attention=True)
    assert np.array_equal(np.asarray(load_image(out.output)), np.asarray(direct.image))
    sidecar = json.loads(out.sidecar.read_text())
    assert sidecar["config"] == direct.report["config"] and sidecar["nfe"] == direct.report["nfe"]
    assert sidecar["app"]["settings"]["target"] == "a blue circle"
    workdir = service.workdir
    for p in (out.output, out.sidecar, out.input, out.reconstruction, *(p for p, _ in out.attention)):
        assert p.is_file() and p.resolve().is_relative_to(workdir)
    assert {c.split(": ")[0] for _, c in out.attention} == {"source", "target"}
    assert "NFE 3 inversion + 3 sampling = 6" in out.summary()

    rec = service.run(req, reconstruct=True)
    assert rec.kind == "reconstruct" and rec.psnr is not None and np.isfinite(rec.psnr)
    assert json.loads(rec.sidecar.read_text())["config"]["method"] == "identity"


def test_a_cancelled_run_frees_the_model(service, image_file):
    def cancel(phase, done, total):
        if phase == "sample":
            raise Cancelled("pressed")

    with pytest.raises(Cancelled):
        service.run(_req(image_file), progress=cancel)
    assert not service._run_lock.locked()
    assert service.run(_req(image_file)).output.is_file()
    assert len(list(service.edits_dir.iterdir())) == 1  # the cancelled run wrote nothing


def test_old_results_are_pruned(tmp_path, image_file):
    svc = EditorService(tiny_backbone("sd"), AppConfig(workdir=str(tmp_path / "wd"), keep_edits=2))
    for seed in range(3):
        svc.run(_req(image_file, seed=seed, attention=False))
    assert len(list(svc.edits_dir.iterdir())) == 2


def test_cancel_board_cancels_only_runs_submitted_before_the_press():
    board = CancelBoard(memory_s=10.0)
    board.press("tab-a", now=100.0)
    assert board.cancelled("tab-a", submitted=99.0)
    assert not board.cancelled("tab-a", submitted=100.5)  # submitted after the press
    assert not board.cancelled("tab-b", submitted=99.0)  # another user's run
    board.press("tab-b", now=200.0)
    assert len(board) == 1  # tab-a's old press was forgotten


def test_prompt_diff_marks_changed_and_added_words():
    assert prompt_diff("a red circle", "a blue circle") == [("a ", None), ("blue ", "changed"), ("circle ", None)]
    assert prompt_diff("a circle", "a big circle")[1] == ("big ", "added")


def test_examples_are_copied_into_the_workdir(service):
    examples = service.examples()
    assert len(examples) == 4
    for e in examples:
        assert e["source"] and e["target"]
        assert Path(e["image"]).is_file() and service.workdir in Path(e["image"]).parents


def test_new_scenes_are_only_for_embedded_models(service):
    with pytest.raises(ValueError, match="embedded ShapesWorld models"):
        service.new_scene(0)


def test_a_new_scene_is_rendered_at_the_models_size_and_captioned(tmp_path):
    from PIL import Image

    from retouch.worlds import captions, oracle

    # a tiny backbone under an embedded model's name: the scene follows that model's world (1-3 objects)
    svc = EditorService(tiny_backbone("flux"), AppConfig(workdir=str(tmp_path / "wd")), model_name="shapes-flux")
    path, caption = svc.new_scene(7)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (64, 64, 3) and Path(path).parent == svc.scenes_dir
    assert svc.new_scene(7) == (path, caption)  # the seed decides everything
    parsed = oracle.parse(img)
    words = set(captions.tokenize(caption))
    assert 1 <= len(parsed.objects) <= 3
    for obj in parsed.objects:  # the caption names what the oracle reads back from the pixels
        assert {obj.shape, obj.colour, obj.size} <= words, (caption, obj)


def test_app_config_is_validated():
    with pytest.raises(ValueError, match="port"):
        AppConfig(port=70000)
    with pytest.raises(ValueError, match="queue size"):
        AppConfig(queue_size=0)
    with pytest.raises(ValueError, match="max pixels"):
        AppConfig(max_pixels=-1)


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--port", "70000"], "port must be in"), (["--queue-size", "0"], "queue size must be a positive integer")],
)
def test_app_command_refuses_bad_settings_before_loading_anything(capsys, args, message):
    from retouch.cli import main

    assert main(["app", *args]) == 1
    assert message in capsys.readouterr().err
