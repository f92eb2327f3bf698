"""The EAGLE-1 draft head: one decoder layer over [token embedding, target feature].

Published checkpoint format (e.g. ``yuhuili/EAGLE-llama2-chat-7B``): ``config.json`` (a LLaMA config) plus
``pytorch_model.bin`` or ``model.safetensors`` with keys ``fc.weight [H, 2H]``, ``fc.bias [H]``,
``layers.0.self_attn.{q,k,v,o}_proj.weight``, ``layers.0.mlp.{gate,up,down}_proj.weight``,
``layers.0.post_attention_layernorm.weight`` and optionally ``embed_tokens.weight``. The layer has no
input_layernorm and there is no final norm; logits come from the target's ``lm_head``.

At draft position ``i`` the head reads ``(feature f_i, token t_{i+1})`` and predicts ``f_{i+1}``.

:func:`load_head` and :func:`save_head` also read and write EAGLE-3 heads (auto-detected,
:mod:`eagle_runtime.draft3`, which does not import this module); both kinds answer the
:class:`~eagle_runtime.drafter.Drafter` interface the decode cycle calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from eagle_kernels import Ops

from .atomic import atomic_write, atomic_write_text
from .config import ModelConfig
from .draft3 import Eagle3Head, is_eagle3, load_eagle3, save_eagle3
from .drafter import Drafter, head_config, init_head_, load_checked
from .loading import CheckpointError, load_state_dict, resolve_dir
from .model import DecoderLayer, Rotary, Transformer

EAGLE1_WEIGHTS = "pytorch_model.bin"


class EagleHead(Drafter):
    """EAGLE-1 head: reads the target's final features (``target_taps = None``), drafts over the full vocabulary
    through the target's ``lm_head`` (``token_map = None``)."""

    def __init__(self, cfg: ModelConfig, max_len: int, own_embedding: bool = False):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(2 * h, h, bias=True)
        self.layers = nn.ModuleList([DecoderLayer(cfg, input_norm=False)])
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h) if own_embedding else None
        self.rotary = Rotary(cfg, max_len)
        self.max_len = max_len

    def new_cache(self, batch: int, max_len: int | None = None) -> torch.Tensor:
        cfg, w = self.cfg, self.fc.weight
        s = max_len or self.max_len
        return torch.zeros(2, batch, cfg.num_kv_heads, s, cfg.head_dim, dtype=w.dtype, device=w.device)

    def first_input(self, states: torch.Tensor) -> torch.Tensor:
        return states

    def draft_logits(self, hidden: torch.Tensor, target: Transformer) -> torch.Tensor:
        return target.logits(hidden)

    def forward(self, features, tokens, target: Transformer, positions, cache, prefix_len, write_pos, mask, ops: Ops):
        """Predicted next features ``[B, T, H]`` from target features and the tokens one step ahead, on ``ops``."""
        embed = self.embed_tokens if self.embed_tokens is not None else target.embed_tokens
        x = self.fc(torch.cat([embed(tokens), features.to(self.fc.weight.dtype)], dim=-1))
        rope = self.rotary(positions, x.dtype)
        write_idx = write_pos[:, None] + torch.arange(x.shape[1], device=x.device)
        return self.layers[0](x, rope, cache[0], cache[1], prefix_len, write_idx, mask, ops.for_forward())

    def forward_causal(self, features, tokens, target: Transformer):
        """Training forward over whole sequences: position ``i`` reads ``(features[:, i], tokens[:, i])``."""
        embed = self.embed_tokens if self.embed_tokens is not None else target.embed_tokens
        x = self.fc(torch.cat([embed(tokens), features.to(self.fc.weight.dtype)], dim=-1))
        rope = self.rotary(torch.arange(x.shape[1], device=x.device)[None], x.dtype)
        return self.layers[0].forward_causal(x, rope)


def check_compatible(head_cfg: ModelConfig, target_cfg: ModelConfig, where: str) -> None:
    if head_cfg.hidden_size != target_cfg.hidden_size:
        raise CheckpointError(
            f"draft head {where} has hidden_size {head_cfg.hidden_size}, the target has {target_cfg.hidden_size}"
        )
    if head_cfg.vocab_size != target_cfg.vocab_size:
        raise CheckpointError(f"draft head {where} has vocab_size {head_cfg.vocab_size}, the target has {target_cfg.vocab_size}")


def load_head(name_or_path: str | Path, target: Transformer, dtype=None, device=None, taps=None) -> Drafter:
    """Load a published EAGLE-1 head or an EAGLE-3 head (official or ``speculators`` layout, auto-detected) and
    check it fits ``target``. ``taps`` overrides an EAGLE-3 head's tap layers (default: its config's, else
    2, L//2, L-3)."""
    d = resolve_dir(name_or_path, allow_patterns=["*.json", "*.bin", "*.safetensors"])
    raw = ModelConfig.read_json(d / "config.json")
    state = load_state_dict(d)
    w = target.embed_tokens.weight
    if is_eagle3(raw, state):
        head = load_eagle3(str(name_or_path), raw, state, target, taps)
        return head.to(device=device or w.device, dtype=dtype or w.dtype).eval().requires_grad_(False)
    cfg = ModelConfig.from_dict(raw)
    check_compatible(cfg, target.cfg, str(name_or_path))
    if "fc.weight" not in state:
        raise CheckpointError(f"{name_or_path} has no fc.weight: not an EAGLE-1 draft head")
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    cfg.attention_bias = "layers.0.self_attn.q_proj.bias" in state
    head = EagleHead(cfg, target.max_len, own_embedding="embed_tokens.weight" in state)
    load_checked(head, state, str(name_or_path))
    head.layers[0].fuse_weights_()
    return head.to(device=device or w.device, dtype=dtype or w.dtype).eval().requires_grad_(False)


def save_head(head: Drafter, directory: str | Path, safetensors: bool = False) -> Path:
    """Write ``head`` in its published format (config.json + pytorch_model.bin or model.safetensors): EAGLE-1,
    or for an EAGLE-3 head the official EAGLE-3 layout. Each file is written atomically (:mod:`.atomic`)."""
    if isinstance(head, Eagle3Head):
        return save_eagle3(head, directory, safetensors)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(head.cfg.raw, num_hidden_layers=1, architectures=["LlamaForCausalLM"], model_type="llama")
    atomic_write_text(d / "config.json", json.dumps(cfg, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    if safetensors:
        from safetensors.torch import save_file

        atomic_write(d / "model.safetensors", lambda p: save_file(state, str(p)))
    else:
        atomic_write(d / EAGLE1_WEIGHTS, lambda p: torch.save(state, p))
    return d


def random_head(target: Transformer, seed: int = 0, std: float = 0.02) -> EagleHead:
    """A randomly initialised head shaped for ``target`` (tests; a random head drafts badly but stays exact)."""
    head = init_head_(EagleHead(head_config(target.cfg), target.max_len), seed, std)
    head.layers[0].fuse_weights_()
    w = target.embed_tokens.weight
    return head.to(device=w.device, dtype=w.dtype).eval().requires_grad_(False)
