"""Helpers shared by the end-to-end sampling tests (EAGLE-1 and EAGLE-3 heads): the exact joint distribution of
the target's first tokens, speculative samples of them, and a chi-square test between the two."""

from __future__ import annotations

import torch

from eagle_kernels import reference


def exact_joint(model, ids, temperature, top_k, n=3):
    """Exact distribution of the first ``n`` tokens of direct sampling from the target (processed support)."""
    tgt = model.target
    T0 = len(ids)
    joint = {(): 1.0}
    for _ in range(n):
        nxt = {}
        seqs = list(joint)
        toks = torch.tensor([ids + list(s) for s in seqs])
        probs = reference.process_logits(
            tgt.logits(tgt.forward_causal(toks))[:, -1], torch.full((len(seqs),), temperature),
            torch.ones(len(seqs)), torch.full((len(seqs),), top_k))
        for s, p in zip(seqs, probs):
            for t in p.nonzero().flatten().tolist():
                nxt[s + (t,)] = joint[s] * float(p[t])
        joint = nxt
    assert len(joint) == top_k**n and T0 > 0
    return joint


def spec_counts(model, prompt, samples, temperature, top_k, seed):
    out = model.generate([prompt] * samples, 3, temperature=temperature, top_k=top_k, seed=seed, stop_on_eos=False)
    counts = {}
    for toks in out.tokens:
        counts[tuple(toks[:3])] = counts.get(tuple(toks[:3]), 0) + 1
    return counts, out


def chi2_pvalue(counts, joint, n):
    from scipy.stats import chisquare

    keys = sorted(joint, key=lambda k: -joint[k])
    exp = [joint[k] * n for k in keys]
    obs = [counts.get(k, 0) for k in keys]
    assert sum(obs) == n, "a sample fell outside the target's support"
    big = [i for i, e in enumerate(exp) if e >= 5]
    small = [i for i, e in enumerate(exp) if e < 5]
    o = [obs[i] for i in big] + [sum(obs[i] for i in small)]
    e = [exp[i] for i in big] + [sum(exp[i] for i in small)]
    return chisquare(o, [x * sum(o) / sum(e) for x in e]).pvalue
