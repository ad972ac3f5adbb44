"""The machine a run is on, and the peak-memory meter (glibc malloc sampling on the CPU, the CUDA allocator's high-
water mark on a GPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from retouch.bench.provenance import cpu_model, git_commit
from scalebench.specs import ROOT


def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU / GPU, cores, threads, library versions, load average, commit."""
    import diffusers
    import transformers

    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) * 1024
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": mem,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": git_commit(ROOT),
    }


def _status_kib(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")
    ]  # fmt: skip


def _malloc_live() -> Callable[[], int] | None:
    """Bytes currently allocated through glibc's malloc (heap in use + mmapped chunks), or None."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2

    def live() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return live


class PeakMeter:
    """Peak memory of a region above what was in use when it started.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: torch's CPU tensors come from glibc's ``malloc``, so a
    thread samples ``mallinfo2()`` (bytes in use, whatever glibc keeps cached) every ``interval`` seconds
    while the region runs. This costs nothing measurable, unlike the profiler's allocation events or forcing
    every allocation through ``mmap`` (which slowed an NFE by 15-20 % here); a spike shorter than the interval
    could be missed, but activations live for at least one operator. Without glibc: the resident-set
    high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``), which glibc's caching can hide.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.live = _malloc_live() if device.type == "cpu" else None
        self.hwm = device.type == "cpu" and self.live is None and self._reset_hwm()
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated above the allocation at the region's start"
        elif self.live is not None:
            self.method = f"glibc mallinfo2() bytes in use, sampled every {interval * 1e3:g} ms, above the start"
        elif self.hwm:
            self.method = "resident-set high-water mark (VmHWM, reset per region) above VmRSS at the start"
        else:
            self.method = "unavailable"

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return True
        except OSError:
            return False

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, int | None]]:
        """Yields a dict filled on exit: ``peak_bytes``, ``retained_bytes`` (still allocated after the region)."""
        out: dict[str, int | None] = {"peak_bytes": None, "retained_bytes": None}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            yield out
            torch.cuda.synchronize(self.device)
            out["peak_bytes"] = torch.cuda.max_memory_allocated(self.device) - base
            gc.collect()
            out["retained_bytes"] = torch.cuda.memory_allocated(self.device) - base
        elif self.live is not None:
            live = self.live
            base = live()
            peak = [base]
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(self.interval):
                    peak[0] = max(peak[0], live())

            thread = threading.Thread(target=sample, daemon=True)
            thread.start()
            try:
                yield out
            finally:
                stop.set()
                thread.join()
            peak[0] = max(peak[0], live())
            out["peak_bytes"] = peak[0] - base
            gc.collect()
            out["retained_bytes"] = live() - base
        elif self.hwm:
            self._reset_hwm()
            base = _status_kib("VmRSS") or 0
            yield out
            out["peak_bytes"] = ((_status_kib("VmHWM") or 0) - base) * 1024
            gc.collect()
            out["retained_bytes"] = ((_status_kib("VmRSS") or 0) - base) * 1024
        else:
            yield out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
