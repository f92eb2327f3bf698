"""Per-cycle tree bookkeeping: the Python reference vs the native extension (C++ on CPU, CUDA on GPU).

One decode cycle's bookkeeping = ``build_tree_buffers(parents)`` (the native op where built) + position ids
``prefix_len + depth`` + the new sequence lengths ``seq_len += accept_len + 1`` (plain torch in both variants, as
in the runtime). Shapes of decoding: the EAGLE-1 static tree (T = 26, depth 5)
and an EAGLE-2 dynamic tree (T = 61: 60 drafted tokens in 6 layers of 10), batch 1 and 4.

    python benchmarks/bench_tree_buffers.py [--iters N]

Prints a table (median microseconds per cycle) and merges the rows into results/bench_tree_buffers.json under
the device name (CPU model or GPU name) and torch version.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from eagle_kernels import reference, tree_buffers

ROOT = Path(__file__).resolve().parents[1]
# EAGLE-1 static tree mc_sim_7b_63 as parents: root + 25 drafted nodes, depth 5.
EAGLE1 = [-1, 0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 5, 5, 5, 6, 6, 7, 7, 8, 13, 13, 13, 21, 21]


def dynamic_tree(gen: torch.Generator, layers: int = 6, width: int = 10) -> list[int]:
    """EAGLE-2-like tree: ``layers`` layers of ``width`` nodes, each node's parent drawn from the layer above."""
    par, prev = [-1], [0]
    for _ in range(layers):
        start = len(par)
        par += [prev[int(torch.randint(len(prev), (1,), generator=gen))] for _ in range(width)]
        prev = list(range(start, len(par)))
    return par


def _cycle(build, parents, max_depth, prefix_len, seq_len, accept_len):
    bufs = build(parents, max_depth)
    positions = prefix_len[:, None] + bufs.depth
    seq_len.add_(accept_len + 1)
    return bufs, positions


def reference_cycle(parents, max_depth, prefix_len, seq_len, accept_len):
    return _cycle(reference.build_tree_buffers, parents, max_depth, prefix_len, seq_len, accept_len)


def native_cycle(parents, max_depth, prefix_len, seq_len, accept_len):
    return _cycle(tree_buffers.build_tree_buffers, parents, max_depth, prefix_len, seq_len, accept_len)


def time_cpu(fn, iters: int, repeats: int = 7) -> float:
    """Median over ``repeats`` of the mean wall time of ``iters`` calls, in microseconds."""
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        samples.append((time.perf_counter() - t0) / iters * 1e6)
    return statistics.median(samples)


def time_cuda(fn, iters: int, repeats: int = 7) -> float:
    """Eager CUDA time per call (host launch overhead included, as in an uncaptured cycle), microseconds."""
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / iters * 1e3)
    return statistics.median(samples)


def time_cuda_graph(fn, iters: int, repeats: int = 7) -> float:
    """Per-cycle GPU time when ``iters`` cycles are captured in one CUDA graph (launch overhead amortised)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    return time_cuda(graph.replay, 1, repeats) / iters


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=200, help="calls per timing sample")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "bench_tree_buffers.json")
    args = ap.parse_args()
    if tree_buffers._C is None:
        raise SystemExit(f"eagle_kernels._C is not built ({tree_buffers._IMPORT_ERROR}); see csrc/README.md")

    gen = torch.Generator().manual_seed(0)
    shapes = [("static", EAGLE1, 5), ("dynamic", None, 6)]
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and tree_buffers.native_cuda_available() else None
    results: dict[str, list[dict]] = {cpu: []} if gpu is None else {cpu: [], gpu: []}

    header = f"{'device':<8} {'tree':<8} {'B':>2} {'T':>3} {'variant':<22} {'us/cycle':>10} {'speedup':>8}"
    print(header)
    print("-" * len(header))
    for tree_name, tree, max_depth in shapes:
        for B in (1, 4):
            rows = [tree if tree is not None else dynamic_tree(gen) for _ in range(B)]
            parents = torch.tensor(rows, dtype=torch.int64)
            T = parents.shape[1]
            prefix = torch.randint(0, 2000, (B,), generator=gen)
            accept = torch.randint(0, max_depth + 1, (B,), generator=gen)
            # Each cycle advances seq_len; the tensors stay small ints over a benchmark's few thousand cycles.
            seq_r, seq_n = prefix.clone(), prefix.clone()
            ref_us = time_cpu(lambda: reference_cycle(parents, max_depth, prefix, seq_r, accept), max(args.iters // 10, 5))
            nat_us = time_cpu(lambda: native_cycle(parents, max_depth, prefix, seq_n, accept), args.iters)
            variants = [(cpu, "reference (python)", ref_us), (cpu, "native C++", nat_us)]
            if gpu:
                p, pre, acc, s = parents.cuda(), prefix.cuda(), accept.cuda(), prefix.cuda()

                def cuda_cycle():
                    return native_cycle(p, max_depth, pre, s, acc)

                def cpu_then_copy():  # a runtime without the CUDA op: build on the CPU, copy the buffers over
                    bufs, _ = native_cycle(parents, max_depth, prefix, seq_n, accept)
                    return [t.to("cuda", non_blocking=True) for t in bufs]

                variants += [
                    (gpu, "native C++ + H2D copy", time_cuda(cpu_then_copy, args.iters)),
                    (gpu, "native CUDA eager", time_cuda(cuda_cycle, args.iters)),
                    (gpu, "native CUDA graph", time_cuda_graph(cuda_cycle, args.iters)),
                ]
            for device, variant, us in variants:
                row = {"tree": tree_name, "B": B, "T": T, "variant": variant, "us_per_cycle": round(us, 2),
                       "speedup_vs_reference": round(ref_us / us, 1)}
                results[device].append(row)
                dev = "cuda" if device == gpu else "cpu"
                print(f"{dev:<8} {tree_name:<8} {B:>2} {T:>3} {variant:<22} {us:>10.2f} {ref_us / us:>7.1f}x")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(args.out.read_text()) if args.out.exists() else {}
    for device, rows in results.items():
        saved[device] = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    args.out.write_text(json.dumps(saved, indent=1))
    print(f"\nsaved to {args.out}")


if __name__ == "__main__":
    main()
