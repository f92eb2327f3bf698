"""Tree attention: Triton kernel vs the reference, SDPA with an explicit mask, FlexAttention, flash-attn.

Llama-2-7B attention shape (32 heads, head dim 128, bf16), batch 1, a 64-token tree, prefixes 128..8192.
Bytes = K and V of the visible slots + queries + outputs; the fraction is of the measured copy bandwidth.
flash-attn's ``flash_attn_with_kvcache`` cannot take a tree mask: it runs causal over the same slots, as a
bandwidth peer only.  Usage: ``python benchmarks/bench_tree_attention.py [--quick]``.
"""

from __future__ import annotations

from _bench_utils import device, report, row, setup, time_ms

args = setup(__doc__.splitlines()[0])

import torch  # noqa: E402

from eagle_kernels import reference  # noqa: E402
from eagle_kernels.tree_attention import tree_attention  # noqa: E402


def _visible(prefix_len, mask, S):
    B, T, M = mask.shape
    slots = torch.arange(S, device=mask.device)
    p = prefix_len.view(B, 1, 1)
    rel = slots.view(1, 1, S) - p
    vis = (slots < p).expand(B, T, S).clone()
    vis |= (rel >= 0) & (rel < M) & torch.gather(mask, 2, rel.clamp(0, M - 1).expand(B, T, S))
    return vis


def main() -> None:
    dev = device()
    if args.quick:
        Hq, Hkv, D, T, prefixes, dtype = 4, 2, 16, 4, [8, 40], torch.float16
    else:
        Hq, Hkv, D, T, prefixes, dtype = 32, 32, 128, 64, [128, 512, 1024, 2048, 4096, 8192], torch.bfloat16
    g = torch.Generator().manual_seed(0)
    parents = torch.tensor([[-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]], device=dev)
    mask = reference.build_tree_buffers(parents).mask
    rows = []
    flex = None
    if dev == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = (torch.compile(flex_attention), create_block_mask)
        except ImportError as e:
            print(f"FlexAttention unavailable: {e}")
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        flash_attn_with_kvcache = None
        print("flash-attn not installed: skipping that peer")
    for P in prefixes:
        S = P + T
        q = torch.randn(1, T, Hq, D, device=dev, dtype=dtype)
        k = torch.randn(1, Hkv, S, D, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        pl = torch.tensor([P], device=dev)
        nbytes = 2 * Hkv * S * D * k.element_size() + 2 * q.numel() * q.element_size()
        shape = {"prefix": P, "T": T, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": str(dtype).split(".")[-1]}
        out = tree_attention(q, k, v, pl, mask)
        err = (out.float() - reference.tree_attention(q, k, v, pl, mask).float()).abs().max().item()
        rows.append({**row("tree_attention", "triton", shape, time_ms(lambda: tree_attention(q, k, v, pl, mask)),
                           nbytes), "max_err_vs_ref": err})
        if args.quick or P <= 2048:
            rows.append(row("tree_attention", "reference", shape,
                            time_ms(lambda: reference.tree_attention(q, k, v, pl, mask)), nbytes))
        vis = _visible(pl, mask, S).unsqueeze(1)
        rep = Hq // Hkv
        qt = q.transpose(1, 2)
        kk, vv = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        rows.append(row("tree_attention", "sdpa_mask", shape, time_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(qt, kk, vv, attn_mask=vis)), nbytes))
        if flex is not None:
            flex_fn, create_block_mask = flex
            vis2 = vis[0, 0]

            def mask_mod(b, h, q_idx, kv_idx):
                return vis2[q_idx, kv_idx]

            bm = create_block_mask(mask_mod, 1, 1, T, S, device=dev)
            rows.append(row("tree_attention", "flex_attention", shape, time_ms(
                lambda: flex_fn(qt, k, v, block_mask=bm, enable_gqa=rep > 1)), nbytes))
        if flash_attn_with_kvcache is not None and dtype != torch.float32:
            kc, vc = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            seqlens = torch.tensor([S], device=dev, dtype=torch.int32)
            rows.append(row("tree_attention", "flash_attn_kvcache_causal(no tree mask)", shape, time_ms(
                lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True)), nbytes))
    report("tree_attention", rows)


if __name__ == "__main__":
    main()
