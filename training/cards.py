"""Model cards (``README.md``) for the embedded models, written from the run directories' logs and metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retouch.worlds.oracle import ATTRIBUTES
from training.text import has_binding_phase

__all__ = ["write_clip_card", "write_pipeline_card"]

_PIPELINES = {"sd": "StableDiffusionPipeline", "pixart": "PixArtAlphaPipeline", "flux": "FluxPipeline"}
_DENOISERS = {"sd": "UNet2DConditionModel", "pixart": "PixArtTransformer2DModel", "flux": "FluxTransformer2DModel"}


def _metrics(components: Path, stage: str) -> dict[str, Any]:
    p = components / stage / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _params(path: Path) -> int:
    """Parameter count of every safetensors file under ``path``."""
    from safetensors import safe_open

    total = 0
    for f in path.rglob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += _numel(st.get_slice(k).get_shape())
    return total


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _table(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> str:
    head = "| step | wall (min) | " + " | ".join(keys) + " |"
    sep = "|" + "---|" * (len(keys) + 2)
    lines = [head, sep]
    for r in rows:
        vals = " | ".join(f"{100 * r[k]:.0f}%" if k in r else "–" for k in keys)
        lines.append(f"| {r['step']} | {r['wall_s'] / 60:.0f} | {vals} |")
    return "\n".join(lines)


def _zero_shot(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k[3:]} {100 * v:.0f}%" for k, v in metrics.items() if k.startswith("zs_"))


def _bind_commands(clip: dict[str, Any]) -> list[str]:
    """The ``clip-bind`` command(s) behind a binding phase's record: one, or two when the run continued an
    earlier binding run's tower (``--init-text-from``, run in ``runs/clip-2``)."""
    earlier = clip.get("init_text_run") or {}
    commands = _bind_commands(earlier) if has_binding_phase(earlier) else []
    if commands:
        commands = [commands[-1].replace("--out runs/clip ", "--out runs/clip-2 ")]
    flags = f"{_stage_flags(clip, '3000 --batch-size 64')} --anchor-weight {clip['anchor_weight']}"
    if clip.get("scene_weight"):
        flags += f" --scene-weight {clip['scene_weight']}"
    if commands:
        flags += f" --init-text-from runs/clip-2/final --token-anchor-weight {clip.get('token_anchor_weight', 0.0)}"
    return [
        *commands,
        f"python -m training clip-bind --out runs/clip --clip-from runs/clip-1/final {flags}",
    ]


_SCENE_LABELS_NOTE = (
    "the scene-wide words (background pattern and colour, style) label every later token the same way, so that "
    '"lined" and "checkered", which phase 1 left with almost the same token states, come apart'
)


def _scene_note(clip: dict[str, Any]) -> str:
    """Sentences on a binding run's scene labels and on the tower it continued (empty without either)."""
    scene = f" With `--scene-weight {clip['scene_weight']}`, {_SCENE_LABELS_NOTE}." if clip.get("scene_weight") else ""
    return scene + _continuation_note(clip)


def _continuation_note(clip: dict[str, Any]) -> str:
    """A sentence on a binding run that continued an earlier one's tower (empty otherwise)."""
    earlier = clip.get("init_text_run") or {}
    if not has_binding_phase(earlier):
        return ""
    return (
        f" It continued the tower of an earlier binding run ({earlier.get('step', '?')} steps"
        f"{' with' if earlier.get('scene_weight') else ' without'} scene labels), every token state anchored to"
        f" that tower's ({clip.get('token_anchor_weight')} × relative squared error; moved"
        f" {clip.get('token_rel_sq_error', float('nan')):.3f}), so that denoisers trained on it still read it."
    )


def _clip_phase2_bullet(clip: dict[str, Any]) -> str:
    """The components-section line on shapes-clip's binding phase (empty when the CLIP had none)."""
    if not has_binding_phase(clip):
        return ""
    bind = ", ".join(f"{k[5:]} {100 * v:.0f}%" for k, v in clip.items() if k.startswith("bind_"))
    steps, minutes = clip.get("step", "?"), clip.get("wall_s", 0) / 60
    scene = _scene_note(clip)  # its own line of the bullet, indented as the rest
    scene = f"\n   {scene}" if scene else ""
    return f"""  * Phase 2 (`clip-bind`, {steps} steps, {minutes:.0f} CPU-min; the figures above are phase 1's): the
    text tower alone was fine-tuned so that an object phrase's tokens carry that object's attributes
    (auxiliary binding loss, causal labels), its pooled output anchored to phase 1's; the image tower is
    unchanged.{scene}
  * Token binding accuracy on 200 held-out captions: {bind}.
  * Pooled output vs. phase 1: mean cosine {clip.get("pooled_cosine", float("nan")):.4f}.
  * After phase 2: zero-shot {_zero_shot(clip)}; retrieval image→text {100 * clip.get("i2t_top1", 0):.0f}%.
"""


def _components_section(components: Path) -> str:
    vae, phase2, t5 = (_metrics(components, s) for s in ("vae", "clip", "t5"))
    clip = phase2.get("phase1", phase2)
    lat = (vae.get("train_args") or {}).get("latent_channels") or _vae_channels(components)
    ceiling = ", ".join(f"{k[7:]} {100 * v:.0f}%" for k, v in vae.items() if k.startswith("oracle_"))
    zs = _zero_shot(clip)
    t5zs = ", ".join(f"{k[3:]} {100 * v:.0f}%" for k, v in t5.items() if k.startswith("zs_"))
    return f"""## Shared components

* **VAE** (`AutoencoderKL`, 64×64×3 → 16×16×{lat}, {vae.get("params", "?")} params, {vae.get("step", "?")} steps,
  {vae.get("wall_s", 0) / 60:.0f} CPU-min): reconstruction PSNR on held-out scenes
  **{vae.get("psnr_64x64", 0):.1f} dB** at 64×64 and {vae.get("psnr_64x128", 0):.1f} dB at 64×128 (goal 30 dB);
  oracle accuracy on its reconstructions (the ceiling of any denoiser on these latents): {ceiling or "n/a"};
  `scaling_factor` = 1/std = {1 / vae.get("latent_std", 1):.4f},
  `shift_factor` = mean = {vae.get("latent_mean", 0):.4f} (only Flux uses the shift).
* **Text encoder** (shapes-clip text tower, `CLIPTextModel`, {clip.get("text_params", "?")} params): shapes-clip was
  trained {clip.get("step", "?")} steps ({clip.get("wall_s", 0) / 60:.0f} CPU-min); zero-shot attribute accuracy {zs};
  retrieval top-1 image→text {100 * clip.get("i2t_top1", 0):.0f}%, text→image {100 * clip.get("t2i_top1", 0):.0f}%
  (200 held-out scenes).
{_clip_phase2_bullet(phase2)}* **T5 encoder** (`T5EncoderModel`, {t5.get("params", "?")} params; PixArt and Flux only):
  trained
  {t5.get("step", "?")} steps against the frozen shapes-clip image tower; zero-shot {t5zs}; retrieval
  image→text {100 * t5.get("i2t_top1", 0):.0f}%.
* **Tokenizers**: CLIP byte-level BPE (77 tokens) and T5 Unigram, built offline on the caption vocabulary
  (`retouch.models.tokenizers`).
"""


def _previous_card(previous: str | None, components: Path) -> tuple[str, list[str]] | None:
    """The shared-components section and component commands of a folder's previous card (its text), when
    ``components`` lacks the stage metrics to write them afresh (a runs directory rebuilt from the embedded
    folders' weights only): a card re-written after a denoiser phase keeps what was measured when the
    components were trained."""
    if previous is None or all((components / s / "metrics.json").exists() for s in ("vae", "clip", "t5")):
        return None
    start, end = previous.find("## Shared components"), previous.find("## Retrain / continue")
    if start < 0 or end < start:
        return None
    stages = ("tokenizers", "vae", "clip", "clip-bind", "t5")
    commands = [ln for ln in previous.splitlines() if any(ln.startswith(f"python -m training {s} ") for s in stages)]
    section = previous[start:end].rstrip() + "\n"
    # the text tower's binding phase is re-described from the components (it may be newer than the card)
    lines = section.splitlines(keepends=True)
    first = next((i for i, ln in enumerate(lines) if ln.startswith("  * Phase 2 (`clip-bind`")), None)
    if first is not None:
        last = next((i for i in range(first + 1, len(lines)) if not lines[i].startswith("  ")), len(lines))
        del lines[first:last]
    at = next((i for i, ln in enumerate(lines) if ln.startswith("* **T5 encoder**")), len(lines))
    clip = _metrics(components, "clip")
    lines.insert(at, _clip_phase2_bullet(clip))
    return "".join(lines), _clip_commands(commands, clip)


def _clip_commands(commands: list[str], clip: dict[str, Any]) -> list[str]:
    """Component commands with shapes-clip's binding phase: phase 1 runs in ``runs/clip-1`` and ``clip-bind``
    writes the shipped tower to ``runs/clip`` (where the denoiser stages read it)."""
    commands = [c for c in commands if not c.startswith("python -m training clip-bind ")]
    if not has_binding_phase(clip):
        return commands
    out = []
    for c in commands:
        if c.startswith("python -m training clip "):
            out += [c.replace("--out runs/clip ", "--out runs/clip-1 "), *_bind_commands(clip)]
        else:
            out.append(c)
    return out


def _t5_note(family: str, phases: list[dict[str, Any]]) -> str:
    trained = [str(i) for i, rec in enumerate(phases, 1) if rec.get("train_text_encoder")]
    if family == "sd" or not trained:
        return ""
    from training.denoisers import T5_FOLDER

    folder = T5_FOLDER[family]
    return (
        f"\n* The T5 was fine-tuned jointly with the denoiser in phase(s) {', '.join(trained)} "
        f"(`--train-text-encoder`; same optimiser and EMA): this folder's `{folder}` is that T5, not the shared "
        "one below. The shapes-clip text tower stayed frozen."
    )


def _vae_channels(components: Path) -> int | str:
    p = components / "vae" / "final" / "config.json"
    return json.loads(p.read_text()).get("latent_channels", "?") if p.exists() else "?"


def _stage_flags(metrics: dict[str, Any], default: str) -> str:
    """``--steps ...`` of a component stage from its metrics (with ``--stop-at`` where a time limit stopped it)."""
    train = metrics.get("train") or {}
    if not train:
        return f"--steps {default}" + (f" --stop-at {metrics['step']}" if metrics.get("step") else "")
    flags = f"--steps {train['steps']} --batch-size {train['batch_size']} --lr {train['lr']} --warmup {train['warmup']}"
    if metrics.get("step", train["steps"]) < train["steps"]:
        flags += f" --stop-at {metrics['step']}"
    return flags


def _offset_text(offset: dict[str, Any]) -> str:
    if not offset.get("strength"):
        return "none"
    return f"strength {offset['strength']} from step {offset.get('from_step', 0)} on"


def _world_text(world: dict[str, Any]) -> str:
    n = int(world.get("max_objects", 3))
    if n >= 3:
        return "the whole world: 1–3 objects"
    return (
        f"**a subset of the world: scenes of {'one object' if n == 1 else f'1–{n} objects'}** (every attribute "
        "uniform; `world.json` in this folder says so, and the benchmark draws its held-out captions from it)"
    )


def _phases(info: dict[str, Any]) -> list[dict[str, Any]]:
    """The training phases behind a model, oldest first: each later phase started from the weights of the one
    before (``init_from`` → that model folder's ``training.json``)."""
    chain = [info]
    source = info.get("init_from") or {}
    while source.get("training"):
        chain.append(source["training"])
        source = source["training"].get("init_from") or {}
    return chain[::-1]


def _weighting(rec: dict[str, Any]) -> str:
    """A phase's timestep weighting (records older than the option trained the plain ε loss)."""
    return rec.get("timestep_weighting") or "eps"


def _phase_flags(rec: dict[str, Any]) -> str:
    """``python -m training`` flags that reproduce one phase (its steps pinned with ``--stop-at``)."""
    train = rec.get("train") or {}
    flags = (
        f"--size {rec.get('size') or 'small'} --batch-size {train.get('batch_size')} --lr {train.get('lr')} "
        f"--warmup {train.get('warmup')} --ema {train.get('ema')} --pool {rec.get('pool_size')} "
        f"--max-objects {(rec.get('world') or {}).get('max_objects', 3)} --steps {train.get('steps')} "
        f"--stop-at {rec['step']}"
    )
    offset = rec.get("offset_noise") or {}
    if offset.get("strength", 0) > 0:
        flags += f" --offset-noise {offset['strength']} --offset-from {offset.get('from_step', 0)}"
    if (rec.get("object_loss_weight") or 1.0) != 1.0:
        flags += f" --object-loss-weight {rec['object_loss_weight']}"
    if _weighting(rec) != "eps":
        flags += f" --timestep-weighting {_weighting(rec)}"
    if rec.get("train_text_encoder"):
        flags += " --train-text-encoder"
    if rec.get("binding_loss_weight"):
        flags += f" --binding-loss-weight {rec['binding_loss_weight']}"
    return flags


def _towers_note(family: str, phases: list[dict[str, Any]]) -> str:
    """For SD phases trained on different shapes-clip text towers: how to re-run the earlier ones."""
    towers = {rec.get("clip_tower", "phase 1") for rec in phases} if family == "sd" else set()
    if len(towers) < 2:
        return ""
    return (
        " The phases trained on different shapes-clip text towers (the CLIP text tower column); the commands"
        " below end with the last tower in `runs/clip`, so an earlier phase is re-run faithfully with"
        " `--components` naming a runs directory whose `clip/final` is its tower (`runs/clip-1/final` for phase 1,"
        " `runs/clip-2/final` for the first binding run)."
    )


def _weighting_note(phases: list[dict[str, Any]]) -> str:
    if all(_weighting(rec) == "eps" for rec in phases):
        return ""
    return (
        "\n* Timestep weighting `v` (`--timestep-weighting v`, `training.denoisers.timestep_weights`): t is "
        "drawn ∝ 1/ᾱ_t, i.e. the v-prediction loss of the same ε-parameterised model, so that the high-noise "
        "steps where a sample's layout is decided count."
    )


_WEIGHTING_TEXT = {"eps": "ε MSE", "v": "v (t ∝ 1/ᾱ_t)"}


def _phases_table(phases: list[dict[str, Any]], family: str = "pixart") -> str:
    """One row per phase. The text column: for SD, which shapes-clip text tower the phase trained on (records
    older than the tower's binding phase lack the key: phase 1); else whether the T5 trained."""
    text_column = "CLIP text tower" if family == "sd" else "T5"
    # the ε-loss timestep weighting gets a column once a phase used one other than the plain ε MSE
    weighted = any(_weighting(rec) != "eps" for rec in phases)
    lines = [
        f"| phase | device | world | steps | batch | lr | EMA | object loss weight | offset noise | "
        f"{'timestep weighting | ' if weighted else ''}{text_column} | wall (min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if weighted else ""),
    ]
    for i, rec in enumerate(phases, 1):
        train = rec.get("train") or {}
        t5 = "trained" if rec.get("train_text_encoder") else "frozen"
        if rec.get("binding_loss_weight"):
            t5 += f", binding loss {rec['binding_loss_weight']}"
        if family == "sd":
            t5 = f"shapes-clip {rec.get('clip_tower', 'phase 1') or '(not recorded)'}"
        n = int((rec.get("world") or {}).get("max_objects", 3))
        world = "1 object" if n == 1 else f"1–{n} objects"
        lines.append(
            f"| {i} | {rec.get('device') or 'cpu'} | {world} | {rec['step']} | {train.get('batch_size')} | "
            f"{train.get('lr')} | {train.get('ema')} | {rec.get('object_loss_weight') or 1.0} | "
            f"{_offset_text(rec.get('offset_noise') or {})} | "
            f"{_WEIGHTING_TEXT[_weighting(rec)] + ' | ' if weighted else ''}{t5} | "
            f"{rec['wall_s'] / 60:.0f} |"
        )
    return "\n".join(lines)


def _phase_commands(family: str, phases: list[dict[str, Any]]) -> str:
    lines = []
    for i, rec in enumerate(phases, 1):
        init = f" --init-from src/retouch/models/embedded/shapes-{family}" if i > 1 else ""
        lines.append(f"python -m training {family} --out runs/{family}-{i} {_phase_flags(rec)}{init}")
        lines.append(f"python -m training assemble --family {family} --run runs/{family}-{i}")
    return "\n".join(lines)


def write_pipeline_card(dest: Path, info: dict[str, Any], components: Path, previous: str | None = None) -> None:
    """README.md of a denoiser pipeline folder; ``previous`` is the text of the card it replaces (default: the
    folder's current README.md), read for what ``components`` cannot say (see :func:`_previous_card`)."""
    if previous is None and (dest / "README.md").exists():
        previous = (dest / "README.md").read_text()
    family = info["family"]
    train = info.get("train") or {}
    evals = info.get("evals") or []
    last = evals[-1] if evals else {}
    bench = _benchmark(dest.name)
    phases = _phases(info)
    total_steps = sum(p["step"] for p in phases)
    judged = (bench.get("oracle_accuracy") if bench else None) or last
    status = (
        f"**Status: partially trained** ({total_steps} steps in {len(phases)} phase(s)). Its text-to-image "
        "accuracy is below the ≥ 90% goal; training resumes with the commands below."
        if min(judged.get(k, 0) for k in ATTRIBUTES if k != "scene") < 0.9
        else f"Trained {total_steps} steps in {len(phases)} phase(s); every attribute ≥ 90% by the oracle "
        f"({'the benchmark below' if bench else 'the last evaluation of the learning curve'})."
    )
    notes = {
        "sd": "SD 1.x UNet block layout (3× CrossAttnDownBlock2D + DownBlock2D, UNetMidBlock2DCrossAttn, "
        "UpBlock2D + 3× CrossAttnUpBlock2D, 2 layers per block = 16 transformer blocks), ε-prediction, "
        "scaled-linear β 0.00085–0.012 over 1000 steps, `DDIMScheduler` (steps_offset 1, clip_sample off, "
        "set_alpha_to_one off), 77-token CLIP prompts; no safety checker.",
        "pixart": "PixArt-α conventions: patch 2 on the 16×16 latent (64 tokens), `ada_norm_single`, learned-σ "
        "output layout (2× the latent channels; only the ε half is trained, the pipeline discards the σ half), "
        "T5 length 120 with attention mask, `DPMSolverMultistepScheduler` (dpmsolver++, order 2, linear "
        "β 0.0001–0.02). Call with `use_resolution_binning=False` at 64×64.",
        "flux": "Rectified flow (`FlowMatchEulerDiscreteScheduler` with dynamic shifting, as Flux-dev), latents "
        "packed 2×2 (4× the latent channels, 64 tokens), CLIP pooled + T5 tokens (**T5 length 64**: pass "
        "`max_sequence_length=64`). The guidance embedding exists (as in Flux-dev) and was fed a scalar "
        "g ~ U[1, 5] during training, but the model is **not guidance-distilled**: the target ignores g, "
        "so `guidance_scale` has no real effect. For classifier-free guidance use `true_cfg_scale > 1` "
        'with `negative_prompt=""` (10% caption dropout was used in training); the benchmark below samples '
        "with `true_cfg_scale=4` (chosen on validation captions, `benchmarks/results/sampler_sweep.json`).",
    }[family]
    clip_metrics = _metrics(components, "clip")
    if family == "flux" and phases[-1].get("clip_tower", "phase 1") == "phase 1" and has_binding_phase(clip_metrics):
        notes += (
            " Its phases trained on shapes-clip's phase-1 text tower; this folder ships the phase-2 tower (below),"
            " whose pooled output, the only CLIP input Flux reads, stays within cosine 0.999 of phase 1's. The"
            " benchmark below was measured with the shipped tower."
        )
    clip_flags = _stage_flags(clip_metrics.get("phase1", clip_metrics), "1500 --batch-size 64 --warmup 100")
    t5_flags = _stage_flags(_metrics(components, "t5"), "1000 --batch-size 64 --warmup 50")
    vae_metrics = _metrics(components, "vae")
    vae_train = vae_metrics.get("train", {})
    vae_flags = (
        f"--steps {vae_train.get('steps', 2400)} --batch-size {vae_train.get('batch_size', 16)} "
        f"--lr {vae_train.get('lr', 2e-3)} --warmup {vae_train.get('warmup', 50)} "
        f"--latent-channels {_vae_channels(components)} --object-weight 8"
        + (f" --stop-at {vae_metrics['step']}" if vae_metrics.get("step", 0) < vae_train.get("steps", 0) else "")
    )
    kept = _previous_card(previous, components)
    components_md = kept[0] if kept else _components_section(components)
    component_commands = (
        "\n".join(kept[1])
        if kept
        else "\n".join(
            _clip_commands(
                [
                    "python -m training tokenizers --out runs/tokenizers",
                    f"python -m training vae --out runs/vae {vae_flags}",
                    f"python -m training clip --out runs/clip {clip_flags}",
                    f"python -m training t5 --out runs/t5 {t5_flags}",
                ],
                clip_metrics,
            )
        )
    )
    n_params = _params(dest / ("unet" if family == "sd" else "transformer"))
    evals_md = _table(evals, ATTRIBUTES) if evals else "(no evaluation yet)"
    bench_md = ""
    if bench:
        rows = [("all", bench.get("oracle_accuracy", {}))]
        rows += [
            (f"{k} object(s), n={v.get('n')}", v) for k, v in (bench.get("oracle_accuracy_by_objects") or {}).items()
        ]
        sampler = ", ".join(f"{k}={v!r}" for k, v in (bench.get("sampler") or {}).items())
        bench_md = (
            f"\n## Benchmark (`benchmarks/embedded_quality.py`, {bench.get('n_captions')} held-out captions)\n\n"
            + f"Sampler: {sampler or 'pipeline defaults'}.\n\n"
            + "| captions | "
            + " | ".join(ATTRIBUTES)
            + " |\n|---|"
            + "---|" * len(ATTRIBUTES)
            + "\n"
            + "\n".join(
                f"| {name} | " + " | ".join(f"{100 * a.get(k, 0):.0f}%" for k in ATTRIBUTES) + " |" for name, a in rows
            )
            + "\n\n"
            + f"Inversion → reconstruction PSNR: {bench.get('reconstruction_psnr', float('nan')):.1f} dB "
            + f"({bench.get('inversion', '?')}).\n"
        )
    loss_notes = _weighting_note(phases) + _t5_note(family, phases)
    text = f"""# shapes-{family}

A small, genuinely trained text-to-image model of ShapesWorld (`retouch.worlds.shapes`), in the stock
`{_PIPELINES[family]}` format; it loads offline with `{_PIPELINES[family]}.from_pretrained(path,
torch_dtype=torch.float32)` (weights are stored as float16 safetensors).

{status}

## Denoiser

`{_DENOISERS[family]}`, size preset `{info.get("size")}`, {n_params:,} parameters. {notes}

Config: `{json.dumps(info.get("denoiser_config"))}`

## Training

* Data: ShapesWorld renders at 64×64, {_world_text(info.get("world") or {})}; a pool of {info.get("pool_size")}
  scenes encoded once by the frozen VAE; captions re-drawn with varied wording every step; 10% of captions
  dropped to "" for classifier-free guidance. Held-out evaluation scenes are
  `training.data.held_out_scenes(n, max_objects=...)` (seeds 7_000_000 + i).
* Offset noise (see `training.denoisers.diffusion_loss`) and an object-weighted loss (latent pixels that
  objects touch weigh more; `--object-loss-weight`) where the phase says so.{loss_notes}
* Phases (each later one starts from the EMA weights of the one before; AdamW, constant lr after a linear
  warm-up, seed {train.get("seed")}):

{_phases_table(phases, family)}

  In all **{total_steps} steps**; final training loss
  {info.get("final_loss")}. The world column is the scenes a phase trained on; this folder's `world.json`
  names the world of the last one.{_towers_note(family, phases)}

## Learning curve of the last phase (oracle attribute accuracy, {_eval_n(evals)} held-out canonical captions)

Scored during training by the oracle of the time. Until 2026-12-02 the oracle decided the style on the whole
image, which under-reads the style of imperfectly drawn images (`retouch.worlds.oracle`); the benchmark below
uses the current oracle.

{evals_md}
{bench_md}
{components_md}
## Retrain / continue

The exact commands (the shared components first; every stage is seeded and resumable):

```
export HF_HUB_OFFLINE=1
{component_commands}
{_phase_commands(family, phases)}
```

Add `--minutes N` to stop a call after N minutes and `--resume` to continue it (`--threads N` sets the CPU
threads; a CUDA GPU is used when present, and `scripts/train_denoisers_gpu.sh` runs the three families' phase
at once on one GPU). This folder holds the EMA weights of the last phase's step {info["step"]}; to continue,
start a new phase with `--init-from` this folder (or `--resume` the last run directory with a later
`--stop-at`), then `assemble` again. Changing the VAE or the text encoders requires retraining the denoisers.
"""
    (dest / "README.md").write_text(text)


def write_clip_card(dest: Path, components: Path, previous: str | None = None) -> None:
    """README.md of the shapes-clip folder. With a binding phase (``clip-bind``) in ``components/clip``, the card
    shows both phases; what phase 1's metrics lack (a runs directory rebuilt from the embedded weights) is
    taken from ``previous`` (default: the folder's current card)."""
    if previous is None and (dest / "README.md").exists():
        previous = (dest / "README.md").read_text()
    phase2 = _metrics(components, "clip")
    clip = phase2.get("phase1", phase2)
    two = has_binding_phase(phase2)
    train = clip.get("train", {})
    if clip.get("step") is not None:
        training = (
            f"* Training: {clip['step']} steps of symmetric InfoNCE, batch {train.get('batch_size', '?')}, AdamW lr "
            f"{train.get('lr', '?')}; {clip.get('wall_s', 0) / 60:.0f} CPU-min."
        )
    else:  # kept from the card the phase-1 weights came with
        old = [ln for ln in (previous or "").splitlines() if ln.startswith(("* Training: ", "* Phase 1: "))]
        training = old[0].replace("* Phase 1: ", "* Training: ", 1) if old else "* Training: (record not available)."
    if two:
        training = training.replace("* Training: ", "* Phase 1: ", 1)
    rows = "\n".join(
        f"| {k[3:]} | {100 * v:.0f}% |" + (f" {100 * phase2.get(k, float('nan')):.0f}% |" if two else "")
        for k, v in clip.items()
        if k.startswith("zs_")
    )
    header = "| attribute | phase 1 | after phase 2 |\n|---|---|---|" if two else "| attribute | accuracy |\n|---|---|"
    retrieval = f"image→text {100 * clip.get('i2t_top1', 0):.0f}%, text→image {100 * clip.get('t2i_top1', 0):.0f}%" + (
        f"\n  (after phase 2: {100 * phase2.get('i2t_top1', 0):.0f}% and {100 * phase2.get('t2i_top1', 0):.0f}%)"
        if two
        else ""
    )
    phase2_md = ""
    retrain = (
        "Retrain: `HF_HUB_OFFLINE=1 python -m training clip --out runs/clip` then\n"
        "`python -m training assemble --family clip`."
    )
    if two:
        p2 = phase2.get("train", {})
        bind = ", ".join(f"{k[5:]} {100 * v:.0f}%" for k, v in phase2.items() if k.startswith("bind_"))
        cos, rel = phase2.get("pooled_cosine", float("nan")), phase2.get("pooled_rel_sq_error", float("nan"))
        steps, batch, minutes = phase2.get("step", "?"), p2.get("batch_size", "?"), phase2.get("wall_s", 0) / 60
        lr, decay = p2.get("lr", "?"), p2.get("decay", "?")
        scene = _scene_note(phase2)
        phase2_md = f"""* Phase 2 (`clip-bind`): {steps} steps, batch {batch}, AdamW lr {lr} ({decay});
  {minutes:.0f} CPU-min. Only the text tower trains.
  * Why: Stable Diffusion's UNet reads every token state of this tower, but phase 1's contrastive loss shapes
    only the pooled one.
  * Binding loss (`training.binding`): each token of an object's phrase predicts the attributes of that
    object it has already read (the tower is causal), through linear heads kept out of this folder; the
    phrase's last token carries all of them.{scene} Token accuracy on 200 held-out captions:
    {bind}.
  * Anchor ({phase2["anchor_weight"]} × relative squared error): the pooled output (the joint-space
    embedding and Flux's pooled input) stays where phase 1 left it: mean cosine {cos:.4f}, relative squared
    error {rel:.4f}.
"""
        retrain = (
            "Retrain: `HF_HUB_OFFLINE=1 python -m training clip --out runs/clip-1`, then\n"
            + "".join(f"`{c}`, then\n" for c in _bind_commands(phase2))
            + "`python -m training assemble --family clip`."
        )
    text = f"""# shapes-clip

A small `CLIPModel` trained contrastively on ShapesWorld renders and captions (varied wording). Its text tower
is the frozen text encoder of shapes-sd and shapes-flux; the whole model serves as ShapesBench's CLIP score.
Loads offline with `transformers.CLIPModel.from_pretrained(path)` (float16 safetensors; pass
`torch_dtype=torch.float32` to compute in fp32). Images: 64×64, normalised to [-1, 1] (mean 0.5, std 0.5).

* Architecture: ViT 64×64 patch 8 (64 tokens), causal text transformer (CLIP BPE, 77 tokens, bos 0 / eos 1 /
  pad 1, pooled at the first eos); {phase2.get("params") or clip.get("params") or _params(dest)} parameters.
{training}
{phase2_md}* Retrieval top-1 on 200 held-out scenes (canonical captions): {retrieval}.

Zero-shot attribute accuracy (true caption vs. every caption that differs in that one attribute):

{header}
{rows}

{retrain}
"""
    (dest / "README.md").write_text(text)


def _benchmark(name: str) -> dict[str, Any]:
    p = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "embedded_quality.json"
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text()).get("models", {}).get(name, {})
    except (json.JSONDecodeError, AttributeError):
        return {}


def _eval_n(evals: list[dict[str, Any]]) -> str:
    return str(evals[-1].get("n", 100)) if evals else "100"
