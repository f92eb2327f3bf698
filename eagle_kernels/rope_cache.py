"""Rotary embedding of q and k fused with the K/V cache write, both planes in one launch (Triton).

Contract: :func:`eagle_kernels.reference.rope_kv_write`. The input is the merged QKV projection
``[B, T, (Hq + 2 Hkv) * D]``; the output is the rotated ``q [B, T, Hq, D]``; rotated k and plain v go straight
into the cache planes at slot ``write_idx[b, t]``, so no rotated k or v tensor is ever materialised::

    qkv[b, t] = | q_0 .. q_{Hq-1} | k_0 .. k_{Hkv-1} | v_0 .. v_{Hkv-1} |    (D values each)
    row (b*T + t, h):  h < Hq  -> rope(q_h)               -> q_out[b, t, h]
                       h >= Hq -> rope(k_{h-Hq}), v_{h-Hq} -> k_cache/v_cache[b, h-Hq, write_idx[b, t]]

A program takes ``BLOCK_R`` consecutive rows (a few on a GPU, a whole tree pass under the interpreter).

The cos/sin tables are gathered in the kernel at ``positions[b, t]`` (tree depths need not be contiguous), the
rotation (HF half-rotation layout) is computed in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import launch, register_op

# Elements per program on CPU tensors (the interpreter): large, because it runs programs one by one. Tests
# lower it to exercise the many-program tiling a GPU uses.
CPU_BLOCK_ELEMS = 1 << 18

__all__ = ["rope_kv_write"]


@triton.jit
def _rope_kv_write_kernel(
    QKV, COS, SIN, POS, WIDX, QO, KC, VC,
    R, T, HQ, NH, HALF,
    stride_xb, stride_xt, stride_cp, stride_sp, stride_pb, stride_pt, stride_wb, stride_wt,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kh, stride_ks, stride_kd, stride_vb, stride_vh, stride_vs, stride_vd,
    HKV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # row r = (token b*T + t, head h of the NH = HQ + HKV rotated heads); each row is one head vector in halves
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    r_ok = r < R
    bt = r // NH
    h = r % NH
    b = bt // T
    t = bt % T
    offs = tl.arange(0, BLOCK_HALF)
    ok = r_ok[:, None] & (offs < HALF)[None, :]
    D = 2 * HALF
    pos = tl.load(POS + b * stride_pb + t * stride_pt, mask=r_ok, other=0).to(tl.int64)
    cos_row = COS + pos[:, None] * stride_cp + offs[None, :]
    sin_row = SIN + pos[:, None] * stride_sp + offs[None, :]
    c1 = tl.load(cos_row, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + HALF, mask=ok, other=0.0).to(tl.float32)
    src = QKV + (b * stride_xb + t * stride_xt + h * D)[:, None] + offs[None, :]
    x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2

    is_q = (h < HQ)[:, None]
    q_dst = QO + (b * stride_qb + t * stride_qt + h * stride_qh)[:, None] + offs[None, :]
    tl.store(q_dst, o1.to(QO.dtype.element_ty), mask=ok & is_q)
    tl.store(q_dst + HALF, o2.to(QO.dtype.element_ty), mask=ok & is_q)

    is_k = ok & ~is_q
    kh = tl.where(h < HQ, 0, h - HQ)
    slot = tl.load(WIDX + b * stride_wb + t * stride_wt, mask=r_ok & (h >= HQ), other=0).to(tl.int64)
    k_dst = KC + (b * stride_kb + kh * stride_kh + slot * stride_ks)[:, None] + offs[None, :] * stride_kd
    tl.store(k_dst, o1.to(KC.dtype.element_ty), mask=is_k)
    tl.store(k_dst + HALF * stride_kd, o2.to(KC.dtype.element_ty), mask=is_k)
    v_src = src + HKV * D  # v head kh sits HKV heads after k head kh
    v1 = tl.load(v_src, mask=is_k, other=0.0)
    v2 = tl.load(v_src + HALF, mask=is_k, other=0.0)
    v_dst = VC + (b * stride_vb + kh * stride_vh + slot * stride_vs)[:, None] + offs[None, :] * stride_vd
    tl.store(v_dst, v1.to(VC.dtype.element_ty), mask=is_k)
    tl.store(v_dst + HALF * stride_vd, v2.to(VC.dtype.element_ty), mask=is_k)


def _check(qkv, cos, sin, positions, k_cache, v_cache, write_idx, num_heads, num_kv_heads) -> None:
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must be equal [B, Hkv, S, D]; got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    B, Hkv, S, D = k_cache.shape
    if num_heads < 1 or num_kv_heads != Hkv or num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} must be a positive multiple of num_kv_heads {num_kv_heads}, and "
                         f"num_kv_heads must equal the cache's {Hkv} heads")
    if D % 2:
        raise ValueError(f"head_dim must be even for the half rotation; got {D}")
    width = (num_heads + 2 * num_kv_heads) * D
    if qkv.dim() != 3 or qkv.shape[0] != B or qkv.shape[2] != width or qkv.stride(2) != 1:
        raise ValueError(f"qkv must be [B={B}, T, {width}] with a contiguous last dim; got {tuple(qkv.shape)} "
                         f"strides {qkv.stride()}")
    T = qkv.shape[1]
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[1] != D or tab.stride(1) != 1:
            raise ValueError(f"{name} must be [P, D={D}] with a contiguous last dim; got {tuple(tab.shape)}")
    for name, ix in (("positions", positions), ("write_idx", write_idx)):
        if ix.shape != (B, T) or ix.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32/int64 [B={B}, T={T}]; got {ix.dtype} {tuple(ix.shape)}")
    if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"qkv must be float16/bfloat16/float32; got {qkv.dtype}")
    devs = {x.device for x in (qkv, cos, sin, positions, k_cache, v_cache, write_idx)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devs)}")


def _rope_kv_write_fake(qkv, cos, sin, positions, k_cache, v_cache, write_idx, num_heads, num_kv_heads):
    return qkv.new_empty((qkv.shape[0], qkv.shape[1], num_heads, k_cache.shape[-1]))


def _launches(qkv, cos, sin, positions, k_cache, v_cache, write_idx, q, num_heads, num_kv_heads) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one call (``B * T > 0``) writing the rotated q into ``q``: the
    launcher runs them, the sm_90 check compiles them."""
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    NH = num_heads + num_kv_heads
    R = B * T * NH
    BLOCK_HALF = triton.next_power_of_2(D // 2)
    # GPU: 8 head vectors (1 KB of fp16 in, out) per program; CPU: the interpreter runs programs one after
    # another at ~1 ms each, so a whole tree pass goes in one program (CPU_BLOCK_ELEMS).
    budget = CPU_BLOCK_ELEMS // 2 if qkv.device.type == "cpu" else 512
    BLOCK_R = min(triton.next_power_of_2(R), 1 << (max(1, budget // BLOCK_HALF).bit_length() - 1))
    return [(_rope_kv_write_kernel, (triton.cdiv(R, BLOCK_R),), (
        qkv, cos, sin, positions, write_idx, q, k_cache, v_cache,
        R, T, num_heads, NH, D // 2,
        qkv.stride(0), qkv.stride(1), cos.stride(0), sin.stride(0), *positions.stride(), *write_idx.stride(),
        q.stride(0), q.stride(1), q.stride(2), *k_cache.stride(), *v_cache.stride(),
    ), dict(HKV=num_kv_heads, BLOCK_R=BLOCK_R, BLOCK_HALF=BLOCK_HALF, num_warps=4))]


def compile_cases(quick: bool):
    """The sm_90 compile check's launches (``scripts/compile_sm90.py``): Llama-2-7B (32/32 heads) and Llama-3-8B
    (32/8), head dim 128, at decode (1 token) and a 61-token tree verify, batch 1, as the runtime calls it:
    float32 ``[4096, 128]`` cos/sin tables, int64 positions and slots, cache planes of a ``[2L, B, Hkv, S, D]``
    cache; built by :func:`_launches` on meta tensors."""
    D, S = 128, 4096
    for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]:
        for model, Hq, Hkv in (("L2-7B", 32, 32), ("L3-8B", 32, 8)):
            for use, T in (("decode1", 1), ("verify61", 61)):
                B = 1
                qkv = torch.empty((B, T, (Hq + 2 * Hkv) * D), dtype=dtype, device="meta")
                cos = torch.empty((S, D), dtype=torch.float32, device="meta")
                pos = torch.empty((B, T), dtype=torch.int64, device="meta")
                cache = torch.empty((64, B, Hkv, S, D), dtype=dtype, device="meta")
                q = qkv.new_empty((B, T, Hq, D))
                for kernel, grid, args, kwargs in _launches(qkv, cos, cos, pos, cache[0], cache[1], pos, q, Hq, Hkv):
                    yield f"{str(dtype)[6:]} {model} {use} B{B}", kernel, grid, args, kwargs


@register_op("rope_kv_write", fake=_rope_kv_write_fake, mutates_args=("k_cache", "v_cache"))
def _rope_kv_write_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, write_idx: torch.Tensor, num_heads: int,
                      num_kv_heads: int) -> torch.Tensor:
    _check(qkv, cos, sin, positions, k_cache, v_cache, write_idx, num_heads, num_kv_heads)
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    q = qkv.new_empty((B, T, num_heads, D))
    if B * T == 0:
        return q
    for kernel, grid, args, kwargs in _launches(qkv, cos, sin, positions, k_cache, v_cache, write_idx, q,
                                                num_heads, num_kv_heads):
        launch(kernel, grid)(*args, **kwargs)
    return q


def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_idx: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k of ``qkv``, write k and v into the cache planes in place; returns ``q [B, T, Hq, D]``.

    Arguments as :func:`eagle_kernels.reference.rope_kv_write`; the cache planes may have any strides
    (e.g. ``cache[2 * layer]`` and ``cache[2 * layer + 1]`` of a ``[2L, B, Hkv, S, D]`` cache). Slots are not
    bounds-checked (no host sync): ``write_idx < S`` and ``positions < P`` are the caller's contract.
    """
    return _rope_kv_write_op(qkv, cos, sin, positions, k_cache, v_cache, write_idx, int(num_heads),
                             int(num_kv_heads))
