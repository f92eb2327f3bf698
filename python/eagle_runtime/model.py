"""Lean LLaMA / Mixtral modules over a static KV cache (no HF modeling code on the hot path).

One forward serves prefill, plain decode, tree verification and the draft head's tree steps: ``T`` new tokens
at given positions are written into the cache at ``write_pos[b] + t`` and attend to slots ``[0, prefix_len[b])``
plus the tree-masked slots after ``prefix_len[b]`` (see :func:`eagle_kernels.reference.tree_attention`).

The KV cache is one tensor ``[2 * num_layers, B, H_kv, S, D]`` (layer ``l``'s keys at ``2l``, values at
``2l + 1``), so a single compaction launch moves every layer.

Fused layer (after :meth:`Transformer.fuse_weights_`, which the loaders call): per layer and forward, on the
``triton`` backend, nine device ops (``benchmarks/op_count.py``)::

    h, res = add_rms_norm(x, res)          (the first layer: rms_norm(x), res = x)
    q = rope_kv_write(qkv_proj(h), ...)    rotary on q and k, k and v written into the cache planes
    a = o_proj(tree_attention(q, ...))
    h, res = add_rms_norm(a, res)
    x = down_proj(silu_mul(gate_up_proj(h)))
                                           the final norm is add_rms_norm(x, res) of the last layer's output
The ``torch`` backend runs the same structure on the PyTorch references (the plain, unfused ops).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eagle_kernels import Ops, reference
from eagle_kernels.cpu_fast import moe_experts_by_expert

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


class RopeAt:
    """The rotary tables and the positions one forward reads them at (no gather until someone needs it).

    The fused path hands ``cos``, ``sin`` and ``positions`` to :func:`eagle_kernels.reference.rope_kv_write`,
    which gathers in the kernel; ``cos, sin = rope`` gives the gathered ``[B, T, 1, D]`` tables in ``dtype``
    (the unfused path and training).
    """

    __slots__ = ("cos", "sin", "positions", "dtype")

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
        self.cos, self.sin, self.positions, self.dtype = cos, sin, positions, dtype

    def __iter__(self):
        yield self.cos[self.positions].to(self.dtype).unsqueeze(2)
        yield self.sin[self.positions].to(self.dtype).unsqueeze(2)


class Rotary(nn.Module):
    """cos/sin tables for positions ``[0, max_len)``, half-rotation layout (HF checkpoints)."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        inv = rope_inv_freq(cfg)
        freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeAt:
        return RopeAt(self.cos, self.sin, positions.view(positions.shape), dtype)  # a per-forward object


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _merge_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One ``nn.Linear`` whose output is the concatenation of ``parts``' outputs (same input)."""
    w = torch.cat([p.weight for p in parts])
    merged = nn.Linear(w.shape[1], w.shape[0], bias=parts[0].bias is not None, device="meta")
    merged.weight = nn.Parameter(w, requires_grad=parts[0].weight.requires_grad)
    if parts[0].bias is not None:
        merged.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=parts[0].bias.requires_grad)
    return merged


class _Merged(nn.Module):
    """A module whose projections ``_parts`` (HF checkpoint layout) can be merged into one ``_merged_name`` linear.

    :meth:`fuse_` replaces the separate ``nn.Linear`` submodules by the merged one (a single GEMM). The state
    dict keeps the HF layout either way: saving splits the merged weight back into the separate keys and
    loading separate keys into a fused module merges them, so checkpoints never see the merged names.
    """

    _parts: tuple[str, ...] = ()
    _merged_name = ""

    def __init__(self):
        super().__init__()
        self._register_state_dict_hook(_Merged._split_state)
        self._register_load_state_dict_pre_hook(self._merge_state)

    def _sizes(self) -> list[int]:
        raise NotImplementedError

    @property
    def fused(self) -> bool:
        return getattr(self, self._merged_name, None) is not None

    def fuse_(self) -> None:
        if self.fused:
            return
        setattr(self, self._merged_name, _merge_linears([getattr(self, n) for n in self._parts]))
        for n in self._parts:
            delattr(self, n)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """The merged projection's output ``[..., sum(sizes)]`` (one GEMM once fused)."""
        if self.fused:
            return getattr(self, self._merged_name)(x)
        return torch.cat([getattr(self, n)(x) for n in self._parts], dim=-1)

    @staticmethod
    def _split_state(module, state, prefix, local_metadata):
        if not module.fused:
            return state
        for suffix in ("weight", "bias"):
            key = f"{prefix}{module._merged_name}.{suffix}"
            if key in state:
                for n, t in zip(module._parts, state.pop(key).split(module._sizes())):
                    state[f"{prefix}{n}.{suffix}"] = t
        return state

    def _merge_state(self, state, prefix, *args):
        if not self.fused:
            return
        for suffix in ("weight", "bias"):
            keys = [f"{prefix}{n}.{suffix}" for n in self._parts]
            if all(k in state for k in keys):
                state[f"{prefix}{self._merged_name}.{suffix}"] = torch.cat([state.pop(k) for k in keys])


class Attention(_Merged):
    """Self-attention with the K/V cache. ``num_heads``/``num_kv_heads`` are this module's (local) head counts."""

    _parts = ("q_proj", "k_proj", "v_proj")
    _merged_name = "qkv_proj"

    def __init__(self, cfg: ModelConfig, in_features: int | None = None):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        inp = in_features or h
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.q_proj = nn.Linear(inp, cfg.num_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(inp, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(inp, cfg.num_kv_heads * d, bias=cfg.attention_bias)
        self.qkv_proj = None
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.attention_bias)

    def _sizes(self) -> list[int]:
        d = self.head_dim
        return [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d]

    def forward(self, x, rope: RopeAt, k_cache, v_cache, prefix_len, write_idx, mask, ops: Ops):
        """Writes this step's K/V at ``write_idx [B, T]`` and attends; one QKV GEMM and one rope+write launch."""
        B, T, _ = x.shape
        q = ops.rope_kv_write(self._project(x), rope.cos, rope.sin, rope.positions, k_cache, v_cache, write_idx,
                              self.num_heads, self.num_kv_heads)
        out = ops.tree_attention(q, k_cache, v_cache, prefix_len, mask)
        return self.o_proj(out.reshape(B, T, -1))

    def forward_causal(self, x, rope):
        """Plain causal self-attention over whole sequences (training and feature extraction; no cache)."""
        B, T, _ = x.shape
        d = self.head_dim
        q, k, v = self._project(x).view(B, T, -1, d).split([self.num_heads, self.num_kv_heads, self.num_kv_heads], 2)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin).transpose(1, 2), apply_rope(k, cos, sin).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.transpose(1, 2).repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(_Merged):
    _parts = ("gate_proj", "up_proj")
    _merged_name = "gate_up_proj"

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.gate_up_proj = None
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def _sizes(self) -> list[int]:
        return [self.down_proj.in_features] * 2

    def forward(self, x, ops: Ops | None = None):
        if ops is None and not self.fused:  # training: the plain HF expression
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        silu_mul = ops.silu_mul if ops is not None else reference.silu_mul
        return self.down_proj(silu_mul(self._project(x)))


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

    def route(self, flat):
        """``(top_w, top_i)`` ``[N, top_k]``: the kept experts' renormalised weights (in ``flat.dtype``) and ids."""
        weights = torch.softmax(self.gate(flat).float(), dim=-1)
        top_w, top_i = torch.topk(weights, self.top_k, dim=-1)
        return (top_w / top_w.sum(-1, keepdim=True)).to(flat.dtype), top_i

    def forward(self, x, ops: Ops | None = None):
        """``ops.moe_experts`` over the routed tokens; without ``ops`` (training) the per-expert HF expression.
        The triton table's grouped GEMMs (eagle_kernels.moe) have static shapes, so the same path runs eagerly and
        inside CUDA graphs, at about top_k/E of the dense all-experts work."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        top_w, top_i = self.route(flat)
        experts = ops.moe_experts if ops is not None else moe_experts_by_expert
        return experts(flat, top_w, top_i, self.w1, self.w3, self.w2).view(shape)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer. The residual stream is carried beside the block outputs, so that every norm fuses
    with the add before it (:meth:`step`); :meth:`forward` is the plain ``hidden -> hidden`` view of a layer."""

    def __init__(self, cfg: ModelConfig, input_norm: bool = True):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if input_norm else None
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if cfg.num_experts else MLP(cfg)

    def fuse_weights_(self) -> None:
        """Merge q/k/v and gate/up into single projections (state dicts keep the HF layout)."""
        self.self_attn.fuse_()
        if isinstance(self.mlp, MLP):
            self.mlp.fuse_()

    def step(self, x, residual, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops: Ops):
        """One layer on the carried residual stream: returns ``(mlp_out, residual)``; the hidden state after the
        layer is ``mlp_out + residual`` (the next layer's input norm, or the final norm, adds them).

        ``residual=None`` starts the stream: ``x`` is the hidden state itself (the embeddings).
        """
        norm = self.input_layernorm
        if residual is None:
            residual, h = x, (ops.rms_norm(x, norm.weight, norm.eps) if norm is not None else x)
        elif norm is not None:
            h, residual = ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        else:
            h = residual = x + residual
        a = self.self_attn(h, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops)
        post = self.post_attention_layernorm
        h, residual = ops.add_rms_norm(a, residual, post.weight, post.eps)
        return self.mlp(h, ops), residual

    def forward(self, x, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops):
        out, residual = self.step(x, None, rope, k_cache, v_cache, prefix_len, write_idx, mask, ops)
        return out + residual

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

    def new_cache(self, batch: int, max_len: int | None = None) -> torch.Tensor:
        """A zeroed KV cache ``[2 * num_layers, batch, H_kv, max_len, D]`` in the model's dtype and device."""
        cfg, w = self.cfg, self.embed_tokens.weight
        s = max_len or self.max_len
        return torch.zeros(2 * cfg.num_layers, batch, cfg.num_kv_heads, s, cfg.head_dim, dtype=w.dtype, device=w.device)

    def forward(self, tokens, positions, cache, prefix_len, write_pos, mask, ops: Ops, taps=None):
        """Features (final-norm hidden states) ``[B, T, H]`` of ``tokens [B, T]``; writes K/V into ``cache``.

        ``positions [B, T]`` are rotary positions, ``write_pos [B]`` the first cache slot written, ``mask
        [B, T, M]`` the tree mask relative to ``prefix_len [B]``; ``ops`` the op table every layer runs on (one
        backend per call, :func:`eagle_kernels.get_ops`). With ``taps`` (layer ids) it returns
        ``(features, tapped)``: ``tapped [B, T, len(taps) * H]`` the un-normed hidden states at the *input* of
        those layers (HF ``hidden_states[i]``; id ``num_layers``: the last layer's output before the final
        norm), concatenated in the order given (EAGLE-3 heads read them).
        """
        x = self.embed_tokens(tokens)
        got: list | None = None if taps is None else []
        ops = ops.for_forward()
        x, residual = self.run_layers(x, positions, cache, prefix_len, write_pos, mask, ops, taps, got)
        feats, last = ops.add_rms_norm(x, residual, self.norm.weight, self.norm.eps)
        if got is None:
            return feats
        if len(self.layers) in taps:
            got.append((len(self.layers), last))
        return feats, _gather_taps(taps, got, len(self.layers))

    def run_layers(self, x, positions, cache, prefix_len, write_pos, mask, ops: Ops, taps=None, got=None):
        """``(last_mlp_out, residual)``: the final hidden state is their sum (the final norm fuses the add).
        ``ops``: one forward's table (``Ops.for_forward``).
        With ``taps``, appends ``(i, hidden state at the input of layer i)`` to ``got`` for each tapped layer."""
        rope = self.rotary(positions, x.dtype)
        write_idx = write_pos[:, None] + torch.arange(x.shape[1], device=x.device)
        residual = None
        for i, layer in enumerate(self.layers):
            if taps is not None and i in taps:
                got.append((i, x if residual is None else x + residual))
            x, residual = layer.step(x, residual, rope, cache[2 * i], cache[2 * i + 1], prefix_len, write_idx, mask,
                                     ops)
        return x, residual

    def fuse_weights_(self) -> "Transformer":
        """Merge every layer's q/k/v and gate/up projections (one GEMM each); call once after loading weights.

        Loaders read the HF layout and call this at the end; ``state_dict()`` still gives the HF layout.
        """
        for layer in self.layers:
            layer.fuse_weights_()
        return self

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
        if taps is None:
            return self.norm(x)
        got.append((len(self.layers), x))
        return self.norm(x), _gather_taps(taps, got, len(self.layers))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.lm_head(features)


def bad_taps(taps, num_layers: int) -> list[int]:
    """The ids in ``taps`` that name no tap of a ``num_layers``-layer target (valid: ``0 .. num_layers``, the
    last one being the last layer's output)."""
    return [t for t in taps if not 0 <= t <= num_layers]


def _gather_taps(taps, got: list, num_layers: int) -> torch.Tensor:
    """Concatenate the collected layer inputs in the order of ``taps`` (ids may repeat; ``num_layers``: the last
    layer's output)."""
    by_layer = dict(got)
    missing = [t for t in taps if t not in by_layer]
    if missing:
        raise ValueError(f"tap layers {missing} are not in [0, {num_layers}]")
    return torch.cat([by_layer[t] for t in taps], dim=-1)
