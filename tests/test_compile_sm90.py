"""The offline sm_90 compile check (scripts/compile_sm90.py) runs, covers every kernel, and fails when it should.

It runs in a subprocess: the check needs real Triton JIT functions, and this test process has the interpreter on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

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
    # one cheap case of each module, the acceptance pair included (its cases come from acceptance.compile_cases)
    out = tmp_path / "sm90.json"
    r = _run("--quick", "--only", "kv_compact|merge.*L2-7B decode1|silu_mul.*L2-7B decode1|"
             "add_rms_norm bfloat16 L2-7B decode1|rope.*L3-8B decode1|sample bfloat16 L2-7B", "--json", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 8 and all(r["ok"] for r in rows)
    assert {r["kernel"] for r in rows} == {"_kv_compact_kernel", "_tree_attention_merge_kernel", "_silu_mul_kernel",
                                           "_add_rms_norm_kernel", "_rope_kv_write_kernel", "_summary_kernel",
                                           "_walk_kernel"}
    for r in rows:
        if "regs" in r:  # ptxas -v ran
            assert r["regs"] > 0 and r["spill_st"] == 0


def test_module_cases_take_the_gpu_branch_of_the_launchers():
    """The cases are the launchers' own launch lists on meta tensors, so they get the GPU block choices (one row
    per program), not the interpreter's whole-pass programs; the full matrix adds fp16 and fp32."""
    from eagle_kernels import acceptance, fused_norm, rope_cache, silu_mul

    for mod in (fused_norm, rope_cache, silu_mul, acceptance):
        quick, full = list(mod.compile_cases(True)), list(mod.compile_cases(False))
        assert quick and {a.dtype for _, _, _, args, _ in quick for a in args[:1]} == {torch.bfloat16}
        assert {a.dtype for _, _, _, args, _ in full for a in args[:1]} == {torch.bfloat16, torch.float16,
                                                                             torch.float32}
        for name, kernel, grid, args, kwargs in full:
            assert any(kernel is v for v in vars(mod).values()) and all(g >= 1 for g in grid), name
            assert all(a.device.type == "meta" for a in args if isinstance(a, torch.Tensor)), name
    rows = {name: (grid, kw) for name, _, grid, _, kw in silu_mul.compile_cases(True)}
    assert rows["bfloat16 L2-7B verify61 B1"] == ((61, 11), dict(BLOCK_M=1, BLOCK_I=1024, num_warps=4))
    rows = {name: (grid, kw) for name, _, grid, _, kw in fused_norm.compile_cases(True)}
    assert rows["add_rms_norm bfloat16 L3-8B verify61 B1"][0] == (61,)
    assert rows["add_rms_norm bfloat16 L3-8B verify61 B1"][1]["BLOCK_M"] == 1
    rows = {name: (grid, kw) for name, _, grid, _, kw in rope_cache.compile_cases(True)}
    assert rows["bfloat16 L3-8B verify61 B1"] == ((61 * 40 // 8,), dict(HKV=8, BLOCK_R=8, BLOCK_HALF=64, num_warps=4))
    grids = [(k.__name__, g) for name, k, g, _, _ in acceptance.compile_cases(True) if "L3-8B verify61" in name]
    assert grids == [("_summary_kernel", (61, 1)), ("_walk_kernel", (1,))]
