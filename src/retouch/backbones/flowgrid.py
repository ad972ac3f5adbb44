"""Flow grids of the pipelines that pass explicit sigmas and a shift ``mu`` to the scheduler (Flux.2, Z-Image).

Both pipelines call ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)``; the
scheduler then applies its own shift rule (dynamic ``time_shift(mu)`` when ``use_dynamic_shifting``, the
static ``shift`` otherwise). Only ``mu`` differs between the families; it is computed by the adapters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from retouch.backbones.base import TextSegment
from retouch.types import NoiseGrid


def explicit_sigma_flow_grid(config: Mapping[str, Any], num_steps: int, mu: float | None) -> NoiseGrid:
    """The grid ``FlowMatchEulerDiscreteScheduler(**config)`` walks after
    ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=mu)`` (with ``use_flow_sigmas`` the scheduler's own
    ``set_timesteps(N, mu=mu)``, as the Flux.2 pipelines do). ``timestep = 1000 * sigma``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler.from_config(dict(config))
    kwargs: dict[str, Any] = {"mu": mu} if mu is not None else {}
    if sched.config.get("use_flow_sigmas", False):
        sched.set_timesteps(num_steps, **kwargs)
    else:
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), **kwargs)
    sigmas = sched.sigmas.to(torch.float32)
    timesteps = torch.cat([sched.timesteps.to(torch.float32), torch.tensor([0.0])])
    return NoiseGrid(timesteps=timesteps, alphas=1 - sigmas, sigmas=sigmas, kind="flow")


def leading_specials(tokenizer: Any) -> int:
    """How many special tokens (e.g. a bos) ``tokenizer`` puts before a prompt on its own: the text segment of
    a templated prompt starts that many positions early, so that word alignment (which tokenises the prompt on
    its own) lands on the prompt's tokens."""
    enc = tokenizer("red", add_special_tokens=True, return_special_tokens_mask=True)
    n = 0
    for flag in enc["special_tokens_mask"]:
        if not flag:
            break
        n += 1
    return n


def chat_prompt_offset(encode: Any) -> tuple[int, int]:
    """``(prefix, suffix)`` token counts a chat template puts around a prompt.

    ``encode(prompt) -> list[int]`` tokenises the whole templated text without padding. Two probe prompts that
    differ in their only word give the common prefix and suffix.
    """
    a, b = encode("red"), encode("blue")
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, suffix


class ChatTemplateText:
    """Prompt positions of the adapters whose text encoder reads a chat template (Flux.2, Z-Image): the prompt's
    tokens sit between the template's prefix and suffix. Needs ``tokenizer``, ``_template_ids``,
    ``max_sequence_length`` and ``chat_model`` (the model's name, for the error message)."""

    chat_model = "this model"

    def _offsets(self) -> tuple[int, int]:
        if getattr(self.tokenizer, "padding_side", "right") != "right":
            raise ValueError(f"the {self.chat_model} tokenizer pads on the left: text positions differ per prompt")
        return chat_prompt_offset(self._template_ids)

    @property
    def max_prompt_tokens(self) -> int:
        prefix, suffix = self._offsets()
        return self.max_sequence_length - prefix - suffix

    def text_segments(self) -> list[TextSegment]:
        """The prompt's tokens start after the chat template's prefix."""
        prefix, _ = self._offsets()
        start = max(0, prefix - leading_specials(self.tokenizer))
        return [TextSegment(self.tokenizer, start, self.max_sequence_length - start)]
