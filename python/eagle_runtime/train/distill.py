"""A self-distillation corpus: the target's own answers to prompts, for training draft heads.

    python -m eagle_runtime.train.distill --base TARGET_DIR --prompts FILE [FILE ...] --out CORPUS.jsonl

A draft head is scored on what the *target* writes, not on what a corpus' authors wrote. This runs the target
(plain decoding in this runtime, batched) on prompts taken from the given files and writes what it answered:

- Prompts: from jsonl files the first user turn (``question``, ``messages``/``conversations``, ``turns``,
  ``prompt`` or ``text``); from text files each blank-line separated block's opening (at most
  ``--prompt-chars`` characters, cut at a space). Each is put in chat form as the benchmark puts its questions
  (:func:`eagle_runtime.chat.make_prompt`) and cut to its last ``--prompt-tokens`` tokens. Sources alternate,
  then the prompts are shuffled (``--seed``).
- Answers: ``--max-new-tokens`` per prompt, stopping at EOS (kept), at the ``--temperatures`` given, taken in turn
  per batch (``0`` is greedy; sampling uses the runtime's seeded sampler).
- Second turns (``--second-turns``, a share of the conversations): after the target's answer, another prompt of
  the pool as the user's next turn, answered again at the same temperature; the first answer goes back into the
  prompt as text, as the benchmark's second turns do. Its row is separate from the first turn's.
- Rows: ``{"input_ids": prompt + answer, "loss_mask": 0 on the prompt and 1 on the answer, "temperature",
  "source" (of the last prompt), "turns"}``; :func:`eagle_runtime.train.load_corpus` reads them as they are (no re-tokenisation, so the head
  trains on exactly the target's tokens). The file is written atomically at the end; an existing file is
  replaced only with ``--overwrite``.
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import atomic_write_text
from ..chat import encode_prompt, make_prompt
from ..errors import USER_ERRORS, OneLineParser
from ..generate import EagleModel


def _first_user_turn(row: dict) -> str | None:
    if isinstance(row.get("question"), str):
        return row["question"]
    msgs = row.get("messages") or row.get("conversations")
    if isinstance(msgs, list):
        for m in msgs:
            if isinstance(m, dict) and m.get("role", m.get("from", "user")) in ("user", "human"):
                text = m.get("content", m.get("value"))
                return text if isinstance(text, str) else None
        return None
    turns = row.get("turns")
    if isinstance(turns, list) and turns and isinstance(turns[0], str):
        return turns[0]
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    return None


def read_prompts(path: str | Path, prompt_chars: int = 400) -> list[str]:
    """The user turns a file offers (see the module's docstring); one-line ValueError for a file that has none."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path} does not exist")
    out: list[str] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"--prompts {path}:{n}: not JSON ({e})") from None
                text = _first_user_turn(row) if isinstance(row, dict) else None
                if text is None:
                    raise ValueError(f"--prompts {path}:{n}: no user turn (give 'question', 'messages', 'turns', "
                                     "'prompt' or 'text')")
                if text.strip():
                    out.append(text.strip())
    else:
        for block in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            block = " ".join(block.split())
            if len(block) > prompt_chars:
                cut = block.rfind(" ", 0, prompt_chars)
                block = block[: cut if cut > 0 else prompt_chars]
            if block:
                out.append(block)
    if not out:
        raise ValueError(f"--prompts {path} holds no prompts")
    return out


def mix_prompts(sources: list[list[str]], limit: int | None, seed: int) -> list[tuple[int, str]]:
    """``(source index, prompt)`` pairs: the sources taken in turn (so each gets its share of ``limit``), then
    shuffled."""
    order: list[tuple[int, str]] = []
    iters = [iter(s) for s in sources]
    live = list(range(len(sources)))
    while live and (limit is None or len(order) < limit):
        for i in list(live):
            nxt = next(iters[i], None)
            if nxt is None:
                live.remove(i)
                continue
            order.append((i, nxt))
            if limit is not None and len(order) >= limit:
                break
    random.Random(seed).shuffle(order)
    return order


def distill(model, prompt_files: list[str | Path], *, max_prompts: int | None = None, max_new_tokens: int = 160,
            temperatures=(0.0,), batch_size: int = 32, prompt_tokens: int = 192, prompt_chars: int = 400,
            second_turns: float = 0.0, seed: int = 0, progress: bool = True) -> tuple[list[dict], dict]:
    """Rows of the corpus (see the module's docstring) and a summary, from ``model`` (an
    :class:`~eagle_runtime.EagleModel` with a tokenizer; plain decoding, no head needed)."""
    if model.tokenizer is None:
        raise ValueError("distillation needs the target's tokenizer")
    if not 0 <= second_turns <= 1:
        raise ValueError(f"--second-turns must lie in [0, 1], got {second_turns}")
    if not temperatures or any(not (t >= 0 and t == t) for t in temperatures):
        raise ValueError(f"--temperatures must be >= 0, got {list(temperatures)}")
    for name, v in (("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size), ("--prompt-tokens", prompt_tokens)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    room = model.target.max_len - 2
    if prompt_tokens + max_new_tokens > room:
        raise ValueError(f"--prompt-tokens {prompt_tokens} + --max-new-tokens {max_new_tokens} exceed the target's "
                         f"{room} usable positions")
    names = [Path(p).name for p in prompt_files]
    pairs = mix_prompts([read_prompts(p, prompt_chars) for p in prompt_files], max_prompts, seed)
    tok = model.tokenizer
    rows: list[dict] = []
    t0 = time.perf_counter()
    new_tokens = {float(t): 0 for t in temperatures}
    cut = 0
    bar = tqdm(total=len(pairs), desc="distill", unit="prompt", disable=not progress, dynamic_ncols=True)
    rng = random.Random(seed + 1)
    turns = {1: 0, 2: 0}

    def answer(histories, temp, gen_seed, srcs):
        nonlocal cut
        ids = []
        for history in histories:
            p, was_cut = encode_prompt(tok, make_prompt(tok, history), prompt_tokens)
            ids.append(p)
            cut += was_cut
        res = model.generate(ids, max_new_tokens=max_new_tokens, temperature=temp, seed=gen_seed, speculative=False)
        for src, p, new, history in zip(srcs, ids, res.tokens, histories):
            rows.append({"input_ids": p + new, "loss_mask": [0] * len(p) + [1] * len(new), "temperature": temp,
                         "source": names[src], "turns": len(history)})
            new_tokens[temp] += len(new)
            turns[len(history)] += 1
        return res.text

    for b, start in enumerate(range(0, len(pairs), batch_size)):
        batch = pairs[start : start + batch_size]
        temp = float(temperatures[b % len(temperatures)])
        first = [[(text, None)] for _, text in batch]
        texts = answer(first, temp, seed + 2 * b, [src for src, _ in batch])
        # a second turn on some conversations: another prompt after the target's first answer, as MT-bench asks
        again = [i for i in range(len(batch)) if rng.random() < second_turns]
        if again:
            nxt = [pairs[rng.randrange(len(pairs))] for _ in again]
            answer([[(batch[i][1], texts[i].strip()), (q, None)] for i, (_, q) in zip(again, nxt)], temp,
                   seed + 2 * b + 1, [src for src, _ in nxt])
        bar.update(len(batch))
    bar.close()
    summary = {"rows": len(rows), "turns": {str(k): v for k, v in turns.items()}, "new_tokens": sum(new_tokens.values()),
               "new_tokens_by_temperature": {str(k): v for k, v in new_tokens.items()},
               "prompts_cut": cut, "sources": {n: sum(1 for s, _ in pairs if s == i) for i, n in enumerate(names)},
               "seconds": round(time.perf_counter() - t0, 1)}
    return rows, summary


def main(argv=None) -> int:
    p = OneLineParser(prog="python -m eagle_runtime.train.distill",
                      description="Write a self-distillation corpus: the target's answers to prompts (jsonl of "
                      "token ids that the head trainers read).")
    p.add_argument("--base", required=True, help="target model: HF directory or hub id")
    p.add_argument("--prompts", nargs="+", required=True, help="jsonl (first user turns) or text files (block openings)")
    p.add_argument("--out", required=True, help="the corpus to write (.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--max-prompts", type=int, default=None, help="at most this many prompts, shared by the sources")
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0], help="taken in turn per batch")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=192, help="a longer prompt keeps its last tokens")
    p.add_argument("--prompt-chars", type=int, default=400, help="characters of a text block used as its prompt")
    p.add_argument("--second-turns", type=float, default=0.0,
                   help="the share of conversations that get a second user turn (another prompt) after the answer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    out = Path(a.out)
    try:
        if out.suffix != ".jsonl":
            raise ValueError(f"--out {out} must end in .jsonl (the trainers read it by that suffix)")
        if out.exists() and not a.overwrite:
            raise ValueError(f"--out {out} exists; pass --overwrite to replace it")
        if a.max_prompts is not None and a.max_prompts < 1:
            raise ValueError(f"--max-prompts must be >= 1, got {a.max_prompts}")
        if a.threads is not None:
            if a.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {a.threads}")
            torch.set_num_threads(a.threads)
        model = EagleModel.from_pretrained(a.base, None, tree="dynamic")
        rows, summary = distill(model, a.prompts, max_prompts=a.max_prompts, max_new_tokens=a.max_new_tokens,
                                temperatures=a.temperatures, batch_size=a.batch_size, prompt_tokens=a.prompt_tokens,
                                prompt_chars=a.prompt_chars, second_turns=a.second_turns, seed=a.seed)
    except USER_ERRORS as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"out": str(out), **summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
