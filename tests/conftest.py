"""Shared fixtures. Tiers: tests/unit (tiny random models, no files), tests/integration (the embedded
SmolLM2 model and shipped SAE; marked ``integration``), tests/slow (long runs; marked ``slow`` and
excluded by default)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = str(item.fspath)
        if "/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "/slow/" in path:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"benchmark data not found at {DATA}")
    return DATA


@pytest.fixture
def tiny_model():
    """A freshly built model per test: tests attach hooks and edit weights. (Not a deepcopy: SAELens
    wraps each MLP's forward in a closure over the original module, so a deepcopy's MLP hooks would
    silently act on the original.)"""
    from microedit_lens.testing import tiny_model as make

    return make()


@pytest.fixture
def tiny_sae():
    from microedit_lens.testing import tiny_sae

    return tiny_sae()


@pytest.fixture
def reference_texts() -> list[str]:
    return [
        "the cat sat on the mat", "a quick brown fox jumps", "hello world and friends",
        "rain falls in spring time", "numbers like 12 and 34", "some more text to read",
        "light moves very fast", "music played all night", "a long road ahead of us",
        "open the door slowly",
    ]


@pytest.fixture(scope="session")
def smollm():
    """The embedded model (loaded once per session; tests must not leave edits attached)."""
    from microedit_lens import load_model

    return load_model()


@pytest.fixture(scope="session")
def default_sae():
    from microedit_lens import load_sae

    return load_sae()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
