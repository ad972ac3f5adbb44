"""Smoke test of ``benchmarks/scale.py`` on tiny versions of the four architectures (seconds, not a benchmark):
the script's core drives the real adapters over random denoisers and writes the JSON schema and README."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    path = ROOT / "benchmarks" / "scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_scale", None)


VARIANT_KEYS = {
    "name", "preset", "editor", "merge_ratio", "step", "seconds_per_nfe", "times_s", "peak_memory_bytes",
    "vs_plain", "batch_rows", "finite", "attention_calls", "materialised_calls", "merge",
}  # fmt: skip
OVERHEAD_KEYS = {
    "preset", "overhead", "routing_overhead", "run_overhead_bound", "worst_step", "num_steps", "active_steps",
    "layers_touched", "layers_materialised", "memory_ratio", "target", "met",
}  # fmt: skip


def _check_entry(entry: dict[str, Any], model: str, presets: list[str], ratio: float) -> None:
    assert entry["model"] == model and entry["device"] == "cpu" and entry["dtype"] == "float32"
    for key in ("size_hw", "image_tokens", "text_tokens", "blocks", "parameters", "load_average_start", "wall_s"):
        assert key in entry, key
    names = [v["name"] for v in entry["variants"]]
    assert names[:2] == ["plain", "routed"]
    assert set(presets) <= set(names) and f"merge{ratio:g}" in names
    for v in entry["variants"]:
        assert set(v) >= VARIANT_KEYS, VARIANT_KEYS - set(v)
        assert v["seconds_per_nfe"] > 0 and v["finite"]
        assert v["peak_memory_bytes"] is not None and v["peak_memory_bytes"] >= 0
    assert [o["preset"] for o in entry["overheads"]] == presets
    for o in entry["overheads"]:
        assert set(o) >= OVERHEAD_KEYS and o["overhead"] > 0 and 0 < o["active_steps"] <= o["num_steps"]
    merged = [m for m in entry["merging"] if m["preset"] is not None]
    assert [m["preset"] for m in merged] == presets
    for m in entry["merging"]:
        assert m["requested_ratio"] == ratio and m["applied_ratio"] == pytest.approx(ratio, abs=0.05)
        assert m["speedup"] > 0


@pytest.mark.parametrize(
    "model, presets",
    [
        ("tiny-sd", ["direct+p2p", "direct+masactrl"]),
        ("tiny-pixart", ["direct+p2p", "dit4edit"]),
        ("tiny-sd3", ["direct+p2p"]),
        ("tiny-flux", ["rf_solver"]),
    ],
)
def test_nfe_timing_writes_the_schema(scale, tmp_path, model, presets):
    written = scale.run_benchmark(
        [(model, (64, 64))], presets=presets, ratios=[0.75], nfe=1, warmup=0, isolate=False, results_dir=tmp_path
    )
    data = json.loads((tmp_path / f"scale_{model}.json").read_text())
    assert data == written[model]
    assert data["benchmark"] == "scale" and data["model"] == model
    for key in ("cpu_model", "cpu_count", "torch", "diffusers", "torch_threads", "device", "commit"):
        assert key in data["machine"], key
    (entry,) = data["entries"]
    _check_entry(entry, model, presets, 0.75)
    p2p = next((v for v in entry["variants"] if v["name"] == "direct+p2p"), None)
    if p2p is not None:  # P2P reads probabilities at its worst step (joint attention: only a block of them)
        assert p2p["materialised_calls"] + p2p["block_calls"] > 0
        if model in ("tiny-sd3", "tiny-flux"):
            assert p2p["materialised_calls"] == 0
    readme = (tmp_path / "README.md").read_text()
    assert f"`{model}`" in readme and "| plain |" in readme and "≤ 1.10" in readme


def test_edit_runs_and_merging_into_existing_results(scale, tmp_path):
    run = scale.EditRun.parse("tiny-pixart@64x128/ddim+p2p/s1,2/m0.5")
    assert (run.size, run.steps, run.merge, run.method) == ((64, 128), (1, 2), 0.5, "ddim+p2p")
    scale.run_benchmark([], [run], isolate=False, results_dir=tmp_path)
    first = json.loads((tmp_path / "scale_tiny-pixart.json").read_text())
    (er,) = first["edit_runs"]
    assert [r["num_steps"] for r in er["runs"]] == [1, 2]
    for r in er["runs"]:
        assert r["nfe"]["sampling"] == r["num_steps"] and r["peak_memory_bytes"] is not None
        assert r["merge"]["requested_ratio"] == 0.5
    assert er["summary"]["steps"] == [1, 2] and isinstance(er["summary"]["flat"], bool)
    # a second run of the same configuration replaces it; other results are kept
    scale.run_benchmark([("tiny-pixart", (64, 64))], [run], presets=["direct+masactrl"], ratios=[0.5],
                        nfe=1, warmup=0, isolate=False, results_dir=tmp_path)  # fmt: skip
    second = json.loads((tmp_path / "scale_tiny-pixart.json").read_text())
    assert len(second["edit_runs"]) == 1 and len(second["entries"]) == 1
    assert "Whole edits" in (tmp_path / "README.md").read_text()


def test_isolated_worker_round_trip(scale, tmp_path):
    job = {"kind": "edit", "model": "tiny-sd", "size": [64, 64], "method": "direct+masactrl", "num_steps": 1,
           "device": "cpu", "threads": 1}  # fmt: skip
    rec = scale.run_isolated(job, timeout=300)
    assert "error" not in rec, rec
    assert rec["model"] == "tiny-sd" and rec["nfe"]["total"] >= 2 and rec["max_rss_bytes"] > 0


def test_parsing_and_validation(scale):
    assert scale.parse_size("512") == (512, 512) and scale.parse_size("1024x2048") == (1024, 2048)
    with pytest.raises(ValueError, match="HxW"):
        scale.parse_size("big")
    flux = scale.MODELS["flux"]
    assert flux.parse_blocks("2:4", (512, 512)) == {"num_layers": 2, "num_single_layers": 4}
    assert flux.parse_blocks("full", (512, 512)) == {} and flux.full_blocks() == "19:38"
    with pytest.raises(ValueError, match="N:N"):
        flux.parse_blocks("3", (512, 512))
    with pytest.raises(ValueError, match="UNet"):
        scale.MODELS["sd15"].parse_blocks("2", (512, 512))
    assert scale.MODELS["pixart"].parse_blocks(None, (1024, 2048)) == {"num_layers": 1}
    assert scale._parse_blocks(["4", "flux=1:2"]) == {"*": "4", "flux": "1:2"}
    with pytest.raises(ValueError, match="MODEL@HxW"):
        scale.EditRun.parse("pixart/ddim+p2p")
    summary = scale.summarise_steps([{"num_steps": 2, "peak_memory_bytes": 100 << 20},
                                     {"num_steps": 8, "peak_memory_bytes": 300 << 20}])  # fmt: skip
    assert (
        summary["growth"] == pytest.approx(3.0)
        and summary["flat"] is False
        and summary["growth_last"] == pytest.approx(3.0)
    )


def test_published_configs_are_the_real_sizes(scale):
    """The typed-in configs carry the published widths and depths (no model is built here)."""
    m = scale.MODELS
    assert m["sd15"].config["block_out_channels"] == (320, 640, 1280, 1280)
    assert m["sd15"].config["cross_attention_dim"] == 768
    px = m["pixart"].config
    assert (px["num_layers"], px["num_attention_heads"] * px["attention_head_dim"], px["caption_channels"]) == (
        28, 1152, 4096,
    )  # fmt: skip
    sd3 = m["sd3"].config
    assert (sd3["num_layers"], sd3["num_attention_heads"] * sd3["attention_head_dim"]) == (24, 1536)
    assert (sd3["joint_attention_dim"], sd3["pooled_projection_dim"], sd3["pos_embed_max_size"]) == (4096, 2048, 192)
    fx = m["flux"].config
    assert (fx["num_attention_heads"] * fx["attention_head_dim"], fx["num_layers"], fx["num_single_layers"]) == (
        3072, 19, 38,
    )  # fmt: skip
