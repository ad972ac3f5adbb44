"""The benchmark runner: output files and keys, kill-and-resume, shards + merge, determinism, CLI."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from retouch.bench import runner
from retouch.bench.cli import add_bench_parser, config_from_args, main
from retouch.bench.runner import TIMING_KEYS, BenchConfig, BenchError, MethodSpec, ResultsLog, merge, run
from retouch.bench.shapes import oracle_metrics, scene_facts, shapes_cases, split_specs
from retouch.worlds import make_edit_case

from conftest import tiny_backbone

METHODS = "ddim+p2p,ddim+masactrl"
SUMMARY_KEYS = ("structure_distance", "psnr_bg", "lpips_bg", "mse_bg", "ssim_bg", "clip_whole", "clip_edited",
                "edit_success", "gt_psnr", "seconds", "nfe")  # fmt: skip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel folder standing in for shapes-clip (the tests must not depend on it)."""
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
    return str(path)


@pytest.fixture(scope="module")
def sd():
    """The tiny SD backbone, run on one thread (tiny ops lose to thread contention on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tiny_backbone("sd")
    finally:
        torch.set_num_threads(threads)


CLIP_DIR: list[str] = []


def _cfg(out, **kw) -> BenchConfig:
    base = {"suite": "shapes", "methods": MethodSpec.parse_list(METHODS), "out": str(out), "cases": 4, "steps": 2,
            "model": "tiny-sd", "clip_model": CLIP_DIR[0] if CLIP_DIR else None}  # fmt: skip
    return BenchConfig(**{**base, **kw})


def _stable(rows):
    """Rows keyed by (case, method) without the fields that vary between identical runs."""
    return {(r["case_id"], r["method"]): {k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows}


@pytest.fixture(scope="module")
def single(sd, clip_dir, tmp_path_factory):
    CLIP_DIR[:] = [clip_dir]
    out = tmp_path_factory.mktemp("bench") / "single"
    run(_cfg(out), backbone=sd)
    return out


def test_run_writes_the_three_files_with_the_named_keys(single):
    rows = [json.loads(line) for line in (single / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and len({(r["case_id"], r["method"]) for r in rows}) == 8
    for r in rows:
        assert r["error"] is None
        for k in ("case_id", "method", "type_id", "seed", "seconds", "nfe", "metrics"):
            assert k in r
        assert r["nfe"] == 4 and r["seconds"] > 0
        assert set(SUMMARY_KEYS) - {"seconds", "nfe"} <= set(r["metrics"])
        assert r["metrics"]["edit_success"] in (0.0, 1.0) and r["metrics"]["gt_psnr"] > 0
        assert r["metrics"]["oracle_source_ok"] == 1.0
        assert (single / r["images"]["edit"]).is_file() and (single / r["images"]["gt"]).is_file()
    assert sorted({r["type_id"] for r in rows}) == [0, 1, 2, 3]
    p2p = [r for r in rows if r["method"] == "ddim+p2p"]
    assert any(r["options"].get("blend_words") for r in p2p)  # PIE's blended word feeds P2P's local blend
    summary = json.loads((single / "summary.json").read_text())
    for label in ("ddim+p2p", "ddim+masactrl"):
        m = summary["methods"][label]
        assert set(SUMMARY_KEYS) <= set(m["metrics"])
        assert m["metrics"]["nfe"] == 4 and m["metrics"]["psnr_bg"] is not None
        assert m["metrics"]["lpips_bg"] is None and "--lpips" in m["missing"]["lpips_bg"]  # hub weights: off
        for key in ("clip_whole", "clip_edited", "structure_distance"):  # CLIP folder given: computed
            assert m["metrics"][key] is not None
        assert set(m["by_type"]) == {"0", "1", "2", "3"}
        assert set(SUMMARY_KEYS) <= set(m["by_type"]["1"]["metrics"])
    page = (single / "report.html").read_text()
    assert "<svg" in page and "<img" in page and "ddim+masactrl" in page


def test_kill_and_resume(sd, single, tmp_path):
    """A subset of rows plus a half-written line: the re-run completes the set, no duplicate, same rows."""
    out = tmp_path / "resumed"
    shutil.copytree(single, out)
    lines = (single / "results.jsonl").read_bytes().splitlines(keepends=True)
    (out / "results.jsonl").write_bytes(b"".join(lines[:3]) + lines[3][:57])  # killed in the middle of row 4
    (out / "summary.json").unlink()
    run(_cfg(out), backbone=sd)
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]  # every line is complete JSON
    assert len(rows) == 8
    original = ResultsLog(single / "results.jsonl").read()
    assert _stable(rows) == _stable(original)
    assert [r["seconds"] for r in rows[:3]] == [r["seconds"] for r in original[:3]]  # finished rows kept, not rerun
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_rows"] == 8


def test_shards_merge_to_the_single_run(sd, single, tmp_path):
    out = tmp_path / "sharded"
    first = run(_cfg(out, shard=(0, 2)), backbone=sd)
    assert first == out / "shard-0-of-2" and not (out / "results.jsonl").exists()
    assert run(_cfg(out, shard=(1, 2)), backbone=sd) == out  # the last shard merges
    merged = ResultsLog(out / "results.jsonl").read()
    assert len(merged) == 8
    assert _stable(merged) == _stable(ResultsLog(single / "results.jsonl").read())  # deterministic, no duplicates
    assert all((out / r["images"]["edit"]).is_file() for r in merged)
    # merging again (and merging overlapping folders) adds nothing
    again = merge([out / "shard-0-of-2", out / "shard-1-of-2", single], tmp_path / "again")
    assert _stable(ResultsLog(again / "results.jsonl").read()) == _stable(merged)
    s1 = json.loads((single / "summary.json").read_text())["methods"]
    s2 = json.loads((again / "summary.json").read_text())["methods"]
    for label in s1:
        for k in SUMMARY_KEYS:
            if k != "seconds":
                assert s1[label]["metrics"][k] == s2[label]["metrics"][k]


def test_results_log_repairs_and_deduplicates(tmp_path):
    log = ResultsLog(tmp_path / "r.jsonl")
    log.append({"case_id": "a", "method": "m", "v": 1})
    log.append({"case_id": "a", "method": "m", "v": 2})
    log.append({"case_id": "b", "method": "m", "v": float("nan")})
    with open(log.path, "ab") as f:
        f.write(b'{"case_id": "c", "meth')
    rows = log.read(repair=True)
    assert [(r["case_id"], r.get("v")) for r in rows] == [("a", 1), ("b", None)]
    assert log.path.read_bytes().endswith(b"\n")


def test_a_folder_of_another_run_is_refused(single):
    with pytest.raises(BenchError, match="different run"):
        run(_cfg(single, steps=3), backbone=object())


def test_method_spec_merge_ratio_applies_token_merging(sd, clip_dir, tmp_path):
    specs = (MethodSpec("ddim+masactrl", label="plain"), MethodSpec("ddim+masactrl", label="m50", merge_ratio=0.5))
    run(_cfg(tmp_path / "m", methods=specs, cases=1, types=(6,), clip_model=clip_dir), backbone=sd)
    rows = {r["method"]: r for r in map(json.loads, (tmp_path / "m" / "results.jsonl").read_text().splitlines())}
    assert rows["plain"]["merge"] is None and rows["plain"]["error"] is None
    assert (
        rows["m50"]["error"] is None
        and rows["m50"]["merge"]["requested_ratio"] == 0.5
        and rows["m50"]["merge"]["merged_calls"] > 0
    )
    with pytest.raises(BenchError, match="merge_ratio"):
        MethodSpec("ddim+p2p", merge_ratio=0.99)


def test_bad_configs_fail_early(tmp_path):
    with pytest.raises(BenchError, match="unknown method"):
        run(_cfg(tmp_path, methods=(MethodSpec("nope"),)), backbone=object())
    with pytest.raises(BenchError, match="does not take option"):
        run(_cfg(tmp_path, options={"bogus": 1}), backbone=object())
    with pytest.raises(BenchError, match="--data"):
        BenchConfig(suite="pie", methods=(MethodSpec("ddim+p2p"),), out=str(tmp_path))


def test_shapes_splits_are_balanced_and_seeded():
    specs = split_specs(0, 20)
    assert [t for t, _ in specs] == list(range(10)) * 2
    assert {s for _, s in specs} == {0, 1}
    assert {s for _, s in split_specs(3, 10)} == {3_000_000}
    cases = shapes_cases(0, 12)
    assert [c.case_id for c in cases] == [c.case_id for c in shapes_cases(0, 12)]
    assert cases[0].case_id != shapes_cases(1, 1)[0].case_id
    data = cases[5].load()
    assert data.mask[0].all() and data.gt_image.shape == (64, 64, 3)  # PIE's border rule applies


def test_oracle_metrics_on_exact_and_wrong_edits():
    case = make_edit_case(6, 0)  # colour change
    assert oracle_metrics(case.target_image, case.source_scene, case.target_scene) == {
        "edit_success": 1.0, "edit_applied": 1.0, "edit_preserved": 1.0,
    }  # fmt: skip
    unchanged = oracle_metrics(case.source_image, case.source_scene, case.target_scene)
    assert unchanged == {"edit_success": 0.0, "edit_applied": 0.0, "edit_preserved": 1.0}
    assert scene_facts(case.source_scene) != scene_facts(case.target_scene)


def test_pie_suite_runs_on_a_pie_folder(sd, tmp_path):
    from retouch.bench.shapes import export_split

    data = tmp_path / "pie"
    export_split(data, seed=2, n=2)
    out = tmp_path / "pie-run"
    cfg = BenchConfig(suite="pie", methods=(MethodSpec("ddim+p2p"),), out=str(out), data=str(data), steps=2,
                      skip_learned=True, model="tiny-sd")  # fmt: skip
    run(cfg, backbone=sd)
    rows = ResultsLog(out / "results.jsonl").read()
    assert len(rows) == 2 and all(r["suite"] == "pie" for r in rows)
    for r in rows:
        assert r["metrics"]["structure_distance"] is None and "skip-learned" in r["notes"]["structure_distance"]
        assert r["metrics"]["gt_psnr"] is not None  # exported ShapesBench folders carry their ground truth
        assert r["metrics"]["edit_success"] is None


def test_cli_parses_and_runs(sd, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "shapes", "--methods", METHODS, "--out", "o", "--cases", "5", "--shard",
                              "1/3", "--types", "6,2", "--option", "cross_steps=0.5", "--model", "m"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.shard, cfg.types, dict(cfg.options), cfg.cases) == ((1, 3), (2, 6), {"cross_steps": 0.5}, 5)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device is checked against the machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = parser.parse_args(["bench", "shapes", "--methods", "ddim+p2p", "--out", "o", "--shard", "auto",
                              "--device", "cuda", "--model", "m"])  # fmt: skip
    cfg = config_from_args(args)
    assert cfg.shard == (2, 4) and cfg.device == "cuda:1"

    monkeypatch.setattr(runner, "_load_backbone", lambda cfg: sd)
    out = tmp_path / "cli"
    argv = ["shapes", "--methods", "ddim+masactrl", "--cases", "1", "--steps", "2", "--out", str(out), "--model",
            "tiny-sd", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "ddim+masactrl" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "summary.json", "report.html"}
    assert main(["merge", str(out), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["report", str(out), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| method | rows | errors |" in md and "| ddim+masactrl | 1 | 0 |" in md
    assert main(["shapes", "--methods", "nope", "--out", str(out), "--model", "x"]) == 1
    assert "unknown method" in capsys.readouterr().err


def test_edit_at_another_size_is_resized_back(sd, tmp_path):
    """A size the model cannot take (72 px; it works at a multiple of 16): the edit comes back at the source size."""
    data = tmp_path / "pie"
    data.mkdir()
    img = np.asarray(Image.fromarray(make_edit_case(6, 1).source_image).resize((72, 72)))
    (data / "annotation_images").mkdir()
    Image.fromarray(img).save(data / "annotation_images" / "a.png")
    item = {"image_path": "a.png", "original_prompt": "a red circle", "editing_prompt": "a [blue] circle",
            "editing_type_id": "6", "blended_word": "circle circle", "mask": [0, 400]}  # fmt: skip
    (data / "mapping_file.json").write_text(json.dumps({"600000000009": item}))
    out = tmp_path / "o"
    cfg = BenchConfig(suite="pie", methods=(MethodSpec("ddim+masactrl"),), out=str(out), data=str(data), steps=1,
                      skip_learned=True, model="tiny-sd")  # fmt: skip
    run(cfg, backbone=sd)
    (row,) = ResultsLog(out / "results.jsonl").read()
    # edit() returns the image at the input's size (it worked at the model's native size)
    assert row["error"] is None and row["metrics"]["psnr_bg"] is not None and not row["resized_for_metrics"]
    assert Image.open(out / row["images"]["edit"]).size == (72, 72)
