"""Where a decode cycle's time goes, at the Llama-2-7B and Llama-3-8B shapes, random weights (nothing downloaded).

    python benchmarks/cycle_breakdown.py                     # GPU: both shapes, bf16, prefixes 512 and 2048
    python benchmarks/cycle_breakdown.py --model llama3-8b   # one shape
    python benchmarks/cycle_breakdown.py --quick             # any device: a tiny shape, to check the script runs

Reports, per prefix length: plain decode ms/token and its fraction of the roofline (the weight bytes a step reads
over the measured device-to-device copy bandwidth); for EAGLE with a 60-token dynamic tree of depth 6: draft,
verify and accept+update ms per cycle and the whole cycle, eagerly and as replayed CUDA graphs (each phase
captured on its own, and the whole cycle); the tokens/s that follow for the papers' acceptance lengths (tau 3.62
for EAGLE-1 and 4.70 for EAGLE-2 on LLaMA2-Chat 7B), labelled as projections; and HF transformers ``generate``
(eager, same weights) tokens/s. Results go to ``results/cycle_breakdown_<device>.json``;
``benchmarks/gpu_report.py`` calls :func:`run_model`.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from eagle_runtime import DynamicTree, EagleModel, random_head
from eagle_runtime.atomic import atomic_write_json
from eagle_runtime.graphs import GraphsUnavailable
from eagle_runtime.loading import target_from_state_dict
from eagle_runtime.tree import shape_key

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5)
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
MODELS = {"llama2-7b": LLAMA2_7B, "llama3-8b": LLAMA3_8B, "tiny": TINY}
PAPER_TAU = {"EAGLE-1 (tau 3.62)": 3.62, "EAGLE-2 (tau 4.70)": 4.70}


class Timer:
    """Device-accurate wall time: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"

    def __call__(self, fn, reps: int) -> float:
        fn()  # warm-up
        if self.cuda:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) * 1e3 / reps


def graph_ms(fn, reps: int, pool=None) -> float:
    """Milliseconds per replay of ``fn`` captured as one CUDA graph (``fn`` must be free of host syncs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, pool=pool):
        fn()
    return Timer(torch.device("cuda"))(g.replay, reps)


def copy_bandwidth_gbs(dev) -> float | None:
    if dev.type != "cuda":
        return None
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    ms = Timer(dev)(lambda: y.copy_(x), 20)
    return 2 * x.numel() / ms / 1e6  # bytes read + written


def build(cfg: dict, dtype, dev, max_len: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: no float32 copy of 7-8B weights
    try:
        with torch.device(dev):
            hf = LlamaForCausalLM(LlamaConfig(**cfg, torch_dtype=dtype)).to(dtype).eval()
    finally:
        torch.set_default_dtype(default)
    config = dict(hf.config.to_dict(), model_type="llama")
    target = target_from_state_dict(config, hf.state_dict(), dtype, dev, max_len)
    return hf, target


def measure(model: EagleModel, hf, prefix: int, dev, reps: int) -> dict:
    tgt = model.target
    V = tgt.cfg.vocab_size
    ids = torch.randint(3, V, (prefix,), generator=torch.Generator().manual_seed(prefix)).tolist()
    timer = Timer(dev)
    dec = model.decoder
    # the pool's sampling buffers: a graph captured at an earlier prefix reads these very tensors (a fresh set per
    # measurement once made the prefix-2048 replays read the buffers freed after the prefix-512 capture)
    sp = dec.sampling(1)
    row: dict = {"prefix": prefix}
    with torch.inference_mode():
        state = dec.prefill([ids], sp, speculative=True)
        row["plain_decode_ms"] = timer(lambda: dec.plain_step(state, sp), reps)
        # phases of one cycle, eager (each phase timed on its own over the same state; nothing is committed)
        ops, tree, L, head = model.ops, model.tree, state.L, model.head

        def step(h_in, tokens, positions, write_pos, mask):
            return head.step(h_in, tokens, tgt, positions, state.d_cache, L, write_pos, mask, ops)

        draft = lambda: tree.draft(step, state.d_hidden, state.d_logits, state.next_tok, L, ops)  # noqa: E731
        row["draft_ms"] = timer(draft, reps)
        tokens, parents = draft()

        def verify():
            bufs = ops.build_tree_buffers(parents, tree.max_depth)
            return tgt(tokens, L[:, None] + bufs.depth, state.cache, L, L, bufs.mask, ops)

        row["verify_ms"] = timer(verify, reps)
        row["cycle_eager_ms"] = timer(lambda: dec.cycle(state, sp, tree), reps)
        row["accept_update_ms"] = row["cycle_eager_ms"] - row["draft_ms"] - row["verify_ms"]
        if model.graphs.enabled:
            if dev.type == "cuda":  # each phase as its own graph (they only write cache slots past the committed length)
                row["draft_graph_ms"] = graph_ms(draft, reps)
                row["verify_graph_ms"] = graph_ms(verify, reps)
            # then the runtime's own captured cycle and plain step, from its graph cache (keys as generate's)
            cycle_key = (1, "cycle", shape_key(tree), None)
            row["cycle_graph_ms"] = timer(lambda: model.graphs.step(cycle_key, dec.cycle, state, sp, tree), reps)
            if "draft_graph_ms" in row:
                row["accept_update_graph_ms"] = row["cycle_graph_ms"] - row["draft_graph_ms"] - row["verify_graph_ms"]
            plain_key = (1, "plain", False)
            row["plain_decode_graph_ms"] = timer(lambda: model.graphs.step(plain_key, dec.plain_step, state, sp), reps)
        best_cycle = row.get("cycle_graph_ms", row["cycle_eager_ms"])
        best_plain = row.get("plain_decode_graph_ms", row["plain_decode_ms"])
        row["cycle_over_plain"] = best_cycle / best_plain
        row["plain_tokens_per_s"] = 1e3 / best_plain
        row["projected_tokens_per_s"] = {k: tau * 1e3 / best_cycle for k, tau in PAPER_TAU.items()}
        # HF transformers generate, eager, same weights: new tokens per second after a prefill of `prefix`
        inp = torch.tensor([ids], device=dev)
        n_new = 32
        gen = lambda: hf.generate(inp, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)  # noqa: E731
        row["hf_generate_tokens_per_s"] = n_new * 1e3 / timer(gen, max(1, reps // 10))
    return row


def plain_step_by_batch(model: EagleModel, dev, batches, prefix: int, reps: int) -> list[dict]:
    """Plain decode step ms at each batch size (same prefix for every row), replayed as a graph when the model
    captures graphs: where the per-step cost jumps says which batch buckets are worth a graph of their own."""
    V = model.target.cfg.vocab_size
    timer = Timer(dev)
    out = []
    with torch.inference_mode():
        for B in batches:
            ids = [torch.randint(3, V, (prefix,), generator=torch.Generator().manual_seed(b)).tolist()
                   for b in range(B)]
            dec = model.decoder
            sp = dec.sampling(B)
            state = dec.prefill(ids, sp, speculative=False)
            ms = timer(lambda: model.graphs.step((B, "plain", False), dec.plain_step, state, sp), reps)
            out.append({"batch": B, "plain_step_ms": ms, "graph": model.graphs.enabled, "ms_per_sequence": ms / B})
            del state  # let a larger batch's cache replace this one instead of joining it
    return out


def weight_bytes_per_step(target) -> int:
    """Bytes of weights one decode step reads: every parameter except the embedding table (one row is read),
    unless the table is the tied lm_head."""
    total = sum(p.numel() * p.element_size() for p in target.parameters())
    if target.lm_head.weight is not target.embed_tokens.weight:
        e = target.embed_tokens.weight
        total -= e.numel() * e.element_size()
    return total


def device_name(dev) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"


def run_model(name: str, dtype, dev, prefixes, reps: int, graphs: bool, log=print, batches=()) -> dict:
    """Build the ``name`` shape (random weights) and measure every prefix; frees the models before returning."""
    cfg = MODELS[name]
    backend = "triton" if dev.type == "cuda" else "torch"
    hf, target = build(cfg, dtype, dev, max_len=max(prefixes) + 256)
    try:
        try:
            model = EagleModel(target, random_head(target), None, tree=DynamicTree(60, 6, 10), backend=backend,
                               cuda_graphs=graphs and dev.type == "cuda")
        except GraphsUnavailable as e:  # measure eagerly, and say why, rather than lose the whole run
            log(f"{name}: CUDA graphs unavailable, measuring eagerly: {e}")
            model = EagleModel(target, random_head(target), None, tree=DynamicTree(60, 6, 10), backend=backend,
                               cuda_graphs=False)
        wbytes = weight_bytes_per_step(target)
        bw = copy_bandwidth_gbs(dev)
        log(f"{name}: device {device_name(dev)}; random weights, {dtype}; backend {backend}; graphs "
            f"{model.cuda_graphs}; copy bandwidth {bw and round(bw)} GB/s")
        rows = []
        for prefix in prefixes:
            row = measure(model, hf, prefix, dev, reps)
            if bw:
                row["plain_roofline_fraction"] = wbytes / (bw * 1e9) * 1e3 / row.get("plain_decode_graph_ms",
                                                                                   row["plain_decode_ms"])
            rows.append(row)
            log(json.dumps(row))
        by_batch = plain_step_by_batch(model, dev, batches, min(prefixes), reps) if batches else []
        for r in by_batch:
            log(json.dumps(r))
        return {"model": name, "dtype": str(dtype).split(".")[-1], "backend": backend, "graphs": model.cuda_graphs,
                "weight_bytes_per_step": wbytes, "copy_bandwidth_gbs": bw, "rows": rows,
                "plain_step_by_batch": by_batch}
    finally:
        del hf, target
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shape, float32, any device")
    p.add_argument("--model", choices=sorted(MODELS), nargs="+", default=None)
    p.add_argument("--prefixes", type=int, nargs="+", default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = a.quick or dev.type != "cuda"
    dtype = torch.float32 if quick else torch.bfloat16
    names = a.model or (["tiny"] if quick else ["llama2-7b", "llama3-8b"])
    prefixes = a.prefixes or ([64, 128] if quick else [512, 2048])
    reps = a.reps or (3 if quick else 50)
    results = [run_model(n, dtype, dev, prefixes, reps, a.cuda_graphs) for n in names]
    print("\nmodel      prefix  plain ms  draft ms  verify ms  accept+upd ms  cycle eager  cycle graph  cycle/plain  "
          "HF tok/s")
    for res in results:
        for r in res["rows"]:
            print(f"{res['model']:10s} {r['prefix']:6d}  {r['plain_decode_ms']:8.2f}  {r['draft_ms']:8.2f}  "
                  f"{r['verify_ms']:9.2f}  {r['accept_update_ms']:13.2f}  {r['cycle_eager_ms']:11.2f}  "
                  f"{r.get('cycle_graph_ms', float('nan')):11.2f}  {r['cycle_over_plain']:11.2f}  "
                  f"{r['hf_generate_tokens_per_s']:8.1f}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    name = device_name(dev)
    path = out / f"cycle_breakdown_{name.replace(' ', '_')}.json"
    info = {"device": name, "torch": torch.__version__, "quick": quick, "models": results}
    atomic_write_json(path, info)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
