"""The running acceptance of ``tree="auto"``: draft-rank acceptance by depth, and the expected tokens per cycle
of a candidate tree from it (see :mod:`eagle_runtime.adaptive` for how the controller uses them)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .auto_config import AutoConfig
from .tree import DynamicTree


def expected_tokens(tree: DynamicTree, p) -> float:
    """Tokens per cycle (accepted + bonus) of ``tree`` when the accepted child has draft rank ``r`` w.p. ``p[r]``
    (``p`` a list of floats, or one such list per depth 1, 2, ..., the last repeated for deeper levels).

    Node value = probability that the node lies on the accepted path = product of ``p[rank]`` along its path;
    the tree is the one EAGLE-2 builds when the draft's scores are those values.
    """
    per_depth = p if isinstance(p[0], (list, tuple)) else [p]
    K = tree.top_k

    def level(d):  # rank probabilities of the children at depth d (1-based)
        q = per_depth[min(d, len(per_depth)) - 1]
        return [q[r] if r < len(q) else 0.0 for r in range(K)]

    if K == 1:  # a chain: 1 + p1 + p1 p2 + ...
        total, v = 1.0, 1.0
        for d in range(1, tree.total_tokens + 1):
            v *= level(d)[0]
            total += v
        return total
    pr = level(1)
    pool = list(pr)
    frontier = sorted(pr, reverse=True)[:K]
    for s in range(tree.depth):
        q = level(s + 2)
        kids = [v * x for v in frontier for x in q]
        pool += kids
        frontier = sorted(kids, reverse=True)[:K]
    pool.sort(reverse=True)
    return 1.0 + sum(pool[: tree.total_tokens])



@dataclass
class AcceptStats:
    """Per draft rank ``r``: how many path nodes had a rank-``r`` child (``tries``) and took it (``hits``).
    Its tunables (decays, priors) are :class:`~eagle_runtime.auto_config.AutoConfig`'s."""

    config: AutoConfig = field(default_factory=AutoConfig)

    tries: list = field(default_factory=list)
    hits: list = field(default_factory=list)
    dtries: list = field(default_factory=list)
    dhits: list = field(default_factory=list)
    nodes: int = 0
    plain_run: int = 0  # plain steps since the last speculative one (kept across generate calls)
    probe_gap: int = 0  # current probing gap (0: not yet set)
    # measured against predicted, per kind ("plain", "spec"): decayed sums of [tokens emitted per row, tokens the
    # model predicted for the same wall time, steps]; the ratio corrects the model (AutoController._rates)
    measured: dict = field(default_factory=dict)

    # per kind of tree ("chain" or "tree", see fit_kind): decayed sums of [tokens emitted per row, tokens the rank
    # model expected] over its cycles. The rank model assumes the tree EAGLE-2 builds follows the acceptance odds;
    # it follows the draft's own scores, which a head trained on a broad target distribution spreads thin (wide and
    # shallow trees), while a chain has no choice to get wrong; so each kind is measured against its expectation
    # (AutoController._rates). One factor per kind: the bias is the kind's, and every tree learns from every
    # tree's cycles instead of each being tried in turn
    tree_fit: dict = field(default_factory=dict)

    def add_cycle(self, key: str, tokens: float, expected: float) -> None:
        """One cycle of a tree of kind ``key`` (:func:`fit_kind`) that emitted ``tokens`` per row where the rank
        model expected ``expected``."""
        # every kind's evidence ages with every cycle, not only with its own: a kind judged on a few early cycles
        # (two poor cycles of a chain at the start of a text once kept chains out for the whole benchmark) drifts
        # back towards the prior while the other runs, until it is tried again
        self.tree_fit.setdefault(key, [0.0, 0.0])
        for f in self.tree_fit.values():
            f[0], f[1] = f[0] * self.config.fit_decay, f[1] * self.config.fit_decay
        f = self.tree_fit[key]
        f[0], f[1] = f[0] + tokens, f[1] + expected

    def tree_factor(self, key: str) -> float:
        """Emitted / expected tokens per cycle of kind ``key``, shrunk towards 1, clamped to [0.5, 1.5]."""
        f = self.tree_fit.get(key)
        if not f:
            return 1.0
        return min(max((f[0] + self.config.fit_prior) / (f[1] + self.config.fit_prior), 0.5), 1.5)

    def add_step(self, kind: str, tokens: float, predicted_tokens: float) -> None:
        """One step of ``kind`` that emitted ``tokens`` per row where the model predicted ``predicted_tokens``
        for its wall time."""
        m = self.measured.setdefault(kind, [0.0, 0.0, 0.0])
        d = self.config.measure_decay
        m[0], m[1], m[2] = m[0] * d + tokens, m[1] * d + predicted_tokens, m[2] * d + 1.0

    def measured_ratio(self, kind: str) -> float | None:
        """Measured / predicted tokens per ms of ``kind``, clamped to [0.5, 1.5]; None until enough steps."""
        m = self.measured.get(kind)
        if not m or m[2] < self.config.min_measured or m[1] <= 0:
            return None
        return min(max(m[0] / m[1], 0.5), 1.5)

    def __post_init__(self):
        self.tries = self.tries or [0.0] * self.config.max_rank
        self.hits = self.hits or [0.0] * self.config.max_rank
        self.dtries = self.dtries or [[0.0] * self.config.max_rank for _ in range(self.config.depths)]
        self.dhits = self.dhits or [[0.0] * self.config.max_rank for _ in range(self.config.depths)]

    def add(self, children: int, taken: int | None, depth: int = 1) -> None:
        """One path node with ``children`` draft children (at tree depth ``depth``), of which rank ``taken`` was
        accepted (or none)."""
        d = self.config.decay
        b = min(max(depth, 1), self.config.depths) - 1
        for tries, hits in [(self.tries, self.hits)] + list(zip(self.dtries, self.dhits)):
            for r in range(self.config.max_rank):
                tries[r] *= d
                hits[r] *= d
        for r in range(min(children, self.config.max_rank)):
            self.tries[r] += 1.0
            self.dtries[b][r] += 1.0
        if taken is not None and taken < self.config.max_rank:
            self.hits[taken] += 1.0
            self.dhits[b][taken] += 1.0
        self.nodes += 1

    def p_by_depth(self) -> list[list[float]]:
        """``p`` per depth 1..``depths``, each shrunk towards the pooled :meth:`p` by ``depth_weight``."""
        pooled, w = self.p(), self.config.depth_weight
        out = []
        for tries, hits in zip(self.dtries, self.dhits):
            q = [(hits[r] + w * pooled[r]) / (tries[r] + w) for r in range(self.config.max_rank)]
            s = sum(q)
            out.append([v / s for v in q] if s > 1 else q)
        return out

    def p(self) -> list[float]:
        out = []
        for r in range(self.config.max_rank):
            prior = self.config.prior_p[r] if r < len(self.config.prior_p) else self.config.prior_p[-1] * 0.5 ** (r - len(self.config.prior_p) + 1)
            out.append((self.hits[r] + self.config.prior_weight * prior) / (self.tries[r] + self.config.prior_weight))
        # ranks are chances of disjoint events: keep their sum at most 1
        s = sum(out)
        return [v / s for v in out] if s > 1 else out


def path_observations(parents: torch.Tensor, accept_path: torch.Tensor, accept_len: torch.Tensor, rows: int):
    """``(children, taken_rank, children's depth)`` for every node on each row's accepted path (the last node:
    taken None)."""
    B, T = parents.shape
    dev = parents.device
    par = parents.clamp(min=0)
    is_child = parents >= 0
    nchild = torch.zeros(B, T, dtype=torch.long, device=dev).scatter_add_(1, par, is_child.long())
    same = (parents[:, :, None] == parents[:, None, :]) & torch.ones(T, T, dtype=torch.bool, device=dev).tril(-1)
    rank = same.sum(-1)
    path = accept_path.clamp(min=0)
    W = path.shape[1]
    obs_c = nchild.gather(1, path).tolist()
    obs_r = rank.gather(1, path).tolist()
    lens = accept_len.tolist()
    out = []
    for b in range(min(rows, B)):
        n = lens[b]
        for j in range(min(n + 1, W)):
            out.append((obs_c[b][j], obs_r[b][j + 1] if j < n else None, j + 1))
    return out
