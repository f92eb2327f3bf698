"""Tree acceptance and plain sampling: Triton (row summaries over a (tree rows x batch) grid, then a per-sequence
walk; CUDA-graph replay timing) vs the PyTorch reference.

GPU: a 61-node EAGLE-2-shaped tree (root + 6 levels of at most 10 children), batch 1 (and 4 at V = 32000),
V = 32000 (Llama-2) and 128256 (Llama-3); greedy, temperature 0.8 with top-k 40 and top-p 0.9 together (the
issue's goal: <= 25 us per cycle at V = 32000 and <= 60 us at V = 128256 on an H100), and temperature 1 with
top-p 0.9 alone (the slowest filter: its search runs over the whole vocabulary). Drafts are the parent's argmax
so that paths are long. ``--quick`` (the only mode on CPU): tiny shapes under the interpreter, checking that the
kernel's tokens equal the reference's.
Usage: ``python benchmarks/bench_acceptance.py [--quick]``.
"""

from __future__ import annotations

from _bench_utils import device, report, row, setup, time_ms

args = setup(__doc__.splitlines()[0])

import torch  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.acceptance import accept_tree, sample_tokens  # noqa: E402

SETTINGS = {"greedy": (0.0, 1.0, 0), "t0.8_topk40_topp0.9": (0.8, 0.9, 40), "t1_topp0.9": (1.0, 0.9, 0)}


def _parents(T: int) -> list[int]:
    """Root, then levels of up to 10 nodes, each node's children consecutive (EAGLE-2's 60 + 1 node shape)."""
    parents, level = [-1], [0]
    while len(parents) < T:
        nxt = []
        for i in range(min(10, T - len(parents))):
            parents.append(level[i % len(level)])
            nxt.append(len(parents) - 1)
        level = nxt
    return parents


def main() -> None:
    dev = device()
    cases = [(8, 111, 1), (8, 111, 2)] if args.quick else [(61, 32000, 1), (61, 128256, 1), (61, 32000, 4)]
    rows = []
    for T, V, B in cases:
        logits = 3 * torch.randn(B, T, V, device=dev)
        parents = torch.tensor([_parents(T)] * B, device=dev)
        tokens = logits.argmax(-1).gather(1, parents.clamp(min=0))  # drafts = the parent's argmax: long paths
        seed, off = torch.tensor(2**40 + 1, device=dev), torch.tensor(0, device=dev)
        for name, (t, p, k) in SETTINGS.items():
            temp = torch.full((B,), t, device=dev)
            top_p = torch.full((B,), p, device=dev)
            top_k = torch.full((B,), k, device=dev, dtype=torch.int64)
            shape = {"B": B, "T": T, "V": V, "sampling": name}
            a = (logits, tokens, parents, temp, top_p, top_k, seed, off)
            out, ref = accept_tree(*a), reference.accept_tree(*a)
            same = all(torch.equal(x, y) for x, y in zip(out, ref))
            rows.append({**row("accept_tree", "triton", shape, time_ms(lambda: accept_tree(*a), graph=True)),
                         "matches_ref": same, "mean_accept_len": float(ref.accept_len.float().mean())})
            rows.append(row("accept_tree", "reference", shape, time_ms(lambda: reference.accept_tree(*a))))
            s = (logits[:, 0].contiguous(), temp, top_p, top_k, seed, off)
            same = torch.equal(sample_tokens(*s), reference.sample_tokens(*s))
            rows.append({**row("sample_tokens", "triton", {**shape, "T": 1},
                               time_ms(lambda: sample_tokens(*s), graph=True)), "matches_ref": same})
            rows.append(row("sample_tokens", "reference", {**shape, "T": 1},
                            time_ms(lambda: reference.sample_tokens(*s))))
    report("acceptance", rows)


if __name__ == "__main__":
    main()
