"""Tree acceptance and token sampling (Triton), draw-for-draw identical to the reference.

Contracts: :func:`eagle_kernels.reference.accept_tree` and :func:`eagle_kernels.reference.sample_tokens` (the
filters are transformers' warpers: temperature, then top-k keeping ties, then top-p over the renormalised top-k
mass; ``temperature < reference.GREEDY_TEMPERATURE`` is greedy).

Two kernels, so that the vocabulary-wide work runs on every tree row at once:

1. ``_summary_kernel``, grid ``(T, B)``: one program per tree row computes the row's processed distribution as a
   handful of numbers instead of a ``[V]`` buffer. With ``y = x / t`` and ``p = exp(y - m) / s`` (torch.softmax's
   arithmetic), the final probability of token ``v`` is::

       q(v)     = p(v) / sk           if y(v) >= thr (the top-k cut), else 0
       kept(v)  = q(v) > tau  or  (q(v) == tau and v <= idx_cut)          (the top-p cut)
       P(v)     = q(v) / norm         if kept(v), else 0

   stored as ``m, s, thr, sk, tau, norm`` (float32) and ``argmax, idx_cut`` (int32). No sort: the cuts are found by
   a k-ary search over the order-preserving integer image of float32 values. Each pass over the row evaluates
   ``NPROBE`` probes at once (counts for top-k, masses for top-p), shrinking the interval ``NPROBE + 1``-fold, so a
   32-bit key space takes at most 8 passes with ``NPROBE = 16``; the top-k search stops early as soon as a probe
   has exactly ``k`` values at or above it. Ties straddling the top-p cut are resolved lowest index first by a
   bisection over the index (only on rows where such ties exist). Worst case per row: 2 (max, sum) + 8 (top-k)
   + 1 (sk) + 8 (top-p) + 1 (ties) + 1 (norm) passes; greedy rows take one argmax pass.
2. ``_walk_kernel``, one program per sequence, walks the tree exactly as the reference does, reading only the
   draft tokens' logits: at node ``u`` it tries the children in node-index order (found by scanning ``parents``),
   accepts child ``c`` with token ``x`` iff ``hash_uniform(seed, offset, b, c, 0) < P_now(x)``, and on rejection
   removes ``x``: ``z = 1 - removed mass`` and the list of removed tokens, so ``P_now(v) = P(v) / z`` off the
   list and 0 on it. Only at the node where the walk stops does it read the whole row, once, for the exponential
   race ``argmax_v log P_now(v) - log(-log hash_uniform(seed, offset, b, u, 1, v))``. Greedy rows follow the
   stored argmax with no random numbers.

GPU speed is unmeasured (no GPU in 2026-11; ``benchmarks/bench_acceptance.py`` times it). Both kernels compile for
sm_90 without spills (summary: 160 registers at 4 warps). Expected limit: one program per row reads the row ~20 times,
so at V = 128256 the per-SM L2 bandwidth, not the grid, bounds it; the next step is compacting the few top-k
candidates after the first search pass (or splitting a row over several programs).

The random stream is the reference's ``fmix32`` chain on ``uint32`` (both 32-bit halves of the int64 seed are
mixed), so the same ``(seed, offset)`` gives the same tokens on every backend. Seed, offset and the sampling
parameters stay in device tensors and the summaries in a buffer allocated per call: no host synchronisation,
CUDA-graph safe. ``top_p >= 1`` disables top-p (the reference's float cumsum can round tail tokens of
probability ~1e-8 out at ``top_p == 1``; both keep them). Tokens equal the reference's except where two float32
sums taken in a different order land on opposite sides of a comparison (a cut or ``r < P(x)``), which random
inputs do not hit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._registry import launch, register_op

__all__ = ["accept_tree", "sample_tokens"]

_SAMPLE_NODE = tl.constexpr(2**31 - 1)  # the node counter of sample_tokens' stream (reference.sample_tokens)
_GREEDY_T = tl.constexpr(reference.GREEDY_TEMPERATURE)
_KEY_NEG_INF = tl.constexpr(-2139095041)  # _key(-inf): 0xFF800000 ^ 0x7FFFFFFF as int32
_NF, _NI = 6, 2  # summary fields: (m, s, thr, sk, tau, norm) float32 and (argmax, idx_cut) int32


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
def _seed_hash(SEED, OFFSET):
    """The first three steps of reference.hash_uniform: seed low half, seed high half, offset."""
    seed = tl.load(SEED).to(tl.int64)
    h = _fmix32((seed & 0xFFFFFFFF).to(tl.uint32))
    h = _fmix32(h ^ (((seed >> 32) & 0xFFFFFFFF).to(tl.uint32) + 0x9E3779B9))
    return _fmix32(h ^ (tl.load(OFFSET).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32))


@triton.jit
def _to_uniform(h):
    return ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _key(x):
    """Order-preserving int32 image of float32 (negative floats have their magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _unkey(k):
    """Inverse of _key for int64 keys in the int32 range."""
    k32 = k.to(tl.int32)
    return tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _kept(q, offs, tau, idx_cut):
    return (q > tau) | ((q == tau) & (offs <= idx_cut))


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
def _topk_threshold(row, stride_v, V, t, m, kk, BLOCK_V: tl.constexpr, NPROBE: tl.constexpr):
    """The kk-th largest y: the largest key K with count(y >= unkey(K)) >= kk (k-ary search, early exit)."""
    lo = tl.full([], _KEY_NEG_INF, tl.int64)  # count(y >= -inf) = V >= kk
    hi = _key(m).to(tl.int64) + 1  # nothing lies above the max
    done = tl.full([], 0, tl.int32)
    while (hi - lo > 1) & (done == 0):
        keys = lo + 1 + ((hi - lo - 1) * (tl.arange(0, NPROBE).to(tl.int64) + 1)) // (NPROBE + 1)  # in (lo, hi)
        k32 = keys.to(tl.int32)
        probe = tl.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)  # _unkey
        acc = tl.zeros([BLOCK_V, NPROBE], tl.int32)  # reduced once after the loop, not per block
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            y = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32) / t
            acc += ((y[:, None] >= probe[None, :]) & (offs < V)[:, None]).to(tl.int32)
        cnt = tl.sum(acc, 0)
        ok = cnt >= kk  # a prefix of the probes (count falls as the key rises)
        exact = cnt == kk
        if tl.sum(exact.to(tl.int32), 0) > 0:  # exactly kk values at or above this probe: that is the cut
            lo = tl.max(tl.where(exact, keys, lo), 0)
            done = 1
        else:
            lo = tl.max(tl.where(ok, keys, lo), 0)
            hi = tl.min(tl.where(ok, hi, keys), 0)
    return _unkey(lo)


@triton.jit
def _topp_cut(row, stride_v, V, t, m, s, thr, sk, top_p, BLOCK_V: tl.constexpr, NPROBE: tl.constexpr):
    """The top-p cut (tau, idx_cut) over q: keep q > tau, and the tied q == tau with index <= idx_cut."""
    # smallest key (bit pattern of a non-negative float) whose strictly-greater mass is below top_p
    lo = tl.full([], -1, tl.int64)
    hi = ((1.0 / s) / sk).to(tl.int32, bitcast=True).to(tl.int64)  # the largest q: exp(0) / s / sk
    while hi - lo > 1:
        keys = lo + 1 + ((hi - lo - 1) * (tl.arange(0, NPROBE).to(tl.int64) + 1)) // (NPROBE + 1)  # in (lo, hi)
        probe = keys.to(tl.int32).to(tl.float32, bitcast=True)
        acc = tl.zeros([BLOCK_V, NPROBE], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            y = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32) / t
            q = tl.where((offs < V) & (y >= thr), tl.exp(y - m) / s / sk, 0.0)  # _q, inlined
            acc += tl.where(q[:, None] > probe[None, :], q[:, None], 0.0)
        mass = tl.sum(acc, 0)
        ok = mass < top_p  # a suffix of the probes
        lo = tl.max(tl.where(ok, lo, keys), 0)
        hi = tl.min(tl.where(ok, keys, hi), 0)
    tau = hi.to(tl.int32).to(tl.float32, bitcast=True)
    acc_m = tl.zeros([BLOCK_V], tl.float32)
    acc_c = tl.zeros([BLOCK_V], tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        y = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32) / t
        q = tl.where((offs < V) & (y >= thr), tl.exp(y - m) / s / sk, 0.0)  # _q, inlined
        acc_m += tl.where(q > tau, q, 0.0)
        acc_c += ((q == tau) & (offs < V)).to(tl.int32)
    mass_gt = tl.sum(acc_m, 0)
    c_eq = tl.sum(acc_c, 0)
    # tied tokens are taken lowest index first while the mass before them is below top_p
    need = c_eq
    if tau > 0.0:
        need = tl.minimum(tl.maximum(tl.ceil((top_p - mass_gt) / tau).to(tl.int32), 1), c_eq)
    idx_cut = tl.full([], 0, tl.int32) + V
    if need < c_eq:  # ties straddle the cut: the need-th tied index, by bisection over the index
        lo_i = tl.full([], -1, tl.int32)
        hi_i = tl.full([], 0, tl.int32) + V - 1
        while hi_i - lo_i > 1:
            mid = (lo_i + hi_i) // 2
            acc_c = tl.zeros([BLOCK_V], tl.int32)
            for start in range(0, V, BLOCK_V):
                offs = start + tl.arange(0, BLOCK_V)
                y = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32) / t
                q = tl.where((offs < V) & (y >= thr), tl.exp(y - m) / s / sk, 0.0)  # _q, inlined
                acc_c += ((q == tau) & (offs <= mid) & (offs < V)).to(tl.int32)
            cnt = tl.sum(acc_c, 0)
            if cnt >= need:
                hi_i = mid
            else:
                lo_i = mid
        idx_cut = hi_i
    return tau, idx_cut


@triton.jit
def _summary_kernel(
    LOGITS, TEMP, TOP_P, TOP_K, SUMF, SUMI,
    T, V, stride_lb, stride_lt, stride_lv,
    BLOCK_V: tl.constexpr, NPROBE: tl.constexpr,
):
    i = tl.program_id(0)
    b = tl.program_id(1)
    row = LOGITS + b.to(tl.int64) * stride_lb + i.to(tl.int64) * stride_lt
    temp = tl.load(TEMP + b).to(tl.float32)
    top_p = tl.load(TOP_P + b).to(tl.float32)
    top_k = tl.load(TOP_K + b).to(tl.int32)
    m = tl.full([], 0.0, tl.float32)
    s = tl.full([], 1.0, tl.float32)
    thr = tl.full([], float("-inf"), tl.float32)
    sk = tl.full([], 1.0, tl.float32)
    tau = tl.full([], -1.0, tl.float32)
    norm = tl.full([], 1.0, tl.float32)
    arg = tl.full([], 0, tl.int32)
    idx_cut = tl.full([], 0, tl.int32) + V
    if temp < _GREEDY_T:
        arg = _row_argmax(row, stride_lv, V, BLOCK_V)
    else:
        t = temp
        # the passes are written out here: in the interpreter each nested @triton.jit call costs milliseconds
        # and each pass accumulates elementwise, reducing across the block once after the loop
        acc = tl.full([BLOCK_V], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            acc = tl.maximum(acc, tl.load(row + offs * stride_lv, mask=offs < V, other=float("-inf"))
                             .to(tl.float32) / t)
        m = tl.max(acc, 0)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            y = tl.load(row + offs * stride_lv, mask=offs < V, other=float("-inf")).to(tl.float32) / t
            acc += tl.where(offs < V, tl.exp(y - m), 0.0)
        s = tl.sum(acc, 0)
        if (top_k > 0) & (top_k < V):
            thr = _topk_threshold(row, stride_lv, V, t, m, top_k, BLOCK_V, NPROBE)
        acc = tl.zeros([BLOCK_V], tl.float32)  # the reference renormalises after top-k even when it keeps all
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            y = tl.load(row + offs * stride_lv, mask=offs < V, other=float("-inf")).to(tl.float32) / t
            acc += tl.where((offs < V) & (y >= thr), tl.exp(y - m) / s, 0.0)
        sk = tl.sum(acc, 0)
        if top_p < 1.0:
            tau, idx_cut = _topp_cut(row, stride_lv, V, t, m, s, thr, sk, top_p, BLOCK_V, NPROBE)
        acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            y = tl.load(row + offs * stride_lv, mask=offs < V, other=float("-inf")).to(tl.float32) / t
            q = tl.where((offs < V) & (y >= thr), tl.exp(y - m) / s / sk, 0.0)
            acc += tl.where((q > tau) | ((q == tau) & (offs <= idx_cut)), q, 0.0)
        norm = tl.sum(acc, 0)
    f = tl.arange(0, 8)  # one vector store per buffer: the fields in order (m, s, thr, sk, tau, norm)
    vals = tl.where(f == 0, m, tl.where(f == 1, s, tl.where(f == 2, thr, tl.where(f == 3, sk,
                    tl.where(f == 4, tau, norm)))))
    r = b * T + i
    tl.store(SUMF + r * 6 + f, vals, mask=f < 6)
    tl.store(SUMI + r * 2 + f, tl.where(f == 0, arg, idx_cut), mask=f < 2)


@triton.jit
def _race(row, stride_v, V, t, m, s, thr, sk, tau, idx_cut, norm, z_left, removed, h_node, BLOCK_V: tl.constexpr):
    """argmax_v log(P_now(v)) - log(-log u_v), u_v = uniform(h_node, 1, v); removed tokens and P == 0 excluded."""
    h_flag = _mix(h_node, 1)
    best = tl.full([], float("-inf"), tl.float32)
    best_i = tl.full([], 0, tl.int32)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        y = tl.load(row + offs * stride_v, mask=offs < V, other=float("-inf")).to(tl.float32) / t
        q = tl.where((offs < V) & (y >= thr), tl.exp(y - m) / s / sk, 0.0)
        p = tl.where(_kept(q, offs, tau, idx_cut), q, 0.0) / norm / z_left
        u = _to_uniform(_mix(h_flag, offs))
        score = tl.where(p > 0, tl.log(tl.where(p > 0, p, 1.0)) - tl.log(-tl.log(u)), float("-inf"))
        bmax = tl.max(score, 0)
        bi = tl.min(tl.where(score == bmax, offs, 2147483647), 0)
        is_removed = (tl.sum((removed == bi).to(tl.int32), 0) > 0) & (bmax > float("-inf"))
        while is_removed:  # rejected siblings are out of P; they rarely win, so mask them lazily
            score = tl.where(offs == bi, float("-inf"), score)
            bmax = tl.max(score, 0)
            bi = tl.min(tl.where(score == bmax, offs, 2147483647), 0)
            is_removed = (tl.sum((removed == bi).to(tl.int32), 0) > 0) & (bmax > float("-inf"))
        take = bmax > best
        best_i = tl.where(take, bi, best_i)
        best = tl.where(take, bmax, best)
    return best_i


@triton.jit
def _walk_kernel(
    LOGITS, TOKENS, PARENTS, TEMP, SEED, OFFSET, SUMF, SUMI,
    PATH, ACC_LEN, NEXT,
    T, V,
    stride_lb, stride_lt, stride_lv, stride_tb, stride_tt, stride_pb, stride_pt,
    SAMPLE: tl.constexpr, T_PAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0)
    temp = tl.load(TEMP + b).to(tl.float32)
    greedy = temp < _GREEDY_T
    t = tl.where(greedy, 1.0, temp)
    h_b = _mix(_seed_hash(SEED, OFFSET), b)  # hash_uniform(seed, offset, b, ...): shared by every draw of the row

    slot = tl.arange(0, T_PAD)
    path = tl.where(slot == 0, 0, -1)
    node = tl.full([], 0, tl.int32)
    n_acc = tl.full([], 0, tl.int32)
    nxt = tl.full([], 0, tl.int32)
    done = tl.full([], 0, tl.int32)
    while done == 0:
        row = LOGITS + b.to(tl.int64) * stride_lb + node.to(tl.int64) * stride_lt
        r = b * T + node
        m = tl.load(SUMF + r * 6 + 0)
        s = tl.load(SUMF + r * 6 + 1)
        thr = tl.load(SUMF + r * 6 + 2)
        sk = tl.load(SUMF + r * 6 + 3)
        tau = tl.load(SUMF + r * 6 + 4)
        norm = tl.load(SUMF + r * 6 + 5)
        arg = tl.load(SUMI + r * 2 + 0)
        idx_cut = tl.load(SUMI + r * 2 + 1)
        removed = tl.full([T_PAD], -1, tl.int32)
        n_removed = tl.full([], 0, tl.int32)
        z_left = tl.full([], 1.0, tl.float32)  # 1 - mass of the rejected tokens: P_now = P / z_left off the list
        moved = tl.full([], 0, tl.int32)
        child = tl.full([], 0, tl.int32)
        if not SAMPLE:
            for c in range(node + 1, T):
                par = tl.load(PARENTS + b * stride_pb + c * stride_pt).to(tl.int32)
                if (par == node) & (moved == 0):
                    x = tl.load(TOKENS + b * stride_tb + c * stride_tt).to(tl.int32)
                    px = tl.full([], 0.0, tl.float32)
                    if greedy:
                        accept = x == arg  # P is one-hot: r < 1 always holds for the argmax, never otherwise
                    else:
                        y = tl.load(row + x * stride_lv).to(tl.float32) / t
                        qx = tl.where(y >= thr, tl.exp(y - m) / s / sk, 0.0)
                        px = tl.where(_kept(qx, x, tau, idx_cut), qx, 0.0) / norm
                        px = tl.where(tl.sum((removed == x).to(tl.int32), 0) > 0, 0.0, px)
                        rnd = _to_uniform(_mix(_mix(h_b, c), 0))
                        accept = rnd < px / z_left
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
                nxt = _race(row, stride_lv, V, t, m, s, thr, sk, tau, idx_cut, norm, z_left, removed, h_node,
                            BLOCK_V)
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


# Probes per k-ary search pass: 16 probes shrink a 2**32 key range to one key in 8 passes (17**8 > 2**32).
# The [BLOCK_V, NPROBE] compare block is why the summary kernel reads the row in 512-wide blocks.
_NPROBE = 16


def _summary_launch(logits: torch.Tensor, temperature, top_p, top_k, sumf, sumi) -> tuple:
    """``(kernel, grid, args, kwargs)`` of _summary_kernel over every row of ``logits [B, T, V]`` into ``sumf``
    (float32 ``[B, T, 6]``) and ``sumi`` (int32 ``[B, T, 2]``)."""
    B, T, V = logits.shape
    return (_summary_kernel, (T, B), (logits, temperature, top_p, top_k, sumf, sumi, T, V, *logits.stride()),
            dict(BLOCK_V=min(512, _block_v(V)), NPROBE=_NPROBE, num_warps=4))


def _summary_buffers(B: int, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty((B, T, _NF), device=device, dtype=torch.float32),
            torch.empty((B, T, _NI), device=device, dtype=torch.int32))


def _summaries(logits: torch.Tensor, temperature, top_p, top_k) -> tuple[torch.Tensor, torch.Tensor]:
    """Run _summary_kernel over every row of ``logits [B, T, V]``: float32 [B, T, 6] and int32 [B, T, 2]."""
    sumf, sumi = _summary_buffers(logits.shape[0], logits.shape[1], logits.device)
    kernel, grid, args, kwargs = _summary_launch(logits, temperature, top_p, top_k, sumf, sumi)
    launch(kernel, grid)(*args, **kwargs)
    return sumf, sumi


def _accept_launches(target_logits, tree_tokens, parents, temperature, top_p, top_k, seed, offset, sumf, sumi,
                     path, acc_len, nxt) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one accept_tree call (summaries, then the walk): the launcher runs
    them, the sm_90 check compiles them."""
    B, T, V = target_logits.shape
    return [_summary_launch(target_logits, temperature, top_p, top_k, sumf, sumi),
            (_walk_kernel, (B,), (
                target_logits, tree_tokens, parents, temperature, seed, offset, sumf, sumi, path, acc_len, nxt,
                T, V, *target_logits.stride(), *tree_tokens.stride(), *parents.stride(),
            ), dict(SAMPLE=False, T_PAD=triton.next_power_of_2(T), BLOCK_V=_block_v(V), num_warps=4))]


def _sample_launches(logits, temperature, top_p, top_k, seed, offset, sumf, sumi, nxt) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one sample_tokens call on ``logits [B, V]`` (summaries of the rows
    as ``[B, 1, V]``, then the race): the launcher runs them, the sm_90 check compiles them."""
    B, V = logits.shape
    return [_summary_launch(logits.unsqueeze(1), temperature, top_p, top_k, sumf, sumi),
            (_walk_kernel, (B,), (
                logits, nxt, nxt, temperature, seed, offset, sumf, sumi, nxt, nxt, nxt,
                1, V, logits.stride(0), 0, logits.stride(1), 0, 0, 0, 0,
            ), dict(SAMPLE=True, T_PAD=2, BLOCK_V=_block_v(V), num_warps=4))]


def compile_cases(quick: bool):
    """The sm_90 compile check's launches (``scripts/compile_sm90.py``): Llama-2-7B (V 32000) and Llama-3-8B
    (V 128256) target logits, batch 1: a decode step's sample_tokens (1 row) and a 61-node tree's accept_tree,
    with the runtime's buffers (int64 tokens/parents, float32 temperature/top_p, int64 top_k, 0-dim int64
    seed/offset); built by :func:`_accept_launches` and :func:`_sample_launches` on meta tensors."""
    B = 1
    f, i, one = (torch.empty((B,), dtype=torch.float32, device="meta"),
                 torch.empty((B,), dtype=torch.int64, device="meta"), torch.empty((), dtype=torch.int64, device="meta"))
    for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]:
        for model, V in (("L2-7B", 32000), ("L3-8B", 128256)):
            logits = torch.empty((B, V), dtype=dtype, device="meta")
            sumf, sumi = _summary_buffers(B, 1, "meta")
            for kernel, grid, args, kwargs in _sample_launches(logits, f, f, i, one, one, sumf, sumi, i):
                yield f"sample {str(dtype)[6:]} {model} decode1 B{B}", kernel, grid, args, kwargs
            T = 61
            logits = torch.empty((B, T, V), dtype=dtype, device="meta")
            tok = torch.empty((B, T), dtype=torch.int64, device="meta")
            sumf, sumi = _summary_buffers(B, T, "meta")
            for kernel, grid, args, kwargs in _accept_launches(logits, tok, tok, f, f, i, one, one, sumf, sumi, tok, i,
                                                               i):
                yield f"tree {str(dtype)[6:]} {model} verify{T} B{B}", kernel, grid, args, kwargs


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
    sumf, sumi = _summary_buffers(B, T, dev)
    for kernel, grid, args, kwargs in _accept_launches(target_logits, tree_tokens, parents, temperature, top_p, top_k,
                                                       seed, offset, sumf, sumi, path, acc_len, nxt):
        launch(kernel, grid)(*args, **kwargs)
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
    sumf, sumi = _summary_buffers(B, 1, logits.device)
    for kernel, grid, args, kwargs in _sample_launches(logits, temperature, top_p, top_k, seed, offset, sumf, sumi,
                                                       nxt):
        launch(kernel, grid)(*args, **kwargs)
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
