"""RMSNorm and residual-add + RMSNorm in one pass (Triton).

Contracts: :func:`eagle_kernels.reference.rms_norm` and :func:`eagle_kernels.reference.add_rms_norm`.

A decoder carries the residual stream beside the block outputs, so each norm fuses with the add before it
(the vLLM ``fused_add_rms_norm`` shape)::

    h, res = rms_norm(x), x                      first layer's input norm (no add)
    h, res = add_rms_norm(attn_out, res)         post-attention norm
    h, res = add_rms_norm(mlp_out, res)          next layer's input norm, or the final norm

A program holds ``BLOCK_M`` whole rows of ``H`` elements in registers (``BLOCK_H = next_pow2(H)``, 8192 at
Llama-2-70B; one row per program on a GPU): it adds, writes the new residual, reduces the sum of squares in
float32 and writes the normed rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import launch, register_op

# Elements per program on CPU tensors (the interpreter): large, because it runs programs one by one. Tests
# lower it to exercise the many-program tiling a GPU uses.
CPU_BLOCK_ELEMS = 1 << 18

__all__ = ["rms_norm", "add_rms_norm"]


@triton.jit
def _add_rms_norm_kernel(
    X, RES, W, Y, RES_OUT, N, H, eps,
    stride_x, stride_r, stride_y, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    col_ok = offs < H
    ok = (rows < N)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_x + offs[None, :], mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(RES + rows[:, None] * stride_r + offs[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)  # the sum is rounded to the model dtype (HF order)
        tl.store(RES_OUT + rows[:, None] * stride_ro + offs[None, :], x, mask=ok)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=1) / H + eps)
    normed = (xf * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + offs, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + offs[None, :], (w[None, :] * normed).to(Y.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.dim() < 1 or x.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dim; got shape {tuple(x.shape)} strides {x.stride()}")
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        raise ValueError(f"{name} rows must be flattenable to [N, H] without a copy; got strides {x.stride()}") from None


def _check(x, residual, weight) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16/bfloat16/float32; got {x.dtype}")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight must be [H={x.shape[-1]}]; got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({x.dtype} {tuple(x.shape)}); got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    devs = {t.device for t in (x, residual, weight) if t is not None}
    if len(devs) != 1:
        raise ValueError(f"x, residual, weight must be on one device; got {sorted(str(d) for d in devs)}")


def _launch(x, residual, weight, eps, y, res_out):
    x2, y2 = _rows(x, "x"), y.view(-1, x.shape[-1])
    r2 = _rows(residual, "residual") if residual is not None else None
    ro2 = res_out.view(-1, x.shape[-1]) if res_out is not None else None
    if x2.shape[0] == 0:
        return
    for kernel, grid, args, kwargs in _launches(x2, r2, weight, eps, y2, ro2):
        launch(kernel, grid)(*args, **kwargs)


def _launches(x2, r2, weight, eps, y2, ro2) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one call on the rows ``x2 [N, H]`` (N > 0), with the residual rows
    ``r2`` and their output ``ro2`` (both None for a plain RMSNorm): the launcher runs them, the sm_90 check
    compiles them."""
    N, H = x2.shape
    BLOCK_H = triton.next_power_of_2(H)
    BLOCK_M = _rows_per_program(N, BLOCK_H, x2.device)
    has_residual = r2 is not None
    r2 = r2 if has_residual else x2
    ro2 = ro2 if has_residual else y2
    return [(_add_rms_norm_kernel, (triton.cdiv(N, BLOCK_M),),
             (x2, r2, weight, y2, ro2, N, H, eps, x2.stride(0), r2.stride(0), y2.stride(0), ro2.stride(0)),
             dict(HAS_RESIDUAL=has_residual, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H,
                  num_warps=min(16, max(1, BLOCK_M * BLOCK_H // 512))))]


def compile_cases(quick: bool):
    """The sm_90 compile check's launches (``scripts/compile_sm90.py``): the norms of Llama-2-7B and Llama-3-8B
    (both H 4096, so one specialisation each) at decode (1 token) and a 61-token tree verify, batch 1, with and
    without the residual add; built by :func:`_launches` on meta tensors."""
    for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]:
        for model, H in (("L2-7B", 4096), ("L3-8B", 4096)):
            for use, T in (("decode1", 1), ("verify61", 61)):
                x = torch.empty((T, H), dtype=dtype, device="meta")
                w = torch.empty((H,), dtype=dtype, device="meta")
                for op, res in (("rms_norm", None), ("add_rms_norm", torch.empty_like(x))):
                    y = torch.empty_like(x)
                    ro = torch.empty_like(x) if res is not None else None
                    for kernel, grid, args, kwargs in _launches(x, res, w, 1e-5, y, ro):
                        yield f"{op} {str(dtype)[6:]} {model} {use} B1", kernel, grid, args, kwargs


def _rows_per_program(n_rows: int, row_block: int, device: torch.device) -> int:
    """Rows per program: one on a GPU (a row of 4096 fp16 is 8 KB: enough work for a CTA, and decode batches
    need every CTA they can get); on CPU (the interpreter runs programs one after another at ~1 ms each) as
    many as fit in CPU_BLOCK_ELEMS, so a whole tree pass is a single program."""
    if device.type != "cpu":
        return 1 if row_block >= 1024 else min(triton.next_power_of_2(n_rows), 1024 // row_block)
    return max(1, min(triton.next_power_of_2(n_rows), CPU_BLOCK_ELEMS // row_block))


def _rms_norm_fake(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@register_op("rms_norm", fake=_rms_norm_fake)
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check(x, None, weight)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, None, weight, eps, y, None)
    return y


def _add_rms_norm_fake(x, residual, weight, eps):
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, memory_format=torch.contiguous_format))


@register_op("add_rms_norm", fake=_add_rms_norm_fake)
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, residual, weight)
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _launch(x, residual, weight, eps, y, res_out)
    return y, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of the rows of ``x [..., H]`` (contiguous last dim) with ``weight [H]``; a new contiguous tensor."""
    return _rms_norm_op(x, weight, float(eps))


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one launch; both new contiguous tensors of ``x``'s shape."""
    return _add_rms_norm_op(x, residual, weight, float(eps))
