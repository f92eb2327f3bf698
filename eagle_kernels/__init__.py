"""EAGLE speculative-decoding kernels: tree attention, top-k tree expansion, acceptance, KV compaction.

Importing this package does no GPU work. :func:`get_ops` picks a backend; :mod:`eagle_kernels.reference` holds
the PyTorch reference of every op.
"""

from . import reference
from .backend import BackendUnavailable, Ops, get_ops, native_available, triton_available

__version__ = "0.1.0"
__all__ = ["reference", "get_ops", "Ops", "BackendUnavailable", "triton_available", "native_available"]
