"""Grouped MoE experts: Triton grouped GEMMs vs every-expert dense loop (the old CUDA path) vs index-select.

Mixtral-8x7B experts (E 8, top-2, H 4096, I 14336, bf16): 1 token (plain decode), 61 (an EAGLE-2 tree at batch 1),
976 (the tree at batch 16). Bytes = the routed experts' weights read once (a lower bound of the traffic); the
fraction is of the measured copy bandwidth. Usage: ``python benchmarks/bench_moe.py [--quick]``.
"""

from __future__ import annotations

from _bench_utils import device, report, row, setup, time_ms

args = setup(__doc__.splitlines()[0])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.moe import moe_experts  # noqa: E402


def dense_all_experts(x, top_w, top_i, w1, w3, w2):
    """Every expert over every token, weighted (zero where not routed): static shapes, E/K times the work."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        w = (top_w * (top_i == e)).sum(-1, keepdim=True)
        out = out + w * ((F.silu(x @ w1[e].T) * (x @ w3[e].T)) @ w2[e].T)
    return out


def index_select(x, top_w, top_i, w1, w3, w2):
    """The CPU path of SparseMoE: data-dependent shapes (host sync per expert; not graph-safe)."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(top_i == e)
        h = x[tok]
        out.index_add_(0, tok, ((F.silu(h @ w1[e].T) * (h @ w3[e].T)) @ w2[e].T) * top_w[tok, slot, None])
    return out


def main() -> None:
    dev = device()
    if args.quick:
        E, K, H, I, tokens, dtype = 4, 2, 96, 80, [1, 7], torch.float16
    else:
        E, K, H, I, tokens, dtype = 8, 2, 4096, 14336, [1, 61, 976], torch.bfloat16
    torch.manual_seed(0)  # weights drawn on the device: 1.4 G values per tensor at the Mixtral shape
    w1 = torch.randn(E, I, H, device=dev, dtype=dtype) * H ** -0.5
    w3 = torch.randn(E, I, H, device=dev, dtype=dtype) * H ** -0.5
    w2 = torch.randn(E, H, I, device=dev, dtype=dtype) * I ** -0.5
    g = torch.Generator().manual_seed(0)
    rows = []
    for N in tokens:
        x = torch.randn(N, H, generator=g).to(dev, dtype)
        top_w, top_i = torch.softmax(torch.randn(N, E, generator=g), -1).topk(K, -1)
        top_w, top_i = (top_w / top_w.sum(-1, keepdim=True)).to(dev, dtype), top_i.to(dev)
        used = int(torch.unique(top_i).numel())
        nbytes = used * 3 * H * I * w1.element_size()
        shape = {"N": N, "E": E, "K": K, "H": H, "I": I, "experts_used": used, "dtype": str(dtype).split(".")[-1]}
        ref = reference.moe_experts(x, top_w, top_i, w1, w3, w2).float()
        err = (moe_experts(x, top_w, top_i, w1, w3, w2).float() - ref).abs().max().item()
        rows.append({**row("moe_experts", "triton_grouped", shape,
                           time_ms(lambda: moe_experts(x, top_w, top_i, w1, w3, w2), graph=True), nbytes),
                     "max_err_vs_ref": err})
        rows.append(row("moe_experts", "dense_all_experts", shape,
                        time_ms(lambda: dense_all_experts(x, top_w, top_i, w1, w3, w2), graph=True), nbytes))
        rows.append(row("moe_experts", "index_select", shape,
                        time_ms(lambda: index_select(x, top_w, top_i, w1, w3, w2)), nbytes))
    report("moe_experts", rows)


if __name__ == "__main__":
    main()
