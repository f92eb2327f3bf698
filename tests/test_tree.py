"""Tree buffers against a brute-force construction, and the trees the runtime drafts."""

from __future__ import annotations

import random

import pytest
import torch

from eagle_kernels.reference import build_tree_buffers
from eagle_runtime.tree import MC_SIM_7B_63, DynamicTree, StaticTree


def random_parents(T: int, kind: str, rng: random.Random) -> list[int]:
    if kind == "chain":
        return [-1] + list(range(T - 1))
    if kind == "star":
        return [-1] + [0] * (T - 1)
    if kind == "deep":
        return [-1] + [max(0, i - 1 - rng.randrange(2)) for i in range(1, T)]
    return [-1] + [rng.randrange(i) for i in range(1, T)]  # wide / random


def brute_force(parents: list[int]):
    T = len(parents)
    anc = []
    for i in range(T):
        chain, j = [], i
        while j >= 0:
            chain.append(j)
            j = parents[j]
        anc.append(chain[::-1])
    mask = [[j in anc[i] for j in range(T)] for i in range(T)]
    depth = [len(a) - 1 for a in anc]
    children = [[c for c in range(T) if parents[c] == i] for i in range(T)]
    first = [ch[0] if ch else -1 for ch in children]
    nxt = [-1] * T
    for ch in children:
        for a, b in zip(ch, ch[1:]):
            nxt[a] = b
    return mask, depth, first, nxt, anc


@pytest.mark.parametrize("kind", ["chain", "star", "deep", "wide", "single"])
def test_tree_buffers_match_brute_force(kind):
    rng = random.Random(hash(kind) % 1000)
    T = 1 if kind == "single" else 23
    batch = [random_parents(T, kind if kind != "single" else "wide", rng) for _ in range(3)]
    bufs = build_tree_buffers(torch.tensor(batch))
    for b, parents in enumerate(batch):
        mask, depth, first, nxt, anc = brute_force(parents)
        assert bufs.mask[b].tolist() == mask
        assert bufs.depth[b].tolist() == depth
        assert bufs.first_child[b].tolist() == first
        assert bufs.next_sibling[b].tolist() == nxt
        for i in range(T):
            assert bufs.paths[b, i].tolist() == anc[i] + [-1] * (T - len(anc[i]))


def test_tree_buffers_reject_bad_parents():
    with pytest.raises(ValueError):
        build_tree_buffers(torch.tensor([[0, 0]]))
    with pytest.raises(ValueError):
        build_tree_buffers(torch.tensor([[-1, 1]]))
    with pytest.raises(ValueError, match="depth"):
        build_tree_buffers(torch.tensor([[-1, 0, 1]]), max_depth=1)


def test_static_tree_is_mc_sim_7b_63():
    t = StaticTree()
    assert t.num_nodes == 26 and t.max_depth == 5 and len(MC_SIM_7B_63) == 25
    with pytest.raises(ValueError, match="parent"):
        StaticTree([[0, 1]])


@pytest.mark.parametrize("choices,exc", [
    ([[-1]], ValueError), ([[0], [-1]], ValueError), ([[0], [0, -2]], ValueError), ([[]], ValueError),
    ("abc", TypeError), ([0, 1], TypeError), ([["a"]], TypeError), ([[0.0]], TypeError), ([[True]], TypeError),
    (None, TypeError), ([[0], "0"], TypeError),
])  # fmt: skip
def test_static_tree_rejects_bad_rank_paths(choices, exc):
    """Issue 31, item 5: a rank path is a non-empty list of ranks >= 0 (0 the draft's top token). Negative ranks
    indexed from the end of the top-k (or failed with an IndexError), other types failed deep inside sorting."""
    with pytest.raises(exc, match="StaticTree choices") as e:
        StaticTree(choices)
    assert "\n" not in str(e.value)


def test_static_tree_takes_tuples_and_numpy_ranks():
    import numpy as np

    t = StaticTree(((0,), (1,), (np.int64(0), 0)))
    assert t.choices == [[0], [1], [0, 0]] and all(type(r) is int for c in t.choices for r in c)
    assert t.parents == StaticTree([[0], [1], [0, 0]]).parents


class _FakeStep:
    """A draft 'head' whose logits depend on the hidden state, to check the drafted tree's structure."""

    def __init__(self, V, H, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(H, V, generator=g)
        self.E = torch.randn(V, H, generator=g)

    def __call__(self, h_in, tokens, positions, write_pos, mask):
        h = torch.tanh(h_in + self.E[tokens])
        return h, h @ self.W


def test_dynamic_tree_keeps_best_connected_candidates():
    from eagle_kernels import get_ops

    ops = get_ops("torch")
    V, H, B = 37, 8, 2
    step = _FakeStep(V, H)
    tree = DynamicTree(total_tokens=15, depth=3, top_k=4)
    d_hidden = torch.randn(B, H)
    root = torch.tensor([3, 5])
    tokens, parents = tree.draft(step, d_hidden, d_hidden @ step.W, root, torch.tensor([4, 9]), ops)
    assert tokens.shape == parents.shape == (B, 16)
    build_tree_buffers(parents)  # valid topological tree
    assert (tokens[:, 0] == root).all()
    # Brute force: every candidate path's score; the kept set must be the 15 best.
    for b in range(B):
        scores = {}

        def expand(path_tokens, h, score, depth):
            logp = torch.log_softmax(h @ step.W, -1)
            top = torch.topk(logp, tree.top_k)
            kids = []
            for v, t in zip(top.values.tolist(), top.indices.tolist()):
                scores[tuple(path_tokens + [t])] = score + v
                kids.append((path_tokens + [t], score + v, torch.tanh(h + step.E[t])))
            if depth < tree.depth:
                best = sorted(kids, key=lambda k: -k[1])  # frontier of this level is chosen globally below
                return best
            return []

        # level-synchronous expansion like EAGLE-2: the frontier is the global top_k of each level
        frontier = [([], 0.0, d_hidden[b])]
        for depth in range(tree.depth + 1):
            kids = []
            for path, score, h in frontier:
                kids += expand(path, h, score, 0)
            frontier = sorted(kids, key=lambda k: -k[1])[: tree.top_k]
        best = sorted(scores.values(), reverse=True)[: tree.total_tokens]
        got = []
        for i in range(1, 16):
            path, j = [], i
            while j > 0:
                path.append(int(tokens[b, j]))
                j = int(parents[b, j])
            got.append(scores[tuple(path[::-1])])
        assert sorted(got, reverse=True) == pytest.approx(best, abs=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 4])
@pytest.mark.parametrize("mapped", [False, True])
def test_chain_shortcut_equals_the_general_expansion(depth, mapped):
    """``top_k = 1`` takes :meth:`DynamicTree._draft_chain` (also the sampled chains' drafting): the same tokens,
    parents and draft-step calls (inputs, positions, write slots, masks) as the general expansion, ties included
    (first index wins)."""
    from eagle_kernels import get_ops

    V, H, B = 29, 8, 3
    step = _FakeStep(V, H)
    step.W[:, 7] = step.W[:, 3]  # tokens 3 and 7 always tie: the lower one must win in both paths
    step.E = torch.randn(100, H)  # embeddings of target ids (the map sends draft ids into [0, 100))
    calls = {"chain": [], "tree": []}

    def recording(name):
        def f(h_in, tokens, pos, write_pos, mask):
            calls[name].append((h_in.clone(), tokens.clone(), pos.clone(), write_pos.clone(), mask.clone()))
            return step(h_in, tokens, pos, write_pos, mask)
        return f

    tree = DynamicTree(total_tokens=depth + 1, depth=depth, top_k=1)
    token_map = torch.randperm(100)[:V] if mapped else None
    d_hidden = torch.randn(B, H)
    d_logits = d_hidden @ step.W
    d_logits[0, 3] = d_logits[0, 7] = d_logits[0].max() + 1  # a tie at the root expansion too
    root, L = torch.tensor([3, 5, 1]), torch.tensor([4, 9, 6])
    ops = get_ops("torch")
    a = tree.draft(recording("chain"), d_hidden, d_logits, root, L, ops, token_map=token_map)
    b = tree._draft_tree(recording("tree"), d_hidden, d_logits, root, L, ops, token_map=token_map)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (B, depth + 2)
    assert int(a[0][0, 1]) == (int(token_map[3]) if mapped else 3)
    assert len(calls["chain"]) == len(calls["tree"]) == depth
    for x, y in zip(calls["chain"], calls["tree"]):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
