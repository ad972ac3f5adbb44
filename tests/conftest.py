"""Shared fixtures: tiny random models of every family (offline), built once per session."""

from __future__ import annotations

import functools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)  # tiny models: thread synchronisation costs more than it gains

FAMILIES = ("sd", "pixart", "sd3", "flux")


@functools.cache
def tiny_backbone(family: str, variant: str = ""):
    from retouch.backbones import from_pipeline
    from retouch.models.tiny import tiny_pipeline

    kwargs = {}
    name = family
    if family == "sdxl":
        name, kwargs = "sdxl", {}
    if variant == "v":
        kwargs["prediction_type"] = "v_prediction"
    if variant == "conditioned":
        kwargs["conditioned"] = True
    pipe = tiny_pipeline(name, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return from_pipeline(pipe, name=f"tiny-{family}{'-' + variant if variant else ''}")


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def backbone(family):
    return tiny_backbone(family)


def random_image(h: int = 32, w: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture
def image32() -> Image.Image:
    return random_image()


# --- `make test-fast`: tests measured slow are listed in tests/slow_tests.txt and marked `slow` here ----------
SLOW_TESTS = Path(__file__).with_name("slow_tests.txt")


def slow_test_ids() -> set[str]:
    """``tests/file.py::test_name`` (every parametrisation) or a full node id, one per line; ``#`` comments."""
    return {line.split("#", 1)[0].strip() for line in SLOW_TESTS.read_text().splitlines()} - {""}


def pytest_collection_modifyitems(config, items) -> None:
    listed = slow_test_ids()
    for item in items:
        if item.nodeid in listed or item.nodeid.split("[", 1)[0] in listed:
            item.add_marker(pytest.mark.slow)
