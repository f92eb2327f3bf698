"""The cost model of ``tree="auto"``: measured milliseconds of a cycle's parts, cached per machine and model.

See :mod:`eagle_runtime.adaptive` for what is measured and how the controller uses it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write_json
from .state import Sampling
from .tree import DynamicTree, default_candidates, fit_kind, tree_from_key, tree_key

COST_VERSION = 6
TARGET_SIZES = [1, 2, 4, 8, 16, 32, 64]
DRAFT_SIZES = [1, 2, 4, 8, 16]
# No timed piece takes 1000 s (a 7B target's forward over 64 tokens is about 1 TFLOP: seconds on a CPU): a cached
# time beyond this is a corrupt entry, not a slow machine.
MAX_MS = 1e6


def cache_dir() -> Path:
    env = os.environ.get("EAGLE_RUNTIME_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eagle_runtime"


# coefficients of a residual fit per kind: a constant, levels, and (trees only; a chain's size is its depth) nodes
N_RESIDUAL_FEATURES = {"chain": 2, "tree": 3}


def _residual_features(tree: DynamicTree) -> tuple:
    """What a cycle's overhead over its parts grows with: levels, and (trees only; a chain's size is its depth)
    the nodes reranked, gathered and masked."""
    return (1.0, float(tree.depth), float(tree.total_tokens))[:N_RESIDUAL_FEATURES[fit_kind(tree)]]


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
        """The inverse of :meth:`to_json`. An entry that is stale or not what :func:`measure_costs` writes is a
        ``ValueError``: tables over other sizes than ``TARGET_SIZES`` / ``DRAFT_SIZES``, times that are not
        numbers in ``[0, MAX_MS]`` (target forwards and whole cycles ``> 0``: rates divide by them), prefixes that
        are not non-negative integers, fit coefficients that are not finite. Each of those would break or steer
        every ``tree="auto"`` run (an empty table is an IndexError in the interpolation, a NaN time leaves no
        candidate to pick) for as long as the entry stays in the file."""
        if not isinstance(d, dict) or d.get("version") != COST_VERSION:
            raise ValueError("stale cost-model entry")
        prefix, long_prefix = _count(d["prefix"], "prefix"), _count(d["long_prefix"], "long_prefix")
        if long_prefix and long_prefix <= prefix:
            raise ValueError(f"long_prefix {long_prefix} is not beyond prefix {prefix}")
        return cls(_table(d["target"], TARGET_SIZES, "target", positive=True),
                   _table(d["draft"], DRAFT_SIZES, "draft"),
                   _table(d["accept_greedy"], TARGET_SIZES, "accept_greedy"),
                   _table(d["accept_sampled"], TARGET_SIZES, "accept_sampled"),
                   str(d.get("key", "")), _time(d.get("measured_s", 0.0), "measured_s"),
                   _time(d["plain_overhead"], "plain_overhead"), prefix,
                   _table(d["target_long"], TARGET_SIZES if long_prefix else [], "target_long", positive=True),
                   long_prefix, _cycles(d["cycles"], "cycles"), _cycles(d["cycles_sampled"], "cycles_sampled"),
                   _fits(d["residual_fit"]))


def _time(v, what: str, positive: bool = False) -> float:
    """A cached time: a number (not bool) in ``[0, MAX_MS]`` (``(0, MAX_MS]`` where ``positive``), else ValueError."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{what} is not a number: {v!r}")
    v = float(v)
    if not ((v > 0 if positive else v >= 0) and v <= MAX_MS):  # NaN fails every comparison
        raise ValueError(f"{what} {v} is not a time in {'(' if positive else '['}0, {MAX_MS}] ms")
    return v


def _count(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
        raise ValueError(f"{what} is not a cache length: {v!r}")
    return v


def _table(t, sizes: list, what: str, positive: bool = False) -> dict:
    """``{size: ms}`` from the JSON ``{"size": ms}`` that :meth:`CostModel.to_json` writes, over exactly ``sizes``
    (the interpolation needs at least two sizes and the sizes timed are fixed for a ``COST_VERSION``)."""
    if not isinstance(t, dict) or sorted(t) != sorted(str(n) for n in sizes):
        raise ValueError(f"{what} is not a table over sizes {sizes}")
    return {n: _time(t[str(n)], f"{what}[{n}]", positive) for n in sizes}


def _cycles(t, what: str) -> dict:
    if not isinstance(t, dict):
        raise ValueError(f"{what} is not a table of trees")
    for key in t:
        if tree_key(tree_from_key(key)) != key:  # tree_from_key raises ValueError for a key it cannot read
            raise ValueError(f"{what}: {key!r} names no tree")
    return {key: _time(ms, f"{what}[{key}]", positive=True) for key, ms in t.items()}


def _fits(t) -> dict:
    """:attr:`CostModel.residual_fit`: one coefficient per feature of its kind, each finite and within MAX_MS."""
    n_features = N_RESIDUAL_FEATURES
    if not isinstance(t, dict):
        raise ValueError("residual_fit is not a table")
    out = {}
    for key, coef in t.items():
        kind, _, mode = str(key).partition("|")
        if kind not in n_features or mode not in ("greedy", "sampled"):
            raise ValueError(f"residual_fit: unknown kind {key!r}")
        if not isinstance(coef, list) or len(coef) != n_features[kind]:
            raise ValueError(f"residual_fit[{key}] is not {n_features[kind]} coefficients")
        for c in coef:
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not abs(c) <= MAX_MS:
                raise ValueError(f"residual_fit[{key}] holds {c!r}")
        out[key] = [float(c) for c in coef]
    return out


def cost_key(decoder, batch: int, sampled_drafts: bool) -> str:
    """What the costs depend on: shapes (configs), device, dtype, batch, backend, threads, torch version, and
    how chains draft at temperature > 0 (``sampled_drafts``: ``cycles_sampled`` times sampled chains)."""
    tgt = decoder.target
    w = tgt.embed_tokens.weight
    dev = torch.cuda.get_device_name(w.device) if w.device.type == "cuda" else f"cpu-{platform.machine()}"
    cfgs = json.dumps([tgt.cfg.raw, decoder.head.cfg.raw if decoder.head is not None else None], sort_keys=True, default=str)
    h = hashlib.sha1(cfgs.encode()).hexdigest()[:16]
    sd = int(bool(sampled_drafts))
    return (f"{h}|{dev}|{w.dtype}|B{batch}|{decoder.ops.name}|threads{torch.get_num_threads()}|torch{torch.__version__}"
            f"|sd{sd}")


def load_costs(key: str, directory: Path | None = None) -> CostModel | None:
    """The cached entry for ``key``, or ``None`` when it is absent, unreadable or invalid (see
    :meth:`CostModel.from_json`): the caller measures again and :func:`save_costs` replaces it."""
    path = (directory or cache_dir()) / "costs.json"
    try:
        entry = json.loads(path.read_text()).get(key)
        cm = CostModel.from_json(entry) if entry else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # absent or unreadable: measure again
    return cm if cm is not None and cm.key == key else None  # an entry filed under another machine's key


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
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data, indent=1)
    except OSError:
        pass  # a read-only home: the model just measures again next time


def measure_costs(decoder, batch: int, sampled_drafts: bool, reps: int = 5) -> CostModel:
    """Time the pieces of a cycle on scratch caches, and whole steps through ``decoder`` (its pool's caches of
    this bucket are used: they are refilled by the next prefill)."""
    tgt, head, ops = decoder.target, decoder.head, decoder.ops
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
        return lambda: tgt.logits(tgt(tok, pos, cache, at, at, mask, ops))

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
            lg = tgt.logits(head(h, tok, tgt, pos, d_cache, L, L, mask, ops))
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
        sp = Sampling.empty(B, dev).fill_(0.0 if greedy else 1.0, 1.0, 0, 0)
        if "state" not in shared:
            prompt = torch.randint(0, V, (B, max(prefix, 1)), generator=g).tolist()
            shared["state"] = decoder.prefill(prompt, sp, head is not None)
        state = shared["state"]
        if tree is None:
            return lambda: decoder.plain_step(state, sp)
        mode = bool(sampled_drafts and not greedy)
        return lambda: decoder.cycle(state, sp, tree, sampled_drafts=mode)

    jobs = {("target", n): tgt_fn(n) for n in TARGET_SIZES}
    if long_prefix:
        at_long = torch.full((B,), long_prefix, dtype=torch.long, device=dev)
        jobs.update({("target_long", n): tgt_fn(n, at_long) for n in TARGET_SIZES})
    jobs[("step", 0)] = step_fn(None)
    if head is not None:  # every default candidate's cycle, whole: its overhead over the parts is measured, not fitted
        for t in default_candidates():
            jobs[("cycle", tree_key(t))] = step_fn(t)
            if fit_kind(t) == "chain" or not sampled_drafts:  # at temperature > 0 only chains run then
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
                   cost_key(decoder, batch, sampled_drafts), time.perf_counter() - t0, prefix=prefix,
                   target_long=table("target_long") if long_prefix else {}, long_prefix=long_prefix,
                   cycles={k: v for (what, k), v in best.items() if what == "cycle"},
                   cycles_sampled={k: v for (what, k), v in best.items() if what == "cycle_sampled"})
    cm.plain_overhead = max(best[("step", 0)] - cm.plain_ms(True), 0.0)
    cm.fit_residuals()
    return cm


def get_costs(decoder, batch: int, sampled_drafts: bool) -> CostModel:
    """The cached cost model for ``model`` at ``batch``, measured (about a second on CPU) if absent."""
    key = cost_key(decoder, batch, sampled_drafts)
    cm = load_costs(key)
    if cm is None:
        cm = measure_costs(decoder, batch, sampled_drafts)
        save_costs(cm)
    return cm
