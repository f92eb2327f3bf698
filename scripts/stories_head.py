"""Train an EAGLE-1 head for stories260k-hf and measure tau on held-out TinyStories prompts.

    python scripts/stories_head.py [--minutes 15] [--out build/stories260k-head]

Training is the project's own command (``python -m eagle_runtime.train``) on ``tinystories_val.txt``, capped
at ``--minutes`` of wall time; the head is written to ``--out`` (not committed). The evaluation decodes the
opening sentence of held-out stories (``tinystories_extra.txt``, never trained on) greedily with the EAGLE-2
dynamic tree (60/6/10) and the static tree, checks the output equals plain greedy decoding, and reports tau,
the accept histogram and the run times in ``OUT/eval.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from eagle_runtime.datadir import shared_data_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = shared_data_dir()
BASE = SHARED / "models" / "stories260k-hf"


def held_out_prompts(n: int) -> list[str]:
    stories = (SHARED / "corpus" / "tinystories_extra.txt").read_text().split("\n\n")
    prompts = []
    for s in stories:
        first = s.strip().split(". ")[0]
        if 3 <= len(first.split()) <= 12:
            prompts.append(first)
        if len(prompts) == n:
            break
    return prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=15.0, help="training wall-time cap")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--out", default=str(REPO / "build" / "stories260k-head"))
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for this tiny model)")
    a = p.parse_args()
    if not BASE.is_dir():
        sys.exit(f"stories260k-hf not found at {BASE} (set EAGLE_SHARED_DATA)")
    out = Path(a.out)
    t0 = time.time()
    cmd = [sys.executable, "-m", "eagle_runtime.train", "--base", str(BASE),
           "--corpus", str(SHARED / "corpus" / "tinystories_val.txt"), "--out", str(out),
           "--steps", str(a.steps), "--batch-size", "16", "--seq-len", "256", "--lr", "3e-3",
           "--eval-every", "250", "--max-minutes", str(a.minutes), "--overwrite"]  # a rerun replaces the head
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    subprocess.run(cmd, check=True, env=env)
    train_s = time.time() - t0

    torch.set_num_threads(a.threads)
    from eagle_runtime import DynamicTree, EagleModel, StaticTree
    from eagle_runtime.atomic import atomic_write_text

    model = EagleModel.from_pretrained(BASE, out, backend="torch", max_len=512)
    prompts = held_out_prompts(a.prompts)
    plain = model.generate(prompts, a.max_new_tokens, speculative=False)
    report = {"train_seconds": round(train_s, 1), "train": json.loads((out / "train_config.json").read_text()),
              "prompts": prompts, "max_new_tokens": a.max_new_tokens, "trees": {}}
    for name, tree in (("dynamic_60_6_10", DynamicTree()), ("static_mc_sim_7b_63", StaticTree())):
        model.tree = tree
        res = [model.generate([q], a.max_new_tokens) for q in prompts]
        identical = all(r.tokens[0] == t for r, t in zip(res, plain.tokens))
        lens = [n for r in res for n in r.accept_lengths[0]]
        hist: dict[int, int] = {}
        for n in lens:
            hist[n] = hist.get(n, 0) + 1
        report["trees"][name] = {"tau": sum(lens) / len(lens), "accept_histogram": dict(sorted(hist.items())),
                                 "identical_to_greedy": identical, "cycles": len(lens)}
        print(f"{name}: tau {sum(lens) / len(lens):.2f}, identical to greedy: {identical}, histogram {dict(sorted(hist.items()))}")
    atomic_write_text(out / "eval.json", json.dumps(report, indent=2))
    print(f"training took {train_s / 60:.1f} min; report in {out / 'eval.json'}")


if __name__ == "__main__":
    main()
