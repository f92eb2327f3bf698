"""Shared test fixtures: hardware markers and paths to the shared models and corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Test shapes are tiny: intra-op threads only add overhead, and on a loaded 2-core machine they cost up to 70x
# (measured: 24 speculative tokens on stories260k took 75 s with 2 threads beside other jobs, 1.1 s with 1).
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return require(STORIES)


@pytest.fixture(scope="session")
def tokenizer(stories_dir):
    """stories260k's tokenizer."""
    from eagle_runtime.text import load_tokenizer

    return load_tokenizer(stories_dir)


@pytest.fixture(scope="session")
def stories_moe_dir() -> Path:
    return require(STORIES_MOE)


@pytest.fixture(scope="session")
def trained_head_dir(tmp_path_factory) -> Path:
    """A head for stories260k trained by the project's own training code (about 30 s on one core)."""
    require(STORIES)
    require(CORPUS / "tinystories_val.txt")
    from eagle_runtime.train import TrainConfig, train_head

    out = tmp_path_factory.mktemp("head")
    cfg = TrainConfig(steps=400, batch_size=8, seq_len=128, lr=3e-3, warmup=20, eval_every=400, eval_batches=2)
    train_head(STORIES, CORPUS / "tinystories_val.txt", out, cfg, progress=False)
    return out
