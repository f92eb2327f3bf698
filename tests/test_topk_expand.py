"""Triton fused top-k tree expansion against the PyTorch reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.topk_expand import topk_expand  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
INT_FIELDS = ("child_tokens", "top_index", "top_parent", "top_tokens")


def _compare(out, logits, parent_scores, k, out_k=None, token_map=None, atol=1e-6):
    ref = reference.topk_expand(logits, parent_scores, k, out_k, token_map)
    for name in INT_FIELDS:
        a, b = getattr(out, name), getattr(ref, name)
        assert a.dtype == torch.int64 and a.shape == b.shape, name
        bad = a != b
        if bad.any():
            pytest.fail(f"{name}: {int(bad.sum())} of {bad.numel()} differ, first at {bad.nonzero()[:8].tolist()}: "
                        f"kernel {a[bad][:8].tolist()} reference {b[bad][:8].tolist()}")
    # scores: error-relative against float64, next to float32 torch
    gold = torch.log_softmax(logits.double(), -1).gather(-1, ref.child_tokens if token_map is None else
                                                         _inverse(token_map)[ref.child_tokens])
    gold = gold + parent_scores.double().unsqueeze(-1)
    err_torch = (ref.child_scores.double() - gold).abs().max()
    err = (out.child_scores.double() - gold).abs()
    bound = 2 * err_torch + atol
    if (err > bound).any():
        pytest.fail(f"{int((err > bound).sum())} child scores off by > {float(bound):.3g} (max {float(err.max()):.3g})")
    torch.testing.assert_close(out.top_scores, out.child_scores.flatten(1).gather(1, out.top_index), atol=0, rtol=0)
    assert out.child_scores.dtype == out.top_scores.dtype == torch.float32


def _inverse(token_map):
    inv = torch.zeros(int(token_map.max()) + 1, dtype=torch.int64, device=token_map.device)
    inv[token_map] = torch.arange(token_map.numel(), device=token_map.device)
    return inv


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,N,V,k,out_k", [
    (1, 1, 2, 1, None),  # the docstring example's shape
    (2, 3, 111, 4, 5),  # odd vocabulary
    (1, 5, 1000, 10, 10),  # several chunks per row
    (3, 4, 300, 3, 12),  # out_k = N * k: every child
    (1, 2, 7, 7, 9),  # k = V
    (1, 9, 500, 16, 20),
])
def test_matches_reference(B, N, V, k, out_k, dtype):
    g = torch.Generator().manual_seed(V + k)
    logits = (3 * torch.randn(B, N, V, generator=g)).to(DEV, dtype)
    parent = torch.randn(B, N, generator=g).to(DEV)
    _compare(topk_expand(logits, parent, k, out_k), logits, parent, k, out_k)


def test_docstring_example():
    out = topk_expand(torch.tensor([[[0.0, 1.0986122886681098]]], device=DEV), torch.zeros(1, 1, device=DEV), 1)
    assert out.child_tokens.tolist() == [[[1]]]
    torch.testing.assert_close(out.child_scores, torch.full((1, 1, 1), 0.75, device=DEV).log())


def test_ties_go_to_lower_index():
    g = torch.Generator().manual_seed(1)
    row = torch.randint(0, 3, (200,), generator=g).float()  # many equal logits
    logits = row.expand(2, 4, 200).clone().to(DEV)  # identical rows: identical children scores
    parent = torch.zeros(2, 4, device=DEV)
    _compare(topk_expand(logits, parent, 6, 10), logits, parent, 6, 10)


def test_masked_vocabulary_and_short_rows():
    logits = torch.full((1, 3, 150), float("-inf"), device=DEV)
    logits[0, 0, 140] = 1.0  # one finite logit: the other children are -inf, lowest ids first
    logits[0, 1, :] = 0.5
    logits[0, 2, 3] = -2.0
    logits[0, 2, 77] = -2.0
    parent = torch.tensor([[0.0, -1.0, -0.5]], device=DEV)
    out = topk_expand(logits, parent, 4, 6)
    ref = reference.topk_expand(logits, parent, 4, 6)
    for name in INT_FIELDS:
        assert torch.equal(getattr(out, name), getattr(ref, name)), name
    torch.testing.assert_close(out.child_scores, ref.child_scores)


def test_token_map():
    g = torch.Generator().manual_seed(3)
    V = 111
    logits = torch.randn(2, 3, V, generator=g).to(DEV)
    parent = torch.randn(2, 3, generator=g).to(DEV)
    token_map = (torch.randperm(V, generator=g) * 7 + 5).to(DEV)
    _compare(topk_expand(logits, parent, 5, 8, token_map), logits, parent, 5, 8, token_map)


def test_large_k_uses_reference_path():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 2, 300, generator=g).to(DEV)
    parent = torch.zeros(1, 2, device=DEV)
    _compare(topk_expand(logits, parent, 130, 140), logits, parent, 130, 140)


def test_strided_logits():
    g = torch.Generator().manual_seed(5)
    big = torch.randn(2, 3, 400, generator=g).to(DEV)
    logits = big[:, :, ::2]  # stride 2 along the vocabulary
    parent = torch.randn(3, 2, generator=g).to(DEV).t()
    _compare(topk_expand(logits, parent, 3, 4), logits, parent, 3, 4)


def test_bad_inputs():
    logits = torch.randn(1, 2, 10, device=DEV)
    with pytest.raises(ValueError, match="k must"):
        topk_expand(logits, torch.zeros(1, 2, device=DEV), 11)
    with pytest.raises(ValueError, match="out_k"):
        topk_expand(logits, torch.zeros(1, 2, device=DEV), 2, 5)
    with pytest.raises(ValueError, match="parent_scores"):
        topk_expand(logits, torch.zeros(2, 1, device=DEV), 2)
    with pytest.raises(ValueError, match="token_map"):
        topk_expand(logits, torch.zeros(1, 2, device=DEV), 2, token_map=torch.arange(9, device=DEV))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        out = topk_expand(mode.from_tensor(torch.randn(2, 3, 50)), mode.from_tensor(torch.zeros(2, 3)), 4, 7)
    assert [tuple(t.shape) for t in out] == [(2, 3, 4), (2, 3, 4), (2, 7), (2, 7), (2, 7), (2, 7)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("V", [32000, 128256])
def test_cuda_draft_shapes(V, dtype):
    g = torch.Generator().manual_seed(V)
    logits = (4 * torch.randn(1, 10, V, generator=g)).to(DEV, dtype)
    parent = torch.randn(1, 10, generator=g).to(DEV)
    _compare(topk_expand(logits, parent, 10, 10), logits, parent, 10, 10)
    logits = (4 * torch.randn(2, 64, V, generator=g)).to(DEV, dtype)
    parent = torch.randn(2, 64, generator=g).to(DEV)
    _compare(topk_expand(logits, parent, 16, 60), logits, parent, 16, 60)


@pytest.mark.cuda
def test_cuda_graph():
    logits = torch.randn(1, 10, 32000, device=DEV)
    parent = torch.zeros(1, 10, device=DEV)
    topk_expand(logits, parent, 10)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = topk_expand(logits, parent, 10)
    logits.copy_(torch.randn_like(logits))
    graph.replay()
    ref = reference.topk_expand(logits, parent, 10)
    assert torch.equal(out.top_tokens, ref.top_tokens)
