"""Model configuration parsed from a Hugging Face ``config.json`` (LLaMA family and Mixtral)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM"}


_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(ValueError):
    """A checkpoint's config cannot be served by this runtime."""


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = 1
    eos_token_id: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        mtype = d.get("model_type")
        if mtype not in SUPPORTED_ARCHITECTURES:
            archs = d.get("architectures")
            raise ConfigError(
                f"unknown architecture model_type={mtype!r} (architectures={archs}); "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES.values())}"
            )
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config of {mtype!r} model lacks required key(s) {missing}")
        for k in _REQUIRED:
            v = d[k]
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ConfigError(f"config {k}={v!r} must be a positive integer")
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported (only 'silu')")
        heads = d["num_attention_heads"]
        eos = d.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        cfg = cls(
            model_type=mtype,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=d.get("rope_theta", (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            rope_scaling=_rope_scaling(d),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            num_experts=d.get("num_local_experts", 0) if mtype == "mixtral" else 0,
            num_experts_per_tok=d.get("num_experts_per_tok", 0) if mtype == "mixtral" else 0,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos,
            raw=d,
        )
        if cfg.num_heads % cfg.num_kv_heads:
            raise ConfigError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}")
        return cfg

    @staticmethod
    def read_json(path: str | Path) -> dict:
        """The dict in a ``config.json``; a missing file is FileNotFoundError, a malformed one ConfigError."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a {type(d).__name__}, not a JSON object")
        return d

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(cls.read_json(path))


def _rope_scaling(d: dict) -> dict | None:
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: 'linear', 'llama3')")
    return dict(rs, rope_type=kind)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, LLaMA-3 or linear scaling applied.

    Float32, computed as transformers does, so that cos/sin tables agree with the reference bit for bit.
    """
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    factor = float(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend in between.
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_ctx = float(rs["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(medium, blended, scaled)
