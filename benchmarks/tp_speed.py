"""Tensor-parallel speed and communication: tokens/s of plain and EAGLE decoding at any TP size, and the bytes
all-reduced per cycle and per plain step, next to the same arithmetic for 70B-class targets.

    torchrun --nproc-per-node 1 benchmarks/tp_speed.py            # the embedded demo pair, TP1 (baseline)
    torchrun --nproc-per-node 2 benchmarks/tp_speed.py            # TP2 (gloo on CPU, NCCL on CUDA)
    torchrun --nproc-per-node 8 benchmarks/tp_speed.py --base meta-llama/Llama-2-70b-chat-hf \\
        --draft yuhuili/EAGLE-llama2-chat-70B --device cuda --dtype bfloat16 --tree dynamic

Bytes are counted by the collectives themselves (:class:`eagle_runtime.parallel.TPGroup`): the prefill is
measured on its own (a one-token generation) and subtracted, so "per cycle" is one draft + verify + accept cycle
and "per plain step" one plain decoding step, averaged over the run. Rank 0 prints one table and a JSON line,
and writes ``tp_speed_<device>_tp<N>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from eagle_runtime import EagleModel, load_head, load_target  # noqa: E402
from eagle_runtime.atomic import atomic_write_text  # noqa: E402
from eagle_runtime.text import load_tokenizer  # noqa: E402
from eagle_runtime.parallel import (  # noqa: E402
    env_world_size,
    is_main_process,
    load_target_parallel,
    shutdown_distributed,
)

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird",
           "Lily had a big", "The sun was", "A boy named Tim", "In the forest there"]

# Targets the issue names: (layers, hidden, parameters). All-reduced activations per token: layers * 2 * hidden.
BIG = {"Llama-2-70B": (80, 8192, 69.0e9), "Llama-3.3-70B": (80, 8192, 70.6e9), "Mixtral-8x7B": (32, 4096, 46.7e9)}
EAGLE2_VERIFY_TOKENS = 61  # EAGLE-2's default tree: 60 drafted tokens + the root, verified in one pass


def big_model_bytes(ranks: int = 8, tree_tokens: int = EAGLE2_VERIFY_TOKENS, bytes_per_el: int = 2) -> dict:
    """All-reduced bytes per plain step and per EAGLE cycle (one verify pass of ``tree_tokens`` tokens; the head
    is replicated, so drafting adds none), bf16, batch 1, next to the weight bytes each of ``ranks`` ranks reads
    per pass (what a decoding step costs on a GPU: the EAGLE speedup assumes a verify pass costs about a plain
    step, i.e. that the weight reads dominate)."""
    out = {}
    for name, (layers, hidden, params) in BIG.items():
        per_token = layers * 2 * hidden * bytes_per_el
        weights = params * bytes_per_el / ranks  # Mixtral: all experts, as a 61-token tree touches nearly all
        out[name] = {"all_reduces_per_pass": 2 * layers, "plain_step_bytes": per_token,
                     "cycle_bytes": per_token * tree_tokens, "bytes_per_all_reduce_cycle": hidden * bytes_per_el * tree_tokens,
                     "weight_bytes_per_rank_per_pass": weights, "ranks": ranks,
                     "cycle_bytes_over_weight_bytes": per_token * tree_tokens / weights}
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="target (default: the embedded demo pair)")
    p.add_argument("--draft", default=None, help="EAGLE-1 head")
    p.add_argument("--num-prompts", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--tree", default="demo", help="demo, dynamic or TOTAL,DEPTH,TOPK")
    p.add_argument("--vocab", default="replicated", choices=["replicated", "parallel"],
                   help="embedding / lm_head: whole on every rank, or split by vocabulary rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the API's (bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per rank")
    p.add_argument("--out", default=str(REPO / "results"))
    a = p.parse_args(argv)
    if a.device == "cpu" and a.threads:
        torch.set_num_threads(a.threads)
    from eagle_runtime.tree import DynamicTree

    if a.base is None:
        from eagle_runtime.demo import demo_paths, demo_tree

        base, draft = (str(x) for x in demo_paths())
        tree = demo_tree() if a.tree == "demo" else None
    else:
        base, draft, tree = a.base, a.draft, None
    if tree is None:
        m = re.fullmatch(r"(\d+),(\d+),(\d+)", a.tree)
        tree = DynamicTree(*map(int, m.groups())) if m else DynamicTree()
    dtype = getattr(torch, a.dtype) if a.dtype else torch.bfloat16 if torch.device(a.device).type == "cuda" else torch.float32
    world = env_world_size()
    if world > 1:
        target = load_target_parallel(base, dtype=dtype, device=a.device, vocab=a.vocab)
    else:
        target = load_target(base, dtype=dtype, device=a.device)
    model = EagleModel(target, load_head(draft, target), load_tokenizer(base), tree=tree, backend=a.backend)
    tp = getattr(target, "tp", None)
    prompts = PROMPTS[: a.num_prompts]

    def counted(fn):
        if tp is not None:
            tp.reset_counters()
        r = fn()
        return r, (tp.all_reduce_bytes, tp.all_reduce_calls, tp.all_gather_bytes) if tp else (0, 0, 0)

    rows = {}
    for mode, spec in (("plain", False), ("eagle", True)):
        model.generate(prompts[0], 8, speculative=spec)  # warm-up
        tokens = wall = steps = 0
        red = calls = gat = 0
        for prompt in prompts:
            _, pre = counted(lambda: model.generate(prompt, 1, speculative=spec))  # the prefill's share
            r, tot = counted(lambda: model.generate(prompt, a.max_new_tokens, speculative=spec))
            tokens += r.num_new_tokens
            wall += r.wall_time_s
            steps += len(r.accept_lengths[0]) if spec else r.num_new_tokens - 1  # the first token is the prefill's
            red += tot[0] - pre[0]
            calls += tot[1] - pre[1]
            gat += tot[2] - pre[2]
            if spec:
                rows.setdefault("_lens", []).extend(r.accept_lengths[0])
        rows[mode] = {"tokens": tokens, "time_s": wall, "tokens_per_s": tokens / wall, "steps": steps,
                      "all_reduce_bytes_per_step": red / max(steps, 1), "all_reduces_per_step": calls / max(steps, 1),
                      "all_gather_bytes_per_step": gat / max(steps, 1)}
    lens = rows.pop("_lens")
    rows["eagle"]["tau"] = sum(lens) / len(lens)
    cfg = target.cfg
    tree_tokens = tree.num_nodes
    res = {
        "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else f"cpu ({platform.machine()})",
        "tensor_parallel": world,
        "vocab": a.vocab if world > 1 else "whole",
        "target": {"layers": cfg.num_layers, "hidden": cfg.hidden_size, "dtype": str(dtype).removeprefix("torch.")},
        "tree": {"total_tokens": getattr(tree, "total_tokens", None), "depth": tree.max_depth, "verify_tokens": tree_tokens},
        "threads_per_rank": torch.get_num_threads(),
        "plain": rows["plain"],
        "eagle": rows["eagle"],
        "speedup_eagle_over_plain": rows["eagle"]["tokens_per_s"] / rows["plain"]["tokens_per_s"],
        "big_models_bf16_batch1": big_model_bytes(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    main_rank = is_main_process()
    shutdown_distributed()
    if not main_rank:
        return res
    print(f"device {res['device']}, TP{world} (vocab {res['vocab']}), dtype {res['target']['dtype']}, tree {res['tree']}")
    print(f"{'mode':6} {'tokens':>6} {'tok/s':>8} {'steps':>6} {'AR bytes/step':>14} {'AR calls/step':>13} {'AG bytes/step':>13}")
    for m in ("plain", "eagle"):
        r = rows[m]
        print(f"{m:6} {r['tokens']:6d} {r['tokens_per_s']:8.2f} {r['steps']:6d} {r['all_reduce_bytes_per_step']:14.0f} "
              f"{r['all_reduces_per_step']:13.1f} {r['all_gather_bytes_per_step']:13.0f}")
    print(f"tau {rows['eagle']['tau']:.2f}, EAGLE/plain {res['speedup_eagle_over_plain']:.2f}x")
    print(f"70B-class targets, bf16, batch 1, TP8 (a cycle verifies {EAGLE2_VERIFY_TOKENS} tokens; the head adds no "
          "collective):")
    for name, b in res["big_models_bf16_batch1"].items():
        print(f"  {name:14} {b['all_reduces_per_pass']} all-reduces per pass; {b['plain_step_bytes'] / 2**20:.2f} MiB per "
              f"plain step, {b['cycle_bytes'] / 2**20:.1f} MiB per cycle ({b['bytes_per_all_reduce_cycle'] / 2**20:.2f} MiB "
              f"each) vs {b['weight_bytes_per_rank_per_pass'] / 2**30:.1f} GiB of weights read per rank per pass "
              f"({100 * b['cycle_bytes_over_weight_bytes']:.1f}%)")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "tp_speed_" + re.sub(r"[^A-Za-z0-9]+", "_", res["device"]).strip("_").lower() + f"_tp{world}.json"
    atomic_write_text(out / name, json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("device", "tensor_parallel", "vocab", "speedup_eagle_over_plain")}
                     | {"plain_tokens_per_s": rows["plain"]["tokens_per_s"], "eagle_tokens_per_s": rows["eagle"]["tokens_per_s"],
                        "all_reduce_bytes_per_cycle": rows["eagle"]["all_reduce_bytes_per_step"],
                        "all_reduce_bytes_per_plain_step": rows["plain"]["all_reduce_bytes_per_step"]}))
    return res


if __name__ == "__main__":
    main()
