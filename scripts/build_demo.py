"""Rebuild the embedded demo pair: train the target, train its EAGLE-1 head, measure, write BUILD.json.

    python scripts/build_demo.py                   # everything: about 21 min on 2 CPU cores (13 target, 7 head, 1 measure)
    python scripts/build_demo.py --stages head measure   # keep the target, redo the rest
    python scripts/build_demo.py --stages head3    # the EAGLE-3 head (demo/head3) and its comparison with EAGLE-1
    python scripts/build_demo.py --stages distill head3 --compare-init --head-corpus build/demo_work/self_distill.jsonl
                                                   # fine-tune both heads on the target's own answers

Stage ``head3`` trains an EAGLE-1 and an EAGLE-3 head at the same time, one thread each, on the same corpus and
settings, each capped at ``--compare-minutes`` of wall time with its cosine schedule following the cap (so the
comparison is at an equal wall-clock budget on equal hardware), commits them as ``demo/head`` and ``demo/head3``, and
measures both with each of ``--compare-trees`` on the same prompts (tau, held-out top-1, tokens/s) into
``BUILD.json["head3"]``.

Stage ``distill`` writes ``WORK/self_distill.jsonl``: the target's own answers (plain decoding, greedy and sampled,
some with a second user turn) to ``--distill-prompts`` (GSM8K questions, Tiny Shakespeare and TinyStories
openings; never MT-bench, the benchmark). With ``--head-corpus`` pointing at it and ``--compare-init``, stage
``head3`` fine-tunes both committed heads on it, again at an equal wall-clock budget.

Outputs ``python/eagle_runtime/demo/{target,head}/`` (HF target checkpoint; EAGLE-1 head as config.json +
model.safetensors) and ``python/eagle_runtime/demo/BUILD.json`` (settings, target held-out loss/perplexity,
head top-1 accuracy, plain vs EAGLE timings per draft tree, the chosen tree and its tau). Intermediate files
(head optimiser state) go to ``--work`` (default ``build/demo_work``, gitignored).

Data come from the repository's sibling ``shared/data`` (read, never copied): TinyStories for both models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))  # runs from a checkout even without the editable install
sys.path.insert(0, str(REPO / "benchmarks"))  # compare_heads: the held-out story openings and the plain baseline

from eagle_runtime import DynamicTree, EagleModel, load_head, save_head  # noqa: E402
from eagle_runtime.atomic import atomic_write_text  # noqa: E402
from eagle_runtime.datadir import shared_data_dir  # noqa: E402
from eagle_runtime.demo import DEMO_DIR  # noqa: E402
from eagle_runtime.train import TrainConfig, train_head  # noqa: E402
from eagle_runtime.train.target import DEFAULT_TOKENIZER, TargetConfig, train_target  # noqa: E402

SHARED = shared_data_dir()
HEAD_CORPUS = SHARED / "corpus" / "tinystories_val.txt"
# Prompts of the self-distillation corpus: questions (chat-like, as the benchmark asks), verse and story openings.
# MT-bench itself is never used: it is the benchmark.
DISTILL_PROMPTS = [SHARED / "corpus" / n for n in ("gsm8k_train.jsonl", "tinyshakespeare.txt", "tinystories_val.txt")]
# Candidate draft trees (total_tokens, depth, top_k): on 2 CPU cores every draft pass costs about as much as
# one target layer, so small trees win (see the sweep recorded in BUILD.json).
TREES = [(5, 4, 1), (6, 3, 2), (8, 3, 2), (10, 4, 2), (12, 4, 3), (16, 4, 4)]
MEASURE_TOKENS = 96


def build_target(args) -> dict:
    cfg = TargetConfig(
        steps=args.target_steps,
        max_minutes=args.target_minutes,
        batch_size=args.target_batch_size,
        seq_len=args.target_seq_len,
        seed=args.seed,
    )
    out = DEMO_DIR / "target"
    if out.exists():
        shutil.rmtree(out)
    m = train_target(cfg, out, args.tokenizer)
    (out / "train_metrics.json").rename(Path(args.work) / "target_train_metrics.json")
    return m


def build_head(args) -> dict:
    cfg = TrainConfig(
        steps=args.head_steps,
        batch_size=args.head_batch_size,
        seq_len=args.head_seq_len,
        lr=args.head_lr,
        warmup=30,
        eval_every=max(1, args.head_steps // 4),
        eval_batches=8,
        save_every=10**9,
        max_minutes=args.head_minutes,
        seed=args.seed,
    )
    work = Path(args.work) / "head"
    if work.exists():
        shutil.rmtree(work)
    res = train_head(DEMO_DIR / "target", args.head_corpus, work, cfg)
    from eagle_runtime import load_target

    head = load_head(work, load_target(DEMO_DIR / "target"))
    out = DEMO_DIR / "head"
    if out.exists():
        shutil.rmtree(out)
    save_head(head, out, safetensors=True)
    evals = [r for r in res["history"] if "eval_acc" in r]
    return {
        "steps_done": res["steps"],
        "config": asdict(cfg),
        "corpus": [Path(c).name for c in args.head_corpus],
        "heldout_top1_accuracy": evals[-1]["eval_acc"] if evals else None,
        "heldout_loss": evals[-1]["eval_loss"] if evals else None,
        "final_train_loss": res["history"][-1]["loss"] if res["history"] else None,
    }


def _speculate(model, prompts, plain_time: float, plain_tokens) -> dict:
    """EAGLE with ``model``'s head and tree on ``prompts`` (after one warm-up), against the plain baseline:
    tau, tokens/s, speedup and whether every output equals plain decoding's."""
    model.generate(prompts[0], 16)  # warm-up
    wall, lens, same = 0.0, [], True
    for i, p in enumerate(prompts):
        r = model.generate(p, MEASURE_TOKENS, stop_on_eos=False)
        wall += r.wall_time_s
        lens += r.accept_lengths[0]
        same &= r.tokens[0] == plain_tokens[i]
    n_tok = MEASURE_TOKENS * len(prompts)
    return {"tau": sum(lens) / len(lens), "tokens_per_s": n_tok / wall, "speedup": plain_time / wall,
            "identical_to_plain": same}


def _measure_heads(heads: dict, tree: DynamicTree, n_prompts: int) -> dict:
    """Plain decoding and each head with ``tree`` on the same held-out openings: tokens/s, tau, exactness."""
    from eagle_runtime import load_target
    from eagle_runtime.text import load_tokenizer

    target = load_target(DEMO_DIR / "target")
    tok = load_tokenizer(DEMO_DIR / "target")
    prompts, plain_time, plain_tokens = _plain_baseline(EagleModel(target, None, tok), n_prompts)
    n_tok = MEASURE_TOKENS * len(prompts)
    out = {"prompts": len(prompts), "max_new_tokens": MEASURE_TOKENS, "temperature": 0.0,
           "tree": {"total_tokens": tree.total_tokens, "depth": tree.depth, "top_k": tree.top_k},
           "plain_tokens_per_s": n_tok / plain_time}
    for name, head_dir in heads.items():
        model = EagleModel(target, load_head(head_dir, target), tok, tree=tree)
        out[name] = _speculate(model, prompts, plain_time, plain_tokens)
        print(f"{name}, tree {tree.total_tokens},{tree.depth},{tree.top_k}: tau {out[name]['tau']:.3f}, "
              f"{out[name]['tokens_per_s']:.1f} tok/s", flush=True)
    return out


def _train_cmd(args, kind: str, lr: float, out: Path) -> list[str]:
    """The trainer's command line for one comparison run: the same corpus, batch and length for every head, capped
    at ``--compare-minutes`` with the cosine schedule following the cap (``--steps`` only bounds it)."""
    cmd = [sys.executable, "-m", "eagle_runtime.train", "--head", kind, "--base", str(DEMO_DIR / "target"),
           "--corpus", *(str(Path(c).resolve()) for c in args.head_corpus), "--out", str(out), "--overwrite", "--steps", str(10**6),
           "--batch-size", str(args.head_batch_size), "--seq-len", str(args.head_seq_len), "--lr", str(lr),
           "--warmup", "30", "--eval-every", "500", "--eval-batches", "8", "--save-every", "0",
           "--max-minutes", str(args.compare_minutes), "--seed", str(args.seed)]
    if kind == "eagle3":
        cmd += ["--draft-vocab", str(args.head3_draft_vocab), "--ttt-steps", str(args.head3_ttt_steps),
                "--taps", args.head3_taps]
    if args.compare_init:  # fine-tune the committed demo head of the same kind (relative: no machine paths recorded)
        cmd += ["--init", str((DEMO_DIR / ("head3" if kind == "eagle3" else "head")).relative_to(REPO))]
    return cmd


def build_head3(args) -> dict:
    """EAGLE-1 (at each of ``--head1-lrs``) and EAGLE-3 heads trained at the same time for the same wall-clock
    budget, one thread each; the best EAGLE-1 (tau with the first compared tree) becomes demo/head and the EAGLE-3
    head demo/head3; every run is measured on the same prompts with each of ``--compare-trees``."""
    work = Path(args.work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "python"), os.environ.get("PYTHONPATH", "")])}
    plan = {f"eagle1_lr{lr:g}": ("eagle1", lr) for lr in args.head1_lrs}
    plan[f"eagle3_lr{args.head3_lr:g}"] = ("eagle3", args.head3_lr)
    procs, logs = {}, {}
    if not args.compare_reuse:
        for name, (kind, lr) in plan.items():
            logs[name] = open(work / f"compare_{name}.log", "w")
            procs[name] = subprocess.Popen(_train_cmd(args, kind, lr, work / f"compare_{name}"), env=env, text=True,
                                           stdout=subprocess.PIPE, stderr=logs[name], cwd=REPO)
        print(f"training {len(plan)} heads at once for {args.compare_minutes} min (logs: {work}/compare_*.log)",
              flush=True)
    runs = {}
    for name in plan:
        out = work / f"compare_{name}"
        if name in procs:
            stdout, _ = procs[name].communicate()
            logs[name].close()
            if procs[name].returncode != 0:
                raise SystemExit(f"the {name} comparison run failed (exit {procs[name].returncode}); see "
                                 f"{work}/compare_{name}.log")
            res = json.loads(stdout[stdout.index("{"):])
            atomic_write_text(work / f"compare_{name}.json", json.dumps(res, indent=1))
        else:  # --compare-reuse: the finished runs' records
            res = json.loads((work / f"compare_{name}.json").read_text())
        cfg = json.loads((out / "train_config.json").read_text())
        runs[name] = {"head": plan[name][0], "steps_done": res["steps"], "wall_s": round(res["time_s"], 1),
                      "config": cfg["train"] if "train" in cfg else cfg,
                      "heldout_top1_accuracy": res["last"].get("eval_acc")}
        print(f"{name}: {res['steps']} steps in {runs[name]['wall_s']} s, held-out top-1 "
              f"{runs[name]['heldout_top1_accuracy']}", flush=True)
    meas = {}
    for spec in args.compare_trees:
        t = DynamicTree(*(int(x) for x in spec.split(",")))
        meas[spec] = _measure_heads({name: work / f"compare_{name}" for name in plan}, t, args.measure_prompts)
    first = meas[args.compare_trees[0]]
    best1 = max((n for n in plan if plan[n][0] == "eagle1"), key=lambda n: first[n]["tau"])
    name3 = next(n for n in plan if plan[n][0] == "eagle3")
    for m in meas.values():  # the committed pair under the names best_head() reads
        m["eagle1"], m["eagle3"] = m[best1], m[name3]
    from eagle_runtime import load_target

    target = load_target(DEMO_DIR / "target")
    for run, name in ((best1, "head"), (name3, "head3")):
        head = load_head(work / f"compare_{run}", target)
        if (DEMO_DIR / name).exists():
            shutil.rmtree(DEMO_DIR / name)
        save_head(head, DEMO_DIR / name, safetensors=True)
    return {
        "corpus": [Path(c).name for c in args.head_corpus],
        "init": "the committed demo heads (fine-tuned)" if args.compare_init else None,
        "draft_vocab_size": head.draft_vocab_size,
        "taps": list(head.target_taps),
        "wall_clock_budget_s": 60 * args.compare_minutes,
        "committed": {"head": best1, "head3": name3},
        "runs": runs,
        "measure": meas,
        "note": "every head trained at the same time on the same corpus, batch and length, one thread each, each "
                "capped at the same wall-clock budget with its cosine schedule following the cap; demo/head is the "
                "EAGLE-1 run with the higher tau on the first tree, demo/head3 the EAGLE-3 run",
    }


def build_distill(args) -> dict:
    """The self-distillation corpus ``WORK/self_distill.jsonl``: the demo target's own answers (plain decoding) to
    prompts from ``--distill-prompts`` (see :mod:`eagle_runtime.train.distill`)."""
    from eagle_runtime.train.distill import distill

    model = EagleModel.from_pretrained(DEMO_DIR / "target", None, tree="dynamic")
    rows, summary = distill(model, args.distill_prompts, max_prompts=args.distill_max_prompts,
                            max_new_tokens=args.distill_max_new_tokens, temperatures=args.distill_temperatures,
                            batch_size=64, prompt_tokens=192, second_turns=args.distill_second_turns, seed=args.seed)
    out = Path(args.work) / "self_distill.jsonl"
    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in rows))
    print(f"distill: {summary['rows']} rows, {summary['new_tokens']} answer tokens -> {out}", flush=True)
    return {**summary, "file": "WORK/self_distill.jsonl", "max_new_tokens": args.distill_max_new_tokens,
            "temperatures": args.distill_temperatures, "second_turns": args.distill_second_turns,
            "prompt_sources": [Path(c).name for c in args.distill_prompts]}


def _plain_baseline(model, n_prompts: int) -> tuple[list[str], float, list[list[int]]]:
    """Plain greedy decoding of ``MEASURE_TOKENS`` on the last ``n_prompts`` held-out story openings (after one
    warm-up): ``(prompts, seconds, tokens per prompt)``, the baseline every measured tree is compared with."""
    from compare_heads import plain_baseline, story_prompts

    prompts = story_prompts(n_prompts)
    return (prompts, *plain_baseline(model, prompts, MEASURE_TOKENS))


def measure(args) -> dict:
    """Plain vs EAGLE in our runtime on held-out story openings, for each candidate tree; picks the fastest."""
    model = EagleModel.from_pretrained(DEMO_DIR / "target", DEMO_DIR / "head", backend="torch")
    prompts, plain_time, plain_tokens = _plain_baseline(model, args.measure_prompts)
    n_tok = MEASURE_TOKENS * len(prompts)
    sweep = []
    for total, depth, k in TREES:
        model.tree = DynamicTree(total, depth, k)
        sweep.append({"tree": {"total_tokens": total, "depth": depth, "top_k": k},
                      **_speculate(model, prompts, plain_time, plain_tokens)})
        print(f"tree {total}/{depth}/{k}: tau {sweep[-1]['tau']:.2f}, speedup {sweep[-1]['speedup']:.2f}x", flush=True)
    best = max(sweep, key=lambda s: s["speedup"])
    return {
        "prompts": len(prompts),
        "max_new_tokens": MEASURE_TOKENS,
        "temperature": 0.0,
        "plain_tokens_per_s": n_tok / plain_time,
        "plain_ms_per_token": 1e3 * plain_time / n_tok,
        "tree_sweep": sweep,
        "chosen": best,
        "note": "timings on a shared 2-core CPU are noisy; the speedup is plain wall time / EAGLE wall time, prefill included",
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", default=["target", "head", "measure"],
                   choices=["target", "head", "measure", "distill", "head3"])
    p.add_argument("--work", default=str(REPO / "build" / "demo_work"))
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--target-steps", type=int, default=2000)
    p.add_argument("--target-minutes", type=float, default=13.0, help="wall-time budget of the target (cosine follows it)")
    p.add_argument("--target-batch-size", type=int, default=4)
    p.add_argument("--target-seq-len", type=int, default=512)
    p.add_argument("--head-corpus", nargs="+", default=[str(HEAD_CORPUS)], help="the heads' corpus (several files: "
                   "one corpus), e.g. the distill stage's WORK/self_distill.jsonl")
    p.add_argument("--head-steps", type=int, default=1000)
    p.add_argument("--head-minutes", type=float, default=16.0)
    p.add_argument("--head-batch-size", type=int, default=8)
    p.add_argument("--head-seq-len", type=int, default=256)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--measure-prompts", type=int, default=6)
    p.add_argument("--compare-minutes", type=float, default=15.0, help="head3: the wall-clock budget each head "
                   "trains for (both at once, one thread each)")
    p.add_argument("--head1-lrs", type=float, nargs="+", default=[2e-3, 4e-3], help="head3: learning rates of the "
                   "EAGLE-1 runs (the best one is committed)")
    p.add_argument("--head3-lr", type=float, default=4e-3, help="head3: the EAGLE-3 run's learning rate (4e-3 "
                   "scored 0.710 against 0.674 for 2e-3 in 4-minute probes)")
    p.add_argument("--compare-init", action="store_true", help="head3: each run fine-tunes the committed demo head "
                   "of its kind (--init) instead of starting from scratch")
    p.add_argument("--distill-prompts", nargs="+", default=[str(c) for c in DISTILL_PROMPTS], help="distill: prompt "
                   "sources (jsonl first user turns, text block openings)")
    p.add_argument("--distill-max-prompts", type=int, default=4500)
    p.add_argument("--distill-max-new-tokens", type=int, default=160)
    p.add_argument("--distill-temperatures", type=float, nargs="+", default=[0.0, 0.0, 1.0])
    p.add_argument("--distill-second-turns", type=float, default=0.5)
    p.add_argument("--compare-reuse", action="store_true", help="head3: measure the finished comparison runs in "
                   "--work again instead of training")
    p.add_argument("--compare-trees", nargs="+", default=["8,3,2", "16,4,4"], help="head3: trees (total,depth,top_k) "
                   "both heads are measured with")
    p.add_argument("--head3-draft-vocab", type=int, default=256, help="the demo corpus uses about 200 of 512 ids")
    p.add_argument("--head3-ttt-steps", type=int, default=3, help="training-time-test steps (the demo tree drafts 4 "
                   "levels; 3 steps buy more updates per minute and scored higher in 4-minute probes)")
    p.add_argument("--head3-taps", default="2,8,15", help="target layers the EAGLE-3 head reads (the input of layer "
                   "15 of 16 scored above the default L-3 = 13 in 4-minute probes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy 2-core machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    info_path = DEMO_DIR / "BUILD.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    t0 = time.time()
    stage_s = {}
    if "target" in args.stages:
        info["target"] = {k: v for k, v in build_target(args).items()}
        info["target"]["config"].pop("train_files")
        info["target"]["config"].pop("heldout_file")
        info["target"]["data"] = {"train": ["tinystories_val.txt", "tinystories_extra.txt"], "heldout": "tinystories_extra.txt (last stories)"}
        stage_s["target"] = time.time() - t0
    if "head" in args.stages:
        t1 = time.time()
        info["head"] = build_head(args)
        stage_s["head"] = time.time() - t1
    if "distill" in args.stages:
        t1 = time.time()
        info["distill"] = build_distill(args)
        stage_s["distill"] = time.time() - t1
    if "head3" in args.stages:
        t1 = time.time()
        info["head3"] = build_head3(args)
        run1 = info["head3"]["runs"][info["head3"]["committed"]["head"]]  # demo/head: the comparison's best EAGLE-1
        info["head"] = {"steps_done": run1["steps_done"], "config": run1["config"], "corpus": info["head3"]["corpus"],
                        "heldout_top1_accuracy": run1["heldout_top1_accuracy"], "wall_s": run1["wall_s"],
                        "trained_by": "stage head3 (the EAGLE-1 run of the equal-budget comparison)"}
        stage_s["head3"] = time.time() - t1
    if "measure" in args.stages:
        t1 = time.time()
        info["measure"] = measure(args)
        stage_s["measure"] = time.time() - t1
        info["tree"] = info["measure"]["chosen"]["tree"]
        info["tau"] = info["measure"]["chosen"]["tau"]
    build = info.get("build", {})
    for stage, sec in stage_s.items():  # a partial rebuild keeps the other stages' records
        build.setdefault("stages", {})[stage] = {
            "command": "python scripts/build_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "seconds": round(sec, 1),
        }
    build.pop("command", None)
    build.pop("seconds", None)
    info["build"] = {
        **build,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }
    sizes = {d: sum(f.stat().st_size for f in (DEMO_DIR / d).iterdir())
             for d in ("target", "head", "head3") if (DEMO_DIR / d).is_dir()}
    info["sizes_bytes"] = sizes
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in info if k not in ("measure",)}, indent=2, default=str))


if __name__ == "__main__":
    main()
