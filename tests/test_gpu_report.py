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


def _run(args, tmp_path, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=timeout)


def test_dry_run_within_a_budget_writes_every_part_it_reached(tmp_path):
    """A cut run loses nothing: parts reached are written (atomically, after each part), the rest recorded as
    skipped with the reason, and the run exits 0."""
    out = tmp_path / "report"
    r = _run(["--dry-run", "--budget-s", "30", "--skip", "tests", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and not [f for f in files if f.startswith(".")], files
    (js,) = out.glob("*.json")
    assert js.with_suffix(".md").is_file()
    rep = json.loads(js.read_text())
    status = rep["status"]
    assert [p["name"] for p in rep["plan"]] == list(status), "every planned part has a status, in plan order"
    assert status["env"]["status"] == "ok" and status["tests"]["status"] == "not selected"
    done = [k for k, v in status.items() if v["status"] == "ok"]
    skipped = [k for k, v in status.items() if v["status"] == "skipped"]
    assert done and skipped, status  # 30 s reaches some parts and not all of them on this machine
    assert all("budget" in status[k]["why"] for k in skipped)
    for k in done:
        assert k in rep["parts"], f"part {k} ran but its results were not written"
    assert rep["seconds"] <= 30 + 30, "a part may start with half its estimate left, no more"


def test_plan_lists_the_parts_in_order_of_value(tmp_path):
    r = _run(["--plan"], tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    names = [line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip() and not line.startswith("total")]
    assert names[:4] == ["env", "kernel_check", "generation", "tests"] and "kernels" == names[-1]


def test_out_never_defaults_into_the_source_tree(tmp_path):
    r = _run(["--dry-run", "--budget-s", "1", "--only", "env", "--out", str(ROOT / "benchmarks")], tmp_path)
    assert r.returncode == 2 and "source tree" in (r.stderr + r.stdout)


def test_tests_verdict_fails_when_every_graph_test_skips():
    mod = runpy.run_path(str(SCRIPT))
    verdict = mod["tests_verdict"]
    assert verdict({"passed": 3}, 0, ["passed", "skipped"], cuda=True)[0]
    ok, why = verdict({"skipped": 5}, 0, ["skipped"] * 5, cuda=True)
    assert not ok and "skipped" in why
    assert not verdict({"passed": 1}, 0, [], cuda=True)[0]
    assert not verdict({"failed": 1}, 1, ["passed"], cuda=True)[0]
    assert verdict({"skipped": 5}, 0, ["skipped"] * 5, cuda=False)[0], "without a GPU the graph tests must skip"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_a_real_run_without_a_gpu(tmp_path, capsys):
    mod = runpy.run_path(str(SCRIPT))
    assert mod["main"](["--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err and not list(tmp_path.iterdir())
