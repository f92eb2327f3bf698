"""Triton SiLU-and-mul against the PyTorch reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.silu_mul import silu_mul  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 2 * 172), (1, 9, 2 * 40), (2, 2 * 1100)])
def test_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    gu = (torch.randn(shape, generator=g) * 4).to(DEV, dtype)
    got = silu_mul(gu)
    same = reference.silu_mul(gu)
    ref64 = reference.silu_mul(gu.double())
    assert got.shape == same.shape and got.dtype == dtype
    err_k, err_t = (got.double() - ref64).abs(), (same.double() - ref64).abs()
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    bad = err_k > 2 * err_t.max() + atol
    assert not bad.any(), f"{int(bad.sum())} mismatches, first at {bad.nonzero()[0].tolist()}, " \
                          f"max err {err_k.max():.3g} vs torch {err_t.max():.3g}"


def test_strided_rows_and_bad_inputs():
    base = torch.randn(4, 100, device=DEV)
    gu = base[:, :80]  # row stride 100
    torch.testing.assert_close(silu_mul(gu), reference.silu_mul(gu))
    with pytest.raises(ValueError, match="2I"):
        silu_mul(torch.randn(2, 7, device=DEV))
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(base.t())
    torch.library.opcheck(torch.ops.eagle_kernels.silu_mul.default, (gu.contiguous(),),
                          test_utils=("test_schema", "test_faketensor"))


def test_many_programs_tiling(monkeypatch):
    from eagle_kernels import silu_mul as mod

    monkeypatch.setattr(mod, "CPU_BLOCK_ELEMS", 128)  # 2 rows of I=40 (BLOCK_I 64) per program, 5 programs
    gu = torch.randn(9, 80, device=DEV)
    torch.testing.assert_close(silu_mul(gu), reference.silu_mul(gu), rtol=1e-6, atol=1e-6)
