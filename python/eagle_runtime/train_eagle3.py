"""Train an EAGLE-3 draft head for a frozen target (training-time test, reduced draft vocabulary).

    python -m eagle_runtime.train --head eagle3 --base TARGET_DIR --corpus FILE --out HEAD_DIR [--draft-vocab N ...]

Data, schedule, progress bar and checkpointing are :mod:`eagle_runtime.train`'s. What differs:

- The draft vocabulary: the ``--draft-vocab`` most frequent target tokens of the training rows (loss-masked
  positions; ties to the lower id), saved as ``d2t``/``t2d``.
- The training-time test: the head runs on its own outputs for ``--ttt-steps`` steps. Step ``j`` at index ``q``
  reads (its step ``j-1`` output at ``q`` (step 0: ``fc`` of the target taps at ``q``), token ``t_{q+1+j}``) at
  rotary position ``q + j``, attends to the step-0 keys at indices ``<= q`` (the true context) and to its own
  chain's keys of steps ``1..j`` at index ``q`` (exactly the draft cache a tree node of depth ``j + 1`` sees), and
  is scored against the target's distribution at position ``q + 1 + j`` restricted to the draft vocabulary
  (soft cross-entropy, weight ``ttt_decay ** j``). No feature regression, no input noise.
- Held-out top-1: step 0's draft argmax (mapped to a target id) equals the target's argmax over the full
  vocabulary, as EAGLE-1's trainer measures it.

Saves the official EAGLE-3 layout (``config.json`` + ``pytorch_model.bin``) and ``train_state.pt`` for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .draft3 import Eagle3Head, new_eagle3_head
from .loading import load_target
from .model import Transformer, apply_rope
from .train import TrainConfig, _save, load_corpus, pack


@dataclass
class Eagle3TrainConfig(TrainConfig):
    draft_vocab: int = 32000  # clamped to the target's vocabulary
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    taps: str = ""  # comma-separated target layer ids; empty = 2, L//2, L-3


def draft_vocabulary(tokens: torch.Tensor, mask: torch.Tensor, vocab_size: int, n: int) -> torch.Tensor:
    """The ``n`` most frequent ids of ``tokens`` at positions where ``mask > 0`` (ties to the lower id; ids never
    seen fill up in id order), ascending."""
    counts = torch.bincount(tokens[mask > 0].flatten(), minlength=vocab_size)[:vocab_size]
    order = torch.sort(-counts, stable=True).indices  # descending count, lower id first on ties
    return order[:n].sort().values


def _ttt_attention(q: torch.Tensor, ks: list, vs: list, group: int) -> torch.Tensor:
    """``q [B, h, N, d]``; ``ks/vs[0] [B, h_kv, N, d]`` causal over indices, ``ks/vs[s >= 1]`` the same index only."""
    scale = q.shape[-1] ** -0.5
    k0 = ks[0].repeat_interleave(group, 1)
    N = q.shape[2]
    s0 = (q @ k0.transpose(-1, -2)) * scale
    s0 = s0.masked_fill(~torch.ones(N, N, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    diag = [(q * k.repeat_interleave(group, 1)).sum(-1, keepdim=True) * scale for k in ks[1:]]
    p = torch.softmax(torch.cat([s0, *diag], -1).float(), -1).to(q.dtype)
    out = p[..., :N] @ vs[0].repeat_interleave(group, 1)
    for s, v in enumerate(vs[1:]):
        out = out + p[..., N + s : N + s + 1] * v.repeat_interleave(group, 1)
    return out


def ttt_forward(head: Eagle3Head, tokens: torch.Tensor, taps: torch.Tensor, target: Transformer, steps: int):
    """The head run on its own outputs: yields, for ``j = 0 .. steps-1``, the step's output ``[B, T-1, H]``
    (index ``q`` = the chain started at true position ``q``, now at position ``q + j``)."""
    B, T = tokens.shape
    N = T - 1
    layer, attn = head.midlayer, head.midlayer.self_attn
    nh, nkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    idx = torch.arange(N, device=tokens.device)
    hidden = head.first_input(taps[:, :N])
    ks, vs = [], []
    for j in range(steps):
        at = (idx + 1 + j).clamp(max=T - 1)  # the token read (past the end: padding, never scored)
        x, residual = layer.attn_input(hidden, head.embed(tokens[:, at], target))
        cos, sin = head.rotary((idx + j)[None], x.dtype)
        q = apply_rope(attn.q_proj(x).view(B, N, nh, d), cos, sin).transpose(1, 2)
        ks.append(apply_rope(attn.k_proj(x).view(B, N, nkv, d), cos, sin).transpose(1, 2))
        vs.append(attn.v_proj(x).view(B, N, nkv, d).transpose(1, 2))
        out = _ttt_attention(q, ks, vs, nh // nkv).transpose(1, 2).reshape(B, N, nh * d)
        hidden = layer.finish(residual, attn.o_proj(out))
        yield hidden


def ttt_loss(head: Eagle3Head, target: Transformer, tokens, loss_mask, steps: int, decay: float):
    """(loss, per-step losses, step-0 top-1 accuracy) of the training-time test on ``tokens [B, T]``."""
    B, T = tokens.shape
    N = T - 1
    dev = tokens.device
    with torch.no_grad():
        feats, taps = target.forward_causal(tokens, taps=head.target_taps)
        full = target.logits(feats)
        target_top = full.argmax(-1)
        target_p = torch.softmax(full[..., head.token_map].float(), -1)  # restricted to the draft vocabulary
    idx = torch.arange(N, device=dev)
    losses = []
    total = torch.zeros((), device=dev)
    acc = torch.zeros(())
    for j, hidden in enumerate(ttt_forward(head, tokens, taps, target, steps)):
        at = (idx + 1 + j).clamp(max=T - 1)  # scored target position
        valid = (idx + 1 + j <= T - 1).float()[None] * loss_mask[:, at]
        logp = torch.log_softmax(head.draft_logits(hidden).float(), -1)
        denom = valid.sum().clamp(min=1)
        ce = (-(target_p[:, at] * logp).sum(-1) * valid).sum() / denom
        total = total + decay**j * ce
        losses.append(ce.detach())
        if j == 0:
            hit = (head.token_map[logp.argmax(-1)] == target_top[:, at]).float()
            acc = ((hit * valid).sum() / denom).detach()
    return total, losses, acc


def train_head3(
    base: str | Path | Transformer,
    corpus: str | Path,
    out: str | Path,
    cfg: Eagle3TrainConfig | None = None,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
) -> dict:
    """Train an EAGLE-3 head for ``base`` on ``corpus``; saves into ``out`` and returns the metrics history."""
    cfg = cfg or Eagle3TrainConfig()
    torch.manual_seed(cfg.seed)
    max_len = max(cfg.seq_len + cfg.ttt_steps + 1, 64)
    target = base if isinstance(base, Transformer) else load_target(base, max_len=max_len)
    if target.max_len < cfg.seq_len + cfg.ttt_steps:
        raise ValueError(f"the target's max_len {target.max_len} < seq_len + ttt_steps = {cfg.seq_len + cfg.ttt_steps}")
    if tokenizer is None:
        from .generate import _load_tokenizer

        if isinstance(base, Transformer):
            raise ValueError("pass tokenizer= when base is a loaded model")
        tokenizer = _load_tokenizer(base)
        if tokenizer is None:
            raise ValueError(f"no tokenizer found in {base}")
    target.requires_grad_(False).eval()
    dev = target.embed_tokens.weight.device
    docs = load_corpus(corpus, tokenizer)
    rng = random.Random(cfg.seed)
    rng.shuffle(docs)
    n_hold = max(1, int(len(docs) * cfg.holdout_fraction))
    train_t, train_m = pack(docs[n_hold:], cfg.seq_len)
    hold_t, hold_m = pack(docs[:n_hold], cfg.seq_len)
    V = target.cfg.vocab_size
    n_draft = min(cfg.draft_vocab, V)
    taps = tuple(int(t) for t in cfg.taps.split(",")) if cfg.taps else None
    if taps is not None and not all(0 <= t < target.cfg.num_layers for t in taps):
        raise ValueError(f"--taps {cfg.taps}: layer ids must lie in [0, {target.cfg.num_layers})")
    vocab_ids = draft_vocabulary(train_t, train_m, V, n_draft)
    head = new_eagle3_head(target, n_draft, taps, cfg.seed, vocab_ids=vocab_ids, from_target=True)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step, history = 0, []
    state_path = out / "train_state.pt"
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {state_path}")
        st = torch.load(state_path, map_location=dev, weights_only=True)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, history = st["step"], st["history"]
    sched = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))  # noqa: E731
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train eagle3 head", dynamic_ncols=True)
    head.train()
    while step < cfg.steps:
        if cfg.max_minutes is not None and time.time() - t_start > 60 * cfg.max_minutes:
            bar.write(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
        idx = torch.randint(0, train_t.shape[0], (cfg.batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * sched(step)
        loss, per_step, acc = ttt_loss(head, target, train_t[idx].to(dev), train_m[idx].to(dev), cfg.ttt_steps,
                                       cfg.ttt_decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc.item():.3f}")
        rec = {"step": step, "loss": loss.item(), "ce0": per_step[0].item(), "acc": acc.item(),
               "time_s": time.time() - t_start}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec.update(evaluate3(head, target, hold_t, hold_m, cfg))
            bar.write(f"step {step}: held-out loss {rec['eval_loss']:.4f} top-1 {rec['eval_acc']:.3f}")
            head.train()
        history.append(rec)
        if step % cfg.save_every == 0:
            _save(head, opt, step, history, out, cfg)
    bar.close()
    if history and "eval_acc" not in history[-1]:  # stopped by the time cap: evaluate what is saved
        history[-1].update(evaluate3(head, target, hold_t, hold_m, cfg))
    head.eval()
    _save(head, opt, step, history, out, cfg)
    return {"history": history, "out": str(out), "steps": step, "time_s": time.time() - t_start}


@torch.no_grad()
def evaluate3(head: Eagle3Head, target: Transformer, tokens, mask, cfg: Eagle3TrainConfig) -> dict:
    head.eval()
    losses, accs = [], []
    dev = target.embed_tokens.weight.device
    for i in range(min(cfg.eval_batches, math.ceil(tokens.shape[0] / cfg.batch_size))):
        sl = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        loss, _, acc = ttt_loss(head, target, tokens[sl].to(dev), mask[sl].to(dev), cfg.ttt_steps, cfg.ttt_decay)
        losses.append(loss.item())
        accs.append(acc.item())
    return {"eval_loss": sum(losses) / len(losses), "eval_acc": sum(accs) / len(accs)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m eagle_runtime.train --head eagle3",
                                description="Train an EAGLE-3 draft head (official EAGLE-3 layout).")
    p.add_argument("--base", required=True, help="target model: HF directory or hub id")
    p.add_argument("--corpus", required=True, help="plain text (blank-line separated documents) or chat jsonl")
    p.add_argument("--out", required=True, help="output directory (official EAGLE-3 layout)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    d = Eagle3TrainConfig()
    for name, val in asdict(d).items():
        typ = float if name == "max_minutes" else type(val)
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=val)
    a = p.parse_args(argv)
    cfg = Eagle3TrainConfig(**{k: getattr(a, k) for k in asdict(d)})
    if cfg.draft_vocab < 1 or cfg.ttt_steps < 1 or not 0 < cfg.ttt_decay <= 1:
        p.error("--draft-vocab and --ttt-steps must be >= 1 and --ttt-decay in (0, 1]")
    if cfg.taps and not all(t.strip().lstrip("-").isdigit() for t in cfg.taps.split(",")):
        p.error(f"--taps {cfg.taps!r}: give comma-separated layer ids, e.g. 2,8,13")
    try:
        res = train_head3(a.base, a.corpus, a.out, cfg, resume=a.resume)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    last = res["history"][-1] if res["history"] else {}
    print(json.dumps({"out": res["out"], "steps": res["steps"], "time_s": res["time_s"], "last": last}, indent=2))


if __name__ == "__main__":
    main()
