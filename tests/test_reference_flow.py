"""Golden-output parity with the flow references' own code, on the embedded shapes-flux model.

The fixtures under ``tests/fixtures/reference/<name>/`` were written by ``benchmarks/reference/<name>.py`` running
the reference's code (at the commit in ``settings.json``, with the plumbing patch listed there) on shapes-flux. Here
retouch's reference-mode presets run on the same inputs and must give the same numbers.

Tolerance: ``ATOL = 1e-4`` on latents whose entries reach about 5. Both sides run the same float32 arithmetic in a
different order (BFL's fused ``qkv`` and its own RoPE vs diffusers' attention; FlowEdit's two batch-1 calls vs our one
batch-2 call; step sizes in Python floats vs a float32 grid; ``1 - s`` / ``s`` round trips in the velocity). Measured
differences are 2e-7 to 1.1e-5 (docs/methods.md); the tolerance leaves a 10x margin and is 4-5 orders of magnitude
below the departures the tests also measure (a different inversion schedule, no value replay), so it cannot hide
an algorithmic difference.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402

from retouch.backbones.flux import pack  # noqa: E402
from retouch.bench.shapes import shapes_cases  # noqa: E402
from retouch.config import EditConfig  # noqa: E402
from retouch.editing import GuidedModel, edit  # noqa: E402

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
ATOL = 1e-4


def _settings(name: str) -> dict:
    return json.loads((FIXTURES / name / "settings.json").read_text())


def _fixture(name: str, case_id: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(FIXTURES / name / f"{case_id}.safetensors"))


def _case_ids(name: str) -> list[str]:
    return [c["case_id"] for c in _settings(name)["cases"]]


@pytest.fixture(scope="module")
def flux():
    from retouch.backbones import load_backbone

    return load_backbone("shapes-flux", device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def cases():
    return {c.case_id: c for c in shapes_cases(0, 10)}


def _source(cases, case_id: str) -> Image.Image:
    return Image.fromarray(cases[case_id].load().source_image)


def _config(name: str, case_id: str, method: str, seed: int = 0, **options) -> EditConfig:
    c = next(c for c in _settings(name)["cases"] if c["case_id"] == case_id)
    return EditConfig(c["source_prompt"], c["target_prompt"], method=method, seed=seed, options=options)


class _Inputs:
    """Records the transformer's packed input at every call (a forward pre-hook; changes nothing)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.seen: list[torch.Tensor] = []
        self.h = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs) -> None:
        self.seen.append(kwargs["hidden_states"].detach().clone())

    def __enter__(self) -> _Inputs:
        return self

    def __exit__(self, *exc) -> None:
        self.h.remove()


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def _replay(fx: dict[str, torch.Tensor]):
    draws = iter([fx[f"noise.{k}"] for k in range(len(fx)) if f"noise.{k}" in fx])

    def noise(shape):
        out = next(draws)
        assert tuple(out.shape) == tuple(shape)
        return out.clone()

    return noise


def _image_maxdiff(result, fx) -> int:
    return int(np.abs(np.asarray(result.image).astype(int) - fx["image"].numpy().astype(int)).max())


# --- FlowEdit (fallenshock/FlowEdit, FlowEditFLUX with FLUX_exp.yaml) ------------------------------------------


@pytest.mark.parametrize("case_id", _case_ids("flowedit"))
def test_flowedit_matches_reference_from_the_image(flux, cases, case_id):
    """retouch's ``flowedit`` preset, from the image and its own seeded generator (seed 10, as FLUX_exp.yaml): the
    same encoding (posterior mode), the same noise (drawn in the packed layout), the same ODE."""
    fx = _fixture("flowedit", case_id)
    s = _settings("flowedit")["settings"]
    with _Inputs(flux.denoiser) as rec:
        res = edit(flux, _source(cases, case_id), _config("flowedit", case_id, "flowedit", seed=s["seed"]),
                   keep_latents=True)  # fmt: skip
    assert _maxdiff(res.latents[:1], fx["init_latent"]) < ATOL
    assert _maxdiff(res.latents[1:], fx["final_latent"]) < ATOL
    assert _image_maxdiff(res, fx) <= 1
    # departure: one batch of [source, target] per step where the reference makes two calls of one
    assert len(rec.seen) == s["n_max"] and all(x.shape[0] == 2 for x in rec.seen)


def test_flowedit_noise_and_trace(flux, cases):
    """The seeded packed draws are the reference's noise, and the edit latent follows its trace step by step."""
    from retouch.flowedit import flowedit

    name = "flowedit"
    case_id = _case_ids(name)[0]
    fx = _fixture(name, case_id)
    s = _settings(name)["settings"]
    g = torch.Generator().manual_seed(s["seed"])
    for k in range(s["n_max"]):
        assert torch.equal(flux.randn_latent(fx["init_latent"].shape, g), fx[f"noise.{k}"])
    cfg = _config(name, case_id, "flowedit")
    conds = [flux.encode_prompt([p], guidance=gs) for p, gs in
             ((cfg.source_prompt, s["src_guidance_scale"]), (cfg.target_prompt, s["tar_guidance_scale"]))]  # fmt: skip
    from retouch.types import Conditioning

    grid = flux.grid("flow", s["T_steps"], (16, 16))
    model = GuidedModel(flux, grid, Conditioning.cat(conds), None, 1.0)
    trace: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        flowedit(model, fx["init_latent"], grid, _replay(fx), n_max=s["n_max"], n_avg=s["n_avg"],
                 on_step=lambda i, z: trace.__setitem__(i, z.clone()))  # fmt: skip
    steps = [int(k.split(".")[1]) for k in fx if k.startswith("trace.")]
    assert steps
    for i in steps:
        assert _maxdiff(trace[i], fx[f"trace.{i}"]) < ATOL, i


# --- RF-Inversion (diffusers community pipeline_flux_rf_inversion.py) -------------------------------------------


@pytest.mark.parametrize("case_id", _case_ids("rf_inversion"))
def test_rf_inversion_ref_matches_community_pipeline(flux, cases, case_id):
    """``rf_inversion_ref`` from the image, seeded as the pipeline (its VAE posterior sample, then ``y_1`` in the
    packed layout, from one generator): every transformer input on the way, the inverted noise and the edit agree;
    56 calls of one item, as the pipeline."""
    fx = _fixture("rf_inversion", case_id)
    st = _settings("rf_inversion")
    keep = st["keep_evals"]
    with _Inputs(flux.denoiser) as rec:
        res = edit(flux, _source(cases, case_id), _config("rf_inversion", case_id, "rf_inversion_ref",
                   seed=st["settings"]["seed"]), keep_latents=True)  # fmt: skip
    assert len(rec.seen) == 56 and all(x.shape[0] == 1 for x in rec.seen)
    for k in keep:
        assert _maxdiff(rec.seen[k], fx[f"eval.{k}"]) < ATOL, k
    assert _maxdiff(res.trajectory.noise, fx["inverted"]) < ATOL
    assert _maxdiff(res.trajectory.latents[-1], fx["init_latent"]) < ATOL
    assert _maxdiff(res.latents, fx["final_latent"]) < ATOL
    assert res.reconstruction is None and res.report["source_branch"] is False
    assert _image_maxdiff(res, fx) <= 1


def test_rf_inversion_from_the_references_latent_and_noise(flux, cases):
    """The same with the pipeline's latent and ``y_1`` handed in (``latent=`` / ``noise=``), for the other two cases."""
    for case_id in _case_ids("rf_inversion")[1:]:
        fx = _fixture("rf_inversion", case_id)
        res = edit(flux, _source(cases, case_id), _config("rf_inversion", case_id, "rf_inversion_ref"),
                   latent=fx["init_latent"], noise=_replay(fx), keep_latents=True)  # fmt: skip
        assert _maxdiff(res.latents, fx["final_latent"]) < ATOL


def test_posterior_mean_departure(flux, cases):
    """retouch's other presets encode with the posterior *mean*; these references sample it (``posterior="sample"``
    in the reference-mode presets). Measured on the three fixtures: the latent moves by 0.27-0.52 (entries reach
    about 5), and the RF-Inversion edit (whose ``y_1`` is then the generator's first draw) lands 1.1-1.9 away, image
    PSNR 27-33 dB against the reference's; RF-Solver-Edit / FireFlow edits 0.26-0.36 away, 41-49 dB."""
    case_id = _case_ids("rf_inversion")[0]
    fx = _fixture("rf_inversion", case_id)
    cfg = _config("rf_inversion", case_id, "rf_inversion_ref")
    mean = cfg.with_(inversion=cfg.inversion.__class__(options={"posterior": "mean"}))
    res = edit(flux, _source(cases, case_id), mean, keep_latents=True)
    assert _maxdiff(res.trajectory.latents[-1], fx["init_latent"]) > 0.1
    assert _maxdiff(res.latents, fx["final_latent"]) > 0.1


def test_rf_inversion_grid_schedule_departure(flux, cases):
    """retouch's default ``rf_inversion`` evaluates the forward ODE at the grid's sigmas (the community pipeline at
    i/29 with mismatched gaps): from the same latent and noise its inverted noise differs by far more than the
    tolerance. docs/methods.md gives the measured effect on reconstruction and edits."""
    case_id = _case_ids("rf_inversion")[0]
    fx = _fixture("rf_inversion", case_id)
    res = edit(flux, _source(cases, case_id), _config("rf_inversion", case_id, "rf_inversion"),
               latent=fx["init_latent"], noise=_replay(fx), keep_latents=True)  # fmt: skip
    d_inv = _maxdiff(res.trajectory.noise, fx["inverted"])
    d_out = _maxdiff(res.latents, fx["final_latent"])
    assert d_inv > 100 * ATOL and d_out > 10 * ATOL, (d_inv, d_out)


# --- RF-Solver-Edit and FireFlow (official code, BFL flux layout, on our weights) ---------------------------------


@pytest.mark.parametrize(
    ("name", "method"), [("rf_solver_edit", "rf_solver_ref"), ("fireflow", "fireflow_ref")]
)  # fmt: skip
@pytest.mark.parametrize("index", [0, 1, 2])
def test_value_replay_matches_official_code(flux, cases, name, method, index):
    """RF-Solver-Edit's / FireFlow's own transformer and loops on shapes-flux's weights vs retouch's reference-mode
    preset from the image (the same seeded posterior sample): every recorded model input, the inverted noise and
    the edit."""
    case_id = _case_ids(name)[index]
    fx = _fixture(name, case_id)
    st = _settings(name)
    with _Inputs(flux.denoiser) as rec:
        res = edit(flux, _source(cases, case_id), _config(name, case_id, method, seed=st["settings"]["seed"]),
                   keep_latents=True)  # fmt: skip
    assert _maxdiff(res.trajectory.latents[-1], fx["init_latent"]) < ATOL
    for k in st["keep_evals"]:
        assert _maxdiff(rec.seen[k], fx[f"eval.{k}"]) < ATOL, k
    assert _maxdiff(res.trajectory.noise, fx["inverted"]) < ATOL
    assert _maxdiff(res.latents, fx["final_latent"]) < ATOL
    assert _image_maxdiff(res, fx) <= 1  # their decode truncates to uint8, ours rounds


@pytest.mark.parametrize(("name", "method"), [("rf_solver_edit", "rf_solver_ref"), ("fireflow", "fireflow_ref")])
def test_value_replay_is_what_makes_the_match(flux, cases, name, method):
    """Control: without the replay (inject=0) the same run misses the reference's edit by far more than the tolerance,
    so the parity above checks the injection, not just the solver."""
    case_id = _case_ids(name)[0]
    fx = _fixture(name, case_id)
    res = edit(flux, _source(cases, case_id), _config(name, case_id, method, inject=0), keep_latents=True)
    assert _maxdiff(res.trajectory.noise, fx["inverted"]) < ATOL  # the inversion does not depend on the replay
    assert _maxdiff(res.latents, fx["final_latent"]) > 100 * ATOL


def test_flux_noise_is_drawn_in_the_packed_layout(flux):
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = flux.randn_latent((1, 8, 16, 16), g1)
    assert torch.equal(pack(x), torch.randn(1, 64, 32, generator=g2))
