"""Shared test fixtures: hardware markers and paths to the shared models and corpora."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# What the GPU machine sees, without a GPU: EAGLE_FAKE_CUDA_HOST=1 reports CUDA present (torch.cuda.is_available,
# here and, through fake_cuda_host/sitecustomize.py, in every Python process a test starts) and leaves the Triton
# interpreter off. CI runs the tests that choose backends, devices, dtypes and graphs, and the CLI and benchmark
# entry points, this way (.ci/run): what would pick a CUDA path for CPU tensors fails here as it would there.
# Tests that need a real GPU (marker `cuda`) still skip.
REAL_CUDA = torch.cuda.is_available()
FAKE_CUDA_HOST = os.environ.get("EAGLE_FAKE_CUDA_HOST") == "1"
if FAKE_CUDA_HOST:
    os.environ.pop("TRITON_INTERPRET", None)
    _site = str(Path(__file__).resolve().parent / "fake_cuda_host")
    os.environ["PYTHONPATH"] = os.pathsep.join([_site] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    torch.cuda.is_available = lambda: True
elif not REAL_CUDA:
    # Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Test shapes are tiny: intra-op threads only add overhead, and on a loaded 2-core machine they cost up to 70x
# (measured: 24 speculative tokens on stories260k took 75 s with 2 threads beside other jobs, 1.1 s with 1).
torch.set_num_threads(1)

# imported only now: eagle_runtime's package import reaches triton, which reads TRITON_INTERPRET (set above)
from eagle_runtime.datadir import shared_data_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()  # $EAGLE_SHARED_DATA, ../shared/data, else what scripts/fetch_data.py fetched
STORIES = SHARED / "models" / "stories260k-hf"
STORIES_MOE = SHARED / "models" / "stories260k-moe-hf"
CORPUS = SHARED / "corpus"


# Fixtures that hand a test shared data; a test that asks for one must say so with the `shared_data` marker, so
# `-m shared_data` lists exactly what a bare clone cannot run (checked at collection, and at run time by `require`).
SHARED_FIXTURES = {"stories_dir", "stories_moe_dir", "tokenizer", "trained_head_dir"}
_current_test = None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Note the test before any of its fixtures is set up, module- and session-scoped ones included."""
    global _current_test
    _current_test = item


def pytest_collection_modifyitems(config, items):
    unmarked = [it.nodeid for it in items
                if SHARED_FIXTURES & set(getattr(it, "fixturenames", ())) and not it.get_closest_marker("shared_data")]
    if unmarked:
        raise pytest.UsageError("tests that use shared data without the shared_data marker: " + ", ".join(unmarked))
    no_gpu = pytest.mark.skip(reason="fake CUDA host (EAGLE_FAKE_CUDA_HOST=1): needs a real CUDA GPU" if FAKE_CUDA_HOST
                              else "needs a CUDA GPU; none is present on this machine")
    no_interp = pytest.mark.skip(reason="runs Triton kernels on CPU tensors, which needs the Triton interpreter "
                                        "(TRITON_INTERPRET=1); it is off where CUDA is present")
    for item in items:
        if "cuda" in item.keywords and not REAL_CUDA:
            item.add_marker(no_gpu)
        if "interpreter" in item.keywords and not INTERPRETER:
            item.add_marker(no_interp)


def require(path: Path) -> Path:
    """Skip (with the reason) when a piece of shared data is absent; fail when the test is not marked for it."""
    shared = path == SHARED or SHARED in path.parents  # require() also guards the repo's own demo files
    if shared and _current_test is not None and not _current_test.get_closest_marker("shared_data"):
        pytest.fail(f"{_current_test.nodeid} reads shared data ({path.name}) without @pytest.mark.shared_data")
    if not path.exists():
        pytest.skip(f"shared data not found at {path} (python scripts/fetch_data.py fetches it; EAGLE_SHARED_DATA "
                    "names another folder)")
    return path


@pytest.fixture(scope="session")
def demo_target_dir() -> Path:
    """The embedded demo target (a trained 16-layer LLaMA with GQA and its tokenizer): in every clone."""
    from eagle_runtime.demo import demo_paths

    return demo_paths()[0]


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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On the fake CUDA host a test that goes to the GPU (CLI and benchmark defaults pick ``cuda`` where it is
    present) meets torch's CPU build; that step is the GPU machine's to check, so it is a skip here. Every other
    failure stands: a CPU tensor sent down a CUDA-only path (Triton without the interpreter) fails as on a GPU."""
    outcome = yield
    report = outcome.get_result()
    if FAKE_CUDA_HOST and report.failed and call.excinfo is not None:
        err = call.excinfo.value
        if isinstance(err, AssertionError) and "Torch not compiled with CUDA enabled" in str(err):
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               "fake CUDA host: goes to the GPU (checked on the GPU machine)")
