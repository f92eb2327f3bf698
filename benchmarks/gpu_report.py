#!/usr/bin/env python
"""One command for a GPU session: tests, kernel benchmarks, cycle breakdown, plain vs HF; one JSON + one summary.

    python benchmarks/gpu_report.py              # on one H100/H200: about 10-15 minutes, no network needed
    python benchmarks/gpu_report.py --dry-run    # the same code paths at tiny shapes on CPU (CI), about a minute

Steps (each is timed; a step that fails is recorded with its error and the others still run; exit status 1 then):

1. ``pytest -m cuda``: the tests that need a GPU.
2. Every kernel benchmark ``benchmarks/bench_*.py`` that reports through ``_bench_utils.report`` (tree attention
   vs SDPA with a mask, FlexAttention and flash-attn when installed; top-k expansion, acceptance, KV compaction,
   grouped MoE vs their PyTorch peers), run in this process; a new benchmark joins by calling ``report``.
3. The cycle breakdown (``cycle_breakdown.run_model``) at the Llama-2-7B and Llama-3-8B shapes in bf16 with
   random weights: plain step, draft / verify / accept+update / whole cycle, eager and as CUDA graphs, per prefix;
   plain decode step by batch size (for the choice of graph buckets); HF ``generate`` on the same weights.

Writes ``benchmarks/results/<gpu>-<date>.json`` (atomically) and ``.md`` next to it. The JSON's top level holds
``device``, ``plain_step_ms``, ``plain_roofline_fraction`` (weight bytes a step reads / measured copy bandwidth,
over the measured plain step), ``cycle_ms``, ``cycle_over_plain`` (Llama-2-7B at the first prefix, graphs when
they ran), ``hf_generate_tokens_per_s``; ``kernels`` (a row per kernel benchmark measurement), ``cycle``
(everything per model), ``tests`` and ``steps``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if not torch.cuda.is_available():  # CPU: kernels through the interpreter; must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "python")]

HEADLINE = ("llama2-7b", 0)  # (model, index of the prefix) whose numbers go to the JSON's top level


def _versions() -> dict:
    import triton
    import transformers

    v = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
         "cuda": torch.version.cuda or "none", "python": platform.python_version()}
    try:
        import flash_attn

        v["flash_attn"] = flash_attn.__version__
    except ImportError:
        v["flash_attn"] = None
    return v


def device_info() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"device": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}"}
    return {"device": platform.processor() or "cpu", "sms": None, "memory_gib": None, "capability": None}


# ----------------------------------------------------------------------------------------------------------------
def run_tests(dry_run: bool, timeout_s: int) -> dict:
    """``pytest -m cuda`` in a subprocess; the summary counts and the tail of the output."""
    files = ["tests/test_moe.py"] if dry_run else []  # dry run: one file, to exercise this path quickly
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout_s)
    out = r.stdout + r.stderr
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    return {"command": " ".join(cmd[1:]), "returncode": r.returncode, "counts": counts,
            "seconds": round(time.perf_counter() - t0, 1), "tail": out[-3000:],
            "ok": r.returncode in (0, 5) and not counts.get("failed") and not counts.get("error")
            and not counts.get("errors")}


def kernel_benchmarks(dry_run: bool, log) -> tuple[list[dict], list[dict]]:
    """Run every ``bench_*.py`` that reports through ``_bench_utils.report``; (rows, errors)."""
    import _bench_utils

    _bench_utils.SAVE = False  # this report is the only file written
    rows, errors = [], []
    for path in sorted(HERE.glob("bench_*.py")):
        if "report(" not in path.read_text():
            log(f"skip {path.name}: does not report through _bench_utils.report")
            continue
        start = len(_bench_utils.COLLECTED)
        argv = sys.argv
        sys.argv = [str(path)] + (["--quick"] if dry_run else [])
        t0 = time.perf_counter()
        try:
            runpy.run_path(str(path), run_name="__main__")
        except Exception as e:  # noqa: BLE001 - one benchmark's failure is recorded, the others still run
            errors.append({"bench": path.name, "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()[-2000:]})
            log(f"FAILED {path.name}: {type(e).__name__}: {e}")
        finally:
            sys.argv = argv
        for name, bench_rows in _bench_utils.COLLECTED[start:]:
            rows += [{"bench": path.stem, "report": name, **r} for r in bench_rows]
        log(f"{path.name}: {time.perf_counter() - t0:.1f} s")
    return rows, errors


def cycle(dry_run: bool, log) -> list[dict]:
    import cycle_breakdown as cb

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dry_run:
        plan = [("llama2-7b", "tiny")]
        dtype, prefixes, reps, batches = torch.float32, [32, 64], 2, [1, 2]
    else:
        plan = [("llama2-7b", "llama2-7b"), ("llama3-8b", "llama3-8b")]
        dtype, prefixes, reps, batches = torch.bfloat16, [512, 2048], 30, [1, 2, 3, 4, 6, 8, 12, 16]
    out = []
    for label, shape in plan:
        res = cb.run_model(shape, dtype, dev, prefixes, reps, graphs=True, log=log,
                           batches=batches if label == "llama2-7b" else ())
        out.append(dict(res, label=label))
    return out


# ----------------------------------------------------------------------------------------------------------------
def headline(cycles: list[dict]) -> dict:
    model, i = HEADLINE
    res = next((c for c in cycles if c["label"] == model), None)
    if res is None or len(res["rows"]) <= i:
        return {}
    r = res["rows"][i]
    plain = r.get("plain_decode_graph_ms", r["plain_decode_ms"])
    cyc = r.get("cycle_graph_ms", r["cycle_eager_ms"])
    return {"headline": f"{res['model']} {res['dtype']} prefix {r['prefix']}, graphs {'cycle_graph_ms' in r}",
            "plain_step_ms": plain, "plain_roofline_fraction": r.get("plain_roofline_fraction"), "cycle_ms": cyc,
            "cycle_over_plain": cyc / plain, "plain_tokens_per_s": 1e3 / plain,
            "hf_generate_tokens_per_s": r["hf_generate_tokens_per_s"]}


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(report: dict) -> str:
    L = [f"# GPU report: {report['device']} ({report['date']})", "",
         f"torch {report['versions']['torch']}, triton {report['versions']['triton']}, transformers "
         f"{report['versions']['transformers']}, CUDA {report['versions']['cuda']}, flash-attn "
         f"{report['versions']['flash_attn'] or 'not installed'}; dry run: {report['dry_run']}; "
         f"{report['seconds']:.0f} s in all.", ""]
    if "plain_step_ms" in report:
        L += [f"**{report['headline']}**: plain step {report['plain_step_ms']:.3f} ms "
              f"({_fmt(report['plain_roofline_fraction'])} of the copy-bandwidth roofline), cycle "
              f"{report['cycle_ms']:.3f} ms = {report['cycle_over_plain']:.2f} plain steps; plain "
              f"{report['plain_tokens_per_s']:.1f} tok/s vs HF generate "
              f"{report['hf_generate_tokens_per_s']:.1f} tok/s.",
              ""]
    L += ["## Steps", "", "| step | seconds | status |", "|---|---|---|"]
    L += [f"| {s['step']} | {s['seconds']:.1f} | {'ok' if s['ok'] else 'FAILED: ' + s.get('error', '')[:120]} |"
          for s in report["steps"]]
    if report.get("tests"):
        t = report["tests"]
        L += ["", f"## Tests (`{t['command']}`)", "", f"exit {t['returncode']}, {t['counts']}"]
    cols = ["prefix", "plain_decode_ms", "plain_decode_graph_ms", "plain_roofline_fraction", "draft_ms",
            "draft_graph_ms", "verify_ms", "verify_graph_ms", "accept_update_ms", "accept_update_graph_ms",
            "cycle_eager_ms", "cycle_graph_ms", "cycle_over_plain", "hf_generate_tokens_per_s"]
    for c in report.get("cycle", []):
        L += ["", f"## Cycle breakdown: {c['model']} ({c['dtype']}, backend {c['backend']}, graphs {c['graphs']})", "",
              "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        L += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in c["rows"]]
        if c.get("plain_step_by_batch"):
            L += ["", "| batch | plain step ms | ms per sequence | graph |", "|---|---|---|---|"]
            L += [f"| {r['batch']} | {r['plain_step_ms']:.4g} | {r['ms_per_sequence']:.4g} | {r['graph']} |"
                  for r in c["plain_step_by_batch"]]
    by_bench: dict[str, list[dict]] = {}
    for r in report.get("kernels", []):
        by_bench.setdefault(r["report"], []).append(r)
    for name, rows in by_bench.items():
        cols = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("bench", "report", "op")]
        L += ["", f"## Kernel: {name}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        L += ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows]
    for e in report.get("errors", []):
        L += ["", f"**error in {e.get('bench') or e.get('step')}**: {e['error']}"]
    return "\n".join(L) + "\n"


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (or any device): check the script")
    ap.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default benchmarks/results)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "kernels", "cycle"], help="steps to skip")
    ap.add_argument("--tests-timeout", type=int, default=480, help="seconds for the pytest step")
    a = ap.parse_args(argv)
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    info = device_info()
    date = datetime.date.today().isoformat()
    report: dict = {**info, "date": date, "dry_run": a.dry_run, "versions": _versions(), "steps": [], "errors": [],
                    "kernels": [], "cycle": [], "tests": None}
    steps = [("tests", lambda: report.update(tests=run_tests(a.dry_run, a.tests_timeout))),
             ("kernels", lambda: _kernels(report, a.dry_run, log)),
             ("cycle", lambda: report.update(cycle=cycle(a.dry_run, log)))]
    for name, fn in steps:
        if name in a.skip:
            continue
        log(f"step {name}")
        t0 = time.perf_counter()
        entry = {"step": name, "ok": True}
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a failed step is part of the report
            entry.update(ok=False, error=f"{type(e).__name__}: {e}")
            report["errors"].append({"step": name, "error": entry["error"],
                                     "traceback": traceback.format_exc()[-3000:]})
            log(f"step {name} FAILED: {entry['error']}")
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        if name == "tests" and report["tests"] is not None and not report["tests"]["ok"]:
            entry.update(ok=False, error=f"pytest exit {report['tests']['returncode']}, {report['tests']['counts']}")
        if name == "kernels" and report["errors"] and any("bench" in e for e in report["errors"]):
            entry.update(ok=False, error="; ".join(e["bench"] for e in report["errors"] if "bench" in e))
        report["steps"].append(entry)
    report.update(headline(report["cycle"]))
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    stem = re.sub(r"[^A-Za-z0-9.]+", "-", info["device"]).strip("-") + f"-{date}"
    write_atomic(a.out / f"{stem}.json", json.dumps(report, indent=1, default=str, allow_nan=True) + "\n")
    write_atomic(a.out / f"{stem}.md", markdown(report))
    log(f"wrote {a.out / stem}.json and .md")
    return 0 if all(s["ok"] for s in report["steps"]) else 1


def _kernels(report: dict, dry_run: bool, log) -> None:
    rows, errors = kernel_benchmarks(dry_run, log)
    report["kernels"] = rows
    report["errors"] += errors


if __name__ == "__main__":
    sys.exit(main())
