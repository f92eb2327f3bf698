"""Adaptive speculation (``tree="auto"``): pick the draft tree, or plain decoding, that maximises tokens/s.

Two inputs decide:

* a **cost model** measured once per (target, head, device, dtype, batch size, backend, threads) and cached as
  JSON under ``$EAGLE_RUNTIME_CACHE`` (default ``$XDG_CACHE_HOME/eagle_runtime`` or ``~/.cache/eagle_runtime``):
  the time of a target forward over ``n`` tokens after a cache of 64 and of up to 448 tokens (linearly
  interpolated at the generation's current length: attention over a long prompt makes trees dearer), of a draft
  step over ``k`` nodes (head + logits + top-k) and
  of acceptance over a tree of ``n`` nodes (greedy and sampled), plus a real plain step and a real cycle of
  every default candidate (greedy, and at temperature 1), whose excess over its parts is kept (and fitted per
  kind, chains and trees, for trees not timed); each the fastest of a few interleaved runs (timing noise on a
  shared machine only adds time);
* the **running acceptance** per sampling setting: at every node of an accepted path the tree had ``c``
  children and the target took the child of draft rank ``r`` (or none). ``p[d][r]``, the chance the accepted
  child at depth ``d`` is rank ``r``, is estimated over the nodes that had a rank-``r`` child, with a weak prior,
  shrunk towards the estimate pooled over depths, and decayed so that it follows the text.

A candidate tree's expected tokens per cycle is ``1 + sum over its nodes of prod(p[depth][rank])`` along the
node's path, for the tree that EAGLE-2's expansion would build from those rank probabilities (the ``top_k``
best nodes of each level expand, the ``total_tokens`` best are kept). Its cycle time is
``target(N + 1, L) + depth * draft(top_k) + draft(depth + 2) + accept(N + 1)`` plus the tree's measured (or
fitted) excess over those parts at the calibration length. The best of
``expected tokens / cycle time`` over the candidates (chains and small/medium dynamic trees) is compared with
plain decoding's ``1 / step time`` raised by 8% (the model errs on speculation's side); the current choice is kept
unless another is predicted 7.5% faster (2% between two trees; the estimates wobble; ``tie_band`` below 1 would
take the smallest tree within that fraction of the best), so speculation starts at a predicted 1.16x and stops
below 1.0x. Both levels are corrected by measurement: the ratio of measured to predicted tokens per ms of
the plain steps, and of the cycles, that ran (decayed per step of each kind; CPU only, where a step's wall time
costs no synchronisation; a kind not measured yet borrows the other's ratio) scales plain decoding's rate and
every tree's rate respectively. When plain wins the runtime decodes plainly and probes one speculative cycle after
``probe_every`` plain steps to keep the acceptance estimate current (the gap doubles, up to ``8 *
probe_every``, or ``32 * probe_every`` while the best tree is predicted below 0.8x plain decoding, while probes
keep confirming plain decoding); the plain steps between probes run as one stretch, observed at its end.
Decisions are re-taken every ``decide_every`` speculative steps (every 2 while fewer than 32 path nodes have been
observed) and after every probe.

Everything stays exact: any tree, changed between any two cycles, and plain steps in between give the same
greedy tokens as plain decoding, and sampled tokens from the target's distribution.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from eagle_kernels.reference import GREEDY_TEMPERATURE

from .tree import DynamicTree

COST_VERSION = 6
TARGET_SIZES = [1, 2, 4, 8, 16, 32, 64]
DRAFT_SIZES = [1, 2, 4, 8, 16]


def default_candidates() -> list[DynamicTree]:
    """Chains (``top_k = 1``) of 1-8 draft tokens and small/medium EAGLE-2 trees."""
    chains = [DynamicTree(c, c - 1, 1) for c in (1, 2, 3, 4, 5, 6, 8)]
    trees = [(4, 2, 2), (6, 3, 2), (8, 3, 2), (8, 4, 2), (12, 5, 2), (8, 3, 4), (12, 3, 4), (16, 4, 4),
             (24, 5, 4), (32, 6, 4), (32, 5, 8), (60, 6, 10)]
    return chains + [DynamicTree(*t) for t in trees]


def fit_kind(tree) -> str:
    """``"chain"`` (``top_k == 1``) or ``"tree"``: the groups whose measured / expected tokens per cycle are fitted
    together (:meth:`AcceptStats.tree_factor`)."""
    return "chain" if isinstance(tree, DynamicTree) and tree.top_k == 1 else "tree"


def tree_key(tree) -> str:
    """A short name: ``plain``, ``chain4`` (4 draft tokens in a row), ``16,4,4`` (total, depth, top-k)."""
    if tree is None:
        return "plain"
    if isinstance(tree, DynamicTree):
        if tree.top_k == 1:
            return f"chain{tree.total_tokens}"
        return f"{tree.total_tokens},{tree.depth},{tree.top_k}"
    return type(tree).__name__


# --------------------------------------------------------------------------------------------------------------
# Expected accepted length from rank probabilities
# --------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------
# Acceptance statistics
# --------------------------------------------------------------------------------------------------------------
@dataclass
class AcceptStats:
    """Per draft rank ``r``: how many path nodes had a rank-``r`` child (``tries``) and took it (``hits``)."""

    max_rank: int = 16
    decay: float = 0.995  # per observed node: about the last 200 nodes count
    prior_p: tuple = (0.5, 0.12, 0.05, 0.03)
    prior_weight: float = 2.0
    depths: int = 6  # per-depth estimates for depths 1..depths (the last bucket holds deeper levels)
    depth_weight: float = 8.0  # pseudo-observations pulling a depth's estimate to the pooled one
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
    measure_decay: float = 0.97  # per step of that kind: about the last 30 count
    min_measured: float = 6.0  # decayed steps a kind needs before its ratio is used

    # per kind of tree ("chain" or "tree", see fit_kind): decayed sums of [tokens emitted per row, tokens the rank
    # model expected] over its cycles. The rank model assumes the tree EAGLE-2 builds follows the acceptance odds;
    # it follows the draft's own scores, which a head trained on a broad target distribution spreads thin (wide and
    # shallow trees), while a chain has no choice to get wrong; so each kind is measured against its expectation
    # (AutoController._rates). One factor per kind: the bias is the kind's, and every tree learns from every
    # tree's cycles instead of each being tried in turn
    tree_fit: dict = field(default_factory=dict)
    fit_decay: float = 0.95  # per cycle of any kind: about the last 20 count
    fit_prior: float = 8.0  # tokens of pseudo-observation at the model's expectation (about two cycles)

    def add_cycle(self, key: str, tokens: float, expected: float) -> None:
        """One cycle of a tree of kind ``key`` (:func:`fit_kind`) that emitted ``tokens`` per row where the rank
        model expected ``expected``."""
        # every kind's evidence ages with every cycle, not only with its own: a kind judged on a few early cycles
        # (two poor cycles of a chain at the start of a text once kept chains out for the whole benchmark) drifts
        # back towards the prior while the other runs, until it is tried again
        self.tree_fit.setdefault(key, [0.0, 0.0])
        for f in self.tree_fit.values():
            f[0], f[1] = f[0] * self.fit_decay, f[1] * self.fit_decay
        f = self.tree_fit[key]
        f[0], f[1] = f[0] + tokens, f[1] + expected

    def tree_factor(self, key: str) -> float:
        """Emitted / expected tokens per cycle of kind ``key``, shrunk towards 1, clamped to [0.5, 1.5]."""
        f = self.tree_fit.get(key)
        if not f:
            return 1.0
        return min(max((f[0] + self.fit_prior) / (f[1] + self.fit_prior), 0.5), 1.5)

    def add_step(self, kind: str, tokens: float, predicted_tokens: float) -> None:
        """One step of ``kind`` that emitted ``tokens`` per row where the model predicted ``predicted_tokens``
        for its wall time."""
        m = self.measured.setdefault(kind, [0.0, 0.0, 0.0])
        d = self.measure_decay
        m[0], m[1], m[2] = m[0] * d + tokens, m[1] * d + predicted_tokens, m[2] * d + 1.0

    def measured_ratio(self, kind: str) -> float | None:
        """Measured / predicted tokens per ms of ``kind``, clamped to [0.5, 1.5]; None until enough steps."""
        m = self.measured.get(kind)
        if not m or m[2] < self.min_measured or m[1] <= 0:
            return None
        return min(max(m[0] / m[1], 0.5), 1.5)

    def __post_init__(self):
        self.tries = self.tries or [0.0] * self.max_rank
        self.hits = self.hits or [0.0] * self.max_rank
        self.dtries = self.dtries or [[0.0] * self.max_rank for _ in range(self.depths)]
        self.dhits = self.dhits or [[0.0] * self.max_rank for _ in range(self.depths)]

    def add(self, children: int, taken: int | None, depth: int = 1) -> None:
        """One path node with ``children`` draft children (at tree depth ``depth``), of which rank ``taken`` was
        accepted (or none)."""
        d = self.decay
        b = min(max(depth, 1), self.depths) - 1
        for tries, hits in [(self.tries, self.hits)] + list(zip(self.dtries, self.dhits)):
            for r in range(self.max_rank):
                tries[r] *= d
                hits[r] *= d
        for r in range(min(children, self.max_rank)):
            self.tries[r] += 1.0
            self.dtries[b][r] += 1.0
        if taken is not None and taken < self.max_rank:
            self.hits[taken] += 1.0
            self.dhits[b][taken] += 1.0
        self.nodes += 1

    def p_by_depth(self) -> list[list[float]]:
        """``p`` per depth 1..``depths``, each shrunk towards the pooled :meth:`p` by ``depth_weight``."""
        pooled, w = self.p(), self.depth_weight
        out = []
        for tries, hits in zip(self.dtries, self.dhits):
            q = [(hits[r] + w * pooled[r]) / (tries[r] + w) for r in range(self.max_rank)]
            s = sum(q)
            out.append([v / s for v in q] if s > 1 else q)
        return out

    def p(self) -> list[float]:
        out = []
        for r in range(self.max_rank):
            prior = self.prior_p[r] if r < len(self.prior_p) else self.prior_p[-1] * 0.5 ** (r - len(self.prior_p) + 1)
            out.append((self.hits[r] + self.prior_weight * prior) / (self.tries[r] + self.prior_weight))
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


# --------------------------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    env = os.environ.get("EAGLE_RUNTIME_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eagle_runtime"


def tree_from_key(key: str) -> DynamicTree:
    """The inverse of :func:`tree_key` for dynamic trees (``chain4``, ``16,4,4``)."""
    if key.startswith("chain"):
        n = int(key[len("chain"):])
        return DynamicTree(n, n - 1, 1)
    total, depth, top_k = (int(v) for v in key.split(","))
    return DynamicTree(total, depth, top_k)


def _residual_features(tree: DynamicTree) -> tuple:
    """What a cycle's overhead over its parts grows with: levels, and (trees only; a chain's size is its depth)
    the nodes reranked, gathered and masked."""
    return (1.0, float(tree.depth)) if fit_kind(tree) == "chain" else (1.0, float(tree.depth), float(tree.total_tokens))


def _least_squares(rows: list) -> list:
    """Coefficients minimising the squared error of ``x . c = y`` over ``rows = [(x, y)]`` (the mean alone when
    there are fewer rows than coefficients)."""
    if len(rows) < len(rows[0][0]) + 1:
        return [sum(y for _, y in rows) / len(rows)] + [0.0] * (len(rows[0][0]) - 1)
    X = torch.tensor([x for x, _ in rows], dtype=torch.float64)
    y = torch.tensor([[y] for _, y in rows], dtype=torch.float64)
    return [float(c) for c in torch.linalg.lstsq(X, y, driver="gelsd").solution[:, 0]]


def _interp(table: dict, n: float) -> float:
    xs = sorted(table)
    if n <= xs[0]:
        return table[xs[0]] * max(n, 1) / max(xs[0], 1) if xs[0] > 1 else table[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return table[a] + (table[b] - table[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]  # extrapolate with the last slope
    return table[b] + (table[b] - table[a]) * (n - b) / (b - a)


def _monotone(table: dict) -> dict:
    """Costs grow with size and timing noise only adds time: ``cost[n] = min(measured[m] for m >= n)``."""
    out, low = {}, math.inf
    for n in sorted(table, reverse=True):
        low = min(low, table[n])
        out[n] = low
    return dict(sorted(out.items()))


@dataclass
class CostModel:
    """Measured milliseconds: ``target[n]`` (forward + logits over n tokens), ``draft[k]`` (head over k nodes +
    logits + top-k expansion), ``accept_greedy[n]`` / ``accept_sampled[n]`` (tree buffers, acceptance and KV
    compaction over n nodes), ``sample`` (one plain token, greedy/sampled averaged)."""

    target: dict
    draft: dict
    accept_greedy: dict
    accept_sampled: dict
    key: str = ""
    measured_s: float = 0.0
    plain_overhead: float = 0.0  # a real plain step minus its parts (bookkeeping, rotary tables, ...)
    prefix: int = 64  # the cache length ``target`` was timed at ...
    target_long: dict = field(default_factory=dict)  # ... and the same forwards at ``long_prefix`` (attention
    long_prefix: int = 0  # grows with the prefix times the tree): ``target`` at any length is interpolated
    cycles: dict = field(default_factory=dict)  # tree key -> a real greedy cycle (ms, at ``prefix``) ...
    cycles_sampled: dict = field(default_factory=dict)  # ... and at temperature 1 (chains with sampled drafts)
    residual_fit: dict = field(default_factory=dict)  # "chain"/"tree" + "|greedy"/"|sampled" -> least-squares
    # coefficients of (real cycle - its parts) on (1, depth, total tokens): the overhead of a tree not timed

    def target_ms(self, n: int, L: float | None = None) -> float:
        """A target forward over ``n`` tokens after a prefix of ``L`` (None: the calibration prefix)."""
        t = _interp(self.target, n)
        if L is None or not self.target_long or self.long_prefix <= self.prefix:
            return t
        slope = (_interp(self.target_long, n) - t) / (self.long_prefix - self.prefix)
        return max(t + slope * (L - self.prefix), 0.5 * t)

    def plain_ms(self, greedy: bool, L: float | None = None) -> float:
        return (self.target_ms(1, L) + _interp(self.accept_greedy if greedy else self.accept_sampled, 1)
                + self.plain_overhead)

    def parts_ms(self, tree: DynamicTree, greedy: bool, L: float | None = None) -> float:
        """The sum of a cycle's timed parts: ``depth`` head passes over ``top_k`` nodes, the head's re-read of the
        accepted path (``depth + 2`` nodes; it also stands for the root's top-k expansion), verification and
        acceptance."""
        n = tree.total_tokens + 1
        acc = self.accept_greedy if greedy else self.accept_sampled
        return (self.target_ms(n, L) + tree.depth * _interp(self.draft, tree.top_k)
                + _interp(self.draft, tree.depth + 2) + _interp(acc, n))

    def residual_ms(self, tree: DynamicTree, greedy: bool) -> float:
        """A real cycle minus its parts at the calibration prefix: measured for the trees timed whole, else the
        least-squares fit over the timed trees of its kind (chains and trees differ: a chain drafts by argmax,
        a tree pays top-k expansion, reranking and bigger buffers per level)."""
        table = self.cycles if greedy else self.cycles_sampled
        key = tree_key(tree)
        if key in table:
            return table[key] - self.parts_ms(tree, greedy)
        coef = self.residual_fit.get(f"{fit_kind(tree)}|{'greedy' if greedy else 'sampled'}")
        if not coef:
            return 0.0
        return sum(c * x for c, x in zip(coef, _residual_features(tree)))

    def cycle_ms(self, tree: DynamicTree, greedy: bool, L: float | None = None) -> float:
        """One cycle of ``tree`` after a prefix of ``L``: its parts at ``L`` plus its overhead over them."""
        parts = self.parts_ms(tree, greedy, L)
        return max(parts + self.residual_ms(tree, greedy), 0.5 * parts)

    def fit_residuals(self) -> None:
        """Fit :attr:`residual_fit` from the timed cycles (per kind and sampling mode)."""
        self.residual_fit = {}
        for greedy, table in ((True, self.cycles), (False, self.cycles_sampled)):
            groups: dict = {}
            for key, ms in table.items():
                tree = tree_from_key(key)
                excess = ms - self.parts_ms(tree, greedy)
                groups.setdefault(fit_kind(tree), []).append((_residual_features(tree), excess))
            for kind, rows in groups.items():
                self.residual_fit[f"{kind}|{'greedy' if greedy else 'sampled'}"] = _least_squares(rows)

    def to_json(self) -> dict:
        enc = lambda t: {str(k): v for k, v in t.items()}  # noqa: E731
        return {"version": COST_VERSION, "key": self.key, "measured_s": self.measured_s, "target": enc(self.target),
                "draft": enc(self.draft), "accept_greedy": enc(self.accept_greedy),
                "accept_sampled": enc(self.accept_sampled), "plain_overhead": self.plain_overhead,
                "prefix": self.prefix, "target_long": enc(self.target_long), "long_prefix": self.long_prefix,
                "cycles": dict(self.cycles), "cycles_sampled": dict(self.cycles_sampled),
                "residual_fit": {k: list(v) for k, v in self.residual_fit.items()}}

    @classmethod
    def from_json(cls, d: dict) -> "CostModel":
        if d.get("version") != COST_VERSION:
            raise ValueError("stale cost-model entry")
        dec = lambda t: {int(k): float(v) for k, v in t.items()}  # noqa: E731
        keyed = lambda t: {str(k): float(v) for k, v in t.items()}  # noqa: E731
        return cls(dec(d["target"]), dec(d["draft"]), dec(d["accept_greedy"]), dec(d["accept_sampled"]),
                   str(d.get("key", "")), float(d.get("measured_s", 0.0)), float(d["plain_overhead"]),
                   int(d["prefix"]), dec(d["target_long"]), int(d["long_prefix"]), keyed(d["cycles"]),
                   keyed(d["cycles_sampled"]),
                   {str(k): [float(c) for c in v] for k, v in d["residual_fit"].items()})


def cost_key(model, batch: int) -> str:
    """What the costs depend on: shapes (configs), device, dtype, batch, backend, threads, torch version."""
    tgt = model.target
    w = tgt.embed_tokens.weight
    dev = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else f"cpu-{platform.machine()}"
    cfgs = json.dumps([tgt.cfg.raw, model.head.cfg.raw if model.head is not None else None], sort_keys=True, default=str)
    h = hashlib.sha1(cfgs.encode()).hexdigest()[:16]
    sd = int(bool(model.sampled_drafts))  # how chains draft at temperature > 0 (cycles_sampled)
    return (f"{h}|{dev}|{w.dtype}|B{batch}|{model.ops.name}|threads{torch.get_num_threads()}|torch{torch.__version__}"
            f"|sd{sd}")


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_costs(key: str, directory: Path | None = None) -> CostModel | None:
    path = (directory or cache_dir()) / "costs.json"
    try:
        entry = json.loads(path.read_text()).get(key)
        return CostModel.from_json(entry) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or unreadable: measure again


def save_costs(cm: CostModel, directory: Path | None = None) -> None:
    path = (directory or cache_dir()) / "costs.json"
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[cm.key] = cm.to_json()
    try:
        _write_json_atomic(path, data)
    except OSError:
        pass  # a read-only home: the model just measures again next time


def measure_costs(model, batch: int, reps: int = 5) -> CostModel:
    """Time the pieces of a cycle on scratch caches (the model's own caches are not touched)."""
    tgt, head, ops = model.target, model.head, model.ops
    w = tgt.embed_tokens.weight
    dev, B, V = w.device, batch, tgt.cfg.vocab_size
    prefix = min(64, max(tgt.max_len - 2 * max(TARGET_SIZES) - 2, 0))
    # a second, long prefix (up to 448, within the context) for the attention's share of a forward
    long_prefix = min(448, tgt.max_len - max(TARGET_SIZES) - 2)
    long_prefix = long_prefix if long_prefix >= prefix + 64 else 0
    g = torch.Generator(device="cpu").manual_seed(0)
    cache = tgt.new_cache(B, max(prefix, long_prefix) + max(TARGET_SIZES) + 2)
    L = torch.full((B,), prefix, dtype=torch.long, device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def timed(fn) -> float:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - t0) * 1e3

    def tgt_fn(n, at=L):
        tok = torch.randint(0, V, (B, n), generator=g).to(dev)
        mask = torch.ones(n, n, dtype=torch.bool, device=dev).tril().expand(B, n, n)
        pos = at[:, None] + torch.arange(n, device=dev)
        return lambda: tgt.logits(tgt(tok, pos, cache, at, at, mask))

    def draft_fn(k):
        if head is None:
            return lambda: None
        d_cache = head.new_cache(B, prefix + max(DRAFT_SIZES) + 2)
        h = torch.randn(B, k, tgt.cfg.hidden_size, generator=g).to(dev, w.dtype)
        tok = torch.randint(0, V, (B, k), generator=g).to(dev)
        mask = torch.eye(k, dtype=torch.bool, device=dev).expand(B, k, k)
        pos = L[:, None].expand(B, k)
        zeros = torch.zeros(B, k, device=dev)

        def run():
            lg = tgt.logits(head(h, tok, tgt, pos, d_cache, L, L, mask))
            ops.topk_expand(lg, zeros, min(4, V), out_k=min(4, V))

        return run

    def accept_fn(n, greedy):
        parents = torch.tensor([-1] + [(i - 1) // 2 for i in range(1, n)], device=dev).expand(B, n).contiguous()
        logits = torch.randn(B, n, V, generator=g).to(dev)
        tokens = torch.randint(0, V, (B, n), generator=g).to(dev)
        temp = torch.full((B,), 0.0 if greedy else 1.0, device=dev)
        top_p, top_k = torch.ones(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev)
        seed, off = torch.tensor(0, device=dev), torch.tensor(0, device=dev)
        kv = torch.zeros(2, B, 1, prefix + n + 1, 1, dtype=w.dtype, device=dev)

        def run():
            bufs = ops.build_tree_buffers(parents, n - 1)
            if n == 1:
                ops.sample_tokens(logits[:, 0], temp, top_p, top_k, seed, off)
            else:
                acc = ops.accept_tree(logits, tokens, parents, temp, top_p, top_k, seed, off)
                ops.kv_compact(kv, L, acc.accept_path, acc.accept_len)
            return bufs

        return run

    shared: dict = {}

    def step_fn(tree, greedy=True):
        """A real plain step (``tree`` None) or cycle, greedy or at temperature 1 (chains then draft by sampling when
        the model does). Neither commits (both only read the state and write scratch slots past its length), so
        every job runs on one state prefilled with a random prompt: one set of caches, not one per job (a 7B
        target's cache at 4096 positions is 2 GiB)."""
        from .generate import _Sampling

        temp = torch.full((B,), 0.0 if greedy else 1.0, device=dev)
        sp = _Sampling(temp, torch.ones(B, device=dev), torch.zeros(B, dtype=torch.long, device=dev),
                       torch.tensor(0, device=dev), torch.tensor(0, device=dev))
        if "state" not in shared:
            prompt = torch.randint(0, V, (B, max(prefix, 1)), generator=g).tolist()
            shared["state"] = model._prefill(prompt, sp, head is not None)
        state = shared["state"]
        if tree is None:
            return lambda: model._plain_step(state, sp)
        mode = bool(model.sampled_drafts and not greedy)

        def run():
            before, model._sampled_drafts_now = model._sampled_drafts_now, mode
            try:
                model._cycle(state, sp, tree)
            finally:
                model._sampled_drafts_now = before

        return run

    jobs = {("target", n): tgt_fn(n) for n in TARGET_SIZES}
    if long_prefix:
        at_long = torch.full((B,), long_prefix, dtype=torch.long, device=dev)
        jobs.update({("target_long", n): tgt_fn(n, at_long) for n in TARGET_SIZES})
    jobs[("step", 0)] = step_fn(None)
    if head is not None:  # every default candidate's cycle, whole: its overhead over the parts is measured, not fitted
        for t in default_candidates():
            jobs[("cycle", tree_key(t))] = step_fn(t)
            if fit_kind(t) == "chain" or not model.sampled_drafts:  # at temperature > 0 only chains run then
                jobs[("cycle_sampled", tree_key(t))] = step_fn(t, greedy=False)
    jobs.update({("draft", k): draft_fn(k) for k in DRAFT_SIZES})
    for n in TARGET_SIZES:
        jobs[("accept_greedy", n)] = accept_fn(n, True)
        jobs[("accept_sampled", n)] = accept_fn(n, False)
    t0 = time.perf_counter()
    best: dict = {}
    with torch.inference_mode():
        for fn in jobs.values():  # warm-up
            fn()
        for _ in range(reps):  # interleaved, fastest of reps: robust to other jobs on the machine
            for key, fn in jobs.items():
                best[key] = min(best.get(key, math.inf), timed(fn))
    table = lambda name: _monotone({n: best[(name, n)] for (what, n) in best if what == name})  # noqa: E731
    cm = CostModel(table("target"), table("draft"), table("accept_greedy"), table("accept_sampled"),
                   cost_key(model, batch), time.perf_counter() - t0, prefix=prefix,
                   target_long=table("target_long") if long_prefix else {}, long_prefix=long_prefix,
                   cycles={k: v for (what, k), v in best.items() if what == "cycle"},
                   cycles_sampled={k: v for (what, k), v in best.items() if what == "cycle_sampled"})
    cm.plain_overhead = max(best[("step", 0)] - cm.plain_ms(True), 0.0)
    cm.fit_residuals()
    return cm


def get_costs(model, batch: int) -> CostModel:
    """The cached cost model for ``model`` at ``batch``, measured (about a second on CPU) if absent."""
    key = cost_key(model, batch)
    cm = load_costs(key)
    if cm is None:
        cm = measure_costs(model, batch)
        save_costs(cm)
    return cm


# --------------------------------------------------------------------------------------------------------------
# The tree spec and the per-generation controller
# --------------------------------------------------------------------------------------------------------------
class AutoTree:
    """``tree="auto"``: the runtime picks a candidate (or plain decoding) per cycle; see the module docstring.

    Args:
        candidates: the trees to choose from (default :func:`default_candidates`).
        probe_every: plain steps between probing speculative cycles while plain decoding wins.
        decide_every: steps between re-decisions.
        schedule: a test hook ``f(step) -> tree or None``; when given it replaces the choice (``None`` = plain).
    """

    def __init__(self, candidates: list | None = None, probe_every: int = 32, decide_every: int = 16,
                 schedule: Callable | None = None):
        self.candidates = list(candidates or default_candidates())
        if not self.candidates:
            raise ValueError("auto tree needs at least one candidate")
        self.probe_every, self.decide_every, self.schedule = probe_every, decide_every, schedule
        self.max_depth = max(t.max_depth for t in self.candidates)
        self.num_nodes = max(t.num_nodes for t in self.candidates)
        self.stats: dict = {}  # sampling setting -> AcceptStats (kept across generate calls)
        self.costs: dict = {}  # (batch size, model.sampled_drafts) -> CostModel (cost_key names both)
        self.switch_margin = 0.93  # plain <-> speculation: another must be predicted 7.5% faster
        self.tree_switch_margin = 0.98  # one tree -> another: 2%
        self.spec_margin = 1.08  # with the hysteresis: plain -> a tree at 1.16x plain's rate, back below 1.0x
        self.backoff, self.far_backoff, self.far_ratio = 8, 32, 0.8  # probe gap caps (x probe_every), see observe
        self.tie_band = 1.0  # 1: the best predicted tree (0.97 took the smallest within 3%, which kept chains short and
        # their deep levels unobserved: MT-bench auto at temperature 0 1.84-1.86x against 2.14x on one calibration)

    def draft_slots(self) -> int:
        return max(t.draft_slots() for t in self.candidates)

    def controller(self, model, batch: int, temperature: float, top_p: float, top_k: int,
                   prefix: int | None = None) -> "AutoController":
        """The chooser for one ``generate`` call; ``prefix``: the longest prompt (costs grow with the cache)."""
        ckey = (batch, bool(model.sampled_drafts))  # toggling sampled_drafts must not reuse the other mode's chains
        if ckey not in self.costs and self.schedule is None:  # a forced schedule needs no costs
            self.costs[ckey] = get_costs(model, batch)
        sampled = bool(getattr(model, "_sampled_drafts_now", False))
        key = (round(float(temperature), 3), round(float(top_p), 3), int(top_k), sampled)
        stats = self.stats.setdefault(key, AcceptStats())
        # sampled chains accept about sum min(p, q) per draft, deterministic trees p(draft): at temperature > 0 the
        # chains win, and mixing both kinds in one acceptance estimate would rate the trees by the chains' rate
        chains = [t for t in self.candidates if fit_kind(t) == "chain"]
        cands = chains if sampled and chains else self.candidates
        return AutoController(self, self.costs.get(ckey), stats, batch, temperature < GREEDY_TEMPERATURE, prefix,
                              candidates=cands)

    def __repr__(self) -> str:
        return f"AutoTree({len(self.candidates)} candidates)"


class AutoController:
    """Chooses each step's tree during one ``generate`` call and records what it chose."""

    def __init__(self, auto: AutoTree, costs: CostModel, stats: AcceptStats, batch: int, greedy: bool,
                 prefix: int | None = None, candidates: list | None = None):
        self.auto, self.costs, self.stats, self.batch, self.greedy = auto, costs, stats, batch, greedy
        self.candidates = list(candidates or auto.candidates)
        self.prefix = prefix  # the cache length now (host-side estimate: prompt + emitted tokens per row)
        self.correction = 1.0  # the measured / predicted ratios of speculation over plain decoding (see _rates)
        self._pred: dict = {}  # the model's latest tokens per ms by tree key (before the measured level correction)
        self._exp: dict = {}  # the rank model's expected tokens per cycle by tree key (before its kind's factor)
        self.step = 0
        self.choice = None
        self.best_spec = self.candidates[0]
        self.counts: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.last_rates: dict[str, float] = {}
        self.wall_ms: dict[str, float] = {}
        if costs is not None:
            self._decide()

    def _rates(self) -> list[tuple]:
        """``[(tree or None, predicted tokens per ms)]``, plain first.

        The model's rates are corrected by what the steps measured: plain decoding's by the measured / predicted
        ratio of the plain steps that ran, every tree's by that of the speculative cycles that ran (each kind's
        ratio decays with its own steps, so it outlives a stretch of the other kind). The model still ranks the
        trees; the measurements set the level of speculation against plain decoding, where a model error
        (acceptance overestimated, a cycle dearer than its parts) costs the most."""
        p = self.stats.p_by_depth()
        L = self.prefix
        self._pred = {"plain": 1.0 / self.costs.plain_ms(self.greedy, L)}
        for t in self.candidates:
            key = tree_key(t)
            self._exp[key] = expected_tokens(t, p)
            self._pred[key] = self._exp[key] * self.stats.tree_factor(fit_kind(t)) / self.costs.cycle_ms(t, self.greedy, L)
        cp, cs = self.stats.measured_ratio("plain"), self.stats.measured_ratio("spec")
        # a kind not measured yet is assumed off by as much as the other: a machine slower than at calibration
        # slows both, so one kind's ratio alone must not flip the choice
        cp, cs = cp or cs or 1.0, cs or cp or 1.0
        self.correction = cs / cp
        return [(None, self._pred["plain"] * cp)] + [(t, self._pred[tree_key(t)] * cs) for t in self.candidates]

    def _decide(self) -> None:
        rates = self._rates()
        top = max(r for _, r in rates[1:])
        # within tie_band of the best, the smallest tree (tie_band 1: the best)
        self.best_spec, best = min(((t, r) for t, r in rates[1:] if r >= self.auto.tie_band * top),
                                   key=lambda tr: (tr[0].num_nodes, tr[0].max_depth))
        plain = rates[0][1] * self.auto.spec_margin  # speculation must promise more than plain decoding: its
        if plain >= best:                             # model errs on the optimistic side, plain decoding cannot
            best_choice, best = None, plain
        else:
            best_choice = self.best_spec
        current = plain if self.choice is None else next((r for t, r in rates if t is self.choice), 0.0)
        # hysteresis: the estimates wobble. Between plain decoding and speculation a wrong switch costs (a probe's
        # catch-up, a measured level that lags); between two trees it costs next to nothing, while a wide margin
        # there can lock in a choice made on early estimates
        same_mode = (self.choice is None) == (best_choice is None)
        margin = self.auto.tree_switch_margin if same_mode else self.auto.switch_margin
        if current < margin * best:
            self.choice = best_choice
        if self.choice is not None:
            self.best_spec = self.choice
        self.last_rates = {tree_key(t): 1e3 * r for t, r in rates}

    def _probe_gap(self) -> int:
        st = self.stats
        return st.probe_gap or (self.auto.probe_every if st.nodes >= 16 else max(self.auto.probe_every // 4, 1))

    def next_tree(self):
        """The tree for this step, or ``None`` for a plain step."""
        if self.auto.schedule is not None:
            return self.auto.schedule(self.step)
        if self.choice is not None:  # while plain decoding wins, only probes bring news
            every = self.auto.decide_every if self.stats.nodes >= 32 else 2
            if self.step and self.step % every == 0:
                self._decide()
        if self.choice is None and self.stats.plain_run >= self._probe_gap():
            return self.best_spec
        return self.choice

    def plain_steps_ahead(self) -> int:
        """After :meth:`next_tree` returned ``None``: how many plain steps (this one included) come before anything
        can change (the next probe), so the caller may run them as one stretch and :meth:`observe` them at once."""
        if self.auto.schedule is not None or self.choice is not None:
            return 1
        return max(self._probe_gap() - self.stats.plain_run, 1)

    def observe(self, tree, n_tokens: int, wall_ms: float | None, observations=(), steps: int = 1) -> None:
        """After a step: what it emitted (row 0..B-1 total), its wall time (None: unknown) and path nodes; or after
        a stretch of ``steps`` plain steps, their total tokens and wall time (each counted as the stretch's mean)."""
        if steps > 1 and tree is not None:
            raise ValueError("only plain steps are observed as a stretch")
        key = tree_key(tree)
        st = self.stats
        self.counts[key] = self.counts.get(key, 0) + steps
        self.tokens[key] = self.tokens.get(key, 0) + n_tokens
        if wall_ms is not None:
            self.wall_ms[key] = self.wall_ms.get(key, 0.0) + wall_ms
        pred = self._pred.get(key) if wall_ms is not None else None
        per_tokens = n_tokens / self.batch / steps
        for _ in range(steps):
            self.step += 1
            if self.prefix is not None:
                self.prefix += per_tokens
            if pred is not None and self.step > 8:  # a call's first steps pay one-off costs (allocation, caches)
                st.add_step("plain" if tree is None else "spec", per_tokens, pred * wall_ms / steps)
        st.plain_run = st.plain_run + steps if tree is None else 0
        for c, r, d in observations:
            st.add(c, r, d)
        if tree is not None and key in self._exp:
            st.add_cycle(fit_kind(tree), n_tokens / self.batch, self._exp[key])
        if tree is not None and self.choice is None and self.auto.schedule is None and self.costs is not None:
            self._decide()  # a probe: decide again with its news; back off while plain keeps winning
            base = self.auto.probe_every
            if self.choice is None:
                # far from paying (the best tree predicted below 0.8x plain decoding): back off further, each probe
                # costs a cycle and the head's catch-up (stories260k: 2% of the time at a cap of 8x)
                plain_rate = self.last_rates.get("plain", 0.0)
                far = self.last_rates.get(tree_key(self.best_spec), 0.0) < self.auto.far_ratio * plain_rate
                cap = (self.auto.far_backoff if far else self.auto.backoff) * base
                st.probe_gap = min(2 * (st.probe_gap or base), cap)
            else:
                st.probe_gap = 0

    def summary(self) -> dict:
        steps = sum(self.counts.values())
        return {
            "mode": "auto",
            "steps": dict(self.counts),
            "tokens": dict(self.tokens),
            "plain_fraction": self.counts.get("plain", 0) / steps if steps else 0.0,
            "last_choice": tree_key(self.choice),
            "rank_accept_p": [round(v, 4) for v in self.stats.p()[:4]],
            "tree_factors": {k: round(self.stats.tree_factor(k), 3) for k in self.stats.tree_fit},
            "measured_over_predicted": round(self.correction, 3),
            "wall_ms": {k: round(v, 1) for k, v in self.wall_ms.items()},
            "predicted_tokens_per_s": {k: round(v, 1) for k, v in sorted(self.last_rates.items(), key=lambda kv: -kv[1])[:5]},
        }
