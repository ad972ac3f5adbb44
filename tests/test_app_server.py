"""The served app through gradio's client on a tiny model: edits, bad input, file access, the queue limit.

`retouch app` runs in a subprocess on a free 127.0.0.1 port with a tiny random SD pipeline and a queue of one.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import random_image

gradio_client = pytest.importorskip("gradio_client")
pytest.importorskip("gradio")

START_TIMEOUT_S = 180


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from retouch.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("app")
    model = save_tiny_pipeline("sd", root / "tiny-sd")
    workdir = root / "workdir"
    port = _free_port()
    cmd = [sys.executable, "-m", "retouch.cli", "app", "--model", str(model), "--port", str(port), "--workdir",
           str(workdir), "--queue-size", "1", "--threads", "1", "--max-upload-bytes", "200000"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("retouch app: serving"):
                started.set()

    threading.Thread(target=read, daemon=True).start()
    t0 = time.monotonic()
    while not started.wait(0.2):
        if proc.poll() is not None or time.monotonic() - t0 > START_TIMEOUT_S:
            proc.kill()
            raise AssertionError("retouch app did not start:\n" + "".join(lines))
    url = f"http://127.0.0.1:{port}/"
    try:
        yield {"url": url, "workdir": workdir, "root": root, "proc": proc, "lines": lines}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def image(server) -> str:
    path = server["root"] / "input.png"
    random_image(32, 32, seed=2).save(path)
    return str(path)


def _edit(client, image: str, *, steps: int = 3, target: str = "a blue circle", method: str = "ddim+p2p",
          options: str = "", job: bool = False):  # fmt: skip
    args = (gradio_client.handle_file(image), "a red circle", target, method, steps, 7.5, 0, "", options, 0.0, False)
    if job:
        return client.submit(*args, api_name="/edit")
    return client.predict(*args, api_name="/edit")


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_edit_bad_input_and_the_server_keeps_serving(server, image, tmp_path):
    client = gradio_client.Client(server["url"], verbose=False)
    out = _edit(client, image)
    result, _, _, summary, report, files, status, _ = out
    assert Path(result).is_file() and status == "Done."
    assert "NFE 3 inversion + 3 sampling = 6" in summary
    assert report["config"]["target_prompt"] == "a blue circle" and report["model"].endswith("tiny-sd")
    assert sorted(Path(f).name for f in files) == ["edited.png", "edited.png.json"]

    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all\n" * 30)
    oversized = tmp_path / "big.png"
    random_image(300, 300, seed=3).save(oversized)  # ~270 kB of noise: over the 200 kB limit
    for path, kw, message in [
        (str(garbage), {}, "not an image this server can decode"),
        (image, {"target": "  "}, "target prompt is empty"),
        (image, {"method": "rf_inversion"}, "rf_inversion is not in the list of choices"),  # gradio's check
        (image, {"options": "cross_steps=lots"}, "option cross_steps: expected a number"),
        (image, {"options": "no_such_option=1"}, "unknown option"),
    ]:
        with pytest.raises(Exception, match=message):
            _edit(client, path, **kw)
    with pytest.raises(Exception):  # noqa: B017 - refused at upload by gradio's max_file_size
        _edit(client, str(oversized))
    assert server["proc"].poll() is None
    assert _edit(client, image)[6] == "Done."


def test_no_file_outside_the_working_folder_can_be_read(server, image):
    client = gradio_client.Client(server["url"], verbose=False)
    _edit(client, image)
    base = server["url"] + "gradio_api/file="
    outside = [
        "/etc/passwd",
        str(Path(__file__).resolve()),
        image,  # the test's own input file, outside the app's folder
        str(server["root"] / "tiny-sd" / "model_index.json"),
        str(server["workdir"]) + "/../tiny-sd/model_index.json",
    ]
    for path in outside:
        assert _status(base + path) in (403, 404), path
    result = next((server["workdir"] / "edits").glob("*/edited.png"))
    assert _status(base + str(result)) == 200


def test_a_full_queue_refuses_politely_and_every_client_gets_an_answer(server, image):
    client = gradio_client.Client(server["url"], verbose=False)
    jobs = [_edit(client, image, steps=60, job=True) for _ in range(6)]
    answers: list[str] = []
    for job in jobs:
        try:
            job.result(timeout=300)
            answers.append("done")
        except cf.TimeoutError:
            answers.append("timeout")
        except Exception as exc:  # noqa: BLE001 - the answer is in the message
            answers.append("full" if "queue is full" in str(exc).lower() else f"error: {exc}")
    assert "timeout" not in answers and not [a for a in answers if a.startswith("error")], answers
    assert "full" in answers and "done" in answers, answers
    assert server["proc"].poll() is None
    assert _edit(client, image)[6] == "Done."
