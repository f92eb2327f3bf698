"""Fast CPU implementations of the ops, token-identical to :mod:`eagle_kernels.reference`.

The references are written to be read; these are written for a CPU where every op is overhead-bound (about
1-15 us per aten call at the sizes we run). Each function keeps its reference's contract (shapes, dtypes, tie
rules) and returns the same tokens and paths; ``tests/test_cpu_fast.py`` checks that on every tree and batch
layout, tied inputs included. What changes:

* :func:`accept_tree` greedy (every ``temperature < GREEDY_TEMPERATURE``): the target argmax per node and a vectorised walk;
  no softmax, no sort, no random numbers, no Python loop over nodes. Sampled: the processed distribution comes
  from :func:`process_logits` and the random numbers from :func:`reference.hash_uniform` (so both follow
  the reference whatever it becomes), siblings are tried rank by rank for all nodes at once, and the walk is
  vectorised (pointer jumping over the parent links).
* :func:`topk_expand`: ``torch.topk`` where its answer is provably the reference's (the top ``k + 1`` values
  are distinct, so the set and its order are unique), the stable sort otherwise.
* :func:`tree_attention`: ``scaled_dot_product_attention`` over only the slots that exist (prefix + tree),
  GQA without copying K/V per query head; no mask at all for plain decoding.
* :func:`sample_tokens`: greedy rows are an argmax (``torch.argmax`` returns the first maximal index, the
  reference's tie rule); sampled batches use :func:`process_logits`, which skips the reference's sorts when
  top-p is off (bit-identical probabilities).
* :func:`kv_compact`: one gather and one scatter for the whole batch, instead of a loop over sequences.

Host reads (``int(...)`` of a CPU tensor) are free on CPU and used for shapes; this backend is for CPU tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch
import torch.nn.functional as F

from . import reference
from .reference import AcceptOutput, TopkExpandOutput

__all__ = ["tree_attention", "topk_expand", "accept_tree", "sample_tokens", "kv_compact", "topk_low_index",
           "process_logits", "rms_norm", "add_rms_norm", "rope_kv_write"]


# --------------------------------------------------------------------------------------------------------------
# Top-k with the reference's tie rule
# --------------------------------------------------------------------------------------------------------------
def topk_low_index(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` along the last dim, descending, ties towards the lower index (``reference._topk_stable``).

    ``torch.topk`` does not promise an order among equal values. When the ``k + 1`` largest values of every
    row are pairwise distinct, the top-``k`` set and its descending order are unique, so any correct top-k
    returns the reference's answer; otherwise (ties, or ``k == V``) the stable sort decides.
    """
    V = x.shape[-1]
    if k >= V or x.numel() == 0:
        return reference._topk_stable(x, k)
    vals, idx = torch.topk(x, k + 1, dim=-1)
    # strictly descending everywhere: no tie and no NaN (a NaN compares false), so the answer is unique
    if not bool((vals[..., 1:] < vals[..., :-1]).all()):
        return reference._topk_stable(x, k)
    return vals[..., :k], idx[..., :k]


def topk_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    k: int,
    out_k: int | None = None,
    token_map: torch.Tensor | None = None,
) -> TopkExpandOutput:
    """:func:`reference.topk_expand` with ``torch.topk`` (see :func:`topk_low_index`); same arithmetic."""
    return reference._topk_expand_with(topk_low_index, logits, parent_scores, k, out_k, token_map)


# --------------------------------------------------------------------------------------------------------------
# Decoder-layer pieces: the references' arithmetic in float32 with fewer dispatches, and per-forward memos
# --------------------------------------------------------------------------------------------------------------
class _Memo:
    """One entry remembered across the layers of a forward, keyed on the identity of its argument tensors (the
    memo holds them, so their ids cannot be reused while it does) and, for tensors that track one, their in-place
    version. A memo lives for one forward (:func:`bind_forward`): inference-mode tensors track no version, and a
    caller may refill the same tensors between forwards (graph buffers, the decode state)."""

    __slots__ = ("key", "versions", "value")

    def __init__(self):
        self.key, self.versions, self.value = (), (), None

    @staticmethod
    def _versions(key) -> tuple:
        return tuple(t._version for t in key if isinstance(t, torch.Tensor) and not t.is_inference())

    def get(self, *key):
        if len(key) == len(self.key) and all(a is b for a, b in zip(key, self.key)) \
                and self.versions == self._versions(key):
            return self.value
        return None

    def put(self, value, *key):
        self.key, self.value, self.versions = key, value, self._versions(key)
        return value


def bind_forward(ops):
    """``ops`` with ``rope_kv_write`` and ``tree_attention`` sharing fresh memos: the table of one forward
    (``Ops.for_forward``). The memos save a gather per layer (rotary) and a mask build per layer (attention)."""
    rope_memo, mask_memo = _Memo(), _Memo()
    return dataclasses.replace(ops, bind=None,
                               rope_kv_write=functools.partial(rope_kv_write, memo=rope_memo),
                               tree_attention=functools.partial(tree_attention, memo=mask_memo))


def moe_experts_by_expert(x, top_w, top_i, w1, w3, w2):
    """:func:`reference.moe_experts` computed expert by expert in ``x.dtype``, the expression of HF's
    ``MixtralSparseMoeBlock`` (same bits as transformers; the reference gathers ``[N, I, H]`` weights per token)."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(top_i == e)
        if tok.numel() == 0:
            continue
        h = x[tok]
        y = (F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T
        out.index_add_(0, tok, y * top_w[tok, slot, None])
    return out


def rms_norm(x, weight, eps):
    """:func:`reference.rms_norm`; in float32 the same operations without the no-op casts (same bits)."""
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return reference.rms_norm(x, weight, eps)
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def add_rms_norm(x, residual, weight, eps):
    """:func:`reference.add_rms_norm` (same bits in float32, see :func:`rms_norm`)."""
    r = x + residual
    return rms_norm(r, weight, eps), r


def rope_kv_write(qkv, cos, sin, positions, k_cache, v_cache, write_idx, num_heads, num_kv_heads, memo=None):
    """:func:`reference.rope_kv_write` (same bits): the position's cos/sin gathered once per forward (memo) and
    q and k rotated together (they are adjacent in the merged projection)."""
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    memo = memo if memo is not None else _Memo()
    tables = memo.get(positions, cos, sin, qkv.dtype)
    if tables is None:
        tables = memo.put((cos[positions].to(qkv.dtype).unsqueeze(2), sin[positions].to(qkv.dtype).unsqueeze(2)),
                          positions, cos, sin, qkv.dtype)
    c, s = tables
    x = qkv.view(B, T, -1, D)
    nqk = num_heads + num_kv_heads
    qk = x[:, :, :nqk]
    h = D // 2
    qk = qk * c + torch.cat([-qk[..., h:], qk[..., :h]], dim=-1) * s
    idx = write_idx[:, None, :, None].expand(B, num_kv_heads, T, D)
    k_cache.scatter_(2, idx, qk[:, :, num_heads:].transpose(1, 2).to(k_cache.dtype))
    v_cache.scatter_(2, idx, x[:, :, nqk:].transpose(1, 2).to(v_cache.dtype))
    return qk[:, :, :num_heads]


# --------------------------------------------------------------------------------------------------------------
# Tree attention
# --------------------------------------------------------------------------------------------------------------
def _attention_plan(q, prefix_len, tree_mask, memo):
    """``(slots, mask or None, rows that see nothing or None)`` for one forward, shared by its layers (memo)."""
    B, T = q.shape[0], q.shape[1]
    M = tree_mask.shape[-1]
    plan = memo.get(prefix_len, tree_mask)
    if plan is not None:
        return plan
    lo, hi = int(prefix_len.min()), int(prefix_len.max())
    n = hi + M
    if lo == hi and T == 1 and M == 1 and bool(tree_mask.all()):
        mask = None
    elif lo == hi:
        mask = torch.cat([tree_mask.new_ones(B, T, hi), tree_mask], dim=-1)[:, None]
    else:
        rel = torch.arange(n, device=q.device) - prefix_len.view(B, 1)
        in_tree = tree_mask.gather(2, rel.clamp(0, M - 1).view(B, 1, n).expand(B, T, n))
        mask = ((rel < 0).view(B, 1, n) | ((rel < M).view(B, 1, n) & in_tree))[:, None]
    sees = None
    if lo == 0:  # a query with an empty prefix and an empty tree row sees nothing: zeros (SDPA gives NaN)
        sees = (tree_mask.any(-1) | (prefix_len > 0).view(B, 1)).view(B, 1, T, 1)
    if mask is not None:  # additive form once per forward (SDPA converts a boolean mask the same way per call)
        mask = torch.zeros(mask.shape, device=q.device).masked_fill_(~mask, float("-inf"))  # float32: the math
    return memo.put((n, mask, sees), prefix_len, tree_mask)


def tree_attention(q, k_cache, v_cache, prefix_len, tree_mask, sm_scale=None, memo=None):
    """:func:`reference.tree_attention` over the ``max(prefix_len) + M`` existing slots with SDPA.

    Plain decoding (``T == M == 1``, every prefix equal) runs without a mask. Queries that see no slot get
    zeros, as in the reference. Math in float32 for half inputs (the reference's precision).
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    n, mask, sees = _attention_plan(q, prefix_len, tree_mask, memo if memo is not None else _Memo())
    k, v = k_cache[:, :, :n], v_cache[:, :, :n]
    qh = q.transpose(1, 2)
    if q.dtype != torch.float32:
        qh, k, v = qh.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=Hq != Hkv)
    if sees is not None:
        out = torch.where(sees, out, torch.zeros((), dtype=out.dtype))
    return out.transpose(1, 2).to(q.dtype)


# --------------------------------------------------------------------------------------------------------------
# Sampling and acceptance
# --------------------------------------------------------------------------------------------------------------
def _all_greedy(temperature: torch.Tensor) -> bool:
    return bool((temperature < reference.GREEDY_TEMPERATURE).all())


def process_logits(logits, temperature, top_p, top_k):
    """:func:`reference.process_logits`, bit for bit, without its sorts where they cannot change the result.

    With no greedy row, the k-th largest value comes from ``torch.topk`` (a value, so its tie order is moot) and,
    when no row uses top-p, the descending sort, cumulative sum and scatter back are skipped: they keep every token
    and return the same numbers in the same places, so only the reference's two renormalisations remain (each a
    division by a sum within an ulp of 1, kept so that the result is identical). Any other batch goes to the
    reference.
    """
    B, V = logits.shape[0], logits.shape[-1]
    if bool((temperature < reference.GREEDY_TEMPERATURE).any()) or not bool((top_p >= 1).all()):
        return reference.process_logits(logits, temperature, top_p, top_k)
    shape = (B,) + (1,) * (logits.dim() - 1)
    y = logits.float() / temperature.float().reshape(shape)
    probs = torch.softmax(y, dim=-1)
    kk = top_k.to(torch.int64)
    use_k = (kk > 0) & (kk <= V)
    if bool(use_k.any()):
        k_max = int(torch.where(use_k, kk, 1).max())
        kk = torch.where(use_k, kk, V).reshape(shape)
        top = torch.topk(y, k_max, dim=-1).values  # descending: the k-th largest of y for every k <= k_max
        kth = torch.where(kk <= k_max, top.gather(-1, (kk.clamp(max=k_max) - 1).expand(y.shape[:-1] + (1,))),
                          y.min(dim=-1, keepdim=True).values)
        probs = torch.where(y >= kth, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    return probs / probs.sum(-1, keepdim=True)


def sample_tokens(logits, temperature, top_p, top_k, seed, offset):
    """:func:`reference.sample_tokens`; an all-greedy batch is one argmax (first maximal index on ties), sampled
    batches take :func:`process_logits` and the reference's random stream and race."""
    if _all_greedy(temperature):
        return torch.argmax(logits, dim=-1)
    return reference._sample_from(process_logits(logits, temperature, top_p, top_k), seed, offset)


def _chain_from_good(good: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:
    """``alive[b, i]``: every node on the root path of ``i`` (``i`` included) is ``good``. Pointer jumping:
    ``ceil(log2 T)`` rounds of gathers, no host reads."""
    B, T = parents.shape
    alive = good.clone()
    anc = parents.clamp(min=0)
    has = parents >= 0
    for _ in range(max(T - 1, 1).bit_length()):
        alive = alive & (alive.gather(1, anc) | ~has)
        has = has & has.gather(1, anc)
        anc = anc.gather(1, anc)
    return alive


def _sibling_rank(parents: torch.Tensor) -> torch.Tensor:
    """``rank[b, i]``: how many earlier siblings node ``i`` has (node-index order); 0 for the root."""
    T = parents.shape[1]
    same = parents[:, :, None] == parents[:, None, :]  # [B, T, T]
    earlier = torch.ones(T, T, dtype=torch.bool, device=parents.device).tril(-1)
    return (same & earlier).sum(-1)


def _finish(alive: torch.Tensor, B: int, T: int, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Path (alive nodes in index order, -1 padded), accept length and the last node of each chain."""
    nodes = torch.arange(T, device=dev).expand(B, T)
    slot = torch.where(alive, alive.long().cumsum(1) - 1, T)  # T: a dump column
    path = torch.full((B, T + 1), -1, dtype=torch.long, device=dev).scatter_(1, slot, nodes)[:, :T]
    acc_len = alive.sum(1) - 1
    last = path.gather(1, acc_len[:, None])[:, 0]
    return path, acc_len, last


def accept_tree(target_logits, tree_tokens, parents, temperature, top_p, top_k, seed, offset) -> AcceptOutput:
    """:func:`reference.accept_tree`, vectorised over nodes; identical paths, lengths and tokens.

    Greedy: child ``c`` of ``u`` is taken iff its token is the target argmax at ``u`` and no earlier sibling's
    is; the accepted path is the chain of nodes whose whole root path was taken. Sampled: for every node at
    once, the ``j``-th child is tried against ``p`` with the earlier children's tokens zeroed and renormalised
    (the reference's arithmetic, step by step); ``c`` is taken iff it is the first accepted child of its
    parent. The residual at the last node is ``p`` with all its children's tokens removed.
    """
    B, T, V = target_logits.shape
    dev = target_logits.device
    par = parents.clamp(min=0)
    root = torch.arange(T, device=dev)[None] == 0
    if _all_greedy(temperature):
        amax = torch.argmax(target_logits, dim=-1)  # [B, T]; first maximal index, the reference's rule
        match = (tree_tokens == amax.gather(1, par)) & ~root
        # among matching siblings only the lowest index counts (duplicate sibling tokens)
        same = (parents[:, :, None] == parents[:, None, :]) & match[:, None, :]
        earlier_match = (same & torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)).any(-1)
        good = (match & ~earlier_match) | root
        path, acc_len, last = _finish(_chain_from_good(good, parents), B, T, dev)
        return AcceptOutput(path, acc_len, amax.gather(1, last[:, None])[:, 0])

    probs = process_logits(target_logits, temperature, top_p, top_k)  # [B, T, V]
    rank = _sibling_rank(parents)
    rank = torch.where(root, -1, rank)
    K = int(rank.max()) + 1  # most children of any node
    bb = torch.arange(B, device=dev).view(B, 1)
    nodes = torch.arange(T, device=dev).view(1, T)
    r = reference.hash_uniform(seed, offset, bb, nodes, torch.tensor(0))  # [B, T]: child c's draw
    taken = torch.zeros(B, T, dtype=torch.bool, device=dev)  # child accepted (before the first-accept rule)
    for j in range(K):
        # the j-th child of every node: kth[b, u] (or T where u has fewer children)
        is_j = (rank == j) & ~root
        kth = torch.full((B, T + 1), T, dtype=torch.long, device=dev)
        kth.scatter_(1, torch.where(is_j, par, T), torch.where(is_j, nodes.expand(B, T), T))
        kth = kth[:, :T]
        has = kth < T
        x = tree_tokens.gather(1, kth.clamp(max=T - 1))  # [B, T] token of u's j-th child
        px = probs.gather(2, x[..., None])[..., 0]
        ok = has & (r.gather(1, kth.clamp(max=T - 1)) < px)
        taken |= torch.zeros(B, T + 1, dtype=torch.bool, device=dev).scatter_(1, kth, ok)[:, :T]
        # reject: p <- normalise(p with p(x) = 0), only where u has a j-th child
        zeroed = probs.scatter(2, x[..., None], 0.0)
        total = zeroed.sum(-1, keepdim=True)
        renorm = torch.where(total > 0, zeroed / total, zeroed)
        probs = torch.where(has[..., None], renorm, probs)
    # first accepted child wins: a taken child with an earlier taken sibling is not good
    same = (parents[:, :, None] == parents[:, None, :]) & taken[:, None, :]
    earlier_taken = (same & torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)).any(-1)
    good = (taken & ~earlier_taken) | root
    path, acc_len, last = _finish(_chain_from_good(good, parents), B, T, dev)
    p_last = probs.gather(1, last.view(B, 1, 1).expand(B, 1, V))[:, 0]  # every child of `last` was rejected
    u = reference.hash_uniform(seed, offset, bb, last.view(B, 1), torch.tensor(1), torch.arange(V, device=dev))
    return AcceptOutput(path, acc_len, reference._race(p_last, u))


# --------------------------------------------------------------------------------------------------------------
# KV compaction
# --------------------------------------------------------------------------------------------------------------
def kv_compact(cache, prefix_len, accept_path, accept_len):
    """:func:`reference.kv_compact` for the whole batch at once: gather every source, then scatter."""
    Lp, B, H, S, D = cache.shape
    W = int(accept_len.max()) + 1
    j = torch.arange(W, device=cache.device)
    keep = j[None] <= accept_len[:, None]
    dst = prefix_len[:, None] + j  # [B, W]
    src = torch.where(keep, prefix_len[:, None] + accept_path[:, :W].clamp(min=0), dst)
    idx = src.view(1, B, 1, W, 1).expand(Lp, B, H, W, D)
    moved = cache.gather(3, idx)
    cache.scatter_(3, dst.view(1, B, 1, W, 1).expand(Lp, B, H, W, D), moved)
    return cache
