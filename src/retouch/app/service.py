"""The web app's engine side, with no web code: one shared model, validated forms, cancellable edits.

Every edit goes through :func:`retouch.editing.edit`, the function behind ``retouch edit``; this module only
turns form values into an :class:`~retouch.config.EditConfig`, reads uploads within limits, serialises runs on
the one loaded model and writes each run's files into its own folder under the app's working folder.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from retouch import io
from retouch.app import DEFAULT_MAX_PIXELS, DEFAULT_MAX_UPLOAD_BYTES
from retouch.backbones.base import Backbone
from retouch.config import EditConfig, InversionConfig, MergeConfig, parse_options
from retouch.editing import EditResult, edit, resolve

log = logging.getLogger(__name__)

# Editor options that name files to read or write (Wu et al.'s saved weights, a CLIP folder, where to save
# weights) or take Python objects: the app never lets a browser reach the file system through them.
FILE_OPTIONS = frozenset({"weights", "clip_model", "save_to", "on_weights"})
MAX_PROMPT_CHARS = 2000
SCENE_HW = (64, 64)  # ShapesWorld's canvas, the size the embedded models were trained at (their model cards)
EXAMPLES_DIR = Path(__file__).resolve().parents[3] / "examples"  # the repository's bundled examples, if present


class UploadError(ValueError):
    """An uploaded image that cannot be used (too large, undecodable, missing)."""


@dataclass(frozen=True)
class AppConfig:
    """How ``retouch app`` runs. ``port`` 0 picks a free port; limits are per upload."""

    model: str | None = None  # None: the embedded default model
    host: str = "127.0.0.1"
    port: int = 7860
    workdir: str = "retouch-app"
    queue_size: int = 16
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_edits: int = 200
    device: str | None = None
    dtype: str = "fp32"
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port!r}")
        if not self.host:
            raise ValueError("host must not be empty")
        for label, v in (
            ("queue size", self.queue_size),
            ("max upload bytes", self.max_upload_bytes),
            ("max pixels", self.max_pixels),
            ("keep edits", self.keep_edits),
        ):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{label} must be a positive integer, got {v!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")


@dataclass(frozen=True)
class EditRequest:
    """The editing form. ``None`` / empty fields take the engine's defaults for the method."""

    image: str | None
    source: str
    target: str
    method: str
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    inversion: str | None = None
    options: str = ""  # KEY=VALUE lines, as `retouch edit --option`
    merge_ratio: float = 0.0
    attention: bool = True

    def settings(self) -> dict[str, Any]:
        """The form as plain values (history entries, sidecars)."""
        return {k: v for k, v in self.__dict__.items() if k != "image"}


@dataclass(frozen=True)
class MethodInfo:
    name: str
    description: str
    kind: str  # "preset" | "editor"


@dataclass(frozen=True)
class MethodDefaults:
    """What the engine does for a method on the loaded model when the form leaves a field empty."""

    steps: int
    guidance: float
    inversion: str
    options: dict[str, Any]

    def with_options(self, **changes: Any) -> MethodDefaults:
        return replace(self, options={**self.options, **changes})

    def options_text(self) -> str:
        return "\n".join(f"{k}={format_option(v)}" for k, v in self.options.items())


@dataclass
class Outcome:
    """One finished run: its files (all inside the app's working folder) and its report."""

    folder: Path
    input: Path  # the input at the size the model took it
    output: Path  # the edited image (or the reconstruction)
    sidecar: Path
    reconstruction: Path
    attention: list[tuple[Path, str]]
    report: dict[str, Any]
    psnr: float | None = None  # reconstruction PSNR of the source branch against the input (dB)
    kind: str = "edit"

    def summary(self) -> str:
        r = self.report
        t = r["timings"]
        merge = r.get("merge") or {}
        lines = [
            f"**{r['method']}** on `{r['model']}` ({r['family']}): {r['num_steps']} steps, guidance {r['guidance']:g}, "
            f"seed {r['seed']}",
            f"NFE {r['nfe']['inversion']} inversion + {r['nfe']['sampling']} sampling = {r['nfe']['total']}",
            "time " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()),
            f"merge ratio applied: {merge.get('applied_ratio', 0.0) if merge else 0.0:g}",
        ]
        if self.psnr is not None:
            label = "reconstruction PSNR" if self.kind == "reconstruct" else "source-branch reconstruction PSNR"
            lines.append(f"{label}: {self.psnr:.2f} dB")
        return "  \n".join(lines)


class CancelBoard:
    """Per-session Cancel presses: a run is cancelled when its session pressed Cancel after it was submitted.

    Times are ``time.monotonic()``; presses older than ``memory_s`` are forgotten (they can cancel nothing).
    """

    def __init__(self, memory_s: float = 3600.0) -> None:
        self.memory_s = memory_s
        self._at: dict[str, float] = {}
        self._lock = threading.Lock()

    def press(self, session: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._at = {k: v for k, v in self._at.items() if now - v < self.memory_s}
            self._at[session] = now

    def cancelled(self, session: str, submitted: float) -> bool:
        with self._lock:
            return self._at.get(session, float("-inf")) >= submitted

    def __len__(self) -> int:
        return len(self._at)


def format_option(value: Any) -> str:
    """An option value as typed in a KEY=VALUE line (strings raw unless they would read back as JSON)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def parse_option_lines(text: str) -> dict[str, Any]:
    """KEY=VALUE lines (blank lines and ``#`` comments skipped) -> options, values read as JSON when they are."""
    items = [line.strip() for line in (text or "").splitlines()]
    return parse_options([i for i in items if i and not i.startswith("#")], "option")


def prompt_diff(source: str, target: str) -> list[tuple[str, str | None]]:
    """The target prompt's words, each marked "changed" / "added" when it differs from the source (HighlightedText)."""
    import difflib

    src, tgt = source.split(), target.split()
    out: list[tuple[str, str | None]] = []
    for op, _, _, j1, j2 in difflib.SequenceMatcher(a=src, b=tgt, autojunk=False).get_opcodes():
        label = {"equal": None, "replace": "changed", "insert": "added"}.get(op)
        if op == "delete":
            continue
        out.extend((w + " ", label) for w in tgt[j1:j2])
    return out


class EditorService:
    """One loaded model shared by every user; runs one edit at a time (edits install processors on it)."""

    def __init__(self, backbone: Backbone, config: AppConfig, *, model_name: str | None = None) -> None:
        self.backbone = backbone
        self.config = config
        self.model_name = model_name or backbone.name
        self.family = backbone.family
        self.workdir = Path(config.workdir).expanduser().resolve()
        self.edits_dir = self.workdir / "edits"
        self.scenes_dir = self.workdir / "scenes"
        for d in (self.edits_dir, self.scenes_dir, self.workdir / "examples"):
            d.mkdir(parents=True, exist_ok=True)
        self._run_lock = threading.Lock()
        self._examples: list[dict[str, Any]] | None = None

    @classmethod
    def load(cls, config: AppConfig) -> EditorService:
        """Load the model once (embedded default when ``config.model`` is None)."""
        import torch

        from retouch.backbones import load_backbone
        from retouch.models import registry

        model = config.model or registry.default_model()
        threads = config.threads
        if threads is None and model in registry.embedded_names():
            threads = 1  # the embedded models' ops are too small to gain from more threads (as the CLI)
        if threads is not None:
            torch.set_num_threads(threads)
        backbone = load_backbone(model, device=config.device, dtype=config.dtype)
        return cls(backbone, config, model_name=model)

    # --- what the page offers ------------------------------------------------------------------------------
    def methods(self) -> list[MethodInfo]:
        """Presets then editors that the loaded family supports (the registry behind `retouch methods`)."""
        from retouch.control.editors import EDITORS
        from retouch.presets import PRESETS

        out = [MethodInfo(p.name, p.description, "preset") for p in PRESETS.values() if self.family in p.families]
        out += [  # a name that is a preset means the preset (as in `retouch methods`), whatever its families
            MethodInfo(e.name, e.description, "editor")
            for e in EDITORS.values()
            if self.family in e.families and e.name not in PRESETS
        ]
        return out

    def default_method(self) -> str:
        from retouch.presets import DEFAULT_METHOD

        return DEFAULT_METHOD[self.family]

    def inversions(self) -> list[str]:
        from retouch.inversion import INVERSIONS

        return [i.name for i in INVERSIONS.values() if self.family in i.families]

    def method_defaults(self, method: str) -> MethodDefaults:
        """The steps, guidance, inversion and editor options the engine uses for ``method`` on this model."""
        from retouch.control.editors import get_editor

        self.check_method(method)
        res = resolve(self.backbone, EditConfig("a", "a", method=method))
        params = inspect.signature(get_editor(res.editor).factory).parameters.values()
        options = {
            p.name: p.default
            for p in params
            if p.name not in ("backbone", "config", *FILE_OPTIONS)
            and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
            and p.default is not inspect.Parameter.empty
        }
        options.update({k: v for k, v in res.config.options.items() if k not in FILE_OPTIONS})
        return MethodDefaults(res.num_steps, float(res.guidance), res.inversion, options)

    def check_method(self, method: str) -> None:
        names = [m.name for m in self.methods()]
        if method not in names:
            raise ValueError(
                f"method {method!r} is not available for the {self.family} family of {self.model_name}; "
                f"choose one of: {', '.join(names)}"
            )

    # --- inputs --------------------------------------------------------------------------------------------
    def read_upload(self, path: str | None) -> Image.Image:
        """Read an uploaded image within the byte and pixel limits, as 8-bit RGB."""
        if not path:
            raise UploadError("no input image: upload one, pick an example or make a new scene")
        p = Path(path)
        if not p.is_file():
            raise UploadError("the uploaded image is no longer on the server; upload it again")
        size = p.stat().st_size
        if size > self.config.max_upload_bytes:
            raise UploadError(
                f"the image is {size / 2**20:.1f} MiB; this server takes at most "
                f"{self.config.max_upload_bytes / 2**20:.1f} MiB"
            )
        try:
            with Image.open(p) as im:  # reads the header only
                w, h = im.size
        except (UnidentifiedImageError, Image.DecompressionBombError):
            raise UploadError("the upload is not an image this server can decode (PNG, JPEG, WebP, ...)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise UploadError(f"the image is corrupt or truncated ({exc})") from None
        if w * h > self.config.max_pixels:
            raise UploadError(f"the image is {w}x{h} pixels; this server takes at most {self.config.max_pixels:,}")
        try:
            return io.load_image(p)
        except io.ImageError:
            raise UploadError("the image is corrupt or truncated and cannot be decoded") from None

    def build_config(self, req: EditRequest, *, reconstruct: bool = False) -> EditConfig:
        """The form as an EditConfig; every bad value is a ValueError naming the field."""
        source = (req.source or "").strip()
        target = (req.target or "").strip()
        if not source:
            raise ValueError("the source prompt is empty: describe the input image")
        if not reconstruct and not target:
            raise ValueError("the target prompt is empty: describe the edited image")
        for label, text in (("source", source), ("target", target)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ValueError(f"the {label} prompt is longer than {MAX_PROMPT_CHARS} characters")
        if reconstruct:
            method, target, options = "identity", source, {}
        else:
            method = req.method
            self.check_method(method)
            options = self._options(method, req.options)
        steps = _optional_int(req.steps, "steps")
        seed = _optional_int(req.seed, "seed")
        inversion = req.inversion or None
        if inversion is not None and inversion not in self.inversions():
            raise ValueError(
                f"inversion {inversion!r} does not apply to {self.family}; choose one of {', '.join(self.inversions())}"
            )
        cfg = EditConfig(
            source_prompt=source,
            target_prompt=target,
            method=method,
            num_steps=steps,
            guidance=None if req.guidance is None else float(req.guidance),
            seed=0 if seed is None else seed,
            inversion=InversionConfig(name=inversion),
            merge=MergeConfig(ratio=float(req.merge_ratio or 0.0)),
            options=options,
        )
        resolve(self.backbone, cfg)  # family / solver / inversion fit, before anything runs
        self.backbone.check_prompts([cfg.source_prompt, cfg.target_prompt])
        return cfg

    def _options(self, method: str, text: str) -> dict[str, Any]:
        try:
            given = parse_option_lines(text)
        except ValueError as exc:
            raise ValueError(f"method options: {exc}") from None
        blocked = sorted(set(given) & FILE_OPTIONS)
        if blocked:
            raise ValueError(
                f"option(s) {blocked} read or write files and are not available in the app; use `retouch edit`"
            )
        defaults = self.method_defaults(method).options
        for key, value in given.items():
            _check_option_type(key, value, defaults.get(key))
        # only what differs from the engine's defaults, so the run's config is the CLI's for the same edit
        return {k: v for k, v in given.items() if k not in defaults or defaults[k] != v}

    # --- runs ----------------------------------------------------------------------------------------------
    def run(
        self,
        req: EditRequest,
        *,
        progress: Callable[[str, int, int], None] | None = None,
        reconstruct: bool = False,
    ) -> Outcome:
        """Validate, then edit (or reconstruct) on the shared model and write the run's files.

        ``progress(phase, done, total)`` is the engine's callback: raising :class:`~retouch.editing.Cancelled`
        from it stops the run between steps and frees the model for the next one.
        """
        image = self.read_upload(req.image)
        cfg = self.build_config(req, reconstruct=reconstruct)
        with self._run_lock:  # one edit at a time on the shared model (editors install processors on it)
            result = edit(
                self.backbone, image, cfg, progress=progress, record_attention=req.attention and not reconstruct
            )
        return self._write(req, image, result, reconstruct)

    def _write(self, req: EditRequest, image: Image.Image, result: EditResult, reconstruct: bool) -> Outcome:
        folder = self.edits_dir / uuid.uuid4().hex
        folder.mkdir(parents=True)
        size = result.image.size
        fitted = io.fit_size(io.to_rgb(image), (size[1], size[0]), result.report["config"]["size_policy"])[0]
        value = io.psnr(fitted, result.reconstruction)
        kind = "reconstruct" if reconstruct else "edit"
        out_image = result.reconstruction if reconstruct else result.image
        output = folder / ("reconstruction.png" if reconstruct else "edited.png")
        sidecar = Path(str(output) + ".json")
        report = {**result.report, "app": {"settings": req.settings(), "kind": kind}}
        report["psnr" if reconstruct else "source_psnr"] = value
        io.save_image(fitted, folder / "input.png")
        io.save_image(result.reconstruction, folder / "source_branch.png")
        io.save_json({**report, "output": output.name, "input": "input.png"}, sidecar)
        io.save_image(out_image, output)
        attention = [] if reconstruct else self._attention_tiles(folder / "attention", result)
        self._prune()
        return Outcome(
            folder=folder,
            input=folder / "input.png",
            output=output,
            sidecar=sidecar,
            reconstruction=folder / "source_branch.png",
            attention=attention,
            report=report,
            psnr=value,
            kind=kind,
        )

    def _attention_tiles(self, directory: Path, result: EditResult) -> list[tuple[Path, str]]:
        """One heatmap per word and branch over that branch's image (the maps of ``--save-attention``)."""
        from retouch.control.recorder import heatmap_rgb

        tiles: list[tuple[Path, str]] = []
        images = {"source": result.reconstruction, "target": result.image}
        for branch, maps in result.extras.get("attention_maps", {}).items():
            base = images[branch]
            w, h = base.size
            scale = max(1, 256 // max(w, h))
            for key, m in maps.items():
                heat = Image.fromarray(heatmap_rgb(m)).resize((w, h), Image.Resampling.BICUBIC)
                tile = Image.blend(base, heat, 0.6).resize((w * scale, h * scale), Image.Resampling.NEAREST)
                path = io.save_image(tile, directory / f"{branch}_{key}.png")
                tiles.append((path, f"{branch}: {key.split('_', 1)[1]}"))
        return tiles

    def _prune(self) -> None:
        folders = sorted((p for p in self.edits_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in folders[: max(0, len(folders) - self.config.keep_edits)]:
            shutil.rmtree(old, ignore_errors=True)

    # --- examples and scenes -------------------------------------------------------------------------------
    def is_embedded(self) -> bool:
        from retouch.models import registry

        return self.model_name in registry.embedded_names()

    def examples(self) -> list[dict[str, Any]]:
        """The bundled examples (copied into the working folder), or four ShapesWorld cases when absent."""
        if self._examples is not None:
            return self._examples
        out: list[dict[str, Any]] = []
        dest = self.workdir / "examples"
        index = EXAMPLES_DIR / "examples.json"
        if index.is_file():
            for e in json.loads(index.read_text()):
                target = dest / e["image"]
                if not target.is_file():
                    io.atomic_write(target, lambda p, src=EXAMPLES_DIR / e["image"]: shutil.copyfile(src, p))
                out.append({**e, "image": str(target)})
        elif self.is_embedded():
            from retouch.worlds.cases import make_edit_case

            for type_id in (6, 1, 8, 7):
                case = make_edit_case(type_id, seed=1)
                target = dest / f"case_{case.case_id}.png"
                io.save_image(Image.fromarray(case.source_image), target)
                out.append(
                    {"image": str(target), "source": case.source_prompt, "target": case.target_prompt,
                     "blend_words": case.blended_word or "", "instruction": case.instruction}
                )  # fmt: skip
        self._examples = out
        return out

    def new_scene(self, seed: int) -> tuple[str, str]:
        """Render a ShapesWorld scene at 64×64 (embedded models) and caption it; returns (image path, caption)."""
        from retouch.models import registry
        from retouch.worlds import captions, shapes

        if not self.is_embedded():
            raise ValueError("new scenes are for the embedded ShapesWorld models")
        rng = np.random.default_rng(seed)
        max_objects = int(registry.world_of(self.model_name).get("max_objects", 3))
        scene = shapes.sample_scene(rng, n_objects=int(rng.integers(1, max_objects + 1)))
        pixels = shapes.render(scene, *SCENE_HW)
        path = io.save_image(Image.fromarray(pixels), self.scenes_dir / f"scene_{seed}.png")
        return str(path), captions.caption(scene, rng)


def _optional_int(value: Any, label: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a whole number, got {value!r}") from None
    if not f.is_integer():
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    return int(f)


def _check_option_type(key: str, value: Any, default: Any) -> None:
    """A value of the default's kind (a number for a number, true/false for a flag); None defaults take anything.

    The editors check ranges and meanings themselves when the run starts; this catches what they would only
    meet as a TypeError deep inside.
    """
    if default is None or value is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, kind = isinstance(value, str), "a word"
    else:
        return
    if not ok:
        shown = format_option(value)
        raise ValueError(f"option {key}: expected {kind} (default {format_option(default)}), got {shown}")
