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
plain decoding's ``1 / step time`` raised by ``spec_margin`` (the model errs on speculation's side); the current
choice is kept unless another is predicted faster by ``switch_margin`` (``tree_switch_margin`` between two trees:
the estimates wobble). Both levels are corrected by measurement: the ratio of measured to predicted tokens per ms
of the plain stretches, and of the cycles, that ran (each timed whole, with a device sync at its end on CUDA; a
kind not measured yet borrows the other's ratio) scales plain decoding's rate and every tree's rate
respectively. When plain wins the runtime decodes plainly and probes one speculative cycle after ``probe_every``
plain steps to keep the acceptance estimate current (the gap doubles while probes keep confirming plain
decoding, up to ``backoff`` or, far from paying, ``far_backoff`` times ``probe_every``); the plain steps between
probes run as one stretch. Decisions are re-taken every ``decide_every`` speculative steps and after every probe.
Every number named here is a field of :class:`~eagle_runtime.auto_config.AutoConfig`, with its default and why.

On CUDA each pick replays its own graph (:mod:`eagle_runtime.graphs`), captured the first time it is picked.

Everything stays exact: any tree, changed between any two cycles, and plain steps in between give the same
greedy tokens as plain decoding, and sampled tokens from the target's distribution.
"""

from __future__ import annotations

from typing import Callable

from eagle_kernels.reference import GREEDY_TEMPERATURE

from .accept_stats import AcceptStats, expected_tokens, path_observations
from .auto_config import AutoConfig
from .costs import CostModel, get_costs
from .tree import DynamicTree, StaticTree, default_candidates, fit_kind, tree_key


class AutoTree:
    """``tree="auto"``: the runtime picks a candidate (or plain decoding) per cycle; see the module docstring.

    Args:
        candidates: the trees to choose from (default :func:`~eagle_runtime.tree.default_candidates`).
        config: the tunables (:class:`~eagle_runtime.auto_config.AutoConfig`).
        schedule: a test hook ``f(step) -> tree or None``; when given it replaces the choice (``None`` = plain).
    """

    def __init__(self, candidates: list | None = None, config: AutoConfig | None = None,
                 schedule: Callable | None = None):
        self.candidates = list(candidates or default_candidates())
        if not self.candidates:
            raise ValueError("auto tree needs at least one candidate")
        self.config = config or AutoConfig()
        self.schedule = schedule
        self.max_depth = max(t.max_depth for t in self.candidates)
        self.num_nodes = max(t.num_nodes for t in self.candidates)
        self.stats: dict = {}  # sampling setting -> AcceptStats (kept across generate calls)
        self.costs: dict = {}  # (batch size, sampled drafts) -> CostModel (cost_key names both)

    def draft_slots(self) -> int:
        return max(t.draft_slots() for t in self.candidates)

    def controller(self, model, batch: int, temperature: float, top_p: float, top_k: int,
                   prefix: int | None = None, sampled: bool = False) -> "AutoController":
        """The chooser for one ``generate`` call of ``model`` (an :class:`~eagle_runtime.generate.EagleModel`);
        ``prefix``: the longest prompt (costs grow with the cache); ``sampled``: chains draft by sampling in this
        call (temperature > 0 and ``model.sampled_drafts``)."""
        ckey = (batch, bool(model.sampled_drafts))  # toggling sampled_drafts must not reuse the other mode's chains
        if ckey not in self.costs and self.schedule is None:  # a forced schedule needs no costs
            self.costs[ckey] = get_costs(model.decoder, batch, bool(model.sampled_drafts))
        key = (round(float(temperature), 3), round(float(top_p), 3), int(top_k), bool(sampled))
        stats = self.stats.setdefault(key, AcceptStats(self.config))
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
        self.best_spec, best = min(((t, r) for t, r in rates[1:] if r >= self.auto.config.tie_band * top),
                                   key=lambda tr: (tr[0].num_nodes, tr[0].max_depth))
        plain = rates[0][1] * self.auto.config.spec_margin  # speculation must promise more than plain decoding: its
        if plain >= best:                             # model errs on the optimistic side, plain decoding cannot
            best_choice, best = None, plain
        else:
            best_choice = self.best_spec
        current = plain if self.choice is None else next((r for t, r in rates if t is self.choice), 0.0)
        # hysteresis: the estimates wobble. Between plain decoding and speculation a wrong switch costs (a probe's
        # catch-up, a measured level that lags); between two trees it costs next to nothing, while a wide margin
        # there can lock in a choice made on early estimates
        same_mode = (self.choice is None) == (best_choice is None)
        margin = self.auto.config.tree_switch_margin if same_mode else self.auto.config.switch_margin
        if current < margin * best:
            self.choice = best_choice
        if self.choice is not None:
            self.best_spec = self.choice
        self.last_rates = {tree_key(t): 1e3 * r for t, r in rates}

    def _probe_gap(self) -> int:
        st = self.stats
        every = self.auto.config.probe_every
        return st.probe_gap or (every if st.nodes >= 16 else max(every // 4, 1))

    def next_tree(self):
        """The tree for this step, or ``None`` for a plain step."""
        if self.auto.schedule is not None:
            return self.auto.schedule(self.step)
        if self.choice is not None:  # while plain decoding wins, only probes bring news
            every = self.auto.config.decide_every if self.stats.nodes >= 32 else 2
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
            base = self.auto.config.probe_every
            if self.choice is None:
                # far from paying (the best tree predicted below 0.8x plain decoding): back off further, each probe
                # costs a cycle and the head's catch-up (stories260k: 2% of the time at a cap of 8x)
                plain_rate = self.last_rates.get("plain", 0.0)
                far = self.last_rates.get(tree_key(self.best_spec), 0.0) < self.auto.config.far_ratio * plain_rate
                cap = (self.auto.config.far_backoff if far else self.auto.config.backoff) * base
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


def make_tree(spec):
    """``"auto"`` (an :class:`AutoTree`: the fastest candidate or plain decoding, chosen as it runs),
    ``"dynamic"`` (EAGLE-2 defaults 60/6/10), ``"static"`` (mc_sim_7b_63), or a tree object."""
    if isinstance(spec, (StaticTree, DynamicTree, AutoTree)):
        return spec
    if spec == "auto":
        return AutoTree()
    if spec == "dynamic":
        return DynamicTree()
    if spec in ("static", "mc_sim_7b_63"):
        return StaticTree()
    raise ValueError(f"unknown tree {spec!r}; use 'auto', 'dynamic', 'static' or a StaticTree/DynamicTree/AutoTree")


__all__ = ["AcceptStats", "AutoConfig", "AutoController", "AutoTree", "CostModel", "expected_tokens", "make_tree",
           "path_observations"]
