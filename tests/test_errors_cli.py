"""Every promised bad-input error is one line on stderr with exit status 2, never a traceback: the ``generate``
command, the library errors behind it, and the MT-bench benchmark's arguments (checked before any model loads)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from eagle_runtime import EagleModel, DynamicTree, load_target, random_head, save_head
from eagle_runtime.cli import main
from eagle_runtime.loading import CheckpointError

from conftest import ROOT

BENCH = ROOT / "benchmarks" / "mtbench_speed.py"


def _cli(argv, capsys) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def _one_line_error(argv, capsys, match: str) -> str:
    rc, _, err = _cli(argv, capsys)
    assert rc == 2, (rc, err)
    lines = [line for line in err.splitlines() if not line.startswith("warning:")]  # e.g. the auto-backend note
    assert len(lines) == 1 and "error:" in lines[0], err
    assert match.lower() in err.lower(), err
    return err


@pytest.fixture
def model_copy(tmp_path, demo_target_dir):
    """A writable copy of the demo target to damage."""
    d = tmp_path / "model"
    shutil.copytree(demo_target_dir, d)
    return d


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory, demo_target_dir):
    d = tmp_path_factory.mktemp("head")
    save_head(random_head(load_target(demo_target_dir, max_len=128)), d)
    return d


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and configs
# ----------------------------------------------------------------------------------------------------------------
def test_truncated_safetensors(model_copy, capsys):
    f = model_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _one_line_error(["generate", "--base", model_copy, "--prompt", "Hi"], capsys, "cannot read weights")


def test_garbage_safetensors_header(model_copy, capsys):
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    _one_line_error(["generate", "--base", model_copy, "--prompt", "Hi"], capsys, "cannot read weights")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_bin(model_copy, capsys, damage):
    state = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    path = model_copy / "pytorch_model.bin"
    torch.save(state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x80\x02garbage" * 10)
    _one_line_error(["generate", "--base", model_copy, "--prompt", "Hi"], capsys, "cannot read weights")


def test_nan_weights(model_copy, capsys):
    state = load_file(str(model_copy / "model.safetensors"))
    key = next(k for k in state if k.endswith("q_proj.weight"))
    state[key][0, 0] = float("nan")
    save_file(state, str(model_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="NaN"):
        load_target(model_copy)
    _one_line_error(["generate", "--base", model_copy, "--prompt", "Hi"], capsys, f"{key} in")


@pytest.mark.parametrize("key", ["hidden_size", "vocab_size", "num_attention_heads"])
def test_config_missing_a_required_key(model_copy, capsys, key):
    cfg = json.loads((model_copy / "config.json").read_text())
    del cfg[key]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    _one_line_error(["generate", "--base", model_copy, "--prompt", "Hi"], capsys, key)


def test_config_not_json(model_copy, capsys):
    (model_copy / "config.json").write_text("{ not json")
    _one_line_error(["generate", "--base", model_copy, "--prompt", "Hi"], capsys, "not valid JSON")


def test_empty_base_does_not_load_the_current_directory(capsys):
    _one_line_error(["generate", "--base", "", "--prompt", "Hi"], capsys, "empty model path")


# ----------------------------------------------------------------------------------------------------------------
# Generation settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("total,depth", [(3, 3), (2, 5)])
def test_dynamic_tree_smaller_than_its_depth(demo_target_dir, head_dir, capsys, total, depth):
    with pytest.raises(ValueError, match="must exceed depth"):
        DynamicTree(total, depth, 2)
    DynamicTree(depth + 1, depth, 2)  # the smallest valid tree
    _one_line_error(["generate", "--base", demo_target_dir, "--draft", head_dir, "--prompt", "Hi", "--total-tokens", total,
                     "--depth", depth, "--top-k-draft", 2], capsys, "must exceed depth")


def test_smallest_dynamic_tree_generates_exactly(demo_target_dir):
    target = load_target(demo_target_dir, max_len=128)
    m = EagleModel(target, random_head(target), tree=DynamicTree(4, 3, 2), backend="torch")
    assert m.generate([1, 400, 20], 12).tokens == m.generate([1, 400, 20], 12, speculative=False).tokens


def test_top_k_draft_above_the_vocabulary(demo_target_dir, head_dir, capsys):
    _one_line_error(["generate", "--base", demo_target_dir, "--draft", head_dir, "--prompt", "Hi", "--top-k-draft", 600,
                     "--total-tokens", 601, "--depth", 1], capsys, "exceeds the vocabulary")


def test_cuda_device_without_cuda(demo_target_dir, capsys):
    dev = "cuda:99" if torch.cuda.is_available() else "cuda"
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--device", dev], capsys, "cuda")


def test_a_default_run_on_a_cpu_only_machine_prints_no_backend_warning(demo_target_dir, head_dir):
    """The cpu backend is simply the default where there is no GPU: a fresh process (a once-per-process note would
    show on every run) prints no warning about it. CUDA_VISIBLE_DEVICES="" makes the machine CPU-only even on a GPU
    host, and the PYTHONPATH leaves out the fake-CUDA site of the CI pass."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EAGLE_FAKE_CUDA_HOST")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "python"),
                                                                                           str(ROOT)]))
    r = subprocess.run([sys.executable, "-m", "eagle_runtime", "generate", "--base", str(demo_target_dir), "--draft",
                        str(head_dir), "--prompt", "Hi", "--max-new-tokens", "2"],  # the default backend is "auto"
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning" not in r.stderr.lower() and "cuda" not in r.stderr.lower(), r.stderr


@pytest.mark.parametrize("request_", [["--device", "cuda"], ["--backend", "triton"]], ids=["device", "backend"])
def test_an_explicit_gpu_request_on_a_cpu_only_machine_is_reported(demo_target_dir, capsys, monkeypatch, request_):
    """Asked for a GPU it cannot have, the command says so in one line (it does not quietly run on the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--max-new-tokens", 1, *request_], capsys,
                    "cuda")


@pytest.mark.parametrize("dev", ["banana", "tpu", "cuda:x"])
def test_unknown_device(demo_target_dir, capsys, dev):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--device", dev], capsys, "device")


@pytest.mark.parametrize("seed", [2**64, 2**63, -(2**63) - 1])
def test_seed_outside_64_bits(demo_target_dir, capsys, seed):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--seed", seed], capsys, "64-bit")


@pytest.mark.parametrize("max_len", [0, -5])
def test_nonpositive_max_len(demo_target_dir, capsys, max_len):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--max-len", max_len], capsys, "max-len")
    with pytest.raises(ValueError, match="max_len"):
        load_target(demo_target_dir, max_len=max_len)


def test_max_len_beyond_the_context_warns_in_one_line(demo_target_dir, capsys):
    ctx = json.loads((demo_target_dir / "config.json").read_text())["max_position_embeddings"]
    rc, out, err = _cli(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--max-len", ctx + 64,
                         "--max-new-tokens", 2], capsys)
    assert rc == 0 and "[0] Hi" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"exceeds the model's context of {ctx}" in warnings[0], err


@pytest.mark.parametrize("argv", [["--max-new-tokens", "abc"], ["--tree", "bushy"], ["--nope"]])
def test_argparse_errors_are_one_line(demo_target_dir, capsys, argv):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", *argv], capsys, "error")


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_temperature_not_finite_or_negative(demo_target_dir, capsys, value):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--temperature", value], capsys, "temperature")


def test_max_new_tokens_zero(demo_target_dir, capsys):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--max-new-tokens", 0], capsys, "max-new-tokens")


# Out-of-range and mistyped arguments (issue 31, item 5): one line that names the argument, never a raw TypeError
# from deep inside torch or a value silently truncated (top_k=2.5 ran as 2). bool is not an integer here.
BAD_SAMPLING = [
    (dict(top_k=2**63), ValueError, "top_k"), (dict(top_k=2.5), ValueError, "top_k"),
    (dict(top_k=True), ValueError, "top_k"), (dict(top_k=-1), ValueError, "top_k"),
    (dict(seed=None), TypeError, "seed"), (dict(seed=2.5), TypeError, "seed"), (dict(seed=2**63), ValueError, "seed"),
    (dict(temperature=None), ValueError, "temperature"), (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=True), ValueError, "temperature"), (dict(top_p="x"), ValueError, "top_p"),
    (dict(top_p=0), ValueError, "top_p"), (dict(top_p=True), ValueError, "top_p"),
]  # fmt: skip


@pytest.fixture(scope="module")
def plain_model(demo_target_dir):
    return EagleModel(load_target(demo_target_dir, max_len=64), None, backend="torch")


def _one_line(excinfo, name):
    msg = str(excinfo.value)
    assert name in msg and "\n" not in msg, msg


@pytest.mark.parametrize("kwargs,exc,name", BAD_SAMPLING, ids=[repr(k) for k, _, _ in BAD_SAMPLING])
def test_sampling_arguments_are_checked_in_generate_and_the_step_api(plain_model, kwargs, exc, name):
    """``generate`` and the step-level ``Decoder.sampling`` share the one check (``checks.check_sampling``)."""
    with pytest.raises(exc) as e:
        plain_model.generate([1, 400], 2, speculative=False, **kwargs)
    _one_line(e, name)
    with pytest.raises(exc) as e:
        plain_model.decoder.sampling(1, **kwargs)
    _one_line(e, name)


@pytest.mark.parametrize("n", [2.0, 2.5, None, True, 0])
def test_max_new_tokens_must_be_a_positive_integer(plain_model, n):
    with pytest.raises(ValueError) as e:
        plain_model.generate([1, 400], n, speculative=False)
    _one_line(e, "max_new_tokens")
    with pytest.raises(ValueError) as e:
        plain_model.cache_len_needed([1, 400], n)
    _one_line(e, "max_new_tokens")


def test_top_k_beyond_64_bits_on_the_command_line(demo_target_dir, capsys):
    _one_line_error(["generate", "--base", demo_target_dir, "--prompt", "Hi", "--temperature", 1, "--top-k", 2**63],
                    capsys, "top_k")


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(base=None), TypeError, "base"), (dict(base=5), TypeError, "base"), (dict(draft=5), TypeError, "draft"),
    (dict(dtype=torch.int8), ValueError, "dtype"), (dict(dtype=torch.bool), ValueError, "dtype"),
    (dict(dtype=torch.float8_e4m3fn), ValueError, "dtype"), (dict(dtype="int8"), ValueError, "dtype"),
    (dict(dtype="half-ish"), ValueError, "dtype"), (dict(dtype=16), TypeError, "dtype"),
])  # fmt: skip
def test_from_pretrained_names_a_bad_argument(demo_target_dir, kwargs, exc, name):
    kwargs = {"base": demo_target_dir, **kwargs}
    with pytest.raises(exc) as e:
        EagleModel.from_pretrained(kwargs.pop("base"), **kwargs)
    _one_line(e, name)
    if "dtype" in kwargs:
        with pytest.raises(exc) as e:
            load_target(demo_target_dir, dtype=kwargs["dtype"])
        _one_line(e, name)


@pytest.mark.parametrize("name,dtype", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16), ("fp16", torch.float16),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
])  # fmt: skip
def test_dtype_by_name(demo_target_dir, name, dtype):
    model = EagleModel.from_pretrained(demo_target_dir, dtype=name)
    assert model.target.embed_tokens.weight.dtype is dtype
    assert load_target(demo_target_dir, dtype=name, max_len=64).embed_tokens.weight.dtype is dtype


def test_entry_point_exit_status_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "eagle_runtime", "generate", "--base", "", "--prompt", "x"],
                          capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Token ids in any integer container
# ----------------------------------------------------------------------------------------------------------------
def test_token_ids_as_tuple_numpy_and_tensor(demo_target_dir):
    model = EagleModel(load_target(demo_target_dir, max_len=64), None, backend="torch")
    ids = [1, 400, 20, 35]
    want = model.generate(ids, 4, speculative=False).tokens
    for prompt in (tuple(ids), np.array(ids), np.array(ids, dtype=np.int32), torch.tensor(ids),
                   [np.int64(i) for i in ids]):
        assert model.generate(prompt, 4, speculative=False).tokens == want, type(prompt)
    assert model.generate(np.array([ids, ids]), 4, speculative=False).tokens == want * 2  # a 2-D array is a batch
    assert model.generate((tuple(ids), ids), 4, speculative=False).tokens == want * 2
    for bad in ([1.5, 2.0], [True, False], [[1, 2], "x", 3], np.array([1.0, 2.0]), [{"a": 1}]):
        with pytest.raises(ValueError, match="token ids|prompt"):
            model.generate(bad, 4, speculative=False)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark: arguments checked before any model loads
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("mtbench_speed_errors", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(mod.EagleModel, "from_pretrained", no_loading)
    return mod


def _bench_error(bench, argv, capsys, match: str) -> str:
    with pytest.raises(SystemExit) as e:
        bench.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert match in err, err
    return err


@pytest.mark.parametrize("content,match", [
    ("", "holds no questions"),
    ("\n\n", "holds no questions"),
    ('{"category": "math", "turns": ["q"]}\n{"category": "math", "turns": [', ":2: not JSON"),
    ('{"turns": ["q"]}', ":1: a row must be an object with a 'category'"),
    ('{"category": "math", "turns": []}', ":1: 'turns' must be"),
    ('{"category": "math", "turns": "abc"}', ":1: 'turns' must be"),
    ('{"category": "math", "turns": ["q"], "question_id": "7"}', "'question_id' must be an integer"),
    ("[1, 2]", ":1: a row must be an object"),
])  # fmt: skip
def test_bench_malformed_questions(bench, tmp_path, capsys, content, match):
    q = tmp_path / "q.jsonl"
    q.write_text(content)
    _bench_error(bench, ["--questions", q, "--out", tmp_path / "res"], capsys, match)


def test_bench_missing_questions_file(bench, tmp_path, capsys):
    _bench_error(bench, ["--questions", tmp_path / "none.jsonl", "--out", tmp_path / "res"], capsys, "cannot read")


@pytest.mark.parametrize("argv,match", [
    (["--temperatures", "inf"], "--temperatures"), (["--temperatures", "0", "nan"], "--temperatures"),
    (["--temperatures", "-1"], "--temperatures"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-questions", "-1"], "--num-questions"), (["--threads", "-2"], "--threads"),
    (["--max-len", "0"], "--max-len"), (["--seed", str(2**64)], "--seed"), (["--tree", "bushy"], "--tree"),
    (["--tree", "3,3,2"], "must exceed depth"), (["--device", "banana"], "device"),
    (["--base", "somewhere"], "--draft"), (["--dtype", "int8"], "--dtype"),
])  # fmt: skip
def test_bench_bad_arguments(bench, tmp_path, capsys, argv, match):
    _bench_error(bench, [*argv, "--out", tmp_path / "res"], capsys, match)


def test_bench_out_not_a_directory(bench, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    _bench_error(bench, ["--out", tmp_path / "file"], capsys, "--out")
    _bench_error(bench, ["--out", tmp_path / "file" / "sub"], capsys, "--out")


def test_bench_result_names_are_unique_per_device_model_and_time(bench):
    from datetime import datetime, timezone

    res = {"device": "NVIDIA H100 80GB HBM3", "config": {"base": "/models/Llama-2-7b-chat-hf/"}}
    t = datetime(2026, 11, 24, 1, 2, 3, tzinfo=timezone.utc)
    assert bench.result_name(res, t) == "mtbench_nvidia_h100_80gb_hbm3_llama_2_7b_chat_hf_20261124T010203Z"
    demo = {"device": "cpu (x86_64)", "config": {"base": "eagle_runtime.demo target"}}
    assert bench.result_name(demo, t) == "mtbench_cpu_x86_64_demo_20261124T010203Z"
    assert bench.result_name(demo, t.replace(second=4)) != bench.result_name(demo, t)


def test_bench_writes_atomically(bench, tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def dies(p):
        p.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench.atomic_write(target, dies)
    assert target.read_text() == "old" and [f.name for f in tmp_path.iterdir()] == ["r.json"]
    bench.atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new" and [f.name for f in tmp_path.iterdir()] == ["r.json"]


def test_generate_help_states_what_a_seed_reproduces(capsys):
    """Issue 23, item 6: --help says a seed fixes sampled output for a fixed tree, and why tree=auto may not."""
    from eagle_runtime import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "reproduces sampled output for a fixed tree" in out and "tensor-parallel degree" in out
    assert "Under --tree auto the sequence of trees depends on measured time" in out
