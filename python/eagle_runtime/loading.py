"""Loading Hugging Face checkpoints (local directories or hub ids) into the runtime's own modules."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from .config import ModelConfig
from .model import Transformer

DEFAULT_MAX_LEN = 4096


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not fit the model it is loaded into."""


# dtypes by name, as ``--dtype`` spells them and their short forms
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """A weight dtype: a name of :data:`DTYPES` or a floating-point ``torch.dtype`` of 16 bits or more (float8 has
    no matmul here; integer and bool weights are no model), else a one-line ValueError / TypeError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"{name} {dtype!r} is not one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch dtype or one of {', '.join(DTYPES)}, got {type(dtype).__name__}")
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise ValueError(f"{name} {dtype} is not a floating-point dtype of 16 bits or more (use float32, float16 "
                         "or bfloat16)")
    return dtype


def check_model_path(path, name: str = "model path") -> None:
    """A one-line TypeError unless ``path`` is a ``str`` or ``os.PathLike`` (``Path(None)`` says neither which
    argument nor what it should be)."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a model directory or hub id (a str or path), got {type(path).__name__}")


def resolve_dir(name_or_path: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a hub id resolved through the Hugging Face cache (offline works)."""
    check_model_path(name_or_path)
    if not str(name_or_path).strip():
        raise FileNotFoundError("empty model path: give a model directory or a hub id like 'org/name'")
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
            files = index_shards(d, index_name)
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
        state.update(_read_weights(path))
    return state


def index_shards(d: Path, index_name: str) -> list[str]:
    """The shard files named by the index ``d / index_name`` (its ``weight_map`` values), sorted, each checked to
    lie inside ``d``: a name that is absolute, climbs out with ``..`` or is a symlink leading out of ``d`` is a
    one-line :class:`CheckpointError` naming it. The index is data from whoever published the checkpoint, and
    without the check it could make the loader read any file the user can read. One exception keeps hub downloads
    working: in the Hugging Face cache a snapshot's files are symlinks into the repository's ``blobs`` folder
    (``<repo>/snapshots/<rev>/x -> ../../blobs/<hash>``), so there that folder counts as inside too."""
    try:
        with open(d / index_name) as f:
            names = set(json.load(f)["weight_map"].values())
        if not all(isinstance(n, str) and n for n in names):
            raise TypeError("shard names must be non-empty strings")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{d / index_name} is not a valid index ({_one_line(e)})") from None
    root = d.resolve()
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    for name in names:
        rel = Path(name)
        # Both the name as written and where it resolves to: a symlink with a plain name leads out with no "..".
        real = (d / rel).resolve()
        if rel.is_absolute() or ".." in rel.parts or not any(real.is_relative_to(r) for r in roots):
            raise CheckpointError(f"shard {name!r} listed in {d / index_name} lies outside the model directory "
                                  "(absolute path, '..' or a symlink leading out): refused")
    return sorted(names)


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """One weights file as tensors, never unpickling code; unreadable, truncated or non-finite data raise
    :class:`CheckpointError`."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip raise many types; all mean a corrupt or foreign file
        raise CheckpointError(f"cannot read weights {path} (corrupt, truncated or not a checkpoint): {_one_line(e)}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a mapping of names to tensors")
    for k, v in state.items():
        # NaN/inf weights give NaN logits, which surface much later as out-of-range sampled ids.
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"{k} in {path} holds NaN or infinite values")
    return state


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that exists here, or a one-line :class:`ValueError`."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__}, {build})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported: use 'cpu', 'cuda' or 'cuda:N'")
    return dev


def check_max_len(max_len: int | None, context: int) -> int | None:
    """Validate a requested KV cache length: a positive integer; beyond the model's context only warns."""
    if max_len is None:
        return None
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    if max_len > context:
        warnings.warn(
            f"max_len {max_len} exceeds the model's context of {context} positions (max_position_embeddings): "
            "positions beyond it are untrained, and the KV cache grows with max_len",
            stacklevel=3,
        )
    return max_len


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
    """Our :class:`Transformer` with the weights of a HF LLaMA-family or Mixtral checkpoint; ``dtype`` as
    :func:`check_dtype` takes it (a ``torch.dtype`` or a name such as ``"bf16"``)."""
    dtype = check_dtype(dtype)
    check_device(device)
    d = resolve_dir(name_or_path)
    config = ModelConfig.read_json(d / "config.json")
    cfg = ModelConfig.from_dict(config)  # an unsupported architecture is reported before any weights are read
    check_max_len(max_len, cfg.max_position_embeddings)
    try:
        return target_from_state_dict(config, load_state_dict(d), dtype, device, max_len)
    except CheckpointError as e:
        raise CheckpointError(str(e).replace("<state dict>", str(d))) from None


def target_from_state_dict(
    config: dict, state: dict[str, torch.Tensor], dtype: torch.dtype, device, max_len: int | None = None
) -> Transformer:
    """Our :class:`Transformer` from a HF config dict and HF-named tensors (e.g. a live transformers model)."""
    dtype = check_dtype(dtype)
    cfg = ModelConfig.from_dict(config)
    if max_len is None:
        max_len = min(cfg.max_position_embeddings, DEFAULT_MAX_LEN)
    elif isinstance(max_len, bool) or not isinstance(max_len, int) or max_len <= 0:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
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
