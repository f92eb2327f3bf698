"""Tree-buffer construction backed by the native extension ``eagle_kernels._C`` (sources in ``csrc/``).

The op is registered by the extension as ``torch.ops.eagle_kernels.build_tree_buffers`` (C++ on CPU tensors, a
CUDA kernel on CUDA tensors, a meta kernel for tracing) and can be captured in CUDA graphs. The wrapper adds the
:class:`~eagle_kernels.reference.TreeBuffers` result type and a clear error (:class:`BackendUnavailable`) when
the extension is missing; CUDA tensors given to an extension built without CUDA fall back to the reference with
one warning.

Validation differs by device. The CPU op checks the tree (``parents[:, 0] == -1``, ``0 <= parents[:, i] < i``,
depth ``<= max_depth``) and raises ``ValueError`` like the reference. The CUDA op never synchronises with the
host, so it checks only shapes and dtypes: an invalid tree gives unspecified (in-bounds) outputs, and a tree
deeper than ``max_depth`` gets truncated paths. Validate on the CPU op (or the reference) when unsure.
"""

from __future__ import annotations

import warnings

import torch

from . import reference
from .errors import BackendUnavailable
from .reference import TreeBuffers

try:
    from . import _C
except ImportError as e:  # not built: pure-Python install, no compiler, or EAGLE_KERNELS_NO_NATIVE=1
    _C = None
    _IMPORT_ERROR: ImportError | None = e
else:
    _IMPORT_ERROR = None

__all__ = ["build_tree_buffers", "native_cuda_available"]


def native_cuda_available() -> bool:
    """Whether the extension was built with its CUDA ops (says nothing about a GPU being present)."""
    return _C is not None and bool(_C.with_cuda)


_warned_no_cuda = False


def _use_reference(t: torch.Tensor) -> bool:
    """True (after one warning) for a CUDA tensor when ``_C`` was built without CUDA; raises when ``_C`` is missing.

    ``backend`` picks these wrappers whenever ``_C`` imports, so a CPU-only build on a GPU machine falls back to
    the reference rather than failing the decode loop (the design's rule for automatic choices).
    """
    global _warned_no_cuda
    if _C is None:
        raise BackendUnavailable(
            "eagle_kernels._C (the native extension) is not built: reinstall with "
            "`pip install --no-build-isolation -e .` where a C++ compiler is present (see csrc/README.md), "
            f"or use eagle_kernels.reference instead. Import error: {_IMPORT_ERROR}"
        )
    if t.is_cuda and not _C.with_cuda:
        if not _warned_no_cuda:
            warnings.warn(
                "eagle_kernels._C was built without CUDA (torch had no CUDA or nvcc was not found at install "
                "time): using the PyTorch reference for CUDA tensors; rebuild on a machine with nvcc",
                stacklevel=3,
            )
            _warned_no_cuda = True
        return True
    return False


def build_tree_buffers(parents: torch.Tensor, max_depth: int | None = None) -> TreeBuffers:
    """Native :func:`eagle_kernels.reference.build_tree_buffers`: same contract, outputs on ``parents.device``.

    Args:
        parents: ``[B, T]`` int64, ``parents[:, 0] == -1``, ``0 <= parents[:, i] < i`` for ``i >= 1``.
        max_depth: width of ``paths`` minus one, default ``T - 1``.

    Returns:
        ``TreeBuffers(mask [B,T,T] bool, depth [B,T], first_child [B,T], next_sibling [B,T],
        paths [B,T,max_depth+1])``, int64 with ``-1`` padding. ``parents = [[-1, 0, 0, 1]]`` gives depth
        ``[0, 1, 1, 2]``, first_child ``[1, 3, -1, -1]``, next_sibling ``[-1, 2, -1, -1]``.
    """
    if _use_reference(parents):
        return reference.build_tree_buffers(parents, max_depth)
    return TreeBuffers(*torch.ops.eagle_kernels.build_tree_buffers(parents, max_depth))

