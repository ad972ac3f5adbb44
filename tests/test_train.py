"""Fast tests of the training code (training): a few steps of every stage on tiny configs, exact resume,
and pipeline assembly that the stock diffusers classes load offline."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from retouch.models import registry  # noqa: E402
from retouch.worlds import shapes  # noqa: E402
from training import common, data  # noqa: E402
from training.common import RunDir, TrainConfig  # noqa: E402


def _cfg(steps: int, **kw) -> TrainConfig:
    base = {"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup": 2, "log_every": 1, "checkpoint_every_s": 1e9}
    return TrainConfig(**{**base, **kw})


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert common.lr_at(cfg, 0) == pytest.approx(0.1)
    assert common.lr_at(cfg, 9) == pytest.approx(1.0)
    assert common.lr_at(cfg, 100) == pytest.approx(0.1)


def test_stop_at_keeps_the_schedule_of_steps(tmp_path):
    model = torch.nn.Linear(2, 1)

    def loss_fn(step):
        return model(torch.ones(1, 2)).pow(2).mean(), {}

    cfg = _cfg(10, stop_at=4, decay="cosine", warmup=0)
    out = common.train_loop(RunDir(tmp_path), {"m": model}, loss_fn, cfg)
    assert out["step"] == 4
    lrs = [r["lr"] for r in RunDir(tmp_path).read_log("curve.jsonl")]
    assert lrs == pytest.approx([common.lr_at(cfg, i) for i in range(4)]) and lrs[-1] < cfg.lr
    with pytest.raises(ValueError):
        TrainConfig(stop_at=-1)


def test_resume_is_exact(tmp_path):
    """Training 6 steps straight equals 3 steps, checkpoint, then 3 more after a resume."""

    def run(path, plan):
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 1)
        for steps in plan:
            torch.manual_seed(1)  # a resume must not depend on the global RNG
            fresh = torch.nn.Linear(3, 1)
            fresh.load_state_dict(model.state_dict())
            model = fresh

            def loss_fn(step, model=model):
                g = common.step_generator(0, step)
                x = torch.randn(8, 3, generator=g)
                return (model(x) - x.sum(1, keepdim=True)).pow(2).mean(), {}

            common.train_loop(RunDir(path), {"m": model}, loss_fn, _cfg(steps, ema=0.9))
        return torch.load(path / "checkpoint.pt", weights_only=False)

    a = run(tmp_path / "a", [6])
    b = run(tmp_path / "b", [3, 6])
    assert a["step"] == b["step"] == 6
    for k, v in a["modules"]["m"].items():
        torch.testing.assert_close(v, b["modules"]["m"][k])
    for k, v in a["ema"]["m"].items():
        torch.testing.assert_close(v, b["ema"]["m"][k])
    curve = RunDir(tmp_path / "b").read_log("curve.jsonl")
    assert [r["step"] for r in curve] == list(range(1, 7))


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Tokenizers, VAE, CLIP and T5 trained for two steps each on tiny configs, in a runs/ layout."""
    from training import text, vae

    runs = tmp_path_factory.mktemp("runs")
    text.build_tokenizers(runs / "tokenizers")
    v = vae.train_vae(runs / "vae", _cfg(2), block_out=(8, 8, 8), groups=4, latent_channels=8, eval_n=4)
    assert v.config.scaling_factor > 0 and v.config.latent_channels == 8
    text.train_clip(runs / "clip", _cfg(2, batch_size=6), tokenizers=runs / "tokenizers", width=32, layers=1, eval_n=4)
    text.train_t5(
        runs / "t5",
        _cfg(2, batch_size=6),
        tokenizers=runs / "tokenizers",
        clip=runs / "clip" / "final",
        width=32,
        layers=1,
        eval_n=4,
    )
    return runs


def test_component_stages_write_metrics(tiny_runs):
    for stage in ("vae", "clip", "t5"):
        metrics = json.loads((tiny_runs / stage / "metrics.json").read_text())
        assert metrics["step"] == 2
    clip_metrics = json.loads((tiny_runs / "clip" / "metrics.json").read_text())
    assert {"i2t_top1", "t2i_top1", "zs_shape", "zs_colour"} <= set(clip_metrics)
    assert np.isfinite(json.loads((tiny_runs / "vae" / "metrics.json").read_text())["psnr_64x64"])


def test_clip_binding_phase_moves_tokens_not_the_pooled_embedding(tiny_runs, tmp_path):
    """clip-bind trains only the text tower: the image tower is untouched, the binding accuracy is reported,
    and the anchor keeps the pooled output near phase 1's (tight with a huge anchor weight)."""
    from transformers import CLIPModel

    from training import text

    before = CLIPModel.from_pretrained(str(tiny_runs / "clip" / "final"))
    out = tmp_path / "clip-bind"
    text.train_clip_binding(
        out, _cfg(20, batch_size=6, lr=3e-3), clip=tiny_runs / "clip" / "final", anchor_weight=100.0, eval_n=4
    )
    after = CLIPModel.from_pretrained(str(out / "final"))
    for k, v in before.vision_model.state_dict().items():
        torch.testing.assert_close(v, after.vision_model.state_dict()[k])
    moved = [
        k for k, v in before.text_model.state_dict().items() if not torch.equal(v, after.text_model.state_dict()[k])
    ]
    assert moved, "the text tower did not change"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["step"] == 20 and {"bind_shape", "bind_position", "i2t_top1", "zs_shape"} <= set(metrics)
    assert {"i2t_top1", "zs_shape"} <= set(metrics["phase1"])
    loose = tmp_path / "loose"
    text.train_clip_binding(
        loose, _cfg(20, batch_size=6, lr=3e-3), clip=tiny_runs / "clip" / "final", anchor_weight=0.0, eval_n=4
    )
    loose_metrics = json.loads((loose / "metrics.json").read_text())
    assert metrics["pooled_rel_sq_error"] < 0.2 * loose_metrics["pooled_rel_sq_error"]


@pytest.mark.parametrize("family", ["sd", "pixart", "flux"])
def test_denoiser_steps_and_assembly(family, tiny_runs, tmp_path):
    """Two finite training steps, then the assembled folder loads in the stock pipeline class offline."""
    import diffusers

    from training import assemble, denoisers

    run = tmp_path / family
    cfg = _cfg(2, batch_size=4, ema=0.9)
    denoisers.train_denoiser(
        family, run, cfg, components=tiny_runs, size="tiny", pool_size=8, eval_n=0, max_objects=1, offset_noise=0.1,
        offset_from=1,
    )  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["offset_noise"] == {"strength": 0.1, "from_step": 1}
    assert config["clip_tower"] == "phase 1"  # tiny_runs' CLIP had no binding phase
    curve = RunDir(run).read_log("curve.jsonl")
    assert len(curve) == 2 and all(np.isfinite(r["loss"]) for r in curve)
    dest = tmp_path / f"shapes-{family}"
    assemble.assemble(family, run=run, components=tiny_runs, dest=dest, card=False)
    index = json.loads((dest / "model_index.json").read_text())
    pipe = getattr(diffusers, index["_class_name"]).from_pretrained(dest, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = denoisers.generate(pipe, family, ["a red circle"], num_inference_steps=2)
    assert images[0].shape == (64, 64, 3)
    assert all(p.dtype == torch.float32 for p in pipe.components[_denoiser_key(family)].parameters())
    assert registry.world_of(dest) == {"max_objects": 1}


def _denoiser_key(family: str) -> str:
    return "unet" if family == "sd" else "transformer"


def test_data_is_seeded():
    a = data.sample_scenes(common.step_rng(0, 5), 3)
    b = data.sample_scenes(common.step_rng(0, 5), 3)
    assert a == b
    x = data.render_batch(a)
    assert x.shape == (3, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


def test_world_subsets_of_held_out_scenes():
    full = data.held_out_scenes(40)
    assert full == [shapes.sample_scene(data.HELD_OUT_SEED + i) for i in range(40)]
    assert {len(s.objects) for s in full} == {1, 2, 3}
    one = data.held_out_scenes(40, max_objects=1)
    assert {len(s.objects) for s in one} == {1} and one == data.held_out_scenes(40, max_objects=1)
    two = data.sample_scenes(common.step_rng(0, 1), 40, max_objects=2)
    assert {len(s.objects) for s in two} == {1, 2}
    with pytest.raises(ValueError, match="max_objects"):
        data.held_out_scenes(1, max_objects=4)


def test_vae_object_weight_mask_covers_objects():
    from training import vae

    scene = shapes.sample_scene(3, n_objects=2)
    m = vae.object_masks([scene], 64, 64)
    union = np.any(shapes.render_masks(scene), axis=0)
    assert m.shape == (1, 1, 64, 64) and bool(m[0, 0][torch.from_numpy(union)].all())
    assert 0 < float(m.mean()) < 0.5


def test_training_phases_chain_and_read_back_without_checkpoint(tiny_runs, tmp_path):
    """Phase 2 starts from phase 1's assembled weights, records it, trains with the object-weighted loss, and
    a run directory without checkpoint.pt (as it comes back from a GPU machine) assembles from final/."""
    from training import assemble, denoisers
    from training.pipelines import build_denoiser

    family = "sd"
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    denoisers.train_denoiser(
        family, p1, _cfg(2, batch_size=4), components=tiny_runs, size="tiny", pool_size=8, eval_n=0, max_objects=1
    )
    dest = assemble.assemble(family, run=p1, components=tiny_runs, dest=tmp_path / "shapes-sd")
    assert json.loads((dest / "training.json").read_text())["step"] == 2

    config = json.loads((p1 / "config.json").read_text())["denoiser"]
    fresh = build_denoiser(family, config)
    denoisers.init_weights(fresh, dest)
    saved = type(fresh).from_pretrained(str(dest / "unet"), torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())

    denoisers.train_denoiser(
        family, p2, _cfg(3, batch_size=4), components=tiny_runs, size="tiny", pool_size=8, eval_n=0,
        init_from=dest, object_loss_weight=4.0,
    )  # fmt: skip
    cfg2 = json.loads((p2 / "config.json").read_text())
    assert cfg2["init_from"]["training"]["step"] == 2 and cfg2["object_loss_weight"] == 4.0
    assert cfg2["device"].startswith("cpu")
    assert torch.load(p2 / "pool.pt")["masks"].shape == (8, 1, 16, 16)

    (p2 / "checkpoint.pt").unlink()
    model, info = assemble.load_denoiser(family, p2)
    assert info["step"] == 3 and info["object_loss_weight"] == 4.0
    final = type(model).from_pretrained(str(p2 / "final"), torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    dest2 = assemble.assemble(family, run=p2, components=tiny_runs, dest=tmp_path / "shapes-sd-2")
    card = (dest2 / "README.md").read_text()
    assert "5 steps in 2 phase(s)" in card
    assert "--init-from src/retouch/models/embedded/shapes-sd" in card and "--object-loss-weight 4.0" in card


def test_trained_t5_changes_goes_to_the_folder_and_seeds_the_next_phase(tiny_runs, tmp_path):
    """--train-text-encoder fine-tunes the T5 with the denoiser: the run's final_t5 and the assembled folder hold
    the trained T5 (not the components' one), a later frozen phase starts from it, and SD refuses the option."""
    from transformers import T5EncoderModel

    from training import assemble, denoisers

    family = "flux"
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    denoisers.train_denoiser(
        family, p1, _cfg(3, batch_size=4, ema=0.5), components=tiny_runs, size="tiny", pool_size=8, eval_n=0,
        max_objects=1, train_text_encoder=True,
    )  # fmt: skip
    base = T5EncoderModel.from_pretrained(str(tiny_runs / "t5" / "final")).state_dict()
    trained = T5EncoderModel.from_pretrained(str(p1 / "final_t5")).state_dict()
    assert set(base) == set(trained)
    assert any(not torch.equal(base[k], trained[k]) for k in base), "the T5 did not change"
    ckpt = torch.load(p1 / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(v, trained[k]) for k, v in ckpt["ema"]["text_encoder"].items())

    dest = assemble.assemble(family, run=p1, components=tiny_runs, dest=tmp_path / "shapes-flux")
    folder = T5EncoderModel.from_pretrained(str(dest / "text_encoder_2"), torch_dtype=torch.float32).state_dict()
    assert all(torch.equal(v, trained[k].half().float()) for k, v in folder.items())
    assert json.loads((dest / "training.json").read_text())["train_text_encoder"] is True
    card = (dest / "README.md").read_text()
    assert "--train-text-encoder" in card and "| trained |" in card

    # a frozen later phase trains on (and ships) the folder's fine-tuned T5, not the components' one
    denoisers.train_denoiser(
        family, p2, _cfg(2, batch_size=4), components=tiny_runs, size="tiny", pool_size=8, eval_n=0,
        max_objects=1, init_from=dest,
    )  # fmt: skip
    second = T5EncoderModel.from_pretrained(str(p2 / "final_t5")).state_dict()
    assert all(torch.equal(v, folder[k]) for k, v in second.items())
    assert "text_encoder" not in torch.load(p2 / "checkpoint.pt", weights_only=False)["modules"]

    with pytest.raises(ValueError, match="no T5"):
        denoisers.train_denoiser(
            "sd", tmp_path / "sd", _cfg(1, batch_size=2), components=tiny_runs, size="tiny", pool_size=4,
            eval_n=0, train_text_encoder=True,
        )  # fmt: skip


def test_card_keeps_component_section_when_components_lack_metrics(tiny_runs, tmp_path):
    """A runs directory rebuilt from an embedded folder's weights (no metrics.json) re-writes a card without
    losing what was measured on the components; with metrics present the section is written afresh."""
    import shutil

    from training import assemble, cards, denoisers

    run = tmp_path / "sd"
    denoisers.train_denoiser(
        "sd", run, _cfg(1, batch_size=2), components=tiny_runs, size="tiny", pool_size=4, eval_n=0, max_objects=1
    )
    dest = assemble.assemble("sd", run=run, components=tiny_runs, dest=tmp_path / "shapes-sd")
    before = (dest / "README.md").read_text()
    section = before[before.index("## Shared components") : before.index("## Retrain / continue")]
    assert "2 steps" in section

    bare = tmp_path / "bare"
    for stage in ("vae", "clip", "t5"):
        shutil.copytree(tiny_runs / stage / "final", bare / stage / "final")
    assemble.assemble("sd", run=run, components=bare, dest=dest)  # replaces the folder, card included
    after = (dest / "README.md").read_text()
    assert section in after
    vae_line = next(ln for ln in before.splitlines() if ln.startswith("python -m training vae "))
    assert vae_line in after.splitlines()

    (dest / "README.md").write_text("# old card without sections\n")
    _, info = assemble.load_denoiser("sd", run)
    cards.write_pipeline_card(dest, info, bare)
    assert "? params" in (dest / "README.md").read_text()  # nothing to keep: written from (missing) metrics


def test_denoiser_training_with_binding_loss(tiny_runs, tmp_path):
    """Flux phase with the binding loss logs its parts; the loss needs a trained T5."""
    from training import denoisers

    runs = tiny_runs
    run = tmp_path / "flux"
    denoisers.train_denoiser(
        "flux", run, _cfg(2, batch_size=4), components=runs, size="tiny", pool_size=8, eval_n=0,
        train_text_encoder=True, binding_loss_weight=0.5,
    )  # fmt: skip
    rows = [json.loads(line) for line in (run / "curve.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert np.isclose(last["loss"], last["diffusion"] + 0.5 * last["binding"], rtol=1e-4)
    assert {"bind_colour", "bind_position"} <= set(last)
    assert json.loads((run / "config.json").read_text())["binding_loss_weight"] == 0.5
    with pytest.raises(ValueError, match="needs train_text_encoder"):
        denoisers.train_denoiser(
            "flux", tmp_path / "x", _cfg(1, batch_size=2), components=runs, size="tiny", pool_size=4, eval_n=0,
            binding_loss_weight=0.5,
        )  # fmt: skip


def test_init_from_rejects_other_configs(tiny_runs, tmp_path):
    from training import denoisers
    from training.pipelines import build_denoiser, denoiser_config

    small = build_denoiser("sd", denoiser_config("sd", "tiny", text_width=32, t5_width=32, latent_channels=8))
    small.save_pretrained(tmp_path / "m")
    other = build_denoiser("sd", denoiser_config("sd", "small", text_width=32, t5_width=32, latent_channels=8))
    with pytest.raises(ValueError, match="do not fit"):
        denoisers.init_weights(other, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no diffusers model folder"):
        denoisers.init_weights(other, tmp_path / "missing")


def test_object_weighted_loss_reduces_to_mse_and_weights_objects():
    from training.denoisers import _weighted_mse

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ones = torch.ones(2, 1, 8, 8)
    assert torch.allclose(_weighted_mse(pred, target, ones), torch.nn.functional.mse_loss(pred, target))
    w = ones.clone()
    w[:, :, :2] = 9.0  # an error only on weighted pixels counts more than the same error elsewhere
    err = torch.zeros_like(pred)
    err_obj, err_bg = err.clone(), err.clone()
    err_obj[:, :, 0, 0], err_bg[:, :, 7, 7] = 1.0, 1.0
    assert _weighted_mse(err_obj, err, w) > _weighted_mse(err_bg, err, w) > 0


def test_load_pipeline_names_family_and_world():
    from training import denoisers

    pipe, family, world = denoisers.load_pipeline("shapes-pixart")
    assert family == "pixart" and type(pipe).__name__ == "PixArtAlphaPipeline" and world == {"max_objects": 3}
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        denoisers.load_pipeline(registry.resolve("shapes-clip"))


def test_sd_card_names_the_clip_tower_and_its_binding_phase(tiny_runs, tmp_path):
    """An SD phase trained on a shapes-clip with the binding phase records it; the card's table, components
    section and retrain commands say so, also when the section is kept from the previous card."""
    import shutil

    from training import assemble, denoisers, text

    runs = tmp_path / "runs"
    for stage in ("tokenizers", "vae", "t5"):
        shutil.copytree(tiny_runs / stage, runs / stage)
    text.train_clip_binding(runs / "clip", _cfg(2, batch_size=4), clip=tiny_runs / "clip" / "final", eval_n=4)
    run = tmp_path / "sd"
    denoisers.train_denoiser(
        "sd", run, _cfg(1, batch_size=2), components=runs, size="tiny", pool_size=4, eval_n=0, max_objects=1
    )
    assert json.loads((run / "config.json").read_text())["clip_tower"] == "phase 2 (binding)"
    dest = assemble.assemble("sd", run=run, components=runs, dest=tmp_path / "shapes-sd")
    card = (dest / "README.md").read_text()
    assert "| shapes-clip phase 2 (binding) |" in card and "| CLIP text tower |" in card
    assert card.count("* Phase 2 (`clip-bind`") == 1
    lines = card.splitlines()
    assert any(ln.startswith("python -m training clip --out runs/clip-1 ") for ln in lines)
    assert any(ln.startswith("python -m training clip-bind --out runs/clip ") for ln in lines)

    # components without vae/t5 metrics: the section is kept from the card, the binding bullet not doubled
    bare = tmp_path / "bare"
    for stage in ("vae", "t5"):
        shutil.copytree(tiny_runs / stage / "final", bare / stage / "final")
    shutil.copytree(runs / "clip", bare / "clip")
    assemble.assemble("sd", run=run, components=bare, dest=dest)
    again = (dest / "README.md").read_text()
    assert again.count("* Phase 2 (`clip-bind`") == 1
    assert sum(ln.startswith("python -m training clip-bind ") for ln in again.splitlines()) == 1


def test_v_timestep_weighting_is_the_v_loss_of_the_eps_model():
    """Weighing the ε error by 1/ᾱ_t (mean 1 over the schedule) is the v-prediction loss up to a constant: the
    v error of an ε-parameterised model is its ε error / √ᾱ_t. High-noise steps weigh more; "eps" is flat."""
    from diffusers import DDIMScheduler

    from training.denoisers import timestep_weights

    ab = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod.float()
    assert torch.equal(timestep_weights(ab, "eps"), torch.ones(1000))
    w = timestep_weights(ab, "v")
    assert abs(float(w.mean()) - 1) < 1e-5 and bool((w[1:] > w[:-1]).all())
    assert float(w[999] / w[0]) == pytest.approx(float(ab[0] / ab[999]), rel=1e-4)
    with pytest.raises(ValueError, match="timestep weighting 'x0'"):
        timestep_weights(ab, "x0")

    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 400, 961])
    a = ab[t].view(3, 1, 1, 1)
    z0, eps, eps_hat = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    xt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    x0_hat = (xt - (1 - a).sqrt() * eps_hat) / a.sqrt()
    v, v_hat = a.sqrt() * eps - (1 - a).sqrt() * z0, a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat
    per_sample_v = (v_hat - v).square().mean(dim=(1, 2, 3))
    per_sample_weighted = ((eps_hat - eps).square() * w[t].view(3, 1, 1, 1)).mean(dim=(1, 2, 3))
    ratio = per_sample_weighted / per_sample_v
    assert torch.allclose(ratio, ratio[0].expand(3), rtol=1e-4)


def test_timestep_weighting_is_recorded_and_carried_to_the_card(tiny_runs, tmp_path):
    from training import assemble, denoisers

    run = tmp_path / "sd"
    denoisers.train_denoiser(
        "sd", run, _cfg(1, batch_size=2), components=tiny_runs, size="tiny", pool_size=4, eval_n=0,
        max_objects=1, timestep_weighting="v",
    )  # fmt: skip
    assert json.loads((run / "config.json").read_text())["timestep_weighting"] == "v"
    dest = assemble.assemble("sd", run=run, components=tiny_runs, dest=tmp_path / "shapes-sd")
    assert json.loads((dest / "training.json").read_text())["timestep_weighting"] == "v"
    card = (dest / "README.md").read_text()
    assert "| timestep weighting |" in card and "| v (t ∝ 1/ᾱ_t) |" in card
    assert "--timestep-weighting v" in card
    with pytest.raises(ValueError, match="only 'eps' applies"):
        denoisers.train_denoiser("flux", tmp_path / "f", _cfg(1), components=tiny_runs, timestep_weighting="v")
    with pytest.raises(ValueError, match="timestep_weighting 'snr'"):
        denoisers.train_denoiser("sd", tmp_path / "s", _cfg(1), components=tiny_runs, timestep_weighting="snr")


def test_v_weighting_draws_high_noise_timesteps():
    """With "v" the loss draws t ∝ 1/ᾱ_t (the weights as importance sampling): most draws fall where the layout
    is decided; "eps" draws t uniformly."""
    from types import SimpleNamespace

    from diffusers import DDIMScheduler

    from training.denoisers import diffusion_loss

    seen: list[torch.Tensor] = []

    def model(xt, t, **cond):
        seen.append(t)
        return SimpleNamespace(sample=torch.zeros_like(xt))

    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = SimpleNamespace(scheduler=sched)
    z0 = torch.zeros(4000, 1, 2, 2)
    for kind in ("eps", "v"):
        diffusion_loss("sd", model, pipe, z0, {}, torch.Generator().manual_seed(0), timestep_weighting=kind)
    uniform, v = (t.float() for t in seen)
    assert abs(float(uniform.mean()) - 499.5) < 15 and abs(float((uniform >= 700).float().mean()) - 0.3) < 0.03
    assert abs(float((v >= 700).float().mean()) - 0.896) < 0.02 and float((v < 500).float().mean()) < 0.06


def test_clip_binding_with_scene_labels_reports_them_and_names_the_tower(tiny_runs, tmp_path):
    import shutil

    from training import assemble, denoisers, text

    runs = tmp_path / "runs"
    for stage in ("tokenizers", "vae", "t5"):
        shutil.copytree(tiny_runs / stage, runs / stage)
    text.train_clip_binding(
        runs / "clip", _cfg(2, batch_size=4), clip=tiny_runs / "clip" / "final", scene_weight=1.0, eval_n=4
    )
    metrics = json.loads((runs / "clip" / "metrics.json").read_text())
    assert metrics["scene_weight"] == 1.0
    assert {"bind_background_pattern", "bind_background_colour", "bind_style", "bind_shape"} <= set(metrics)
    assert "scene" in RunDir(runs / "clip").read_log("curve.jsonl")[-1]
    assert denoisers.clip_tower(runs) == "phase 2 (binding, scene labels)"
    card = (assemble.assemble_clip(runs, dest=tmp_path / "shapes-clip") / "README.md").read_text()
    assert "--scene-weight 1.0" in card and "bind_" not in card and "background_pattern" in card
    (runs / "clip" / "metrics.json").write_text(json.dumps({**metrics, "scene_weight": 0.0}))
    assert denoisers.clip_tower(runs) == "phase 2 (binding)"


def test_clip_binding_can_continue_a_tower_with_its_token_states_anchored(tiny_runs, tmp_path):
    """--init-text-from starts the tower from an earlier binding run's; the token anchor keeps its states (far
    closer than without it); the record names that run, and the card's retrain commands run both."""
    import shutil

    from transformers import CLIPModel, CLIPTokenizer

    from training import assemble, data, text

    runs = tmp_path / "runs"
    for stage in ("tokenizers", "vae", "t5"):
        shutil.copytree(tiny_runs / stage, runs / stage)
    phase1 = tiny_runs / "clip" / "final"
    text.train_clip_binding(tmp_path / "clip-2", _cfg(2, batch_size=4, lr=3e-3), clip=phase1, eval_n=4)
    earlier = tmp_path / "clip-2" / "final"
    common = dict(clip=phase1, scene_weight=1.0, init_text=earlier, eval_n=4)
    text.train_clip_binding(runs / "clip", _cfg(20, batch_size=6, lr=3e-3), token_anchor_weight=100.0, **common)
    text.train_clip_binding(tmp_path / "loose", _cfg(20, batch_size=6, lr=3e-3), **common)
    metrics = json.loads((runs / "clip" / "metrics.json").read_text())
    loose = json.loads((tmp_path / "loose" / "metrics.json").read_text())
    assert metrics["init_text"] == str(earlier) and metrics["init_text_run"]["step"] == 2
    assert metrics["token_anchor_weight"] == 100.0 and "phase1" not in metrics["init_text_run"]
    # phase 1's figures are phase 1's, not those of the tower the run started from
    first = json.loads((tmp_path / "clip-2" / "metrics.json").read_text())["phase1"]
    assert {k: metrics["phase1"][k] for k in first} == first
    assert "token_rel_sq_error" not in loose  # no anchor, nothing measured against the start
    ids = CLIPTokenizer.from_pretrained(str(earlier))(
        [data.caption_of(sc) for sc in data.held_out_scenes(8)], padding=True, return_tensors="pt"
    ).input_ids

    def states(path):
        with torch.no_grad():
            return CLIPModel.from_pretrained(str(path)).text_model(input_ids=ids).last_hidden_state

    start = states(earlier)
    moved = {k: float((states(p) - start).square().sum() / start.square().sum()) for k, p in
             {"anchored": runs / "clip" / "final", "loose": tmp_path / "loose" / "final"}.items()}  # fmt: skip
    assert 0 < moved["anchored"] < 0.5 * moved["loose"]
    assert metrics["token_rel_sq_error"] < 0.5 * moved["loose"]
    card = (assemble.assemble_clip(runs, dest=tmp_path / "shapes-clip") / "README.md").read_text()
    assert "clip-bind --out runs/clip-2 --clip-from runs/clip-1/final" in card
    assert "--init-text-from runs/clip-2/final --token-anchor-weight 100.0" in card
    assert "It continued the tower of an earlier binding run (2 steps without scene labels)" in card
