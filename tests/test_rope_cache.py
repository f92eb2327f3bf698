"""Triton rotary + K/V cache write (both planes, one launch) against the PyTorch reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.rope_cache import rope_kv_write  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _tables(D, P, base=10000.0):
    """The cos/sin tables of eagle_runtime.model.Rotary (HF half-rotation layout)."""
    inv = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    freqs = torch.arange(P, dtype=torch.float64)[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def _err_ok(got, ref64, same, what):
    err_k, err_t = (got.double() - ref64).abs(), (same.double() - ref64).abs()
    atol = 1e-6 if got.dtype == torch.float32 else 2e-3
    bad = err_k > 2 * err_t.max() + atol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} mismatch, first at " \
                          f"{bad.nonzero()[0].tolist()}, max err {err_k.max():.3g} vs torch {err_t.max():.3g}"


CASES = [  # B, T, Hq, Hkv, D, write_pos per sequence, positions kind
    (3, 1, 4, 1, 64, [0, 5, 11], "decode"),      # plain decode, GQA 4:1, three different write positions
    (3, 6, 8, 2, 16, [2, 0, 9], "tree"),         # a tree: positions are depths (repeat, not contiguous)
    (1, 5, 2, 2, 128, [3], "scattered"),         # MHA, head_dim 128, arbitrary positions
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=["decode-gqa4", "tree-d16", "mha-d128"])
def test_matches_reference(dtype, case):
    B, T, Hq, Hkv, D, wpos, kind = case
    S, P, L = 24, 40, 2
    g = torch.Generator().manual_seed(D + T)
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, generator=g).to(DEV, dtype)
    cos64, sin64 = _tables(D, P)
    cos, sin = cos64.to(DEV, dtype), sin64.to(DEV, dtype)
    if kind == "tree":
        positions = torch.tensor([[w + d for d in [0, 1, 1, 2, 2, 3]] for w in wpos])
    elif kind == "scattered":
        positions = torch.tensor([[37, 2, 19, 0, 23]])
    else:
        positions = torch.tensor(wpos)[:, None]
    positions = positions.to(DEV)
    write_idx = (torch.tensor(wpos)[:, None] + torch.arange(T)).to(DEV)
    cache = torch.randn(2 * L, B, Hkv, S, D, generator=g).to(DEV, dtype)  # layer 1's planes: cache[2], cache[3]
    before = cache.clone()
    q = rope_kv_write(qkv, cos, sin, positions, cache[2], cache[3], write_idx, Hq, Hkv)

    same = before.clone()
    q_t = reference.rope_kv_write(qkv, cos, sin, positions, same[2], same[3], write_idx, Hq, Hkv)
    c64 = before.double()
    q64 = reference.rope_kv_write(qkv.double(), cos64.to(DEV), sin64.to(DEV), positions, c64[2], c64[3], write_idx,
                                  Hq, Hkv)
    assert q.shape == (B, T, Hq, D) and q.dtype == dtype and q.is_contiguous()
    _err_ok(q, q64, q_t, "q")
    _err_ok(cache[2], c64[2], same[2], "k plane")
    assert torch.equal(cache[3], same[3]), "v is copied unrotated: bit for bit"
    written = torch.zeros(B, S, dtype=torch.bool)
    for b in range(B):
        written[b, write_idx[b].cpu()] = True
    untouched = ~written.to(DEV)[:, None, :, None].expand(B, Hkv, S, D)
    assert torch.equal(cache[2][untouched], before[2][untouched]), "a slot outside write_idx was overwritten"
    assert torch.equal(cache[[0, 1]], before[[0, 1]]), "another layer's planes were touched"


def test_float32_cache_from_float16_qkv():
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 16
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEV).half()
    cos, sin = (t.float().to(DEV) for t in _tables(D, 8))
    pos = torch.tensor([[0, 1, 1], [4, 5, 6]], device=DEV)
    k, v = torch.zeros(B, Hkv, 8, D, device=DEV), torch.zeros(B, Hkv, 8, D, device=DEV)
    rope_kv_write(qkv, cos, sin, pos, k, v, torch.tensor([[0, 1, 2], [4, 5, 6]], device=DEV), Hq, Hkv)
    torch.testing.assert_close(v[1, :, 4:7].transpose(0, 1), qkv[1].view(T, -1, D)[:, Hq + Hkv:].float())
    assert v[:, :, 3].abs().sum() == 0 and v[:, :, 7].abs().sum() == 0


def test_bad_inputs_and_registration():
    B, T, Hq, Hkv, D = 1, 2, 4, 2, 8
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEV)
    cos, sin = (t.float().to(DEV) for t in _tables(D, 8))
    pos = torch.zeros(B, T, dtype=torch.long, device=DEV)
    k, v = torch.zeros(B, Hkv, 8, D, device=DEV), torch.zeros(B, Hkv, 8, D, device=DEV)
    with pytest.raises(ValueError, match="num_kv_heads"):
        rope_kv_write(qkv, cos, sin, pos, k, v, pos, Hq, 1)
    with pytest.raises(ValueError, match="qkv must be"):
        rope_kv_write(qkv[..., :-1], cos, sin, pos, k, v, pos, Hq, Hkv)
    with pytest.raises(ValueError, match="write_idx"):
        rope_kv_write(qkv, cos, sin, pos, k, v, pos.float(), Hq, Hkv)
    with pytest.raises(ValueError, match="cos"):
        rope_kv_write(qkv, cos[:, :4], sin, pos, k, v, pos, Hq, Hkv)
    torch.library.opcheck(torch.ops.eagle_kernels.rope_kv_write.default, (qkv, cos, sin, pos, k, v, pos, Hq, Hkv),
                          test_utils=("test_schema", "test_faketensor"))


def test_many_programs_tiling(monkeypatch):
    """A few head vectors per program, q and k rows mixed in one program, a ragged last program."""
    from eagle_kernels import rope_cache

    monkeypatch.setattr(rope_cache, "CPU_BLOCK_ELEMS", 64)  # 4 rows of D=16 (BLOCK_HALF 8) per program
    B, T, Hq, Hkv, D, S = 2, 3, 4, 1, 16, 10
    qkv = torch.randn(B, T, (Hq + 2 * Hkv) * D, device=DEV)
    cos, sin = (t.float().to(DEV) for t in _tables(D, 16))
    pos = torch.tensor([[3, 4, 4], [0, 1, 2]], device=DEV)
    widx = torch.tensor([[3, 4, 5], [7, 8, 9]], device=DEV)
    cache = torch.randn(2, B, Hkv, S, D, device=DEV)
    same = cache.clone()
    q = rope_kv_write(qkv, cos, sin, pos, cache[0], cache[1], widx, Hq, Hkv)
    q_t = reference.rope_kv_write(qkv, cos, sin, pos, same[0], same[1], widx, Hq, Hkv)
    torch.testing.assert_close(q, q_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache, same, rtol=1e-5, atol=1e-6)
