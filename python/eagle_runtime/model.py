"""Lean LLaMA / Mixtral modules over a static KV cache (no HF modeling code on the hot path).

One forward serves prefill, plain decode, tree verification and the draft head's tree steps: ``T`` new tokens
at given positions are written into the cache at ``write_pos[b] + t`` and attend to slots ``[0, prefix_len[b])``
plus the tree-masked slots after ``prefix_len[b]`` (see :func:`eagle_kernels.reference.tree_attention`).

The KV cache is one tensor ``[2 * num_layers, B, H_kv, S, D]`` (layer ``l``'s keys at ``2l``, values at
``2l + 1``), so a single compaction launch moves every layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eagle_kernels import Ops, get_ops

from .config import ModelConfig, rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Rotary(nn.Module):
    """cos/sin tables for positions ``[0, max_len)``, half-rotation layout (HF checkpoints)."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        inv = rope_inv_freq(cfg)
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].to(dtype).unsqueeze(2), self.sin[positions].to(dtype).unsqueeze(2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, in_features: int | None = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        inp = in_features or h
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(inp, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(inp, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(inp, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)

    def forward(self, x, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops: Ops):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        idx = write_idx[:, None, :, None].expand(B, self.num_kv_heads, T, self.head_dim)
        k_cache.scatter_(2, idx, k.transpose(1, 2).to(k_cache.dtype))
        v_cache.scatter_(2, idx, v.transpose(1, 2).to(v_cache.dtype))
        out = ops.tree_attention(q, k_cache, v_cache, prefix_len, mask)
        return self.o_proj(out.reshape(B, T, -1))


    def forward_causal(self, x, rope):
        """Plain causal self-attention over whole sequences (training and feature extraction; no cache)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.transpose(1, 2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Mixtral's top-k routed experts: softmax over all router logits, keep the top k, renormalise."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, i, h))  # gate
        self.w3 = nn.Parameter(torch.empty(e, i, h))  # up
        self.w2 = nn.Parameter(torch.empty(e, h, i))  # down

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights = torch.softmax(self.gate(flat).float(), dim=-1)
        top_w, top_i = torch.topk(weights, self.top_k, dim=-1)
        top_w = (top_w / top_w.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        if flat.is_cuda:
            # Every expert over every token, weighted (zero where not routed): no data-dependent shapes, so it
            # runs inside CUDA graphs; the same path eagerly and captured keeps their outputs identical.
            for e in range(self.w1.shape[0]):
                w = (top_w * (top_i == e)).sum(-1, keepdim=True)
                out = out + w * ((F.silu(flat @ self.w1[e].T) * (flat @ self.w3[e].T)) @ self.w2[e].T)
            return out.view(shape)
        for e in range(self.w1.shape[0]):
            tok, slot = torch.where(top_i == e)
            if tok.numel() == 0:
                continue
            h = flat[tok]
            y = (F.silu(h @ self.w1[e].T) * (h @ self.w3[e].T)) @ self.w2[e].T
            out.index_add_(0, tok, y * top_w[tok, slot, None])
        return out.view(shape)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, input_norm: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else None
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if cfg.num_experts else MLP(cfg)

    def forward(self, x, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops):
        h = self.input_layernorm(x) if self.input_layernorm is not None else x
        x = x + self.self_attn(h, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_causal(self, x, rope):
        h = self.input_layernorm(x) if self.input_layernorm is not None else x
        x = x + self.self_attn.forward_causal(h, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """A LLaMA-family or Mixtral causal LM. ``forward`` returns the final-norm features; ``logits`` the head."""

    def __init__(self, cfg: ModelConfig, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.max_len = max_len or cfg.max_position_embeddings
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(cfg, self.max_len)
        self.ops: Ops = get_ops("torch")

    def new_cache(self, batch: int, max_len: int | None = None) -> torch.Tensor:
        """A zeroed KV cache ``[2 * num_layers, batch, H_kv, max_len, D]`` in the model's dtype and device."""
        cfg, w = self.cfg, self.embed_tokens.weight
        s = max_len or self.max_len
        return torch.zeros(2 * cfg.num_layers, batch, cfg.num_kv_heads, s, cfg.head_dim, dtype=w.dtype, device=w.device)

    def forward(self, tokens, positions, cache, prefix_len, write_pos, mask, taps=None):
        """Features (final-norm hidden states) ``[B, T, H]`` of ``tokens [B, T]``; writes K/V into ``cache``.

        ``positions [B, T]`` are rotary positions, ``write_pos [B]`` the first cache slot written, ``mask
        [B, T, M]`` the tree mask relative to ``prefix_len [B]``. With ``taps`` (layer ids) it returns
        ``(features, tapped)``: ``tapped [B, T, len(taps) * H]`` the un-normed hidden states at the *input* of
        those layers (HF ``hidden_states[i]``), concatenated in the order given (EAGLE-3 heads read them).
        """
        x = self.embed_tokens(tokens)
        got: list | None = None if taps is None else []
        feats = self.norm(self.run_layers(x, positions, cache, prefix_len, write_pos, mask, taps, got))
        return feats if got is None else (feats, _gather_taps(taps, got, len(self.layers)))

    def run_layers(self, x, positions, cache, prefix_len, write_pos, mask, taps=None, got=None) -> torch.Tensor:
        rope = self.rotary(positions, x.dtype)
        write_idx = write_pos[:, None] + torch.arange(x.shape[1], device=x.device)
        for i, layer in enumerate(self.layers):
            if taps is not None and i in taps:
                got.append((i, x))
            x = layer(x, rope, cache[2 * i], cache[2 * i + 1], prefix_len, write_idx, mask, self.ops)
        return x

    def forward_causal(self, tokens: torch.Tensor, taps=None):
        """Features of whole sequences ``[B, T]`` from position 0, causal, without a cache (training);
        ``(features, tapped)`` with ``taps``, as :meth:`forward`."""
        x = self.embed_tokens(tokens)
        rope = self.rotary(torch.arange(tokens.shape[1], device=tokens.device)[None], x.dtype)
        got = []
        for i, layer in enumerate(self.layers):
            if taps is not None and i in taps:
                got.append((i, x))
            x = layer.forward_causal(x, rope)
        return self.norm(x) if taps is None else (self.norm(x), _gather_taps(taps, got, len(self.layers)))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(features)


def _gather_taps(taps, got: list, num_layers: int) -> torch.Tensor:
    """Concatenate the collected layer inputs in the order of ``taps`` (ids may repeat)."""
    by_layer = dict(got)
    missing = [t for t in taps if t not in by_layer]
    if missing:
        raise ValueError(f"tap layers {missing} are not in [0, {num_layers})")
    return torch.cat([by_layer[t] for t in taps], dim=-1)
