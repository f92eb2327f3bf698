"""Fused top-k expansion: Triton (two kernels, CUDA-graph replay timing) vs log_softmax + torch.topk twice.

EAGLE-2 draft step: 10 frontier rows, k = 10, V = 32000 (Llama-2) and 128256 (Llama-3), fp32 and bf16 logits.
Usage: ``python benchmarks/bench_topk_expand.py [--quick]``.
"""

from __future__ import annotations

from _bench_utils import device, report, row, setup, time_ms

args = setup(__doc__.splitlines()[0])

import torch  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.topk_expand import topk_expand  # noqa: E402


def torch_chain(logits, parent, k, out_k):
    logp = torch.log_softmax(logits.float(), -1)
    vals, idx = torch.topk(logp, k, dim=-1)
    scores = (vals + parent.unsqueeze(-1)).flatten(1)
    top, top_idx = torch.topk(scores, out_k, dim=-1)
    return idx, scores, top, top_idx


def main() -> None:
    dev = device()
    configs = [(1, 10, 111, 10), (1, 4, 1000, 4)] if args.quick else \
        [(1, 10, 32000, 10), (1, 10, 128256, 10), (1, 64, 32000, 16), (4, 10, 128256, 10)]
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    rows = []
    for (B, N, V, k) in configs:
        for dtype in dtypes:
            logits = torch.randn(B, N, V, device=dev, dtype=dtype)
            parent = torch.randn(B, N, device=dev)
            shape = {"B": B, "N": N, "V": V, "k": k, "dtype": str(dtype).split(".")[-1]}
            nbytes = logits.numel() * logits.element_size()
            ok = torch.equal(topk_expand(logits, parent, k).top_tokens,
                             reference.topk_expand(logits, parent, k).top_tokens)
            rows.append({**row("topk_expand", "triton", shape,
                               time_ms(lambda: topk_expand(logits, parent, k), graph=True), nbytes),
                         "matches_ref": ok})
            rows.append(row("topk_expand", "torch_logsoftmax_topk2", shape,
                            time_ms(lambda: torch_chain(logits, parent, k, k), graph=True), nbytes))
            rows.append(row("topk_expand", "reference(stable sort)", shape,
                            time_ms(lambda: reference.topk_expand(logits, parent, k)), nbytes))
    report("topk_expand", rows)


if __name__ == "__main__":
    main()
