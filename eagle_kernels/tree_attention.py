"""Tree attention: ``T`` new tokens attend to a cached prefix plus tree-masked new slots (Triton).

Contract: :func:`eagle_kernels.reference.tree_attention` (same arguments, same result up to float rounding).

Mask format (dense bool, ``tree_mask [B, T, M]``, row ``t`` = query token, column ``m`` = cache slot
``prefix_len[b] + m``). The prefix columns are implicit: every query sees every slot below ``prefix_len[b]``,
so only the ``M`` tree columns are stored. A draft tree ``x -> {y, z}``, ``z -> w`` after a 2-slot prefix::

    cache slot         0 1 | 2 3 4 5        tree_mask[b] (what is passed)
    token              P P | x y z w            x y z w
    query x            1 1 | 1 0 0 0        x [ 1 0 0 0 ]
    query y            1 1 | 1 1 0 0        y [ 1 1 0 0 ]
    query z            1 1 | 1 0 1 0        z [ 1 0 1 0 ]
    query w            1 1 | 1 0 1 1        w [ 1 0 1 1 ]
                    (implicit)  (stored)

A row of zeros with ``prefix_len[b] == 0`` is a query that sees nothing: its output is zeros.

Kernel layout (flash-decoding):

* One program owns one KV head of one sequence and a tile of ``BLOCK_R`` query rows, where a row is a
  ``(token t, query head g of this KV head)`` pair, ``row = t * group + g``. All query heads of a KV head (GQA)
  and all tree tokens share one tile, so each K/V block is loaded once for all of them.
* The prefix ``[0, prefix_len[b])`` is cut into up to ``num_splits`` chunks along the grid's third axis
  (split-K), so that batch 1 still fills the GPU. Each chunk keeps an online softmax (running max, sum, and
  unnormalised output, in float32, base-2 exponent) with no mask loads. The last active split also handles the
  ``M`` tree slots, reading ``tree_mask``. A second small kernel merges the chunks' ``(max, sum, acc)``.

The attention plan (:func:`attention_plan` on the host, :func:`_split_range` in both kernels):

* The grid's split count is the smallest that gives one wave of programs, ``ceil(SMs / (tiles * B * Hkv))``
  (132 SMs on an H100: Llama-2-7B verify at batch 1 has 32 programs per split, so 5 splits = 160 programs),
  capped by the cache capacity in ``MIN_CHUNK`` pieces and by 64.
* The chunk sizes come from each sequence's own prefix length, read on the device (no host synchronisation):
  the prefix is cut into ``min(splits, ceil(prefix / MIN_CHUNK))`` shares of whole ``MIN_CHUNK`` units (a
  ``BLOCK_N`` multiple) differing by at most one unit, so a prefix longer than ``(splits - 1) * MIN_CHUNK``
  keeps every program of the wave busy; splits with nothing to read exit at once. ``MIN_CHUNK = BLOCK_N`` when
  a tile holds at most 32 rows (the partials, ``8 * BLOCK_R * D`` bytes per split, stay below the chunk's ``4 * MIN_CHUNK * D`` bytes of 16-bit
  K/V), else ``2 * BLOCK_N``.
* Base offsets (sequence, KV head, partial rows) are computed in int64: a ``[B, Hkv, S, D]`` plane of 64
  sequences x 8 heads x 32k slots x 128 passes 2^31 elements.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._registry import launch, register_op

__all__ = ["tree_attention", "attention_plan", "split_range"]

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


@triton.jit
def _split_range(prefix, pid_s, NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr):
    """Slots ``[lo, hi)`` of the prefix that split ``pid_s`` reads, and the number of active splits (>= 1).

    The prefix is ``units = ceil(prefix / MIN_CHUNK)`` units; ``n = min(NUM_SPLITS, units)`` splits are active
    (at least 1: split 0 owns the tree slots even when the prefix is empty) and split ``s`` reads units
    ``[s * units // n, (s + 1) * units // n)``: shares differ by at most one unit, each starts on a ``MIN_CHUNK``
    boundary, and each active split gets at least one unit. Idle splits get ``lo >= prefix``."""
    units = tl.cdiv(prefix, MIN_CHUNK)
    n_active = tl.maximum(tl.minimum(units, NUM_SPLITS), 1)
    lo = (pid_s * units // n_active) * MIN_CHUNK
    hi = tl.minimum(((pid_s + 1) * units // n_active) * MIN_CHUNK, prefix)
    return lo, hi, n_active


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_base, v_base, offs_n, kv_ok, visible, offs_d, d_ok,
                  stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, PRECISION: tl.constexpr):
    """One online-softmax step over a block of slots ``offs_n``; scores in the base-2 domain."""
    ld_mask = kv_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=ld_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen nothing yet keeps m = -inf; shift by 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=ld_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tree_attention_kernel(
    Q, K, V, PREFIX, MASK, O, PART_ACC, PART_M, PART_L,
    qk_scale, T, M, R, HKV, D,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mt, stride_mm,
    stride_ob, stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = (pid_bh // HKV).to(tl.int64)  # int64 base offsets: b * stride_kb passes 2^31 on large caches
    kvh = (pid_bh % HKV).to(tl.int64)

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < R
    t = offs_r // GROUP
    h = kvh * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D

    prefix = tl.load(PREFIX + b).to(tl.int32)
    lo, hi, n_active = _split_range(prefix, pid_s, NUM_SPLITS, MIN_CHUNK)  # from the device-side prefix
    if pid_s < n_active:
        q = tl.load(Q + b * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)

        for start in range(lo, hi, BLOCK_N):  # prefix: every slot visible, no mask loads
            offs_n = start + tl.arange(0, BLOCK_N)
            kv_ok = offs_n < hi
            visible = tl.broadcast_to(kv_ok[None, :], (BLOCK_R, BLOCK_N))
            acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, offs_n, kv_ok, visible, offs_d, d_ok,
                                          stride_ks, stride_kd, stride_vs, stride_vd, qk_scale, PRECISION)

        if pid_s == n_active - 1:  # the tree slots [prefix, prefix + M), masked
            mask_base = MASK + b * stride_mb + t[:, None] * stride_mt
            for start in range(0, M, BLOCK_N):
                offs_m = start + tl.arange(0, BLOCK_N)
                m_ok = offs_m < M
                visible = tl.load(mask_base + offs_m[None, :] * stride_mm,
                                  mask=row_ok[:, None] & m_ok[None, :], other=0) != 0
                acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_base, v_base, prefix + offs_m, m_ok, visible,
                                              offs_d, d_ok, stride_ks, stride_kd, stride_vs, stride_vd, qk_scale,
                                              PRECISION)

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l == 0 <=> nothing seen; acc is 0 there
            tl.store(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
                     out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        else:
            part = (pid_s * tl.num_programs(1) + pid_bh).to(tl.int64) * R + offs_r
            tl.store(PART_M + part, m_i, mask=row_ok)
            tl.store(PART_L + part, l_i, mask=row_ok)
            tl.store(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _tree_attention_merge_kernel(
    PREFIX, O, PART_ACC, PART_M, PART_L, R, HKV, D,
    stride_ob, stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr, MIN_CHUNK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Combine the splits' partial (max, sum, acc) of one tile of rows into the normalised output."""
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = (pid_bh % HKV).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < R
    t = offs_r // GROUP
    h = kvh * GROUP + offs_r % GROUP
    offs_d = tl.arange(0, BLOCK_D)

    prefix = tl.load(PREFIX + b).to(tl.int32)
    _, _, n_active = _split_range(prefix, 0, NUM_SPLITS, MIN_CHUNK)  # same plan as the attention kernel

    stride_split = tl.num_programs(1).to(tl.int64) * R
    m_max = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for s in range(0, n_active):
        m_max = tl.maximum(m_max, tl.load(PART_M + s * stride_split + pid_bh.to(tl.int64) * R + offs_r, mask=row_ok,
                                          other=float("-inf")))
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    l_tot = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, n_active):
        part = s * stride_split + pid_bh.to(tl.int64) * R + offs_r
        w = tl.exp2(tl.load(PART_M + part, mask=row_ok, other=float("-inf")) - m_safe)
        l_tot += w * tl.load(PART_L + part, mask=row_ok, other=0.0)
        acc += w[:, None] * tl.load(PART_ACC + part[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None],
                                    other=0.0)
    out = acc / tl.where(l_tot > 0, l_tot, 1.0)[:, None]
    tl.store(O + b * stride_ob + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < D)[None, :])


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # interpreter: any small number; the split logic is still exercised
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def attention_plan(B: int, T: int, Hq: int, Hkv: int, D: int, S: int, M: int, dtype: torch.dtype, sms: int,
                   num_splits: int | None = None) -> dict:
    """The launch configuration of :func:`tree_attention` for these shapes on a device with ``sms`` SMs.

    Returns the tile sizes, ``MIN_CHUNK``, the grid's ``NUM_SPLITS`` (one wave of programs: ``tiles * B * Hkv *
    NUM_SPLITS >= sms`` whenever the capacity ``S - M`` holds that many ``MIN_CHUNK`` chunks), ``grid`` and
    ``num_warps``. Pure host arithmetic (no device query): the launcher, the sm_90 compile check and the tests
    call it."""
    R = T * (Hq // Hkv)
    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs K >= 16: head dim 8 (stories260k) is zero-padded
    BLOCK_R = min(max(16, triton.next_power_of_2(R)), 64)
    # fp32 at D=128 with BLOCK_N=64 needs ~180 KB of shared memory at 3 stages (sm_90 compile): halve it
    BLOCK_N = 32 if (dtype == torch.float32 and BLOCK_D > 64) else 64
    # partials cost 8 * BLOCK_R * D bytes per split (write + merge read); a chunk reads >= 4 * MIN_CHUNK * D
    min_chunk = BLOCK_N if BLOCK_R <= 32 else 2 * BLOCK_N
    tiles = triton.cdiv(R, BLOCK_R)
    if num_splits is None:
        programs = tiles * B * Hkv
        want = triton.cdiv(sms, programs)  # one wave
        num_splits = max(1, min(want, triton.cdiv(max(S - M, 1), min_chunk), _MAX_SPLITS))
    return dict(R=R, tiles=tiles, BLOCK_D=BLOCK_D, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, MIN_CHUNK=min_chunk,
                NUM_SPLITS=int(num_splits), grid=(tiles, B * Hkv, int(num_splits)),
                num_warps=4 if BLOCK_D <= 64 else 8)


def split_range(prefix: int, pid_s: int, num_splits: int, min_chunk: int) -> tuple[int, int, int]:
    """Host mirror of the kernels' ``_split_range`` (tests compare the two)."""
    units = -(-prefix // min_chunk)
    n_active = max(min(units, num_splits), 1)
    lo = (pid_s * units // n_active) * min_chunk
    return lo, min(((pid_s + 1) * units // n_active) * min_chunk, prefix), n_active


def _plan(q: torch.Tensor, k_cache: torch.Tensor, M: int, num_splits: int | None) -> dict:
    B, T, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    return attention_plan(B, T, Hq, Hkv, D, S, M, q.dtype, _sm_count(q.device), num_splits)


def _check(q, k_cache, v_cache, prefix_len, tree_mask, num_splits) -> None:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"q, k_cache, v_cache must be 4-D; got {tuple(q.shape)}, {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    B, T, Hq, D = q.shape
    if k_cache.shape != v_cache.shape or k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache/v_cache must be [B={B}, Hkv, S, D={D}] and equal; got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    Hkv = k_cache.shape[1]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} must be a multiple of KV heads {Hkv}")
    if tree_mask.dim() != 3 or tree_mask.shape[:2] != (B, T) or tree_mask.dtype != torch.bool:
        raise ValueError(f"tree_mask must be bool [B={B}, T={T}, M]; got {tree_mask.dtype} {tuple(tree_mask.shape)}")
    if tree_mask.shape[2] > k_cache.shape[2]:
        raise ValueError(f"tree_mask has M={tree_mask.shape[2]} columns but the cache only S={k_cache.shape[2]} slots")
    if prefix_len.shape != (B,) or prefix_len.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"prefix_len must be int32/int64 [B={B}]; got {prefix_len.dtype} {tuple(prefix_len.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype or \
            v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one of float16/bfloat16/float32; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    devs = {t.device for t in (q, k_cache, v_cache, prefix_len, tree_mask)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(str(d) for d in devs)}")
    if num_splits is not None and not (1 <= num_splits <= 1024):
        raise ValueError(f"num_splits must lie in [1, 1024]; got {num_splits}")


def _tree_attention_fake(q, k_cache, v_cache, prefix_len, tree_mask, sm_scale=None, num_splits=None):
    return torch.empty_like(q)


def _launches(q, k_cache, v_cache, prefix_len, mask_u8, out, part_acc, part_m, part_l, scale, cfg) -> list:
    """``[(kernel, grid, args, kwargs)]`` of one call: the launcher runs them, the sm_90 check compiles them."""
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    R, S_ = cfg["R"], cfg["NUM_SPLITS"]
    common = dict(GROUP=Hq // Hkv, NUM_SPLITS=S_, MIN_CHUNK=cfg["MIN_CHUNK"], BLOCK_R=cfg["BLOCK_R"],
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"])
    out_ = [(_tree_attention_kernel, cfg["grid"], (
        q, k_cache, v_cache, prefix_len, mask_u8, out, part_acc, part_m, part_l,
        scale, T, mask_u8.shape[2], R, Hkv, D,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mask_u8.stride(), *out.stride(),
    ), dict(common, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=cfg["num_warps"],
            num_stages=2))]
    if S_ > 1:
        out_.append((_tree_attention_merge_kernel, cfg["grid"][:2], (
            prefix_len, out, part_acc, part_m, part_l, R, Hkv, D, *out.stride(),
        ), dict(common, num_warps=4)))
    return out_


def _partials(cfg, B, Hkv, device):
    S_, R = cfg["NUM_SPLITS"], cfg["R"]
    part_acc = torch.empty((S_, B * Hkv, R, cfg["BLOCK_D"]), device=device, dtype=torch.float32)
    part_m = torch.empty((S_, B * Hkv, R), device=device, dtype=torch.float32)
    return part_acc, part_m, torch.empty_like(part_m)


@register_op("tree_attention", fake=_tree_attention_fake)
def _tree_attention_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    _check(q, k_cache, v_cache, prefix_len, tree_mask, num_splits)
    B, T, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    cfg = _plan(q, k_cache, tree_mask.shape[2], num_splits)
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * _LOG2E
    out = torch.empty_like(q)
    mask_u8 = tree_mask.view(torch.uint8)  # same bytes; a plain integer pointer on every Triton version
    parts = _partials(cfg, B, Hkv, q.device) if cfg["NUM_SPLITS"] > 1 else (out, out, out)  # unused at 1 split
    for kernel, grid, args, kwargs in _launches(q, k_cache, v_cache, prefix_len, mask_u8, out, *parts, scale, cfg):
        launch(kernel, grid)(*args, **kwargs)
    return out


def compile_cases(quick: bool):
    """The sm_90 compile check's launches (``scripts/compile_sm90.py``): Llama-2-7B (32/32 heads) and Llama-3-8B
    (32/8) attention, head dim 128 (and 64), at the runtime's uses: verify of a 61- (and 129-) token tree, a
    draft step (10 frontier tokens over 60 tree slots), the head's re-read of an 8-token path, plain decode (and
    a 512-token prefill), batch 1 and 16, a ``[2L, B, Hkv, S, D]`` cache plane. Yields ``(name, kernel, grid,
    args, kwargs)`` built by the launcher's own :func:`attention_plan` and :func:`_launches` on meta tensors."""
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    uses = [("verify61", 61, 61), ("draft10", 10, 60), ("decode1", 1, 1)]
    if not quick:
        uses += [("verify129", 129, 129), ("reread8", 8, 8), ("prefill512", 512, 512)]
    for dtype in dtypes:
        for D in ([128] if quick else [128, 64]):
            for model, Hq, Hkv in (("L2-7B", 32, 32), ("L3-8B", 32, 8)):
                for use, T, M in uses:
                    for B in ([1] if quick else [1, 16]):
                        S = 4096
                        q = torch.empty((B, T, Hq, D), dtype=dtype, device="meta")
                        cache = torch.empty((64, B, Hkv, S, D), dtype=dtype, device="meta")
                        cfg = attention_plan(B, T, Hq, Hkv, D, S, M, dtype, 132)
                        mask = torch.empty((B, T, M), dtype=torch.uint8, device="meta")
                        prefix = torch.empty((B,), dtype=torch.int64, device="meta")
                        parts = _partials(cfg, B, Hkv, "meta")
                        out = torch.empty_like(q)
                        name = f"{str(dtype)[6:]} D{D} {model} {use} B{B}"
                        for kernel, grid, args, kwargs in _launches(q, cache[0], cache[1], prefix, mask, out, *parts,
                                                                    0.125, cfg):
                            yield name, kernel, grid, args, kwargs


def tree_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_len: torch.Tensor,
    tree_mask: torch.Tensor,
    sm_scale: float | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Attention of ``T`` new tokens over a cached prefix plus tree-masked slots; see the module docstring.

    Args:
        q: ``[B, T, Hq, D]`` float16/bfloat16/float32 queries (already rotated), any strides.
        k_cache, v_cache: ``[B, Hkv, S, D]``, same dtype; ``Hq % Hkv == 0``, query head ``h`` reads KV head
            ``h // (Hq // Hkv)``. The tree tokens' K/V must already sit at slots ``prefix_len[b] + m``.
        prefix_len: ``[B]`` int32/int64 on the same device, ``prefix_len[b] + M <= S`` (not checked: no sync).
        tree_mask: ``[B, T, M]`` bool, the tree columns only (drawn in the module docstring).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        num_splits: maximum split-K factor over the prefix; default: one wave of programs (see
            :func:`attention_plan`), chunks of at least ``MIN_CHUNK`` slots.

    Returns:
        ``[B, T, Hq, D]`` in ``q.dtype``, accumulated in float32; zeros for a query that sees no slot.
    """
    return _tree_attention_op(q, k_cache, v_cache, prefix_len, tree_mask, sm_scale, num_splits)
