"""Rebuild the embedded demo pair: train the target, train its EAGLE-1 head, measure, write BUILD.json.

    python scripts/build_demo.py                   # everything: about 21 min on 2 CPU cores (13 target, 7 head, 1 measure)
    python scripts/build_demo.py --stages head measure   # keep the target, redo the rest
    python scripts/build_demo.py --stages head3    # the EAGLE-3 head (demo/head3) and its comparison with EAGLE-1

Stage ``head3`` trains, one after the other with the same corpus, settings and threads, an EAGLE-1 head of
``--compare-steps1`` steps (into ``--work``, for the comparison only) and then the EAGLE-3 head committed as
``demo/head3`` under the same wall-clock budget: the EAGLE-1 run's measured wall time is the EAGLE-3 run's hard cap,
and its step count (so that its cosine schedule ends in time) comes from a short probe of the EAGLE-3 step cost
taken just before (an EAGLE-3 step runs the training-time test: about 2x an EAGLE-1 step). Both heads are then
measured with the demo tree on the same prompts (tau, held-out top-1, tokens/s) into ``BUILD.json["head3"]``.

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
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))  # runs from a checkout even without the editable install

from eagle_runtime import DynamicTree, EagleModel, load_head, save_head  # noqa: E402
from eagle_runtime.demo import DEMO_DIR  # noqa: E402
from eagle_runtime.train import TrainConfig, train_head  # noqa: E402
from eagle_runtime.train_eagle3 import Eagle3TrainConfig, train_head3  # noqa: E402
from eagle_runtime.train_target import DEFAULT_TOKENIZER, TargetConfig, read_stories, train_target  # noqa: E402

SHARED = Path(os.environ.get("EAGLE_SHARED_DATA", REPO.parent / "shared" / "data"))
HEAD_CORPUS = SHARED / "corpus" / "tinystories_val.txt"
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
        "corpus": Path(args.head_corpus).name,
        "heldout_top1_accuracy": evals[-1]["eval_acc"] if evals else None,
        "heldout_loss": evals[-1]["eval_loss"] if evals else None,
        "final_train_loss": res["history"][-1]["loss"] if res["history"] else None,
    }


def _head_cfg(args, cls, steps: int, minutes: float | None = None, **extra):
    return cls(
        steps=steps, batch_size=args.head_batch_size, seq_len=args.head_seq_len, lr=args.head_lr, warmup=30,
        eval_every=max(1, steps // 4), eval_batches=8, save_every=10**9, max_minutes=minutes, seed=args.seed, **extra,
    )


def _measure_heads(heads: dict, tree: DynamicTree, n_prompts: int) -> dict:
    """Plain decoding and each head with ``tree`` on the same held-out openings: tokens/s, tau, exactness."""
    from eagle_runtime import load_target

    target = load_target(DEMO_DIR / "target")
    from eagle_runtime.generate import _load_tokenizer

    model = EagleModel(target, None, _load_tokenizer(DEMO_DIR / "target"), tree=tree, backend="torch")
    prompts, plain_time, plain_tokens = _plain_baseline(model, n_prompts)
    n_tok = MEASURE_TOKENS * len(prompts)
    out = {"prompts": len(prompts), "max_new_tokens": MEASURE_TOKENS, "temperature": 0.0,
           "tree": {"total_tokens": tree.total_tokens, "depth": tree.depth, "top_k": tree.top_k},
           "plain_tokens_per_s": n_tok / plain_time}
    for name, head_dir in heads.items():
        model.head = load_head(head_dir, target)
        model.generate(prompts[0], 16)  # warm-up
        wall, lens, same = 0.0, [], True
        for i, p in enumerate(prompts):
            r = model.generate(p, MEASURE_TOKENS, stop_on_eos=False)
            wall += r.wall_time_s
            lens += r.accept_lengths[0]
            same &= r.tokens[0] == plain_tokens[i]
        out[name] = {"tau": sum(lens) / len(lens), "tokens_per_s": n_tok / wall, "speedup": plain_time / wall,
                     "identical_to_plain": same}
        print(f"{name}: tau {out[name]['tau']:.2f}, {out[name]['tokens_per_s']:.1f} tok/s", flush=True)
    return out


def build_head3(args) -> dict:
    """EAGLE-1 vs EAGLE-3 under the same wall-clock cap, sequentially; the EAGLE-3 head becomes demo/head3."""
    work = Path(args.work)
    runs = {}
    e3 = dict(draft_vocab=args.head3_draft_vocab, ttt_steps=args.head3_ttt_steps)
    budget_s = None
    for name in ("eagle1", "eagle3"):
        out = work / f"compare_{name}"
        if out.exists():
            shutil.rmtree(out)
        if name == "eagle1":
            t0 = time.time()
            cfg = _head_cfg(args, TrainConfig, args.compare_steps1)
            res = train_head(DEMO_DIR / "target", args.head_corpus, out, cfg)
            budget_s = time.time() - t0
        else:
            probe_dir = work / "probe_eagle3"
            t_probe = time.time()
            n_probe = 8
            pcfg = replace(_head_cfg(args, Eagle3TrainConfig, n_probe, **e3), eval_every=10**9)
            pres = train_head3(DEMO_DIR / "target", args.head_corpus, probe_dir, pcfg, progress=False)
            per_step = (pres["history"][-1]["time_s"] - pres["history"][0]["time_s"]) / (n_probe - 1)
            overhead = (time.time() - t_probe) - n_probe * per_step  # loading, vocabulary, one evaluation, saving
            steps = max(1, int((budget_s - 4 * overhead) / per_step))  # four evaluations on the way
            print(f"eagle3 probe: {per_step:.2f} s/step, overhead {overhead:.1f} s -> {steps} steps in {budget_s:.0f} s")
            t0 = time.time()
            cfg = _head_cfg(args, Eagle3TrainConfig, steps, budget_s / 60, **e3)
            res = train_head3(DEMO_DIR / "target", args.head_corpus, out, cfg)
        evals = [r for r in res["history"] if "eval_acc" in r]
        runs[name] = {
            "dir": out, "steps_done": res["steps"], "wall_s": round(time.time() - t0, 1), "config": asdict(cfg),
            "heldout_top1_accuracy": evals[-1]["eval_acc"] if evals else None,
        }
        print(f"{name}: {res['steps']} steps in {runs[name]['wall_s']} s, held-out top-1 "
              f"{runs[name]['heldout_top1_accuracy']}", flush=True)
    from eagle_runtime import load_target

    head3 = load_head(runs["eagle3"]["dir"], load_target(DEMO_DIR / "target"))
    out = DEMO_DIR / "head3"
    if out.exists():
        shutil.rmtree(out)
    save_head(head3, out, safetensors=True)
    info = json.loads((DEMO_DIR / "BUILD.json").read_text()) if (DEMO_DIR / "BUILD.json").is_file() else {}
    t = info.get("tree") or {"total_tokens": 8, "depth": 3, "top_k": 2}
    heads = {"eagle1": runs["eagle1"]["dir"], "eagle3": runs["eagle3"]["dir"], "eagle1_committed": DEMO_DIR / "head"}
    meas = _measure_heads(heads, DynamicTree(t["total_tokens"], t["depth"], t["top_k"]), args.measure_prompts)
    for r in runs.values():
        r.pop("dir")
    return {
        "corpus": Path(args.head_corpus).name,
        "draft_vocab_size": head3.draft_vocab_size,
        "taps": list(head3.target_taps),
        "wall_clock_budget_s": round(budget_s, 1),
        "runs": runs,
        "measure": meas,
        "note": "both heads trained one after the other on the same corpus and threads, the EAGLE-3 head capped at "
                "the EAGLE-1 run's wall time, on a shared 2-core CPU; eagle1_committed is demo/head (BUILD.json['head'])",
    }


def _plain_baseline(model, n_prompts: int) -> tuple[list[str], float, list[list[int]]]:
    """Plain greedy decoding of ``MEASURE_TOKENS`` on the last ``n_prompts`` held-out story openings (after one
    warm-up): ``(prompts, seconds, tokens per prompt)``, the baseline every measured tree is compared with."""
    stories = read_stories(SHARED / "corpus" / "tinystories_extra.txt")[-n_prompts:]
    prompts = [" ".join(s.split()[:12]) for s in stories]
    model.generate(prompts[0], 16, speculative=False)  # warm-up
    plain_time, plain_tokens = 0.0, []
    for p in prompts:
        r = model.generate(p, MEASURE_TOKENS, speculative=False, stop_on_eos=False)
        plain_time += r.wall_time_s
        plain_tokens.append(r.tokens[0])
    return prompts, plain_time, plain_tokens


def measure(args) -> dict:
    """Plain vs EAGLE in our runtime on held-out story openings, for each candidate tree; picks the fastest."""
    model = EagleModel.from_pretrained(DEMO_DIR / "target", DEMO_DIR / "head", backend="torch")
    prompts, plain_time, plain_tokens = _plain_baseline(model, args.measure_prompts)
    n_tok = MEASURE_TOKENS * len(prompts)
    sweep = []
    for total, depth, k in TREES:
        model.tree = DynamicTree(total, depth, k)
        model.generate(prompts[0], 16)  # warm-up
        wall, lens, same = 0.0, [], True
        for i, p in enumerate(prompts):
            r = model.generate(p, MEASURE_TOKENS, stop_on_eos=False)
            wall += r.wall_time_s
            lens += r.accept_lengths[0]
            same &= r.tokens[0] == plain_tokens[i]
        sweep.append({
            "tree": {"total_tokens": total, "depth": depth, "top_k": k},
            "tokens_per_s": n_tok / wall,
            "speedup": plain_time / wall,
            "tau": sum(lens) / len(lens),
            "identical_to_plain": same,
        })
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
                   choices=["target", "head", "measure", "head3"])
    p.add_argument("--work", default=str(REPO / "build" / "demo_work"))
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--target-steps", type=int, default=2000)
    p.add_argument("--target-minutes", type=float, default=13.0, help="wall-time budget of the target (cosine follows it)")
    p.add_argument("--target-batch-size", type=int, default=4)
    p.add_argument("--target-seq-len", type=int, default=512)
    p.add_argument("--head-corpus", default=str(HEAD_CORPUS))
    p.add_argument("--head-steps", type=int, default=1000)
    p.add_argument("--head-minutes", type=float, default=16.0)
    p.add_argument("--head-batch-size", type=int, default=8)
    p.add_argument("--head-seq-len", type=int, default=256)
    p.add_argument("--head-lr", type=float, default=2e-3)
    p.add_argument("--measure-prompts", type=int, default=6)
    p.add_argument("--compare-steps1", type=int, default=1000, help="head3: steps of the EAGLE-1 comparison run "
                   "(its wall time becomes the EAGLE-3 head's budget)")
    p.add_argument("--head3-draft-vocab", type=int, default=256, help="the demo corpus uses about 200 of 512 ids")
    p.add_argument("--head3-ttt-steps", type=int, default=4, help="the demo tree drafts 4 levels (depth 3 + 1)")
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
    if "head3" in args.stages:
        t1 = time.time()
        info["head3"] = build_head3(args)
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
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: info[k] for k in info if k not in ("measure",)}, indent=2, default=str))


if __name__ == "__main__":
    main()
