"""The benchmark runner: methods x cases -> ``results.jsonl``, ``summary.json``, ``report.html``.

Resumable. Every finished (case, method) is one JSON line appended with a single ``write`` of the complete line,
then ``fsync``. On start the file is read back: a trailing partial line (a kill in the middle of a write) is cut
off, and every (case, method) already present is skipped, so a run killed at any moment and started again ends
with the same rows, none lost, none duplicated. A lock file stops two runners from sharing one directory.

Sharded. ``shard=(i, n)`` runs every n-th case from i of the (deterministic) case list into ``OUT/shard-i-of-n/``;
the last shard to finish merges all of them into ``OUT/`` (as :func:`merge` does for any list of run folders).
Shards can be separate processes, GPUs or machines sharing a file system: launch them by hand with ``--shard i/n``
or with a launcher that sets ``RANK`` / ``WORLD_SIZE`` (``accelerate launch``, ``torchrun``) or Slurm's
``SLURM_PROCID`` / ``SLURM_NTASKS`` and ``--shard auto``.

Deterministic. Cases are fixed by the split seed (ShapesBench) or the mapping file (PIE-Bench); every edit uses
``EditConfig(seed=config.seed)``; so rows are the same on every run except for timings.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retouch import io
from retouch.bench.cases import BenchCase, CaseData, shard_cases
from retouch.bench.evaluate import Evaluator
from retouch.bench.report import render_html, summarize

log = logging.getLogger(__name__)

__all__ = [
    "SCHEMA",
    "BenchConfig",
    "BenchError",
    "MethodSpec",
    "ResultsLog",
    "build_cases",
    "build_evaluator",
    "merge",
    "rebuild_outputs",
    "run",
]

SCHEMA = 1
RESULTS = "results.jsonl"
SUMMARY = "summary.json"
REPORT = "report.html"
CONFIG = "config.json"
DONE = "done.json"
LOCK = ".lock"
TIMING_KEYS = ("seconds", "metric_seconds", "timings")
"""Row fields that vary between identical runs."""

Progress = Callable[[int, int, Mapping[str, Any]], None]


class BenchError(ValueError):
    """A user-facing problem with a benchmark run (bad config, busy folder, mismatched shards)."""


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One column of the benchmark: a method (preset or editor name) and optional overrides.

    ``label`` names it in the results (default: ``method``), so one method can appear with several settings.
    """

    method: str
    label: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    solver: str | None = None
    inversion: str | None = None
    num_steps: int | None = None
    guidance: float | None = None
    merge_ratio: float = 0.0
    inversion_skip: float | None = None  # None: the preset's (InversionConfig.skip)

    def __post_init__(self) -> None:
        if not self.method:
            raise BenchError("empty method name")
        if not 0.0 <= float(self.merge_ratio) <= 0.95:
            raise BenchError(
                f"merge_ratio of {self.label or self.method!r} must be in [0, 0.95], got {self.merge_ratio}"
            )
        if not self.label:
            object.__setattr__(self, "label", self.method)

    @classmethod
    def parse_list(cls, text: str) -> tuple[MethodSpec, ...]:
        """``"ddim+p2p,direct+p2p"`` -> specs."""
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names:
            raise BenchError("--methods is empty")
        return tuple(cls(method=n) for n in names)

    @classmethod
    def from_file(cls, path: str | Path) -> tuple[MethodSpec, ...]:
        """A JSON list of specs, e.g. ``[{"label": "p2p-0.6", "method": "ddim+p2p", "options": {...}}]``
        (keys: method, label, options, solver, inversion, num_steps, guidance, merge_ratio, inversion_skip)."""
        try:
            items = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise BenchError(f"cannot read methods file {path}: {err}") from None
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise BenchError(f"{path} must hold a JSON list of objects with at least a 'method'")
        try:
            return tuple(cls(**i) for i in items)
        except TypeError as err:
            raise BenchError(f"bad method spec in {path}: {err}") from None

    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.label)


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. ``None`` fields take the suite's / model's defaults.

    Args:
        suite: ``"pie"`` (PIE-Bench folder in ``data``) or ``"shapes"`` (ShapesBench split ``seed``).
        methods: what to run.
        out: output folder (``results.jsonl``, ``summary.json``, ``report.html``, ``images/``).
        model: embedded model name, local diffusers folder or hub id.
        cases: at most this many cases (PIE: round-robin over types; ShapesBench: the split's size, default 100).
        seed: ShapesBench split seed (0 = the public dev split) and the seed of every edit.
        steps / guidance: override every method's steps / guidance.
        types: keep these editing types only.
        shard: ``(i, n)``: this process runs shard i of n.
        skip_learned: do not compute metrics that need hub weights (DINO, CLIP, LPIPS); they are null with a note.
        clip_model / dino_model: weights of CLIP and DINO (defaults: PIE's hub ids; ShapesBench: shapes-clip).
        lpips: compute LPIPS (default: on for PIE, off for ShapesBench, whose metrics stay hub-free).
        blend: pass each case's blended words to editors that take ``blend_words`` (P2P local blend, as PIE).
        resolution: ShapesBench canvas side.
        options: editor options given to every method (on top of each spec's).
        save_images: write source / reconstruction / edit / ground truth PNGs under ``images/``.
        report_per_type: cases per editing type in the report's image grid.
        retry_errors: run again the (case, method) rows that ended in an error.
        mask: give every edit its case's mask (the edit region, without PIE's border rule): masked editing.
    """

    suite: str
    methods: tuple[MethodSpec, ...]
    out: str
    model: str | None = None
    cases: int | None = None
    seed: int = 0
    steps: int | None = None
    guidance: float | None = None
    data: str | None = None
    types: tuple[int, ...] | None = None
    shard: tuple[int, int] = (0, 1)
    device: str | None = None
    dtype: str = "fp32"
    metrics_device: str | None = None
    skip_learned: bool = False
    clip_model: str | None = None
    dino_model: str = "facebook/dino-vitb8"
    lpips: bool | None = None
    blend: bool = True
    resolution: int = 64
    options: Mapping[str, Any] = field(default_factory=dict)
    save_images: bool = True
    report_per_type: int = 2
    retry_errors: bool = False
    mask: bool = False

    def __post_init__(self) -> None:
        if self.suite not in ("pie", "shapes"):
            raise BenchError(f"unknown suite {self.suite!r}; choose pie or shapes")
        if not self.methods:
            raise BenchError("no methods to run")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise BenchError(f"method labels must be unique, got {labels}")
        if self.suite == "pie" and not self.data:
            raise BenchError("PIE-Bench needs its data folder (--data DIR holding mapping_file.json)")
        if self.cases is not None and self.cases < 0:
            raise BenchError(f"--cases must be >= 0, got {self.cases}")
        if self.seed < 0:
            raise BenchError(f"--seed must be >= 0, got {self.seed}")
        i, n = self.shard
        if n < 1 or not 0 <= i < n:
            raise BenchError(f"bad shard {i}/{n}: expected 0 <= i < n")
        if self.steps is not None and self.steps < 1:
            raise BenchError(f"--steps must be >= 1, got {self.steps}")

    @property
    def sharded(self) -> bool:
        return self.shard[1] > 1

    @property
    def run_dir(self) -> Path:
        """Where this process writes: ``out`` or, sharded, ``out/shard-i-of-n``."""
        i, n = self.shard
        return Path(self.out) / f"shard-{i}-of-{n}" if self.sharded else Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [{**asdict(m), "options": dict(m.options)} for m in self.methods]
        d["options"] = dict(self.options)
        d["types"] = list(self.types) if self.types is not None else None
        d["shard"] = list(self.shard)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchConfig:
        d = dict(d)
        d["methods"] = tuple(MethodSpec(**m) for m in d["methods"])
        d["types"] = tuple(d["types"]) if d.get("types") is not None else None
        d["shard"] = tuple(d.get("shard", (0, 1)))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def identity(self) -> dict[str, Any]:
        """The fields that decide the rows; a folder's rows are only resumed under the same identity."""
        d = self.to_dict()
        for k in ("out", "shard", "device", "metrics_device", "save_images", "report_per_type", "retry_errors",
                  "cases", "types"):  # fmt: skip
            d.pop(k, None)
        return d


# --------------------------------------------------------------------------------------------------------------
# Results file
# --------------------------------------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Rows as strict JSON: NaN -> None, inf -> a large finite float never happens (PSNRs are capped)."""
    if isinstance(value, float):
        if value != value:  # NaN
            return None
        if value in (float("inf"), float("-inf")):
            return None
        return value
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def row_key(row: Mapping[str, Any]) -> tuple[str, str]:
    return str(row["case_id"]), str(row["method"])


class ResultsLog:
    """An append-only JSON-lines file of rows, safe against kills (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self, *, repair: bool = False) -> list[dict[str, Any]]:
        """Every complete row. A trailing partial line is ignored (and cut off the file with ``repair``);
        undecodable complete lines are skipped with a warning (and, with ``repair``, removed from the file
        after a copy of it is kept beside as ``results.jsonl.bad-<time>``); later duplicates of a key are
        dropped."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # bytes up to the last complete line
        if end < len(data):
            log.warning("%s: ignoring a partial last line (%d bytes; the run was killed mid-write)",
                        self.path, len(data) - end)  # fmt: skip
            if repair:
                with open(self.path, "r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        rows: list[dict[str, Any]] = []
        seen: set[tuple[str, str]] = set()
        kept: list[bytes] = []
        bad = 0
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = row_key(row)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                log.warning("%s:%d: skipping an undecodable line", self.path, n)
                bad += 1
                continue
            kept.append(line)
            if key in seen:
                log.warning("%s:%d: skipping a duplicate of %s", self.path, n, key)
                continue
            seen.add(key)
            rows.append(row)
        if repair and bad:
            copy = self.path.with_name(f"{self.path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
            io.atomic_write(copy, lambda p: p.write_bytes(data))
            text = b"".join(line + b"\n" for line in kept)
            io.atomic_write(self.path, lambda p: p.write_bytes(text))
            log.warning("%s: removed %d undecodable line(s); the file as it was is kept at %s", self.path, bad, copy)
        return rows

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row as a single complete line, then fsync."""
        line = (json.dumps(_jsonable(row), sort_keys=True, allow_nan=False) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def rewrite(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Replace the file atomically with ``rows``."""
        text = "".join(json.dumps(_jsonable(r), sort_keys=True, allow_nan=False) + "\n" for r in rows)
        io.atomic_write(self.path, lambda p: p.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def _locked(folder: Path, *, wait: bool = False) -> Iterator[None]:
    """An exclusive advisory lock on ``folder/.lock`` for the duration of a run (``wait``: block until free,
    as merges do: two shards finishing together both merge, one after the other, to the same result)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(folder / LOCK, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BenchError(f"another benchmark process is writing to {folder}") from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------------------
# Cases, evaluator, methods
# --------------------------------------------------------------------------------------------------------------


def build_cases(cfg: BenchConfig) -> list[BenchCase]:
    """The suite's full ordered case list (before sharding)."""
    types = set(cfg.types) if cfg.types is not None else None
    if cfg.suite == "pie":
        from retouch.bench.pie import pie_cases

        return pie_cases(cfg.data, types=types, limit=cfg.cases)
    from retouch.bench.shapes import DEV_SPLIT_SIZE, shapes_cases

    n = DEV_SPLIT_SIZE if cfg.cases is None else cfg.cases
    return shapes_cases(cfg.seed, n, resolution=cfg.resolution, types=cfg.types)


def default_shapes_clip() -> str | None:
    """The embedded shapes-clip folder, or ``None`` when it is not installed."""
    from retouch.models import registry

    path = registry.embedded_dir() / "shapes-clip"
    return str(path) if (path / "config.json").is_file() else None


def build_evaluator(cfg: BenchConfig) -> Evaluator:
    """The suite's metrics; loads learned models now (missing weights fail before any edit is run)."""
    device = cfg.metrics_device or cfg.device
    if cfg.suite == "pie":
        return Evaluator.for_pie(
            skip_learned=cfg.skip_learned,
            dino=cfg.dino_model,
            clip=cfg.clip_model or "openai/clip-vit-large-patch14",
            lpips=True if cfg.lpips is None else cfg.lpips,
            device=device,
        )
    clip = cfg.clip_model or default_shapes_clip()
    if clip is None and not cfg.skip_learned:
        log.warning("shapes-clip is not installed: CLIP scores and the structure distance are skipped")
    return Evaluator.for_shapes(clip=clip, skip_learned=cfg.skip_learned, lpips=bool(cfg.lpips), device=device)


def _editor_params(method: str) -> set[str]:
    from retouch.control.editors import EDITORS
    from retouch.presets import PRESETS

    preset = PRESETS.get(method)
    editor = preset.editor if preset is not None else method
    spec = EDITORS.get(editor)
    if spec is None:
        raise BenchError(f"unknown method {method!r}; choose one of {sorted({*EDITORS, *PRESETS})}")
    return set(inspect.signature(spec.factory).parameters) - {"backbone", "config"}


def _check_methods(cfg: BenchConfig) -> dict[str, set[str]]:
    params = {}
    for m in cfg.methods:
        accepted = _editor_params(m.method)
        unknown = sorted(set({**cfg.options, **m.options}) - accepted)
        if unknown:
            raise BenchError(f"method {m.label!r} does not take option(s) {unknown}; it takes {sorted(accepted)}")
        params[m.label] = accepted
    return params


def method_families(method: str) -> tuple[str, ...]:
    """The model families a method (preset or editor) runs on."""
    from retouch.control.editors import EDITORS
    from retouch.presets import PRESETS

    preset = PRESETS.get(method)
    if preset is not None:
        return tuple(f for f in preset.families if f in EDITORS[preset.editor].families)
    return tuple(EDITORS[method].families)


def check_families(cfg: BenchConfig, family: str) -> None:
    """Refuse, before any case runs, methods the model's family cannot run (every row would be an error)."""
    bad = [(m.label, method_families(m.method)) for m in cfg.methods if family not in method_families(m.method)]
    if bad:
        detail = "; ".join(f"{label} runs on {', '.join(fams)}" for label, fams in bad)
        raise BenchError(f"the model {cfg.model!r} is a {family} model, which these methods cannot run: {detail}")


def _edit_config(cfg: BenchConfig, spec: MethodSpec, case: BenchCase, accepted: set[str]) -> Any:
    from retouch.config import EditConfig, InversionConfig, MergeConfig

    options = {**cfg.options, **spec.options}
    if cfg.blend and case.blended_word and "blend_words" in accepted and "blend_words" not in options:
        options["blend_words"] = case.blended_word
    return EditConfig(
        source_prompt=case.source_prompt,
        target_prompt=case.target_prompt,
        method=spec.method,
        solver=spec.solver,
        num_steps=spec.num_steps or cfg.steps,
        guidance=spec.guidance if spec.guidance is not None else cfg.guidance,
        seed=cfg.seed,
        inversion=InversionConfig(name=spec.inversion, skip=spec.inversion_skip),
        options=options,
        merge=MergeConfig(ratio=float(spec.merge_ratio)),
    )


def _fit(image: Image.Image, size_hw: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """The edit at the source's size (bicubic when the model worked at another size)."""
    h, w = size_hw
    if image.size == (w, h):
        return np.asarray(image.convert("RGB")), False
    return np.asarray(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)), True


# --------------------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------------------


def _save(image: np.ndarray, folder: Path, rel: str) -> str:
    path = folder / rel
    if not path.exists():
        io.save_image(Image.fromarray(image), path)
    return rel


def _case_images(cfg: BenchConfig, folder: Path, case: BenchCase, data: CaseData) -> dict[str, str]:
    if not cfg.save_images:
        return {}
    out = {"source": _save(data.source_image, folder, f"images/{case.case_id}/source.png")}
    if data.gt_image is not None:
        out["gt"] = _save(data.gt_image, folder, f"images/{case.case_id}/gt.png")
    return out


def _one(
    cfg: BenchConfig,
    backbone: Any,
    evaluator: Evaluator,
    case: BenchCase,
    data: CaseData,
    spec: MethodSpec,
    accepted: set[str],
    folder: Path,
) -> dict[str, Any]:
    """Run one (case, method) and build its row (errors are recorded in the row, not raised)."""
    from retouch.editing import edit

    row: dict[str, Any] = {
        "schema": SCHEMA,
        "suite": cfg.suite,
        "case_id": case.case_id,
        "case_index": case.index,
        "method": spec.label,
        "method_name": spec.method,
        "type_id": case.type_id,
        "type_name": case.type_name,
        "seed": cfg.seed,
        "model": cfg.model,
        "source_prompt": case.source_prompt,
        "target_prompt": case.target_prompt,
        "blended_word": case.blended_word,
        "meta": dict(case.meta),
        "error": None,
    }
    try:
        edit_cfg = _edit_config(cfg, spec, case, accepted)
        row["options"] = dict(edit_cfg.options)
        if cfg.mask and data.edit_mask is None:
            raise ValueError(f"case {case.case_id} has no mask to edit with")
        result = edit(backbone, Image.fromarray(data.source_image), edit_cfg, mask=data.edit_mask if cfg.mask else None)
    except (ValueError, TypeError, RuntimeError) as err:
        log.warning("%s / %s failed: %s", case.case_id, spec.label, err)
        row.update(error=f"{type(err).__name__}: {err}", metrics={}, notes={}, seconds=None, nfe=None)
        return row
    report = result.report
    size = data.source_image.shape[:2]
    edited, resized = _fit(result.image, size)
    # methods without a source branch (RF-Inversion as released, value replay) have no reconstruction
    recon = _fit(result.reconstruction, size)[0] if result.reconstruction is not None else None
    row["model"] = cfg.model or report.get("model")
    t0 = time.perf_counter()
    try:
        metrics, notes = evaluator.evaluate(case, data, edited, recon)
    except (ValueError, TypeError, RuntimeError) as err:
        log.warning("%s / %s: metrics failed: %s", case.case_id, spec.label, err)
        metrics, notes = {}, {}
        row["error"] = f"metrics: {type(err).__name__}: {err}"
    row.update(
        metrics=metrics,
        notes=notes,
        seconds=report["timings"]["total"],
        timings=report["timings"],
        metric_seconds=round(time.perf_counter() - t0, 4),
        nfe=report["nfe"]["total"],
        nfe_detail=report["nfe"],
        steps=report["num_steps"],
        guidance=report["guidance"],
        inversion=report["inversion"],
        solver=report["solver"],
        editor=report["editor"],
        merge=report.get("merge"),
        resized_for_metrics=resized,
    )
    if cfg.save_images:
        slug = spec.slug()
        row["images"] = {
            **_case_images(cfg, folder, case, data),
            "edit": _save(edited, folder, f"images/{case.case_id}/{slug}.edit.png"),
            "recon": _save(recon, folder, f"images/{case.case_id}/{slug}.recon.png") if recon is not None else None,
        }
    return row


def _check_identity(folder: Path, cfg: BenchConfig) -> None:
    path = folder / CONFIG
    if not path.is_file():
        return
    try:
        old = BenchConfig.from_dict(json.loads(path.read_text())).identity()
    except (json.JSONDecodeError, TypeError, KeyError, ValueError):
        log.warning("%s is unreadable; it will be replaced", path)
        return
    new = cfg.identity()
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "methods")
    if changed:
        raise BenchError(
            f"{folder} holds results of a different run (changed: {', '.join(changed)}); "
            "use another --out folder or delete it"
        )


def run(
    cfg: BenchConfig,
    *,
    backbone: Any = None,
    evaluator: Evaluator | None = None,
    progress: Progress | None = None,
) -> Path:
    """Run (or resume) a benchmark; returns the folder with ``results.jsonl``, ``summary.json``, ``report.html``.

    ``backbone`` and ``evaluator`` may be passed in (tests, notebooks); otherwise they are loaded from ``cfg``.
    Sharded, returns ``cfg.out`` when this shard completed the set and merged it, else the shard's folder.
    """
    if cfg.suite == "shapes" and cfg.clip_model is None and not cfg.skip_learned and default_shapes_clip():
        cfg = replace(cfg, clip_model=default_shapes_clip())  # recorded, so a later install is a different run
    folder = cfg.run_dir
    accepted = _check_methods(cfg)
    all_cases = build_cases(cfg)
    cases = shard_cases(all_cases, cfg.shard)
    with _locked(folder):
        _check_identity(folder, cfg)
        results = ResultsLog(folder / RESULTS)
        rows = results.read()
        if cfg.retry_errors:
            rows = [r for r in rows if not r.get("error")]
        done = {row_key(r) for r in rows}
        todo = [(c, m) for c in cases for m in cfg.methods if (c.case_id, m.label) not in done]
        total = len(cases) * len(cfg.methods)
        log.info("%s: %d cases x %d methods, %d rows done, %d to run", folder, len(cases), len(cfg.methods),
                 total - len(todo), len(todo))  # fmt: skip
        if todo:  # load everything before writing anything: missing weights leave the folder untouched
            evaluator = evaluator or build_evaluator(cfg)
            backbone = backbone if backbone is not None else _load_backbone(cfg)
            check_families(cfg, backbone.family)
        io.save_json(cfg.to_dict(), folder / CONFIG)
        (folder / DONE).unlink(missing_ok=True)
        rows = results.read(repair=True)
        if cfg.retry_errors and any(r.get("error") for r in rows):
            results.rewrite([r for r in rows if not r.get("error")])
        if todo:
            finished = total - len(todo)
            current: tuple[str, CaseData] | None = None
            for case, spec in todo:
                if current is None or current[0] != case.case_id:
                    current = (case.case_id, case.load())
                row = _one(cfg, backbone, evaluator, case, current[1], spec, accepted[spec.label], folder)
                results.append(row)
                finished += 1
                if progress is not None:
                    progress(finished, total, row)
        ev_info = evaluator.describe() if evaluator is not None else _previous_evaluator(folder)
        rows = results.read()
        _write_outputs(folder, cfg, rows, ev_info)
        io.save_json({"rows": len(rows), "cases": len(cases), "shard": list(cfg.shard)}, folder / DONE)
    if cfg.sharded:
        return _maybe_merge(cfg)
    return folder


def _load_backbone(cfg: BenchConfig) -> Any:
    from retouch.backbones import load_backbone

    if cfg.model is None:
        raise BenchError("no model given (--model)")
    return load_backbone(cfg.model, device=cfg.device, dtype=cfg.dtype)


def _previous_evaluator(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / SUMMARY).read_text()).get("evaluator", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _sorted_rows(rows: Sequence[Mapping[str, Any]], labels: Sequence[str]) -> list[Mapping[str, Any]]:
    order = {label: i for i, label in enumerate(labels)}
    return sorted(
        rows, key=lambda r: (r.get("case_index", 0), r["case_id"], order.get(r["method"], len(order)), r["method"])
    )


def _write_outputs(folder: Path, cfg: BenchConfig, rows: Sequence[Mapping[str, Any]], ev: Mapping[str, Any]) -> None:
    labels = [m.label for m in cfg.methods]
    rows = _sorted_rows(rows, labels)
    summary = summarize(rows, suite=cfg.suite, methods=labels, config=cfg.to_dict(), evaluator=ev)
    io.save_json(_jsonable(summary), folder / SUMMARY)
    page = render_html(summary, rows, per_type=cfg.report_per_type)
    io.atomic_write(folder / REPORT, lambda p: p.write_text(page, encoding="utf-8"))


def rebuild_outputs(folder: str | Path) -> Path:
    """Rewrite ``summary.json`` and ``report.html`` of a run folder from its ``results.jsonl``."""
    folder = Path(folder)
    try:
        cfg = BenchConfig.from_dict(json.loads((folder / CONFIG).read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise BenchError(f"{folder} is not a benchmark run folder ({err})") from None
    _write_outputs(folder, cfg, ResultsLog(folder / RESULTS).read(), _previous_evaluator(folder))
    return folder


# --------------------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------------------


def _shard_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("shard-*-of-*") if (p / RESULTS).is_file() or (p / CONFIG).is_file())


def _maybe_merge(cfg: BenchConfig) -> Path:
    """Merge the shards into ``cfg.out`` once every shard of the set has written its done marker."""
    root = Path(cfg.out)
    n = cfg.shard[1]
    expected = [root / f"shard-{i}-of-{n}" for i in range(n)]
    pending = [p.name for p in expected if not (p / DONE).is_file()]
    if pending:
        log.info("shard %d/%d done; waiting for %s", cfg.shard[0], n, ", ".join(pending))
        return cfg.run_dir
    merge(expected, root)
    return root


def merge(inputs: Sequence[str | Path], out: str | Path) -> Path:
    """Merge run folders (or folders holding ``shard-*`` folders) into ``out`` without duplicates.

    Rows are keyed by (case, method): the first row without an error wins. Images are copied into ``out``.
    All inputs must be runs of the same suite and settings (their ``config.json``).
    """
    out = Path(out)
    folders: list[Path] = []
    for p in map(Path, inputs):
        if (p / CONFIG).is_file() and p.resolve() != out.resolve():
            folders.append(p)
        shards = _shard_dirs(p)
        folders.extend(s for s in shards if s not in folders)
        if not (p / CONFIG).is_file() and not shards:
            raise BenchError(f"{p} is neither a benchmark run folder nor a folder of shard-* runs")
    if not folders:
        raise BenchError("nothing to merge")
    configs = []
    for f in folders:
        try:
            configs.append(BenchConfig.from_dict(json.loads((f / CONFIG).read_text())))
        except (OSError, json.JSONDecodeError) as err:
            raise BenchError(f"cannot read {f / CONFIG}: {err}") from None
    base = configs[0]
    for f, c in zip(folders, configs, strict=True):
        a, b = base.identity(), c.identity()
        changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k != "methods")
        if changed:
            raise BenchError(f"{f} is a run with other settings ({', '.join(changed)}) than {folders[0]}")
    labels = list(dict.fromkeys(m.label for c in configs for m in c.methods))
    specs = {m.label: m for c in configs for m in c.methods}
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for f in folders:
        for row in ResultsLog(f / RESULTS).read():
            key = row_key(row)
            if key in merged and not merged[key].get("error"):
                continue
            row = dict(row)
            images = dict(row.get("images") or {})
            for name, rel in images.items():
                src, dst = f / rel, out / rel
                if src.is_file() and src.resolve() != dst.resolve() and not dst.exists():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    io.atomic_write(dst, lambda p, src=src: shutil.copyfile(src, p))
                images[name] = rel
            row["images"] = images
            merged[key] = row
    cfg = BenchConfig.from_dict(
        {**base.to_dict(), "out": str(out), "shard": (0, 1), "methods": [asdict(specs[label]) for label in labels]}
    )
    rows = _sorted_rows(list(merged.values()), labels)
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out, wait=True):
        io.save_json(cfg.to_dict(), out / CONFIG)
        ResultsLog(out / RESULTS).rewrite(rows)
        _write_outputs(out, cfg, rows, _previous_evaluator(folders[0]))
    log.info("merged %d rows from %d folders into %s", len(rows), len(folders), out)
    return out
