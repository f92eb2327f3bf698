"""Train an EAGLE-1 draft head for a frozen target (the paper's recipe, at any scale).

    python -m eagle_runtime.train --base TARGET_DIR --corpus FILE --out HEAD_DIR [--steps N ...]

Corpus: plain text (documents separated by blank lines) or jsonl. Jsonl rows with ``messages`` (role/content),
``conversations`` or ``question``/``answer`` are rendered as chats (the tokenizer's chat template when it has
one, else ``User: ...\\nAssistant: ...``) and the loss covers assistant tokens only; rows with ``text`` are plain;
rows with ``input_ids`` (and an optional 0/1 ``loss_mask``) are token ids as they are, as
``python -m eagle_runtime.distill`` writes the target's own answers.

Features are computed on the fly by the frozen target for every batch (one target forward per step), or with
``--cache-target`` once for every training row before the first step and kept in memory (no disk: the run
refuses to start when they would not fit; the time it takes counts against ``--max-minutes``).

Loss per position ``i``: ``SmoothL1(head_i, f_{i+1}) + 0.1 * CE(p_target(. | f_{i+1}), p_head(. | head_i))`` with
uniform noise U(-0.1, 0.1) added to the input features; AdamW with warm-up and cosine decay (following wall time
under ``--max-minutes``, see :func:`lr_factor`); gradient clipping 0.5. Saves the published EAGLE-1 format
(``config.json`` + ``pytorch_model.bin``) and a ``train_state.pt`` for ``--resume``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import ConfigError
from .draft import EagleHead, head_config, init_head_, save_head
from .loading import CheckpointError, atomic_write, load_target
from .model import Transformer


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    noise: float = 0.1
    cls_weight: float = 0.1
    grad_clip: float = 0.5
    eval_every: int = 200
    eval_batches: int = 4
    holdout_fraction: float = 0.05
    save_every: int = 500
    max_minutes: float | None = None
    seed: int = 0
    init: str = ""  # a head directory to start from (fine-tuning: its weights; a fresh optimizer and schedule)
    cache_target: bool = False  # the frozen target's outputs for every training row computed once, kept in memory

    def __post_init__(self):
        """Reject values that cannot train (one-line ValueError). ``warmup 0`` means no warm-up, ``eval_every 0``
        evaluates only after the last step, ``save_every 0`` saves only at the end."""
        positive = ("steps", "batch_size", "eval_batches")
        non_negative = ("warmup", "eval_every", "save_every", "weight_decay", "noise", "cls_weight")
        for name in positive + non_negative + ("lr", "grad_clip", "holdout_fraction", "seq_len", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v!r}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be >= 2 (the head predicts the next position), got {self.seq_len}")
        if self.lr <= 0 or self.grad_clip <= 0:
            raise ValueError(f"--lr and --grad-clip must be > 0, got {self.lr} and {self.grad_clip}")
        if not 0 < self.holdout_fraction < 1:
            raise ValueError(f"--holdout-fraction must lie in (0, 1), got {self.holdout_fraction}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must lie in [0, 2**63), got {self.seed}")
        if not isinstance(self.init, str):
            raise ValueError(f"--init must be a head directory, got {self.init!r}")
        if not isinstance(self.cache_target, bool):
            raise ValueError(f"--cache-target is a switch (True or False), got {self.cache_target!r}")


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _chat_rows(row: dict) -> list[tuple[str, str]] | None:
    if "messages" in row or "conversations" in row:
        msgs = row.get("messages") or row.get("conversations")
        if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
            raise ValueError("'messages'/'conversations' must be a list of objects")
        out = []
        for m in msgs:
            role = m.get("role", m.get("from", "user"))
            role = "assistant" if role in ("assistant", "gpt", "model") else ("system" if role == "system" else "user")
            out.append((role, m.get("content", m.get("value", ""))))
        return out
    if "question" in row and "answer" in row:
        return [("user", row["question"]), ("assistant", row["answer"])]
    return None


def encode_chat(tokenizer, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of a chat and a loss mask that is 1 on assistant tokens only."""
    ids: list[int] = []
    mask: list[int] = []
    has_template = getattr(tokenizer, "chat_template", None) is not None
    msgs: list[dict] = []
    for role, text in turns:
        msgs.append({"role": role, "content": text})
        if has_template:
            full = tokenizer.apply_chat_template(msgs, tokenize=True)
            if isinstance(full, dict):
                full = full["input_ids"]
            new = full[len(ids) :]
        else:
            prefix = "User: " if role == "user" else ("Assistant: " if role == "assistant" else "")
            new = tokenizer(prefix + text + "\n", add_special_tokens=not ids)["input_ids"]
        ids.extend(new)
        mask.extend([1 if role == "assistant" else 0] * len(new))
    return ids, mask


def _id_row(row: dict, vocab: int, where: str) -> tuple[list[int], list[int]]:
    """A row of token ids (``input_ids``, optional 0/1 ``loss_mask`` of the same length; all ones without it), as
    :mod:`eagle_runtime.distill` writes them."""
    ids, mask = row["input_ids"], row.get("loss_mask")
    if not isinstance(ids, list) or not ids or not all(type(t) is int and 0 <= t < vocab for t in ids):
        raise ValueError(f"{where}: 'input_ids' must be a non-empty list of token ids in [0, {vocab})")
    if mask is None:
        return ids, [1] * len(ids)
    if not isinstance(mask, list) or len(mask) != len(ids) or not all(m in (0, 1) and type(m) is int for m in mask):
        raise ValueError(f"{where}: 'loss_mask' must be a list of 0/1 of the same length as 'input_ids'")
    return ids, mask


def load_corpus(path: str | Path, tokenizer) -> list[tuple[list[int], list[int]]]:
    """Documents as (token ids, loss mask) pairs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"corpus {path} does not exist")
    docs = []
    if path.suffix == ".jsonl":
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    chat = _chat_rows(row) if isinstance(row, dict) else None
                except (ValueError, AttributeError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a valid jsonl row ({type(e).__name__}: {e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: a row must be a JSON object, got {type(row).__name__}")
                if chat is not None and not all(isinstance(t, str) for _, t in chat):
                    raise ValueError(f"{path}:{n}: every chat turn's content must be a string")
                if "text" in row and chat is None and not isinstance(row["text"], str):
                    raise ValueError(f"{path}:{n}: 'text' must be a string")
                if chat is not None:
                    docs.append(encode_chat(tokenizer, chat))
                elif "input_ids" in row:
                    docs.append(_id_row(row, len(tokenizer), f"{path}:{n}"))
                elif "text" in row:
                    ids = tokenizer(row["text"])["input_ids"]
                    docs.append((ids, [1] * len(ids)))
                else:
                    raise ValueError(f"{path}:{n}: a row needs 'messages', 'conversations', 'question'/'answer', "
                                     "'input_ids' or 'text'")
    else:
        text = path.read_text(encoding="utf-8", errors="replace")
        for block in text.split("\n\n"):
            block = block.strip()
            if block:
                ids = tokenizer(block)["input_ids"]
                docs.append((ids, [1] * len(ids)))
    if not docs:
        raise ValueError(f"corpus {path} holds no documents")
    return docs


def pack(docs, seq_len: int, pad_id: int = 0, what: str = "corpus") -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents into ``[N, seq_len]`` rows (loss mask zero across document joins). ``what`` names
    the split in errors."""
    ids: list[int] = []
    mask: list[int] = []
    for d_ids, d_mask in docs:
        ids.extend(d_ids)
        mask.extend(d_mask)
        if mask:
            mask[len(mask) - len(d_mask)] = 0  # never train the head across a document boundary
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{what} ({len(docs)} documents, {len(ids)} tokens) is shorter than one sequence of "
                         f"{seq_len} tokens (--seq-len)")
    t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    m = torch.tensor(mask[: n * seq_len], dtype=torch.float32).view(n, seq_len)
    if m[:, 1:].sum() == 0:  # the loss reads positions 1..T-1
        raise ValueError(f"{what} has no trainable tokens (a chat corpus needs assistant turns: the loss covers "
                         "assistant tokens only)")
    return t, m


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


def load_init(directory: str, target: Transformer, kind: type):
    """The head saved in ``directory`` (``--init``), which must be a ``kind`` head (one-line error otherwise)."""
    from .draft import load_head

    loaded = load_head(directory, target)
    if type(loaded) is not kind:
        raise ValueError(f"--init {directory} holds a {type(loaded).__name__}, not the {kind.__name__} this "
                         "trainer trains (pick the trainer with --head eagle1|eagle3)")
    return loaded


def start_from(head, loaded, directory: str) -> None:
    """Copy ``loaded``'s weights (from :func:`load_init`) into ``head``, a freshly built trainable head of the same
    kind and shape; a one-line error when the shapes differ."""
    try:
        head.load_state_dict(loaded.state_dict())
    except RuntimeError as e:
        raise CheckpointError(f"--init {directory}: its weights do not fit this head "
                              f"({str(e).splitlines()[0][:200]})") from None


def split_heldout(docs: list, seed: int, fraction: float) -> tuple[list, list]:
    """The trainers' split: ``docs`` shuffled with ``seed``, the first ``fraction`` of them (at least one) held out.
    Returns ``(held_out, train)``; ``docs`` is left as it was."""
    docs = list(docs)
    random.Random(seed).shuffle(docs)
    n_hold = max(1, int(len(docs) * fraction))
    return docs[:n_hold], docs[n_hold:]


def prepare_training(base, corpus, out, cfg: TrainConfig, *, resume: bool, overwrite: bool, tokenizer, max_len: int,
                     check_target=None):
    """What both trainers (EAGLE-1 here, EAGLE-3 in :mod:`.train_eagle3`) do before building a head: refuse to
    replace a head in ``out`` (before anything is loaded), load the frozen target (``max_len`` positions; then
    ``check_target(target)`` may raise) and its tokenizer, read the corpus, shuffle it (``cfg.seed``), hold out
    ``cfg.holdout_fraction`` of the documents (at least one) and pack both splits into ``[N, cfg.seq_len]`` rows.
    Returns ``(target, (train_tokens, train_mask), (held_out_tokens, held_out_mask))``; the rows stay on the CPU."""
    out = Path(out)
    if resume and not (out / "train_state.pt").is_file():
        raise FileNotFoundError(f"--resume: no {out / 'train_state.pt'}")
    if not resume and not overwrite:
        _refuse_overwrite(out)
    torch.manual_seed(cfg.seed)
    target = base if isinstance(base, Transformer) else load_target(base, max_len=max_len)
    if check_target is not None:
        check_target(target)
    if tokenizer is None:
        from .text import load_tokenizer

        if isinstance(base, Transformer):
            raise ValueError("pass tokenizer= when base is a loaded model")
        tokenizer = load_tokenizer(base)
        if tokenizer is None:
            raise ValueError(f"no tokenizer found in {base}")
    target.requires_grad_(False).eval()
    corpora = list(corpus) if isinstance(corpus, (list, tuple)) else [corpus]
    if not corpora:
        raise ValueError("--corpus: give at least one file")
    docs = [d for c in corpora for d in load_corpus(c, tokenizer)]
    corpus = " + ".join(str(c) for c in corpora)
    if len(docs) < 2:
        raise ValueError(f"corpus {corpus} holds {len(docs)} document; the held-out split needs one of its own")
    held, train = split_heldout(docs, cfg.seed, cfg.holdout_fraction)
    train_rows = pack(train, cfg.seq_len, what=f"the training split of {corpus}")
    hold_rows = pack(held, cfg.seq_len, what=(
        f"the held-out split of {corpus} (--holdout-fraction {cfg.holdout_fraction}: at least 1 document; it must "
        "fill a whole sequence, so use a larger corpus or fraction, or a smaller --seq-len)"))
    return target, train_rows, hold_rows


def fit(head, target, train_rows, hold_rows, out, cfg: TrainConfig, loss_fn, eval_fn, *, resume: bool, progress: bool,
        desc: str, target_fn) -> dict:
    """The training loop both trainers share: AdamW (betas 0.9/0.95) with :func:`lr_factor`, gradient clipping,
    held-out evaluation every ``cfg.eval_every`` steps and after the last, atomic saves every ``cfg.save_every``
    steps and at the end, the ``--max-minutes`` cap, ``resume`` from ``out/train_state.pt`` (weights only), and
    SIGINT/SIGTERM (main thread) stopping at the next step boundary with a save.

    ``loss_fn(tokens [B, T], mask [B, T], given) -> (loss, {name: float})`` (the dict has ``acc``) trains one batch;
    ``given`` is None (the loss runs the target itself) or, under ``cfg.cache_target``, the batch rows' slices of
    ``target_fn(tokens) -> tuple of [B, T, ..] tensors`` computed for every training row before the first step;
    ``eval_fn(tokens, mask) -> {"eval_loss", "eval_acc"}`` scores the held-out rows (it may leave ``head`` in eval
    mode). Returns ``{"history", "out", "steps", "interrupted" (the signal's name or None), "time_s"}``."""
    out = Path(out)
    dev = target.embed_tokens.weight.device
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step, history = 0, []
    if resume:
        step, history = _load_state(out / "train_state.pt", head, opt, dev)
    (train_t, train_m), (hold_t, hold_m) = train_rows, hold_rows
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t_start = time.time()
    cached = cache_target_outputs(target_fn, train_t, cfg.batch_size, dev, progress) if cfg.cache_target else None
    # Under --max-minutes the bar shows the share of the run done (the larger of steps and wall time, as the
    # schedule counts it), not the step count against a --steps the cap will never reach.
    capped = cfg.max_minutes is not None
    bar = tqdm(total=100 if capped else cfg.steps, initial=0 if capped else step, disable=not progress,
               desc=f"{desc} ({cfg.max_minutes:g} min budget)" if capped else desc, dynamic_ncols=True,
               unit="%" if capped else "it", bar_format="{l_bar}{bar}| {n:.0f}/100% [{elapsed}<{remaining}{postfix}]"
               if capped else None)
    head.train()
    stop: list[str] = []
    with _stop_on_signals(stop):
        while step < cfg.steps and not stop:
            if cfg.max_minutes is not None and time.time() - t_start > 60 * cfg.max_minutes:
                bar.write(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
                bar.update(100 - bar.n)  # the budget is spent: the run is done
                if history and "eval_loss" not in history[-1]:  # the saved head gets its held-out score
                    history[-1].update(eval_fn(hold_t, hold_m))
                break
            idx = torch.randint(0, train_t.shape[0], (cfg.batch_size,), generator=gen)
            elapsed = (time.time() - t_start) / (60 * cfg.max_minutes) if cfg.max_minutes is not None else 0.0
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg, elapsed)
            given = None if cached is None else tuple(c[idx].to(dev) for c in cached)
            loss, metrics = loss_fn(train_t[idx].to(dev), train_m[idx].to(dev), given)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if capped:
                bar.update(min(100.0, 100 * max(step / cfg.steps, elapsed)) - bar.n)  # as lr_factor counts it
            else:
                bar.update(1)
            bar.set_postfix(step=step, loss=f"{loss.item():.4f}", acc=f"{metrics['acc']:.3f}")
            rec = {"step": step, "loss": loss.item(), **metrics, "time_s": time.time() - t_start}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                rec.update(eval_fn(hold_t, hold_m))
                bar.write(f"step {step}: held-out loss {rec['eval_loss']:.4f} top-1 {rec['eval_acc']:.3f}")
                head.train()
            history.append(rec)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _save(head, opt, step, history, out, cfg)
    bar.close()
    head.eval()
    _save(head, opt, step, history, out, cfg)
    if stop:
        print(f"{stop[0]}: stopped at step {step}, saved to {out} (continue with --resume)", file=sys.stderr)
    return {"history": history, "out": str(out), "steps": step, "interrupted": stop[0] if stop else None,
            "time_s": time.time() - t_start}


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_target_outputs(target_fn, tokens: torch.Tensor, batch_size: int, dev, progress: bool) -> tuple:
    """``--cache-target``: ``target_fn`` over every row of ``tokens [N, T]`` once, in batches, kept in CPU memory
    (``[N, T, ..]`` per output, the target's dtype). Refused in one line, before the rows are run, when the outputs
    would take more than 80% of the memory available."""
    n = tokens.shape[0]
    first = target_fn(tokens[:batch_size].to(dev))
    need = sum(o[0].numel() * o.element_size() for o in first) * n
    avail = _available_memory()
    if avail is not None and need > 0.8 * avail:
        raise ValueError(f"--cache-target: the target's outputs for {n} training rows need {need / 2**30:.2f} GiB, "
                         f"more than 80% of the {avail / 2**30:.2f} GiB available; train without it (one target "
                         "forward per step) or on a smaller corpus")
    cached = tuple(torch.empty((n, *o.shape[1:]), dtype=o.dtype) for o in first)
    for c, o in zip(cached, first):
        c[: o.shape[0]] = o.cpu()
    bar = tqdm(range(batch_size, n, batch_size), disable=not progress, desc=f"target outputs ({need / 2**20:.0f} MiB)",
               dynamic_ncols=True, initial=1, total=math.ceil(n / batch_size))
    for s in bar:
        for c, o in zip(cached, target_fn(tokens[s : s + batch_size].to(dev))):
            c[s : s + o.shape[0]] = o.cpu()
    return cached


def lr_factor(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up over ``cfg.warmup`` steps (none when 0), then cosine decay to 0 at ``cfg.steps`` or, under
    ``--max-minutes``, at the end of the wall-clock budget if that comes first (``time_fraction``: the share of
    the budget used), so a run stopped by the cap has completed its schedule."""
    warm = 1.0 if cfg.warmup == 0 else min(1.0, (step + 1) / cfg.warmup)
    return warm * 0.5 * (1 + math.cos(math.pi * min(max(step / cfg.steps, time_fraction), 1.0)))


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


HEAD_FILES = ("pytorch_model.bin", "model.safetensors", "train_state.pt")


def _refuse_overwrite(out: Path) -> None:
    """A trained head is never replaced silently."""
    found = [f for f in HEAD_FILES if (out / f).exists()]
    if found:
        raise FileExistsError(f"{out} already holds a head ({', '.join(found)}): pass --resume to continue it or "
                              "--overwrite to replace it")


def _load_state(state_path: Path, head, opt, dev) -> tuple[int, list]:
    """Restore a ``train_state.pt`` written by :func:`_save`: tensors and plain values only (``weights_only``
    loading never runs code from the file)."""
    if not state_path.is_file():
        raise FileNotFoundError(f"--resume: no {state_path}")
    try:
        st = torch.load(state_path, map_location=dev, weights_only=True)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, history = int(st["step"]), list(st["history"])
    except Exception as e:  # unpickling refusals, truncation and foreign files raise many types
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"--resume: cannot restore {state_path} ({type(e).__name__}: "
                              f"{lines[0][:200] if lines else ''})") from None
    return step, history


def _save(head, opt, step, history, out: Path, cfg: TrainConfig) -> None:
    """The published head files, the resume state and the config, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".save.", dir=out))
    try:
        save_head(head, tmp_dir)
        for f in sorted(tmp_dir.iterdir()):  # whole files renamed into place, never written in place
            atomic_write(out / f.name, lambda p, f=f: os.replace(f, p))
    finally:
        for f in tmp_dir.iterdir():
            f.unlink()
        tmp_dir.rmdir()
    state = {"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}
    atomic_write(out / "train_state.pt", lambda p: torch.save(state, p))
    summary = {"train": asdict(cfg), "steps_done": step, "last": history[-1] if history else None}
    atomic_write(out / "train_config.json", lambda p: p.write_text(json.dumps(summary, indent=2)))


@contextlib.contextmanager
def _stop_on_signals(stop: list):
    """While active, SIGINT and SIGTERM append their name to ``stop`` (the loop then saves and returns) instead of
    killing the process mid-write. Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT, signal.SIGTERM]
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        stop.append(signal.Signals(signum).name)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, old[s])


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--head", choices=["eagle1", "eagle3"], default="eagle1")
    kind, argv = pre.parse_known_args(argv)
    if kind.head == "eagle3":  # EAGLE-3 heads: training-time test, reduced vocabulary (train_eagle3.py)
        from .train_eagle3 import main as main_eagle3

        return main_eagle3(argv)
    return run_cli(argv, prog="python -m eagle_runtime.train", cfg_type=TrainConfig, train=train_head,
                   description="Train an EAGLE-1 draft head (--head eagle3: an EAGLE-3 head, see "
                   "python -m eagle_runtime.train --head eagle3 -h).", layout="published EAGLE-1 format")


def run_cli(argv, *, prog: str, description: str, layout: str, cfg_type: type, train) -> int:
    """The command line both trainers share: ``--base/--corpus/--out/--resume/--overwrite`` plus one flag per
    field of ``cfg_type``; bad flags, corpora and files are one line on stderr with exit status 2; a signal during
    training saves and exits with ``128 + signum``."""
    from .cli import USER_ERRORS, OneLineParser

    p = OneLineParser(prog=prog, description=description)
    p.add_argument("--base", required=True, help="target model: HF directory or hub id")
    p.add_argument("--corpus", required=True, nargs="+",
                   help="plain text (blank-line separated documents) or jsonl (chats, text or token ids); several "
                   "files are read as one corpus")
    p.add_argument("--out", required=True, help=f"output directory ({layout})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a head already in OUT")
    d = cfg_type()
    for name, val in asdict(d).items():
        if isinstance(val, bool):  # --cache-target / --no-cache-target
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=val)
            continue
        typ = float if name == "max_minutes" else type(val)
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=val)
    a = p.parse_args(argv)
    try:
        cfg = cfg_type(**{k: getattr(a, k) for k in asdict(d)})
        if a.resume and a.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        res = train(a.base, a.corpus, a.out, cfg, resume=a.resume, overwrite=a.overwrite)
    except (*USER_ERRORS, FileExistsError, ConfigError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the training loop (loading): nothing to save
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    last = res["history"][-1] if res["history"] else {}
    print(json.dumps({"out": res["out"], "steps": res["steps"], "interrupted": res["interrupted"],
                      "time_s": res["time_s"], "last": last}, indent=2))
    if res["interrupted"]:
        return 128 + signal.Signals[res["interrupted"]].value
    return 0


if __name__ == "__main__":
    sys.exit(main())
