"""Training disentanglement's mixing weights on one image (Wu et al.): an edit with the ``disentangle`` editor.

This sits at the editing layer (it runs :func:`retouch.editing.edit`), above :mod:`retouch.control`, which
never imports the editing layer.
"""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor

from retouch.backbones.base import Backbone
from retouch.control.disentangle import MixingWeights
from retouch.editing import edit
from retouch.presets import get_preset

__all__ = ["optimise_mixing_weights"]


def optimise_mixing_weights(
    backbone: Backbone,
    image: Any,
    config: Any,
    *,
    clip_model: Any = None,
    epochs: int = 10,
    lr: float = 0.05,
    content_weight: float = 0.05,
    t_star: float | int = 0.4,
    lambda_after: float = 0.0,
    checkpointing: bool = True,
    save_to: str | os.PathLike[str] | None = None,
) -> Tensor:
    """Train the mixing weights on ``image`` (an edit from ``config.source_prompt`` = neutral to
    ``config.target_prompt``) and return ``λ`` ([num_steps]); optionally save them.

    Runs :func:`retouch.editing.edit` with the ``disentangle`` editor, so encoding, inversion, solver and
    guidance are resolved exactly as for an edit (``config.method`` other than a disentangle preset is
    replaced by ``disentangle``). The final edit pass this implies costs one chain without gradients.
    """
    preset = get_preset(config.method)
    method = config.method if (preset is not None and preset.editor == "disentangle") else "disentangle"
    got: list[MixingWeights] = []
    options = {
        **dict(config.options),
        "epochs": epochs, "lr": lr, "content_weight": content_weight, "clip_model": clip_model,
        "t_star": t_star, "lambda_after": lambda_after, "checkpointing": checkpointing,
        "weights": None, "lambdas": None, "on_weights": got.append,
    }  # fmt: skip
    edit(backbone, image, config.with_(method=method, options=options))
    weights = got[-1]
    if save_to is not None:
        weights.save(save_to)
    return weights.lambdas
