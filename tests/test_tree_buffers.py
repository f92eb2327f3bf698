"""Native tree bookkeeping ops (eagle_kernels._C) against eagle_kernels.reference."""

from __future__ import annotations

import types

import pytest
import torch

from eagle_kernels import reference, tree_buffers
from eagle_kernels.backend import BackendUnavailable
from eagle_kernels.tree_buffers import build_tree_buffers

native = pytest.mark.skipif(
    tree_buffers._C is None, reason=f"eagle_kernels._C is not built ({tree_buffers._IMPORT_ERROR}); see csrc/README.md"
)
native_cuda = pytest.mark.skipif(
    not tree_buffers.native_cuda_available(),
    reason="eagle_kernels._C is not built" if tree_buffers._C is None else "eagle_kernels._C was built without CUDA",
)

# EAGLE-1 static tree mc_sim_7b_63: root + 25 drafted nodes, depth 5.
EAGLE1 = [-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21]


def chain(T: int) -> list[int]:
    return list(range(-1, T - 1))


def star(T: int) -> list[int]:
    return [-1] + [0] * (T - 1)


def random_tree(T: int, gen: torch.Generator, style: str) -> list[int]:
    """``uniform``: parent uniform in [0, i); ``deep``: parent among the last 3 nodes; ``levels``: EAGLE-2-like
    layers of up to 10 nodes whose parents lie in the previous layer."""
    par = [-1]
    layer_start, prev_start = 1, 0
    for i in range(1, T):
        if style == "uniform":
            par.append(int(torch.randint(0, i, (1,), generator=gen)))
        elif style == "deep":
            par.append(int(torch.randint(max(0, i - 3), i, (1,), generator=gen)))
        else:
            if i - layer_start == 10:
                prev_start, layer_start = layer_start, i
            par.append(int(torch.randint(prev_start, layer_start, (1,), generator=gen)))
    return par


def assert_same(got: reference.TreeBuffers, want: reference.TreeBuffers) -> None:
    for name, g, w in zip(reference.TreeBuffers._fields, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        g = g.cpu()
        bad = (g != w).nonzero()
        assert bad.numel() == 0, f"{name}: {len(bad)} mismatches, first at {bad[:5].tolist()}"


TREES = {
    "single": [[-1]],
    "docstring": [[-1, 0, 0, 1]],
    "chain": [chain(9)],
    "star": [star(9)],
    "deep": [chain(200)],
    "wide": [star(300)],
    "eagle1": [EAGLE1],
    "batch3": [EAGLE1, chain(26), star(26)],
}


@native
@pytest.mark.parametrize("name", list(TREES))
@pytest.mark.parametrize("max_depth", [None, "exact", "wider"])
def test_cpu_matches_reference(name, max_depth):
    parents = torch.tensor(TREES[name], dtype=torch.int64)
    exact = int(reference.build_tree_buffers(parents).depth.max())
    md = {None: None, "exact": exact, "wider": exact + 3}[max_depth]
    assert_same(build_tree_buffers(parents, md), reference.build_tree_buffers(parents, md))


@native
@pytest.mark.parametrize("style", ["uniform", "deep", "levels"])
@pytest.mark.parametrize("B,T", [(1, 26), (4, 61), (3, 7), (2, 128)])
def test_cpu_matches_reference_random(style, B, T):
    gen = torch.Generator().manual_seed(1000 * B + T)
    parents = torch.tensor([random_tree(T, gen, style) for _ in range(B)], dtype=torch.int64)
    assert_same(build_tree_buffers(parents), reference.build_tree_buffers(parents))


@native
def test_cpu_non_contiguous_and_empty_batch():
    parents = torch.tensor([EAGLE1, chain(26)], dtype=torch.int64).t().contiguous().t()  # column-major view
    assert not parents.is_contiguous()
    assert_same(build_tree_buffers(parents), reference.build_tree_buffers(parents.contiguous()))
    empty = build_tree_buffers(torch.empty(0, 5, dtype=torch.int64), 2)
    assert empty.mask.shape == (0, 5, 5) and empty.paths.shape == (0, 5, 3)


@native
@pytest.mark.parametrize(
    "parents,max_depth,exc,match",
    [
        ([[0, 0, 1]], None, ValueError, r"parents\[0, 0\] = 0, but parents\[:, 0\] must be -1"),
        ([[-1, 0, 1], [-1, 0, 2]], None, ValueError, r"parents\[1, 2\] = 2 must lie in \[0, 2\)"),
        ([[-1, 0, 5]], None, ValueError, r"parents\[0, 2\] = 5 must lie in \[0, 2\)"),
        ([[-1, -1]], None, ValueError, r"parents\[0, 1\] = -1 must lie in \[0, 1\)"),
        ([[-1, 0, 1, 2]], 2, ValueError, r"depth 3 > max_depth 2"),
        ([[-1, 0]], -1, ValueError, r"max_depth must be >= 0"),
        ([-1, 0, 1], None, ValueError, r"must be \[B, T\] with T >= 1"),
        (torch.empty(2, 0), None, ValueError, r"must be \[B, T\] with T >= 1"),
    ],
)
def test_cpu_errors(parents, max_depth, exc, match):
    parents = torch.as_tensor(parents, dtype=torch.int64)
    with pytest.raises(exc, match=match):
        build_tree_buffers(parents, max_depth)


@native
def test_cpu_rejects_int32():
    with pytest.raises(TypeError, match="parents must be int64"):
        build_tree_buffers(torch.tensor([[-1, 0]], dtype=torch.int32))


@native
def test_opcheck_schemas():
    """The schema and the meta kernel of build_tree_buffers agree with the CPU kernel."""
    parents = torch.tensor([EAGLE1, chain(26)], dtype=torch.int64)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.eagle_kernels.build_tree_buffers.default, (parents, 25), test_utils=tests)
    torch.library.opcheck(torch.ops.eagle_kernels.build_tree_buffers.default, (parents, None), test_utils=tests)


def test_missing_extension_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tree_buffers, "_C", None)
    with pytest.raises(BackendUnavailable, match="native extension.*is not built"):
        build_tree_buffers(torch.tensor([[-1, 0]]))


def test_cuda_tensor_without_cuda_build_falls_back(monkeypatch):
    monkeypatch.setattr(tree_buffers, "_C", types.SimpleNamespace(with_cuda=False))
    monkeypatch.setattr(tree_buffers, "_warned_no_cuda", False)
    with pytest.warns(UserWarning, match="built without CUDA"):
        assert tree_buffers._use_reference(types.SimpleNamespace(is_cuda=True))
    assert not tree_buffers._use_reference(torch.zeros(1))


# ---------------------------------------------------------------------------------------------------------------
# CUDA
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@native
@native_cuda
@pytest.mark.parametrize("name", list(TREES))
def test_cuda_matches_reference(name):
    parents = torch.tensor(TREES[name], dtype=torch.int64)
    for md in (None, int(reference.build_tree_buffers(parents).depth.max()) + 2):
        got = build_tree_buffers(parents.cuda(), md)
        assert all(t.is_cuda for t in got)
        assert_same(got, reference.build_tree_buffers(parents, md))


@pytest.mark.cuda
@native
@native_cuda
@pytest.mark.parametrize("style", ["uniform", "deep", "levels"])
@pytest.mark.parametrize("B,T", [(1, 26), (4, 61), (2, 1000)])
def test_cuda_matches_reference_random(style, B, T):
    gen = torch.Generator().manual_seed(7 * B + T)
    parents = torch.tensor([random_tree(T, gen, style) for _ in range(B)], dtype=torch.int64)
    assert_same(build_tree_buffers(parents.cuda()), reference.build_tree_buffers(parents))


@pytest.mark.cuda
@native
@native_cuda
def test_cuda_invalid_tree_is_memory_safe():
    """No validation on CUDA (no host sync), but garbage parents must not fault or hang."""
    parents = torch.tensor([[5, 3, 7, -4, 2, 1000], [-1, 0, 1, 2, 3, 4]], device="cuda")
    out = build_tree_buffers(parents, 2)  # second tree is deeper than max_depth: paths truncated
    torch.cuda.synchronize()
    assert out.depth[1].tolist() == [0, 1, 2, 3, 4, 5]


@pytest.mark.cuda
@native
@native_cuda
def test_cuda_graph_capture():
    """The op captured in a CUDA graph; replays follow new contents of the static input buffer."""
    gen = torch.Generator().manual_seed(0)
    trees = [torch.tensor([random_tree(61, gen, "levels") for _ in range(4)]) for _ in range(3)]
    parents = trees[0].cuda()

    build_tree_buffers(parents, 6)  # warm-up outside capture (lazy CUDA init, allocator)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bufs = build_tree_buffers(parents, 6)

    for tree in trees:
        parents.copy_(tree)
        graph.replay()
        want = reference.build_tree_buffers(tree, 6)
        assert_same(bufs, want)


def test_no_import_circle_with_the_backend():
    """backend.py picks tree_buffers' op; tree_buffers must not import backend back (it takes its error from
    eagle_kernels.errors), and the removed dead ops stay removed."""
    import ast
    from pathlib import Path

    import eagle_kernels.tree_buffers as tb

    tree = ast.parse(Path(tb.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "backend" not in imported and "errors" in imported, imported
    assert not hasattr(tb, "tree_positions") and not hasattr(tb, "advance_seq_lens_")
    if tb._C is not None:
        assert not hasattr(torch.ops.eagle_kernels, "tree_positions")
        assert not hasattr(torch.ops.eagle_kernels, "advance_seq_lens_")
