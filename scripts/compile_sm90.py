#!/usr/bin/env python
"""Offline sm_90 (H100/H200) compile check of every Triton kernel in eagle_kernels, no GPU needed.

    python scripts/compile_sm90.py --quick            # CI: bf16, the decode/verify launches of each kernel
    python scripts/compile_sm90.py [--md OUT.md] [--json OUT.json] [--only REGEX] [--list]

Each launch case is compiled for ``GPUTarget("cuda", 90, 32)`` with Triton's whole pipeline (TTIR -> TTGIR ->
LLVM -> PTX -> cubin through the bundled ptxas), from the exact arguments the launcher passes: meta tensors carry
the real shapes and strides, so Triton's integer specialisation (``== 1``, ``% 16``) and pointer alignment are
the real ones. Registers and spills come from re-running the bundled ``ptxas -v`` on the PTX (a compiled kernel
only knows them once a driver loads it). The exit status is 1 when a case fails to compile or a kernel has no
case.

How a kernel joins the check: its module in ``eagle_kernels`` defines ``compile_cases(quick: bool)`` yielding
``(name, kernel, grid, args, kwargs)`` for the launches the runtime makes (the model shapes of Llama-2-7B,
Llama-3-8B, Mixtral-8x7B), built with the launcher's own configuration and launch-list functions on meta tensors
so the check cannot drift from the launcher (see ``tree_attention.compile_cases`` and ``moe.compile_cases``).
Every ``@triton.jit`` function named ``*_kernel`` in ``eagle_kernels`` must be covered by some case, or the
check fails. Modules without ``compile_cases`` yet (top-k expansion, KV compaction) are covered by the
generators at the end of this file, which restate their launchers' CUDA-branch block choices.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # must precede `import triton`: real JITFunctions, not the interpreter
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "eagle-sm90-cache"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is what a launch uses

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import eagle_kernels  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # compute capability 9.0, warp size 32
BACKEND = make_backend(TARGET)
H100_SMS = 132
REGS_PER_SM, SMEM_PER_SM, MAX_CTAS_PER_SM = 65536, 227 * 1024, 32


# ------------------------------------------------------------------------------------------------------------
# discovery
# ------------------------------------------------------------------------------------------------------------
def kernel_modules():
    """Every module of eagle_kernels that defines a Triton kernel: ``{name: module}``."""
    mods = {}
    for info in pkgutil.iter_modules(eagle_kernels.__path__):
        if info.name.startswith("_C"):
            continue
        mod = importlib.import_module(f"eagle_kernels.{info.name}")
        if any(isinstance(v, JITFunction) for v in vars(mod).values()):
            mods[info.name] = mod
    return mods


def all_kernels(mods) -> dict[str, JITFunction]:
    """The launchable kernels: module-level ``@triton.jit`` functions named ``*_kernel``."""
    return {f"{name}.{k}": v for name, mod in mods.items() for k, v in vars(mod).items()
            if isinstance(v, JITFunction) and k.endswith("_kernel") and v.__module__ == mod.__name__}


def all_cases(mods, quick: bool):
    for name, mod in sorted(mods.items()):
        gen = getattr(mod, "compile_cases", None) or FALLBACK.get(name)
        if gen is None:
            continue
        for case in gen(quick):
            yield (name, *case)


# ------------------------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------------------------
def bind(kernel, args, kwargs):
    """Triton's own specialisation of ``kernel[grid](*args, **kwargs)``: (options, signature, constexprs, attrs)."""
    binder = create_function_from_signature(kernel.signature, kernel.params, BACKEND)
    bound, spec, opts = binder(*args, **kwargs)
    return kernel._pack_args(BACKEND, kwargs, bound, spec, opts)


def ptxas_stats(ptx: str) -> dict:
    """Registers, spill stores/loads and stack bytes from the bundled ptxas ``-v`` (``{}`` without ptxas)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path if callable(get_ptxas) else None
    except (ImportError, RuntimeError, TypeError):
        ptxas = None
    if not ptxas or not os.path.exists(ptxas):
        return {}
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        r = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    out = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack"], out["spill_st"], out["spill_ld"] = map(int, m.groups())
    return out


def occupancy(regs: int | None, warps: int, smem: int) -> int | None:
    """CTAs per SM from registers (8-register granularity per thread), shared memory and threads."""
    if regs is None:
        return None
    threads = 32 * warps
    by_regs = REGS_PER_SM // max(((regs + 7) // 8) * 8 * threads, 1)
    by_smem = SMEM_PER_SM // smem if smem else MAX_CTAS_PER_SM
    return max(0, min(by_regs, by_smem, 2048 // threads, MAX_CTAS_PER_SM))


def compile_case(kernel, args, kwargs) -> dict:
    options, sig, constexprs, attrs = bind(kernel, args, kwargs)
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=TARGET, options=options.__dict__)
    secs = time.perf_counter() - t0
    ptx = ck.asm["ptx"]
    res = {"ok": True, "secs": round(secs, 2), "shared": ck.metadata.shared, **ptxas_stats(ptx),
           "mma": "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "-"),
           "i64_args": [k for k, v in sig.items() if v == "i64"]}
    res["ctas_per_sm"] = occupancy(res.get("regs"), kwargs.get("num_warps", 4), res["shared"])
    return res


def spec_key(kernel, args, kwargs) -> str:
    options, sig, constexprs, attrs = bind(kernel, args, kwargs)
    return repr((kernel.__name__, sorted(sig.items()), sorted(constexprs.items(), key=str), sorted(attrs.items()),
                 sorted(options.__dict__.items(), key=str)))


def _write_atomic(path: str, text: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the CI matrix: bf16, decode/verify launches")
    ap.add_argument("--only", default=None, help="regex on the case name")
    ap.add_argument("--list", action="store_true", help="list the cases and the kernel coverage; compile nothing")
    ap.add_argument("--md", default=None, help="write the markdown table here")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    a = ap.parse_args(argv)
    try:
        only = re.compile(a.only) if a.only else None
    except re.error as e:
        print(f"error: --only is not a valid regex: {e}", file=sys.stderr)
        return 2

    mods = kernel_modules()
    kernels = all_kernels(mods)
    rows, seen, covered = [], {}, set()
    for mod_name, name, kernel, grid, args, kwargs in all_cases(mods, a.quick):
        covered.add(f"{mod_name}.{kernel.__name__}")
        name = f"{kernel.__name__} {name}"
        if only and not only.search(name):
            continue
        row = {"case": name, "kernel": kernel.__name__, "grid": list(grid), "warps": kwargs.get("num_warps", 4),
               "stages": kwargs.get("num_stages", 3),
               "constexprs": {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}}
        if a.list:
            rows.append(row)
            print(f"{name}  grid={tuple(grid)}  {row['constexprs']}")
            continue
        key = spec_key(kernel, args, kwargs)
        if key in seen:
            rows.append({**seen[key], **row, "same_as": seen[key]["case"]})
            continue
        try:
            row.update(compile_case(kernel, args, kwargs))
        except Exception as e:  # noqa: BLE001 - a compile failure is this script's result
            row.update(ok=False, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
        seen[key] = row
        rows.append(row)
        if row["ok"]:
            print(f"OK   {name:60s} regs={row.get('regs')} spill={row.get('spill_st')}/{row.get('spill_ld')} "
                  f"smem={row['shared']} ctas/SM={row['ctas_per_sm']} {row['mma']} {row['secs']}s", flush=True)
        else:
            print(f"FAIL {name:60s} {row['error']}", flush=True)

    missing = sorted(set(kernels) - covered)
    failed = [r for r in rows if r.get("ok") is False]
    lines = ["| case | grid | warps/stages | constexprs | regs | spill st/ld (B) | smem (B) | CTAs/SM | MMA | s |",
             "|" + "---|" * 10]
    for r in rows:
        if a.list or "same_as" in r:
            continue
        ce = ", ".join(f"{k}={v}" for k, v in r["constexprs"].items())
        if r["ok"]:
            lines.append(f"| {r['case']} | {tuple(r['grid'])} | {r['warps']}/{r['stages']} | {ce} | {r.get('regs')} | "
                         f"{r.get('spill_st')}/{r.get('spill_ld')} | {r['shared']} | {r['ctas_per_sm']} | {r['mma']} | "
                         f"{r['secs']} |")
        else:
            lines.append(f"| {r['case']} | {tuple(r['grid'])} | {r['warps']}/{r['stages']} | {ce} | **failed**: "
                         f"{r['error'][:150]} | | | | | |")
    n_distinct = sum(1 for r in rows if "same_as" not in r)
    summary = (f"{len(rows)} launch cases" + ("" if a.list else f", {n_distinct} distinct specialisations, "
               f"{len(failed)} failed to compile for sm_90") + f"; kernels without a case: {missing or 'none'}")
    if not a.list:
        print("\n".join(lines))
    print(summary)
    if a.md:
        _write_atomic(a.md, "\n".join(lines + ["", summary]) + "\n")
    if a.json:
        _write_atomic(a.json, json.dumps({"target": "sm_90", "triton": triton.__version__, "rows": rows,
                                          "missing": missing}, indent=1, default=str) + "\n")
    if missing:
        print(f"error: no compile case for {missing}: define compile_cases(quick) in the kernel's module",
              file=sys.stderr)
    return 1 if (failed or missing) else 0


# ------------------------------------------------------------------------------------------------------------
# cases of the modules that do not define compile_cases yet: restated from their launchers' CUDA branches
# ------------------------------------------------------------------------------------------------------------
def _meta(shape, dtype):
    return torch.empty(shape, dtype=dtype, device="meta")


def _topk_cases(quick: bool):
    """topk_expand._topk_expand_op (CUDA branch): splits = clamp(ceil(2 * SMs / (B * N)), 1, V // 2048,
    16384 // (N_PAD * K_PAD)), chunk rounded to 64, BLOCK_V 1024; then one select program per sequence."""
    from eagle_kernels import topk_expand as m

    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    for dtype in dtypes:
        for V in ([32000] if quick else [32000, 128256]):
            for N, k in ([(1, 10), (10, 10)] if quick else [(1, 10), (10, 10), (1, 4), (8, 4), (64, 16)]):
                for B in ([1] if quick else [1, 16]):
                    K_PAD, N_PAD = triton.next_power_of_2(k), triton.next_power_of_2(N)
                    splits = max(1, min(triton.cdiv(2 * H100_SMS, B * N), V // 2048, 16384 // (N_PAD * K_PAD)))
                    chunk = triton.cdiv(triton.cdiv(V, splits), 64) * 64
                    splits = triton.cdiv(V, chunk)
                    logits = _meta((B, N, V), dtype)
                    pv = _meta((B * N * splits * k,), torch.float32)
                    pi = _meta((B * N * splits * k,), torch.int32)
                    pm = _meta((B * N * splits,), torch.float32)
                    name = f"{str(dtype)[6:]} V{V} N{N} k{k} B{B}"
                    yield (name, m._topk_partial_kernel, (B * N, splits),
                           (logits, pv, pi, pm, pm, N, V, chunk, splits, *logits.stride()),
                           dict(K=k, K_PAD=K_PAD, BLOCK_V=1024, num_warps=4))
                    parent = _meta((B, N), torch.float32)
                    ct, cs = _meta((B, N, k), torch.int64), _meta((B, N, k), torch.float32)
                    ts, ti = _meta((B, k), torch.float32), _meta((B, k), torch.int64)
                    yield (name, m._topk_select_kernel, (B,),
                           (pv, pi, pm, pm, parent, pi, ct, cs, ts, ti, ti, ti, N, V, splits, k, *parent.stride()),
                           dict(K=k, K_PAD=K_PAD, N_PAD=N_PAD, C_PAD=triton.next_power_of_2(splits * k),
                                S_PAD=triton.next_power_of_2(splits), HAS_MAP=False, num_warps=4))


def _kv_compact_cases(quick: bool):
    """kv_compact._kv_compact_op: one program per (plane, sequence, head), T_PAD/BLOCK_D powers of two."""
    from eagle_kernels import kv_compact as m

    for dtype in ([torch.bfloat16] if quick else [torch.bfloat16, torch.float32]):
        for Hkv in (32, 8):
            for T in ([61] if quick else [61, 129]):
                B, D = 1, 128
                cache = _meta((64, B, Hkv, 4096, D), dtype)
                path, n = _meta((B, T), torch.int64), _meta((B,), torch.int64)
                T_PAD = triton.next_power_of_2(T)
                yield (f"{str(dtype)[6:]} H{Hkv} T{T}", m._kv_compact_kernel, (64 * B * Hkv,),
                       (cache, n, path, n, B, Hkv, D, *cache.stride(), *path.stride()),
                       dict(T_PAD=T_PAD, BLOCK_D=D, num_warps=4 if T_PAD * D <= 4096 else 8))


FALLBACK = {"topk_expand": _topk_cases, "kv_compact": _kv_compact_cases}

if __name__ == "__main__":
    sys.exit(main())
