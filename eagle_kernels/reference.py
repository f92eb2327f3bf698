"""Plain PyTorch references of every op in the package.

Written for clarity, not speed. The runtime's ``torch`` backend runs these; the Triton kernels and the native
extension are tested against them. Every function here is the *contract* of its op: shapes, dtypes, padding
values and tie rules stated in the docstring hold for every backend.

Conventions used throughout:

* Batch first. ``B`` sequences, ``T`` tree tokens per sequence (node 0 is the root), ``V`` vocabulary.
* A tree is given by ``parents [B, T] int64``: ``parents[:, 0] == -1`` and ``0 <= parents[:, i] < i`` for
  ``i >= 1`` (nodes are topologically ordered). Siblings are ordered by node index: the lower index is the
  draft's higher-ranked candidate and is tried first by stochastic acceptance.
* KV caches are ``[L, B, H_kv, S, D]`` tensors (``L`` stacked K/V planes, e.g. ``2 * num_layers``) or, for
  attention, one plane ``[B, H_kv, S, D]``.
* Random numbers come from a counter-based hash of ``(seed, offset, ...)`` held in tensors (see
  :func:`hash_uniform`), so the same seed gives the same samples on every backend and inside CUDA graphs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "tree_attention",
    "topk_expand",
    "TopkExpandOutput",
    "build_tree_buffers",
    "TreeBuffers",
    "process_logits",
    "sample_tokens",
    "accept_tree",
    "AcceptOutput",
    "kv_compact",
    "hash_uniform",
    "moe_experts",
    "GREEDY_TEMPERATURE",
]

_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------------------------
# Tree attention
# --------------------------------------------------------------------------------------------------------------
def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``T`` new tokens over a cached prefix plus tree-masked new slots.

    Args:
        q: ``[B, T, Hq, D]`` queries (already rotated).
        k_cache, v_cache: ``[B, Hkv, S, D]``; ``Hq % Hkv == 0``, query head ``h`` reads KV head ``h // (Hq // Hkv)``.
            The new tokens' keys/values must already be written at slots ``prefix_len[b] + m``.
        prefix_len: ``[B]`` integer; slots ``[0, prefix_len[b])`` are visible to every query of sequence ``b``.
        tree_mask: ``[B, T, M]`` bool; query ``t`` also sees slot ``prefix_len[b] + m`` iff ``tree_mask[b, t, m]``.
            ``prefix_len[b] + M <= S``. ``M == T`` for verification, ``M >= T`` while the draft grows its tree.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        ``[B, T, Hq, D]`` in ``q.dtype`` (computed in float32). A query that sees no slot gets zeros.

    Mask example, a root ``r`` with children ``a``, ``b`` and ``a``'s child ``c`` (prefix of 3 slots ``p``)::

                 p p p | r a b c
            r    1 1 1 | 1 . . .
            a    1 1 1 | 1 1 . .
            b    1 1 1 | 1 . 1 .
            c    1 1 1 | 1 1 . 1

    ``T == 1`` with ``tree_mask = [[[True]]]`` is plain decoding; a lower-triangular mask is causal prefill.
    """
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    M = tree_mask.shape[-1]
    group = Hq // Hkv
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    n = int(prefix_len.max()) + M  # slots past every tree are never visible: skip them
    rel = torch.arange(n, device=q.device) - prefix_len.view(B, 1)  # slot index relative to each prefix
    in_tree = tree_mask.gather(2, rel.clamp(0, M - 1).view(B, 1, n).expand(B, T, n))
    visible = (rel < 0).view(B, 1, n) | ((rel < M).view(B, 1, n) & in_tree)  # [B, T, n]
    k = k_cache[:, :, :n].float().repeat_interleave(group, dim=1)  # [B, Hq, n, D]
    v = v_cache[:, :, :n].float().repeat_interleave(group, dim=1)
    scores = (q.float().transpose(1, 2) @ k.transpose(-1, -2)) * scale  # [B, Hq, T, n]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = (probs @ v).transpose(1, 2).to(q.dtype)
    return out


# --------------------------------------------------------------------------------------------------------------
# Fused top-k tree expansion
# --------------------------------------------------------------------------------------------------------------
class TopkExpandOutput(NamedTuple):
    child_tokens: torch.Tensor  # [B, N, k] int64 (target ids when a token map is given)
    child_scores: torch.Tensor  # [B, N, k] float32, parent + log_softmax, descending per row
    top_scores: torch.Tensor  # [B, out_k] float32, descending
    top_index: torch.Tensor  # [B, out_k] int64, flat index into the N * k children
    top_parent: torch.Tensor  # [B, out_k] int64, frontier row of each selected child (top_index // k)
    top_tokens: torch.Tensor  # [B, out_k] int64


def topk_expand(
    logits: torch.Tensor,
    parent_scores: torch.Tensor,
    k: int,
    out_k: int | None = None,
    token_map: torch.Tensor | None = None,
) -> TopkExpandOutput:
    """Expand a draft frontier: each row's top-``k`` children, then the top-``out_k`` of all children.

    Args:
        logits: ``[B, N, V]`` draft logits of the ``N`` frontier nodes (any float dtype; math in float32).
        parent_scores: ``[B, N]`` float cumulative log-probabilities of the frontier nodes.
        k: children per row, ``1 <= k <= V``.
        out_k: how many of the ``N * k`` children to keep, default ``k``; ``out_k <= N * k``.
        token_map: optional ``[V]`` int64 draft-id -> target-id map (EAGLE-3 reduced vocabulary).

    Child score = ``parent_score + logit - logsumexp(row)``. Children of a row are sorted by descending score;
    the final selection is sorted by descending score, flat index ``row * k + j``. Ties resolve to the lower
    index (so a parent always precedes an equal-scored child).

    Example: ``logits = [[[0, ln 3]]]`` (one row, V=2), ``parent_scores = [[0]]``, ``k = 1`` gives child token 1
    with score ``ln 0.75``.
    """
    return _topk_expand_with(_topk_stable, logits, parent_scores, k, out_k, token_map)


def _topk_expand_with(topk, logits, parent_scores, k, out_k, token_map) -> TopkExpandOutput:
    """:func:`topk_expand`'s arithmetic with ``topk(x, k) -> (values, indices)`` under the lowest-index tie rule
    (the fast CPU backend passes its own)."""
    B, N, V = logits.shape
    out_k = k if out_k is None else out_k
    logp = torch.log_softmax(logits.float(), dim=-1)
    vals, idx = topk(logp, k)
    child_scores = vals + parent_scores.float().unsqueeze(-1)
    flat = child_scores.reshape(B, N * k)
    top_scores, top_index = topk(flat, out_k)
    child_tokens = idx if token_map is None else token_map[idx]
    top_tokens = child_tokens.reshape(B, N * k).gather(1, top_index)
    return TopkExpandOutput(child_tokens, child_scores, top_scores, top_index, top_index // k, top_tokens)


def _topk_stable(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, ties broken towards the lower index (torch.topk leaves ties unspecified)."""
    order = torch.sort(x, dim=-1, descending=True, stable=True)
    return order.values[..., :k], order.indices[..., :k]


# --------------------------------------------------------------------------------------------------------------
# Tree buffers
# --------------------------------------------------------------------------------------------------------------
class TreeBuffers(NamedTuple):
    mask: torch.Tensor  # [B, T, T] bool: node i sees node j iff j is i or an ancestor of i
    depth: torch.Tensor  # [B, T] int64: root 0; position id of node i = prefix_len + depth[i]
    first_child: torch.Tensor  # [B, T] int64, -1 for a leaf
    next_sibling: torch.Tensor  # [B, T] int64, -1 for the last child
    paths: torch.Tensor  # [B, T, max_depth + 1] int64: root-to-node path of node i, -1 padded


def build_tree_buffers(parents: torch.Tensor, max_depth: int | None = None) -> TreeBuffers:
    """Attention mask, depths, child links and root paths of a batch of trees.

    Args:
        parents: ``[B, T]`` int64, ``parents[:, 0] == -1``, ``0 <= parents[:, i] < i`` for ``i >= 1``.
        max_depth: width of ``paths`` minus one, default ``T - 1``. A tree deeper than this is an error.

    Example, ``parents = [[-1, 0, 0, 1]]``: depth ``[0, 1, 1, 2]``, first_child ``[1, 3, -1, -1]``,
    next_sibling ``[-1, 2, -1, -1]``, paths rows ``[0,-1,-1]``, ``[0,1,-1]``, ``[0,2,-1]``, ``[0,1,3]``
    (``max_depth = 2``), and the mask drawn in :func:`tree_attention`.
    """
    B, T = parents.shape
    max_depth = T - 1 if max_depth is None else max_depth
    _check_parents(parents)
    dev = parents.device
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=dev)
    depth = torch.zeros(B, T, dtype=torch.int64, device=dev)
    first_child = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    next_sibling = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    paths = torch.full((B, T, max_depth + 1), -1, dtype=torch.int64, device=dev)
    par = parents.tolist()
    for b in range(B):
        last_child = [-1] * T
        mask[b, 0, 0] = True
        paths[b, 0, 0] = 0
        for i in range(1, T):
            p = par[b][i]
            mask[b, i] = mask[b, p]
            mask[b, i, i] = True
            depth[b, i] = depth[b, p] + 1
            d = int(depth[b, i])
            if d > max_depth:
                raise ValueError(f"tree of sequence {b} has depth {d} > max_depth {max_depth}")
            paths[b, i] = paths[b, p]
            paths[b, i, d] = i
            if last_child[p] < 0:
                first_child[b, p] = i
            else:
                next_sibling[b, last_child[p]] = i
            last_child[p] = i
    return TreeBuffers(mask, depth, first_child, next_sibling, paths)


def _check_parents(parents: torch.Tensor) -> None:
    if parents.dim() != 2 or parents.shape[1] < 1:
        raise ValueError(f"parents must be [B, T] with T >= 1, got {tuple(parents.shape)}")
    if bool((parents[:, 0] != -1).any()):
        raise ValueError("parents[:, 0] must be -1 (node 0 is the root)")
    T = parents.shape[1]
    if T > 1:
        idx = torch.arange(1, T, device=parents.device)
        rest = parents[:, 1:]
        if bool(((rest < 0) | (rest >= idx)).any()):
            raise ValueError("parents[:, i] must lie in [0, i) for i >= 1 (topological order)")


# --------------------------------------------------------------------------------------------------------------
# Random numbers: a counter-based hash shared by every backend
# --------------------------------------------------------------------------------------------------------------
def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    x = x ^ (x >> 16)
    return x


def hash_uniform(seed: torch.Tensor, offset: torch.Tensor, *counters: torch.Tensor) -> torch.Tensor:
    """Uniform float32 numbers in (0, 1) from ``(seed, offset, c0, c1, ...)``, broadcast together.

    ``h = fmix32(seed_lo); h = fmix32(h ^ (seed_hi + 0x9E3779B9)); h = fmix32(h ^ offset);
    for c in counters: h = fmix32(h ^ (c + 0x9E3779B9))``, each value taken modulo 2**32, where ``seed_lo`` and
    ``seed_hi`` are the low and high 32-bit halves of the int64 seed (two's complement), then
    ``u = ((h >> 8) + 0.5) / 2**24``. Both halves of the seed are mixed, so ``0``, ``2**32`` and ``-2**32`` give
    different streams; the state is 32 bits, so two distinct seeds share a stream with probability ``2**-32``.
    Kernels implement the same function so a seed gives identical draws on every backend.
    """
    s = seed.to(torch.int64)
    h = _fmix32(s & _M32)
    h = _fmix32(h ^ (((s >> 32) + 0x9E3779B9) & _M32))
    h = _fmix32(h ^ (offset.to(torch.int64) & _M32))
    for c in counters:
        h = _fmix32(h ^ ((c.to(torch.int64) + 0x9E3779B9) & _M32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / 16777216.0)


# --------------------------------------------------------------------------------------------------------------
# Sampling and acceptance
# --------------------------------------------------------------------------------------------------------------
GREEDY_TEMPERATURE = 1e-5
"""Rows with ``temperature < GREEDY_TEMPERATURE`` are greedy (vLLM's ``_SAMPLING_EPS`` is the same 1e-5): dividing
logits by a tiny temperature overflows float32 (``1e-37`` turns logits of 40 into ``inf`` and softmax into NaN),
and below 1e-5 a sampled row is a one-hot at the argmax unless two logits lie within about 1e-4 of each other."""


def process_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor
) -> torch.Tensor:
    """Target probabilities after temperature, top-k and top-p, float32, rows summing to 1.

    Args:
        logits: ``[B, ..., V]``.
        temperature, top_p, top_k: ``[B]`` per sequence.

    The order and semantics are transformers' warpers (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
    ``TopPLogitsWarper`` with ``min_tokens_to_keep=1``), which vLLM follows too:

    1. ``y = logits / temperature``. ``temperature < GREEDY_TEMPERATURE`` (0 included) gives a one-hot at the
       argmax of the raw logits (lowest index on ties) and ignores top-k/top-p.
    2. top-k keeps every token with ``y >= `` the k-th largest ``y``: tokens tied with the k-th value are all kept
       (transformers' ``scores < topk(scores, k)[..., -1]`` removal), so more than ``k`` tokens may survive.
       ``top_k <= 0`` or ``>= V`` disables it.
    3. top-p acts on the distribution *renormalised over the top-k survivors*: sorted by descending probability,
       a token is kept while the renormalised mass strictly before it is below ``top_p`` (the token that crosses
       ``top_p`` is kept, and the most probable token always is). This is transformers' ascending rule "remove
       where the cumulative mass <= 1 - top_p", counted from the other end. ``top_p >= 1`` disables it.
       Tie rule: among tokens of equal probability straddling the top-p cut the lowest indices are kept;
       transformers keeps whichever ``torch.sort`` puts last (on CPU its stable ascending sort keeps the
       highest indices), the only place where the two differ.

    Example: ``logits = [ln 4, ln 3, ln 2, ln 1]``, ``temperature 1``, ``top_k 3``, ``top_p 0.75``: top-k keeps
    ``[4, 3, 2] / 9``; top-p keeps token 0 (mass before 0), token 1 (4/9 < 0.75) and drops token 2 (7/9), giving
    ``[4/7, 3/7, 0, 0]``. Top-p on the full distribution would have kept token 2 (mass before it 0.7).
    """
    B, V = logits.shape[0], logits.shape[-1]
    shape = (B,) + (1,) * (logits.dim() - 1)
    x = logits.float()
    t = temperature.float().reshape(shape)
    greedy = t < GREEDY_TEMPERATURE
    y = x / torch.where(greedy, torch.ones_like(t), t)
    probs = torch.softmax(y, dim=-1)
    kk = top_k.to(torch.int64).reshape(shape)
    kk = torch.where((kk <= 0) | (kk > V), torch.full_like(kk, V), kk)
    kth = torch.sort(y, dim=-1, descending=True).values.gather(-1, (kk - 1).expand(y.shape[:-1] + (1,)))
    probs = torch.where(y >= kth, probs, torch.zeros_like(probs))
    probs = probs / probs.sum(-1, keepdim=True)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # renormalised top-k mass strictly before each token
    tp = top_p.float().reshape(shape)
    keep = (before < tp) | (tp >= 1)  # top_p == 1 keeps everything, even where float cumsum reaches 1 early
    keep[..., 0] = True
    kept_sorted = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    out = torch.zeros_like(probs).scatter(-1, order, kept_sorted)
    out = out / out.sum(-1, keepdim=True)
    onehot = torch.zeros_like(out).scatter(-1, _argmax_low(x).unsqueeze(-1), 1.0)
    return torch.where(greedy, onehot, out)


def _argmax_low(x: torch.Tensor) -> torch.Tensor:
    """Argmax along the last dim, lowest index on ties (the rule every backend follows)."""
    V = x.shape[-1]
    mx = x.max(dim=-1, keepdim=True).values
    idx = torch.arange(V, device=x.device).expand_as(x)
    return torch.where(x == mx, idx, torch.full_like(idx, V)).min(dim=-1).values


def _race(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Sample index ``argmax_v probs_v / E_v`` with ``E_v = -log u_v`` (exponential race); zero-prob never wins."""
    score = torch.where(probs > 0, torch.log(probs) - torch.log(-torch.log(u)), torch.full_like(probs, -math.inf))
    return _argmax_low(score)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (plain decoding). Greedy where ``temperature < GREEDY_TEMPERATURE``.

    Random stream: ``hash_uniform(seed, offset, b, 2**31 - 1, 1, v)`` (node ``2**31 - 1`` keeps it apart from
    the streams of :func:`accept_tree`). ``seed`` and ``offset`` are scalar int64 tensors.
    """
    return _sample_from(process_logits(logits, temperature, top_p, top_k), seed, offset)


def _sample_from(probs: torch.Tensor, seed: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """:func:`sample_tokens`' draw from processed probabilities ``[B, V]`` (the fast CPU backend shares it)."""
    B, V = probs.shape
    bb = torch.arange(B, device=probs.device).view(B, 1)
    vv = torch.arange(V, device=probs.device).view(1, V)
    u = hash_uniform(seed, offset, bb, torch.tensor(2**31 - 1), torch.tensor(1), vv)
    return _race(probs, u)


class AcceptOutput(NamedTuple):
    accept_path: torch.Tensor  # [B, T] int64: node indices of the accepted path, root first, -1 padded
    accept_len: torch.Tensor  # [B] int64: accepted draft nodes (root excluded); tokens emitted = accept_len + 1
    next_token: torch.Tensor  # [B] int64: bonus (after a full match) or residual (after a rejection) token


def accept_tree(
    target_logits: torch.Tensor,
    tree_tokens: torch.Tensor,
    parents: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
) -> AcceptOutput:
    """Verify a draft tree against the target and pick the emitted tokens; exact in distribution.

    Args:
        target_logits: ``[B, T, V]``; row ``i`` is the target's next-token logits after node ``i``.
        tree_tokens: ``[B, T]`` int64; ``tree_tokens[:, 0]`` (the root) is already decided.
        parents: ``[B, T]`` tree (see module docstring); siblings are tried in node-index order.
        temperature, top_p, top_k: ``[B]``; ``temperature < GREEDY_TEMPERATURE`` is greedy (see :func:`process_logits`).
        seed, offset: scalar int64 tensors; the caller advances ``offset`` once per cycle.

    Greedy: from the root, move to the child whose token equals the target argmax; stop when none does; the
    next token is the argmax at the last node. Stochastic (multi-draft speculative sampling with the
    deterministic top-k drafts of EAGLE-2, so each draft ``q`` is a point mass): at node ``u`` with processed
    target distribution ``p``, try the children in order; child ``c`` with token ``x`` is accepted iff
    ``hash_uniform(seed, offset, b, c, 0) < p(x)``; on rejection ``p <- normalise(p with p(x) = 0)``. If no child
    is accepted (or ``u`` is a leaf) the next token is sampled from the current ``p`` by an exponential race with
    ``hash_uniform(seed, offset, b, u, 1, v)``. Every emitted token then follows the target's processed
    distribution exactly.
    """
    B, T, V = target_logits.shape
    dev = target_logits.device
    probs_all = process_logits(target_logits, temperature, top_p, top_k)  # [B, T, V]
    path = torch.full((B, T), -1, dtype=torch.int64, device=dev)
    acc_len = torch.zeros(B, dtype=torch.int64, device=dev)
    nxt = torch.zeros(B, dtype=torch.int64, device=dev)
    par = parents.tolist()
    vv = torch.arange(V, device=dev)
    for b in range(B):
        children: list[list[int]] = [[] for _ in range(T)]
        for i in range(1, T):
            children[par[b][i]].append(i)
        bt = torch.tensor(b)
        u_node, n = 0, 0
        path[b, 0] = 0
        while True:
            p = probs_all[b, u_node].clone()
            moved = False
            for c in children[u_node]:
                x = int(tree_tokens[b, c])
                r = hash_uniform(seed, offset, bt, torch.tensor(c), torch.tensor(0))
                if float(r) < float(p[x]):
                    moved = True
                    break
                p[x] = 0.0
                total = p.sum()
                p = p / total if float(total) > 0 else p
            if not moved:
                u = hash_uniform(seed, offset, bt, torch.tensor(u_node), torch.tensor(1), vv)
                nxt[b] = _race(p, u)
                break
            n += 1
            path[b, n] = c
            u_node = c
        acc_len[b] = n
    return AcceptOutput(path, acc_len, nxt)


def draft_distribution(draft_logits, temperature, top_p, top_k, token_map=None, vocab_size=None, process=None):
    """The draft's distribution ``q [B, V]`` over the target vocabulary: its logits (draft ids mapped to target
    ids through ``token_map``, the other ids at ``-inf``) processed like the target's (:func:`process_logits`:
    temperature, top-k, top-p). Only for sampled rows (``temperature >= GREEDY_TEMPERATURE``)."""
    if token_map is not None:
        full = draft_logits.new_full(draft_logits.shape[:-1] + (vocab_size,), float("-inf"))
        draft_logits = full.index_copy(-1, token_map, draft_logits)
    return (process or process_logits)(draft_logits, temperature, top_p, top_k)


def sample_draft(draft_logits, temperature, top_p, top_k, seed, offset, node: int, token_map=None, vocab_size=None,
                 process=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A chain draft sampled from the draft's distribution: ``(token [B], q [B, V])`` with ``q`` from
    :func:`draft_distribution`. Random stream ``hash_uniform(seed, offset, b, node, 2, v)`` (``node`` is the chain
    node the token becomes), apart from :func:`accept_chain`'s and :func:`sample_tokens`' streams."""
    q = draft_distribution(draft_logits, temperature, top_p, top_k, token_map, vocab_size, process)
    B, V = q.shape
    bb = torch.arange(B, device=q.device).view(B, 1)
    u = hash_uniform(seed, offset, bb, torch.tensor(node), torch.tensor(2), torch.arange(V, device=q.device).view(1, V))
    return _race(q, u), q


def accept_chain(
    target_logits: torch.Tensor,
    chain_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    seed: torch.Tensor,
    offset: torch.Tensor,
    process=None,
) -> AcceptOutput:
    """Speculative sampling along a chain whose drafts were *sampled* from the draft's distribution (Leviathan et
    al. 2023, Chen et al. 2023); exact in distribution, and it accepts about ``sum_x min(p(x), q(x))`` per draft
    instead of :func:`accept_tree`'s ``p(x)`` for a deterministic draft.

    Args:
        target_logits: ``[B, T, V]``; row ``i`` is the target's next-token logits after chain node ``i``.
        chain_tokens: ``[B, T]``; node ``d >= 1`` is the child of node ``d - 1``, node 0 the root.
        draft_probs: ``[B, T - 1, V]``; ``draft_probs[:, d - 1]`` is the distribution node ``d`` was sampled from
            (:func:`sample_draft`).
        temperature, top_p, top_k, seed, offset: as :func:`accept_tree` (every row sampled).
        process: the processing of the target logits (default :func:`process_logits`; the fast CPU backend
            passes its bit-identical one).

    With ``p`` the processed target distribution at node ``d - 1`` and ``q = draft_probs[:, d - 1]``, node ``d``
    (token ``x``) is accepted iff ``hash_uniform(seed, offset, b, d, 0) * q(x) < p(x)`` (probability
    ``min(1, p(x) / q(x))``). At the first rejection the next token is drawn from ``max(p - q, 0)`` normalised;
    after a full match from ``p`` at the last node; both by an exponential race with
    ``hash_uniform(seed, offset, b, u, 1, v)`` at the last accepted node ``u``.
    """
    B, T, V = target_logits.shape
    dev = target_logits.device
    n = T - 1
    p = (process or process_logits)(target_logits, temperature, top_p, top_k)  # [B, T, V]
    x = chain_tokens[:, 1:, None]
    px = p[:, :n].gather(2, x)[..., 0]
    qx = draft_probs.gather(2, x)[..., 0]
    bb = torch.arange(B, device=dev).view(B, 1)
    r = hash_uniform(seed, offset, bb, torch.arange(1, T, device=dev).view(1, n), torch.tensor(0))  # [B, n]
    acc_len = (r * qx < px).long().cumprod(1).sum(1)  # leading accepted drafts
    nodes = torch.arange(T, device=dev).view(1, T)
    path = torch.where(nodes <= acc_len[:, None], nodes, -1)
    p_last = p.gather(1, acc_len.view(B, 1, 1).expand(B, 1, V))[:, 0]
    q_last = draft_probs.gather(1, acc_len.clamp(max=n - 1).view(B, 1, 1).expand(B, 1, V))[:, 0]
    residual = (p_last - q_last).clamp(min=0)
    total = residual.sum(-1, keepdim=True)
    residual = torch.where(total > 0, residual / total, p_last)  # total 0 cannot follow a rejection; kept safe
    dist = torch.where((acc_len < n)[:, None], residual, p_last)
    u = hash_uniform(seed, offset, bb, acc_len.view(B, 1), torch.tensor(1), torch.arange(V, device=dev).view(1, V))
    return AcceptOutput(path, acc_len, _race(dist, u))


# --------------------------------------------------------------------------------------------------------------
# KV compaction
# --------------------------------------------------------------------------------------------------------------
def kv_compact(
    cache: torch.Tensor, prefix_len: torch.Tensor, accept_path: torch.Tensor, accept_len: torch.Tensor
) -> torch.Tensor:
    """Move the accepted path's cache entries to contiguous slots, in place.

    Args:
        cache: ``[L, B, H, S, D]`` (``L`` stacked planes: K and V of every layer).
        prefix_len: ``[B]``; the tree's node ``i`` was written at slot ``prefix_len[b] + i``.
        accept_path, accept_len: from :func:`accept_tree`; entries ``0 .. accept_len[b]`` of the path are moved.

    After the call slot ``prefix_len[b] + j`` holds what slot ``prefix_len[b] + accept_path[b, j]`` held, for
    ``j <= accept_len[b]``; other slots are unspecified beyond the new length. Because ``accept_path[b, j] >= j``
    and the path is increasing, copying in increasing ``j`` never reads a slot already overwritten; a parallel
    implementation must read every source before writing (or go in that order).
    """
    B = cache.shape[1]
    for b in range(B):
        n = int(accept_len[b]) + 1
        p = int(prefix_len[b])
        src = accept_path[b, :n] + p
        cache[:, b, :, p : p + n] = cache[:, b, :, src].clone()
    return cache


def moe_experts(
    x: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """Mixtral's routed SwiGLU experts for already-routed tokens.

    Args:
        x: ``[N, H]`` tokens. top_w, top_i: ``[N, K]`` routing weights and expert ids in ``[0, E)``.
        w1, w3: ``[E, I, H]`` gate and up projections; w2: ``[E, H, I]`` down projection.

    Returns ``out[n] = sum_k top_w[n, k] * (silu(x[n] w1[e]^T) * (x[n] w3[e]^T)) w2[e]^T`` with ``e = top_i[n, k]``,
    ``[N, H]`` in ``x.dtype``, computed in float32 one assignment at a time (clarity, not speed).
    """
    N, K = top_i.shape
    xf, out = x.float(), torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device)
    for k in range(K):
        e = top_i[:, k]
        g = torch.einsum("nh,nih->ni", xf, w1[e].float())
        u = torch.einsum("nh,nih->ni", xf, w3[e].float())
        h = torch.nn.functional.silu(g) * u
        out += top_w[:, k, None].float() * torch.einsum("ni,nhi->nh", h, w2[e].float())
    return out.to(x.dtype)


# Decoder-layer pieces (RMSNorm with the residual add, rotary + K/V cache write, SiLU-and-mul) live in
# reference_layer.py; they are part of this module's contract and importable from it like every other op.
from .reference_layer import add_rms_norm, rms_norm, rope_kv_write, silu_mul  # noqa: E402

__all__ += ["rms_norm", "add_rms_norm", "rope_kv_write", "silu_mul"]
