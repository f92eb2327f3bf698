"""PyTorch references of the decoder-layer ops: RMSNorm (with the residual add), rotary + K/V cache write, and
SiLU-and-mul. Re-exported by :mod:`eagle_kernels.reference`, whose conventions (shapes, dtypes, the contract role)
hold here too; import them from there."""

from __future__ import annotations

import torch

__all__ = ["rms_norm", "add_rms_norm", "rope_kv_write", "silu_mul"]


# --------------------------------------------------------------------------------------------------------------
# Decoder-layer pieces: RMSNorm (with the residual add), rotary + K/V cache write, SiLU-and-mul
# --------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LLaMA RMSNorm over the last dim: ``weight * (x * rsqrt(mean(x^2) + eps))``, statistics in float32.

    The normalised value is rounded to ``x.dtype`` before the weight multiplies it (the HF order), so a
    float16 model rounds twice exactly like ``LlamaRMSNorm``. Returns ``x``'s shape in ``x.dtype``.
    """
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * xf.to(x.dtype)).to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add followed by RMSNorm, as the decoder carries it between blocks (vLLM's fused_add_rms_norm).

    Args:
        x: ``[..., H]`` the block output (attention or MLP), float16/bfloat16/float32.
        residual: ``[..., H]`` same shape and dtype, the residual stream before the block.
        weight: ``[H]`` the norm weight.

    Returns:
        ``(rms_norm(x + residual), x + residual)``; the sum is rounded to ``x.dtype`` before it is normalised.
        Example: ``x = [1, 1]``, ``residual = [2, -4]``, ``weight = 1`` -> ``([1, -1] (approx.), [3, -3])``.
    """
    r = x + residual
    return rms_norm(r, weight, eps), r


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rope_kv_write(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write_idx: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotary embedding of q and k from a merged QKV projection, and the K/V cache write; returns rotated q.

    Args:
        qkv: ``[B, T, (num_heads + 2 * num_kv_heads) * D]``: q heads, then k heads, then v heads (the layout of
            ``cat([q_proj.weight, k_proj.weight, v_proj.weight])``).
        cos, sin: ``[P, D]`` tables by position, half-rotation layout (HF: ``cat([freqs, freqs])``).
        positions: ``[B, T]`` int rotary positions (any order, e.g. tree depths), ``< P``.
        k_cache, v_cache: ``[B, Hkv, S, D]`` planes, written in place at slot ``write_idx[b, t]`` for token ``t``.
        write_idx: ``[B, T]`` int slots, distinct within a sequence.

    Rotation (HF ``rotate_half``), with ``c = cos[pos]``, ``s = sin[pos]``, computed in ``qkv.dtype``::

        out[:D/2] = x[:D/2] * c[:D/2] - x[D/2:] * s[:D/2]
        out[D/2:] = x[D/2:] * c[D/2:] + x[:D/2] * s[D/2:]

    Returns ``q [B, T, num_heads, D]`` in ``qkv.dtype``. v is written unrotated; K/V are cast to the cache dtype.
    """
    B, T, _ = qkv.shape
    D = k_cache.shape[-1]
    q, k, v = qkv.view(B, T, -1, D).split([num_heads, num_kv_heads, num_kv_heads], dim=2)
    c = cos[positions].to(qkv.dtype).unsqueeze(2)
    s = sin[positions].to(qkv.dtype).unsqueeze(2)
    q = q * c + _rotate_half(q) * s
    k = k * c + _rotate_half(k) * s
    idx = write_idx[:, None, :, None].expand(B, num_kv_heads, T, D)
    k_cache.scatter_(2, idx, k.transpose(1, 2).to(k_cache.dtype))
    v_cache.scatter_(2, idx, v.transpose(1, 2).to(v_cache.dtype))
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` over a merged gate/up projection ``[..., 2I]`` (gate first); returns ``[..., I]``.

    ``silu`` is rounded to the input dtype before the product (the HF order ``act(gate_proj(x)) * up_proj(x)``).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
