"""Chains of sampled drafts at temperature > 0: speculative sampling with the draft's distribution
(``reference.sample_draft`` / ``reference.accept_chain``) emits the target's distribution exactly, accepts more than
deterministic drafts, and ``tree="auto"`` picks among chains only while it runs."""

from __future__ import annotations

import pytest
import torch

from eagle_kernels import get_ops, reference
from eagle_runtime import DynamicTree, EagleModel, load_head, load_target
from eagle_runtime.adaptive import AutoTree
from eagle_runtime.text import load_tokenizer

from spec_helpers import chi2_pvalue, exact_joint, spec_counts

V = 6
N = 30000  # rows of one op call: every row is an independent draw (its own hash streams)
# (temperature, top_p, top_k): plain, sharpened with top-k, top-p (tokens drop out of p and q)
SETTINGS = [(1.0, 1.0, 0), (0.7, 1.0, 3), (1.2, 0.8, 0)]


def _chi2(obs: torch.Tensor, probs: torch.Tensor) -> float:
    from scipy.stats import chisquare

    keep = probs > 0
    assert int(obs[~keep].sum()) == 0, "a token outside the target's support was emitted"
    o = obs[keep].double().numpy()
    e = probs[keep].double().numpy()
    return chisquare(o, e / e.sum() * o.sum()).pvalue


def _run_chain(setting, seed, accept=reference.accept_chain, ops=None):
    """Two sampled drafts per row from fixed draft logits; the target's logits after draft 1 depend on it (a
    table), as a real target's do. Returns (first emitted, second emitted or -1, accept lengths, p0, table)."""
    ops = ops or get_ops("torch")
    g = torch.Generator().manual_seed(0)
    t, p_, k = setting
    temp, top_p, top_k = torch.full((N,), t), torch.full((N,), p_), torch.full((N,), k, dtype=torch.long)
    tgt0 = torch.randn(V, generator=g) * 1.5
    table = torch.randn(V, V, generator=g) * 1.5  # target logits after draft 1 = table[draft 1]
    draft0 = tgt0 + torch.randn(V, generator=g)  # the draft is close to the target, not equal
    seed_t, off = torch.tensor(seed), torch.tensor(3)
    x1, q1 = ops.sample_draft(draft0.expand(N, V), temp, top_p, top_k, seed_t, off, 1)
    draft1 = table[x1] + torch.randn(V, V, generator=g)[x1]
    x2, q2 = ops.sample_draft(draft1, temp, top_p, top_k, seed_t, off, 2)
    tokens = torch.stack([torch.zeros(N, dtype=torch.long), x1, x2], 1)
    logits = torch.stack([tgt0.expand(N, V), table[x1], table[x1] * 0.5], 1)  # node 2's row: any function of x2
    acc = accept(logits, tokens, torch.stack([q1, q2], 1), temp, top_p, top_k, seed_t, off)
    first = torch.where(acc.accept_len >= 1, x1, acc.next_token)
    second = torch.where(acc.accept_len >= 2, x2, torch.where(acc.accept_len == 1, acc.next_token, -1))
    p0 = reference.process_logits(tgt0[None], temp[:1], top_p[:1], top_k[:1])[0]
    return first, second, acc.accept_len, p0, table, (temp[:1], top_p[:1], top_k[:1])


@pytest.mark.parametrize("setting", SETTINGS)
def test_chain_of_sampled_drafts_emits_the_target_distribution(setting):
    first, second, acc_len, p0, table, proc = _run_chain(setting, seed=7)
    assert acc_len.float().mean() > 0.5, "the test must exercise accepted drafts"
    assert _chi2(torch.bincount(first, minlength=V), p0) > 1e-3
    # the second token, after a first token a: the target's conditional, processed alike
    for a in range(V):
        rows = (first == a) & (second >= 0)
        if int(rows.sum()) < 2000:
            continue
        pa = reference.process_logits(table[a][None], *proc)[0]
        assert _chi2(torch.bincount(second[rows], minlength=V), pa) > 1e-3, f"second token after {a}"


def test_a_broken_residual_is_detected():
    """Control: drawing the replacement from p instead of max(p - q, 0) after a rejection must fail the test."""
    def broken(logits, tokens, q, temp, top_p, top_k, seed, offset):
        res = reference.accept_chain(logits, tokens, q, temp, top_p, top_k, seed, offset)
        B, T, _ = logits.shape
        p = reference.process_logits(logits, temp, top_p, top_k)
        u = reference.hash_uniform(seed, offset, torch.arange(B).view(B, 1), res.accept_len.view(B, 1),
                                   torch.tensor(1), torch.arange(V).view(1, V))
        p_last = p.gather(1, res.accept_len.view(B, 1, 1).expand(B, 1, V))[:, 0]
        return reference.AcceptOutput(res.accept_path, res.accept_len, reference._race(p_last, u))

    first, *_, p0, _, _ = _run_chain(SETTINGS[0], seed=7, accept=broken)
    assert _chi2(torch.bincount(first, minlength=V), p0) < 1e-3


def test_cpu_backend_is_bit_identical_to_the_reference():
    for setting in SETTINGS:
        a = _run_chain(setting, seed=5)
        b = _run_chain(setting, seed=5, ops=get_ops("cpu"))
        assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))


def test_accept_chain_paths_and_lengths():
    """Paths are the chain's first ``accept_len + 1`` nodes; a draft the target cannot emit (p = 0) is refused and a
    draft with p >= q is always taken."""
    T = 4
    logits = torch.zeros(2, T, V)
    logits[0, 1, 2] = -float("inf")  # row 0: p(token 2) = 0 after node 1
    tokens = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])
    q = torch.full((2, T - 1, V), 1.0 / V)  # p = q = uniform except row 0's refused token
    one = torch.ones(2)
    acc = reference.accept_chain(logits, tokens, q, one, one, torch.zeros(2, dtype=torch.long), torch.tensor(1),
                                 torch.tensor(0))
    assert acc.accept_len.tolist() == [1, 3]
    assert acc.accept_path.tolist() == [[0, 1, -1, -1], [0, 1, 2, 3]]
    assert int(acc.next_token[0]) != 2  # the residual excludes the refused token


@pytest.fixture(scope="module")
def chain_model(lm_dir, lm_head_dir):
    # 64 slots: the 10-token prompt, 40 greedy tokens and a 4-token chain; the 3000-row sampling batch then attends
    # over 64 slots, not 320 (the 16-layer demo target's cache at 320 is 2.5 GB for 3000 rows)
    target = load_target(lm_dir, max_len=64)
    model = EagleModel(target, load_head(lm_head_dir, target), load_tokenizer(lm_dir),
                       tree=DynamicTree(4, 3, 1), backend="torch")
    prompt = model.encode("Once upon a time, there was a little")[0]
    return model, prompt, exact_joint(model, prompt, 1.0, 4)


def test_sampled_chains_match_the_target_end_to_end(chain_model):
    model, prompt, joint = chain_model
    counts, out = spec_counts(model, prompt, 3000, 1.0, 4, seed=21)
    assert out.tau > 1.5, "the test must exercise accepted drafts"
    p = chi2_pvalue(counts, joint, 3000)
    print(f"sampled chain vs exact target joint of 3 tokens: chi-square p = {p:.3g}, tau {out.tau:.2f}")
    assert p > 1e-3, f"sampled chains deviate from the target distribution: chi-square p = {p:.2e}"


def test_sampled_drafts_accept_more_than_deterministic_ones():
    """At temperature 1 (the demo target's distribution is broad) the argmax draft is accepted with probability
    p(argmax), the sampled one with about sum min(p, q), which a good head makes close to 1."""
    from eagle_runtime.demo import demo_paths

    model = EagleModel.from_pretrained(*demo_paths("eagle1"), tree=DynamicTree(5, 4, 1), backend="torch")
    prompts = ["Once upon a time, there was a little", "User: What is the capital of France?\nAssistant:"]
    taus = {}
    for sampled in (True, False):
        model.sampled_drafts = sampled
        taus[sampled] = model.generate(prompts, 48, temperature=1.0, seed=3, stop_on_eos=False).tau
    assert taus[True] > taus[False] + 1.0, taus


def test_greedy_chains_stay_identical_to_plain(chain_model):
    model, prompt, _ = chain_model
    plain = model.generate([prompt], 40, speculative=False).tokens[0]
    assert model.generate([prompt], 40).tokens[0] == plain


def test_auto_runs_chains_only_when_drafts_are_sampled(chain_model):
    model = chain_model[0]
    auto = AutoTree(schedule=lambda step: None)  # no cost measurement needed for the candidate set
    sampled = auto.controller(model, 1, 1.0, 1.0, 0, sampled=True)
    det = auto.controller(model, 1, 1.0, 1.0, 0, sampled=False)
    assert sampled.candidates and all(t.top_k == 1 for t in sampled.candidates)
    assert det.candidates == auto.candidates and any(t.top_k > 1 for t in det.candidates)
    assert len(auto.stats) == 2  # separate acceptance estimates for the two kinds of drafts
