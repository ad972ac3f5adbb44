"""Train retouch's embedded ShapesWorld models, one resumable stage at a time.

    python -m training tokenizers --out runs/tokenizers
    python -m training vae        --out runs/vae    --steps 3000 --latent-channels 8
    python -m training clip       --out runs/clip   --steps 2000
    python -m training t5         --out runs/t5     --steps 1000
    python -m training sd         --out runs/sd     --steps 20000 --resume
    python -m training pixart     --out runs/pixart --steps 20000 --resume
    python -m training flux       --out runs/flux   --steps 20000 --resume
    python -m training assemble   --family sd       # checkpoint -> src/retouch/models/embedded/

Every training stage checkpoints atomically into its run directory every few minutes (``--checkpoint-min``);
``--resume`` continues from the last checkpoint with the exact data and noise the uninterrupted run would
have used. ``--minutes`` stops a call after that much wall time (with a checkpoint) so long runs can be split.
Learning curves go to ``curve.jsonl`` (loss, lr, wall time) and ``evals.jsonl`` in the run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"


def _train_config(args: argparse.Namespace, **defaults: object):
    from training.common import TrainConfig

    values = dict(defaults)
    for key in ("steps", "batch_size", "lr", "warmup", "ema", "seed", "stop_at"):
        v = getattr(args, key, None)
        if v is not None:
            values[key] = v
    values["checkpoint_every_s"] = args.checkpoint_min * 60
    values["eval_every_s"] = args.eval_min * 60
    values["max_minutes"] = args.minutes
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "stage", choices=["tokenizers", "vae", "clip", "clip-bind", "t5", "sd", "pixart", "flux", "assemble"]
    )
    p.add_argument("--out", type=Path, help="run directory (default runs/<stage>)")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's checkpoint")
    p.add_argument("--steps", type=int)
    p.add_argument("--stop-at", type=int, help="stop at this step (checkpointed); the lr schedule still spans --steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--ema", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--minutes", type=float, default=0.0, help="stop this call after N minutes (0 = no limit)")
    p.add_argument("--checkpoint-min", type=float, default=3.0, help="minutes between checkpoints")
    p.add_argument("--eval-min", type=float, default=0.0, help="minutes between evaluations (0 = at the end)")
    p.add_argument("--eval-n", type=int, default=100, help="held-out captions per evaluation")
    p.add_argument("--size", default="small", help="denoiser size preset (tiny | small | base)")
    p.add_argument("--pool", type=int, default=16384, help="denoisers: training scenes encoded once by the VAE")
    p.add_argument("--vae-blocks", default="32,64,64", help="vae: block widths (2 downsamples for 3 blocks)")
    p.add_argument("--vae-groups", type=int, default=16, help="vae: GroupNorm groups")
    p.add_argument("--latent-channels", type=int, default=8, help="vae: channels of the 16x16 latent")
    p.add_argument("--object-weight", type=float, default=8.0, help="vae: extra loss weight on object pixels")
    p.add_argument("--offset-noise", type=float, default=0.0, help="sd/pixart: offset-noise strength")
    p.add_argument("--offset-from", type=int, default=0, help="sd/pixart: first step with offset noise")
    p.add_argument("--max-objects", type=int, default=3, help="denoisers: scenes of 1..N objects (world subset)")
    p.add_argument("--object-loss-weight", type=float, default=1.0, help="denoisers: loss weight on object pixels")
    p.add_argument(
        "--timestep-weighting",
        choices=["eps", "v"],
        default="eps",
        help="sd/pixart: weigh the eps loss per timestep (v = 1/alpha_bar, the v-prediction loss)",
    )
    p.add_argument(
        "--train-text-encoder",
        action="store_true",
        help="pixart/flux: fine-tune the T5 jointly with the denoiser (the shapes-clip tower stays frozen)",
    )
    p.add_argument(
        "--binding-loss-weight",
        type=float,
        default=0.0,
        help="pixart/flux with --train-text-encoder: weight of the auxiliary attribute-binding loss on the T5",
    )
    p.add_argument("--clip-from", type=Path, help="clip-bind: the phase-1 shapes-clip folder (default runs/clip/final)")
    p.add_argument(
        "--anchor-weight",
        type=float,
        default=10.0,
        help="clip-bind: weight of the loss keeping the pooled text embedding where phase 1 left it",
    )
    p.add_argument(
        "--scene-weight",
        type=float,
        default=0.0,
        help="clip-bind: weight of the binding loss on the scene labels (background pattern and colour, style)",
    )
    p.add_argument("--init-text-from", type=Path, help="clip-bind: start the text tower from this shapes-clip folder")
    p.add_argument(
        "--token-anchor-weight",
        type=float,
        default=0.0,
        help="clip-bind: weight of the loss keeping every token state where the starting tower had it",
    )
    p.add_argument("--init-from", type=Path, help="denoisers: start a new run from this model's weights")
    p.add_argument("--components", type=Path, default=RUNS, help="runs directory with vae/clip/t5 final folders")
    p.add_argument("--family", choices=["sd", "pixart", "flux", "clip"], help="assemble: which model")
    p.add_argument("--run", type=Path, help="assemble: the denoiser's run directory (default runs/<family>)")
    p.add_argument("--dest", type=Path, help="assemble: output folder (default the embedded model folder)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    from training.common import pick_device

    device = pick_device(args.threads)
    out = args.out or RUNS / args.stage
    if args.stage != "assemble" and not args.resume and (out / "checkpoint.pt").exists():
        p.error(f"{out} already holds a checkpoint; pass --resume to continue it or choose another --out")

    if args.stage == "tokenizers":
        from training.text import build_tokenizers

        build_tokenizers(out)
    elif args.stage == "vae":
        from training.vae import train_vae

        cfg = _train_config(args, steps=3000, batch_size=32, lr=2e-3, warmup=100, decay="cosine")
        train_vae(
            out,
            cfg,
            resume=args.resume,
            device=device,
            block_out=tuple(int(c) for c in args.vae_blocks.split(",")),
            groups=args.vae_groups,
            latent_channels=args.latent_channels,
            object_weight=args.object_weight,
        )
    elif args.stage == "clip":
        from training.text import train_clip

        cfg = _train_config(args, steps=2000, batch_size=128, lr=1e-3, warmup=200)
        train_clip(out, cfg, tokenizers=RUNS / "tokenizers", resume=args.resume, device=device)
    elif args.stage == "clip-bind":
        from training.text import train_clip_binding

        cfg = _train_config(args, steps=3000, batch_size=64, lr=3e-4, warmup=100, decay="cosine")
        train_clip_binding(
            out,
            cfg,
            clip=args.clip_from or RUNS / "clip" / "final",
            resume=args.resume,
            anchor_weight=args.anchor_weight,
            scene_weight=args.scene_weight,
            init_text=args.init_text_from,
            token_anchor_weight=args.token_anchor_weight,
            device=device,
        )
    elif args.stage == "t5":
        from training.text import train_t5

        cfg = _train_config(args, steps=1000, batch_size=128, lr=1e-3, warmup=100)
        train_t5(
            out, cfg, tokenizers=RUNS / "tokenizers", clip=RUNS / "clip" / "final", resume=args.resume, device=device
        )
    elif args.stage in ("sd", "pixart", "flux"):
        from training.denoisers import train_denoiser

        cfg = _train_config(args, steps=20000, batch_size=64, lr=1e-3, warmup=300, decay="constant", ema=0.999)
        train_denoiser(
            args.stage,
            out,
            cfg,
            components=args.components,
            size=args.size,
            resume=args.resume,
            pool_size=args.pool,
            eval_n=args.eval_n,
            max_objects=args.max_objects,
            offset_noise=args.offset_noise,
            offset_from=args.offset_from,
            init_from=args.init_from,
            object_loss_weight=args.object_loss_weight,
            timestep_weighting=args.timestep_weighting,
            train_text_encoder=args.train_text_encoder,
            binding_loss_weight=args.binding_loss_weight,
            device=device,
        )
    elif args.stage == "assemble":
        from training.assemble import assemble, assemble_clip

        if args.family is None:
            p.error("assemble needs --family")
        if args.family == "clip":
            assemble_clip(args.components, dest=args.dest)
        else:
            assemble(args.family, run=args.run or RUNS / args.family, components=args.components, dest=args.dest)


if __name__ == "__main__":
    main()
