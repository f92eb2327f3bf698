"""Sampling means what it means in transformers: temperature, then top-k, then top-p over the renormalised top-k
mass; tiny temperatures are greedy; the whole 64-bit seed matters. End to end, plain and speculative sampling
draw from transformers' warped distribution with all three filters on."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from eagle_kernels import reference
from eagle_runtime import DynamicTree, EagleModel, load_head, load_target
from eagle_runtime.text import load_tokenizer


def _hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """transformers' own warpers, in the order `generate` builds them (temperature, top-k, top-p)."""
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warp.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warp.append(TopPLogitsWarper(top_p))
    return torch.softmax(warp(None, logits.float().clone()), dim=-1)


def _ours(logits, temperature, top_k, top_p):
    n = logits.shape[0]
    return reference.process_logits(logits, torch.full((n,), temperature), torch.full((n,), top_p),
                                    torch.full((n,), top_k))


def _full_distribution_top_p(logits, temperature, top_k, top_p):
    """The old, wrong rule (a deliberately broken variant): top-p measured on the full distribution."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    keep = torch.arange(probs.shape[-1]) < (top_k or probs.shape[-1])
    keep = keep & ((torch.cumsum(sorted_p, -1) - sorted_p) < top_p)
    keep[..., 0] = True
    out = torch.zeros_like(probs).scatter(-1, order, torch.where(keep, sorted_p, torch.zeros_like(sorted_p)))
    return out / out.sum(-1, keepdim=True)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.8, 40, 0.9), (1.0, 5, 0.5), (0.7, 3, 0.99), (1.3, 60, 0.3), (1.0, 1, 0.9), (0.5, 0, 0.8), (1.0, 20, 1.0),
])
def test_process_logits_equals_transformers_warpers(temperature, top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 10))
    logits = 3 * torch.randn(64, 111, generator=g)
    ours, hf = _ours(logits, temperature, top_k, top_p), _hf_probs(logits, temperature, top_k, top_p)
    support_diff = ((ours > 0) != (hf > 0)).any(-1)
    assert not support_diff.any(), f"rows {support_diff.nonzero().flatten().tolist()} keep other tokens than HF"
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-7)


def test_both_filters_differ_from_full_distribution_top_p():
    # the old rule keeps tokens transformers removes (the issue: ~5% of sampled pairs had HF probability 0)
    logits = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    expect = torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]])
    torch.testing.assert_close(_ours(logits, 1.0, 3, 0.75), expect)
    torch.testing.assert_close(_hf_probs(logits, 1.0, 3, 0.75), expect)
    assert _full_distribution_top_p(logits, 1.0, 3, 0.75)[0, 2] > 0


def test_top_k_keeps_every_tie_like_transformers():
    # integer logits: the k-th value is tied; transformers keeps all tokens equal to it
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 5, (32, 40), generator=g).float()
    for k in (1, 3, 7, 20):
        ours, hf = _ours(logits, 1.0, k, 1.0), _hf_probs(logits, 1.0, k, 1.0)
        assert torch.equal(ours > 0, hf > 0), k
        assert int((ours > 0).sum(-1).min()) >= k
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1e-37, 1e-20, 9.9e-6, 0.0])
def test_tiny_temperature_is_greedy(temperature):
    logits = torch.tensor([[3.0, 70.0, -5.0, 70.0, 69.99], [1.0, 2.0, 3.0, 4.0, 5.0]]) * 10
    out = _ours(logits, temperature, 2, 0.5)
    assert not out.isnan().any()
    assert out.argmax(-1).tolist() == [1, 4] and torch.equal(out.sum(-1), torch.ones(2))
    B = logits.shape[0]
    args = (torch.full((B,), temperature), torch.full((B,), 0.5), torch.full((B,), 2))
    for seed in range(3):
        assert reference.sample_tokens(logits, *args, torch.tensor(seed), torch.tensor(0)).tolist() == [1, 4]
    # just above the threshold the row samples: 70 and 69.99 (x10) are 1e6 temperatures apart, 70 and 70 tie
    warm = _ours(logits, 1e-5 * 1.01, 0, 1.0)
    assert not warm.isnan().any() and warm[0, 1] == warm[0, 3] == 0.5


def test_seed_uses_all_64_bits():
    seeds = [0, 2**32, -(2**32), 1, 2**32 + 1, 2**63 - 1, -(2**63)]
    u = [reference.hash_uniform(torch.tensor(s), torch.tensor(0), torch.arange(64)) for s in seeds]
    for i in range(len(seeds)):
        for j in range(i):
            assert not torch.equal(u[i], u[j]), (seeds[i], seeds[j])
    logits = torch.zeros(16, 1000)  # uniform: every draw is decided by the random stream alone
    t, p, k = torch.ones(16), torch.ones(16), torch.zeros(16, dtype=torch.int64)
    draws = [reference.sample_tokens(logits, t, p, k, torch.tensor(s), torch.tensor(0)) for s in seeds[:3]]
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


# ---------------------------------------------------------------------------------------------------------------
# End to end: the first tokens of plain and speculative sampling against transformers' warped joint distribution
# ---------------------------------------------------------------------------------------------------------------
PROMPT = "The little dog"
T_, K_, P_ = 1.3, 8, 0.7  # all three on; here the full-distribution top-p keeps a joint mass of ~0.4 HF removes
N_TOK, SAMPLES = 3, 3000


def _joint(model, ids, probs_fn, n=N_TOK):
    """Exact distribution of the first ``n`` sampled tokens under ``probs_fn`` applied to the target's logits."""
    tgt = model.target
    joint = {(): 1.0}
    for _ in range(n):
        seqs = list(joint)
        toks = torch.tensor([ids + list(s) for s in seqs])
        probs = probs_fn(tgt.logits(tgt.forward_causal(toks))[:, -1], T_, K_, P_)
        nxt = {}
        for s, row in zip(seqs, probs):
            for t in row.nonzero().flatten().tolist():
                nxt[s + (t,)] = joint[s] * float(row[t])
        joint = nxt
    return joint


def _pvalue(counts: dict, joint: dict, n: int) -> tuple[float, int]:
    """Chi-square p-value of the sampled tuples against ``joint``; samples outside its support give p = 0."""
    from scipy.stats import chisquare

    outside = sum(c for k, c in counts.items() if k not in joint)
    if outside:
        return 0.0, outside
    keys = sorted(joint, key=lambda k: -joint[k])
    exp = [joint[k] * n for k in keys]
    obs = [counts.get(k, 0) for k in keys]
    big = [i for i, e in enumerate(exp) if e >= 5]
    small = [i for i, e in enumerate(exp) if e < 5]
    o = [obs[i] for i in big] + ([sum(obs[i] for i in small)] if small else [])
    e = [exp[i] for i in big] + ([sum(exp[i] for i in small)] if small else [])
    return float(chisquare(o, [x * sum(o) / sum(e) for x in e]).pvalue), 0


def _sample(model, ids, speculative, seed, samples=SAMPLES):
    out = model.generate([ids] * samples, N_TOK, temperature=T_, top_k=K_, top_p=P_, seed=seed,
                         speculative=speculative, stop_on_eos=False)
    counts = {}
    for toks in out.tokens:
        counts[tuple(toks[:N_TOK])] = counts.get(tuple(toks[:N_TOK]), 0) + 1
    return counts, out


@pytest.fixture(scope="module")
def hf_model(lm_dir, lm_head_dir):
    target = load_target(lm_dir, max_len=64)
    model = EagleModel(target, load_head(lm_head_dir, target), load_tokenizer(lm_dir),
                       tree=DynamicTree(total_tokens=12, depth=3, top_k=4), backend="torch")
    ids = model.encode(PROMPT)[0]
    return model, ids, _joint(model, ids, _hf_probs)


def test_broken_rule_is_far_from_transformers(hf_model):
    model, ids, joint = hf_model
    wrong = _joint(model, ids, _full_distribution_top_p)
    outside = sum(v for k, v in wrong.items() if k not in joint)
    print(f"full-distribution top-p puts mass {outside:.3f} on tuples transformers' warpers give probability 0")
    assert outside > 0.1, "the end-to-end tests below could not tell the two rules apart"


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "speculative"])
def test_sampling_matches_transformers_warpers(hf_model, speculative):
    model, ids, joint = hf_model
    counts, out = _sample(model, ids, speculative, seed=2**40 + 3)
    p, outside = _pvalue(counts, joint, SAMPLES)
    what = "speculative" if speculative else "plain"
    print(f"{what} sampling (T {T_}, top-k {K_}, top-p {P_}) vs transformers' warpers, joint of {N_TOK} tokens: "
          f"chi-square p = {p:.3g}" + (f", tau {out.tau:.2f}" if speculative else ""))
    assert outside == 0, f"{outside} samples fell outside the support of transformers' warpers"
    assert p > 1e-3, f"{what} sampling deviates from transformers' warped distribution: p = {p:.2e}"
    if speculative:
        assert out.tau > 1.3, "the test must exercise accepted draft tokens"


def test_broken_top_p_rule_is_detected(hf_model, monkeypatch):
    """Control: the old rule (top-p over the full distribution) fails the test above."""
    model, ids, joint = hf_model
    monkeypatch.setattr(reference, "process_logits", lambda logits, t, p, k: torch.stack(
        [_full_distribution_top_p(logits[b], float(t[b]), int(k[b]), float(p[b])) for b in range(len(t))]))
    counts, _ = _sample(model, ids, True, seed=2**40 + 3, samples=SAMPLES // 3)  # its deviation is large
    p, outside = _pvalue(counts, joint, SAMPLES // 3)
    print(f"broken rule (top-p over the full distribution): chi-square p = {p:.3g}, {outside} samples outside "
          "transformers' support")
    assert p < 1e-3, f"the broken rule passes the test above (p = {p:.2e})"


def test_seed_range_and_high_bits(hf_model):
    model, ids, _ = hf_model
    with pytest.raises(ValueError, match="seed"):
        model.generate([ids], 2, temperature=1.0, seed=2**63)
    with pytest.raises(ValueError, match="seed"):
        model.generate([ids], 2, temperature=1.0, seed=-(2**63) - 1)
    runs = [model.generate([ids] * 8, 4, temperature=1.0, seed=s, speculative=False, stop_on_eos=False).tokens
            for s in (0, 2**32, -(2**32), 2**63 - 1)]
    assert runs[0] != runs[1] and runs[0] != runs[2] and runs[1] != runs[2]
    greedy = model.generate([ids], 6, speculative=False, stop_on_eos=False).tokens
    assert model.generate([ids], 6, temperature=1e-37, seed=3, stop_on_eos=False).tokens == greedy
