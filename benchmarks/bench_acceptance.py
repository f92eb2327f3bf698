"""Tree acceptance: Triton (one program per sequence, CUDA-graph replay timing) vs the PyTorch reference.

64-token tree (EAGLE-2 shape: 6 levels of 10 children max), V = 32000, batch 1 and 4; greedy, temperature 1,
and temperature 0.7 with top-p 0.9 (the slow path: in-kernel bisection for the cut).
Usage: ``python benchmarks/bench_acceptance.py [--quick]``.
"""

from __future__ import annotations

from _bench_utils import device, report, row, setup, time_ms

args = setup(__doc__.splitlines()[0])

import torch  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.acceptance import accept_tree, sample_tokens  # noqa: E402


def main() -> None:
    dev = device()
    T, V, batches = (8, 111, [1]) if args.quick else (64, 32000, [1, 4])
    settings = {"greedy": (0.0, 1.0, 0), "temp1": (1.0, 1.0, 0), "temp0.7_topp0.9": (0.7, 0.9, 0)}
    rows = []
    for B in batches:
        logits = 3 * torch.randn(B, T, V, device=dev)
        parents = torch.tensor([[-1] + [(i - 1) // 3 for i in range(1, T)]] * B, device=dev)
        top = logits.argmax(-1)
        tokens = top.gather(1, parents.clamp(min=0))  # drafts = the parent's argmax: long accepted paths
        seed, off = torch.tensor(1, device=dev), torch.tensor(0, device=dev)
        for name, (t, p, k) in settings.items():
            temp = torch.full((B,), t, device=dev)
            top_p = torch.full((B,), p, device=dev)
            top_k = torch.full((B,), k, device=dev, dtype=torch.int64)
            shape = {"B": B, "T": T, "V": V, "sampling": name}
            a = (logits, tokens, parents, temp, top_p, top_k, seed, off)
            same = all(torch.equal(x, y) for x, y in zip(accept_tree(*a), reference.accept_tree(*a)))
            rows.append({**row("accept_tree", "triton", shape, time_ms(lambda: accept_tree(*a), graph=True)),
                         "matches_ref": same})
            rows.append(row("accept_tree", "reference", shape, time_ms(lambda: reference.accept_tree(*a))))
            s = (logits[:, 0].contiguous(), temp, top_p, top_k, seed, off)
            rows.append(row("sample_tokens", "triton", {**shape, "T": 1}, time_ms(lambda: sample_tokens(*s),
                                                                                   graph=True)))
            rows.append(row("sample_tokens", "reference", {**shape, "T": 1}, time_ms(lambda: reference.sample_tokens(*s))))
    report("acceptance", rows)


if __name__ == "__main__":
    main()
