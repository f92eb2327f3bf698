"""Train an EAGLE-1 draft head for a frozen target (the paper's recipe, at any scale).

    python -m eagle_runtime.train --base TARGET_DIR --corpus FILE --out HEAD_DIR [--steps N ...]

Corpus: plain text (documents separated by blank lines) or jsonl. Jsonl rows with ``messages`` (role/content),
``conversations`` or ``question``/``answer`` are rendered as chats (the tokenizer's chat template when it has
one, else ``User: ...\\nAssistant: ...``) and the loss covers assistant tokens only; rows with ``text`` are plain.

Features are computed on the fly by the frozen target for every batch (no disk cache: zero disk cost, one target
forward per step). Loss per position ``i``: ``SmoothL1(head_i, f_{i+1}) + 0.1 * CE(p_target(. | f_{i+1}),
p_head(. | head_i))`` with uniform noise U(-0.1, 0.1) added to the input features; AdamW with warm-up and cosine
decay; gradient clipping 0.5. Saves the published EAGLE-1 format (``config.json`` + ``pytorch_model.bin``) and a
``train_state.pt`` for ``--resume``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .draft import EagleHead, head_config, init_head_, save_head
from .loading import load_target
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


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def _chat_rows(row: dict) -> list[tuple[str, str]] | None:
    if "messages" in row or "conversations" in row:
        msgs = row.get("messages") or row.get("conversations")
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
                row = json.loads(line)
                chat = _chat_rows(row)
                if chat is not None:
                    docs.append(encode_chat(tokenizer, chat))
                elif "text" in row:
                    ids = tokenizer(row["text"])["input_ids"]
                    docs.append((ids, [1] * len(ids)))
                else:
                    raise ValueError(f"{path}:{n}: a row needs 'messages', 'conversations', 'question'/'answer' or 'text'")
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


def pack(docs, seq_len: int, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate documents into ``[N, seq_len]`` rows (loss mask zero across document joins)."""
    ids: list[int] = []
    mask: list[int] = []
    for d_ids, d_mask in docs:
        ids.extend(d_ids)
        mask.extend(d_mask)
        if mask:
            mask[len(mask) - len(d_mask)] = 0  # never train the head across a document boundary
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus too small for one sequence of {seq_len} tokens")
    t = torch.tensor(ids[: n * seq_len]).view(n, seq_len)
    m = torch.tensor(mask[: n * seq_len], dtype=torch.float32).view(n, seq_len)
    return t, m


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------
def head_loss(head: EagleHead, target: Transformer, tokens, loss_mask, noise: float, cls_weight: float):
    """(loss, regression loss, classification loss, top-1 accuracy) on a batch ``tokens [B, T]``."""
    with torch.no_grad():
        feats = target.forward_causal(tokens)  # f_0 .. f_{T-1}
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
) -> dict:
    """Train a head for ``base`` on ``corpus``; saves into ``out`` and returns the metrics history."""
    cfg = cfg or TrainConfig()
    torch.manual_seed(cfg.seed)
    target = base if isinstance(base, Transformer) else load_target(base, max_len=max(cfg.seq_len, 64))
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
    head = EagleHead(head_config(target.cfg), target.max_len).to(dev)
    init_head_(head, cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step, history = 0, []
    state_path = out / "train_state.pt"
    if resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {state_path}")
        st = torch.load(state_path, map_location=dev, weights_only=False)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, history = st["step"], st["history"]
    sched = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0)))  # noqa: E731
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t_start = time.time()
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, desc="train head", dynamic_ncols=True)
    head.train()
    while step < cfg.steps:
        if cfg.max_minutes is not None and time.time() - t_start > 60 * cfg.max_minutes:
            bar.write(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
            break
        idx = torch.randint(0, train_t.shape[0], (cfg.batch_size,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * sched(step)
        loss, reg, cls, acc = head_loss(head, target, train_t[idx].to(dev), train_m[idx].to(dev), cfg.noise, cfg.cls_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc.item():.3f}")
        rec = {"step": step, "loss": loss.item(), "reg": reg.item(), "cls": cls.item(), "acc": acc.item()}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            rec.update(evaluate(head, target, hold_t, hold_m, cfg))
            bar.write(f"step {step}: held-out loss {rec['eval_loss']:.4f} top-1 {rec['eval_acc']:.3f}")
            head.train()
        history.append(rec)
        if step % cfg.save_every == 0:
            _save(head, opt, step, history, out, cfg)
    bar.close()
    head.eval()
    _save(head, opt, step, history, out, cfg)
    return {"history": history, "out": str(out), "steps": step}


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


def _save(head, opt, step, history, out: Path, cfg: TrainConfig) -> None:
    save_head(head, out)
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": history}, out / "train_state.pt")
    with open(out / "train_config.json", "w") as f:
        json.dump({"train": asdict(cfg), "steps_done": step, "last": history[-1] if history else None}, f, indent=2)


def main(argv=None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--head", choices=["eagle1", "eagle3"], default="eagle1")
    kind, argv = pre.parse_known_args(argv)
    if kind.head == "eagle3":  # EAGLE-3 heads: training-time test, reduced vocabulary (train_eagle3.py)
        from .train_eagle3 import main as main_eagle3

        return main_eagle3(argv)
    p = argparse.ArgumentParser(prog="python -m eagle_runtime.train", description="Train an EAGLE-1 draft head "
                                "(--head eagle3: an EAGLE-3 head, see python -m eagle_runtime.train --head eagle3 -h).")
    p.add_argument("--base", required=True, help="target model: HF directory or hub id")
    p.add_argument("--corpus", required=True, help="plain text (blank-line separated documents) or chat jsonl")
    p.add_argument("--out", required=True, help="output directory (published EAGLE-1 format)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    d = TrainConfig()
    for name, val in asdict(d).items():
        typ = float if name == "max_minutes" else type(val)
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=val)
    a = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(a, k) for k in asdict(d)})
    res = train_head(a.base, a.corpus, a.out, cfg, resume=a.resume)
    last = res["history"][-1] if res["history"] else {}
    print(json.dumps({"out": res["out"], "steps": res["steps"], "last": last}, indent=2))


if __name__ == "__main__":
    main()
