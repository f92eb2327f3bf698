"""Draft trees: the static EAGLE-1 tree and the EAGLE-2 dynamic tree, drafted batch-first on device.

A drafted tree is ``(tokens [B, T], parents [B, T])`` with node 0 the root (the token already chosen by the
target) and nodes in topological order; siblings are ordered by the draft's rank (lower index = more likely),
the order in which stochastic acceptance tries them.

Drafting calls ``step(hidden_in, tokens, positions, write_pos, mask) -> (hidden_out, logits)``: the draft head
over ``n`` tree nodes, all attending to the draft cache's prefix plus the tree slots drafted so far. A node at
tree depth ``d`` runs at draft position ``L + d - 1`` with the predicted feature of its parent as input.
``logits`` cover the head's draft vocabulary; ``token_map`` (``[V_draft]`` int64, or ``None`` when draft ids are
target ids) maps them to target ids inside :func:`eagle_kernels.topk_expand`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

from eagle_kernels import Ops

# EAGLE-1's default static tree for 7B models ("mc_sim_7b_63"): each entry is a path of child ranks from the
# root, e.g. [0, 1] = the second-ranked child of the top-ranked first token. 25 draft nodes, depth 5.
MC_SIM_7B_63 = [
    [0], [1], [2], [3],
    [0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [2, 0], [2, 1], [3, 0],
    [0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1], [1, 0, 0],
    [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2],
    [0, 0, 0, 0, 0], [0, 0, 0, 0, 1],
]  # fmt: skip

DraftStep = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class StaticTree:
    """A fixed tree given as rank paths (EAGLE-1). ``choices`` default to ``MC_SIM_7B_63``: a list (or tuple) of
    non-empty lists (or tuples) of integer ranks >= 0, 0 being the draft's top token at that step."""

    choices: list[list[int]] = field(default_factory=lambda: [list(c) for c in MC_SIM_7B_63])

    def __post_init__(self):
        self.choices = sorted(_rank_paths(self.choices), key=lambda c: (len(c), c))
        if not self.choices:
            raise ValueError("a static tree needs at least one draft node")
        index = {(): 0}
        parents = [-1]
        for i, c in enumerate(self.choices, start=1):
            if tuple(c[:-1]) not in index:
                raise ValueError(f"tree path {c} has no parent path {c[:-1]} in the tree")
            if tuple(c) in index:
                raise ValueError(f"tree path {c} appears twice")
            index[tuple(c)] = i
            parents.append(index[tuple(c[:-1])])
        self.parents = parents
        self.ranks = [-1] + [c[-1] for c in self.choices]
        self.depths = [0] + [len(c) for c in self.choices]
        self.max_depth = max(self.depths)
        self.num_nodes = len(parents)
        self.max_rank = max(self.ranks) + 1
        self._tables: dict = {}
        self._levels = [(self.depths.index(d), len(self.depths) - self.depths[::-1].index(d)) for d in range(self.max_depth + 1)]

    def draft_slots(self) -> int:
        return self.num_nodes

    def _device_tables(self, dev: torch.device, ops: Ops):
        """Parents, ranks and the draft-node mask on ``dev``, made once (no host copies inside a CUDA graph)."""
        key = str(dev)
        if key not in self._tables:
            parents = torch.tensor(self.parents)
            mask = ops.build_tree_buffers(parents[None], self.max_depth).mask[0, 1:, 1:]
            self._tables[key] = (parents.to(dev), torch.tensor(self.ranks).to(dev), mask.to(dev))
        return self._tables[key]

    def draft(self, step: DraftStep, d_hidden, d_logits, root, L, ops: Ops, token_map=None):
        """Draft the fixed tree: level by level, children picked by rank from each parent's top-k."""
        B, dev = root.shape[0], root.device
        T = self.num_nodes
        parents, ranks, full_mask = self._device_tables(dev, ops)
        tokens = torch.zeros(B, T, dtype=torch.long, device=dev)
        tokens[:, 0] = root
        hidden = torch.zeros(B, T, d_hidden.shape[-1], dtype=d_hidden.dtype, device=dev)
        hidden[:, 0] = d_hidden  # the draft's prediction after the root feeds the root's children
        logits = d_logits[:, None]
        for d in range(1, self.max_depth + 1):
            lo, hi = self._levels[d]  # levels are contiguous in node order
            plo, phi = self._levels[d - 1]
            e = ops.topk_expand(logits, torch.zeros(B, phi - plo, device=dev), self.max_rank, token_map=token_map)
            tokens[:, lo:hi] = e.child_tokens[:, parents[lo:hi] - plo, ranks[lo:hi]]
            if d == self.max_depth:
                break
            mask = full_mask[lo - 1 : hi - 1, : hi - 1].expand(B, -1, -1)
            pos = (L + d - 1)[:, None].expand(B, hi - lo)
            h_out, logits = step(hidden[:, parents[lo:hi]], tokens[:, lo:hi], pos, L + lo - 1, mask)
            hidden[:, lo:hi] = h_out
        return tokens, parents[None].expand(B, T).contiguous()


def _rank_paths(choices) -> list[list[int]]:
    """``StaticTree.choices`` as lists of Python ints, or a one-line TypeError / ValueError: a negative rank would
    index the top-k from its end, and other types failed inside sorting with no word of the argument."""
    if not isinstance(choices, (list, tuple)):
        raise TypeError(f"StaticTree choices must be a list of rank paths, got {type(choices).__name__}")
    out = []
    for c in choices:
        if not isinstance(c, (list, tuple)):
            raise TypeError(f"StaticTree choices: a rank path is a list of integer ranks, got {c!r}")
        if not c:
            raise ValueError("StaticTree choices: an empty rank path (the root is implicit, not a path)")
        for r in c:
            if isinstance(r, bool) or not isinstance(r, numbers.Integral):
                raise TypeError(f"StaticTree choices: path {list(c)!r} holds {r!r}, not an integer rank")
            if r < 0:
                raise ValueError(f"StaticTree choices: path {list(c)!r} holds rank {r}; ranks count from 0")
        out.append([int(r) for r in c])
    return out


@dataclass
class DynamicTree:
    """EAGLE-2's context-aware tree: grow the ``top_k`` best frontier nodes for ``depth`` draft passes, then keep
    the ``total_tokens`` candidates with the highest cumulative draft log-probability (tree size
    ``total_tokens + 1`` with the root; deepest node at depth ``depth + 1``)."""

    total_tokens: int = 60
    depth: int = 6
    top_k: int = 10

    def __post_init__(self):
        for name in ("total_tokens", "depth", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"DynamicTree {name} must be an integer, got {v!r}")
        if self.top_k < 1 or self.depth < 0 or self.total_tokens < 1:
            raise ValueError(f"invalid dynamic tree {self}: needs top_k >= 1, depth >= 0, total_tokens >= 1")
        if self.total_tokens <= self.depth:
            # the verify buffers are sized for a path of depth + 1 drafts; fewer nodes cannot fill it
            raise ValueError(f"DynamicTree total_tokens {self.total_tokens} must exceed depth {self.depth}")
        pool = self.top_k + self.depth * self.top_k**2
        if self.total_tokens > pool:
            raise ValueError(f"total_tokens {self.total_tokens} exceeds the {pool} candidates top_k/depth produce")
        self.num_nodes = self.total_tokens + 1
        self.max_depth = self.depth + 1

    def draft_slots(self) -> int:
        return max(self.depth, 1) * self.top_k

    def draft(self, step: DraftStep, d_hidden, d_logits, root, L, ops: Ops, token_map=None):
        if self.top_k == 1:
            return self._draft_chain(step, d_hidden, d_logits, root, L, token_map)
        return self._draft_tree(step, d_hidden, d_logits, root, L, ops, token_map)

    def _draft_tree(self, step: DraftStep, d_hidden, d_logits, root, L, ops: Ops, token_map=None):
        """EAGLE-2's expansion and rerank (any ``top_k``; :meth:`draft` takes a shortcut for chains)."""
        B, dev = root.shape[0], root.device
        k = self.top_k
        e = ops.topk_expand(d_logits[:, None], torch.zeros(B, 1, device=dev), k, token_map=token_map)
        pool_tok, pool_score = [e.top_tokens], [e.top_scores]
        pool_parent = [torch.full((B, k), -1, dtype=torch.long, device=dev)]
        front_idx = torch.arange(k, device=dev).expand(B, k)
        front_tok, front_score = e.top_tokens, e.top_scores
        h_in = d_hidden[:, None].expand(B, k, d_hidden.shape[-1])
        eye = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)
        parent_rows = torch.zeros(B, k, 0, dtype=torch.bool, device=dev)
        size = k
        for s in range(1, self.depth + 1):
            mask = torch.cat([parent_rows, eye], dim=2)  # [B, k, s * k]
            pos = (L + s - 1)[:, None].expand(B, k)
            h_out, logits = step(h_in, front_tok, pos, L + (s - 1) * k, mask)
            e = ops.topk_expand(logits, front_score, k, out_k=k, token_map=token_map)
            pool_tok.append(e.child_tokens.reshape(B, k * k))
            pool_score.append(e.child_scores.reshape(B, k * k))
            pool_parent.append(front_idx.repeat_interleave(k, dim=1))
            front_idx = size + e.top_index
            size += k * k
            front_tok, front_score = e.top_tokens, e.top_scores
            h_in = h_out.gather(1, e.top_parent[..., None].expand(-1, -1, h_out.shape[-1]))
            parent_rows = mask.gather(1, e.top_parent[..., None].expand(-1, -1, mask.shape[-1]))
        tok, score, par = torch.cat(pool_tok, 1), torch.cat(pool_score, 1), torch.cat(pool_parent, 1)
        # Rerank: ancestors always survive (a child never outscores its parent; ties keep the lower index).
        order = torch.sort(score, dim=1, descending=True, stable=True).indices[:, : self.total_tokens]
        sel = torch.sort(order, dim=1).values  # pool order is topological
        node_of = torch.zeros(B, tok.shape[1], dtype=torch.long, device=dev)
        node_of.scatter_(1, sel, torch.arange(1, self.total_tokens + 1, device=dev).expand(B, -1))
        sel_par = par.gather(1, sel)
        parents = torch.where(sel_par < 0, 0, node_of.gather(1, sel_par.clamp(min=0)))
        root_par = torch.full((B, 1), -1, dtype=torch.long, device=dev)
        tokens = torch.cat([root[:, None], tok.gather(1, sel)], dim=1)
        return tokens, torch.cat([root_par, parents], dim=1)

    def _draft_chain(self, step: DraftStep, d_hidden, d_logits, root, L, token_map, sampler=None):
        """``top_k == 1``: the tree is a chain of ``depth + 1`` drafts (the pool holds exactly ``total_tokens``
        candidates, so the rerank keeps them all, in chain order). Each draft is the argmax of the draft's
        log-probabilities (first index on ties: ``topk_expand``'s choice for ``k = 1``), without the top-k
        expansion, frontier gathers and rerank of the general case.

        ``sampler(logits, node) -> (tokens [B], q [B, V])`` instead samples each draft from the draft's
        distribution (see :meth:`draft_sampled`)."""
        B, dev = root.shape[0], root.device
        qs = []

        def pick(logits, node):
            if sampler is not None:
                t, q = sampler(logits, node)
                qs.append(q)
                return t
            t = torch.log_softmax(logits.float(), dim=-1).argmax(-1)
            return t if token_map is None else token_map[t]

        toks = [root, pick(d_logits, 1)]
        h_in = d_hidden[:, None]
        for s in range(1, self.depth + 1):
            mask = torch.ones(B, 1, s, dtype=torch.bool, device=dev)  # every earlier chain slot is an ancestor
            h_in, logits = step(h_in, toks[-1][:, None], (L + s - 1)[:, None], L + s - 1, mask)
            toks.append(pick(logits[:, 0], s + 1))
        parents = torch.arange(-1, self.total_tokens, device=dev).expand(B, -1).contiguous()
        if sampler is not None:
            return torch.stack(toks, 1), parents, torch.stack(qs, 1)
        return torch.stack(toks, 1), parents

    def draft_sampled(self, step: DraftStep, d_hidden, d_logits, root, L, sampler):
        """A chain (``top_k == 1`` only) whose drafts are sampled: ``(tokens [B, T], parents [B, T], q [B, T - 1,
        V])``, ``q[:, d - 1]`` the distribution node ``d`` was drawn from, for
        :func:`eagle_kernels.reference.accept_chain`. ``sampler(logits, node) -> (tokens, q)`` (the backend's
        ``sample_draft`` with the generation's sampling settings)."""
        if self.top_k != 1:
            raise ValueError(f"sampled drafts need a chain (top_k 1), got top_k {self.top_k}")
        return self._draft_chain(step, d_hidden, d_logits, root, L, None, sampler)


def step_room(tree, speculative: bool = True) -> int:
    """Cache positions one step may write past a row's committed length: the verified tree or the draft's slots
    (whichever is larger), or one token for a plain step. ``tree``: any tree, or an ``AutoTree`` (its largest)."""
    return max(tree.num_nodes, tree.draft_slots()) if speculative else 1


def default_candidates() -> list[DynamicTree]:
    """Chains (``top_k = 1``) of 1-8 draft tokens and small/medium EAGLE-2 trees."""
    chains = [DynamicTree(c, c - 1, 1) for c in (1, 2, 3, 4, 5, 6, 8)]
    trees = [(4, 2, 2), (6, 3, 2), (8, 3, 2), (8, 4, 2), (12, 5, 2), (8, 3, 4), (12, 3, 4), (16, 4, 4),
             (24, 5, 4), (32, 6, 4), (32, 5, 8), (60, 6, 10)]
    return chains + [DynamicTree(*t) for t in trees]


def fit_kind(tree) -> str:
    """``"chain"`` (a :class:`DynamicTree` with ``top_k == 1``) or ``"tree"``: chains draft by argmax (or by
    sampling, see :meth:`DynamicTree.draft_sampled`), trees by top-k expansion; tree="auto" fits the two apart."""
    return "chain" if isinstance(tree, DynamicTree) and tree.top_k == 1 else "tree"


def tree_key(tree) -> str:
    """A short name: ``plain`` (None), ``chain4`` (4 draft tokens in a row), ``16,4,4`` (total, depth, top-k)."""
    if tree is None:
        return "plain"
    if isinstance(tree, DynamicTree):
        if tree.top_k == 1:
            return f"chain{tree.total_tokens}"
        return f"{tree.total_tokens},{tree.depth},{tree.top_k}"
    return type(tree).__name__


def tree_from_key(key: str) -> DynamicTree:
    """The inverse of :func:`tree_key` for dynamic trees (``chain4``, ``16,4,4``)."""
    if key.startswith("chain"):
        n = int(key[len("chain"):])
        return DynamicTree(n, n - 1, 1)
    total, depth, top_k = (int(v) for v in key.split(","))
    return DynamicTree(total, depth, top_k)


def shape_key(tree) -> tuple:
    """What a captured cycle depends on in ``tree``: its kind and sizes (a static tree: its rank paths)."""
    if isinstance(tree, DynamicTree):
        return ("dynamic", tree.total_tokens, tree.depth, tree.top_k)
    if isinstance(tree, StaticTree):
        return ("static", tuple(tuple(c) for c in tree.choices))
    raise TypeError(f"not a draft tree: {tree!r}")
