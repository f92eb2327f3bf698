"""KV compaction after acceptance (Triton): move the accepted path's cache entries to contiguous slots.

Contract: :func:`eagle_kernels.reference.kv_compact` (in place on ``cache [L, B, H, S, D]``).

One program per ``(plane, sequence, head)`` moves the whole path of that head: it loads every source slot
``prefix_len[b] + accept_path[b, j]`` (``j <= accept_len[b]``) into registers, waits at a barrier for all its
warps, then stores to ``prefix_len[b] + j``. Reading everything before writing anything removes the
read-after-overwrite hazard without relying on the path being increasing. Different programs touch disjoint
``(plane, b, h)`` rows, so no cross-program ordering is needed. Entries with ``accept_path[b, j] == j`` (the
root always, and any path prefix that stayed in place) are skipped.

Example, ``prefix_len = 10``, ``accept_path = [0, 2, 5, -1, ...]``, ``accept_len = 2``::

    slot   10 11 12 13 14 15          slot   10 11 12 13 14 15
    before  r  a  b  c  d  e    ->    after   r  b  e  c  d  e     (slots past 12 unspecified)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import launch, register_op

__all__ = ["kv_compact"]


@triton.jit
def _kv_compact_kernel(
    CACHE, PREFIX, PATH, ACC_LEN,
    B, H, D,
    stride_cl, stride_cb, stride_ch, stride_cs, stride_cd, stride_pb, stride_pj,
    T_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)  # over L * B * H
    h = pid % H
    b = (pid // H) % B
    plane = pid // (H * B)
    prefix = tl.load(PREFIX + b).to(tl.int64)
    n = tl.load(ACC_LEN + b).to(tl.int32) + 1
    j = tl.arange(0, T_PAD)
    src = tl.load(PATH + b * stride_pb + j * stride_pj, mask=j < n, other=0).to(tl.int32)
    move = (j < n) & (src != j)
    offs_d = tl.arange(0, BLOCK_D)
    base = CACHE + plane.to(tl.int64) * stride_cl + b.to(tl.int64) * stride_cb + h.to(tl.int64) * stride_ch
    m2 = move[:, None] & (offs_d < D)[None, :]
    rows = base + offs_d[None, :] * stride_cd
    vals = tl.load(rows + (prefix + src)[:, None] * stride_cs, mask=m2)
    tl.debug_barrier()  # every warp has read its sources before any warp overwrites one
    tl.store(rows + (prefix + j)[:, None] * stride_cs, vals, mask=m2)


def _check(cache, prefix_len, accept_path, accept_len) -> None:
    if cache.dim() != 5:
        raise ValueError(f"cache must be [L, B, H, S, D]; got {tuple(cache.shape)}")
    B = cache.shape[1]
    if accept_path.dim() != 2 or accept_path.shape[0] != B or accept_path.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"accept_path must be int64 [B={B}, T]; got {accept_path.dtype} {tuple(accept_path.shape)}")
    for name, x in (("prefix_len", prefix_len), ("accept_len", accept_len)):
        if x.shape != (B,) or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int64 [B={B}]; got {x.dtype} {tuple(x.shape)}")
    if any(x.device != cache.device for x in (prefix_len, accept_path, accept_len)):
        raise ValueError(f"prefix_len, accept_path, accept_len must be on the cache's device {cache.device}")


def _kv_compact_fake(cache, prefix_len, accept_path, accept_len):
    return None


@register_op("kv_compact", fake=_kv_compact_fake, mutates_args=("cache",))
def _kv_compact_op(cache: torch.Tensor, prefix_len: torch.Tensor, accept_path: torch.Tensor,
                   accept_len: torch.Tensor) -> None:
    _check(cache, prefix_len, accept_path, accept_len)
    L, B, H, S, D = cache.shape
    T = accept_path.shape[1]
    BLOCK_D = triton.next_power_of_2(D)
    T_PAD = triton.next_power_of_2(T)
    launch(_kv_compact_kernel, (L * B * H,))(
        cache, prefix_len, accept_path, accept_len, B, H, D, *cache.stride(), *accept_path.stride(),
        T_PAD=T_PAD, BLOCK_D=BLOCK_D, num_warps=4 if T_PAD * BLOCK_D <= 4096 else 8,
    )


def kv_compact(cache: torch.Tensor, prefix_len: torch.Tensor, accept_path: torch.Tensor,
               accept_len: torch.Tensor) -> torch.Tensor:
    """Move the accepted path's entries to slots ``prefix_len[b] + j``, in place; returns ``cache``.

    Args:
        cache: ``[L, B, H, S, D]`` any dtype and strides (K and V planes of every layer stacked on ``L``).
        prefix_len: ``[B]`` int; the tree's node ``i`` sits at slot ``prefix_len[b] + i``.
        accept_path: ``[B, T]`` int64 node indices, root first (-1 padding past ``accept_len``).
        accept_len: ``[B]`` int64; entries ``0 .. accept_len[b]`` of the path are moved.
    """
    _kv_compact_op(cache, prefix_len, accept_path, accept_len)
    return cache
