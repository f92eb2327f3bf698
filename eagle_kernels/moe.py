"""Grouped MoE experts (Mixtral): top-k routed SwiGLU experts as two grouped GEMM launches (Triton).

Contract: :func:`eagle_kernels.reference.moe_experts` (same arguments, same result up to float rounding).

Static shapes throughout, so the op runs inside CUDA graphs: no host synchronisation, no data-dependent sizes.

1. **Align** (a few torch ops on the device): the ``N * K`` (token, slot) assignments are sorted by expert and
   laid out in ``BLOCK_M``-row blocks, each expert's run padded to a whole number of blocks. The padded length
   is bounded by ``P = N*K + E*(BLOCK_M-1)`` rounded up to ``BLOCK_M``, so the buffers and the grid are sized from
   ``N, K, E`` only; unused rows hold the sentinel ``N * K`` and unused blocks the expert ``E`` (they exit). With
   ``N = 3, K = 2, E = 3, BLOCK_M = 4`` and routes ``top_i = [[2, 0], [0, 1], [2, 0]]`` (assignment ``a = n*K + k``)::

       assignments by expert    e0: a1 a2 a5    e1: a3    e2: a0 a4
       sorted_ids (P = 16)      [1 2 5 6 | 3 6 6 6 | 0 4 6 6 | 6 6 6 6]      (6 = N*K, padding)
       block_expert             [0 | 1 | 2 | 3]                              (3 = E, idle block)

2. **Gate/up GEMM** (one launch over every expert): program ``(block, column tile)`` multiplies the block's
   token rows by its expert's ``w1`` and ``w3`` column tiles together and stores ``silu(x w1^T) * (x w3^T)``
   (float32 accumulation, stored in ``x.dtype``) at the padded rows of ``[P, I]``.
3. **Down GEMM** (one launch): ``h w2^T`` per block, scaled by each assignment's routing weight, written to the
   assignment's own row of ``[N*K, H]`` (float32); the ``K`` rows of a token are summed in a fixed order
   (deterministic: no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import launch, register_op

__all__ = ["moe_experts", "moe_plan", "moe_align"]


@triton.jit
def _moe_gate_up_kernel(
    X, W1, W3, IDS, BLOCK_EXPERT, HBUF,
    NK, H, I, E,
    stride_xn, stride_xh,
    stride_1e, stride_1i, stride_1h,
    stride_3e, stride_3i, stride_3h,
    stride_bp, stride_bi,
    TOPK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    if e < E:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(IDS + rows)
        row_ok = ids < NK
        tok = (ids // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < I
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < H
            x = tl.load(X + tok[:, None] * stride_xn + offs_k[None, :] * stride_xh,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            w1 = tl.load(W1 + e * stride_1e + offs_n[None, :] * stride_1i + offs_k[:, None] * stride_1h,
                         mask=w_mask, other=0.0)
            acc_g = tl.dot(x, w1, acc_g, input_precision=PRECISION)
            w3 = tl.load(W3 + e * stride_3e + offs_n[None, :] * stride_3i + offs_k[:, None] * stride_3h,
                         mask=w_mask, other=0.0)
            acc_u = tl.dot(x, w3, acc_u, input_precision=PRECISION)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        tl.store(HBUF + rows[:, None].to(tl.int64) * stride_bp + offs_n[None, :] * stride_bi,
                 h.to(HBUF.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _moe_down_kernel(
    HBUF, W2, IDS, BLOCK_EXPERT, TOPW, OUT,
    NK, H, I, E,
    stride_bp, stride_bi,
    stride_2e, stride_2h, stride_2i,
    stride_on, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    if e < E:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        ids = tl.load(IDS + rows)
        row_ok = ids < NK
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < H
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, I, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < I
            h = tl.load(HBUF + rows[:, None].to(tl.int64) * stride_bp + offs_k[None, :] * stride_bi,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w2 = tl.load(W2 + e * stride_2e + offs_n[None, :] * stride_2h + offs_k[:, None] * stride_2i,
                         mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(h, w2, acc, input_precision=PRECISION)
        w = tl.load(TOPW + ids, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
        tl.store(OUT + ids[:, None].to(tl.int64) * stride_on + offs_n[None, :] * stride_oh, acc,
                 mask=row_ok[:, None] & n_ok[None, :])


def moe_plan(N: int, K: int, E: int, H: int, I: int, dtype: torch.dtype) -> dict:
    """Block sizes, padded length and grids of :func:`moe_experts` for ``N`` tokens routed to ``K`` of ``E``
    experts (hidden ``H``, intermediate ``I``). Host arithmetic only; the launcher and the sm_90 compile check
    both call it.

    ``BLOCK_M`` follows the mean rows per expert (decoding: ``N*K/E`` is a handful, so 16, the ``tl.dot``
    minimum; prefill: up to 64); fp32 halves ``BLOCK_K`` (shared memory of two weight tiles per step).
    """
    per_expert = max(1, N * K // max(E, 1))
    BLOCK_M = 16 if per_expert <= 16 else (32 if per_expert <= 64 else 64)
    BLOCK_N = 64
    BLOCK_K = 32 if dtype == torch.float32 else 64
    P = triton.cdiv(N * K + E * (BLOCK_M - 1), BLOCK_M) * BLOCK_M
    blocks = P // BLOCK_M
    return dict(BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, P=P,
                grid_gate_up=(blocks, triton.cdiv(I, BLOCK_N)), grid_down=(blocks, triton.cdiv(H, BLOCK_N)),
                num_warps=4, num_stages=2)


def moe_align(top_i: torch.Tensor, E: int, BLOCK_M: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_ids [P] int32, block_expert [P // BLOCK_M] int32)`` of the padded expert-sorted layout (module
    docstring); static shapes and device ops only."""
    dev = top_i.device
    NK = top_i.numel()
    flat = top_i.reshape(-1).to(torch.int64)
    counts = torch.zeros(E, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    start = torch.cumsum(counts, 0) - counts  # first sorted index of each expert
    pstart = torch.cumsum(padded, 0) - padded  # first padded row of each expert
    order = torch.sort(flat, stable=True).indices  # assignment ids, grouped by expert
    ex = flat[order]
    rank = torch.arange(NK, device=dev) - start[ex]
    sorted_ids = torch.full((P,), NK, dtype=torch.int32, device=dev)
    sorted_ids.scatter_(0, pstart[ex] + rank, order.to(torch.int32))
    block_start = torch.arange(0, P, BLOCK_M, device=dev)
    block_expert = torch.searchsorted(torch.cumsum(padded, 0), block_start, right=True).to(torch.int32)
    return sorted_ids, block_expert  # blocks past the last expert's run get E


def _launches(x, w1, w3, w2, sorted_ids, block_expert, topw, hbuf, out_k, K, cfg) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one call: the launcher runs them, the sm_90 check compiles them."""
    N, H = x.shape
    E, I, _ = w1.shape
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], PRECISION=prec,
                  num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return [
        (_moe_gate_up_kernel, cfg["grid_gate_up"], (
            x, w1, w3, sorted_ids, block_expert, hbuf, N * K, H, I, E,
            *x.stride(), *w1.stride(), *w3.stride(), *hbuf.stride()), dict(blocks, TOPK=K)),
        (_moe_down_kernel, cfg["grid_down"], (
            hbuf, w2, sorted_ids, block_expert, topw, out_k, N * K, H, I, E,
            *hbuf.stride(), *w2.stride(), *out_k.stride()), blocks),
    ]


def compile_cases(quick: bool):
    """The sm_90 compile check's launches (``scripts/compile_sm90.py``) at Mixtral-8x7B's expert shapes (E 8,
    top-2, H 4096, I 14336): decode (1 token), verify of a 61-token tree at batch 1 (and 16), a 512-token
    prefill; built by the launcher's own :func:`moe_plan` and :func:`_launches` on meta tensors."""
    E, K, H, I = 8, 2, 4096, 14336
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    for dtype in dtypes:
        for use, N in ([("decode1", 1), ("verify61", 61)] if quick else
                       [("decode1", 1), ("verify61", 61), ("verify61x16", 976), ("prefill512", 512)]):
            cfg = moe_plan(N, K, E, H, I, dtype)
            x = torch.empty((N, H), dtype=dtype, device="meta")
            w1 = torch.empty((E, I, H), dtype=dtype, device="meta")
            w2 = torch.empty((E, H, I), dtype=dtype, device="meta")
            ids = torch.empty((cfg["P"],), dtype=torch.int32, device="meta")
            blk = torch.empty((cfg["P"] // cfg["BLOCK_M"],), dtype=torch.int32, device="meta")
            topw = torch.empty((N * K,), dtype=torch.float32, device="meta")
            hbuf = torch.empty((cfg["P"], I), dtype=dtype, device="meta")
            out_k = torch.empty((N * K, H), dtype=torch.float32, device="meta")
            for kernel, grid, args, kwargs in _launches(x, w1, w1, w2, ids, blk, topw, hbuf, out_k, K, cfg):
                yield f"{str(dtype)[6:]} Mixtral-8x7B {use}", kernel, grid, args, kwargs


def _check(x, top_w, top_i, w1, w3, w2) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [N, H]; got {tuple(x.shape)}")
    N, H = x.shape
    if w1.dim() != 3 or w1.shape[2] != H or w3.shape != w1.shape:
        raise ValueError(f"w1 and w3 must be equal [E, I, H={H}]; got {tuple(w1.shape)} and {tuple(w3.shape)}")
    E, I, _ = w1.shape
    if w2.shape != (E, H, I):
        raise ValueError(f"w2 must be [E={E}, H={H}, I={I}]; got {tuple(w2.shape)}")
    if top_i.dim() != 2 or top_i.shape[0] != N or top_w.shape != top_i.shape:
        raise ValueError(f"top_w and top_i must be equal [N={N}, K]; got {tuple(top_w.shape)}, {tuple(top_i.shape)}")
    if top_i.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"top_i must be int32/int64; got {top_i.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or any(w.dtype != x.dtype for w in (w1, w3, w2)):
        raise ValueError(f"x and the expert weights must share one of float16/bfloat16/float32; got {x.dtype}, "
                         f"{w1.dtype}, {w3.dtype}, {w2.dtype}")
    devs = {t.device for t in (x, top_w, top_i, w1, w3, w2)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devs)}")


def _moe_experts_fake(x, top_w, top_i, w1, w3, w2):
    return torch.empty_like(x)


@register_op("moe_experts", fake=_moe_experts_fake)
def _moe_experts_op(x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                    w2: torch.Tensor) -> torch.Tensor:
    _check(x, top_w, top_i, w1, w3, w2)
    N, H = x.shape
    E, I, _ = w1.shape
    K = top_i.shape[1]
    cfg = moe_plan(N, K, E, H, I, x.dtype)
    sorted_ids, block_expert = moe_align(top_i, E, cfg["BLOCK_M"], cfg["P"])
    hbuf = torch.empty((cfg["P"], I), device=x.device, dtype=x.dtype)
    out_k = torch.empty((N * K, H), device=x.device, dtype=torch.float32)
    topw = top_w.reshape(-1).float().contiguous()
    for kernel, grid, args, kwargs in _launches(x, w1, w3, w2, sorted_ids, block_expert, topw, hbuf, out_k, K, cfg):
        launch(kernel, grid)(*args, **kwargs)
    return out_k.view(N, K, H).sum(1).to(x.dtype)


def moe_experts(x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Sum over each token's ``K`` routed experts of ``top_w * (silu(x w1[e]^T) * (x w3[e]^T)) w2[e]^T``.

    Args:
        x: ``[N, H]`` float16/bfloat16/float32 tokens, any strides.
        top_w: ``[N, K]`` routing weights (any float dtype; used in float32).
        top_i: ``[N, K]`` int32/int64 expert ids in ``[0, E)`` (not checked: no host sync).
        w1, w3: ``[E, I, H]`` gate and up projections; w2: ``[E, H, I]`` down projection; dtype of ``x``.

    Returns:
        ``[N, H]`` in ``x.dtype``; GEMMs accumulate in float32, the SwiGLU product is rounded to ``x.dtype``.
    """
    return _moe_experts_op(x, top_w, top_i, w1, w3, w2)
