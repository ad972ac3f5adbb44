"""Stable Diffusion (UNet2DConditionModel): SD 1.x / 2.x (eps or v-prediction) and SDXL."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from retouch.backbones.base import Backbone, LayerInfo, SizePolicy
from retouch.backbones.common import parse_layer_names, square_size_policy
from retouch.backbones.processors import StandardProcessor
from retouch.types import Conditioning, Prediction

_PLACE_ORDER = {"down": 0, "mid": 1, "up": 2}
_NAME = re.compile(
    r"^(down_blocks|mid_block|up_blocks)\.?(\d*)\.attentions\.(\d+)\.transformer_blocks\.(\d+)\.(attn\d)$"
)


class SDBackbone(Backbone):
    family = "sd"
    latent_shift = False  # the diffusers pipeline ignores the VAE shift_factor
    default_solver = "ddim"
    default_guidance = 7.5
    default_steps = 50
    multiscale = True
    masactrl_start_layer = 10 / 16  # MasaCtrl's 10 of 16 transformer blocks

    def __init__(self, pipe: Any, *, name: str | None = None) -> None:
        super().__init__(pipe, name=name)
        self.xl = getattr(pipe, "text_encoder_2", None) is not None
        pred = pipe.scheduler.config.get("prediction_type", "epsilon")
        if pred not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported SD prediction type {pred!r}")
        self.prediction = Prediction(pred)

    @property
    def denoiser(self) -> nn.Module:
        return self.pipe.unet

    @property
    def tokenizer(self) -> Any:
        return self.pipe.tokenizer

    @property
    def size_policy(self) -> SizePolicy:
        n_down = len(self.pipe.unet.config.down_block_types)
        mult = self.vae_scale_factor * 2 ** (n_down - 1)
        native = int(self.pipe.unet.config.sample_size) * self.vae_scale_factor
        return square_size_policy(mult, native, max(4 * native, 2048))

    def encode_prompt(
        self,
        prompts: Sequence[str],
        *,
        image_size: tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> Conditioning:
        prompts = list(prompts)
        device = self.device
        if not self.xl:
            emb = self.pipe.encode_prompt(prompts, device, 1, False)[0]
            return Conditioning({"encoder_hidden_states": emb})
        if self.pipe.config.get("force_zeros_for_empty_prompt", False) and all(not p for p in prompts):
            ref = self.encode_prompt(["x"], image_size=image_size)
            zeros = {k: torch.zeros_like(v).repeat(len(prompts), *([1] * (v.ndim - 1))) for k, v in ref.tensors.items()}
            zeros["time_ids"] = ref.tensors["time_ids"].repeat(len(prompts), 1)
            return Conditioning(zeros)
        emb, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        h, w = image_size or (self.size_policy.native)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=emb.dtype, device=device).repeat(len(prompts), 1)
        return Conditioning({"encoder_hidden_states": emb, "text_embeds": pooled, "time_ids": time_ids})

    def predict(self, x: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        t = timestep.to(x.device).reshape(())
        kw: dict[str, Any] = {}
        if self.xl:
            kw["added_cond_kwargs"] = {
                "text_embeds": cond.tensors["text_embeds"],
                "time_ids": cond.tensors["time_ids"],
            }
        return self.pipe.unet(
            x.to(self.dtype),
            t,
            encoder_hidden_states=cond.tensors["encoder_hidden_states"],
            return_dict=False,
            **kw,
        )[0]

    def attention_layers(self) -> dict[str, LayerInfo]:
        unet = self.pipe.unet
        n_down = len(unet.config.down_block_types)
        n_up = len(unet.config.up_block_types)
        parsed = []
        for m, name in parse_layer_names(unet.attn_processors, _NAME, "UNet"):
            group, bi, ai, ti, which = m.groups()
            place = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[group]
            b = int(bi) if bi else 0
            ds = {"down": 2**b, "mid": 2 ** (n_down - 1), "up": 2 ** (n_up - 1 - b)}[place]
            parsed.append(((_PLACE_ORDER[place], b, int(ai), int(ti), which), name, place, ds, which))
        parsed.sort()
        out: dict[str, LayerInfo] = {}
        depth = -1
        last_block = None
        for order, name, place, ds, which in parsed:
            if order[:4] != last_block:
                depth += 1
                last_block = order[:4]
            kind = "self" if which == "attn1" else "cross"
            out[name] = LayerInfo(name=name, kind=kind, depth=depth, place=place, downsample=ds)
        return out

    def feature_blocks(self) -> dict[str, LayerInfo]:
        """UNet residual blocks ``down_blocks.*.resnets.*``, ``mid_block.resnets.*``, ``up_blocks.*.resnets.*``;
        each returns ``[B, C, h, w]`` (kind ``"resnet"``). Depth counts them in execution order."""
        unet = self.pipe.unet
        n_down, n_up = len(unet.down_blocks), len(unet.up_blocks)
        groups = [("down", f"down_blocks.{b}", blk, 2**b) for b, blk in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            groups.append(("mid", "mid_block", unet.mid_block, 2 ** (n_down - 1)))
        groups += [("up", f"up_blocks.{b}", blk, 2 ** (n_up - 1 - b)) for b, blk in enumerate(unet.up_blocks)]
        out: dict[str, LayerInfo] = {}
        for place, prefix, block, ds in groups:
            for r in range(len(getattr(block, "resnets", None) or [])):
                name = f"{prefix}.resnets.{r}"
                out[name] = LayerInfo(name=name, kind="resnet", depth=len(out), place=place, downsample=ds)
        return out

    def residual_branch(self, block: str) -> str | None:
        """``<block>.conv2`` for a UNet resnet (diffusers' ResnetBlock2D: ``(shortcut(x) + conv2(...)) / s``)."""
        if block not in self.feature_blocks():
            return None
        conv2 = f"{block}.conv2"
        try:
            self.pipe.unet.get_submodule(conv2)
        except AttributeError:
            return None
        return conv2

    def make_processor(self, layer: LayerInfo, attend, merge=None) -> Any:
        return StandardProcessor(layer, attend, merge)

    def pnp_feature_layers(self) -> list[str]:
        """PnP's feature block (the paper's decoder ``up_blocks.1.resnets.1``)."""
        if "up_blocks.1.resnets.1" not in self.feature_blocks():
            raise ValueError("this UNet has no up_blocks.1.resnets.1 (PnP's feature layer); pass feature_layers=")
        return ["up_blocks.1.resnets.1"]

    def pnp_attention_layers(self) -> list[str]:
        """PnP's decoder self-attention layers, without the first decoder attention module (as the paper)."""
        up = [i for i in self.attention_layers().values() if i.place == "up" and i.kind == "self"]
        if not up:
            raise ValueError("this UNet has no decoder self-attention; pass attn_layers=")
        first_module = up[0].name.split(".transformer_blocks.")[0]
        chosen = [i.name for i in up if not i.name.startswith(first_module + ".")]
        return chosen or [i.name for i in up]
