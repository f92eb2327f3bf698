"""Train an EAGLE-1 draft head for a frozen target (the paper's recipe, at any scale).

    python -m eagle_runtime.train --base TARGET_DIR --corpus FILE --out HEAD_DIR [--steps N ...]

The corpus formats are :mod:`.common`'s. Features are computed on the fly by the frozen target for every batch
(one target forward per step), or with ``--cache-target`` once for every training row before the first step and
kept in memory (no disk: the run refuses to start when they would not fit; the time it takes counts against
``--max-minutes``).

Loss per position ``i``: ``SmoothL1(head_i, f_{i+1}) + 0.1 * CE(p_target(. | f_{i+1}), p_head(. | head_i))`` with
uniform noise U(-0.1, 0.1) added to the input features; AdamW with warm-up and cosine decay (following wall time
under ``--max-minutes``, see :func:`.loop.lr_factor`); gradient clipping 0.5. Saves the published EAGLE-1 format
(``config.json`` + ``pytorch_model.bin``) and a ``train_state.pt`` for ``--resume``.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..draft import EagleHead
from ..drafter import head_config, init_head_
from ..model import Transformer
from .common import TrainConfig, load_init, prepare_training, start_from
from .loop import fit


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def target_features(target: Transformer, tokens) -> tuple[torch.Tensor]:
    """What EAGLE-1's loss reads from the frozen target for ``tokens [B, T]``: its features ``f_0 .. f_{T-1}``."""
    with torch.no_grad():
        return (target.forward_causal(tokens),)


def head_loss(head: EagleHead, target: Transformer, tokens, loss_mask, noise: float, cls_weight: float,
              given: tuple | None = None):
    """(loss, regression loss, classification loss, top-1 accuracy) on a batch ``tokens [B, T]``; ``given``: the
    rows' :func:`target_features` when cached (else computed here)."""
    (feats,) = given if given is not None else target_features(target, tokens)
    with torch.no_grad():
        target_logp = torch.log_softmax(target.logits(feats[:, 1:]).float(), dim=-1)
    inp = feats[:, :-1]
    if noise > 0:
        inp = inp + (torch.rand_like(inp) * 2 - 1) * noise
    pred = head.forward_causal(inp, tokens[:, 1:], target)  # predicts f_1 .. f_{T-1}
    m = loss_mask[:, 1:]
    denom = m.sum().clamp(min=1)
    reg = (F.smooth_l1_loss(pred.float(), feats[:, 1:].float(), reduction="none").mean(-1) * m).sum() / denom
    head_logp = torch.log_softmax(target.logits(pred).float(), dim=-1)
    cls = (-(target_logp.exp() * head_logp).sum(-1) * m).sum() / denom
    acc = (((head_logp.argmax(-1) == target_logp.argmax(-1)).float() * m).sum() / denom).detach()
    return reg + cls_weight * cls, reg.detach(), cls.detach(), acc


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------
def train_head(
    base: str | Path | Transformer,
    corpus: str | Path,
    out: str | Path,
    cfg: TrainConfig | None = None,
    resume: bool = False,
    tokenizer=None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Train a head for ``base`` on ``corpus``; saves into ``out`` and returns the metrics history.

    ``out`` holding a head is an error unless ``resume`` (continue it) or ``overwrite`` (replace it). Every save is
    atomic (temporary files in ``out``, then renames). SIGINT/SIGTERM (main thread) stop at the next step
    boundary, save, and return with ``"interrupted"`` set to the signal's name."""
    cfg = cfg or TrainConfig()
    target, train_rows, hold_rows = prepare_training(base, corpus, out, cfg, resume=resume, overwrite=overwrite,
                                                     tokenizer=tokenizer, max_len=max(cfg.seq_len, 64))
    head = EagleHead(head_config(target.cfg), target.max_len).to(target.embed_tokens.weight.device)
    init_head_(head, cfg.seed)
    if cfg.init:
        start_from(head, load_init(cfg.init, target, EagleHead), cfg.init)

    def loss_fn(tokens, mask, given):
        loss, reg, cls, acc = head_loss(head, target, tokens, mask, cfg.noise, cfg.cls_weight, given)
        return loss, {"reg": reg.item(), "cls": cls.item(), "acc": acc.item()}

    return fit(head, target, train_rows, hold_rows, out, cfg, loss_fn, lambda t, m: evaluate(head, target, t, m, cfg),
               resume=resume, progress=progress, desc="train head", target_fn=lambda t: target_features(target, t))


@torch.no_grad()
def evaluate(head: EagleHead, target: Transformer, tokens, mask, cfg: TrainConfig) -> dict:
    head.eval()
    losses, accs = [], []
    for i in range(min(cfg.eval_batches, math.ceil(tokens.shape[0] / cfg.batch_size))):
        sl = slice(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        dev = target.embed_tokens.weight.device
        loss, _, _, acc = head_loss(head, target, tokens[sl].to(dev), mask[sl].to(dev), 0.0, cfg.cls_weight)
        losses.append(loss.item())
        accs.append(acc.item())
    return {"eval_loss": sum(losses) / len(losses), "eval_acc": sum(accs) / len(accs)}
