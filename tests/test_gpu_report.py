"""benchmarks/gpu_report.py --dry-run: the GPU report's code paths at tiny shapes on CPU, so the script cannot rot."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"


def test_dry_run_writes_the_report(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]), OMP_NUM_THREADS="1")
    # the pytest step is skipped here (CI runs the full dry run, pytest inside pytest only costs time)
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--skip", "tests", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (js,) = tmp_path.glob("*.json")
    assert js.with_suffix(".md").is_file() and not list(tmp_path.glob(".*")), "written atomically, no temp left"
    rep = json.loads(js.read_text())
    for key in ("device", "plain_step_ms", "plain_roofline_fraction", "cycle_ms", "cycle_over_plain", "kernels",
                "cycle", "versions", "steps"):
        assert key in rep, key
    assert rep["dry_run"] and rep["plain_step_ms"] > 0 and rep["cycle_ms"] > 0
    assert abs(rep["cycle_over_plain"] - rep["cycle_ms"] / rep["plain_step_ms"]) < 1e-9
    assert [s["step"] for s in rep["steps"]] == ["kernels", "cycle"] and all(s["ok"] for s in rep["steps"])
    reports = {k["report"] for k in rep["kernels"]}
    assert {"tree_attention", "topk_expand", "kv_compact", "moe_experts"} <= reports
    impls = {(k["report"], k["impl"]) for k in rep["kernels"]}
    assert ("tree_attention", "triton") in impls and ("tree_attention", "sdpa_mask") in impls
    (c,) = rep["cycle"]
    assert c["label"] == "llama2-7b" and c["model"] == "tiny" and len(c["rows"]) == 2
    assert [b["batch"] for b in c["plain_step_by_batch"]] == [1, 2]
    md = js.with_suffix(".md").read_text()
    assert "## Cycle breakdown" in md and "## Kernel: tree_attention" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_a_real_run_without_a_gpu(tmp_path, capsys):
    mod = runpy.run_path(str(SCRIPT))
    assert mod["main"](["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err and not list(tmp_path.iterdir())
