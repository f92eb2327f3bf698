"""Tree acceptance and token sampling (Triton), draw-for-draw identical to the reference.

Contracts: :func:`eagle_kernels.reference.accept_tree` and :func:`eagle_kernels.reference.sample_tokens`.

One program per sequence walks the draft tree from the root, exactly as the reference does: at node ``u`` it
computes the processed target distribution ``p`` of row ``u`` (temperature, top-k, top-p), tries ``u``'s
children in node-index order (children are found by scanning ``parents``; no child lists are built), accepts
child ``c`` with token ``x`` iff ``hash_uniform(seed, offset, b, c, 0) < p(x)``, and on rejection removes ``x``
from ``p``. With no child accepted it samples the next token from the remaining ``p`` by the exponential race
``argmax_v log p(v) - log(-log hash_uniform(seed, offset, b, u, 1, v))``. ``temperature <= 0`` rows take the
greedy walk (argmax of the raw logits, lowest index on ties) with no random numbers. The random stream is
the reference's ``fmix32`` chain computed on ``uint32`` in the kernel, so the same ``(seed, offset)`` gives the
same tokens on every backend. Seed and offset stay in device tensors: no host synchronisation, CUDA-graph safe.

How ``p`` is held without a ``[V]`` buffer: row ``u`` is re-read from the logits on every pass, as
``p(v) = exp(x_v / t - max) / sum``. Removing rejected tokens is tracked lazily: ``Z = 1 - removed mass`` and the
list of removed tokens, so ``p_now(v) = p(v) / Z`` off the list and 0 on it. Top-k and top-p keep a prefix of the
tokens sorted by ``(p desc, index asc)``; instead of sorting, the kernel finds the cut in place:

* top-p: bisection over the float32 bit patterns of ``p`` (non-negative floats order like their bits) for the
  smallest value ``tau`` whose strictly-greater mass is below ``top_p`` (the crossing token is kept); ties at
  ``tau`` are kept lowest index first while the mass before them stays below ``top_p``;
* top-k (or the shorter of the two cuts): bisection for the ``L``-th largest value, stopping as soon as exactly
  ``L`` values lie above the probe; only when ties straddle the cut, a bisection over the index keeps the
  lowest-index tied tokens.

Each bisection step is one pass over the row (about 31 passes for a cut), paid only on rows where top-k or
top-p is active and only at nodes the walk visits. ``top_p >= 1`` disables top-p (the reference's float
cumsum can round tail tokens of probability ~1e-8 out at ``top_p == 1``; the kernel keeps them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._registry import launch, register_op

__all__ = ["accept_tree", "sample_tokens"]

_SAMPLE_NODE = tl.constexpr(2**31 - 1)  # the node counter of sample_tokens' stream (reference.sample_tokens)


@triton.jit
def _fmix32(x):
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    x = x ^ (x >> 16)
    return x


@triton.jit
def _mix(h, counter):
    """One counter step of reference.hash_uniform: fmix32(h ^ (counter + 0x9E3779B9)), all mod 2**32."""
    c = (counter + tl.zeros([], tl.int32)).to(tl.uint32)  # also takes a plain int loop index (interpreter)
    return _fmix32(h ^ (c + 0x9E3779B9))


@triton.jit
def _to_uniform(h):
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _probs(row, stride_v, offs, V, t, m, s):
    """Softmax(x / t) of the block ``offs`` of a row, as torch computes it; 0 past the end."""
    ok = offs < V
    x = tl.load(row + offs * stride_v, mask=ok, other=float("-inf")).to(tl.float32)
    return tl.where(ok, tl.exp(x / t - m) / s, 0.0)


@triton.jit
def _row_argmax(row, stride_v, V, BLOCK_V: tl.constexpr):
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
        bmax = tl.max(x, 0)
        bi = tl.min(tl.where(x == bmax, offs, 2147483647), 0)
        take = bmax > best  # strict: an earlier block keeps ties (lowest index)
        best_i = tl.where(take, bi, best_i)
        best = tl.where(take, bmax, best)
    return best_i


@triton.jit
def _row_stats(row, stride_v, V, t, BLOCK_V: tl.constexpr):
    """max of x / t and sum of exp(x / t - max): two passes, the same arithmetic as torch.softmax."""
    m = tl.full([], float("-inf"), tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
        m = tl.maximum(m, tl.max(x / t, 0))
    s = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32)
        s += tl.sum(tl.where(offs < V, tl.exp(x / t - m), 0.0), 0)
    return m, s


@triton.jit
def _tie_stats(row, stride_v, V, t, m, s, tau, BLOCK_V: tl.constexpr):
    """(mass with p > tau, count with p > tau, count with p == tau)."""
    mass = tl.full([], 0.0, tl.float32)
    c_gt = tl.full([], 0, tl.int32)
    c_eq = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(row, stride_v, offs, V, t, m, s)
        gt = (p > tau) & (offs < V)
        mass += tl.sum(tl.where(gt, p, 0.0), 0)
        c_gt += tl.sum(gt.to(tl.int32), 0)
        c_eq += tl.sum(((p == tau) & (offs < V)).to(tl.int32), 0)
    return mass, c_gt, c_eq


@triton.jit
def _mass_above(row, stride_v, V, t, m, s, tau, BLOCK_V: tl.constexpr):
    mass = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(row, stride_v, offs, V, t, m, s)
        mass += tl.sum(tl.where(p > tau, p, 0.0), 0)
    return mass


@triton.jit
def _count_at_least(row, stride_v, V, t, m, s, tau, BLOCK_V: tl.constexpr):
    cnt = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(row, stride_v, offs, V, t, m, s)
        cnt += tl.sum(((p >= tau) & (offs < V)).to(tl.int32), 0)
    return cnt


@triton.jit
def _count_tied_upto(row, stride_v, V, t, m, s, tau, last, BLOCK_V: tl.constexpr):
    cnt = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(row, stride_v, offs, V, t, m, s)
        cnt += tl.sum(((p == tau) & (offs <= last) & (offs < V)).to(tl.int32), 0)
    return cnt


@triton.jit
def _kept(p, offs, tau, idx_cut):
    return (p > tau) | ((p == tau) & (offs <= idx_cut))


@triton.jit
def _filter_cut(row, stride_v, V, t, m, s, top_k, top_p, BLOCK_V: tl.constexpr):
    """The top-k/top-p cut as (tau, idx_cut, kept mass): v is kept iff p > tau or (p == tau and v <= idx_cut)."""
    kk = tl.where((top_k <= 0) | (top_k > V), V, top_k)
    p_max_bits = (1.0 / s).to(tl.int32, bitcast=True)  # the largest p is exp(0) / s
    tau = tl.full([], -1.0, tl.float32)  # no filter: everything kept
    idx_cut = V
    n_tie = tl.full([], 0, tl.int32)
    c_eq = tl.full([], 0, tl.int32)
    n_p = V
    use_p = top_p < 1.0
    if use_p:
        if top_p <= 0.0:
            n_p = 1  # the reference always keeps the most probable token
        else:
            # smallest bit pattern whose strictly-greater mass is below top_p
            lo = tl.full([], -1, tl.int32)
            hi = p_max_bits
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _mass_above(row, stride_v, V, t, m, s, mid.to(tl.float32, bitcast=True), BLOCK_V) < top_p:
                    hi = mid
                else:
                    lo = mid
            tau = hi.to(tl.float32, bitcast=True)
            mass_gt, c_gt, c_eq = _tie_stats(row, stride_v, V, t, m, s, tau, BLOCK_V)
            # tied tokens are taken lowest index first while the mass before them is below top_p
            n_tie = c_eq
            if tau > 0.0:
                n_tie = tl.minimum(tl.maximum(tl.ceil((top_p - mass_gt) / tau).to(tl.int32), 1), c_eq)
            n_p = c_gt + n_tie
    L = tl.minimum(kk, n_p)
    if L < V:
        need = n_tie
        if (L < n_p) | (not use_p):  # the top-k cut is the shorter one: find the L-th largest p
            lo = tl.full([], 0, tl.int32)
            hi = p_max_bits + 1
            exact = tl.full([], 0, tl.int32)
            while (hi - lo > 1) & (exact == 0):
                mid = (lo + hi) // 2
                cnt = _count_at_least(row, stride_v, V, t, m, s, mid.to(tl.float32, bitcast=True), BLOCK_V)
                exact = (cnt == L).to(tl.int32)  # exactly L values >= v(mid): that is the cut, stop early
                if cnt >= L:
                    lo = mid
                else:
                    hi = mid
            if exact != 0:
                tau = (lo - 1).to(tl.float32, bitcast=True)  # p > the float below v(lo)  <=>  p >= v(lo)
                need = tl.full([], 0, tl.int32)
                c_eq = tl.full([], 0, tl.int32)
            else:
                tau = lo.to(tl.float32, bitcast=True)
                mass_gt, c_gt, c_eq = _tie_stats(row, stride_v, V, t, m, s, tau, BLOCK_V)
                need = L - c_gt
        if need < c_eq:  # ties straddle the cut: keep the `need` lowest indices among them
            lo = tl.full([], -1, tl.int32)
            hi = tl.full([], 0, tl.int32) + V - 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _count_tied_upto(row, stride_v, V, t, m, s, tau, mid, BLOCK_V) >= need:
                    hi = mid
                else:
                    lo = mid
            idx_cut = hi
    kept_mass = tl.full([], 0.0, tl.float32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(row, stride_v, offs, V, t, m, s)
        kept_mass += tl.sum(tl.where(_kept(p, offs, tau, idx_cut) & (offs < V), p, 0.0), 0)
    return tau, idx_cut, kept_mass


@triton.jit
def _race(row, stride_v, V, t, m, s, tau, idx_cut, norm, z_left, removed, h_node, BLOCK_V: tl.constexpr):
    """argmax_v log(p_now(v)) - log(-log u_v), u_v = uniform(h_node, 1, v); removed tokens and p == 0 excluded."""
    h_flag = _mix(h_node, 1)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(row, stride_v, offs, V, t, m, s)
        p = tl.where(_kept(p, offs, tau, idx_cut), p, 0.0) / norm / z_left
        u = _to_uniform(_mix(h_flag, offs))
        score = tl.where(p > 0, tl.log(tl.where(p > 0, p, 1.0)) - tl.log(-tl.log(u)), float("-inf"))
        bmax = tl.max(score, 0)
        bi = tl.min(tl.where(score == bmax, offs, 2147483647), 0)
        is_removed = (tl.sum((removed == bi).to(tl.int32), 0) > 0) & (bmax > float("-inf"))
        while is_removed:  # rejected siblings are out of p; they rarely win, so mask them lazily
            score = tl.where(offs == bi, float("-inf"), score)
            bmax = tl.max(score, 0)
            bi = tl.min(tl.where(score == bmax, offs, 2147483647), 0)
            is_removed = (tl.sum((removed == bi).to(tl.int32), 0) > 0) & (bmax > float("-inf"))
        take = bmax > best
        best_i = tl.where(take, bi, best_i)
        best = tl.where(take, bmax, best)
    return best_i


@triton.jit
def _accept_kernel(
    LOGITS, TOKENS, PARENTS, TEMP, TOP_P, TOP_K, SEED, OFFSET,
    PATH, ACC_LEN, NEXT,
    T, V,
    stride_lb, stride_lt, stride_lv, stride_tb, stride_tt, stride_pb, stride_pt,
    SAMPLE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    temp = tl.load(TEMP + b).to(tl.float32)
    top_p = tl.load(TOP_P + b).to(tl.float32)
    top_k = tl.load(TOP_K + b).to(tl.int32)
    greedy = temp <= 0.0
    t = tl.where(greedy, 1.0, temp)
    # hash_uniform(seed, offset, b, ...): the first three mixing steps are shared by every draw of this row
    h = _fmix32((tl.load(SEED) & 0xFFFFFFFF).to(tl.uint32))
    h = _fmix32(h ^ (tl.load(OFFSET) & 0xFFFFFFFF).to(tl.uint32))
    h_b = _mix(h, b)

    slot = tl.arange(0, T_PAD)
    path = tl.where(slot == 0, 0, -1)
    node = tl.full([], 0, tl.int32)
    n_acc = tl.full([], 0, tl.int32)
    nxt = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    while done == 0:
        row = LOGITS + b.to(tl.int64) * stride_lb + node.to(tl.int64) * stride_lt
        arg = tl.full([], 0, tl.int32)
        m = tl.full([], 0.0, tl.float32)
        s = tl.full([], 1.0, tl.float32)
        tau = tl.full([], -1.0, tl.float32)
        idx_cut = V
        norm = tl.full([], 1.0, tl.float32)
        if greedy:
            arg = _row_argmax(row, stride_lv, V, BLOCK_V)
        else:
            m, s = _row_stats(row, stride_lv, V, t, BLOCK_V)
            if (top_p < 1.0) | ((top_k > 0) & (top_k < V)):
                tau, idx_cut, norm = _filter_cut(row, stride_lv, V, t, m, s, top_k, top_p, BLOCK_V)
        removed = tl.full([T_PAD], -1, tl.int32)
        n_removed = tl.full([], 0, tl.int32)
        z_left = tl.full([], 1.0, tl.float32)  # 1 - mass of the rejected tokens: p_now = p / z_left off the list
        moved = tl.full([], 0, tl.int32)
        child = tl.full([], 0, tl.int32)
        if not SAMPLE:
            for c in range(node + 1, T):
                par = tl.load(PARENTS + b * stride_pb + c * stride_pt).to(tl.int32)
                if (par == node) & (moved == 0):
                    x = tl.load(TOKENS + b * stride_tb + c * stride_tt).to(tl.int32)
                    px = tl.full([], 0.0, tl.float32)
                    if greedy:
                        accept = x == arg  # p is one-hot: r < 1 always holds for the argmax, never otherwise
                    else:
                        px = tl.exp(tl.load(row + x * stride_lv).to(tl.float32) / t - m) / s
                        px = tl.where(_kept(px, x, tau, idx_cut), px, 0.0) / norm
                        px = tl.where(tl.sum((removed == x).to(tl.int32), 0) > 0, 0.0, px)
                        r = _to_uniform(_mix(_mix(h_b, c), 0))
                        accept = r < px / z_left
                    if accept:
                        moved = 1
                        child = c
                    else:
                        removed = tl.where(slot == n_removed, x, removed)
                        n_removed += 1
                        z_left = z_left - px
        if moved != 0:
            n_acc += 1
            path = tl.where(slot == n_acc, child, path)
            node = child
        else:
            if greedy:
                nxt = arg
            else:
                if SAMPLE:
                    h_node = _mix(h_b, tl.full([], _SAMPLE_NODE, tl.int32))
                else:
                    h_node = _mix(h_b, node)
                nxt = _race(row, stride_lv, V, t, m, s, tau, idx_cut, norm, z_left, removed, h_node, BLOCK_V)
            done = 1
    if not SAMPLE:
        tl.store(PATH + b * T + slot, path.to(tl.int64), mask=slot < T)
        tl.store(ACC_LEN + b, n_acc.to(tl.int64))
    tl.store(NEXT + b, nxt.to(tl.int64))


def _check_sampling(B, V, temperature, top_p, top_k, seed, offset, device) -> None:
    for name, x in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)):
        if x.shape != (B,):
            raise ValueError(f"{name} must be [B={B}]; got {tuple(x.shape)}")
    if temperature.dtype.is_complex or not (temperature.dtype.is_floating_point and top_p.dtype.is_floating_point):
        raise ValueError(f"temperature and top_p must be float; got {temperature.dtype}, {top_p.dtype}")
    if top_k.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"top_k must be int32/int64; got {top_k.dtype}")
    for name, x in (("seed", seed), ("offset", offset)):
        if x.numel() != 1 or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a one-element int64 tensor; got {x.dtype} {tuple(x.shape)}")
    tensors = (temperature, top_p, top_k, seed, offset)
    if any(x.device != device for x in tensors):
        raise ValueError(f"temperature, top_p, top_k, seed, offset must be on {device}")


def _block_v(V: int) -> int:
    return min(2048, max(128, triton.next_power_of_2(V)))


def _accept_fake(target_logits, tree_tokens, parents, temperature, top_p, top_k, seed, offset):
    B, T, _ = target_logits.shape
    new = target_logits.new_empty
    return new((B, T), dtype=torch.int64), new((B,), dtype=torch.int64), new((B,), dtype=torch.int64)


@register_op("accept_tree", fake=_accept_fake)
def _accept_tree_op(
    target_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    parents: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if target_logits.dim() != 3 or not target_logits.dtype.is_floating_point:
        raise ValueError(f"target_logits must be float [B, T, V]; got {target_logits.dtype} "
                         f"{tuple(target_logits.shape)}")
    B, T, V = target_logits.shape
    for name, x in (("tree_tokens", tree_tokens), ("parents", parents)):
        if x.shape != (B, T) or x.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int64 [B={B}, T={T}]; got {x.dtype} {tuple(x.shape)}")
        if x.device != target_logits.device:
            raise ValueError(f"{name} must be on {target_logits.device}")
    _check_sampling(B, V, temperature, top_p, top_k, seed, offset, target_logits.device)
    dev = target_logits.device
    path = torch.empty((B, T), device=dev, dtype=torch.int64)
    acc_len = torch.empty((B,), device=dev, dtype=torch.int64)
    nxt = torch.empty((B,), device=dev, dtype=torch.int64)
    launch(_accept_kernel, (B,))(
        target_logits, tree_tokens, parents, temperature, top_p, top_k, seed, offset, path, acc_len, nxt,
        T, V, *target_logits.stride(), *tree_tokens.stride(), *parents.stride(),
        SAMPLE=False, T_PAD=triton.next_power_of_2(T), BLOCK_V=_block_v(V), num_warps=4,
    )
    return path, acc_len, nxt


def _sample_fake(logits, temperature, top_p, top_k, seed, offset):
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@register_op("sample_tokens", fake=_sample_fake)
def _sample_tokens_op(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be float [B, V]; got {logits.dtype} {tuple(logits.shape)}")
    B, V = logits.shape
    _check_sampling(B, V, temperature, top_p, top_k, seed, offset, logits.device)
    nxt = torch.empty((B,), device=logits.device, dtype=torch.int64)
    launch(_accept_kernel, (B,))(
        logits, nxt, nxt, temperature, top_p, top_k, seed, offset, nxt, nxt, nxt,
        1, V, logits.stride(0), 0, logits.stride(1), 0, 0, 0, 0,
        SAMPLE=True, T_PAD=2, BLOCK_V=_block_v(V), num_warps=4,
    )
    return nxt


def accept_tree(
    target_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    parents: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> reference.AcceptOutput:
    """Verify a draft tree against the target; the reference's draws, token for token.

    Args:
        target_logits: ``[B, T, V]`` float (any float dtype, math in float32), any strides.
        tree_tokens, parents: ``[B, T]`` int64 (node 0 is the root; ``0 <= parents[:, i] < i``; not checked).
        temperature, top_p: ``[B]`` float; top_k: ``[B]`` int; seed, offset: one-element int64 tensors.

    Returns:
        :class:`~eagle_kernels.reference.AcceptOutput`: path ``[B, T]`` (-1 padded), accept_len ``[B]``,
        next_token ``[B]``, all int64.
    """
    return reference.AcceptOutput(*_accept_tree_op(target_logits, tree_tokens, parents, temperature, top_p, top_k,
                                                   seed, offset))


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]``, the reference's draw (stream node ``2**31 - 1``); int64 ``[B]``."""
    return _sample_tokens_op(logits, temperature, top_p, top_k, seed, offset)
