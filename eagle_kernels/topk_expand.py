"""Fused top-k tree expansion (Triton): children of a draft frontier and the frontier's best children.

Contract: :func:`eagle_kernels.reference.topk_expand`.

Two kernels, no host synchronisation:

1. ``_topk_partial_kernel``, grid ``(B * N, splits)``: each program streams one chunk of one logits row once,
   in ``BLOCK_V`` blocks, keeping a running top-``k`` (values and vocabulary ids, unsorted, in registers) and an
   online ``(max, sum of exp)``. A block only enters the insertion loop when one of its elements beats the
   current ``k``-th best, so after the first blocks most of the row is a compare and a sum. Ties go to the lower
   vocabulary id: ``(x, i)`` beats ``(y, j)`` iff ``x > y`` or ``x == y and i < j``.
2. ``_topk_select_kernel``, grid ``(B,)``: merges the splits of every row into the sorted top-``k`` and the row's
   log-sum-exp, writes the children (``parent + logit - lse``), then extracts the top ``out_k`` of the
   ``N * k`` children by repeated arg-max (lowest flat index on ties) with their parents and tokens.

The split count only changes the work distribution; it is chosen from the shapes (about two programs per SM,
chunks of at least 2048 logits), never from data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._registry import launch, register_op

__all__ = ["topk_expand"]

_MAX_K = 128  # larger k goes to the reference (a running top-k in registers stops paying off)
_BIG = tl.constexpr(2**31 - 1)  # globals read by @triton.jit code must be constexpr


@triton.jit
def _topk_partial_kernel(
    LOGITS, PART_V, PART_I, PART_M, PART_S,
    N, V, CHUNK, SPLITS,
    stride_lb, stride_ln, stride_lv,
    K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = row // N
    n = row % N
    base = LOGITS + b.to(tl.int64) * stride_lb + n.to(tl.int64) * stride_ln
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, V)

    slot = tl.arange(0, K_PAD)
    # Unused pad slots hold +inf so they are never the worst entry; real slots start as (-inf, BIG), beaten
    # by any element, so a row of -inf logits still yields its k lowest ids.
    vals = tl.where(slot < K, float("-inf"), float("inf"))
    ids = tl.where(slot < K, _BIG, -1)
    thr_v = tl.min(vals, 0)
    thr_i = tl.max(tl.where(vals == thr_v, ids, -1), 0)
    worst = tl.min(tl.where((vals == thr_v) & (ids == thr_i), slot, K_PAD), 0)
    m_run = tl.full([], float("-inf"), tl.float32)
    s_run = tl.full([], 0.0, tl.float32)
    for start in range(lo, hi, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        ok = offs < hi
        x = tl.load(base + offs * stride_lv, mask=ok, other=float("-inf")).to(tl.float32)
        # online logsumexp
        m_new = tl.maximum(m_run, tl.max(x, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(x - m_safe), 0)
        m_run = m_new
        # running top-k: insert, best first, every element of the block that beats the current k-th
        beats = ok & ((x > thr_v) | ((x == thr_v) & (offs < thr_i)))
        n_beat = tl.sum(beats.to(tl.int32), 0)
        while n_beat > 0:
            bv = tl.max(tl.where(beats, x, float("-inf")), 0)
            bi = tl.min(tl.where(beats & (x == bv), offs, _BIG), 0)
            vals = tl.where(slot == worst, bv, vals)
            ids = tl.where(slot == worst, bi, ids)
            thr_v = tl.min(vals, 0)
            thr_i = tl.max(tl.where(vals == thr_v, ids, -1), 0)
            worst = tl.min(tl.where((vals == thr_v) & (ids == thr_i), slot, K_PAD), 0)
            beats = beats & (offs != bi) & ((x > thr_v) | ((x == thr_v) & (offs < thr_i)))
            n_beat = tl.sum(beats.to(tl.int32), 0)

    part = row * SPLITS + split
    tl.store(PART_V + part * K + slot, vals, mask=slot < K)
    tl.store(PART_I + part * K + slot, ids, mask=slot < K)
    tl.store(PART_M + part, m_run)
    tl.store(PART_S + part, s_run)


@triton.jit
def _topk_select_kernel(
    PART_V, PART_I, PART_M, PART_S, PARENT, TOKEN_MAP,
    CHILD_TOK, CHILD_SCORE, TOP_SCORE, TOP_INDEX, TOP_PARENT, TOP_TOK,
    N, V, SPLITS, OUT_K,
    stride_pb, stride_pn,
    K: tl.constexpr, K_PAD: tl.constexpr, N_PAD: tl.constexpr, C_PAD: tl.constexpr, S_PAD: tl.constexpr,
    HAS_MAP: tl.constexpr,
):
    b = tl.program_id(0)
    rn = tl.arange(0, N_PAD)
    row_ok = rn < N
    rows = b * N + rn

    # log-sum-exp of every row from the splits' (max, sum)
    rs = tl.arange(0, S_PAD)
    ms_mask = row_ok[:, None] & (rs < SPLITS)[None, :]
    pm = tl.load(PART_M + rows[:, None] * SPLITS + rs[None, :], mask=ms_mask, other=float("-inf"))
    ps = tl.load(PART_S + rows[:, None] * SPLITS + rs[None, :], mask=ms_mask, other=0.0)
    row_max = tl.max(pm, 1)
    max_safe = tl.where(row_max == float("-inf"), 0.0, row_max)
    log_sum = tl.log(tl.where(row_ok, tl.sum(ps * tl.exp(pm - max_safe[:, None]), 1), 1.0))

    # merge the splits' candidates into each row's sorted top-k
    rc = tl.arange(0, C_PAD)
    c_mask = row_ok[:, None] & (rc < SPLITS * K)[None, :]
    cand_v = tl.load(PART_V + rows[:, None] * (SPLITS * K) + rc[None, :], mask=c_mask, other=float("-inf"))
    cand_i = tl.load(PART_I + rows[:, None] * (SPLITS * K) + rc[None, :], mask=c_mask, other=_BIG)
    live = c_mask & (cand_i < V)  # (-inf, BIG) placeholders of chunks shorter than k are not candidates
    rk = tl.arange(0, K_PAD)
    top_v = tl.full([N_PAD, K_PAD], float("-inf"), tl.float32)
    top_i = tl.zeros([N_PAD, K_PAD], tl.int32)
    for j in range(K):
        bv = tl.max(tl.where(live, cand_v, float("-inf")), 1)
        bi = tl.min(tl.where(live & (cand_v == bv[:, None]), cand_i, _BIG), 1)
        live = live & (cand_i != bi[:, None])
        top_v = tl.where(rk[None, :] == j, bv[:, None], top_v)
        top_i = tl.where(rk[None, :] == j, bi[:, None], top_i)

    parent = tl.load(PARENT + b * stride_pb + rn * stride_pn, mask=row_ok, other=0.0).to(tl.float32)
    score = (top_v - max_safe[:, None]) - log_sum[:, None]  # log_softmax, in torch's order of operations
    score = score + parent[:, None]
    kid_ok = row_ok[:, None] & (rk < K)[None, :]
    if HAS_MAP:
        tok = tl.load(TOKEN_MAP + top_i, mask=kid_ok, other=0).to(tl.int64)
    else:
        tok = top_i.to(tl.int64)
    flat = rn[:, None] * K + rk[None, :]
    out_off = b * N * K + flat
    tl.store(CHILD_TOK + out_off, tok, mask=kid_ok)
    tl.store(CHILD_SCORE + out_off, score, mask=kid_ok)

    # the frontier's best out_k children, descending, lowest flat index on ties
    avail = kid_ok
    for i in range(0, OUT_K):
        best = tl.max(tl.max(tl.where(avail, score, float("-inf")), 1), 0)
        pick = tl.min(tl.min(tl.where(avail & (score == best), flat, _BIG), 1), 0)
        avail = avail & (flat != pick)
        pick_tok = tl.sum(tl.sum(tl.where(flat == pick, tok, 0), 1), 0)
        tl.store(TOP_SCORE + b * OUT_K + i, best)
        tl.store(TOP_INDEX + b * OUT_K + i, pick.to(tl.int64))
        tl.store(TOP_PARENT + b * OUT_K + i, (pick // K).to(tl.int64))
        tl.store(TOP_TOK + b * OUT_K + i, pick_tok)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, so tests still cover several splits per row
    return torch.cuda.get_device_properties(device).multi_processor_count


def _check(logits, parent_scores, k, out_k, token_map) -> int:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, N, V]; got {tuple(logits.shape)}")
    B, N, V = logits.shape
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point; got {logits.dtype}")
    if parent_scores.shape != (B, N) or not parent_scores.dtype.is_floating_point:
        raise ValueError(f"parent_scores must be float [B={B}, N={N}]; got {parent_scores.dtype} "
                         f"{tuple(parent_scores.shape)}")
    if not 1 <= k <= V:
        raise ValueError(f"k must lie in [1, V={V}]; got {k}")
    out_k = k if out_k is None else out_k
    if not 1 <= out_k <= N * k:
        raise ValueError(f"out_k must lie in [1, N*k={N * k}]; got {out_k}")
    if token_map is not None and (token_map.shape != (V,) or token_map.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"token_map must be int64 [V={V}]; got {token_map.dtype} {tuple(token_map.shape)}")
    tensors = [logits, parent_scores] + ([token_map] if token_map is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError("logits, parent_scores and token_map must be on one device")
    return out_k


def _topk_expand_fake(logits, parent_scores, k, out_k=None, token_map=None):
    B, N, _ = logits.shape
    out_k = k if out_k is None else out_k
    new = logits.new_empty
    return (new((B, N, k), dtype=torch.int64), new((B, N, k), dtype=torch.float32),
            new((B, out_k), dtype=torch.float32), new((B, out_k), dtype=torch.int64),
            new((B, out_k), dtype=torch.int64), new((B, out_k), dtype=torch.int64))


@register_op("topk_expand", fake=_topk_expand_fake)
def _topk_expand_op(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    k: int,
    out_k: int | None = None,
    token_map: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out_k = _check(logits, parent_scores, k, out_k, token_map)
    B, N, V = logits.shape
    if k > _MAX_K:
        return tuple(t.clone() for t in reference.topk_expand(logits, parent_scores, k, out_k, token_map))
    dev = logits.device
    K_PAD = triton.next_power_of_2(k)
    N_PAD = triton.next_power_of_2(N)
    BLOCK_V = 1024
    # About two programs per SM, chunks >= 2048 logits, and the merge tile N_PAD x (splits*k) <= 16384.
    splits = triton.cdiv(2 * _sm_count(dev), B * N)
    splits = max(1, min(splits, V // 2048 if dev.type == "cuda" else V // 64, 16384 // (N_PAD * K_PAD)))
    chunk = triton.cdiv(triton.cdiv(V, splits), 64) * 64
    splits = triton.cdiv(V, chunk)

    part_v = torch.empty((B * N * splits * k,), device=dev, dtype=torch.float32)
    part_i = torch.empty((B * N * splits * k,), device=dev, dtype=torch.int32)
    part_m = torch.empty((B * N * splits,), device=dev, dtype=torch.float32)
    part_s = torch.empty_like(part_m)
    launch(_topk_partial_kernel, (B * N, splits))(
        logits, part_v, part_i, part_m, part_s, N, V, chunk, splits, *logits.stride(),
        K=k, K_PAD=K_PAD, BLOCK_V=BLOCK_V, num_warps=4,
    )
    child_tok = torch.empty((B, N, k), device=dev, dtype=torch.int64)
    child_score = torch.empty((B, N, k), device=dev, dtype=torch.float32)
    top_score = torch.empty((B, out_k), device=dev, dtype=torch.float32)
    top_index = torch.empty((B, out_k), device=dev, dtype=torch.int64)
    top_parent = torch.empty_like(top_index)
    top_tok = torch.empty_like(top_index)
    launch(_topk_select_kernel, (B,))(
        part_v, part_i, part_m, part_s, parent_scores, token_map if token_map is not None else part_i,
        child_tok, child_score, top_score, top_index, top_parent, top_tok,
        N, V, splits, out_k, *parent_scores.stride(),
        K=k, K_PAD=K_PAD, N_PAD=N_PAD, C_PAD=triton.next_power_of_2(splits * k),
        S_PAD=triton.next_power_of_2(splits), HAS_MAP=token_map is not None, num_warps=4,
    )
    return child_tok, child_score, top_score, top_index, top_parent, top_tok


def topk_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    k: int,
    out_k: int | None = None,
    token_map: torch.Tensor | None = None,
) -> reference.TopkExpandOutput:
    """Each frontier row's top-``k`` children and the best ``out_k`` of all ``N * k``; see the reference.

    Args:
        logits: ``[B, N, V]`` float16/bfloat16/float32 draft logits, any strides (read once).
        parent_scores: ``[B, N]`` float cumulative log-probabilities.
        k: children per row, ``1 <= k <= V`` (``k > 128`` runs the reference).
        out_k: selected children, default ``k``, ``out_k <= N * k``.
        token_map: optional ``[V]`` int64 draft-id -> target-id map.

    Returns:
        :class:`~eagle_kernels.reference.TopkExpandOutput`; scores float32, ids int64, ties to the lower index.
    """
    return reference.TopkExpandOutput(*_topk_expand_op(logits, parent_scores, k, out_k, token_map))
