"""CUDA graphs: the buffer pool graphs read, the captured steps, and the cache of graphs by what they read.

A captured step replays over fixed addresses, so everything it reads lives in :class:`BufferPool`: the target
and draft KV caches (one each, sized for the largest batch bucket seen), and per bucket the decode state's small
buffers and the sampling settings. A graph's key (:meth:`StepGraphs.step`) is exactly what its step reads
besides those per-bucket buffers: the bucket, the step kind and tree shape, the sampled-draft mode where the step
uses it, and the pool's generation (bumped when a cache grows, which frees the old one). No caller hands a graph
buffers of its own, so none can replay one over freed memory.

Every capture allocates from one graph memory pool (graphs replay one at a time on one stream, so their
intermediates may share memory). Capture is pluggable (``capture=``): the CPU tests pass a recording stand-in.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .state import Sampling


class GraphsUnavailable(RuntimeError):
    """CUDA graphs were requested explicitly but cannot run here (backend or native extension)."""


def bucket(n: int) -> int:
    """The batch bucket of ``n`` sequences: 1..8 exactly, then the next multiple of 8 (at most 7 padding rows, and
    one captured graph per bucket and step: 8 buckets up to batch 8, one more per 8 sequences after)."""
    if n < 1:
        raise ValueError(f"batch must be >= 1, got {n}")
    return n if n <= 8 else -(-n // 8) * 8


class BufferPool:
    """The static buffers that captured graphs read.

    One target KV cache and one draft KV cache, each allocated for the largest batch bucket seen; a smaller
    bucket gets the view ``cache[:, :B]``. The caches are ``[planes, B, H_kv, S, D]``: the view keeps every plane
    ``cache[p, :B]`` contiguous and only the plane stride differs from a fresh tensor (every op takes strides). A
    larger bucket reallocates (the old cache is dropped first, so one lives at a time) and bumps
    :attr:`generation`: graphs captured over the old buffers are stale. :meth:`reserve` sizes the pool up front.

    Small per-bucket buffers (the state's lengths and tokens, the head's output, the sampling settings) are kept
    by key. With ``static=False`` (eager decoding) nothing is kept: every request allocates afresh.
    """

    def __init__(self, make_cache: Callable, make_draft_cache: Callable, device, static: bool = False):
        self._make = {"cache": make_cache, "d_cache": make_draft_cache}
        self._full: dict[str, torch.Tensor] = {}
        self._small: dict = {}
        self.device = torch.device(device)
        self.static = static
        self.allocations = {"cache": 0, "d_cache": 0}  # full-size allocations made while static (tests count them)
        self.generation = 0

    def reserve(self, batch: int, names=("cache", "d_cache")) -> None:
        """Allocate the ``names`` caches for the bucket of ``batch`` sequences now (grows only)."""
        for name in names:
            self.cache(name, bucket(batch))

    def cache(self, name: str, B: int) -> torch.Tensor:
        """The ``name`` cache (``"cache"`` or ``"d_cache"``) for ``B`` rows: a fresh one, or the pool's view."""
        if not self.static:
            return self._make[name](B)
        full = self._full.get(name)
        if full is None or full.shape[1] < B:
            self._full.pop(name, None)  # free the smaller one before allocating the larger
            full = self._full[name] = self._make[name](B)
            self.allocations[name] += 1
            self.generation += 1
        return full if full.shape[1] == B else full[:, :B]

    def get(self, key, make: Callable):
        """A small buffer kept by ``key`` while static (fixed address for graphs); ``make()`` afresh otherwise."""
        if not self.static:
            return make()
        if key not in self._small:
            self._small[key] = make()
        return self._small[key]

    def sampling(self, B: int) -> Sampling:
        """The sampling buffers of bucket ``B`` (the pool's own while static: the ones graphs captured)."""
        return self.get(("sampling", B), lambda: Sampling.empty(B, self.device))


class CudaGraphCapture:
    """A step captured as one CUDA graph; calling it replays the graph and returns the capture's outputs.

    Warm-up runs on a side stream first (Triton compilation, allocator); the step commits nothing, so running it
    three times is harmless. The outputs stay referenced here and are overwritten by each replay."""

    def __init__(self, fn: Callable, args: tuple, pool):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*args)

    def __call__(self):
        self.graph.replay()
        return self.outputs


class StepGraphs:
    """The captured steps of one model, by key, all in one graph memory pool.

    ``enabled=False``: :meth:`step` runs the step eagerly. ``capture(fn, args, pool)`` builds a replayable step
    (default :class:`CudaGraphCapture`) and ``new_pool()`` the graph memory pool (default
    ``torch.cuda.graph_pool_handle``); tests substitute recording stand-ins for both."""

    def __init__(self, pool: BufferPool, capture: Callable | None = None, new_pool: Callable | None = None):
        self.pool = pool
        self.enabled = False
        self._capture = capture or CudaGraphCapture
        self._new_pool = new_pool or torch.cuda.graph_pool_handle
        self._graphs: dict = {}
        self._memory_pool = None
        self.captures: list = []  # every key captured, in order (tests and benchmarks read it)

    def clear(self) -> None:
        self._graphs.clear()

    def keys(self) -> list:
        return list(self._graphs)

    def step(self, key: tuple, fn: Callable, *args):
        """Run ``fn(*args)``: eagerly, or by replaying the graph captured for ``key`` (captured on first use).

        ``key`` names what ``fn`` reads beyond the pool's per-bucket buffers; the pool's generation is added here,
        and graphs of an older generation (over freed caches) are dropped."""
        if not self.enabled:
            return fn(*args)
        full = (*key, self.pool.generation)
        graph = self._graphs.get(full)
        if graph is None:
            self._graphs = {k: g for k, g in self._graphs.items() if k[-1] == self.pool.generation}
            if self._memory_pool is None:
                self._memory_pool = self._new_pool()
            graph = self._graphs[full] = self._capture(fn, args, self._memory_pool)
            self.captures.append(full)
        return graph()


def native_cuda() -> bool:
    """Whether the native extension was built with CUDA (graphs need its sync-free tree buffers)."""
    try:
        from eagle_kernels import _C
    except ImportError:
        return False
    return bool(getattr(_C, "with_cuda", False))


def graphs_ready(ops_name: str) -> tuple[bool, str]:
    """Whether steps on the ops of backend ``ops_name`` can be captured here, and why not."""
    if ops_name != "triton":
        return False, f"CUDA graphs need the sync-free ops of backend 'triton', not {ops_name!r}"
    if not native_cuda():
        return False, ("CUDA graphs need the native extension eagle_kernels._C built with CUDA, and it is "
                       "missing (see csrc/README.md)")
    return True, ""


def resolve_graphs(request: bool | None, on_cuda: bool, ready: bool, why: str) -> bool:
    """Whether to capture graphs: ``request`` (None = automatic) on a CUDA model or not, with the backend and the
    native extension ``ready`` (else ``why`` not). An explicit request that cannot run raises; automatic says so
    once and runs eagerly; CPU never captures."""
    if not on_cuda:
        return False
    if ready:
        return request is not False
    if request:
        raise GraphsUnavailable(f"cuda_graphs=True cannot run: {why} (pass cuda_graphs=False to run eagerly)")
    if request is None:
        _warn_once(f"eagle_runtime: CUDA graphs off, running eagerly: {why}")
    return False


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


__all__ = ["BufferPool", "CudaGraphCapture", "GraphsUnavailable", "StepGraphs", "bucket", "graphs_ready",
           "resolve_graphs"]
