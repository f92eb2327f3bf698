"""Triton RMSNorm and residual-add + RMSNorm against the PyTorch reference."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first `import triton`: kernels read it when decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.fused_norm import add_rms_norm, rms_norm  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 is left to the GPU run: the interpreter's bf16 arithmetic is not what a GPU does (DESIGN.md)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEV == "cuda" else [])


def _close(got, ref64, same_prec, what):
    """err(kernel) <= 2 * err(PyTorch at the same precision) + small atol, against a float64 reference."""
    err_k = (got.double() - ref64).abs()
    err_t = (same_prec.double() - ref64).abs()
    atol = 1e-6 if got.dtype == torch.float32 else 1e-3
    bad = err_k > 2 * err_t.max() + atol
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} mismatch, first at " \
                          f"{bad.nonzero()[0].tolist()}, max err {err_k.max():.3g} vs torch {err_t.max():.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 1, 96), (1, 7, 96), (2, 5, 40)])
def test_add_rms_norm_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(DEV, dtype)
    res = torch.randn(shape, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(DEV, dtype)
    eps = 1e-5
    y, r = add_rms_norm(x, res, w, eps)
    y_t, r_t = reference.add_rms_norm(x, res, w, eps)
    y64, r64 = reference.add_rms_norm(x.double(), res.double(), w.double(), eps)
    assert y.dtype == r.dtype == dtype and y.shape == r.shape == x.shape
    assert torch.equal(r, r_t), "the residual sum is one rounded add: it must equal PyTorch's bit for bit"
    _close(y, y64, y_t, "normed")
    _close(r, r64, r_t, "residual")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_reference_and_reads_strided_rows(dtype):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(3, 4, 128, generator=g).to(DEV, dtype)
    x = base[:, 1:, :96]  # row stride 128, last dim contiguous
    w = torch.randn(96, generator=g).to(DEV, dtype)
    y = rms_norm(x[0], w, 1e-6)
    _close(y, reference.rms_norm(x[0].double(), w.double(), 1e-6), reference.rms_norm(x[0], w, 1e-6), "rms_norm")
    with pytest.raises(ValueError, match="flattenable"):
        rms_norm(x, w, 1e-6)  # [3, 3, 96] with gaps between the 4-row blocks cannot be viewed as [9, 96]


def test_bad_inputs():
    x = torch.randn(2, 8, device=DEV)
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.ones(7, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="residual"):
        add_rms_norm(x, x.half(), torch.ones(8, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="contiguous last dim"):
        rms_norm(x.t(), torch.ones(2, device=DEV), 1e-5)
    with pytest.raises(ValueError, match="float16"):
        rms_norm(x.long(), torch.ones(8, device=DEV), 1e-5)


def test_registered_op():
    x = torch.randn(3, 96, device=DEV)
    w = torch.randn(96, device=DEV)
    y, r = torch.ops.eagle_kernels.add_rms_norm(x, x, w, 1e-5)
    torch.testing.assert_close(y, reference.rms_norm(2 * x, w, 1e-5))
    torch.library.opcheck(torch.ops.eagle_kernels.add_rms_norm.default, (x, x, w, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.eagle_kernels.rms_norm.default, (x, w, 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


def test_many_programs_tiling(monkeypatch):
    """Several rows per program with a ragged last program (the interpreter default is one program)."""
    from eagle_kernels import fused_norm

    monkeypatch.setattr(fused_norm, "CPU_BLOCK_ELEMS", 256)  # 2 rows of H=96 (BLOCK_H 128) per program
    x, res, w = torch.randn(7, 96, device=DEV), torch.randn(7, 96, device=DEV), torch.randn(96, device=DEV)
    y, r = add_rms_norm(x, res, w, 1e-5)
    y_t, r_t = reference.add_rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    assert torch.equal(r, r_t)
