"""The editing page (gradio Blocks) behind ``retouch app``.

All editing goes through :class:`~retouch.app.service.EditorService`, i.e. :func:`retouch.editing.edit`.
Import it through :func:`retouch.app.server.launch`, which sets gradio's environment first.
"""

import logging
import secrets
import time
import types
from pathlib import Path
from typing import Any

import gradio as gr

from retouch.app.service import (
    CancelBoard,
    EditorService,
    EditRequest,
    Outcome,
    UploadError,
    prompt_diff,
)
from retouch.editing import Cancelled

log = logging.getLogger(__name__)

# small ShapesWorld images: show pixels as pixels, and the input and result at a readable size
CSS = """
#input-image img, #result img, #compare img, #examples img, #history img, #attention-maps img {
  image-rendering: pixelated;
}
#input-image img, #result img { width: 100%; height: 100%; object-fit: contain; }
"""
HISTORY_LIMIT = 50  # entries kept per browser tab
CANCEL_MEMORY_S = 3600.0  # how long a session's last Cancel is remembered


def build(service: EditorService) -> Any:
    """The page: input and prompts, method and advanced options, Edit / Reconstruct / Cancel, results, history."""

    methods = service.methods()
    descriptions = {m.name: m.description for m in methods}
    default_method = service.default_method()
    defaults = service.method_defaults(default_method)
    examples = service.examples()
    cancels = CancelBoard(CANCEL_MEMORY_S)

    def method_info(name: str) -> str:
        return f"**{name}**: {descriptions.get(name, '')}"

    def on_method(name: str) -> tuple[Any, ...]:
        d = service.method_defaults(name)
        return method_info(name), d.steps, d.guidance, "", d.options_text()

    def on_prompts(source: str, target: str) -> list[tuple[str, str | None]]:
        return prompt_diff(source or "", target or "")

    def on_example(evt: gr.SelectData) -> tuple[Any, ...]:
        e = examples[evt.index]
        method = "direct+p2p" if "direct+p2p" in descriptions and e.get("blend_words") else default_method
        d = service.method_defaults(method)
        if e.get("blend_words") and "blend_words" in d.options:
            d = d.with_options(blend_words=e["blend_words"])
        text = d.options_text()
        status = f"example: {e.get('instruction', '')}"
        return (
            e["image"],
            e["source"],
            e["target"],
            method,
            method_info(method),
            d.steps,
            d.guidance,
            "",
            text,
            status,
        )

    def on_new_scene(method: str) -> tuple[Any, ...]:
        seed = secrets.randbelow(2**31)
        path, caption = service.new_scene(seed)
        options = service.method_defaults(method or default_method).options_text()  # no stale blend words
        return path, caption, caption, options, f"new ShapesWorld scene (seed {seed}); edit the target prompt"

    def announce() -> tuple[float, str]:
        return time.monotonic(), ""  # the submit time, and a clear cancel note

    def on_cancel(request: gr.Request) -> str:
        cancels.press(request.session_hash or "")
        return "Cancel requested: the run stops before its next step."

    def request_of(values: tuple[Any, ...]) -> EditRequest:
        image, source, target, method, steps, guidance, seed, inversion, options, merge, attention = values
        return EditRequest(
            image=image, source=source or "", target=target or "", method=method or default_method,
            steps=steps, guidance=guidance, seed=0 if seed is None else seed, inversion=inversion or None,
            options=options or "", merge_ratio=merge or 0.0, attention=bool(attention),
        )  # fmt: skip

    def run(reconstruct: bool, values: tuple[Any, ...], history: list, submitted: float, request, progress):
        session = request.session_hash or "" if request is not None else ""
        submitted = submitted or time.monotonic()  # API calls skip the announcing step
        labels = {"invert": "inversion", "sample": "sampling"}

        def step(phase: str, done: int, total: int) -> None:
            if cancels.cancelled(session, submitted):
                raise Cancelled(f"cancelled during {labels.get(phase, phase)} at step {done} of {total}")
            progress((done, total), desc=labels.get(phase, phase), unit="steps")

        try:
            if cancels.cancelled(session, submitted):
                raise Cancelled("cancelled before it started")
            req = request_of(values)
            out = service.run(req, progress=step, reconstruct=reconstruct)
        except Cancelled as exc:
            return (*[gr.skip()] * 6, f"Cancelled: {exc}. The worker is free.", gr.skip(), gr.skip())
        except (UploadError, ValueError, TypeError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the server keeps serving whatever one run does
            log.exception("run failed")
            raise gr.Error(f"the run failed: {type(exc).__name__}: {exc}", print_exception=False) from None
        history = [_history_entry(out, req), *(history or [])][:HISTORY_LIMIT]
        return (*_show(out), "Done." if not reconstruct else f"Reconstruction PSNR {out.psnr:.2f} dB.", history,
                _history_gallery(history))  # fmt: skip

    def run_edit(
        image, source, target, method, steps, guidance, seed, inversion, options, merge, attention, history,
        submitted, request: gr.Request, progress=gr.Progress(),  # noqa: B008 - gradio's injection idiom
    ):  # fmt: skip
        values = (image, source, target, method, steps, guidance, seed, inversion, options, merge, attention)
        return run(False, values, history, submitted, request, progress)

    def run_reconstruct(
        image, source, target, method, steps, guidance, seed, inversion, options, merge, attention, history,
        submitted, request: gr.Request, progress=gr.Progress(),  # noqa: B008 - gradio's injection idiom
    ):  # fmt: skip
        values = (image, source, target, method, steps, guidance, seed, inversion, options, merge, attention)
        return run(True, values, history, submitted, request, progress)

    def on_history(history: list, evt: gr.SelectData) -> tuple[Any, ...]:
        e = history[evt.index]
        s = e["settings"]
        if not Path(e["output"]).is_file():
            raise gr.Error("this edit's files were removed from the server (only the latest edits are kept)")
        shown = (e["output"], (e["input"], e["output"]), e["attention"], e["summary"], e["report"], e["files"])
        return (e["input"], s["source"], s["target"], s["method"], method_info(s["method"]), s["steps"],
                s["guidance"], s["seed"], s["inversion"] or "", s["options"], s["merge_ratio"], s["attention"],
                *shown, f"reopened edit #{len(history) - evt.index}")  # fmt: skip

    with gr.Blocks(title="retouch", analytics_enabled=False, delete_cache=(1800, 7200)) as demo:
        gr.Markdown(
            f"## retouch — text-guided image editing\nModel **{service.model_name}** ({service.family}). Give an "
            "image, describe it (source prompt), describe the edit (target prompt), press **Edit**."
        )
        history = gr.State([])
        submitted = gr.State(0.0)
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(
                    label="input image (upload, drop or paste)", type="filepath", image_mode=None,
                    sources=["upload", "clipboard"], elem_id="input-image", height=300,
                )  # fmt: skip
                image.preprocess = types.MethodType(_raw_upload, image)  # the service decodes it, within limits
                with gr.Row():
                    new_scene = gr.Button("new scene", elem_id="new-scene", visible=service.is_embedded(), size="sm")
                gallery = gr.Gallery(
                    [(e["image"], e.get("instruction", "")) for e in examples], label="examples", columns=4,
                    height=140, allow_preview=False, elem_id="examples", visible=bool(examples),
                )  # fmt: skip
            with gr.Column(scale=1):
                source = gr.Textbox(label="source prompt (describes the input)", lines=2, elem_id="source")
                target = gr.Textbox(label="target prompt (describes the edit)", lines=2, elem_id="target")
                diff = gr.HighlightedText(
                    label="what the target changes", color_map={"changed": "orange", "added": "green"},
                    elem_id="diff", show_legend=True,
                )  # fmt: skip
                method = gr.Dropdown(
                    [m.name for m in methods], value=default_method, label=f"method ({service.family} family)",
                    elem_id="method",
                )  # fmt: skip
                info = gr.Markdown(method_info(default_method), elem_id="method-info")
                with gr.Accordion("advanced", open=False, elem_id="advanced"):
                    with gr.Row():
                        steps = gr.Number(defaults.steps, label="steps", precision=0, minimum=1, elem_id="steps")
                        guidance = gr.Number(defaults.guidance, label="guidance", minimum=0, elem_id="guidance")
                        seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="seed")
                    inversion = gr.Dropdown(
                        [("method's default", ""), *[(n, n) for n in service.inversions()]], value="",
                        label="inversion", elem_id="inversion",
                    )  # fmt: skip
                    options = gr.Textbox(
                        defaults.options_text(), lines=6, elem_id="options",
                        label="method options, KEY=VALUE per line (thresholds, blend_words, reweight={\"word\": 2}...)",
                    )  # fmt: skip
                    merge = gr.Slider(0.0, 0.95, value=0.0, step=0.05, label="token merge ratio", elem_id="merge")
                    attention = gr.Checkbox(True, label="record per-word attention maps", elem_id="attention")
                with gr.Row():
                    edit_btn = gr.Button("Edit", variant="primary", elem_id="edit")
                    recon_btn = gr.Button("Reconstruct", elem_id="reconstruct")
                    cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
                # the Cancel acknowledgment has its own line: were it written to the status, its reply could
                # arrive after the run's own "Cancelled: ..." and hide it
                cancel_note = gr.Markdown("", elem_id="cancel-note")
                status = gr.Markdown("", elem_id="status")
        with gr.Row():
            result = gr.Image(label="result", type="filepath", elem_id="result", height=300, interactive=False)
            compare = gr.ImageSlider(label="before / after", type="filepath", elem_id="compare", max_height=300)
        with gr.Row():
            maps = gr.Gallery(label="attention per word (source and target branches)", columns=6, height=260,
                              elem_id="attention-maps")  # fmt: skip
        with gr.Row():
            with gr.Column():
                summary = gr.Markdown(elem_id="summary")
                files = gr.File(label="download: image and JSON sidecar", file_count="multiple", elem_id="download")
            with gr.Column(), gr.Accordion("full report (JSON)", open=False):
                report = gr.JSON(elem_id="report")
        history_gallery = gr.Gallery(label="history of this tab (click to reopen)", columns=10, height=150,
                                     object_fit="contain", allow_preview=False, elem_id="history")  # fmt: skip

        inputs = [image, source, target, method, steps, guidance, seed, inversion, options, merge, attention]
        outputs = [result, compare, maps, summary, report, files, status, history, history_gallery]
        method.input(
            on_method, method, [info, steps, guidance, inversion, options], queue=False, api_visibility="private"
        )
        for box in (source, target):
            box.change(on_prompts, [source, target], diff, queue=False, api_visibility="private")
        gallery.select(
            on_example,
            None,
            [image, source, target, method, info, steps, guidance, inversion, options, status],
            queue=False,
            api_visibility="private",
        )
        new_scene.click(
            on_new_scene, method, [image, source, target, options, status], queue=False, api_visibility="private"
        )
        edit_btn.click(announce, None, [submitted, cancel_note], queue=False, api_visibility="private").then(
            run_edit, [*inputs, history, submitted], outputs, api_name="edit", concurrency_id="model",
            concurrency_limit=1, show_progress_on=[result],
        )  # fmt: skip
        recon_btn.click(announce, None, [submitted, cancel_note], queue=False, api_visibility="private").then(
            run_reconstruct, [*inputs, history, submitted], outputs, api_name="reconstruct", concurrency_id="model",
            concurrency_limit=1, show_progress_on=[result],
        )  # fmt: skip
        cancel_btn.click(on_cancel, None, cancel_note, queue=False, api_visibility="private")
        history_gallery.select(
            on_history, history,
            [image, source, target, method, info, steps, guidance, seed, inversion, options, merge, attention,
             result, compare, maps, summary, report, files, status],
            queue=False, api_visibility="private",
        )  # fmt: skip
    return demo


def _raw_upload(component: gr.Image, payload: Any) -> str | None:
    """The uploaded file's path, undecoded: gr.Image would open it with PIL and fail with a bare exception on a
    broken file, where the service names the problem (and checks the byte and pixel limits first)."""
    if payload is None:
        return None
    if getattr(payload, "path", None):
        return str(payload.path)
    try:  # a data: URL (pasted image)
        return gr.Image.preprocess(component, payload)
    except Exception:  # noqa: BLE001 - whatever gradio's decoder raises, this is a bad paste
        raise gr.Error("the pasted data is not an image this server can decode", print_exception=False) from None


def _show(out: Outcome) -> tuple[Any, ...]:
    files = [str(out.output), str(out.sidecar)]
    return (str(out.output), (str(out.input), str(out.output)), [(str(p), c) for p, c in out.attention],
            out.summary(), out.report, files)  # fmt: skip


def _history_entry(out: Outcome, req: EditRequest) -> dict[str, Any]:
    return {
        "output": str(out.output),
        "input": str(out.input),
        "attention": [(str(p), c) for p, c in out.attention],
        "summary": out.summary(),
        "report": out.report,
        "files": [str(out.output), str(out.sidecar)],
        "settings": req.settings(),
        "caption": f"{out.kind}: {req.target if out.kind == 'edit' else req.source}"[:60],
    }


def _history_gallery(history: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["output"], e["caption"]) for e in history]
