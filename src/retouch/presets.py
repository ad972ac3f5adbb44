"""Named presets reproducing the papers' setups. Every field can be overridden (CLI flags, EditConfig)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ALL = ("sd", "pixart", "sd3", "flux")


@dataclass(frozen=True)
class Preset:
    name: str
    editor: str
    inversion: str | None
    families: tuple[str, ...]
    description: str
    solver: str | None = None
    num_steps: int | None = None
    guidance: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    inversion_prompt: str | None = None
    inversion_guidance: float | None = None
    inversion_options: Mapping[str, Any] = field(default_factory=dict)
    # the source branch's prompt when the paper's code does not use the user's (MasaCtrl: ""); None = the
    # source prompt. The user's source prompt may then be empty.
    source_branch_prompt: str | None = None


# PnP-Inversion's PIE-Bench P2P settings (run_editing_p2p.py): AttentionRefine always, cross 0.4 / self 0.6, and
# the target blend word reweighted by 2 whenever local blend is on.
PIE_P2P: Mapping[str, Any] = {"mode": "refine", "cross_steps": 0.4, "self_steps": 0.6, "blend_reweight": 2.0}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("ddim+p2p", "p2p", "ddim", ALL,
               "Prompt-to-Prompt on plain DDIM inversion (PIE-Bench's DDIM+P2P baseline)", solver="ddim",
               options=PIE_P2P),
        Preset("direct+p2p", "p2p", "direct", ALL,
               "Prompt-to-Prompt with Direct Inversion's source-branch correction (Ju et al.)", options=PIE_P2P),
        Preset("null_text+p2p", "p2p", "null_text", ("sd", "pixart", "sd3"),
               "Prompt-to-Prompt on null-text inversion (Mokady et al.)", solver="ddim", options=PIE_P2P),
        Preset("negative_prompt+p2p", "p2p", "negative_prompt", ("sd", "pixart", "sd3"),
               "Prompt-to-Prompt on negative-prompt inversion (Miyake et al.)", solver="ddim", options=PIE_P2P),
        Preset("ddim+masactrl", "masactrl", "ddim", ALL,
               "MasaCtrl on plain DDIM inversion; as the paper's code, the image is inverted and the source branch "
               "regenerated under the empty prompt (the bare 'masactrl' method uses the source prompt)",
               solver="ddim", source_branch_prompt="", inversion_guidance=7.5),
        Preset("direct+masactrl", "masactrl", "direct", ALL,
               "MasaCtrl with Direct Inversion; empty source-branch prompt as in PnP-Inversion's code",
               source_branch_prompt=""),
        Preset("dit4edit", "unified", "dpmpp", ("pixart",),
               "DiT4Edit on PixArt: DPM-Solver++ inversion (fixed-point corrected), 30 steps, CFG 4.5, "
               "unified attention control", solver="dpmpp", num_steps=30, guidance=4.5),
        Preset("direct+dit4edit", "unified", "direct", ("pixart",),
               "DiT4Edit's unified control with Direct Inversion's source correction on DPM-Solver++",
               solver="dpmpp", num_steps=30, guidance=4.5),
        Preset("rf_inversion", "rf_control", "rf_inversion", ("sd3", "flux"),
               "RF-Inversion (Rout et al.): controlled forward ODE (gamma 0.5) from an empty-prompt, guidance-0 "
               "inversion, controlled reverse ODE (eta 0.9 over the first 25% of 28 steps)",
               solver="flow_euler", num_steps=28, inversion_prompt="", inversion_guidance=0.0,
               options={"eta": 0.9, "start": 0.0, "stop": 0.25}, inversion_options={"gamma": 0.5}),
        Preset("rf_solver", "masactrl", "rf_solver", ("sd3", "flux"),
               "RF-Solver-Edit: second-order midpoint inversion and sampling, source value injection in the "
               "deeper half of the blocks for the first 20% of the steps",
               solver="rf_solver", options={"start_step": 0, "end_step": 0.2, "start_layer": 0.5, "share": "v"}),
        Preset("fireflow", "masactrl", "fireflow", ("sd3", "flux"),
               "FireFlow: midpoint inversion and sampling reusing velocities (~1 NFE per step), source value "
               "injection as RF-Solver-Edit", solver="fireflow",
               options={"start_step": 0, "end_step": 0.2, "start_layer": 0.5, "share": "v"}),
        Preset("ddim+pnp", "pnp", "ddim", ALL,
               "Plug-and-Play (Tumanyan et al.) on plain DDIM inversion: features for the first 80% of the steps, "
               "self-attention Q/K for the first 50%", solver="ddim",
               options={"feature_steps": 0.8, "attn_steps": 0.5}),
        Preset("direct+pnp", "pnp", "direct", ALL,
               "Plug-and-Play with Direct Inversion (PnP Inversion: the source branch follows the inversion latents)",
               options={"feature_steps": 0.8, "attn_steps": 0.5}),
        Preset("ddim+p2pzero", "p2p_zero", "ddim", ALL,
               "Pix2Pix-Zero (Parmar et al.) on plain DDIM inversion: edit direction + cross-attention guidance 0.1",
               solver="ddim", options={"xa_guidance": 0.1}),
        Preset("direct+p2pzero", "p2p_zero", "direct", ALL,
               "Pix2Pix-Zero with Direct Inversion, target branch untouched (paper-faithful; "
               "add_source_offset=true for PnP-Inversion's released variant)", options={"xa_guidance": 0.1}),
        Preset("disentangle", "disentangle", None, ALL,
               "Wu et al. disentanglement: per-step neutral/target embedding mixing; weights=PATH applies saved "
               "weights, otherwise they are optimised on the image (directional CLIP + content loss, Adam 0.05, "
               "clip_model=PATH; save_to=PATH keeps them)"),
    )
}  # fmt: skip


# what `retouch edit` uses when no --method is given
DEFAULT_METHOD = {"sd": "direct+p2p", "pixart": "dit4edit", "sd3": "direct+p2p", "flux": "rf_inversion"}


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name)
