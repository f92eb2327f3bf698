"""Shared helpers of the benchmarks: timing, copy-bandwidth roofline, result files keyed by device, and
:func:`save_json` (timestamped, atomic) for the end-to-end CPU benchmarks.

On CUDA: ``triton.testing.do_bench`` medians, or CUDA-graph replay timing for microsecond kernels (launch
overhead dominates those otherwise). On CPU (``--quick``) kernels run once under ``TRITON_INTERPRET=1`` to check
that the benchmark works; those timings mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def setup(description: str) -> argparse.Namespace:
    """Parse ``--quick``; on a machine without CUDA switch the Triton interpreter on (before triton is imported)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="tiny shapes; on CPU this is the only mode")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.quick = True
        print("note: no CUDA device; running tiny shapes under the Triton interpreter. CPU timings are meaningless.")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "python"))  # eagle_runtime (the atomic writer) from a checkout, no install needed
    return args


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_key() -> dict:
    import triton

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda or "none"}


def time_ms(fn, graph: bool = False) -> float:
    """Median milliseconds of ``fn()``; ``graph=True`` times the replay of a CUDA graph of ``fn``."""
    if not torch.cuda.is_available():
        fn()  # warm-up (interpreter setup)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return triton.testing.do_bench(g.replay, return_mode="median")
    return triton.testing.do_bench(fn, return_mode="median")


_COPY_GBS: float | None = None


def copy_bandwidth_gbs() -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second), the roofline used here."""
    global _COPY_GBS
    if _COPY_GBS is None:
        if not torch.cuda.is_available():
            _COPY_GBS = float("nan")
        else:
            n = 1 << 28  # 512 MiB of bf16 each way: far past L2
            a = torch.empty(n, device="cuda", dtype=torch.bfloat16)
            b = torch.empty_like(a)
            ms = time_ms(lambda: b.copy_(a))
            _COPY_GBS = 2 * a.numel() * a.element_size() / ms / 1e6
    return _COPY_GBS


def row(op: str, impl: str, shape: dict, ms: float, bytes_moved: float | None = None) -> dict:
    r = {"op": op, "impl": impl, **shape, "ms": round(ms, 5), "us": round(ms * 1e3, 2)}
    if bytes_moved is not None:
        gbs = bytes_moved / ms / 1e6
        r["GB/s"] = round(gbs, 1)
        r["frac_copy_bw"] = round(gbs / copy_bandwidth_gbs(), 3) if torch.cuda.is_available() else None
    return r


# benchmarks/gpu_report.py runs every bench_*.py in one process: it reads the rows each report() call collects
# here, and turns SAVE off so that a dry run writes only its own report.
COLLECTED: list[tuple[str, list[dict]]] = []
SAVE = True


def report(name: str, rows: list[dict]) -> None:
    """Print a table and save ``results/<name>__<device>__torch<ver>__triton<ver>.{csv,json}``."""
    COLLECTED.append((name, rows))
    key = device_key()
    cols = list(dict.fromkeys(c for r in rows for c in r))
    print(f"{name} on {key['device']} (torch {key['torch']}, triton {key['triton']}); "
          f"copy bandwidth {copy_bandwidth_gbs():.0f} GB/s")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")) for c in cols))
    if not SAVE:
        return
    from eagle_runtime.atomic import atomic_write, atomic_write_text  # after setup(): TRITON_INTERPRET is set

    RESULTS.mkdir(exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9.]+", "-", f"{key['device']}__torch{key['torch']}__triton{key['triton']}")
    stem = RESULTS / f"{name}__{tag}"

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)

    atomic_write(stem.with_suffix(".csv"), write_csv)
    atomic_write_text(stem.with_suffix(".json"), json.dumps({"meta": key, "copy_GBps": copy_bandwidth_gbs(),
                                                             "rows": rows}, indent=1, default=str))
    print(f"saved {stem}.csv/.json")


def save_json(out: str | Path, stem: str, res: dict) -> Path:
    """``res`` as ``<out>/<stem>_<UTC time>.json``, written atomically (``out`` is created); prints and returns it."""
    from eagle_runtime.atomic import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    atomic_write_text(path, json.dumps(res, indent=1))
    print(f"wrote {path}")
    return path
