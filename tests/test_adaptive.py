"""tree="auto": exactness when the tree changes between cycles, the cost-model cache, and the choice logic."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from eagle_runtime import DynamicTree, EagleModel, StaticTree, load_head, load_target, random_head
from eagle_runtime import adaptive, costs
from eagle_runtime.adaptive import AcceptStats, AutoConfig, AutoTree, CostModel, expected_tokens, make_tree, \
    path_observations
from eagle_runtime.state import Sampling
from eagle_runtime.text import load_tokenizer
from eagle_runtime.tree import default_candidates, fit_kind, tree_from_key, tree_key

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird", "Lily had a big"]
# A forced schedule: plain steps, chains, small and large dynamic trees and the static tree, changing every step.
SCHEDULE = [None, DynamicTree(3, 2, 1), DynamicTree(8, 3, 2), None, None, DynamicTree(16, 4, 4), StaticTree(),
            DynamicTree(1, 0, 1), DynamicTree(60, 6, 10), None]


def _model(path, head_dir, tree, max_len=320):
    target = load_target(path, max_len=max_len)
    head = load_head(head_dir, target) if head_dir else random_head(target, seed=1)
    return EagleModel(target, head, load_tokenizer(path), tree=tree, backend="cpu")


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_RUNTIME_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_exact_when_the_tree_changes_every_step(lm_dir, lm_head_dir, batch):
    auto = AutoTree(candidates=[t for t in SCHEDULE if t is not None and not isinstance(t, StaticTree)]
                    + [DynamicTree(8, 3, 2)], schedule=lambda step: SCHEDULE[step % len(SCHEDULE)])
    auto.max_depth = max(auto.max_depth, StaticTree().max_depth)
    auto.num_nodes = max(auto.num_nodes, StaticTree().num_nodes)
    model = _model(lm_dir, lm_head_dir, auto)
    plain = model.generate(PROMPTS[:batch], 40, speculative=False)
    spec = model.generate(PROMPTS[:batch], 40)
    assert spec.tokens == plain.tokens
    used = spec.tree["steps"]
    assert used.get("plain", 0) >= 2 and len(used) >= 5, used  # plain steps and several trees were really used
    assert max(max(a) for a in spec.accept_lengths) >= 3  # drafts got accepted across the changes


def test_auto_default_is_exact_and_reports_its_choice(lm_dir, lm_head_dir, tmp_path):
    model = _model(lm_dir, lm_head_dir, "auto")
    assert isinstance(model.tree, AutoTree) and isinstance(make_tree("auto"), AutoTree)
    plain = model.generate(PROMPTS[:2], 32, speculative=False)
    spec = model.generate(PROMPTS[:2], 32)
    assert spec.tokens == plain.tokens
    info = spec.tree
    assert info["mode"] == "auto" and 0.0 <= info["plain_fraction"] <= 1.0 and sum(info["steps"].values()) > 0
    json.dumps(info)  # the CLI and the benchmark print it as JSON
    assert (tmp_path / "cache" / "costs.json").is_file()  # measured once, cached
    fixed = EagleModel(model.target, model.head, model.tokenizer, tree=DynamicTree(8, 3, 2), backend="cpu")
    out = fixed.generate(PROMPTS[0], 8)
    assert out.tree["mode"] == "fixed" and list(out.tree["steps"]) == ["8,3,2"] and out.tree["plain_fraction"] == 0


def _sampling_joint(model, ids, n=3):
    from eagle_kernels import reference

    joint = {(): 1.0}
    tgt = model.target
    for _ in range(n):
        nxt = {}
        seqs = list(joint)
        toks = torch.tensor([ids + list(s) for s in seqs])
        probs = reference.process_logits(tgt.logits(tgt.forward_causal(toks))[:, -1], torch.ones(len(seqs)),
                                          torch.ones(len(seqs)), torch.full((len(seqs),), 3))
        for s, p in zip(seqs, probs):
            for t in p.nonzero().flatten().tolist():
                nxt[s + (t,)] = joint[s] * float(p[t])
        joint = nxt
    return joint


def test_sampling_with_changing_trees_follows_the_target(lm_dir, lm_head_dir):
    """Plain step, then a tree, then another: the first three tokens' joint law is the target's (chi-square)."""
    from scipy.stats import chisquare

    sched = [None, DynamicTree(8, 3, 2), DynamicTree(3, 2, 1)]
    # 64 slots hold the prompt, 4 tokens and an 8-token tree; 2000 rows over 320 slots of the 16-layer demo target
    # took 30 s on 2 cores (64: ~8 s)
    model = _model(lm_dir, lm_head_dir, AutoTree(candidates=sched[1:], schedule=lambda s: sched[s % 3]), max_len=64)
    ids = model.encode("Once upon a time, there was a little")[0]
    joint = _sampling_joint(model, ids)
    n = 2000
    out = model.generate([ids] * n, 4, temperature=1.0, top_k=3, seed=5, stop_on_eos=False)
    counts: dict = {}
    for t in out.tokens:
        counts[tuple(t[:3])] = counts.get(tuple(t[:3]), 0) + 1
    keys = sorted(joint, key=lambda k: -joint[k])
    assert sum(counts.get(k, 0) for k in keys) == n, "a sample fell outside the target's support"
    big = [k for k in keys if joint[k] * n >= 5]
    obs = [counts.get(k, 0) for k in big] + [n - sum(counts.get(k, 0) for k in big)]
    exp = [joint[k] * n for k in big] + [n - sum(joint[k] * n for k in big)]
    p = chisquare(obs, exp).pvalue
    print(f"auto (changing trees) sampling vs the target's joint law: chi-square p = {p:.3g}")
    assert p > 1e-3


def test_cost_model_cache_round_trip(lm_dir, tmp_path, monkeypatch):
    model = _model(lm_dir, None, "auto")
    calls = []
    real = costs.measure_costs
    monkeypatch.setattr(costs, "measure_costs", lambda d, b, s: calls.append(b) or real(d, b, s, reps=1))
    dec = model.decoder
    a = costs.get_costs(dec, 1, True)
    b = costs.get_costs(dec, 1, True)  # from disk
    assert calls == [1]
    assert b.to_json() == a.to_json() and a.key == costs.cost_key(dec, 1, True)
    assert all(a.target[n] <= a.target[m] for n in a.target for m in a.target if n < m)  # monotone in size
    folder = tmp_path / "cache"
    assert [p.name for p in folder.iterdir()] == ["costs.json"]  # atomic write: no temp file left behind
    (folder / "costs.json").write_text("{not json")
    assert costs.load_costs(a.key) is None  # unreadable cache: measured again, never trusted
    costs.get_costs(dec, 2, True)
    assert calls == [1, 2] and costs.load_costs(costs.cost_key(dec, 2, True)) is not None


def _set(field, value):
    return lambda e: e.update({field: value})


def _set_in(field, size, value):
    return lambda e: e[field].update({size: value})


# Entries that parse as JSON but must not be trusted: each broke every tree="auto" run (IndexError in _interp,
# "min() arg is an empty sequence" in _decide) or steered it on nonsense, and nothing ever replaced them.
POISONED = {
    "empty target": _set("target", {}),
    "empty draft": _set("draft", {}),
    "empty accept": _set("accept_greedy", {}),
    "one size only": _set("target", {"1": 1.0}),
    "missing size": lambda e: e["accept_sampled"].pop("64") and None,
    "extra size": _set_in("draft", "3", 0.5),
    "nan": _set_in("target", "4", float("nan")),
    "inf": _set_in("draft", "2", float("inf")),
    "huge": _set_in("accept_sampled", "8", 1e300),
    "negative": _set_in("target", "16", -1.0),
    "zero target": lambda e: e.update(target={k: 0.0 for k in e["target"]}),
    "string time": _set_in("target", "1", "fast"),
    "bool time": _set_in("target", "1", True),
    "table as list": _set("target", [1.0, 2.0]),
    "nan overhead": _set("plain_overhead", float("nan")),
    "negative prefix": _set("prefix", -64),
    "float prefix": _set("prefix", 64.5),
    "nan cycle": lambda e: e["cycles"].update({next(iter(e["cycles"])): float("nan")}),
    "bad cycle key": lambda e: e["cycles"].update({"bushy": 1.0}),
    "nan fit": lambda e: e["residual_fit"].update({"chain|greedy": [float("nan"), 0.0]}),
    "fit as string": lambda e: e["residual_fit"].update({"chain|greedy": "abc"}),
    "entry a list": lambda e: [1.0],
}


@pytest.fixture(scope="module")
def auto_model_and_costs(lm_dir):
    model = _model(lm_dir, None, "auto")
    good = costs.measure_costs(model.decoder, 1, model.sampled_drafts, reps=1)
    return model, good.to_json(), model.generate(PROMPTS[0], 24, speculative=False).tokens


@pytest.mark.parametrize("poison", list(POISONED))
def test_a_poisoned_cost_entry_is_measured_again_and_replaced(auto_model_and_costs, tmp_path, monkeypatch, poison):
    """Issue 31, item 2: an entry that parses but holds empty or wrongly shaped tables, or NaN / infinite / huge /
    negative / non-numeric times, is distrusted on load like an unreadable file: measured again, the new entry
    written over the bad one, and the tree="auto" run after it is exact."""
    model, good, plain = auto_model_and_costs
    key = costs.cost_key(model.decoder, 1, model.sampled_drafts)
    assert good["key"] == key
    entry = json.loads(json.dumps(good))
    entry = POISONED[poison](entry) or entry
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "costs.json").write_text(json.dumps({key: entry}))
    calls = []
    monkeypatch.setattr(costs, "measure_costs", lambda d, b, s: calls.append(b) or CostModel.from_json(good))
    model.tree = AutoTree()  # a fresh one reads the file (an AutoTree keeps its costs and acceptance statistics)
    spec = model.generate(PROMPTS[0], 24)
    assert calls == [1], f"{poison}: not measured again"
    assert spec.tokens == plain
    assert json.loads((folder / "costs.json").read_text())[key] == good  # the bad entry replaced on disk


def test_auto_costs_follow_the_drafting_mode(lm_dir, monkeypatch):
    """Toggling ``sampled_drafts`` between calls must not reuse the cost model timed in the other mode (its sampled
    chains' cycles differ, and ``cost_key`` names the mode)."""
    model = _model(lm_dir, None, "auto")
    seen = []
    monkeypatch.setattr(adaptive, "get_costs", lambda d, b, s: seen.append(costs.cost_key(d, b, s)) or _costs(1.0, 0.1))
    auto = AutoTree()
    for sampled in (True, False, True, False):
        model.sampled_drafts = sampled
        ctrl = auto.controller(model, 1, 1.0, 1.0, 0)
        assert ctrl.costs is auto.costs[(1, sampled)]
    assert [k.rsplit("|", 1)[1] for k in seen] == ["sd1", "sd0"]  # each mode measured once, then kept


def _costs(target_ms, draft_ms):
    sizes = [1, 2, 4, 8, 16, 32, 64]
    return CostModel({n: target_ms * (1 + 0.01 * n) for n in sizes}, {k: draft_ms * (1 + 0.02 * k) for k in sizes},
                     {n: 0.01 for n in sizes}, {n: 0.05 for n in sizes})


def _choice(costs, p, greedy=True):
    stats = AcceptStats(AutoConfig(prior_weight=1e-9))
    stats.hits = [v * 1000 for v in p] + [0.0] * (stats.config.max_rank - len(p))
    stats.tries = [1000.0] * stats.config.max_rank
    ctrl = adaptive.AutoController(AutoTree(), costs, stats, 1, greedy)
    return ctrl.choice


def test_choice_logic_on_synthetic_costs():
    good = [0.8, 0.1, 0.04, 0.02]
    # A cheap head and good acceptance: speculate; an expensive head (or poor acceptance): plain decoding.
    assert _choice(_costs(10.0, 0.5), good) is not None
    assert _choice(_costs(10.0, 12.0), good) is None
    assert _choice(_costs(10.0, 0.5), [0.05, 0.01]) is None
    # A nearly free verify of many tokens and a cheap head favour a big tree over a chain, and vice versa.
    wide = _choice(_costs(10.0, 0.2), [0.5, 0.2, 0.1, 0.05])
    assert wide.top_k > 1
    steep = CostModel({n: 10.0 * n for n in [1, 2, 4, 8, 16, 32, 64]}, {k: 0.1 for k in [1, 2, 4, 8, 16]},
                      {n: 0.0 for n in [1, 64]}, {n: 0.0 for n in [1, 64]})
    chain = _choice(steep, [0.95, 0.03])  # every verified token costs a full forward: only sure tokens pay
    assert chain is None or chain.top_k == 1


def test_costs_follow_the_cache_length():
    """Attention over a long prompt makes every verified token dearer: the model interpolates the two timed prefixes,
    and a long prefix turns the choice from a wide tree towards a smaller one."""
    sizes = [1, 2, 4, 8, 16, 32, 64]
    short = {n: 10.0 + 0.05 * n for n in sizes}
    long = {n: 12.0 + 0.6 * n for n in sizes}  # at 448 tokens each extra tree token costs 12x more
    cm = CostModel(short, {k: 0.2 for k in [1, 2, 4, 8, 16]}, {n: 0.01 for n in sizes}, {n: 0.05 for n in sizes},
                   prefix=64, target_long=long, long_prefix=448)
    assert cm.target_ms(16) == pytest.approx(short[16]) and cm.target_ms(16, 448) == pytest.approx(long[16])
    assert cm.target_ms(16, 256) == pytest.approx((short[16] + long[16]) / 2)
    assert cm.plain_ms(True, 448) > cm.plain_ms(True, 64)
    tree = DynamicTree(32, 5, 4)
    assert cm.cycle_ms(tree, True, 448) - cm.cycle_ms(tree, True, 64) > long[32] - short[32] - 1e-9
    p = [0.6, 0.2, 0.1, 0.05]
    stats = AcceptStats(AutoConfig(prior_weight=1e-9))
    stats.hits = [v * 1000 for v in p] + [0.0] * (stats.config.max_rank - len(p))
    stats.tries = [1000.0] * stats.config.max_rank
    at_short = adaptive.AutoController(AutoTree(), cm, stats, 1, True, prefix=64).choice
    at_long = adaptive.AutoController(AutoTree(), cm, stats, 1, True, prefix=448).choice
    assert at_short is not None and at_long is not None
    assert at_long.total_tokens < at_short.total_tokens
    # the round trip through the on-disk cache keeps both tables
    again = CostModel.from_json(cm.to_json())
    assert again.target_ms(16, 300) == pytest.approx(cm.target_ms(16, 300))


def test_measured_steps_correct_the_model():
    """A model that overrates speculation (here 2x) is corrected by the cycles that ran once plain steps have been
    measured too: the controller turns to plain decoding; measurements that confirm the model keep the tree. With
    no plain step measured, a slow cycle is taken for a slow machine (plain borrows the ratio): the tree stays."""
    p = [0.6, 0.2, 0.1, 0.05]

    def ctrl(plain_measured: bool):
        stats = AcceptStats(AutoConfig(prior_weight=1e-9))
        stats.hits = [v * 1000 for v in p] + [0.0] * (stats.config.max_rank - len(p))
        stats.tries = [1000.0] * stats.config.max_rank
        if plain_measured:
            for _ in range(20):
                stats.add_step("plain", 1.0, 1.0)  # plain steps ran as fast as predicted
        return adaptive.AutoController(AutoTree(config=AutoConfig(decide_every=4)), _costs(10.0, 1.5), stats, 1, True)

    for slow, plain_measured, expect_plain in ((2.0, True, True), (1.0, True, False), (2.0, False, False)):
        c = ctrl(plain_measured)
        tree = c.choice
        assert tree is not None  # the model alone speculates
        for _ in range(40):
            t = c.next_tree()
            if t is None:
                c.observe(None, 1, c.costs.plain_ms(True))
                continue
            tokens = expected_tokens(t, c.stats.p_by_depth())
            c.observe(t, round(tokens), slow * c.costs.cycle_ms(t, True) * round(tokens) / tokens)
        assert (c.choice is None) == expect_plain, (slow, plain_measured, c.choice, c.correction)
        want = 1 / slow if plain_measured else 1.0
        assert c.summary()["measured_over_predicted"] == pytest.approx(want, rel=0.05)


def test_expected_tokens_and_observations():
    assert expected_tokens(DynamicTree(4, 3, 1), [1.0]) == pytest.approx(5.0)
    assert expected_tokens(DynamicTree(3, 2, 1), [0.5]) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    # width 2, depth 0: both children of the root, p0 + p1
    assert expected_tokens(DynamicTree(2, 0, 2), [0.6, 0.3]) == pytest.approx(1.9)
    # a root with children 1, 2 (ranks 0, 1); node 2 has child 3; accepted path 0 -> 2 -> 3
    parents = torch.tensor([[-1, 0, 0, 2]])
    obs = path_observations(parents, torch.tensor([[0, 2, 3, -1]]), torch.tensor([2]), 1)
    assert obs == [(2, 1, 1), (1, 0, 2), (0, None, 3)]
    stats = AcceptStats()
    for c, r, d in obs:
        stats.add(c, r, d)
    assert stats.nodes == 3 and stats.p()[1] > AcceptStats().p()[1]
    # per depth: acceptance that falls with depth makes long chains worth less than the pooled rate says
    falling = AcceptStats()
    for _ in range(100):
        falling.add(1, 0, 1)
        for d in range(2, 7):
            falling.add(1, None, d)
    by_depth = falling.p_by_depth()
    assert by_depth[0][0] > 0.6 and all(q[0] < 0.2 for q in by_depth[1:])
    chain = DynamicTree(6, 5, 1)
    assert expected_tokens(chain, by_depth) < expected_tokens(chain, by_depth[0]) - 0.5
    assert expected_tokens(DynamicTree(2, 1, 1), [[0.5], [0.2]]) == pytest.approx(1 + 0.5 + 0.1)


def test_head_catches_up_after_plain_steps(lm_dir):
    """After plain steps the head reads what it missed: its prediction equals a fresh prefill's on the same text
    (a stale head would keep greedy output exact but draft badly, so exactness tests cannot see this)."""
    model = _model(lm_dir, None, AutoTree(schedule=lambda s: None))
    dec = model.decoder
    ids = model.encode("Once upon a time")[0]

    with torch.inference_mode():
        sp = Sampling.empty(1, "cpu").fill_(0.0, 1.0, 0, 0)
        state = dec.prefill([ids], sp, True)
        gen = [int(state.next_tok)]
        for _ in range(5):
            out = dec.plain_step(state, sp, keep_features=True)
            state.pending.append((out.features[:, None], out.update.next_tok[:, None]))
            dec.commit(state, sp, out.update)
            gen.append(int(out.emitted[0, 0]))
        dec.resync_head(state)
        assert state.pending == []
        fresh = dec.prefill([ids + gen[:-1]], Sampling.empty(1, "cpu").fill_(0.0, 1.0, 0, 0), True)
    assert int(fresh.next_tok) == gen[-1]
    torch.testing.assert_close(state.d_hidden, fresh.d_hidden, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.d_logits, fresh.d_logits, rtol=1e-4, atol=1e-3)


def test_cli_tree_auto_json(lm_dir, tmp_path, capsys):
    from eagle_runtime import save_head
    from eagle_runtime.cli import main

    head_dir = save_head(random_head(load_target(lm_dir, max_len=128), seed=2), tmp_path / "head")
    args = ["generate", "--base", str(lm_dir), "--draft", str(head_dir), "--prompt", "Once upon a time",
            "--max-new-tokens", "6", "--max-len", "128", "--device", "cpu"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tree"]["mode"] == "auto" and sum(out["tree"]["steps"].values()) >= 1
    assert main(args + ["--tree", "dynamic", "--total-tokens", "0"]) == 2  # a bad tree: one line, status 2
    assert "error:" in capsys.readouterr().err


def test_deferred_head_prefill_matches_the_eager_one(lm_dir):
    """tree="auto" starting plain leaves the prompt to the head's catch-up: same head state as the prefill's."""
    model = _model(lm_dir, None, AutoTree(schedule=lambda s: None))
    dec = model.decoder
    ids = model.encode("Once upon a time, a cat")[0]

    def sampling():
        return Sampling.empty(1, "cpu").fill_(0.0, 1.0, 0, 0)

    with torch.inference_mode():
        eager = dec.prefill([ids], sampling(), True)
        sp = sampling()
        state = dec.prefill([ids], sp, True, defer_head=True)
        assert len(state.pending) == 1
        for _ in range(3):
            out = dec.plain_step(state, sp, keep_features=True)
            state.pending.append((out.features[:, None], out.update.next_tok[:, None]))
            dec.commit(state, sp, out.update)
        dec.resync_head(state)
        gen = model.generate([ids], 4, speculative=False).tokens[0]
        fresh = dec.prefill([ids + gen[:3]], sampling(), True)
    assert int(eager.next_tok) == gen[0]
    torch.testing.assert_close(state.d_hidden, fresh.d_hidden, rtol=1e-4, atol=1e-4)


def test_tree_kinds_are_measured_against_their_expectation():
    """A kind of tree that emits less than the rank model expects is rated down (and only that kind)."""

    st = AcceptStats()
    assert st.tree_factor("tree") == st.tree_factor("chain") == 1.0
    for _ in range(30):
        st.add_cycle("tree", 2.0, 4.0)  # emits half of what the model expected
        st.add_cycle("chain", 4.0, 4.0)
    assert 0.5 <= st.tree_factor("tree") < 0.6 and st.tree_factor("chain") == pytest.approx(1.0)
    assert fit_kind(DynamicTree(5, 4, 1)) == "chain" and fit_kind(DynamicTree(16, 4, 4)) == "tree"


def test_a_kind_judged_on_early_cycles_is_tried_again():
    """Two poor chain cycles, then only trees: the chains' evidence ages with the trees' cycles, so their factor
    returns towards 1 (they are tried again) instead of keeping them out for good."""

    st = AcceptStats()
    for _ in range(2):
        st.add_cycle("chain", 1.0, 6.0)
    early = st.tree_factor("chain")
    assert early < 0.7
    for _ in range(80):
        st.add_cycle("tree", 4.0, 4.0)
    assert st.tree_factor("chain") > 0.95 > early
    assert st.tree_factor("tree") == pytest.approx(1.0)


def _parts_costs():
    sizes = [1, 2, 4, 8, 16, 32, 64]
    return CostModel({n: 4.0 + 0.05 * n for n in sizes}, {k: 0.4 + 0.01 * k for k in [1, 2, 4, 8, 16]},
                     {n: 0.05 for n in sizes}, {n: 0.5 for n in sizes}, prefix=64,
                     target_long={n: 4.5 + 0.2 * n for n in sizes}, long_prefix=448)


def test_timed_cycles_set_each_trees_cost():
    """A timed tree's cycle is its measured time at the calibration length (its parts move with the cache length
    and sampling mode); an untimed tree gets its kind's fitted overhead: trees and chains are fitted apart."""

    cm = _parts_costs()
    chains = [DynamicTree(c, c - 1, 1) for c in (1, 2, 4, 8)]
    trees = [DynamicTree(*t) for t in [(4, 2, 2), (8, 3, 2), (12, 5, 2), (16, 4, 4), (32, 6, 4)]]
    for t in chains:  # a chain costs 0.3 ms over its parts plus 0.05 per level
        cm.cycles[tree_key(t)] = cm.parts_ms(t, True) + 0.3 + 0.05 * t.depth
    for t in trees:  # a tree 1.0 ms plus 0.2 per level plus 0.03 per node
        cm.cycles[tree_key(t)] = cm.parts_ms(t, True) + 1.0 + 0.2 * t.depth + 0.03 * t.total_tokens
    cm.fit_residuals()
    for key, ms in cm.cycles.items():
        t = tree_from_key(key)
        assert tree_key(t) == key and cm.cycle_ms(t, True) == pytest.approx(ms)
        # at a longer cache only the target's forward moves
        assert cm.cycle_ms(t, True, 448) - ms == pytest.approx(cm.target_ms(t.total_tokens + 1, 448)
                                                               - cm.target_ms(t.total_tokens + 1))
    chain6, tree24 = DynamicTree(6, 5, 1), DynamicTree(24, 5, 4)
    assert cm.cycle_ms(chain6, True) == pytest.approx(cm.parts_ms(chain6, True) + 0.3 + 0.05 * 5, rel=1e-6)
    assert cm.cycle_ms(tree24, True) == pytest.approx(cm.parts_ms(tree24, True) + 1.0 + 0.2 * 5 + 0.03 * 24, rel=1e-6)
    # nothing timed at temperature 1 here: the parts alone (sampled acceptance is dearer than greedy)
    assert cm.cycle_ms(tree24, False) == pytest.approx(cm.parts_ms(tree24, False))
    again = CostModel.from_json(cm.to_json())
    assert again.cycle_ms(tree24, True, 300) == pytest.approx(cm.cycle_ms(tree24, True, 300))
    assert again.cycle_ms(chains[2], True) == pytest.approx(cm.cycle_ms(chains[2], True))


def test_calibration_times_every_default_candidate(lm_dir):
    """The measured cost model holds a real cycle of every default candidate, greedy and (chains, which draft by
    sampling then) at temperature 1, and predicts each timed cycle as measured; all of them on one set of caches."""
    model = _model(lm_dir, None, "auto")
    taken = []
    pool_cache = model.pool.cache
    model.pool.cache = lambda name, B: taken.append(name) or pool_cache(name, B)
    cm = costs.measure_costs(model.decoder, 1, model.sampled_drafts, reps=1)
    assert sorted(taken) == ["cache", "d_cache"]  # one prefilled state serves every timed step and cycle
    keys = {tree_key(t) for t in default_candidates()}
    assert set(cm.cycles) == keys
    assert set(cm.cycles_sampled) == {k for k in keys if k.startswith("chain")}
    assert set(cm.residual_fit) == {"chain|greedy", "tree|greedy", "chain|sampled"}
    for key, ms in cm.cycles.items():
        # as measured, unless timing noise made the cycle cheaper than half its separately timed parts: then the
        # model's floor (seen once on a loaded machine: a 5.3 ms cycle against 24.8 ms of parts)
        t = tree_from_key(key)
        assert ms > 0 and cm.cycle_ms(t, True) == pytest.approx(max(ms, 0.5 * cm.parts_ms(t, True)))


def _plain_winning_controller(far: bool):
    """A controller on synthetic costs where plain decoding wins (by far, or narrowly)."""
    stats = AcceptStats(AutoConfig(prior_weight=1e-9))
    p = [0.05, 0.01] if far else [0.5, 0.1]
    stats.hits = [v * 1000 for v in p] + [0.0] * (stats.config.max_rank - len(p))
    stats.tries = [1000.0] * stats.config.max_rank
    ctrl = adaptive.AutoController(AutoTree(), _costs(10.0, 3.0 if not far else 5.0), stats, 1, True, prefix=64)
    assert ctrl.choice is None
    return ctrl


def test_a_plain_stretch_is_observed_as_its_steps():
    """Plain steps observed as one stretch leave the controller as step-by-step observation does."""
    a, b = _plain_winning_controller(True), _plain_winning_controller(True)
    for _ in range(12):
        a.observe(None, 1, 2.0)
        b.observe(None, 1, 2.0)
    assert a.plain_steps_ahead() == b.plain_steps_ahead() >= 1
    for _ in range(5):
        a.observe(None, 1, 2.0)
    b.observe(None, 5, 10.0, steps=5)
    for attr in ("step", "prefix", "counts", "tokens", "wall_ms"):
        assert getattr(a, attr) == pytest.approx(getattr(b, attr)), attr
    assert a.stats.plain_run == b.stats.plain_run == 17
    assert a.stats.measured["plain"] == pytest.approx(b.stats.measured["plain"])
    with pytest.raises(ValueError, match="plain steps"):
        b.observe(DynamicTree(4, 3, 1), 8, 10.0, steps=2)


def test_probes_back_off_further_when_speculation_is_far_from_paying():
    """Probes that keep confirming plain decoding double the gap up to 8x probe_every, or 32x when the best tree is
    predicted below 0.8x plain decoding."""
    for far, cap in ((True, 32), (False, 8)):
        ctrl = _plain_winning_controller(far)
        base = ctrl.auto.config.probe_every
        for _ in range(8):  # probes that keep confirming plain decoding
            assert ctrl.next_tree() is None
            ctrl.stats.plain_run = ctrl.plain_steps_ahead() + ctrl.stats.plain_run
            probe = ctrl.next_tree()
            assert probe is not None
            ctrl.observe(probe, 1, 20.0)
            assert ctrl.choice is None
        assert ctrl.stats.probe_gap == cap * base, far


def test_a_slightly_better_tree_is_taken_but_plain_keeps_its_hysteresis():
    """Between two trees a 4% better prediction switches (an early choice is not locked in); between speculation
    and plain decoding the 7.5% hysteresis stays."""
    ctrl = adaptive.AutoController(AutoTree(), _costs(10.0, 0.5), AcceptStats(), 1, True)
    assert ctrl.choice is not None
    rates = {"plain": 1.0, "a": 2.0, "b": 2.08}
    a, b = DynamicTree(5, 4, 1), DynamicTree(8, 7, 1)
    ctrl.auto.config = dataclasses.replace(ctrl.auto.config, spec_margin=1.0)
    ctrl._rates = lambda: [(None, rates["plain"]), (a, rates["a"]), (b, rates["b"])]
    ctrl.choice = a
    ctrl._decide()
    assert ctrl.choice is b  # 4% better: taken
    rates.update(a=2.0, b=1.0, plain=2.1)  # plain 5% better than the current tree: kept
    ctrl.choice = a
    ctrl._decide()
    assert ctrl.choice is a
    rates.update(plain=2.2)  # 10% better: plain decoding
    ctrl._decide()
    assert ctrl.choice is None
