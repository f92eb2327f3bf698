"""SiLU-and-mul over a merged gate/up projection (Triton).

Contract: :func:`eagle_kernels.reference.silu_mul`. ``gate_up [N, 2I]`` (gate columns first) -> ``[N, I]``;
one program per ``(BLOCK_M rows, BLOCK_I columns)`` (one
row on a GPU). The SiLU is rounded to the input dtype before the product, as in HF
(``act(gate_proj(x)) * up_proj(x)``), so a float16 model rounds exactly like the unfused path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._registry import launch, register_op

# Elements per program on CPU tensors (the interpreter): large, because it runs programs one by one. Tests
# lower it to exercise the many-program tiling a GPU uses.
CPU_BLOCK_ELEMS = 1 << 18

__all__ = ["silu_mul"]


@triton.jit
def _silu_mul_kernel(GU, OUT, N, I, stride_g, stride_o, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (rows < N)[:, None] & (offs < I)[None, :]
    src = GU + rows[:, None] * stride_g + offs[None, :]
    g = tl.load(src, mask=ok, other=0.0)
    u = tl.load(src + I, mask=ok, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(OUT + rows[:, None] * stride_o + offs[None, :], (act * u.to(tl.float32)).to(OUT.dtype.element_ty),
             mask=ok)


def _silu_mul_fake(gate_up):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _launches(g2: torch.Tensor, out: torch.Tensor) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one call on ``g2 [N, 2I]`` (N, I > 0) into ``out [..., I]``: the
    launcher runs them, the sm_90 check compiles them. One row per program on a GPU; on CPU the interpreter runs
    programs one after another (~1 ms each), so a program takes many rows there (CPU_BLOCK_ELEMS)."""
    N, I = g2.shape[0], g2.shape[1] // 2
    BLOCK_I = min(1024, triton.next_power_of_2(I))
    BLOCK_M = 1 if g2.device.type != "cpu" else max(1, min(triton.next_power_of_2(N), CPU_BLOCK_ELEMS // BLOCK_I))
    return [(_silu_mul_kernel, (triton.cdiv(N, BLOCK_M), triton.cdiv(I, BLOCK_I)),
             (g2, out, N, I, g2.stride(0), I), dict(BLOCK_M=BLOCK_M, BLOCK_I=BLOCK_I, num_warps=4))]


def compile_cases(quick: bool):
    """The sm_90 compile check's launches (``scripts/compile_sm90.py``): the MLP of Llama-2-7B (I 11008) and
    Llama-3-8B (I 14336) at decode (1 token) and a 61-token tree verify, batch 1; built by :func:`_launches` on
    meta tensors."""
    for dtype in [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]:
        for model, I in (("L2-7B", 11008), ("L3-8B", 14336)):
            for use, T in (("decode1", 1), ("verify61", 61)):
                gate_up = torch.empty((1, T, 2 * I), dtype=dtype, device="meta")
                out = gate_up.new_empty((1, T, I))
                for kernel, grid, args, kwargs in _launches(gate_up.view(-1, 2 * I), out):
                    yield f"{str(dtype)[6:]} {model} {use} B1", kernel, grid, args, kwargs


@register_op("silu_mul", fake=_silu_mul_fake)
def _silu_mul_op(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"gate_up must be [..., 2I] with a contiguous last dim; got shape {tuple(gate_up.shape)} "
                         f"strides {gate_up.stride()}")
    if gate_up.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"gate_up must be float16/bfloat16/float32; got {gate_up.dtype}")
    try:
        g2 = gate_up.view(-1, gate_up.shape[-1])
    except RuntimeError:
        raise ValueError(f"gate_up rows must be flattenable without a copy; got strides {gate_up.stride()}") from None
    I = g2.shape[1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], I))
    if g2.shape[0] == 0 or I == 0:
        return out
    for kernel, grid, args, kwargs in _launches(g2, out):
        launch(kernel, grid)(*args, **kwargs)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate_up[..., :I]) * gate_up[..., I:]`` as a new contiguous ``[..., I]`` tensor."""
    return _silu_mul_op(gate_up)
