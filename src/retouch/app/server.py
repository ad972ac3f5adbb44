"""Starting the server of ``retouch app``: gradio kept offline, its files inside the app's working folder."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from retouch.app.service import AppConfig, EditorService


def _configure_gradio_env(workdir: Path) -> None:
    """Keep gradio offline and its files inside the app's working folder (set before gradio is imported)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(workdir / "cache")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch(config: AppConfig) -> tuple[Any, str]:
    """Load the model, build the page and start serving on ``config.host:config.port`` (0: a free port).

    Returns the running gradio Blocks and its local URL; ``blocks.block_thread()`` serves until interrupted.
    """
    workdir = Path(config.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _configure_gradio_env(workdir)
    import gradio as gr

    from retouch.app.ui import CSS, build

    service = EditorService.load(config)
    demo = build(service)
    demo.queue(max_size=config.queue_size, default_concurrency_limit=1)
    port = config.port or free_port(config.host)
    demo.launch(
        server_name=config.host,
        server_port=port,
        allowed_paths=[str(workdir)],
        max_file_size=config.max_upload_bytes,
        show_error=True,
        ssr_mode=False,
        quiet=True,
        prevent_thread_lock=True,
        footer_links=["api"],
        theme=gr.themes.Default(),
        css=CSS,
    )
    return demo, f"http://{config.host}:{port}/"
