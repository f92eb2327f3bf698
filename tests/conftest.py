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
# The shared-data run of a test that also runs on what the repository holds (issue 33's twins): the demo pair, the
# Mixtral built from it, the text the demo target writes, a random tiny LLaMA. Where the shared data folder is
# absent these runs are deselected, not skipped: their repo-only twins ran, so a bare clone's skips are only what
# it cannot test at all (named with their reasons by -rs), not a second copy of what it did test.
SHARED_TWIN = (pytest.mark.shared_data, pytest.mark.shared_twin)
_current_test = None


def pytest_configure(config):
    config.addinivalue_line("markers", "shared_twin: the shared-data run of a test that also runs on repo-only data "
                                       "(deselected where the shared data folder is absent)")


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
    twins = [it for it in items if it.get_closest_marker("shared_twin")]
    if twins and not SHARED.exists():
        config.hook.pytest_deselected(items=twins)
        items[:] = [it for it in items if not it.get_closest_marker("shared_twin")]
        config._eagle_twins_deselected = len(twins)
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


# ----------------------------------------------------------------------------------------------------------------
# Repo-only twins (issue 33): one test body on the embedded demo (every clone) and on stories260k (shared data).
# A test asks for `lm` (or a fixture built on it) and runs once per model; the stories260k run carries the
# shared_data marker, so a bare clone still runs the demo one. The stories fixtures are looked up by name only for
# that param (request.getfixturevalue), so the demo run never lists a shared fixture and needs no marker.
# ----------------------------------------------------------------------------------------------------------------
LMS = ["demo", pytest.param("stories260k", marks=SHARED_TWIN)]
# Story openings the demo target continues into its own training text (it was trained on TinyStories).
DEMO_PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird",
                "Lily had a big", "The sun was", "A boy named Tim", "In the forest there", "Mom said",
                "The cat wanted to", "It was a rainy day", "Ben and his friend"]


@pytest.fixture(scope="session", params=LMS)
def lm(request) -> str:
    """Which model a twinned test runs on: "demo" or "stories260k"."""
    return request.param


@pytest.fixture(scope="session")
def lm_dir(lm, request) -> Path:
    """The target checkpoint of ``lm``."""
    return request.getfixturevalue("demo_target_dir") if lm == "demo" else request.getfixturevalue("stories_dir")


@pytest.fixture(scope="session")
def lm_tokenizer(lm_dir):
    from eagle_runtime.text import load_tokenizer

    return load_tokenizer(lm_dir)


@pytest.fixture(scope="session")
def lm_head_dir(lm, request) -> Path:
    """A trained EAGLE-1 head for ``lm``: the demo's committed head (trained by scripts/build_demo.py, tau 3.2 on its
    tree) or the stories260k head trained at test time (trained_head_dir)."""
    if lm == "demo":
        from eagle_runtime.demo import demo_paths

        return demo_paths("eagle1")[1]
    return request.getfixturevalue("trained_head_dir")


def fetch_data_module():
    """scripts/fetch_data.py as a module (it builds the Mixtral copy: mixtral_from_llama, _write_model_dir)."""
    import importlib.util
    import sys

    if "fetch_data" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fetch_data", ROOT / "scripts" / "fetch_data.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fetch_data"] = mod  # dataclasses look their module up there while the module runs
        spec.loader.exec_module(mod)
    return sys.modules["fetch_data"]


@pytest.fixture(scope="session")
def demo_moe_dir(tmp_path_factory, demo_target_dir) -> Path:
    """A MixtralForCausalLM built from the demo target the way stories260k-moe-hf is built from stories260k
    (fetch_data.mixtral_from_llama: 4 experts, each the dense MLP, top-2 of a seeded router), so its logits equal
    the dense model's and the demo head drafts for it. About 1 s."""
    import json

    from safetensors.torch import load_file

    fd = fetch_data_module()
    config = json.loads((demo_target_dir / "config.json").read_text())
    sd = load_file(str(demo_target_dir / "model.safetensors"))
    moe_cfg, moe_sd = fd.mixtral_from_llama(config, sd)
    out = tmp_path_factory.mktemp("demo-moe-hf")
    tok = json.loads((demo_target_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_cfg = json.loads((demo_target_dir / "tokenizer_config.json").read_text())
    fd._write_model_dir(out, moe_cfg, moe_sd, tok, tok_cfg)
    return out


@pytest.fixture(scope="session")
def lm_moe_dir(lm, request) -> Path:
    """The Mixtral copy of ``lm``: built from the demo target here, or the shared stories260k-moe-hf."""
    return request.getfixturevalue("demo_moe_dir") if lm == "demo" else request.getfixturevalue("stories_moe_dir")


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory, demo_target_dir) -> Path:
    """Training text the demo target writes itself: 60 stories, one per blank-line-separated block, sampled (seed 0,
    temperature 1, up to 100 tokens, stopping at EOS) from DEMO_PROMPTS. Like the first 60 TinyStories stories the
    stories260k tests train on: a few thousand tokens, each story well under 400 tokens. About 5 s."""
    from eagle_runtime import EagleModel, load_target
    from eagle_runtime.text import load_tokenizer

    tok = load_tokenizer(demo_target_dir)
    model = EagleModel(load_target(demo_target_dir, max_len=160), None, tok, backend="torch")
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(60)]
    out = model.generate(prompts, 100, temperature=1.0, seed=0, speculative=False)
    stories = [" ".join((p + tok.decode(t)).split()) for p, t in zip(prompts, out.tokens)]
    path = tmp_path_factory.mktemp("demo-corpus") / "demo_stories.txt"
    path.write_text("\n\n".join(stories), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def lm_corpus(lm, request) -> Path:
    """A training corpus for ``lm``: the demo target's own stories, or the shared TinyStories validation set."""
    return request.getfixturevalue("demo_corpus") if lm == "demo" else require(CORPUS / "tinystories_val.txt")


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, demo_target_dir) -> Path:
    """A random-weight 2-layer LLaMA (width 64, 4 heads, 2 KV heads, the demo's 512-token tokenizer), seeded:
    for mechanics where the weights do not matter and the interpreter's cost per layer does (about 1 s to build)."""
    import json
    import shutil

    import transformers

    cfg = json.loads((demo_target_dir / "config.json").read_text())
    cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    out = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_target_dir / name, out / name)
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not SHARED.exists():  # under xdist the workers deselect; the count is theirs, the line the controller's
        n = getattr(config, "_eagle_twins_deselected", None)
        terminalreporter.write_line(f"{'' if n is None else f'{n} '}shared-data twins (marker shared_twin) deselected: "
                                    f"no shared data at {SHARED}; their repo-only runs ran (python scripts/fetch_data.py"
                                    " fetches the data)")


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
