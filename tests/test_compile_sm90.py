"""The offline sm_90 compile check (scripts/compile_sm90.py) runs, covers every kernel, and fails when it should.

It runs in a subprocess: the check needs real Triton JIT functions, and this test process has the interpreter on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "compile_sm90.py"


def _env():
    path = [str(ROOT / "python"), str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=_env(), cwd=ROOT,
                          timeout=600)


def test_every_kernel_has_a_case_and_a_missing_one_fails():
    # one process, two runs of main(): as shipped, then with the KV-compaction cases removed
    code = ("import runpy, sys; m = runpy.run_path(sys.argv[1]); rc = m['main'](['--list', '--quick']);"
            "print('RC', rc, flush=True); m['FALLBACK'].pop('kv_compact'); sys.exit(m['main'](['--list', '--quick']))")
    r = subprocess.run([sys.executable, "-c", code, str(SCRIPT)], capture_output=True, text=True, cwd=ROOT,
                       env=_env(), timeout=600)
    first, _, second = r.stdout.partition("RC 0\n")
    assert second, "the shipped cases should pass: " + r.stdout[-2000:] + r.stderr[-2000:]
    assert "kernels without a case: none" in first
    for kernel in ("_tree_attention_kernel", "_tree_attention_merge_kernel", "_moe_gate_up_kernel",
                   "_moe_down_kernel", "_kv_compact_kernel", "_summary_kernel", "_walk_kernel",
                   "_topk_partial_kernel", "_topk_select_kernel", "_add_rms_norm_kernel", "_rope_kv_write_kernel",
                   "_silu_mul_kernel"):
        assert kernel in first
    assert r.returncode == 1 and "_kv_compact_kernel" in r.stderr, r.stdout[-1000:] + r.stderr[-1000:]


def test_compiles_for_sm90(tmp_path):
    out = tmp_path / "sm90.json"
    r = _run("--quick", "--only", "kv_compact|merge.*L2-7B decode1", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 3 and all(r["ok"] for r in rows)
    assert {r["kernel"] for r in rows} == {"_kv_compact_kernel", "_tree_attention_merge_kernel"}
    for r in rows:
        if "regs" in r:  # ptxas -v ran
            assert r["regs"] > 0 and r["spill_st"] == 0
