"""Triton KV compaction against the PyTorch reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.kv_compact import kv_compact  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _paths(parents_rows, accept_nodes):
    """accept_path/accept_len for the given accepted leaf per sequence, from the reference tree buffers."""
    parents = torch.tensor(parents_rows, device=DEV)
    paths = reference.build_tree_buffers(parents).paths
    leaf = torch.tensor(accept_nodes, device=DEV)
    path = paths[torch.arange(len(accept_nodes), device=DEV), leaf]
    return path, (path >= 0).sum(-1) - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference(dtype):
    rows = [[-1, 0, 0, 1, 1, 2, 5, 6], [-1, 0, 1, 2, 3, 4, 5, 6], [-1, 0, 0, 0, 0, 0, 0, 0], [-1, 0, 0, 1, 2, 3, 4, 5]]
    path, acc_len = _paths(rows, [6, 7, 0, 7])  # a branch, a full chain, the root only, a late branch
    prefix = torch.tensor([0, 1, 5, 3], device=DEV)
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(3, 4, 2, 17, 8, generator=g).to(DEV, dtype)
    expect = reference.kv_compact(cache.clone(), prefix, path, acc_len)
    got = kv_compact(cache, prefix, path, acc_len)
    assert got.data_ptr() == cache.data_ptr()
    for b in range(4):
        n = int(acc_len[b]) + 1
        p = int(prefix[b])
        assert torch.equal(got[:, b, :, : p + n], expect[:, b, :, : p + n]), f"sequence {b}"


def test_odd_head_dim_and_strided_cache():
    path, acc_len = _paths([[-1, 0, 1, 0, 3, 4]], [5])  # path 0 -> 3 -> 4 -> 5: every entry moves
    base = torch.randn(2, 1, 24, 3, 5, device=DEV)  # [L, B, S, H, D] storage
    cache = base.transpose(2, 3)  # [L, B, H, S, D] view with odd strides, D = 5
    prefix = torch.tensor([9], device=DEV)
    expect = reference.kv_compact(cache.clone(), prefix, path, acc_len)
    kv_compact(cache, prefix, path, acc_len)
    assert torch.equal(cache[:, :, :, :13], expect[:, :, :, :13])


def test_bad_inputs():
    cache = torch.zeros(2, 2, 1, 8, 4, device=DEV)
    path = torch.zeros(2, 3, dtype=torch.int64, device=DEV)
    n = torch.zeros(2, dtype=torch.int64, device=DEV)
    with pytest.raises(ValueError, match="cache"):
        kv_compact(cache[0], n, path, n)
    with pytest.raises(ValueError, match="accept_path"):
        kv_compact(cache, n, path[:1], n)
    with pytest.raises(ValueError, match="prefix_len"):
        kv_compact(cache, n.float(), path, n)


@pytest.mark.cuda
def test_cuda_llama_shape_and_graph():
    L, B, H, S, D = 64, 2, 32, 2200, 128
    cache = torch.randn(L, B, H, S, D, device=DEV, dtype=torch.bfloat16)
    rows = [[-1] + [(i - 1) // 2 for i in range(1, 60)]] * B
    path, acc_len = _paths(rows, [58, 45])
    prefix = torch.tensor([2048, 17], device=DEV)
    expect = reference.kv_compact(cache.clone(), prefix, path, acc_len)
    graph = torch.cuda.CUDAGraph()
    work = cache.clone()
    kv_compact(work.clone(), prefix, path, acc_len)  # compile outside the capture
    with torch.cuda.graph(graph):
        kv_compact(work, prefix, path, acc_len)
    graph.replay()
    for b in range(B):
        n, p = int(acc_len[b]) + 1, int(prefix[b])
        assert torch.equal(work[:, b, :, : p + n], expect[:, b, :, : p + n])
