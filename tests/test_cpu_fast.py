"""The fast CPU backend (eagle_kernels.cpu_fast) against the references: same tokens, paths and tie rules."""

from __future__ import annotations

import pytest
import torch

from eagle_kernels import cpu_fast, get_ops, reference

# (temperature, top_p, top_k): greedy, plain, top-p, top-k, both, top-k = 1, tiny top-p
SETTINGS = [(0.0, 1.0, 0), (1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 5), (0.9, 0.6, 4), (1.0, 1.0, 1), (1.0, 1e-4, 0)]
PARENTS = {
    "single": [-1],
    "chain": [-1, 0, 1, 2, 3],
    "star": [-1, 0, 0, 0, 0, 0],
    "tree": [-1, 0, 0, 1, 1, 2, 0, 3],
    "deep": [-1, 0, 1, 1, 2, 4, 5, 6, 7, 3, 9, 10, 11, 8],
}


def _drafts(logits, parents, g):
    """Draft tokens near the top of the parent's target row (so paths get accepted); siblings may repeat."""
    B, T, V = logits.shape
    top = logits.topk(3, dim=-1).indices
    pick = torch.randint(0, 3, (B, T), generator=g)
    tok = top.gather(1, parents.clamp(min=0)[..., None].expand(B, T, 3)).gather(2, pick[..., None])[..., 0]
    tok[:, 0] = 0
    return tok


def _same(a, b, what):
    for name in a._fields:
        x, y = getattr(a, name), getattr(b, name)
        assert torch.equal(x, y), f"{what}: {name} fast {x.tolist()} reference {y.tolist()}"


@pytest.mark.parametrize("shape", list(PARENTS))
@pytest.mark.parametrize("V", [5, 111])  # V = 5 with rounded logits: argmax ties everywhere
def test_accept_tree_identical(shape, V):
    row = PARENTS[shape]
    B, T = 7, len(row)
    g = torch.Generator().manual_seed(V * 100 + T)
    parents = torch.tensor([row] * B)
    accepted = 0
    for trial in range(6):
        logits = 2.5 * torch.randn(B, T, V, generator=g)
        if V == 5:
            logits = logits.round()
        tokens = _drafts(logits, parents, g)
        rows = [SETTINGS[(i + trial) % len(SETTINGS)] for i in range(B)]
        t, p, k = (torch.tensor(x) for x in zip(*rows))
        for temps in (torch.zeros(B), t):  # an all-greedy batch (the fast path) and a mixed one
            seed, off = torch.tensor(trial * 7919 + 2**40), torch.tensor(trial % 3)
            out = cpu_fast.accept_tree(logits, tokens, parents, temps, p, k, seed, off)
            ref = reference.accept_tree(logits, tokens, parents, temps, p, k, seed, off)
            _same(out, ref, f"{shape} V={V} trial {trial} temps {temps.tolist()}")
            accepted += int(ref.accept_len.sum())
    assert accepted > 0 or T == 1


def test_accept_tree_varied_trees_per_row():
    """Each row its own random tree (as dynamic trees are), duplicate sibling tokens included."""
    g = torch.Generator().manual_seed(3)
    B, T, V = 6, 12, 9
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)])
                           for _ in range(B)])
    for trial in range(10):
        logits = (2 * torch.randn(B, T, V, generator=g)).round()
        tokens = torch.randint(0, 3, (B, T), generator=g)  # few distinct tokens: repeated siblings
        for temps in (torch.zeros(B), torch.tensor([0.0, 1.0, 0.5, 2.0, 1.0, 0.0])):
            args = (logits, tokens, parents, temps, torch.ones(B), torch.zeros(B, dtype=torch.long),
                    torch.tensor(trial), torch.tensor(1))
            _same(cpu_fast.accept_tree(*args), reference.accept_tree(*args), f"trial {trial}")


def test_sample_tokens_identical():
    g = torch.Generator().manual_seed(7)
    B, V = 14, 111
    logits = (2 * torch.randn(B, V, generator=g)).round()  # ties for the greedy rows
    rows = [SETTINGS[i % len(SETTINGS)] for i in range(B)]
    t, p, k = (torch.tensor(x) for x in zip(*rows))
    for temps in (torch.zeros(B), t):
        for seed in range(3):
            a = cpu_fast.sample_tokens(logits, temps, p, k, torch.tensor(seed), torch.tensor(2))
            b = reference.sample_tokens(logits, temps, p, k, torch.tensor(seed), torch.tensor(2))
            assert torch.equal(a, b), (a.tolist(), b.tolist())



@pytest.mark.parametrize("shape", [(5, 111), (3, 4, 37), (2, 1, 512)])
def test_process_logits_bit_identical_and_sort_free_without_top_p(shape, monkeypatch):
    """Temperature and top-k without top-p skip the reference's sorts and give the same bits; anything else is the
    reference itself."""
    g = torch.Generator().manual_seed(sum(shape))
    B = shape[0]
    for trial in range(4):
        logits = 3 * torch.randn(*shape, generator=g)
        if trial % 2:
            logits = logits.round()  # ties at the k-th value: all of them are kept
        temps = torch.rand(B, generator=g) * 1.5 + 0.2
        ks = torch.tensor([[0, 1, 5, shape[-1], shape[-1] + 3][(b + trial) % 5] for b in range(B)])
        ref = reference.process_logits(logits, temps, torch.ones(B), ks)
        with monkeypatch.context() as m:  # the fast path must not fall back to the reference here
            m.setattr(reference, "process_logits", None)
            fast = cpu_fast.process_logits(logits, temps, torch.ones(B), ks)
        assert torch.equal(fast, ref), (fast - ref).abs().max()
        for temps2, tp in ((temps, torch.full((B,), 0.7)), (torch.zeros(B), torch.ones(B))):  # the reference's cases
            assert torch.equal(cpu_fast.process_logits(logits, temps2, tp, ks),
                               reference.process_logits(logits, temps2, tp, ks))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("B,N,V,k,out_k", [(1, 1, 111, 4, 4), (2, 5, 111, 3, 6), (3, 4, 7, 7, 10), (1, 3, 9, 1, 3)])
def test_topk_expand_identical(B, N, V, k, out_k, tied):
    g = torch.Generator().manual_seed(B * N * V + k)
    logits = torch.randn(B, N, V, generator=g)
    if tied:
        logits = logits.round()  # many equal logits: the fast path must fall back to the tie rule
        logits[:, -1] = logits[:, 0]  # two identical rows: equal child scores across rows
    scores = torch.zeros(B, N) if tied else torch.randn(B, N, generator=g)
    tmap = torch.randperm(V, generator=g) + 1000
    for token_map in (None, tmap):
        out = cpu_fast.topk_expand(logits, scores, k, out_k, token_map)
        ref = reference.topk_expand(logits, scores, k, out_k, token_map)
        for name in ref._fields:
            assert torch.equal(getattr(out, name), getattr(ref, name)), name


def test_topk_low_index_rule():
    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    vals, idx = cpu_fast.topk_low_index(x, 2)
    assert idx.tolist() == [[1, 2], [0, 1]] and vals.tolist() == [[3.0, 3.0], [2.0, 2.0]]
    # NaNs (the reference's stable sort puts them first) and distinct values give the reference's answer
    y = torch.tensor([[0.5, float("nan"), 2.0, 1.0, float("nan")], [4.0, 1.0, 3.0, 2.0, 0.0]])
    for k in (1, 2, 3):
        ref_v, ref_i = reference._topk_stable(y, k)
        v, i = cpu_fast.topk_low_index(y, k)
        assert torch.equal(i, ref_i) and torch.allclose(v, ref_v, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["decode", "tree", "ragged", "empty_prefix"])
def test_tree_attention_matches_reference(case, dtype):
    g = torch.Generator().manual_seed(1)
    B, Hq, Hkv, D, S = 3, 4, 1, 16, 40
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]] * B)
    mask = reference.build_tree_buffers(parents).mask
    prefix = {"decode": [9, 9, 9], "tree": [7, 7, 7], "ragged": [0, 1, 13], "empty_prefix": [0, 0, 0]}[case]
    if case == "decode":
        mask = torch.ones(B, 1, 1, dtype=torch.bool)
    if case == "empty_prefix":
        mask = mask.clone()
        mask[1, 2] = False  # a query that sees nothing at all gets zeros
    T = mask.shape[1]
    q = torch.randn(B, T, Hq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    pl = torch.tensor(prefix)
    exact = reference.tree_attention(q.double(), k.double(), v.double(), pl, mask).float()
    ref = reference.tree_attention(q, k, v, pl, mask).float()
    out = cpu_fast.tree_attention(q, k, v, pl, mask)
    assert out.dtype == dtype and out.shape == q.shape
    err, err_ref = (out.float() - exact).abs().max(), (ref - exact).abs().max()
    assert err <= 2 * err_ref + 1e-5, f"fast {err:.3g} vs reference {err_ref:.3g}"
    if case == "empty_prefix":
        assert torch.all(out[1, 2] == 0)


def test_kv_compact_identical():
    g = torch.Generator().manual_seed(5)
    Lp, B, H, S, D = 4, 3, 2, 30, 5
    cache = torch.randn(Lp, B, H, S, D, generator=g)
    prefix = torch.tensor([0, 4, 11])
    path = torch.tensor([[0, 2, 5, -1, -1, -1], [0, -1, -1, -1, -1, -1], [0, 1, 3, 4, 5, -1]])
    acc = torch.tensor([2, 0, 4])
    a = cpu_fast.kv_compact(cache.clone(), prefix, path, acc)
    b = reference.kv_compact(cache.clone(), prefix, path, acc)
    assert torch.equal(a, b)


def test_auto_backend_is_cpu_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("auto picks triton where CUDA is present")
    with pytest.warns(UserWarning, match="'cpu' backend"):
        import eagle_kernels.backend as be

        be._warned_fallback = False
        assert get_ops("auto").name == "cpu"
    assert get_ops("torch").name == "torch"  # the reference stays reachable


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_pieces_bit_identical(dtype):
    """Norms and rope + cache write: the same bits as the references (float32 runs the lean path, others the
    reference itself), and the rotary tables memo follows in-place changes of the positions."""
    g = torch.Generator().manual_seed(11)
    B, T, nh, nkv, D, S = 2, 5, 4, 2, 16, 12
    x = torch.randn(B, T, 64, generator=g).to(dtype)
    res = torch.randn(B, T, 64, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
    assert torch.equal(cpu_fast.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    for a, b in zip(cpu_fast.add_rms_norm(x, res, w, 1e-6), reference.add_rms_norm(x, res, w, 1e-6)):
        assert torch.equal(a, b)
    qkv = torch.randn(B, T, (nh + 2 * nkv) * D, generator=g).to(dtype)
    ang = torch.arange(S)[:, None] * torch.rand(D // 2, generator=g)[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    positions = torch.randint(0, S, (B, T), generator=g)
    write = torch.stack([torch.randperm(S, generator=g)[:T] for _ in range(B)])
    memo = cpu_fast._Memo()  # one forward's memo (cpu_fast.bind_forward)
    for _ in range(2):  # the second round reuses the memo, then the positions change in place
        caches = [torch.zeros(B, nkv, S, D, dtype=dtype) for _ in range(4)]
        q1 = cpu_fast.rope_kv_write(qkv, cos, sin, positions, caches[0], caches[1], write, nh, nkv, memo=memo)
        q2 = reference.rope_kv_write(qkv, cos, sin, positions, caches[2], caches[3], write, nh, nkv)
        assert torch.equal(q1, q2) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
        positions.add_(1).clamp_(max=S - 1)


def test_attention_plan_memo_follows_in_place_changes():
    """One plan per forward: the same prefix/mask objects reuse it, an in-place change of either rebuilds it."""
    g = torch.Generator().manual_seed(5)
    B, T, H, D, S = 2, 3, 2, 8, 20
    kc, vc = torch.randn(B, H, S, D, generator=g), torch.randn(B, H, S, D, generator=g)
    q = torch.randn(B, T, H, D, generator=g)
    mask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T).clone()
    prefix = torch.tensor([4, 9])
    memo = cpu_fast._Memo()
    for _ in range(3):
        out = cpu_fast.tree_attention(q, kc, vc, prefix, mask, memo=memo)
        ref = reference.tree_attention(q, kc, vc, prefix, mask)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        prefix.add_(3)  # same object, new contents
        mask[:, 2, 1] = False
