"""KV compaction: Triton vs the reference (fancy indexing) on the stacked Llama-2-7B cache.

Cache [2 * 32 layers, B, 32 heads, 4096 slots, 128] bf16, accepted paths of 1..10 tokens out of a 64-node tree.
Bytes = read + write of the moved entries. Usage: ``python benchmarks/bench_kv_compact.py [--quick]``.
"""

from __future__ import annotations

from _bench_utils import device, report, row, setup, time_ms

args = setup(__doc__.splitlines()[0])

import torch  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.kv_compact import kv_compact  # noqa: E402


def main() -> None:
    dev = device()
    L, H, S, D, T = (4, 2, 64, 16, 8) if args.quick else (64, 32, 4096, 128, 64)
    rows = []
    for B in ([1] if args.quick else [1, 4]):
        cache = torch.randn(L, B, H, S, D, device=dev, dtype=torch.bfloat16)
        for n in ([3] if args.quick else [1, 5, 10]):
            path = torch.full((B, T), -1, device=dev, dtype=torch.int64)
            path[:, : n + 1] = torch.arange(n + 1, device=dev) * 3  # every entry moves
            acc = torch.full((B,), n, device=dev, dtype=torch.int64)
            prefix = torch.full((B,), S // 2, device=dev, dtype=torch.int64)
            nbytes = 2 * L * B * H * n * D * cache.element_size()
            shape = {"L": L, "B": B, "H": H, "D": D, "accepted": n}
            rows.append(row("kv_compact", "triton", shape,
                            time_ms(lambda: kv_compact(cache, prefix, path, acc), graph=True), nbytes))
            rows.append(row("kv_compact", "reference", shape,
                            time_ms(lambda: reference.kv_compact(cache, prefix, path, acc)), nbytes))
    report("kv_compact", rows)


if __name__ == "__main__":
    main()
