"""Named presets reproducing the papers' setups. Every field can be overridden (CLI flags, EditConfig)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ALL = ("sd", "pixart", "sd3", "flux", "qwenimage", "sana", "flux2", "zimage")
FLOW = ("sd3", "flux", "qwenimage", "sana", "flux2", "zimage")


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
    inversion_skip: float | None = None
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
        Preset("null_text+p2p", "p2p", "null_text", ("sd", "pixart", "sd3", "qwenimage", "sana"),
               "Prompt-to-Prompt on null-text inversion (Mokady et al.)", solver="ddim", options=PIE_P2P),
        Preset("negative_prompt+p2p", "p2p", "negative_prompt", ("sd", "pixart", "sd3", "qwenimage", "sana"),
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
        Preset("rf_inversion", "rf_control", "rf_inversion", FLOW,
               "RF-Inversion (Rout et al.): controlled forward ODE (gamma 0.5) from an empty-prompt, guidance-0 "
               "inversion, controlled reverse ODE (eta 0.9 over the first 25% of 28 steps), target branch only",
               solver="flow_euler", num_steps=28, inversion_prompt="", inversion_guidance=0.0,
               options={"eta": 0.9, "start": 0.0, "stop": 0.25}, inversion_options={"gamma": 0.5}),
        Preset("rf_inversion_ref", "rf_control", "rf_inversion", ("sd3", "flux"),
               "RF-Inversion exactly as diffusers' community pipeline runs it: rf_inversion's settings with its "
               "forward-ODE schedule (model at t = i/(N+1), shifted gaps read from the noisy end) and a VAE "
               "posterior sample",
               solver="flow_euler", num_steps=28, inversion_prompt="", inversion_guidance=0.0,
               options={"eta": 0.9, "start": 0.0, "stop": 0.25},
               inversion_options={"gamma": 0.5, "schedule": "community", "posterior": "sample"}),
        Preset("rf_solver", "masactrl", "rf_solver", FLOW,
               "RF-Solver-Edit: second-order midpoint inversion and sampling, source value injection in the "
               "deeper half of the blocks for the first 20% of the steps",
               solver="rf_solver", options={"start_step": 0, "end_step": 0.2, "start_layer": 0.5, "share": "v"}),
        Preset("fireflow", "masactrl", "fireflow", FLOW,
               "FireFlow: midpoint inversion and sampling reusing velocities (~1 NFE per step), source value "
               "injection as RF-Solver-Edit", solver="fireflow",
               options={"start_step": 0, "end_step": 0.2, "start_layer": 0.5, "share": "v"}),
        Preset("rf_solver_ref", "value_replay", "rf_solver", ("flux",),
               "RF-Solver-Edit as its official code runs (run_boy.sh): midpoint inversion and sampling, 15 steps, "
               "guidance 2, values of the single-stream blocks from 20/38 on stored during inversion and replayed in "
               "the first 2 sampling steps, no source branch", solver="rf_solver", num_steps=15, guidance=2.0,
               inversion_guidance=1.0, options={"inject": 2, "start_layer": 20 / 38},
               inversion_options={"posterior": "sample"}),
        Preset("fireflow_ref", "value_replay", "fireflow", ("flux",),
               "FireFlow as its official code runs (run_boy.sh): velocity-reusing midpoint inversion and sampling, "
               "8 steps, guidance 2, values of all single-stream blocks stored during inversion and replayed in the "
               "first sampling step, no source branch", solver="fireflow", num_steps=8, guidance=2.0,
               inversion_guidance=1.0, options={"inject": 1, "start_layer": 0},
               inversion_options={"posterior": "sample"}),
        Preset("flowedit", "flowedit", "none", ("flux", "flux2"),
               "FlowEdit (Kulikov et al.), FlowEdit repo's FLUX_exp.yaml: inversion-free ODE on the target-minus-"
               "source velocity, 28 steps, the last n_max=24 integrated, source / target guidance 1.5 / 5.5, n_avg 1 "
               "(the guidance-embedding scales: Flux, FLUX.2-dev)",
               solver="flow_euler", num_steps=28, guidance=5.5,
               options={"n_max": 24, "n_min": 0, "n_avg": 1, "source_guidance": 1.5}),
        Preset("flowedit_sd3", "flowedit", "none",
               ("sd3", "sd", "pixart", "qwenimage", "sana", "zimage", "flux2"),
               "FlowEdit with the FlowEdit repo's SD3_exp.yaml: 50 steps, n_max=33, CFG 3.5 (source) / 13.5 "
               "(target); the true-CFG flow models (Qwen-Image, Sana, Z-Image, FLUX.2-klein) with the same scales; "
               "on SD / PixArt in the flow view of their DDIM grid", solver="ddim", num_steps=50,
               guidance=13.5, options={"n_max": 33, "n_min": 0, "n_avg": 1, "source_guidance": 3.5}),
        Preset("ddim+pnp", "pnp", "ddim", ALL,
               "Plug-and-Play (Tumanyan et al.) on plain DDIM inversion: features for the first 80% of the steps, "
               "self-attention Q/K for the first 50%", solver="ddim",
               options={"feature_steps": 0.8, "attn_steps": 0.5}),
        Preset("direct+pnp", "pnp", "direct", ALL,
               "Plug-and-Play with Direct Inversion (PnP Inversion: the source branch follows the inversion latents)",
               options={"feature_steps": 0.8, "attn_steps": 0.5}),
        Preset("direct+pnp_ref", "pnp", "direct", ("sd",),
               "Plug-and-Play with Direct Inversion exactly as PnP-Inversion's run_editing_pnp.py runs it: the "
               "source branch under the empty prompt without guidance, the target's negative prompt 'ugly, blurry, "
               "black, low res, unrealistic'",
               options={"feature_steps": 0.8, "attn_steps": 0.5, "source_prompt": "",
                        "negative_prompt": "ugly, blurry, black, low res, unrealistic"}),
        Preset("ddim+p2pzero", "p2p_zero", "ddim", ALL,
               "Pix2Pix-Zero (Parmar et al.) on plain DDIM inversion: edit direction + cross-attention guidance 0.1",
               solver="ddim", options={"xa_guidance": 0.1}),
        Preset("ddim+p2pzero_ref", "p2p_zero", "ddim", ("sd",),
               "Pix2Pix-Zero's released guidance step (diffusers' StableDiffusionPix2PixZeroPipeline): the SGD "
               "step on the CFG batch, the step continuing from the unconditional half's latent",
               solver="ddim", options={"xa_guidance": 0.1, "released_guidance": True}),
        Preset("direct+p2pzero_ref", "p2p_zero", "direct_p2pzero_released", ("sd",),
               "Pix2Pix-Zero with Direct Inversion exactly as PnP-Inversion's run_editing_pix2pix_zero.py runs it: "
               "its inverse scheduler and noise regulariser (lambda 20 / 20, roll amounts from random.Random(1234) "
               "as its setup_seed), the VAE posterior sampled, the source offsets added to the target, the "
               "released guidance step, the source prompt as caption and negative prompt",
               solver="ddim", options={"xa_guidance": 0.1, "add_source_offset": True, "released_guidance": True,
                                       "negative_source": True},
               inversion_options={"posterior": "sample", "reg_seed": 1234}),
        Preset("direct+p2pzero", "p2p_zero", "direct", ALL,
               "Pix2Pix-Zero with Direct Inversion, target branch untouched (paper-faithful; "
               "add_source_offset=true for PnP-Inversion's released variant)", options={"xa_guidance": 0.1}),
        Preset("disentangle", "disentangle", None, ALL,
               "Wu et al. disentanglement: per-step neutral/target embedding mixing; weights=PATH applies saved "
               "weights, otherwise they are optimised on the image (directional CLIP + content loss, Adam 0.05, "
               "clip_model=PATH; save_to=PATH keeps them)"),
        Preset("ddpm_edit", "identity", "ddpm", ("sd", "pixart"),
               "Edit-friendly DDPM inversion (Huberman-Spiegelglas et al.): noise maps of the source image under "
               "the source prompt at CFG 3.5, regenerated under the target prompt at CFG 15; 100-step grid, the "
               "first 36 skipped (64 run)", solver="ddpm", num_steps=64, guidance=15.0, inversion_guidance=3.5,
               inversion_skip=0.5625),
        Preset("ddpm+p2p", "p2p", "ddpm", ("sd", "pixart"),
               "Prompt-to-Prompt on edit-friendly DDPM inversion (the paper's DDPM + P2P combination)",
               solver="ddpm", num_steps=64, guidance=15.0, inversion_guidance=3.5, inversion_skip=0.5625),
        Preset("ledits++", "ledits", "ddpm", ("sd", "pixart"),
               "LEDITS++ (Brack et al.): edit-friendly DDPM inversion of the empty prompt, then semantic guidance "
               "per edit concept (scale 10, threshold 0.75, intersected attention / noise masks); 50 steps after "
               "skipping 10%; concepts from the prompts' changed words or edit_prompts=[...]",
               solver="ddpm", num_steps=50, guidance=1.0, inversion_prompt="", inversion_guidance=1.0,
               inversion_skip=0.1, options={"scales": 10.0, "thresholds": 0.75}),
        Preset("kv_edit", "kv_edit", None, ("pixart", "sd3", "flux", "qwenimage", "flux2", "zimage"),
               "KV-Edit (Zhu et al. 2025; needs --mask): inversion caching the background keys / values, "
               "foreground denoised against them, background latent pasted back; 28 steps, the first 4 "
               "(1/7 of the steps) skipped, inversion guidance 1.5, guidance 5.5, attention scale 1 (the "
               "released demo's settings)",
               num_steps=28, guidance=5.5, inversion_guidance=1.5, options={"skip": 4 / 28, "attn_scale": 1.0}),
        Preset("kv_edit_inf", "kv_edit", "none", ("sd3", "flux", "qwenimage", "flux2", "zimage"),
               "KV-Edit's inversion-free variant (needs --mask): noised source and target evaluated in one "
               "batch, the target's background keys / values taken from the source row, foreground moved by "
               "the velocity difference; memory constant in the steps; 28 steps, 4 (1/7) skipped, source guidance "
               "1.5, target guidance 5.5", solver="flow_euler", num_steps=28, guidance=5.5,
               options={"skip": 4 / 28, "attn_scale": 1.0, "inversion_free": True, "source_guidance": 1.5}),
    )
}  # fmt: skip


# what `retouch edit` uses when no --method is given
DEFAULT_METHOD = {"sd": "direct+p2p", "pixart": "dit4edit", "sd3": "direct+p2p", "flux": "rf_inversion"}
DEFAULT_METHOD.update(flux2="rf_inversion", zimage="direct+p2p")
DEFAULT_METHOD.update(qwenimage="direct+p2p", sana="direct+p2p")


def get_preset(name: str) -> Preset | None:
    return PRESETS.get(name)
