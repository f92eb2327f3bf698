"""Where an EAGLE cycle's time goes on a CPU, next to a plain decoding step.

    python benchmarks/cpu_cycle_phases.py                    # demo pair, tree 12,3,4, 8 MT-bench questions
    python benchmarks/cpu_cycle_phases.py --tree 16,4,4 --threads 1
    python benchmarks/cpu_cycle_phases.py --base DIR --draft DIR --tree 60,6,10

Two views, both greedy (temperature 0), decode steps only (the prefill is left out):

- **Phases per cycle** on MT-bench prompts (formatted as ``mtbench_speed.py`` does): the runtime's calls are
  wrapped and timed with ``perf_counter`` (CPU ops are synchronous): drafting (with its head steps and top-k
  expansions also shown on their own), the verification forward, the target's ``lm_head``, tree buffers,
  acceptance and KV compaction; "rest" is the cycle's wall time minus those (the head's re-read of the accepted
  path and the bookkeeping between ops; a call inside another timed call, like the head's ``lm_head`` calls
  inside drafting, is subtracted once). The same prompts decoded plainly give the plain step.
- **One decoder layer** of the target (a middle one), piece by piece, at 1 token (a plain step) and at the tree's
  size (verification), on the inputs the runtime handed it; "plumbing" is the layer's wall time minus its pieces.

Tokens are not checked here (the tests do that). Writes ``cpu_cycle_phases_<device>_<time>.json`` into ``--out``
(default ``$EAGLE_RESULTS_DIR``, else ``results/``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import eagle_runtime.decoder as G  # noqa: E402
from eagle_runtime import DynamicTree, EagleModel, load_head, load_target  # noqa: E402
from eagle_runtime.text import load_tokenizer  # noqa: E402
from eagle_runtime.tree import step_room  # noqa: E402
from mtbench_speed import DEFAULT_QUESTIONS, encode, load_questions, make_prompt, save_json  # noqa: E402

PHASES = ["draft", "head_step", "topk_expand", "verify", "lm_head", "tree_buffers", "accept", "kv_compact"]
INSIDE_DRAFT = ("head_step", "topk_expand")  # timed within "draft" (as are the head's lm_head calls)


class _Phases:
    """Wraps the calls of one :class:`EagleModel` and sums their wall time, counting only calls made inside a
    cycle (``Decoder.cycle``) or a plain step (``Decoder.plain_step``); everything is put back by :meth:`restore`."""

    def __init__(self, model: EagleModel):
        self.m = model
        self.t: Counter = Counter()
        self.n: Counter = Counter()
        self.where: str | None = None
        self.depth = 0
        self._ops, self._target_states = model.ops, G.target_states
        self._inst: list[tuple[object, str]] = []
        ops = model.ops
        model.ops = dataclasses.replace(ops, build_tree_buffers=self._wrap(ops.build_tree_buffers, "tree_buffers"),
                                        accept_tree=self._wrap(ops.accept_tree, "accept"),
                                        kv_compact=self._wrap(ops.kv_compact, "kv_compact"),
                                        topk_expand=self._wrap(ops.topk_expand, "topk_expand"))
        G.target_states = self._wrap(G.target_states, "verify")
        for obj, name, label in ((model.tree, "draft", "draft"), (model.head, "step", "head_step"),
                                 (model.target, "logits", "lm_head")):
            object.__setattr__(obj, name, self._wrap(getattr(obj, name), label))
            self._inst.append((obj, name))
        dec = model.decoder  # rebuilt by the ops assignment above; restore() replaces it again
        for name, label in (("cycle", "cycle"), ("plain_step", "plain_step")):
            setattr(dec, name, self._scope(getattr(dec, name), label))

    def _wrap(self, fn, label):
        def timed(*a, **k):
            if self.where is None:
                return fn(*a, **k)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                self.depth -= 1
                self.t[(self.where, label)] += dt
                self.n[(self.where, label)] += 1
                if self.depth == 0:  # not inside another timed call: counts towards the step's accounted time
                    self.t[(self.where, "accounted")] += dt
        return timed

    def _scope(self, fn, label):
        def scoped(*a, **k):
            self.where = label
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[(label, label)] += time.perf_counter() - t0
                self.n[(label, label)] += 1
                self.where = None
        return scoped

    def restore(self) -> None:
        self.m.ops, G.target_states = self._ops, self._target_states
        for obj, name in self._inst:
            object.__delattr__(obj, name)


def _layer_pieces(model: EagleModel, layer_idx: int, prompt: list[int], reps: int) -> dict:
    """Microseconds of one target layer's pieces at 1 token and at the verification size (the tree's nodes)."""
    layer = model.target.layers[layer_idx]
    seen: dict[int, tuple] = {}
    orig = layer.step

    def capture(*a, **k):
        seen.setdefault(a[0].shape[1], (a, k))
        return orig(*a, **k)

    layer.step = capture
    try:
        model.generate([prompt], 24, stop_on_eos=False)
        model.generate([prompt], 8, stop_on_eos=False, speculative=False)
    finally:
        del layer.step
    attn, mlp = layer.self_attn, layer.mlp
    n1, n2 = layer.input_layernorm, layer.post_attention_layernorm

    def us(fn) -> float:
        for _ in range(max(reps // 10, 3)):
            fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e6

    out = {}
    with torch.inference_mode():
        for T in sorted(t for t in seen if t in (1, model.tree.num_nodes)):
            (x, residual, rope, kc, vc, plen, widx, mask, lops), kw = seen[T]
            ops = lops  # that forward's table: its per-forward memos hit as in every layer after the first
            B = x.shape[0]
            h, r = ops.add_rms_norm(x, residual, n1.weight, n1.eps)
            qkv = attn._project(h)
            q = ops.rope_kv_write(qkv, rope.cos, rope.sin, rope.positions, kc, vc, widx, attn.num_heads,
                                  attn.num_kv_heads)
            a = ops.tree_attention(q, kc, vc, plen, mask).reshape(B, T, -1)
            h2, _ = ops.add_rms_norm(attn.o_proj(a), r, n2.weight, n2.eps)
            gu = mlp._project(h2)
            act = ops.silu_mul(gu)
            pieces = {
                "add_rms_norm x2": 2 * us(lambda: ops.add_rms_norm(x, residual, n1.weight, n1.eps)),
                "qkv_proj": us(lambda: attn._project(h)),
                "rope_kv_write": us(lambda: ops.rope_kv_write(qkv, rope.cos, rope.sin, rope.positions, kc, vc, widx,
                                                              attn.num_heads, attn.num_kv_heads)),
                "tree_attention": us(lambda: ops.tree_attention(q, kc, vc, plen, mask)),
                "o_proj": us(lambda: attn.o_proj(a)),
                "gate_up_proj": us(lambda: mlp._project(h2)),
                "silu_mul": us(lambda: ops.silu_mul(gu)),
                "down_proj": us(lambda: mlp.down_proj(act)),
            }
            whole = us(lambda: orig(x, residual, rope, kc, vc, plen, widx, mask, lops, **kw))
            out[str(T)] = {"tokens": T, "layer_us": whole, "pieces_us": pieces,
                           "plumbing_us": whole - sum(pieces.values())}
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.base:
        base, draft = Path(args.base), Path(args.draft)
    else:
        from eagle_runtime.demo import best_head, demo_paths

        base, draft = demo_paths(best_head())
    target = load_target(base)
    tok = load_tokenizer(base)
    tree = DynamicTree(*(int(v) for v in args.tree.split(",")))
    model = EagleModel(target, load_head(draft, target), tok, tree=tree, backend="cpu")
    questions, source = load_questions(Path(args.questions) if args.questions else
                                       (DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.is_file() else None), args.num_questions)
    budget = target.max_len - args.max_new_tokens - step_room(tree) - 2  # as mtbench_speed.py
    prompts = [encode(tok, make_prompt(tok, [(q["turns"][0], None)]), budget)[0] for q in questions]
    model.generate([prompts[0]], 16)  # warm-up (allocation, memos)
    model.generate([prompts[0]], 16, speculative=False)
    ph = _Phases(model)
    new_tokens = 0
    try:
        for p in prompts:
            r = model.generate([p], args.max_new_tokens, stop_on_eos=False)
            new_tokens += r.num_new_tokens - 1  # the prefill's token is not a cycle's
            model.generate([p], args.max_new_tokens, stop_on_eos=False, speculative=False)
    finally:
        ph.restore()
    cycles, steps = ph.n[("cycle", "cycle")], ph.n[("plain_step", "plain_step")]
    per_cycle = {k: 1e3 * ph.t[("cycle", k)] / cycles for k in PHASES}
    cycle_ms = 1e3 * ph.t[("cycle", "cycle")] / cycles
    per_cycle["rest"] = cycle_ms - 1e3 * ph.t[("cycle", "accounted")] / cycles
    plain_ms = 1e3 * ph.t[("plain_step", "plain_step")] / steps
    tau = new_tokens / cycles
    res = {
        "device": f"cpu ({platform.machine()})",
        "config": {"base": str(base), "draft": str(draft), "tree": dataclasses.asdict(tree), "questions": source, "num_questions": len(prompts), "max_new_tokens":
                   args.max_new_tokens, "threads": torch.get_num_threads(), "torch": torch.__version__},
        "cycles": cycles, "tau": tau, "cycle_ms": cycle_ms, "plain_step_ms": plain_ms,
        "cycle_over_plain": cycle_ms / plain_ms,
        "decode_speedup": tau * plain_ms / cycle_ms,
        "phases_ms_per_cycle": per_cycle,
        "calls_per_cycle": {k: ph.n[("cycle", k)] / cycles for k in PHASES},
        "plain_step_phases_ms": {k: 1e3 * ph.t[("plain_step", k)] / steps for k in ("verify", "lm_head")},
        "layer": _layer_pieces(model, args.layer if args.layer is not None else len(target.layers) // 2, prompts[0],
                               args.layer_reps),
    }
    return res


def report(res: dict) -> str:
    lines = [f"device {res['device']}, tree {res['config']['tree']}, {res['config']['threads']} threads, "
             f"{res['cycles']} cycles, tau {res['tau']:.2f}",
             f"plain step {res['plain_step_ms']:.3f} ms; cycle {res['cycle_ms']:.3f} ms = "
             f"{res['cycle_over_plain']:.2f} plain steps; decode speedup tau x plain / cycle = {res['decode_speedup']:.2f}x",
             f"plain step: target forward {res['plain_step_phases_ms']['verify']:.3f} ms, lm_head "
             f"{res['plain_step_phases_ms']['lm_head']:.3f} ms"]
    for k, v in res["phases_ms_per_cycle"].items():
        calls = res["calls_per_cycle"].get(k)
        inner = " (inside draft)" if k in INSIDE_DRAFT else (" (the head's calls, inside draft, included)" if k == "lm_head" else "")
        lines.append(f"  {k:14s} {v:7.3f} ms/cycle" + (f"  {calls:4.1f} calls" if calls is not None else "") + inner)
    for T, lay in res["layer"].items():
        pieces = ", ".join(f"{k} {v:.1f}" for k, v in lay["pieces_us"].items())
        lines.append(f"  layer at {T} token(s): {lay['layer_us']:.1f} us = {pieces}, plumbing {lay['plumbing_us']:.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="target directory (default: the embedded demo pair)")
    p.add_argument("--draft", default=None, help="head directory (with --base)")
    p.add_argument("--tree", default="12,3,4", help="dynamic tree total,depth,top_k (default: what auto runs most "
                   "on the demo pair)")
    p.add_argument("--questions", default=None, help="MT-bench jsonl (default: the shared one, else built-in)")
    p.add_argument("--num-questions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core, as mtbench_speed.py)")
    p.add_argument("--layer", type=int, default=None, help="target layer for the per-piece view (default: middle)")
    p.add_argument("--layer-reps", type=int, default=300)
    p.add_argument("--out", default=None, help="results folder (default: $EAGLE_RESULTS_DIR, else results/)")
    args = p.parse_args(argv)
    if (args.base is None) != (args.draft is None):
        p.error("--base and --draft go together")
    if args.num_questions < 1 or args.max_new_tokens < 2:
        p.error("--num-questions must be >= 1 and --max-new-tokens >= 2")
    try:
        DynamicTree(*(int(v) for v in args.tree.split(",")))
    except (TypeError, ValueError) as e:
        p.error(f"--tree {args.tree!r}: {e}")
    res = run(args)
    print(report(res))
    save_json(args.out or os.environ.get("EAGLE_RESULTS_DIR") or "results", f"cpu_cycle_phases_{platform.machine()}", res)
    return res


if __name__ == "__main__":
    main()
