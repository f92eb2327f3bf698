"""The embedded demo pair (loads, agrees with transformers, speculates exactly), the target trainer, and the
MT-bench speed benchmark (its JSON holds every field it prints)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eagle_runtime import EagleModel, load_head, load_target
from eagle_runtime.demo import build_info, demo_paths, demo_tree

from conftest import CORPUS, ROOT, require

BENCH = ROOT / "benchmarks" / "mtbench_speed.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("mtbench_speed", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------------------
# The demo pair
# ----------------------------------------------------------------------------------------------------------------
def test_demo_pair_is_small_and_described():
    target, head = demo_paths()
    size = sum(f.stat().st_size for d in (target, head) for f in d.iterdir())
    assert size <= 15 * 2**20, f"demo pair is {size / 2**20:.1f} MiB, over the 15 MiB budget"
    info = build_info()
    for key in ("target", "head", "tree", "tau"):
        assert key in info, f"BUILD.json lacks {key!r}"
    assert info["target"]["heldout_loss"] > 0 and 0 < info["head"]["heldout_top1_accuracy"] <= 1


@torch.no_grad()
def test_demo_target_matches_transformers():
    from transformers import AutoModelForCausalLM

    target_dir, head_dir = demo_paths()
    ours = load_target(target_dir)
    assert ours.cfg.num_layers >= 12, "the demo target must be much deeper than its 1-layer head"
    hf = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float64).eval()
    tokens = torch.randint(3, ours.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    ref = hf(tokens).logits
    hf32 = hf.to(torch.float32)
    err_hf = (hf32(tokens).logits.double() - ref).abs().max().item()
    err_ours = (ours.logits(ours.forward_causal(tokens)).double() - ref).abs().max().item()
    assert err_ours <= 2 * err_hf + 1e-5, f"ours {err_ours:.2e} vs transformers fp32 {err_hf:.2e} (fp64 reference)"
    load_head(head_dir, ours)  # the head fits its target


def test_demo_speculation_is_exact_at_temperature_0():
    target, head = demo_paths()
    model = EagleModel.from_pretrained(target, head, tree=demo_tree(), backend="torch")
    prompt = "Once upon a time, there was a little"
    plain = model.generate(prompt, 32, speculative=False)
    spec = model.generate(prompt, 32)
    assert spec.tokens == plain.tokens
    assert spec.tau > 1.0, "the trained head should get some drafts accepted"


# ----------------------------------------------------------------------------------------------------------------
# The target trainer
# ----------------------------------------------------------------------------------------------------------------
def test_train_target_writes_a_checkpoint_transformers_loads(tmp_path, lm, lm_dir, lm_corpus):
    """stories260k's tokenizer on the shared TinyStories files, or the demo's on its own 60 stories (the last 20
    held out, the other 40 trained on: train_target drops held-out stories from the training files)."""
    from eagle_runtime.train.target import TargetConfig, train_target

    val = lm_corpus
    extra = require(CORPUS / "tinystories_extra.txt") if lm == "stories260k" else lm_corpus
    cfg = TargetConfig(dim=32, layers=2, heads=4, kv_heads=2, intermediate=64, max_position_embeddings=64, seq_len=32,
                       batch_size=4, steps=6, warmup=2, eval_every=3, eval_tokens=256, heldout_stories=20,
                       train_files=[str(val)], heldout_file=str(extra))
    m = train_target(cfg, tmp_path / "t", lm_dir, progress=False)
    assert m["steps_done"] == 6 and m["heldout_loss"] < 6.5  # below uniform over 512 tokens (6.24) + noise
    assert m["hf_max_abs_logit_diff"] < 1e-4
    names = {f.name for f in (tmp_path / "t").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    from safetensors import safe_open

    with safe_open(str(tmp_path / "t" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"} <= keys


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def test_builtin_questions_cover_every_category():
    bench = _bench_module()
    qs, source = bench.load_questions(None, 8)
    assert source == "built-in"
    assert [q["category"] for q in qs] == bench.CATEGORIES
    assert all(len(q["turns"]) == 2 for q in qs)


@pytest.mark.parametrize("device,want", [("cpu", torch.float32), ("cuda", torch.bfloat16),
                                          ("cuda:1", torch.bfloat16), (torch.device("cpu"), torch.float32)],
                         ids=["cpu", "gpu", "gpu1", "cpu_device"])  # no "cuda" in ids: conftest would skip them
def test_dtype_defaults_to_the_apis_choice_per_device(device, want):
    """Issue 24 item 2: no --dtype is bf16 on CUDA and fp32 on CPU, as EagleModel.from_pretrained(dtype=None)."""
    bench = _bench_module()
    assert bench.resolve_dtype(None, device) is want
    assert bench.resolve_dtype("float16", device) is torch.float16  # an explicit --dtype wins


def test_agreement_counts_identical_outputs_and_the_common_prefix():
    """Issue 24 item 11: bf16 equality is a fraction and a prefix length, not one boolean."""
    bench = _bench_module()
    a = bench.agreement([([1, 2, 3], [1, 2, 3]), ([1, 5], [1, 2, 4]), ([7], [8, 9])])
    assert a == {"identical": 1, "total": 3, "all": False, "fraction": 1 / 3, "mean_common_prefix": 4 / 3}
    assert bench.agreement([([1, 2], [1, 2, 3])])["mean_common_prefix"] == 2  # a prefix of the other: its length
    assert bench.agreement([])["fraction"] is None
    line = bench.agreement_line(a, "bfloat16")
    assert "1/3" in line and "0.333" in line and "token identity is claimed in float32 only" in line
    assert "float32 only" not in bench.agreement_line(a, "float32")


def test_benchmark_json_holds_every_printed_field(tmp_path):
    out = tmp_path / "res"
    # --threads 1: on a shared 2-core machine the default (one per core) ran past the 300 s limit; 1 thread: 50 s
    cmd = [sys.executable, str(BENCH), "--num-questions", "2", "--max-new-tokens", "16", "--threads", "1",
           "--out", str(out)]
    env = dict(os.environ, EAGLE_RUNTIME_CACHE=str(tmp_path / "cache"))  # tree="auto" caches its cost model
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jsons = list(out.glob("mtbench_*.json"))
    assert len(jsons) == 1 and jsons[0].with_suffix(".png").is_file()
    res = json.loads(jsons[0].read_text())
    bench = _bench_module()
    lines = proc.stdout.splitlines()

    # Table headers name JSON keys; scalar lines are "key: value" with key in the JSON.
    assert sum(line.split() == bench.SUMMARY_COLUMNS for line in lines) == 2
    assert sum(line.split() == bench.CATEGORY_COLUMNS for line in lines) == 2
    for entry in res["results"].values():
        for row in entry["summary"].values():
            assert set(bench.SUMMARY_COLUMNS) <= set(row)
        for row in entry["per_category"].values():
            assert set(bench.CATEGORY_COLUMNS) <= set(row)
        assert entry["summary"]["eagle"]["accept_histogram"]
    zero = res["results"]["0"]
    assert zero["eagle_identical_to_plain"]["all"], zero["eagle_identical_to_plain"]
    assert zero["eagle_identical_to_plain"]["fraction"] == 1.0 and zero["eagle_identical_to_plain"]["token_identity_expected"]
    assert zero["eagle_identical_to_plain"]["mean_common_prefix"] > 0
    assert res["config"]["dtype"] == "float32" and res["config"]["dtype_source"] == "default for cpu"
    assert any(line.startswith("device:") and "dtype: float32 (default for cpu)" in line for line in lines)
    assert zero["eagle_identical_to_plain"]["total"] == 4  # 2 questions x 2 turns
    for key in ("device", "benchmark_wall_s"):
        assert key in res
    for key in ("backend", "dtype", "threads", "tree", "prompts_truncated", "num_questions", "max_new_tokens"):
        assert key in res["config"]
    printed_keys = {m.split(":")[0] for m in lines if ": " in m and not m.startswith(("device", "questions", "=="))}
    known = {"accept_histogram (eagle)", "trees (eagle)", "eagle_identical_to_plain", "hf_identical_to_plain",
             "benchmark_wall_s"}
    assert printed_keys <= known, printed_keys - known
    assert "hf_identical_to_plain" in zero and "benchmark_wall_s" in res


def test_cpu_cycle_phases_accounts_for_the_cycle(tmp_path):
    """benchmarks/cpu_cycle_phases.py: the phases it times lie inside the cycle and the result file is written."""
    import importlib.util

    from eagle_runtime.demo import DEMO_DIR

    require(DEMO_DIR / "head" / "config.json")
    spec = importlib.util.spec_from_file_location("cpu_cycle_phases", ROOT / "benchmarks" / "cpu_cycle_phases.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--num-questions", "1", "--max-new-tokens", "12", "--tree", "6,2,2", "--threads", "1",
                      "--layer-reps", "5", "--out", str(tmp_path)])
    ph = res["phases_ms_per_cycle"]
    assert res["cycles"] >= 2 and 1.0 <= res["tau"] <= 4.0  # depth 2 + 1: at most 3 drafts + the bonus token
    assert all(v >= 0 for k, v in ph.items() if k != "rest") and ph["rest"] > -0.05 * res["cycle_ms"]
    assert ph["head_step"] + ph["topk_expand"] <= ph["draft"] * 1.001
    assert ph["draft"] + ph["verify"] + ph["accept"] + ph["kv_compact"] <= res["cycle_ms"] * 1.001
    assert res["calls_per_cycle"]["verify"] == 1 and res["calls_per_cycle"]["head_step"] == 2
    assert set(res["layer"]) == {"1", "7"}  # a plain step and a 7-node verification (6 drafts + root)
    for lay in res["layer"].values():
        assert lay["layer_us"] > 0 and all(v > 0 for v in lay["pieces_us"].values())
    files = list(tmp_path.glob("cpu_cycle_phases_*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["cycles"] == res["cycles"]
    import eagle_runtime.decoder as G
    from eagle_runtime.drafter import target_states

    assert G.target_states is target_states  # the wrapped module function is put back
