"""Backend selection: which implementation of each op the runtime calls.

``torch``  the references in :mod:`eagle_kernels.reference` (any device; the CPU path); tree buffers come
           from the native extension where it is built (identical results), else from the reference.
``triton`` the Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); tree-buffer
           construction comes from the native extension where it is built, else from the reference.
``cpu``    the fast CPU paths of :mod:`eagle_kernels.cpu_fast` (token-identical to the references, several times
           faster at small sizes: no softmax/sort/RNG when greedy, a vectorised tree walk, SDPA over the existing
           slots only, ``torch.topk`` under the reference's tie rule); tree buffers as for ``torch``.
``auto``   by the device of the tensors the ops will see (``get_ops("auto", device=...)``): ``triton`` for a CUDA
           device, ``cpu`` for any other. Without a device, the machine's default one: ``triton`` where CUDA is
           available, else ``cpu`` (that fallback is reported once). A CPU model on a GPU host must pass its
           device: Triton cannot read CPU pointers outside the interpreter.

An explicitly requested backend that cannot run raises :class:`BackendUnavailable`. Nothing here touches a GPU
at import time.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

from . import cpu_fast, reference
from .errors import BackendUnavailable

__all__ = ["Ops", "BackendUnavailable", "get_ops", "triton_available", "native_available"]


@dataclass(frozen=True)
class Ops:
    """The op table of one backend. Every field follows the contract of its reference."""

    name: str
    tree_attention: Callable
    topk_expand: Callable
    accept_tree: Callable
    sample_tokens: Callable
    kv_compact: Callable
    build_tree_buffers: Callable
    # decoder-layer pieces (the ``torch`` backend keeps the plain unfused PyTorch path)
    rms_norm: Callable
    add_rms_norm: Callable
    rope_kv_write: Callable
    silu_mul: Callable
    # chains of sampled drafts (speculative sampling with the draft's distribution); every backend runs the
    # references' PyTorch code, the cpu one with its bit-identical logit processing
    sample_draft: Callable = reference.sample_draft
    accept_chain: Callable = reference.accept_chain
    # Mixtral's routed experts (:func:`reference.moe_experts`' contract); the default loops over experts as HF's
    # MixtralSparseMoeBlock does (same bits as transformers), the triton table runs the grouped GEMM on CUDA
    moe_experts: Callable = cpu_fast.moe_experts_by_expert
    # ``bind(ops)``: the table one forward uses (see :meth:`for_forward`); None: the table itself
    bind: Callable | None = None

    def for_forward(self) -> "Ops":
        """The table for one model forward. Ops may share work across the layers of a forward (the ``cpu`` table
        gathers the rotary tables and builds the attention mask once, :func:`cpu_fast.bind_forward`); a table
        bound per forward scopes that memo to it, so nothing outlives the forward or crosses threads."""
        return self if self.bind is None else self.bind(self)


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def interpreter_problem(triton_version: str, numpy_version: str) -> str:
    """Why Triton's interpreter cannot run with these versions, or "".

    Known bad pair: triton 3.6 (the GPU machine's) interprets every kernel with numpy calls that numpy 2.4 removed,
    so all of them fail; triton 3.9 with numpy 2.4 works (this project's CI). Older triton is taken to fail too."""
    if _major_minor(triton_version) <= (3, 6) and _major_minor(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails every kernel with numpy "
                f"{numpy_version}; install numpy<2.4 or triton>=3.9")
    return ""


def triton_available() -> tuple[bool, str]:
    """Whether Triton kernels can run here, and why not."""
    try:
        import triton
    except ImportError as e:  # pragma: no cover - triton ships with torch on Linux
        return False, f"triton is not importable ({e})"
    import numpy
    import torch

    if interpreter_enabled():
        problem = interpreter_problem(triton.__version__, numpy.__version__)
        return (False, problem) if problem else (True, "")
    if torch.cuda.is_available():
        return True, ""
    return False, "no CUDA device and TRITON_INTERPRET is not set"


def native_available() -> bool:
    try:
        importlib.import_module("eagle_kernels._C")
    except ImportError:
        return False
    return True


def _native_tree_buffers() -> Callable:
    if native_available():
        from .tree_buffers import build_tree_buffers

        return build_tree_buffers
    return reference.build_tree_buffers


def _torch_ops() -> Ops:
    return Ops(
        "torch",
        reference.tree_attention,
        reference.topk_expand,
        reference.accept_tree,
        reference.sample_tokens,
        reference.kv_compact,
        _native_tree_buffers(),  # same results as the reference (tests/test_tree_buffers.py), ~200x faster
        reference.rms_norm,
        reference.add_rms_norm,
        reference.rope_kv_write,
        reference.silu_mul,
    )


def _cpu_ops() -> Ops:
    return Ops(
        "cpu",
        cpu_fast.tree_attention,
        cpu_fast.topk_expand,
        cpu_fast.accept_tree,
        cpu_fast.sample_tokens,
        cpu_fast.kv_compact,
        _native_tree_buffers(),
        cpu_fast.rms_norm,
        cpu_fast.add_rms_norm,
        cpu_fast.rope_kv_write,
        reference.silu_mul,
        functools.partial(reference.sample_draft, process=cpu_fast.process_logits),
        functools.partial(reference.accept_chain, process=cpu_fast.process_logits),
        bind=cpu_fast.bind_forward,
    )


_warned_fallback = False


def _triton_ops() -> Ops:
    from .acceptance import accept_tree, sample_tokens
    from .fused_norm import add_rms_norm, rms_norm
    from .kv_compact import kv_compact
    from .rope_cache import rope_kv_write
    from .silu_mul import silu_mul
    from .topk_expand import topk_expand
    from .tree_attention import tree_attention

    return Ops(
        "triton", tree_attention, topk_expand, accept_tree, sample_tokens, kv_compact, _native_tree_buffers(),
        rms_norm, add_rms_norm, rope_kv_write, silu_mul, moe_experts=_moe_experts_triton,
    )


def _moe_experts_triton(x, top_w, top_i, w1, w3, w2):
    """The grouped Triton GEMMs on CUDA (static shapes: graph-safe); CPU tensors (interpreter runs of the
    triton table) take the per-expert loop: the interpreted grouped GEMM is minutes per forward, and
    tests/test_moe.py checks the kernel against the reference on its own."""
    if x.is_cuda:
        from .moe import moe_experts

        return moe_experts(x, top_w, top_i, w1, w3, w2)
    return cpu_fast.moe_experts_by_expert(x, top_w, top_i, w1, w3, w2)


def get_ops(backend: str = "auto", device: str | "torch.device" | None = None) -> Ops:
    """The op table for ``backend`` in ``{"auto", "cpu", "torch", "triton"}``, for tensors on ``device``.

    ``device`` (``None``, a name such as ``"cuda:0"`` or a ``torch.device``) decides ``auto``: ``triton`` for CUDA,
    ``cpu`` otherwise; ``None`` means the machine's default device. ``triton`` on a CPU device needs
    ``TRITON_INTERPRET=1`` and raises :class:`BackendUnavailable` without it, even where CUDA is present.

    Example: on a GPU host ``get_ops("auto", device="cpu").name == "cpu"`` and ``get_ops("auto").name == "triton"``.
    """
    global _warned_fallback
    import torch

    dev = None if device is None else torch.device(device)
    if backend == "torch":
        return _torch_ops()
    if backend == "cpu":
        return _cpu_ops()
    if backend == "triton":
        ok, why = triton_available()
        if ok and dev is not None and dev.type != "cuda" and not interpreter_enabled():
            ok, why = False, f"CPU tensors ({dev}) need TRITON_INTERPRET=1; use backend 'cpu' or 'torch'"
        if not ok:
            raise BackendUnavailable(f"backend 'triton' was requested but cannot run: {why}")
        return _triton_ops()
    if backend == "auto":
        if dev is not None:
            return _triton_ops() if dev.type == "cuda" else _cpu_ops()
        if torch.cuda.is_available():
            return _triton_ops()
        if not _warned_fallback:
            warnings.warn("eagle_kernels: no CUDA device, using the 'cpu' backend", stacklevel=2)
            _warned_fallback = True
        return _cpu_ops()
    raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'cpu', 'torch' or 'triton'")
