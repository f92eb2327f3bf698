"""Triton tree attention against the PyTorch reference (interpreter on CPU, compiled on CUDA)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from eagle_kernels.tree_attention import _split_range, attention_plan, split_range, tree_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _tree(kind: str, T: int) -> list[int]:
    if kind == "chain":
        return [-1] + list(range(T - 1))
    if kind == "star":
        return [-1] + [0] * (T - 1)
    g = torch.Generator().manual_seed(T)
    return [-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]


def _inputs(B, T, Hq, Hkv, D, prefix, kind="random", dtype=torch.float32, M=None, S=None, seed=0):
    M = T if M is None else M
    S = max(prefix) + M + 3 if S is None else S
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEV, dtype)
    k = torch.randn(B, Hkv, S, D, generator=g).to(DEV, dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(DEV, dtype)
    parents = torch.tensor([_tree(kind, T) for _ in range(B)], device=DEV)
    mask = reference.build_tree_buffers(parents).mask
    if M > T:  # a growing draft: the extra columns are slots of later tokens, invisible to these queries
        mask = torch.cat([mask, torch.zeros(B, T, M - T, dtype=torch.bool, device=DEV)], dim=-1)
    return q, k, v, torch.tensor(prefix, device=DEV), mask


def _sdpa(q, k, v, prefix_len, mask, dtype):
    """torch SDPA with the explicit [B, 1, T, S] visibility mask, computed in ``dtype``."""
    B, T, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    M = mask.shape[-1]
    slots = torch.arange(S, device=q.device)
    p = prefix_len.view(B, 1, 1)
    vis = (slots < p).expand(B, T, S).clone()
    rel = slots.view(1, 1, S) - p
    inside = (rel >= 0) & (rel < M)
    vis |= inside & torch.gather(mask, 2, rel.clamp(0, M - 1).expand(B, T, S))
    rep = Hq // Hkv
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).to(dtype), k.repeat_interleave(rep, 1).to(dtype), v.repeat_interleave(rep, 1).to(dtype),
        attn_mask=vis.unsqueeze(1))
    return out.transpose(1, 2).nan_to_num(0.0)  # rows that see nothing: SDPA gives NaN, the contract zeros


def _check_close(out, q, k, v, prefix_len, mask, atol=1e-5):
    gold = _sdpa(q, k, v, prefix_len, mask, torch.float64)
    same = _sdpa(q, k, v, prefix_len, mask, q.dtype) if q.dtype != torch.float32 else gold.float()
    err_ref = (same.double() - gold).abs()
    err = (out.double() - gold).abs()
    bound = 2 * err_ref.max() + atol
    bad = err > bound
    if bad.any():
        pos = bad.nonzero()[:10].tolist()
        pytest.fail(f"{int(bad.sum())} of {bad.numel()} outputs off by more than {float(bound):.3g} "
                    f"(max {float(err.max()):.3g}, torch {float(err_ref.max()):.3g}); first [b,t,h,d]: {pos}")
    # and the package's reference itself (the contract), at the output dtype's rounding
    ref = reference.tree_attention(q, k, v, prefix_len, mask)
    torch.testing.assert_close(out.float(), ref.float(), atol=2 * float(bound) + 1e-3 * (q.dtype != torch.float32),
                               rtol=0)


CASES = [
    # B, T, Hq, Hkv, D, prefix, kind
    (1, 1, 2, 2, 8, [0], "random"),  # single node, empty prefix: decode of the very first token
    (1, 1, 2, 2, 8, [1], "random"),  # prefix of one slot
    (1, 6, 2, 1, 8, [5], "chain"),
    (1, 6, 2, 2, 16, [3], "star"),
    (1, 9, 4, 1, 16, [20], "random"),  # 4 query heads over 1 KV head
    (3, 5, 4, 2, 8, [0, 1, 37], "random"),  # per-sequence prefix lengths
    (1, 3, 2, 1, 64, [70], "random"),
    (1, 20, 4, 1, 16, [10], "random"),  # 80 packed rows: two row tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,Hq,Hkv,D,prefix,kind", CASES)
def test_matches_reference(B, T, Hq, Hkv, D, prefix, kind, dtype):
    q, k, v, pl, mask = _inputs(B, T, Hq, Hkv, D, prefix, kind, dtype)
    _check_close(tree_attention(q, k, v, pl, mask), q, k, v, pl, mask)


@pytest.mark.parametrize("splits", [1, 2, 3, 8])
def test_split_k(splits):
    # prefixes of 700 and 300 slots in units of 64 slots: 8 splits of 1-2 units, and 5 of 1 unit (3 idle)
    q, k, v, pl, mask = _inputs(2, 4, 2, 1, 16, [700, 300], "random", torch.float32)
    _check_close(tree_attention(q, k, v, pl, mask, num_splits=splits), q, k, v, pl, mask)


LLAMA_SHAPES = [(32, 32, 128), (32, 8, 128)]  # Llama-2-7B, Llama-3-8B attention: Hq, Hkv, D


@pytest.mark.parametrize("Hq,Hkv,D", LLAMA_SHAPES)
@pytest.mark.parametrize("T", [1, 8, 10, 61, 129])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plan_fills_one_wave_at_batch_1(Hq, Hkv, D, T, dtype):
    sms = 132  # H100 SXM
    for S in (1024, 4096):
        cfg = attention_plan(1, T, Hq, Hkv, D, S, T, dtype, sms)
        if S == 4096:
            assert cfg["tiles"] * Hkv * cfg["NUM_SPLITS"] >= sms, cfg
        programs = cfg["tiles"] * Hkv
        assert cfg["grid"] == (cfg["tiles"], Hkv, cfg["NUM_SPLITS"])
        room = -(-(S - T) // cfg["MIN_CHUNK"])  # splits the capacity holds
        assert programs * cfg["NUM_SPLITS"] >= sms or cfg["NUM_SPLITS"] == room, cfg
        assert programs * (cfg["NUM_SPLITS"] - 1) < sms, "more than the one wave needed"
        # a prefix longer than (NUM_SPLITS - 1) * MIN_CHUNK slots keeps every split (so the whole wave) busy
        for prefix in ((cfg["NUM_SPLITS"] - 1) * cfg["MIN_CHUNK"] + 1, 1000, 2000, S - T):
            if prefix > (cfg["NUM_SPLITS"] - 1) * cfg["MIN_CHUNK"]:
                assert split_range(prefix, 0, cfg["NUM_SPLITS"], cfg["MIN_CHUNK"])[2] == cfg["NUM_SPLITS"]
    assert attention_plan(64, T, Hq, Hkv, D, 4096, T, dtype, sms)["NUM_SPLITS"] == 1  # batch 64 fills it alone
    assert attention_plan(1, T, Hq, Hkv, D, T + 16, T, dtype, sms)["NUM_SPLITS"] == 1  # no room to split


@triton.jit
def _probe_split_range(PREFIX, OUT, NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr):
    i = tl.program_id(0)
    s = tl.program_id(1)
    lo, hi, n = _split_range(tl.load(PREFIX + i), s, NUM_SPLITS, MIN_CHUNK)
    base = OUT + (i * NUM_SPLITS + s) * 3
    tl.store(base, lo)
    tl.store(base + 1, hi)
    tl.store(base + 2, n)


def test_split_ranges_cover_the_prefix_and_match_the_kernel():
    prefixes = [0, 1, 63, 64, 65, 127, 300, 700, 1000, 4095]
    for splits, min_chunk in [(1, 64), (3, 64), (5, 128), (9, 32)]:
        pl = torch.tensor(prefixes, dtype=torch.int32, device=DEV)
        out = torch.zeros(len(prefixes), splits, 3, dtype=torch.int32, device=DEV)
        _probe_split_range[(len(prefixes), splits)](pl, out, NUM_SPLITS=splits, MIN_CHUNK=min_chunk)
        for i, P in enumerate(prefixes):
            want = [list(split_range(P, s, splits, min_chunk)) for s in range(splits)]
            assert out[i].tolist() == want, (P, splits, min_chunk)
            n = want[0][2]
            assert 1 <= n <= splits
            covered = [x for lo, hi, _ in want[:n] for x in range(lo, hi)]
            assert covered == list(range(P)), "active splits must tile [0, prefix) in order, once"
            assert all(hi > lo for lo, hi, _ in want[:n]) or P == 0
            assert all(lo >= P for lo, _, _ in want[n:]), "an idle split must have nothing left"


def test_cache_views_and_int32_prefix():
    # the runtime's pooled caches: a [planes, B_max, Hkv, S, D] buffer viewed as [:, :B] (plane stride of B_max)
    q, k, v, pl, mask = _inputs(2, 5, 4, 2, 16, [9, 70], "random", torch.float32, S=96)
    full = torch.randn(2, 5, 2, 96, 16).to(DEV)
    full[0, :2], full[1, :2] = k, v
    view = full[:, :2]
    assert not view.is_contiguous() and view[0].is_contiguous()
    out = tree_attention(q, view[0], view[1], pl.to(torch.int32), mask, num_splits=3)
    _check_close(out, q, k, v, pl, mask)


def test_growing_draft_mask_and_scale():
    q, k, v, pl, mask = _inputs(2, 4, 2, 2, 16, [3, 9], "chain", torch.float32, M=7)
    out = tree_attention(q, k, v, pl, mask, sm_scale=0.3)
    torch.testing.assert_close(out, reference.tree_attention(q, k, v, pl, mask, sm_scale=0.3), atol=1e-5, rtol=0)


def test_query_that_sees_nothing_gets_zeros():
    q, k, v, pl, mask = _inputs(2, 3, 2, 1, 8, [0, 4], "star", torch.float32)
    mask[0, 1] = False  # sequence 0 has no prefix: its token 1 now sees no slot
    out = tree_attention(q, k, v, pl, mask, num_splits=2)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    torch.testing.assert_close(out, reference.tree_attention(q, k, v, pl, mask), atol=1e-5, rtol=0)


def test_strided_query():
    q, k, v, pl, mask = _inputs(1, 5, 4, 2, 16, [6], "random", torch.float32)
    qt = q.transpose(2, 3).contiguous().transpose(2, 3)  # same values, head dim strided
    out = tree_attention(qt, k, v, pl, mask)
    torch.testing.assert_close(out, reference.tree_attention(q, k, v, pl, mask), atol=1e-5, rtol=0)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, pl, mask = _inputs(1, 5, 4, 2, 16, [6], "random", torch.float16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fq, fk, fv, fp, fm = (mode.from_tensor(t) for t in (q, k, v, pl, mask))
        out = tree_attention(fq, fk, fv, fp, fm)
    assert out.shape == q.shape and out.dtype == q.dtype


def test_bad_inputs():
    q, k, v, pl, mask = _inputs(1, 3, 3, 2, 8, [2], "chain", torch.float32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        tree_attention(q, k, v, pl, mask)
    q, k, v, pl, mask = _inputs(1, 3, 2, 1, 8, [2], "chain", torch.float32)
    with pytest.raises(ValueError, match="tree_mask"):
        tree_attention(q, k, v, pl, mask.int())
    with pytest.raises(ValueError, match="share one of"):
        tree_attention(q, k.half(), v, pl, mask)
    with pytest.raises(ValueError, match="prefix_len"):
        tree_attention(q, k, v, pl.float(), mask)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,Hq,Hkv,prefix", [(64, 32, 32, [2048]), (1, 32, 8, [8192]), (16, 32, 8, [5, 3000])])
def test_cuda_llama_shapes(dtype, T, Hq, Hkv, prefix):
    q, k, v, pl, mask = _inputs(len(prefix), T, Hq, Hkv, 128, prefix, "random", dtype)
    _check_close(tree_attention(q, k, v, pl, mask), q, k, v, pl, mask, atol=1e-3)


@pytest.mark.cuda
def test_cuda_graph_and_compile():
    q, k, v, pl, mask = _inputs(2, 8, 8, 2, 128, [100, 900], "random", torch.bfloat16)
    ref = tree_attention(q, k, v, pl, mask)
    compiled = torch.compile(tree_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, pl, mask), ref, atol=0, rtol=0)
    out = torch.empty_like(ref)
    tree_attention(q, k, v, pl, mask)  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(tree_attention(q, k, v, pl, mask))
    pl.copy_(torch.tensor([300, 50], device=DEV))  # a new prefix length, no re-capture
    graph.replay()
    torch.testing.assert_close(out, tree_attention(q, k, v, pl, mask), atol=0, rtol=0)
