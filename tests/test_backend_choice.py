"""``get_ops("auto")`` chooses the ops by the tensors' device, also on a machine that reports CUDA (issue 24, item 1).

On a GPU host ``torch.cuda.is_available()`` is true while ``from_pretrained`` defaults to ``device="cpu"``; the ops
must then be the ``cpu`` ones, or the first Triton launch dies on a CPU pointer. These tests report CUDA present
(``torch.cuda.is_available`` patched) and check the choice without any GPU.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from eagle_kernels import backend as B
from eagle_kernels.backend import BackendUnavailable, get_ops


@pytest.fixture
def cuda_reported(monkeypatch):
    """A machine that says it has CUDA (no kernel is launched on it here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.fixture
def no_triton(monkeypatch):
    """Choosing the Triton table fails loudly: on a real GPU host its first launch on CPU tensors dies ("Pointer
    argument cannot be accessed from Triton"), here the interpreter would hide that."""

    def refuse():
        raise AssertionError("the triton ops were chosen for CPU tensors")

    monkeypatch.setattr(B, "_triton_ops", refuse)


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_auto_on_a_cpu_device_is_cpu_with_cuda_present(cuda_reported, device):
    assert get_ops("auto", device=device).name == "cpu"


# ids without the word "cuda": conftest skips any test whose keywords hold it where no GPU is present
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)], ids=["name", "index", "device"])
def test_auto_on_a_cuda_device_is_triton(cuda_reported, device):
    assert get_ops("auto", device=device).name == "triton"


def test_auto_without_a_device_follows_the_machine(cuda_reported, monkeypatch):
    assert get_ops("auto").name == "triton"  # the default device of a CUDA machine
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(B, "_warned_fallback", False)
    with pytest.warns(UserWarning, match="no CUDA device"):
        assert get_ops("auto").name == "cpu"


def test_auto_on_a_cpu_device_does_not_warn(monkeypatch):
    """A CPU model asked for its own device's ops: nothing fell back, so nothing is reported."""
    monkeypatch.setattr(B, "_warned_fallback", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_ops("auto", device="cpu").name == "cpu"


def test_explicit_triton_on_cpu_tensors_needs_the_interpreter(cuda_reported, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailable, match="CPU tensors"):
        get_ops("triton", device="cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_ops("triton", device="cpu").name == "triton"


@pytest.mark.parametrize("name", ["torch", "cpu"])
def test_explicit_backends_ignore_the_device(cuda_reported, name):
    assert get_ops(name, device="cpu").name == name


def test_unknown_device_type_is_an_error():
    with pytest.raises(RuntimeError):
        get_ops("auto", device="nonsense")


def test_demo_model_on_cpu_gets_cpu_ops_with_cuda_present(cuda_reported, no_triton):
    from eagle_runtime import EagleModel
    from eagle_runtime.demo import demo_paths, demo_tree

    target, head = demo_paths()
    model = EagleModel.from_pretrained(target, head, tree=demo_tree())  # device defaults to "cpu"
    assert model.ops.name == "cpu" and model.decoder.ops is model.ops
    assert not model.cuda_graphs
    plain = model.generate("Once upon a time", 8, speculative=False)
    spec = model.generate("Once upon a time", 8)
    assert spec.tokens == plain.tokens


def test_cli_device_cpu_runs_with_cuda_present(cuda_reported, no_triton, capsys):
    """``python -m eagle_runtime generate --device cpu`` on a GPU host: the cpu ops, no Triton launch."""
    from eagle_runtime.cli import main
    from eagle_runtime.demo import demo_paths

    target, head = demo_paths()
    rc = main(["generate", "--base", str(target), "--draft", str(head), "--device", "cpu", "--tree", "dynamic",
               "--total-tokens", "8", "--depth", "3", "--top-k-draft", "2", "--max-new-tokens", "6", "--json",
               "--prompt", "Once upon a time"])
    assert rc == 0, capsys.readouterr()


@pytest.mark.parametrize("triton_v,numpy_v,bad", [("3.6.0", "2.4.0", True), ("3.6.0", "2.3.5", False),
                                                   ("3.5.1", "2.4.6", True), ("3.9.0", "2.4.6", False),
                                                   ("3.6.0+git1a2b", "2.10.1", True), ("3.10.0", "2.4.0", False)])
def test_interpreter_version_pairs(triton_v, numpy_v, bad):
    """Triton 3.6's interpreter fails every kernel under numpy >= 2.4 (issue 24, item 9): that pair is one clear
    reason, not a failure per kernel."""
    why = B.interpreter_problem(triton_v, numpy_v)
    assert bool(why) == bad and (not bad or ("numpy" in why and triton_v in why and "\n" not in why))


def test_triton_backend_names_a_bad_interpreter_pair(monkeypatch):
    import numpy
    import triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.0")
    assert B.triton_available() == (False, B.interpreter_problem("3.6.0", "2.4.0"))
    with pytest.raises(BackendUnavailable, match="numpy<2.4"):
        get_ops("triton", device="cpu")
