"""Draft heads side by side on the same prompts and trees: tau, acceptance by depth, tokens/s, exactness.

    python benchmarks/compare_heads.py --base python/eagle_runtime/demo/target \\
        --heads eagle1=DIR eagle3=DIR --prompts heldout:CORPUS.jsonl stories --num-prompts 100 \\
        --trees 8,7,1 8,3,2 16,4,4 6,5,1

Prompt sets (``--prompts``, any of):

- ``heldout:FILE[,FILE...]``: the held-out split of a training corpus exactly as the trainers make it (the
  documents shuffled with ``--split-seed``, the first ``--holdout-fraction`` held out; the trainers' defaults are
  0 and 0.05), each document up to its first trained token, i.e. the prompt of its first answer (a plain-text
  document, trained from its first token, gives its first ``--prompt-tokens`` tokens). Prompts of the heads'
  training distribution that neither head trained on; those too long for the context with ``--max-new-tokens``
  and the tree are left out and counted.
- ``stories``: the openings (first 12 words) of the last TinyStories stories of ``tinystories_extra.txt`` in the
  shared data, which no demo model trained on (the prompts ``scripts/build_demo.py`` measures).
- ``mtbench``: the first turns of MT-bench questions (the shared ``mt_bench.jsonl``, taken round-robin over the
  categories) in ``mtbench_speed.py``'s chat form, cut to fit the context as there.

Per prompt set: plain greedy decoding of every prompt (one warm-up first), then for each tree and head the same
prompts speculatively at temperature 0: tau (accepted drafts + the bonus token, per cycle), the fraction of cycles
that accept at least ``d`` drafts given ``d - 1`` (``accept_by_depth``), tokens/s and the ratio to plain, and
whether every output is token-identical to plain decoding's (the benchmark fails if one is not). Tau is what a
head decides; tokens/s on a shared CPU are single timed runs. Writes ``compare_heads_<UTC time>.json`` atomically
into ``--out`` (default ``$EAGLE_RESULTS_DIR``, else ``results/``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eagle_runtime import DynamicTree, EagleModel, load_head, load_target  # noqa: E402
from eagle_runtime.datadir import shared_data_dir  # noqa: E402
from eagle_runtime.draft3 import Eagle3Head  # noqa: E402
from eagle_runtime.text import load_tokenizer  # noqa: E402
from _bench_utils import save_json  # noqa: E402
from mtbench_speed import DEFAULT_QUESTIONS, encode, load_questions, make_prompt  # noqa: E402

SHARED = shared_data_dir()
STORY_WORDS = 12


def heldout_prompts(files: list[str], tokenizer, seed: int, fraction: float, prompt_tokens: int) -> list[list[int]]:
    """Each held-out document's ids up to its first trained token (plain text: its first ``prompt_tokens``)."""
    from eagle_runtime.train import load_corpus, split_heldout

    held, _ = split_heldout([d for f in files for d in load_corpus(f, tokenizer)], seed, fraction)
    prompts = []
    for ids, mask in held:
        first = next((i for i, m in enumerate(mask) if m), len(ids))
        prompts.append(list(ids[:first] if first > 0 else ids[:prompt_tokens]))
    return prompts


def story_prompts(n: int) -> list[str]:
    from eagle_runtime.train.target import read_stories

    path = SHARED / "corpus" / "tinystories_extra.txt"
    if not path.is_file():
        raise FileNotFoundError(f"--prompts stories needs {path} (the shared data), which is absent")
    return [" ".join(s.split()[:STORY_WORDS]) for s in read_stories(path)[-n:]]


def mtbench_prompts(n: int, tokenizer, budget: int) -> list[list[int]]:
    if not DEFAULT_QUESTIONS.is_file():
        raise FileNotFoundError(f"--prompts mtbench needs {DEFAULT_QUESTIONS} (the shared data), which is absent")
    questions, _ = load_questions(DEFAULT_QUESTIONS, n)
    return [encode(tokenizer, make_prompt(tokenizer, [(q["turns"][0], None)]), budget)[0] for q in questions]


def accept_by_depth(lens: list[int], depth: int) -> list[float | None]:
    """Entry ``d-1``: of the cycles that accepted ``d - 1`` drafts, the fraction that accepted ``d``."""
    reach = [sum(L >= k + 1 for L in lens) for k in range(depth + 1)]
    return [round(reach[d] / reach[d - 1], 4) if reach[d - 1] else None for d in range(1, depth + 1)]


def plain_baseline(model: EagleModel, prompts: list, max_new: int) -> tuple[float, list[list[int]]]:
    """Plain greedy decoding of ``max_new`` tokens (no stop at EOS) per prompt, after one warm-up:
    ``(seconds, tokens per prompt)``."""
    model.generate(prompts[0], 16, speculative=False)
    seconds, tokens = 0.0, []
    for p in prompts:
        r = model.generate(p, max_new, speculative=False, stop_on_eos=False)
        seconds += r.wall_time_s
        tokens.append(r.tokens[0])
    return seconds, tokens


def run_set(target, tokenizer, heads: dict, trees: list[tuple[int, int, int]], prompts: list, max_new: int) -> dict:
    plain_time, plain_tokens = plain_baseline(EagleModel(target, None, tokenizer), prompts, max_new)
    n_tok = max_new * len(prompts)
    out = {"prompts": len(prompts), "plain_tokens_per_s": round(n_tok / plain_time, 1), "trees": {}}
    for spec in trees:
        tree = DynamicTree(*spec)
        row = out["trees"][",".join(map(str, spec))] = {}
        for name, head in heads.items():
            model = EagleModel(target, head, tokenizer, tree=tree)
            model.generate(prompts[0], 16)  # warm-up
            wall, lens, same = 0.0, [], 0
            for p, ref in zip(prompts, plain_tokens):
                r = model.generate(p, max_new, stop_on_eos=False)
                wall += r.wall_time_s
                lens += r.accept_lengths[0]
                same += r.tokens[0] == ref
            row[name] = {"tau": round(sum(lens) / len(lens), 4), "cycles": len(lens),
                         "accept_by_depth": accept_by_depth(lens, tree.max_depth),
                         "tokens_per_s": round(n_tok / wall, 1), "over_plain": round(plain_time / wall, 3),
                         "identical_to_plain": f"{same}/{len(prompts)}"}
            print(f"  tree {','.join(map(str, spec))}, {name}: tau {row[name]['tau']:.3f}, "
                  f"{row[name]['tokens_per_s']} tok/s ({row[name]['over_plain']}x plain), identical "
                  f"{row[name]['identical_to_plain']}", flush=True)
            if same != len(prompts):
                raise SystemExit(f"{name} with tree {spec}: {len(prompts) - same} outputs differ from plain decoding")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="target model directory")
    p.add_argument("--heads", nargs="+", required=True, metavar="NAME=DIR", help="the heads to compare")
    p.add_argument("--prompts", nargs="+", default=["stories"], help="heldout:FILE[,FILE...], stories, mtbench")
    p.add_argument("--num-prompts", type=int, default=100, help="prompts per set (default 100)")
    p.add_argument("--trees", nargs="+", default=["8,7,1"], help="total_tokens,depth,top_k each (default 8,7,1)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--split-seed", type=int, default=0, help="the trainers' --seed (default 0)")
    p.add_argument("--holdout-fraction", type=float, default=0.05, help="the trainers' --holdout-fraction")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of a plain-text held-out document")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--out", default=os.environ.get("EAGLE_RESULTS_DIR", "results"))
    args = p.parse_args(argv)
    bad = [h for h in args.heads if "=" not in h or not h.split("=", 1)[0] or not h.split("=", 1)[1]]
    if bad:
        p.error(f"--heads {bad[0]!r}: give NAME=DIR")
    try:
        args.tree_specs = [tuple(int(x) for x in t.split(",")) for t in args.trees]
    except ValueError:
        p.error(f"--trees {args.trees}: give total_tokens,depth,top_k, e.g. 8,7,1")
    if any(len(t) != 3 or min(t) < 1 for t in args.tree_specs):
        p.error(f"--trees {args.trees}: give three integers >= 1 each, e.g. 8,7,1")
    for s in args.prompts:
        if s not in ("stories", "mtbench") and not (s.startswith("heldout:") and s[len("heldout:"):]):
            p.error(f"--prompts {s!r}: give heldout:FILE[,FILE...], stories or mtbench")
    if args.num_prompts < 1 or args.max_new_tokens < 1 or args.prompt_tokens < 1:
        p.error("--num-prompts, --max-new-tokens and --prompt-tokens must be >= 1")
    if not 0 < args.holdout_fraction < 1:
        p.error(f"--holdout-fraction must lie in (0, 1), got {args.holdout_fraction}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    target = load_target(args.base)
    tokenizer = load_tokenizer(args.base)
    heads = {name: load_head(d, target) for name, d in (h.split("=", 1) for h in args.heads)}
    # the longest prompt that leaves room for --max-new-tokens and the largest tree in the target's cache
    budget = target.max_len + 1 - max(EagleModel(target, next(iter(heads.values())), tokenizer, tree=DynamicTree(*t))
                                      .cache_len_needed([1], args.max_new_tokens) for t in args.tree_specs)
    res = {"config": {k: v for k, v in vars(args).items() if k != "tree_specs"},
           "head_types": {n: ("eagle3" if isinstance(h, Eagle3Head) else "eagle1") for n, h in heads.items()},
           "temperature": 0.0, "sets": {}}
    for s in args.prompts:
        if s == "stories":
            prompts, left_out = story_prompts(args.num_prompts), 0
        elif s == "mtbench":
            prompts, left_out = mtbench_prompts(args.num_prompts, tokenizer, budget), 0
        else:
            files = s[len("heldout:"):].split(",")
            every = heldout_prompts(files, tokenizer, args.split_seed, args.holdout_fraction, args.prompt_tokens)
            ok = [p for p in every if len(p) <= budget]
            prompts, left_out = ok[: args.num_prompts], len(every) - len(ok)
        print(f"{s}: {len(prompts)} prompts" + (f" ({left_out} held-out prompts too long left out)" if left_out else ""),
              flush=True)
        res["sets"][s] = {**run_set(target, tokenizer, heads, args.tree_specs, prompts, args.max_new_tokens),
                          "too_long_left_out": left_out}
    save_json(args.out, "compare_heads", res)
    return res


if __name__ == "__main__":
    main()
