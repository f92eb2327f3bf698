"""What both head trainers share before and around the loop: the settings, the corpus and the split.

Corpus: plain text (documents separated by blank lines) or jsonl. Jsonl rows with ``messages`` (role/content),
``conversations`` or ``question``/``answer`` are rendered as chats (the tokenizer's chat template when it has
one, else ``User: ...\\nAssistant: ...``) and the loss covers assistant tokens only; rows with ``text`` are plain;
rows with ``input_ids`` (and an optional 0/1 ``loss_mask``) are token ids as they are, as
``python -m eagle_runtime.train.distill`` writes the target's own answers.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_seed
from ..draft import load_head
from ..loading import CheckpointError, load_target
from ..model import Transformer
from ..text import load_tokenizer


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
        check_seed(self.seed, "--seed", lo=0)
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
    :mod:`eagle_runtime.train.distill` writes them."""
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


def load_init(directory: str, target: Transformer, kind: type):
    """The head saved in ``directory`` (``--init``), which must be a ``kind`` head (one-line error otherwise)."""
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
    """What both trainers (:mod:`.eagle1`, :mod:`.eagle3`) do before building a head: refuse to
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


HEAD_FILES = ("pytorch_model.bin", "model.safetensors", "train_state.pt")


def _refuse_overwrite(out: Path) -> None:
    """A trained head is never replaced silently."""
    found = [f for f in HEAD_FILES if (out / f).exists()]
    if found:
        raise FileExistsError(f"{out} already holds a head ({', '.join(found)}): pass --resume to continue it or "
                              "--overwrite to replace it")
