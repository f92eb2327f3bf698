"""Triton acceptance and sampling: the reference's tokens draw for draw, and the target's distribution."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.acceptance import _summaries, accept_tree, sample_tokens  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (temperature, top_p, top_k): greedy, plain, top-p, top-k, both, top-k = 1, tiny top-p, both (the demo pair's
# setting), a tiny temperature (greedy by the 1e-5 rule)
SETTINGS = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 5), (0.9, 0.6, 4), (1.0, 1.0, 1), (1.0, 1e-4, 0),
            (0.8, 0.9, 40), (1e-37, 0.9, 40)]


def _kernel_or_reference():
    """``(accept_tree, sample_tokens)`` for the distribution tests: the kernels on a GPU; on CPU the references, which
    the kernels equal draw for draw (the ``*_identical_to_reference`` tests): hundreds of interpreted rows cost
    ~170 s on 2 cores and would test that identity again."""
    if DEV == "cuda":
        return accept_tree, sample_tokens
    return reference.accept_tree, reference.sample_tokens


def _params(B, settings=SETTINGS):
    rows = [settings[i % len(settings)] for i in range(B)]
    t, p, k = zip(*rows)
    return (torch.tensor(t, device=DEV), torch.tensor(p, device=DEV), torch.tensor(k, device=DEV))


def _likely_drafts(logits, parents, g):
    """Draft tokens drawn near the top of the parent's target row, so that paths get accepted."""
    B, T, V = logits.shape
    top = logits.topk(3, dim=-1).indices  # [B, T, 3]
    pick = torch.randint(0, 3, (B, T), generator=g).to(logits.device)
    par = parents.clamp(min=0)
    tokens = top.gather(1, par.unsqueeze(-1).expand(B, T, 3)).gather(2, pick.unsqueeze(-1)).squeeze(-1)
    tokens[:, 0] = 0
    return tokens


def _assert_same(out, ref, what=""):
    for name in ("accept_path", "accept_len", "next_token"):
        a, b = getattr(out, name), getattr(ref, name)
        bad = (a != b).reshape(a.shape[0], -1).any(-1)
        if bad.any():
            pytest.fail(f"{what}{name}: sequences {bad.nonzero().flatten().tolist()} differ: kernel "
                        f"{a[bad].tolist()} reference {b[bad].tolist()}")


PARENTS = {
    "single": [-1],
    "chain": [-1, 0, 1, 2, 3],
    "star": [-1, 0, 0, 0, 0, 0],
    "tree": [-1, 0, 0, 1, 1, 2, 0, 3],
}
SEEDS = (0, 12345, 2**32, -(2**32), 2**63 - 1, -(2**63))  # the high half of the seed matters


def _summary_probs(logits, temperature, top_p, top_k):
    """The processed distribution the summary kernel describes, rebuilt in torch (see acceptance.py)."""
    sumf, sumi = _summaries(logits, temperature, top_p, top_k)
    m, s, thr, sk, tau, norm = (sumf[..., i : i + 1] for i in range(6))
    arg, idx_cut = sumi[..., 0:1].long(), sumi[..., 1:2].long()
    B, T, V = logits.shape
    t = temperature.float().view(B, 1, 1)
    greedy = t < reference.GREEDY_TEMPERATURE
    y = logits.float() / torch.where(greedy, torch.ones_like(t), t)
    q = torch.where(y >= thr, torch.exp(y - m) / s / sk, torch.zeros_like(y))
    v = torch.arange(V, device=logits.device)
    # tau is the kernel's own q of the crossing token; torch's exp may differ from the kernel's by an ulp, so the
    # tokens within 1e-6 of tau are the crossing group (distinct random q values are never that close)
    near = (q - tau).abs() <= 1e-6 * tau
    kept = ((q > tau) & ~near) | (near & (v <= idx_cut))
    probs = torch.where(kept, q, torch.zeros_like(q)) / norm
    onehot = torch.zeros_like(probs).scatter(-1, arg, 1.0)
    return torch.where(greedy, onehot, probs)


@pytest.mark.parametrize("shape", list(PARENTS))
@pytest.mark.parametrize("V", [111])
def test_accept_identical_to_reference(shape, V):
    parents_row = PARENTS[shape]
    B, T = 7, len(parents_row)
    g = torch.Generator().manual_seed(V * T)
    logits = (2.5 * torch.randn(B, T, V, generator=g)).to(DEV)
    parents = torch.tensor([parents_row] * B, device=DEV)
    tokens = _likely_drafts(logits, parents, g)
    temperature, top_p, top_k = _params(B)
    for seed in (12345, 2**32, -(2**63)):  # three seeds as before, two of them needing the high half
        seed_t, off_t = torch.tensor(seed, device=DEV), torch.tensor(seed % 5, device=DEV)
        out = accept_tree(logits, tokens, parents, temperature, top_p, top_k, seed_t, off_t)
        ref = reference.accept_tree(logits, tokens, parents, temperature, top_p, top_k, seed_t, off_t)
        _assert_same(out, ref, f"seed {seed}: ")
    assert int(ref.accept_len.max()) > 0 or T == 1  # the drafts do get accepted somewhere


def test_sample_identical_to_reference():
    B, V = 14, 111
    g = torch.Generator().manual_seed(7)
    logits = (2 * torch.randn(B, V, generator=g)).to(DEV, torch.float16)
    temperature, top_p, top_k = _params(B)
    draws = []
    for seed in SEEDS:
        args = (logits, temperature, top_p, top_k, torch.tensor(seed, device=DEV), torch.tensor(3, device=DEV))
        out = sample_tokens(*args)
        ref = reference.sample_tokens(*args)
        assert torch.equal(out, ref), (seed, out.tolist(), ref.tolist())
        draws.append(out)
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[3])  # 0, 2**32, -2**32


@pytest.mark.parametrize("case", ["random", "ties", "fp16", "masked"])
def test_summary_is_the_reference_distribution(case):
    """Every row's cut (top-k with its ties, top-p over the renormalised top-k mass) is the reference's."""
    g = torch.Generator().manual_seed(len(case))
    settings = SETTINGS + [(1.0, 0.5, 9), (2.0, 0.95, 60), (1.0, 1.0, 111), (1.0, 0.3, 1)]
    B, T, V = len(settings), 4, 111
    if case == "ties":
        logits = torch.randint(0, 4, (B, T, V), generator=g).float()
        # top-p off the values where a tie group's count times its probability is exactly top_p (26 ties of 1/26
        # at top_p 0.5): there float rounding of the mass before each tie decides, in the reference too
        settings = [(t, p if p >= 1 else 0.97 * p + 0.013, k) for t, p, k in settings]
    else:
        logits = 3 * torch.randn(B, T, V, generator=g)
    if case == "fp16":
        logits = logits.half()
    if case == "masked":  # -inf logits (a vocabulary mask) and a row with a single finite logit
        logits[:, :, ::3] = float("-inf")
        logits[0, 1, 1:] = float("-inf")
    logits = logits.to(DEV)
    temperature, top_p, top_k = _params(B, settings)
    ours = _summary_probs(logits, temperature, top_p, top_k)
    ref = reference.process_logits(logits, temperature, top_p, top_k)
    bad = ((ours > 0) != (ref > 0)).any(-1)
    assert not bad.any(), f"rows {bad.nonzero().tolist()} keep other tokens than the reference"
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_tiny_temperature_is_greedy():
    B, T, V = 4, 3, 111
    g = torch.Generator().manual_seed(2)
    logits = (50 * torch.randn(B, T, V, generator=g)).to(DEV)  # 50 / 1e-37 overflows float32
    parents = torch.tensor([[-1, 0, 1]] * B, device=DEV)
    tokens = _likely_drafts(logits, parents, g)
    tiny = torch.tensor([1e-37, 1e-30, 9e-6, 0.0], device=DEV)
    top_p, top_k = torch.full((B,), 0.9, device=DEV), torch.full((B,), 5, device=DEV)
    s, o = torch.tensor(1, device=DEV), torch.tensor(0, device=DEV)
    out = accept_tree(logits, tokens, parents, tiny, top_p, top_k, s, o)
    greedy = reference.accept_tree(logits, tokens, parents, torch.zeros(B, device=DEV), top_p, top_k, s, o)
    _assert_same(out, greedy)
    assert torch.equal(sample_tokens(logits[:, 0], tiny, top_p, top_k, s, o), logits[:, 0].argmax(-1))


def test_ties_at_the_cut():
    # integer logits: many equal probabilities; top-k and top-p cuts fall inside groups of ties
    B, V = 8, 40
    g = torch.Generator().manual_seed(11)
    logits = torch.randint(0, 4, (B, 2, V), generator=g).float().to(DEV)
    parents = torch.tensor([[-1, 0]] * B, device=DEV)
    tokens = torch.randint(0, V, (B, 2), generator=g).to(DEV)
    temperature, top_p, top_k = _params(B, [(1.0, 1.0, 3), (1.0, 0.3, 0), (0.5, 0.5, 7), (1.0, 1.0, 9), (1.0, 0.4, 5)])
    for seed in range(3):
        s, o = torch.tensor(seed, device=DEV), torch.tensor(0, device=DEV)
        _assert_same(accept_tree(logits, tokens, parents, temperature, top_p, top_k, s, o),
                     reference.accept_tree(logits, tokens, parents, temperature, top_p, top_k, s, o), f"seed {seed}: ")
        assert torch.equal(sample_tokens(logits[:, 0], temperature, top_p, top_k, s, o),
                           reference.sample_tokens(logits[:, 0], temperature, top_p, top_k, s, o))


def test_greedy_exact():
    V = 30
    logits = torch.zeros(2, 5, V, device=DEV)
    target = [4, 9, 9, 2, 17]  # argmax after each node of a chain
    for i, tok in enumerate(target):
        logits[:, i, tok] = 1.0
    logits[:, 4, 3] = 1.0  # a tie at the last node: the lower index (3) wins
    parents = torch.tensor([[-1, 0, 1, 2, 3]] * 2, device=DEV)
    tokens = torch.tensor([[0, 4, 9, 9, 2], [0, 4, 9, 5, 2]], device=DEV)  # sequence 1 breaks at node 3
    zeros = torch.zeros(2, device=DEV)
    out = accept_tree(logits, tokens, parents, zeros, torch.ones(2, device=DEV), torch.zeros(2, dtype=torch.int64,
                      device=DEV), torch.tensor(0, device=DEV), torch.tensor(0, device=DEV))
    assert out.accept_len.tolist() == [4, 2]
    assert out.accept_path.tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, -1, -1]]
    assert out.next_token.tolist() == [3, 9]


def test_one_hot_rows_are_deterministic():
    # top_k = 1 or a vanishing top_p at temperature 1 leave a one-hot p: the walk must equal the greedy one
    B, T, V = 6, 6, 50
    g = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(DEV)
    parents = torch.tensor([[-1, 0, 0, 1, 2, 2]] * B, device=DEV)
    tokens = _likely_drafts(logits, parents, g)
    greedy = accept_tree(logits, tokens, parents, torch.zeros(B, device=DEV), torch.ones(B, device=DEV),
                         torch.zeros(B, dtype=torch.int64, device=DEV), torch.tensor(1, device=DEV),
                         torch.tensor(0, device=DEV))
    temperature, top_p, top_k = _params(B, [(1.0, 1.0, 1), (0.8, 1e-6, 0)])
    for seed in range(3):
        out = accept_tree(logits, tokens, parents, temperature, top_p, top_k, torch.tensor(seed, device=DEV),
                          torch.tensor(0, device=DEV))
        _assert_same(out, greedy)


def test_sample_distribution_matches_target():
    # 500 rows of one logits vector: each row draws from its own stream (counter b). No top-k/top-p here:
    # their cuts are checked token for token against the reference above, and cost ~30 interpreter passes.
    B, V, n_rep = 500, 8, 1
    logits = torch.linspace(-2, 1.5, V, device=DEV).expand(B, V).contiguous()
    temperature = torch.full((B,), 0.9, device=DEV)
    top_p = torch.ones(B, device=DEV)
    top_k = torch.zeros(B, dtype=torch.int64, device=DEV)
    p = reference.process_logits(logits[:1], temperature[:1], top_p[:1], top_k[:1])[0].double().cpu()
    _, sample = _kernel_or_reference()
    counts = torch.zeros(V, dtype=torch.float64)
    for rep in range(n_rep):
        draws = sample(logits, temperature, top_p, top_k, torch.tensor(99, device=DEV), torch.tensor(rep, device=DEV))
        counts += torch.bincount(draws.cpu(), minlength=V).double()
    assert counts[p == 0].sum() == 0, "a filtered-out token was sampled"
    scipy_stats = pytest.importorskip("scipy.stats")
    keep = p > 0
    chi2 = scipy_stats.chisquare(counts[keep].numpy(), (p[keep] / p[keep].sum() * counts.sum()).numpy())
    assert chi2.pvalue > 1e-3, f"chi-square p-value {chi2.pvalue:.2e}: counts {counts.tolist()} vs p {p.tolist()}"


def test_accept_emits_target_distribution():
    # star tree with 3 drafted children; the first emitted token must follow p(root) whatever the drafts are
    B, V = 400, 8
    accept, _ = _kernel_or_reference()
    row = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], device=DEV)
    logits = row.expand(B, 4, V).contiguous()
    parents = torch.tensor([[-1, 0, 0, 0]] * B, device=DEV)
    tokens = torch.tensor([[0, 0, 1, 7]] * B, device=DEV)
    temperature = torch.ones(B, device=DEV)
    out = accept(logits, tokens, parents, temperature, torch.ones(B, device=DEV),
                 torch.zeros(B, dtype=torch.int64, device=DEV), torch.tensor(5, device=DEV), torch.tensor(1, device=DEV))
    first = torch.where(out.accept_len > 0, tokens.gather(1, out.accept_path[:, 1:2].clamp(min=0)).squeeze(1),
                        out.next_token)
    counts = torch.bincount(first.cpu(), minlength=V).double()
    p = torch.softmax(row.double().cpu(), 0)
    tv = 0.5 * (counts / B - p).abs().sum()
    assert tv < 3.0 * (V / B) ** 0.5, f"total variation {tv:.3f}: counts {counts.tolist()}"
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.chisquare(counts.numpy(), (p / p.sum() * B).numpy()).pvalue > 1e-3


def test_bad_inputs():
    logits = torch.randn(2, 3, 10, device=DEV)
    par = torch.tensor([[-1, 0, 0]] * 2, device=DEV)
    tok = torch.zeros(2, 3, dtype=torch.int64, device=DEV)
    t, p, k = torch.ones(2, device=DEV), torch.ones(2, device=DEV), torch.zeros(2, dtype=torch.int64, device=DEV)
    s = torch.tensor(0, device=DEV)
    with pytest.raises(ValueError, match="parents"):
        accept_tree(logits, tok, par[:, :2], t, p, k, s, s)
    with pytest.raises(ValueError, match="top_k"):
        accept_tree(logits, tok, par, t, p, k.float(), s, s)
    with pytest.raises(ValueError, match="seed"):
        sample_tokens(logits[:, 0], t, p, k, torch.zeros(2, dtype=torch.int64, device=DEV), s)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        out = accept_tree(torch.randn(2, 5, 30), torch.zeros(2, 5, dtype=torch.int64),
                          torch.tensor([[-1, 0, 0, 1, 1]] * 2), torch.ones(2), torch.ones(2),
                          torch.zeros(2, dtype=torch.int64), torch.tensor(0), torch.tensor(0))
    assert [tuple(t.shape) for t in out] == [(2, 5), (2,), (2,)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_llama_vocab(dtype):
    B, T, V = 4, 64, 32000
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(DEV, dtype)
    parents = torch.tensor([[-1] + [(i - 1) // 3 for i in range(1, T)]] * B, device=DEV)
    tokens = _likely_drafts(logits, parents, g)
    temperature, top_p, top_k = _params(B, [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.9, 0), (1.0, 0.95, 40)])
    for seed in range(3):
        s, o = torch.tensor(seed, device=DEV), torch.tensor(0, device=DEV)
        _assert_same(accept_tree(logits, tokens, parents, temperature, top_p, top_k, s, o),
                     reference.accept_tree(logits, tokens, parents, temperature, top_p, top_k, s, o))
