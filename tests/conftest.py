"""Shared test fixtures: hardware markers and paths to the shared models and corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EAGLE_SHARED_DATA", ROOT.parent / "shared" / "data"))
STORIES = SHARED / "models" / "stories260k-hf"
STORIES_MOE = SHARED / "models" / "stories260k-moe-hf"
CORPUS = SHARED / "corpus"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def require(path: Path) -> Path:
    """Skip (with the reason) when a piece of shared data is absent."""
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (set EAGLE_SHARED_DATA to the shared data folder)")
    return path


@pytest.fixture
def stories_dir() -> Path:
    return require(STORIES)


@pytest.fixture
def stories_moe_dir() -> Path:
    return require(STORIES_MOE)
