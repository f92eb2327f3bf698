"""Train an EAGLE-3 draft head for a frozen target (training-time test, reduced draft vocabulary).

    python -m eagle_runtime.train --head eagle3 --base TARGET_DIR --corpus FILE --out HEAD_DIR [--draft-vocab N ...]

Data preparation, the loop (schedule, evaluation, ``--max-minutes``), the refusal to replace a head without
``--overwrite``, weights-only ``--resume``, atomic saves, SIGINT/SIGTERM save-and-exit and the command line's
one-line errors (exit status 2) are shared with EAGLE-1 (:func:`.common.prepare_training`, :func:`.loop.fit`,
:func:`.command.run_cli`).
What differs:

- The draft vocabulary: the ``--draft-vocab`` most frequent target tokens of the training rows (loss-masked
  positions; ties to the lower id), saved as ``d2t``/``t2d``; with ``--init`` the starting head's vocabulary
  and taps (``--taps`` may name other layers, as many: ``fc`` is kept and learns to read them).
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

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..draft3 import Eagle3Head, new_eagle3_head
from ..model import Transformer, apply_rope, bad_taps
from .common import TrainConfig, load_init, prepare_training, start_from
from .loop import fit


@dataclass
class Eagle3TrainConfig(TrainConfig):
    draft_vocab: int = 32000  # clamped to the target's vocabulary
    ttt_steps: int = 7
    ttt_decay: float = 0.8
    taps: str = ""  # comma-separated target layer ids (L: the last layer's output); empty = 2, L//2, L-3

    def __post_init__(self):
        """:class:`TrainConfig`'s checks plus the EAGLE-3 fields' (one-line ValueError naming the flag)."""
        super().__post_init__()
        for name in ("draft_vocab", "ttt_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        if isinstance(self.ttt_decay, bool) or not isinstance(self.ttt_decay, (int, float)) or not 0 < self.ttt_decay <= 1:
            raise ValueError(f"--ttt-decay must lie in (0, 1], got {self.ttt_decay!r}")
        if not isinstance(self.taps, str) or (self.taps and not all(t.strip().isdigit() for t in self.taps.split(","))):
            raise ValueError(f"--taps {self.taps!r}: give comma-separated layer ids, e.g. 2,8,13")

    def tap_ids(self) -> tuple[int, ...] | None:
        """The ``--taps`` layer ids, or None for the default (2, L//2, L-3)."""
        return tuple(int(t) for t in self.taps.split(",")) if self.taps else None


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


def target_outputs3(head: Eagle3Head, target: Transformer, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """What the training-time test reads from the frozen target for ``tokens [B, T]``: (final features, the
    concatenated taps ``[B, T, len(taps) * H_t]``)."""
    with torch.no_grad():
        return target.forward_causal(tokens, taps=head.target_taps)


def ttt_loss(head: Eagle3Head, target: Transformer, tokens, loss_mask, steps: int, decay: float,
             given: tuple | None = None):
    """(loss, per-step losses, step-0 top-1 accuracy) of the training-time test on ``tokens [B, T]``; ``given``:
    the rows' :func:`target_outputs3` when cached (else computed here)."""
    B, T = tokens.shape
    N = T - 1
    dev = tokens.device
    feats, taps = given if given is not None else target_outputs3(head, target, tokens)
    with torch.no_grad():
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
    overwrite: bool = False,
) -> dict:
    """Train an EAGLE-3 head for ``base`` on ``corpus``; saves into ``out`` and returns the metrics history.

    Safety as :func:`eagle_runtime.train.train_head`: ``out`` holding a head is an error unless ``resume`` or
    ``overwrite``; saves are atomic; SIGINT/SIGTERM stop at a step boundary, save, and set ``"interrupted"``."""
    cfg = cfg or Eagle3TrainConfig()
    taps = cfg.tap_ids()

    def check_target(target):
        if target.max_len < cfg.seq_len + cfg.ttt_steps:
            raise ValueError(f"the target's max_len {target.max_len} < --seq-len + --ttt-steps = "
                             f"{cfg.seq_len + cfg.ttt_steps}")
        if taps is not None and bad_taps(taps, target.cfg.num_layers):
            raise ValueError(f"--taps {cfg.taps}: layer ids must lie in [0, {target.cfg.num_layers}]")

    target, train_rows, hold_rows = prepare_training(
        base, corpus, out, cfg, resume=resume, overwrite=overwrite, tokenizer=tokenizer,
        max_len=max(cfg.seq_len + cfg.ttt_steps + 1, 64), check_target=check_target)
    V = target.cfg.vocab_size
    start = load_init(cfg.init, target, Eagle3Head) if cfg.init else None
    if start is not None:  # fine-tuning keeps the head's own draft vocabulary, and its taps unless --taps names others
        vocab_ids = start.token_map.cpu()
        if taps is not None and len(taps) != len(start.target_taps):
            raise ValueError(f"--taps {cfg.taps}: --init {cfg.init} reads {len(start.target_taps)} taps "
                             f"({','.join(map(str, start.target_taps))}); fc's shape needs as many")
        taps = taps or tuple(start.target_taps)
    else:
        vocab_ids = draft_vocabulary(*train_rows, V, min(cfg.draft_vocab, V))
    head = new_eagle3_head(target, len(vocab_ids), taps, cfg.seed, vocab_ids=vocab_ids, from_target=True)
    if start is not None:
        start_from(head, start, cfg.init)

    def loss_fn(tokens, mask, given):
        loss, per_step, acc = ttt_loss(head, target, tokens, mask, cfg.ttt_steps, cfg.ttt_decay, given)
        return loss, {"ce0": per_step[0].item(), "acc": acc.item()}

    return fit(head, target, train_rows, hold_rows, out, cfg, loss_fn,
               lambda t, m: evaluate3(head, target, t, m, cfg), resume=resume, progress=progress,
               desc="train eagle3 head", target_fn=lambda t: target_outputs3(head, target, t))


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
