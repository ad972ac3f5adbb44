"""`retouch app` driven in a real browser: headless Debian Chromium through selenium, loopback only.

The app runs as `retouch app` in a subprocess on a free 127.0.0.1 port with the embedded default model. The
test picks the colour example, types the target prompt, presses Edit, downloads the result from the page and
checks it with the ShapesWorld oracle (the diamond turned red and nothing else changed) and by PSNR against
the input away from the diamond. Then an undecodable upload shows its error in the page, and a second edit
still works, and the history reopens the first. Screenshots of each state are saved under the test's temporary
folder and their paths printed.

CI must run this test (it installs chromium and chromium-driver when missing): there a missing browser fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
START_TIMEOUT_S = 180
EDIT_TIMEOUT_S = 240


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """`retouch app` in a subprocess; its output is collected by a thread."""

    def __init__(self, workdir: Path, port: int) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-m", "retouch.cli", "app", "--port", str(port), "--workdir", str(workdir)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.url: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("retouch app: serving"):
                self.url = line.split(" at ", 1)[1].split()[0]

    def wait(self, timeout: float) -> str:
        t0 = time.monotonic()
        while self.url is None:
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise AssertionError("retouch app did not start:\n" + "".join(self.lines))
            time.sleep(0.2)
        return self.url

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def app(tmp_path):
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing("gradio (the app extra)")
    proc = App(tmp_path / "workdir", _free_port())
    try:
        yield proc
    finally:
        proc.stop()
        print("--- retouch app log (last 100 lines) ---\n" + "".join(proc.lines[-100:]))  # shown when a test fails


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        _missing("chromium / chromium-driver")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1400,1900", f"--user-data-dir={tmp_path / 'chrome-profile'}",
    ):  # fmt: skip
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the page's requests, checked below
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.downloads = downloads  # type: ignore[attr-defined]
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / "screenshots" / f"{name}.png"
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def _wait(driver, condition, timeout: float, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except Exception as exc:  # noqa: BLE001 - add what was awaited and the page's text
        body = driver.find_element("tag name", "body").text
        raise AssertionError(f"timed out waiting for {what}; page text:\n{body[-3000:]}") from exc


def _text(driver, elem_id: str) -> str:
    return driver.find_element("id", elem_id).text


def _type(driver, elem_id: str, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", f"#{elem_id} textarea")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    box.send_keys(text)


def _click(driver, css: str) -> None:
    el = driver.find_element("css selector", css)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    el.click()


def _choose_example(driver, index: int) -> None:
    _click(driver, f"#examples button.thumbnail-item[aria-label='Thumbnail {index + 1} of 4']")
    _wait(driver, lambda d: "example:" in _text(d, "status"), 30, "the example to fill the form")


def _edit_and_wait(driver, done_before: int) -> None:
    _click(driver, "#edit")
    _wait(driver, lambda d: len(_history_items(d)) > done_before, EDIT_TIMEOUT_S, "the edit to finish")
    _wait(driver, lambda d: "Done." in _text(d, "status"), 30, "the status to say Done.")


def _history_items(driver) -> list:
    return driver.find_elements("css selector", "#history button.thumbnail-item")


def _download(driver, name: str) -> Path:
    """Click the File component's download link of ``name``; Chrome saves it into the downloads folder."""
    anchors = driver.find_elements("css selector", "#download a")
    links = [a for a in anchors if (a.get_attribute("href") or "").endswith("/" + name)]
    assert links, f"no download link for {name}: {[a.get_attribute('href') for a in anchors]}"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", links[0])
    links[0].click()
    target = driver.downloads / name
    _wait(driver, lambda d: target.is_file() and target.stat().st_size > 0, 30, f"the download of {name}")
    time.sleep(0.5)  # Chrome renames the finished .crdownload onto the name; let it settle
    return target


def _psnr_outside(a: np.ndarray, b: np.ndarray, changed: np.ndarray, margin: int = 3) -> float:
    region = np.zeros_like(changed)
    for dy in range(-margin, margin + 1):
        for dx in range(-margin, margin + 1):
            region |= np.roll(np.roll(changed, dy, 0), dx, 1)
    keep = ~region
    assert keep.mean() > 0.8
    mse = float(np.mean((a[keep].astype(np.float64) - b[keep].astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-10))


def test_edit_in_the_browser_then_bad_upload_then_edit_again(app, browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    from retouch.bench.shapes import scene_facts
    from retouch.worlds import oracle

    case = next(e for e in json.loads((EXAMPLES / "examples.json").read_text()) if e["image"] == "colour.png")
    t0 = time.monotonic()
    url = app.wait(START_TIMEOUT_S)
    print(f"app started in {time.monotonic() - t0:.1f} s at {url}")
    assert url.startswith("http://127.0.0.1:")
    browser.get(url)
    _wait(browser, lambda d: d.find_elements("css selector", "#examples button.thumbnail-item"), 60, "the page")
    _shot(browser, tmp_path, "01_start")

    # choose the example, type the target prompt: the changed word is highlighted
    _choose_example(browser, 0)
    assert _text(browser, "method-info").startswith("direct+p2p")
    _type(browser, "target", case["target"])
    _wait(browser, lambda d: "red" in _text(d, "diff"), 30, "the prompt difference")
    _shot(browser, tmp_path, "02_example_and_target")

    _edit_and_wait(browser, 0)
    _wait(browser, lambda d: d.find_elements("css selector", "#attention-maps img"), 30, "the attention maps")
    summary = _text(browser, "summary")
    assert "NFE 28 inversion + 28 sampling = 56" in summary, summary
    _shot(browser, tmp_path, "03_result")

    # the downloaded image: the oracle reads the ground-truth target scene; the rest of the picture stayed
    out = np.asarray(Image.open(_download(browser, "edited.png")).convert("RGB"))
    sidecar = json.loads(_download(browser, "edited.png.json").read_text())
    assert sidecar["method"] == "direct+p2p" and sidecar["config"]["target_prompt"] == case["target"]
    src = np.asarray(Image.open(EXAMPLES / case["image"]).convert("RGB"))
    gt = np.asarray(Image.open(EXAMPLES / case["ground_truth"]).convert("RGB"))
    s, t, p = (scene_facts(oracle.parse(x)) for x in (src, gt, out))
    assert t - s <= p and not (s - t) & p, f"edit not applied: missing {sorted(t - p)}, extra {sorted(p - t)}"
    assert s & t <= p <= s | t, f"something else changed: missing {sorted(t - p)}, extra {sorted(p - t)}"
    background = _psnr_outside(out, src, np.any(src != gt, axis=-1))
    print(f"background PSNR outside the diamond: {background:.2f} dB")
    assert background > 27.0  # the engine test measured 31.6 dB for this edit

    # an undecodable upload: a clear message in the page, and the server keeps serving
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG file\n" * 40)
    browser.find_element("css selector", "#input-image input[type=file]").send_keys(str(broken))
    time.sleep(1.0)
    _click(browser, "#edit")
    _wait(browser, lambda d: "not an image this server can decode" in d.find_element("tag name", "body").text, 60,
          "the error message")  # fmt: skip
    _shot(browser, tmp_path, "04_bad_upload")
    assert app.proc.poll() is None

    # a long edit shows its per-step progress and Cancel stops it between steps
    _choose_example(browser, 1)
    _click(browser, "#advanced .label-wrap")
    steps = _wait(browser, lambda d: d.find_elements("css selector", "#steps input"), 30, "the advanced panel")[0]
    steps.send_keys(Keys.CONTROL, "a")
    steps.send_keys("1000", Keys.TAB)
    time.sleep(0.5)
    _click(browser, "#edit")
    _wait(browser, lambda d: re.search(r"\d+/1000 steps", _text(d, "result")), 60,
          "the progress bar")  # fmt: skip
    _shot(browser, tmp_path, "05_progress")
    _click(browser, "#cancel")
    _wait(browser, lambda d: "Cancel requested" in _text(d, "cancel-note"), 30, "the cancel acknowledgment")
    _wait(browser, lambda d: "Cancelled" in _text(d, "status"), 60, "the run to stop")
    status = _text(browser, "status")
    assert re.search(r"at step \d+ of 1000", status), status
    _shot(browser, tmp_path, "06_cancelled")
    assert len(_history_items(browser)) == 1

    # the worker is free: a second edit works (the other example: the star becomes a triangle)
    _choose_example(browser, 1)  # resets the steps to the method's 28
    _edit_and_wait(browser, 1)
    _shot(browser, tmp_path, "07_second_edit")

    # "reconstruct" shows the inversion alone, with its PSNR
    _click(browser, "#reconstruct")
    _wait(browser, lambda d: "Reconstruction PSNR" in _text(d, "status"), EDIT_TIMEOUT_S, "the reconstruction")
    psnr = float(re.search(r"Reconstruction PSNR ([\d.]+) dB", _text(browser, "status")).group(1))
    print(f"reconstruction PSNR in the page: {psnr:.2f} dB")
    assert psnr > 25.0
    _shot(browser, tmp_path, "08_reconstruct")
    assert len(_history_items(browser)) == 3

    # the history reopens the first edit with its settings
    _click(browser, "#history button.thumbnail-item[aria-label='Thumbnail 3 of 3']")
    _wait(browser, lambda d: "reopened edit #1" in _text(d, "status"), 30, "the history entry to reopen")
    assert browser.find_element("css selector", "#target textarea").get_attribute("value") == case["target"]
    _shot(browser, tmp_path, "09_history_reopened")

    # "new scene" renders a ShapesWorld scene and puts its caption in the source prompt
    _click(browser, "#new-scene")
    _wait(browser, lambda d: "new ShapesWorld scene" in _text(d, "status"), 30, "a new scene")
    caption = browser.find_element("css selector", "#source textarea").get_attribute("value")
    assert " background" in caption and caption != case["source"], caption
    options = browser.find_element("css selector", "#options textarea").get_attribute("value")
    assert "blend_words=null" in options.splitlines(), options  # the previous example's blend words are gone
    _shot(browser, tmp_path, "10_new_scene")
    assert app.proc.poll() is None

    # the page asked nothing of any host but the app's (no fonts, scripts or telemetry from outside)
    requested = {
        msg["params"]["request"]["url"]
        for entry in browser.get_log("performance")
        if (msg := json.loads(entry["message"])["message"])["method"] == "Network.requestWillBeSent"
    }
    outside = sorted(u for u in requested if u.startswith(("http:", "https:", "ws:", "wss:")) and not u.startswith(url))
    assert requested and not outside, outside[:10]
