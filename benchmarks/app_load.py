#!/usr/bin/env python
"""Load check of ``retouch app``: concurrent gradio clients on loopback, the queue limit, memory, overhead.

1. ``retouch app`` starts in a subprocess on a free 127.0.0.1 port with the embedded default model and the
   app's default queue limit; its startup time (spawn to the "serving" line) is recorded. One warm-up edit.
2. ``--runs`` times, interleaved so that background load hits both alike: ``retouch edit`` of the colour
   example (direct+p2p, its blend words, 28 steps), recording the command's wall time and the engine's own
   time (the sidecar's ``timings.total``); then the same edit through gradio's client on the idle app
   (attention maps off, as in the CLI run), recording the round trip (upload, queue, edit, files, download)
   and the engine's time inside it. The app's overhead is its round trip over the CLI's engine time, over
   its own engine time, and over the CLI command's wall time.
3. One more idle edit with the attention maps on (the page's default), for its cost.
4. ``--bursts`` bursts of ``--clients`` clients (each its own gradio Client, so its own session) released
   together by a barrier, each submitting one edit: every one must come back with a result or with gradio's
   "queue is full" answer; anything else is an error. Time to first result and the latencies are recorded,
   and the server's resident memory (VmRSS) after the warm-up and after each burst.
5. A last edit checks the server still serves.

Bounded: at most ``--clients`` × ``--bursts`` + a few edits, every wait has a timeout, and the server is
stopped at the end whatever happens. Loopback only. Writes ``benchmarks/results/app_load.json`` atomically.

    python benchmarks/app_load.py                    # 20 clients, 3 bursts: ~6-8 min on 2 busy cores
    python benchmarks/app_load.py --clients 5 --bursts 1 --runs 1   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
OUT = ROOT / "benchmarks" / "results" / "app_load.json"


def _case() -> dict[str, Any]:
    return next(e for e in json.loads((EXAMPLES / "examples.json").read_text()) if e["image"] == "colour.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cli_edit(workdir: Path, i: int) -> tuple[float, float]:
    """``retouch edit`` of the case: (wall time of the command in s, the engine's time from its sidecar in s)."""
    case = _case()
    out = workdir / f"cli_{i}.png"
    cmd = [sys.executable, "-m", "retouch.cli", "edit", str(EXAMPLES / case["image"]), "--source", case["source"],
           "--target", case["target"], "--method", "direct+p2p", "--option", f"blend_words={case['blend_words']}",
           "-o", str(out), "--no-progress"]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - t0, float(json.loads(Path(str(out) + ".json").read_text())["timings"]["total"])


class Server:
    def __init__(self, workdir: Path, port: int, queue_size: int | None) -> None:
        cmd = [sys.executable, "-m", "retouch.cli", "app", "--port", str(port), "--workdir", str(workdir)]
        if queue_size is not None:
            cmd += ["--queue-size", str(queue_size)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.startup_s: float | None = None
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}/"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("retouch app: serving"):
                self.startup_s = time.perf_counter() - self.t0
                self.ready.set()

    def wait(self, timeout: float) -> None:
        t0 = time.monotonic()
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() - t0 > timeout:
                raise RuntimeError("retouch app did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def _args(attention: bool = False) -> tuple:
    from gradio_client import handle_file

    case = _case()
    return (handle_file(str(EXAMPLES / case["image"])), case["source"], case["target"], "direct+p2p", 28, 3.5, 0, "",
            f"blend_words={case['blend_words']}", 0.0, attention)  # fmt: skip


def _client(url: str) -> Any:
    from gradio_client import Client

    # files are not all downloaded: the edited image is fetched as a user would (the CLI writes only it too)
    return Client(url, verbose=False, download_files=False)


def _fetch_result(out: tuple) -> int:
    """Download the edited image of a run's outputs over loopback; its size in bytes."""
    if out[6] != "Done.":
        raise RuntimeError(f"unexpected status {out[6]!r}")
    with urllib.request.urlopen(out[0]["url"], timeout=60) as r:
        data = r.read()
    if not data.startswith(b"\x89PNG"):
        raise RuntimeError("the result is not a PNG")
    return len(data)


def one_edit(url: str, timeout: float, attention: bool = False) -> tuple[float, float]:
    """One edit through a new client, result downloaded: (round trip in s, the engine's own time in s)."""
    client = _client(url)
    t0 = time.perf_counter()
    out = client.submit(*_args(attention), api_name="/edit").result(timeout=timeout)
    _fetch_result(out)
    return time.perf_counter() - t0, float(out[4]["timings"]["total"])


def burst(url: str, clients: int, timeout: float) -> dict[str, Any]:
    sessions = [_client(url) for _ in range(clients)]
    barrier = threading.Barrier(clients + 1)
    results: list[dict[str, Any]] = [{} for _ in range(clients)]
    start: list[float] = []

    def worker(i: int) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        try:
            out = sessions[i].submit(*_args(), api_name="/edit").result(timeout=timeout)
            _fetch_result(out)
            results[i] = {"answer": "done", "t_done": time.perf_counter(), "latency_s": time.perf_counter() - t0}
        except TimeoutError:
            results[i] = {"answer": "timeout", "detail": f"no answer in {timeout} s"}
        except Exception as exc:  # noqa: BLE001 - sorted by its message
            full = "queue is full" in str(exc).lower()
            results[i] = {"answer": "queue_full" if full else "error", "t_done": time.perf_counter(),
                          "latency_s": time.perf_counter() - t0, "detail": str(exc)[:300]}  # fmt: skip

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start.append(time.perf_counter())
    for t in threads:
        t.join(timeout + 60)
    done = [r for r in results if r.get("answer") == "done"]
    counts = {k: sum(r.get("answer") == k for r in results) for k in ("done", "queue_full", "error", "timeout")}
    counts["no_answer"] = sum(not r for r in results)
    lat = sorted(r["latency_s"] for r in done)
    return {
        "clients": clients,
        "answers": counts,
        "answered": counts["done"] + counts["queue_full"],
        "time_to_first_result_s": min(r["t_done"] for r in done) - start[0] if done else None,
        "time_to_last_result_s": max(r["t_done"] for r in done) - start[0] if done else None,
        "latency_median_s": statistics.median(lat) if lat else None,
        "latency_max_s": lat[-1] if lat else None,
        "queue_full_latency_max_s": max(
            (r["latency_s"] for r in results if r.get("answer") == "queue_full"), default=None
        ),  # fmt: skip
        "errors": [r["detail"] for r in results if r.get("answer") in ("error", "timeout")],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--bursts", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="CLI edits and idle app edits (interleaved)")
    ap.add_argument("--queue-size", type=int, default=None, help="the app's --queue-size (default: the app's)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds any one edit may take to answer")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 1 <= args.bursts <= 5:
        ap.error("--clients must be in [1, 64] and --bursts in [1, 5] (a bounded check)")

    work = Path(tempfile.mkdtemp(prefix="retouch-app-load-"))
    result: dict[str, Any] = {
        "what": "retouch app under concurrent gradio clients on loopback (benchmarks/app_load.py)",
        "case": "examples/colour.png, direct+p2p, blend_words 'diamond diamond', 28 steps, shapes-flux, CPU",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
    }
    server = Server(work / "app", _free_port(), args.queue_size)
    try:
        server.wait(300)
        result["startup_s"] = server.startup_s
        result["queue_size"] = args.queue_size or 16
        print(f"app up in {server.startup_s:.1f} s at {server.url}", flush=True)
        result["warmup_s"] = one_edit(server.url, args.timeout)[0]
        rss = {"after_warmup_mib": _rss_mib(server.proc.pid)}
        # the CLI and the idle app interleaved, so that background load hits both alike
        cli, app = [], []
        for i in range(args.runs):
            print(f"CLI and idle app, run {i + 1} ...", flush=True)
            cli.append(cli_edit(work, i))
            app.append(one_edit(server.url, args.timeout))
        rt, app_engine = [a[0] for a in app], [a[1] for a in app]
        result["cli"] = {"wall_s": [c[0] for c in cli], "engine_s": [c[1] for c in cli],
                         "wall_median_s": statistics.median(c[0] for c in cli),
                         "engine_median_s": statistics.median(c[1] for c in cli)}  # fmt: skip
        result["idle"] = {
            "round_trip_s": rt,
            "engine_s": app_engine,
            "round_trip_median_s": statistics.median(rt),
            "round_trip_with_attention_maps_s": one_edit(server.url, args.timeout, attention=True)[0],
            "overhead_vs_cli_engine_time": statistics.median(rt) / result["cli"]["engine_median_s"],
            "overhead_vs_own_engine_time": statistics.median(r / e for r, e in zip(rt, app_engine, strict=True)),
            "overhead_vs_cli_wall_time": statistics.median(rt) / result["cli"]["wall_median_s"],
        }
        result["bursts"] = []
        for b in range(args.bursts):
            print(f"burst {b + 1}: {args.clients} clients ...", flush=True)
            r = burst(server.url, args.clients, args.timeout)
            time.sleep(2.0)
            r["rss_after_mib"] = _rss_mib(server.proc.pid)
            result["bursts"].append(r)
            print(json.dumps({k: r[k] for k in ("answers", "time_to_first_result_s", "rss_after_mib")}), flush=True)
        rss["after_bursts_mib"] = [r["rss_after_mib"] for r in result["bursts"]]
        result["rss"] = rss
        result["final_edit_s"] = one_edit(server.url, args.timeout)[0]
        result["server_alive"] = server.proc.poll() is None
    finally:
        server.stop()
        result["server_log_tail"] = "".join(server.lines[-20:])
    result["all_answered"] = all(r["answered"] == r["clients"] for r in result["bursts"])
    result["no_errors"] = all(not r["errors"] for r in result["bursts"])

    from retouch.io import save_json

    save_json(result, args.out)
    print(f"written {args.out}")
    idle = result["idle"]
    print(f"startup {result['startup_s']:.1f} s; CLI edit {result['cli']['engine_median_s']:.2f} s engine / "
          f"{result['cli']['wall_median_s']:.1f} s wall; app round trip {idle['round_trip_median_s']:.2f} s = "
          f"{idle['overhead_vs_cli_engine_time']:.2f}x the CLI's edit, {idle['overhead_vs_own_engine_time']:.2f}x "
          f"its own edit, {idle['overhead_vs_cli_wall_time']:.2f}x the CLI's wall time")  # fmt: skip
    for i, r in enumerate(result["bursts"]):
        print(f"burst {i + 1}: {r['answers']} first result {r['time_to_first_result_s']:.1f} s, "
              f"RSS {r['rss_after_mib']:.0f} MiB (after warm-up {result['rss']['after_warmup_mib']:.0f})")  # fmt: skip
    return 0 if result["all_answered"] and result["no_errors"] and result["server_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())
