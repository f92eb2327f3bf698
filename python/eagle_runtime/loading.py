"""Loading Hugging Face checkpoints (local directories or hub ids) into the runtime's own modules."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .config import ModelConfig
from .model import Transformer

DEFAULT_MAX_LEN = 4096


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


def resolve_dir(name_or_path: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a hub id resolved through the Hugging Face cache (offline works)."""
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    name = str(name_or_path)
    if p.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"model directory {name!r} does not exist (and is not a hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        patterns = allow_patterns or ["*.json", "*.safetensors", "*.bin", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # the hub raises many types; all mean "cannot get it"
        raise FileNotFoundError(
            f"{name!r} is neither a local directory nor a hub id available here ({type(e).__name__}: {e})"
        ) from e


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: safetensors or pytorch_model.bin, single file or sharded with an index."""
    d = Path(directory)
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        if (d / index_name).is_file():
            with open(d / index_name) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            break
        if (d / single).is_file():
            files = [single]
            break
    else:
        raise CheckpointError(
            f"no weights in {d}: expected model.safetensors, pytorch_model.bin or a sharded index json"
        )
    state: dict[str, torch.Tensor] = {}
    for name in files:
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"shard {name} listed in the index is missing from {d}")
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(str(path)))
        else:
            state.update(torch.load(path, map_location="cpu", weights_only=True))
    return state


_EXPERT = re.compile(r"^layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")


def _to_internal(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map HF key names onto :class:`Transformer`'s (``model.`` prefix dropped, Mixtral experts stacked)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for key, t in state.items():
        k = key[len("model.") :] if key.startswith("model.") else key
        if k.startswith("rotary_emb") or k.endswith("rotary_emb.inv_freq"):
            continue
        m = _EXPERT.match(k)
        if m:
            experts.setdefault((int(m[1]), m[3]), {})[int(m[2])] = t
            continue
        k = k.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        if k.endswith(".mlp.experts.gate_up_proj"):  # transformers 5 fused layout: [E, 2I, H], gate first
            gate, up = t.chunk(2, dim=1)
            base = k[: -len("experts.gate_up_proj")]
            out[base + "w1"], out[base + "w3"] = gate, up
            continue
        if k.endswith(".mlp.experts.down_proj"):
            out[k[: -len("experts.down_proj")] + "w2"] = t
            continue
        out[k] = t
    for (layer, w), per in experts.items():
        if sorted(per) != list(range(cfg.num_experts)):
            raise CheckpointError(f"layer {layer} has experts {sorted(per)} for {w}, expected {cfg.num_experts}")
        out[f"layers.{layer}.mlp.{w}"] = torch.stack([per[i] for i in range(cfg.num_experts)])
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def load_target(
    name_or_path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_len: int | None = None,
) -> Transformer:
    """Our :class:`Transformer` with the weights of a HF LLaMA-family or Mixtral checkpoint."""
    d = resolve_dir(name_or_path)
    config_path = d / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json at {config_path}")
    with open(config_path) as f:
        config = json.load(f)
    ModelConfig.from_dict(config)  # an unsupported architecture is reported before any weights are read
    try:
        return target_from_state_dict(config, load_state_dict(d), dtype, device, max_len)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("<state dict>", str(d))) from None


def target_from_state_dict(
    config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, device, max_len: int | None = None
) -> Transformer:
    """Our :class:`Transformer` from a HF config dict and HF-named tensors (e.g. a live transformers model)."""
    cfg = ModelConfig.from_dict(config)
    max_len = max_len or min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
    with torch.device("meta"):
        model = Transformer(cfg, max_len)
    tied = ("lm_head.weight",) if cfg.tie_word_embeddings else ()
    _load_strict(model, _to_internal(state, cfg), Path("<state dict>"), skip=tied)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = type(model.rotary)(cfg, max_len)
    return model.fuse_weights_().to(device=device, dtype=dtype).eval().requires_grad_(False)


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path, skip=()) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in skip}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"weights in {where} do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != tuple(shape):
            raise CheckpointError(f"{k} in {where} has shape {tuple(state[k].shape)}, the config implies {tuple(shape)}")
    model.load_state_dict(state, assign=True, strict=not skip)
