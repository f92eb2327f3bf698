"""Grouped MoE kernel (eagle_kernels.moe) against the reference and the runtime's index-select path."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.cpu_fast import moe_experts_by_expert  # noqa: E402
from eagle_kernels.moe import moe_align, moe_experts, moe_plan  # noqa: E402
from eagle_runtime.config import ModelConfig  # noqa: E402
from eagle_runtime.model import SparseMoE  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _moe(E=4, K=2, H=96, I=80, seed=0, dtype=torch.float32):
    cfg = ModelConfig.from_dict(dict(model_type="mixtral", vocab_size=32, hidden_size=H, intermediate_size=I,
                                     num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=E, num_experts_per_tok=K))
    moe = SparseMoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return moe.to(DEV, dtype)


def _check(out, x, top_w, top_i, moe, atol=1e-5):
    """err(kernel) <= 2 * err(torch at the same precision) + atol, both against a float64 reference."""
    gold = _ref64(x, top_w, top_i, moe)
    same = _torch_same_precision(x, top_w, top_i, moe)
    bound = 2 * (same.double() - gold).abs().max() + atol
    err = (out.double() - gold).abs()
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} off by more than {float(bound):.3g} (max "
                           f"{float(err.max()):.3g}); first [n, h]: {bad.nonzero()[:8].tolist()}")


def _ref64(x, top_w, top_i, moe):
    """The reference's formula in float64 (the error yardstick)."""
    xd, out = x.double(), torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for k in range(top_i.shape[1]):
        e = top_i[:, k]
        h = torch.nn.functional.silu(torch.einsum("nh,nih->ni", xd, moe.w1[e].double())) * \
            torch.einsum("nh,nih->ni", xd, moe.w3[e].double())
        out += top_w[:, k, None].double() * torch.einsum("ni,nhi->nh", h, moe.w2[e].double())
    return out


def _torch_same_precision(x, top_w, top_i, moe):
    """The per-expert PyTorch path (the cpu and torch tables' ``moe_experts``) at x's dtype."""
    return moe_experts_by_expert(x, top_w, top_i, moe.w1, moe.w3, moe.w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("N", [1, 7, 61])
def test_matches_reference(N, dtype):
    moe = _moe(dtype=dtype)
    x = torch.randn(N, 96, generator=torch.Generator().manual_seed(N)).to(DEV, dtype)
    top_w, top_i = moe.route(x)
    out = moe_experts(x, top_w, top_i, moe.w1, moe.w3, moe.w2)
    assert out.dtype == dtype and out.shape == x.shape
    _check(out, x, top_w, top_i, moe, atol=1e-5 if dtype == torch.float32 else 1e-3)
    # and the package's reference (the contract)
    ref = reference.moe_experts(x, top_w, top_i, moe.w1, moe.w3, moe.w2)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-4 if dtype == torch.float32 else 2e-2, rtol=0)


def test_matches_sparse_moe_index_select_path():
    moe = _moe(E=4, K=2)
    x = torch.randn(1, 7, 96, generator=torch.Generator().manual_seed(3)).to(DEV)
    want = moe(x) if DEV == "cpu" else _torch_same_precision(x[0], *moe.route(x[0]), moe)[None]
    flat = x.reshape(-1, 96)
    got = moe_experts(flat, *moe.route(flat), moe.w1, moe.w3, moe.w2).view(x.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_all_tokens_on_one_expert_and_strided_x():
    moe = _moe(E=4, K=2, H=96, I=40)
    xs = torch.randn(96, 5, generator=torch.Generator().manual_seed(1)).to(DEV).T  # [5, 96], column-major
    top_i = torch.tensor([[3, 1]] * 5, device=DEV)  # experts 0 and 2 get nothing; expert 3 and 1 every token
    top_w = torch.tensor([[0.75, 0.25]] * 5, device=DEV)
    _check(moe_experts(xs, top_w, top_i, moe.w1, moe.w3, moe.w2), xs, top_w, top_i, moe)


def test_align_layout():
    top_i = torch.tensor([[2, 0], [0, 1], [2, 0]])
    cfg = moe_plan(3, 2, 3, 8, 8, torch.float16)
    assert cfg["BLOCK_M"] == 16 and cfg["P"] == 64 and cfg["grid_gate_up"] == (4, 1)
    ids, blk = moe_align(top_i, 3, 4, 16)  # the module docstring's example
    assert ids.tolist() == [1, 2, 5, 6, 3, 6, 6, 6, 0, 4, 6, 6, 6, 6, 6, 6]
    assert blk.tolist() == [0, 1, 2, 3]
    # any routing fits the static bound: every assignment appears once, each block holds one expert
    g = torch.Generator().manual_seed(0)
    for N, K, E, BM in [(61, 2, 8, 16), (5, 2, 4, 16), (200, 2, 8, 64)]:
        top_i = torch.randint(0, E, (N, K), generator=g)
        P = moe_plan(N, K, E, 8, 8, torch.float16)["P"] if BM == 16 else -(-(N * K + E * (BM - 1)) // BM) * BM
        ids, blk = moe_align(top_i, E, BM, P)
        real = ids[ids < N * K]
        assert sorted(real.tolist()) == list(range(N * K))
        for b, e in enumerate(blk.tolist()):
            rows = ids[b * BM:(b + 1) * BM]
            rows = rows[rows < N * K]
            assert e <= E and (rows.numel() == 0 or (top_i.reshape(-1)[rows.long()] == e).all())


def test_bad_inputs():
    moe = _moe()
    x = torch.randn(3, 96, device=DEV)
    top_w, top_i = moe.route(x)
    with pytest.raises(ValueError, match="w2"):
        moe_experts(x, top_w, top_i, moe.w1, moe.w3, moe.w2.transpose(1, 2))
    with pytest.raises(ValueError, match="share"):
        moe_experts(x.half(), top_w, top_i, moe.w1, moe.w3, moe.w2)
    with pytest.raises(ValueError, match="top_w and top_i"):
        moe_experts(x, top_w[:2], top_i, moe.w1, moe.w3, moe.w2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_mixtral_shape_and_graph(dtype):
    moe = _moe(E=8, K=2, H=1024, I=3584, dtype=dtype)
    x = torch.randn(61, 1024, device="cuda", dtype=dtype)
    top_w, top_i = moe.route(x)
    eager = moe_experts(x, top_w, top_i, moe.w1, moe.w3, moe.w2)
    _check(eager, x, top_w, top_i, moe, atol=1e-2)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = moe_experts(x, top_w, top_i, moe.w1, moe.w3, moe.w2)
    x.copy_(torch.randn_like(x))
    top_w2, top_i2 = moe.route(x)
    top_w.copy_(top_w2)
    top_i.copy_(top_i2)
    g.replay()
    torch.testing.assert_close(out, moe_experts(x, top_w, top_i, moe.w1, moe.w3, moe.w2), atol=0, rtol=0)
