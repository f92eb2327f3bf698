"""Train a small LLaMA target from scratch (the embedded demo model) and save it as a HF checkpoint.

    python -m eagle_runtime.train.target --out DIR [--layers 16 --dim 128 ... --steps N --max-minutes M]

The model is this package's own :class:`~eagle_runtime.model.Transformer` (built from a HF llama config dict with
:meth:`ModelConfig.from_dict`), trained with :meth:`Transformer.forward_causal`, AdamW, linear warm-up and cosine
decay. Data: TinyStories stories (blank-line separated), each wrapped as ``<s> story </s>``, concatenated into one
stream and cut into random windows of ``seq_len + 1`` tokens. The last ``--heldout-stories`` stories of the
held-out file are never trained on and give the periodic held-out loss.

The output directory is a plain HF checkpoint (``config.json``, ``model.safetensors`` with HF key names
``model.embed_tokens.weight``, ``model.layers.N.*``, ``model.norm.weight``, ``lm_head.weight``, the tokenizer,
``generation_config.json``) that :func:`eagle_runtime.load_target` and ``transformers.AutoModelForCausalLM`` both
load; :func:`check_hf_agreement` compares their logits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import atomic_write, atomic_write_text
from ..checks import check_seed
from ..config import ModelConfig
from ..datadir import shared_data_dir
from ..errors import USER_ERRORS, OneLineParser
from ..loading import load_target
from ..model import Transformer

# The optional shared data (corpora, the stories260k tokenizer): see eagle_runtime.datadir for where it is read.
_SHARED_DATA = shared_data_dir()
DEFAULT_TOKENIZER = _SHARED_DATA / "models" / "stories260k-hf"
DEFAULT_TRAIN = [_SHARED_DATA / "corpus" / "tinystories_val.txt", _SHARED_DATA / "corpus" / "tinystories_extra.txt"]
DEFAULT_HELDOUT = _SHARED_DATA / "corpus" / "tinystories_extra.txt"


@dataclass
class TargetConfig:
    """Shape and training settings. The shape defaults are the demo pair's; ``scripts/build_demo.py`` sets its
    training budget (seq_len 512, batch 4, 13 minutes of wall time)."""

    dim: int = 128
    layers: int = 16
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 320
    max_position_embeddings: int = 512
    tie_embeddings: bool = False
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 600
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 16384
    heldout_stories: int = 400
    max_minutes: float | None = None
    seed: int = 0
    store_dtype: str = "float32"
    train_files: list[str] = field(default_factory=lambda: [str(p) for p in DEFAULT_TRAIN])
    heldout_file: str = str(DEFAULT_HELDOUT)

    def __post_init__(self):
        """One-line ValueErrors for settings that cannot train; ``warmup 0`` is no warm-up and ``eval_every 0``
        evaluates only the saved model at the end."""
        for name in ("dim", "layers", "heads", "kv_heads", "intermediate", "max_position_embeddings", "batch_size",
                     "steps", "eval_tokens", "heldout_stories"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        for name in ("warmup", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 0, got {v!r}")
        check_seed(self.seed, "--seed", lo=0)
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2, got {self.seq_len}")
        for name in ("lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0) or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("--weight-decay must be >= 0 and --min-lr-ratio in [0, 1]")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.store_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--store-dtype must be float32, float16 or bfloat16, got {self.store_dtype!r}")

    def hf_config(self, tokenizer) -> dict:
        if self.dim % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"dim {self.dim}, heads {self.heads}, kv_heads {self.kv_heads} do not divide")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.dim // self.heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "torch_dtype": self.store_dtype,
        }


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def read_stories(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} does not exist")
    return [s.strip() for s in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if s.strip()]


def encode_stream(stories: list[str], tokenizer) -> torch.Tensor:
    """``<s> story </s>`` for every story, concatenated into one int64 stream."""
    ids = tokenizer(stories, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    flat: list[int] = []
    for s in ids:
        flat.append(bos)
        flat.extend(s)
        flat.append(eos)
    return torch.tensor(flat, dtype=torch.long)


def split_data(cfg: TargetConfig, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(train stream, held-out stream): the held-out file's last ``heldout_stories`` stories are held out."""
    held_all = read_stories(cfg.heldout_file)
    if cfg.heldout_stories >= len(held_all):
        raise ValueError(f"--heldout-stories {cfg.heldout_stories} >= the {len(held_all)} stories of {cfg.heldout_file}")
    held = held_all[-cfg.heldout_stories :]
    held_set = set(held)
    train: list[str] = []
    for f in cfg.train_files:
        train.extend(s for s in read_stories(f) if s not in held_set)
    return encode_stream(train, tokenizer), encode_stream(held, tokenizer)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------
def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers), norms at 1."""
    g = torch.Generator().manual_seed(seed)
    std_res = 0.02 / math.sqrt(2 * model.cfg.num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(torch.randn(p.shape, generator=g) * std_res)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def lm_loss(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of ``tokens [B, T + 1]``."""
    logits = model.logits(model.forward_causal(tokens[:, :-1]))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model: Transformer, stream: torch.Tensor, seq_len: int, max_tokens: int, batch: int = 8) -> float:
    """Token-weighted mean loss over consecutive non-overlapping windows of the held-out stream."""
    was_training = model.training
    model.eval()
    n = min(len(stream) - 1, max_tokens) // seq_len
    if n == 0:
        raise ValueError("held-out stream shorter than one window")
    windows = stream[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)[:n]
    total = 0.0
    for i in range(0, n, batch):
        w = windows[i : i + batch]
        total += lm_loss(model, w).item() * w.shape[0]
    model.train(was_training)
    return total / n


def hf_state_dict(model: Transformer, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our parameters under HF LLaMA key names (``model.`` prefix; ``lm_head.weight`` unless tied)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if model.cfg.tie_word_embeddings:
                continue
            out[k] = v
        else:
            out["model." + k] = v
    return {k: v.detach().to(dtype).contiguous().cpu() for k, v in out.items()}


def save_hf(model: Transformer, hf_cfg: dict, tokenizer, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gen_cfg = {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": hf_cfg["eos_token_id"]}
    # Every file is written to a temporary name in ``out`` and renamed: a kill never leaves a partial file.
    atomic_write_text(out / "config.json", json.dumps(hf_cfg, indent=2))
    atomic_write_text(out / "generation_config.json", json.dumps(gen_cfg, indent=2))
    state = hf_state_dict(model, dtype)
    atomic_write(out / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer.", dir=out))
    try:
        tokenizer.save_pretrained(str(tmp))
        for f in sorted(tmp.iterdir()):
            atomic_write(out / f.name, lambda p, f=f: shutil.copyfile(f, p))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@torch.no_grad()
def check_hf_agreement(directory: str | Path, tokens: torch.Tensor | None = None) -> float:
    """Max |logit difference| between :func:`load_target` and ``AutoModelForCausalLM`` on ``tokens [B, T]``."""
    from transformers import AutoModelForCausalLM

    ours = load_target(directory)
    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    if tokens is None:
        tokens = torch.randint(3, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    a = ours.logits(ours.forward_causal(tokens))
    b = hf(tokens).logits
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------
def train_target(cfg: TargetConfig, out: str | Path, tokenizer_dir: str | Path = DEFAULT_TOKENIZER, progress: bool = True) -> dict:
    """Train a target per ``cfg``, save it into ``out`` (HF format) and return its metrics."""
    from transformers import AutoTokenizer

    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    train, held = split_data(cfg, tokenizer)
    hf_cfg = cfg.hf_config(tokenizer)
    model = Transformer(ModelConfig.from_dict(hf_cfg), max(cfg.seq_len, cfg.max_position_embeddings))
    init_weights(model, cfg.seed)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, disable=not progress, desc="train target", dynamic_ncols=True)
    step, progress_frac = 0, 0.0
    while step < cfg.steps:
        # Progress drives the schedule: steps, or wall time when --max-minutes would end the run first, so the
        # cosine decay always completes (the number of steps done is recorded).
        progress_frac = step / cfg.steps
        if cfg.max_minutes:
            progress_frac = max(progress_frac, (time.perf_counter() - t0) / (60 * cfg.max_minutes))
        if progress_frac >= 1.0:
            bar.write(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
        warm = 1.0 if cfg.warmup == 0 else min(1.0, (step + 1) / cfg.warmup)
        cos = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_frac))
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warm * cos
        start = torch.randint(0, len(train) - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)
        batch = torch.stack([train[s : s + cfg.seq_len + 1] for s in start.tolist()])
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        rec = {"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"], "time_s": time.perf_counter() - t0}
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        if cfg.eval_every and step % cfg.eval_every == 0:
            rec["heldout_loss"] = heldout_loss(model, held, cfg.seq_len, cfg.eval_tokens)
            bar.write(f"step {step}: train loss {rec['loss']:.3f}, held-out loss {rec['heldout_loss']:.3f}")
        history.append(rec)
    bar.close()
    train_time = time.perf_counter() - t0
    model.eval()
    dtype = getattr(torch, cfg.store_dtype)
    save_hf(model, hf_cfg, tokenizer, out, dtype)
    # Evaluate what was saved (rounded to the storage dtype), through the loader.
    saved = load_target(out, max_len=max(cfg.seq_len, cfg.max_position_embeddings))
    final = heldout_loss(saved, held, cfg.seq_len, cfg.eval_tokens * 4)
    metrics = {
        "params": n_params,
        "steps_done": step,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "train_tokens": len(train),
        "heldout_tokens": len(held),
        "train_time_s": round(train_time, 1),
        "final_train_loss": sum(r["loss"] for r in history[-20:]) / max(1, len(history[-20:])),
        "heldout_loss": final,
        "heldout_perplexity": math.exp(final),
        "hf_max_abs_logit_diff": check_hf_agreement(out, held[: 2 * 64].view(2, 64)),
        "config": asdict(cfg),
    }
    atomic_write_text(Path(out) / "train_metrics.json", json.dumps({**metrics, "history": history}, indent=1))
    return metrics


def main(argv=None) -> dict:
    p = OneLineParser(prog="python -m eagle_runtime.train.target", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (HF checkpoint)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="HF directory with the tokenizer (vocab 512)")
    d = TargetConfig()
    for name, val in asdict(d).items():
        flag = "--" + name.replace("_", "-")
        if name == "train_files":
            p.add_argument(flag, nargs="+", default=val)
        elif name == "max_minutes":
            p.add_argument(flag, type=float, default=val, help="end early (the cosine schedule follows wall time)")
        elif isinstance(val, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=val)
        else:
            p.add_argument(flag, type=type(val), default=val)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        cfg = TargetConfig(**{k: getattr(a, k) for k in asdict(d)})
        m = train_target(cfg, a.out, a.tokenizer)
    except USER_ERRORS as e:
        p.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(json.dumps({k: v for k, v in m.items() if k != "config"}, indent=2))
    return m


if __name__ == "__main__":
    main()
