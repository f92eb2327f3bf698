"""Registration of the Triton launchers as torch custom ops (one helper shared by every op module).

``torch.library.triton_op`` (torch >= 2.6) lets ``torch.compile`` see through the launcher down to the Triton
kernels, which must then be launched through ``torch.library.wrap_triton``; older torch gets an opaque
``torch.library.custom_op``. Either way a fake implementation is registered so that tracing (``torch.compile``,
``torch.export``) and CUDA-graph capture never run the kernel on meta tensors.

Nothing here touches a GPU or compiles a kernel at import time.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

__all__ = ["NAMESPACE", "register_op", "launch"]

NAMESPACE = "eagle_kernels"

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def register_op(name: str, fake: Callable, mutates_args: Iterable[str] = ()) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``torch.ops.eagle_kernels.<name>`` with the fake implementation ``fake``.

    ``fn`` must carry full type annotations (torch infers the op schema from them). The returned object is
    callable like ``fn`` and dispatches through the torch op registry.
    """

    def deco(fn: Callable) -> Callable:
        qualname = f"{NAMESPACE}::{name}"
        if _HAS_TRITON_OP:
            op = torch.library.triton_op(qualname, fn, mutates_args=tuple(mutates_args))
        else:  # torch < 2.6
            op = torch.library.custom_op(qualname, fn, mutates_args=tuple(mutates_args))
        op.register_fake(fake)
        return op

    return deco


def launch(kernel, grid):
    """``kernel[grid]``, wrapped so that ``torch.compile`` can trace the launch inside a ``triton_op``."""
    if _HAS_TRITON_OP:
        return torch.library.wrap_triton(kernel)[grid]
    return kernel[grid]
