"""Printed text reads right after the prompt, ``--json`` is strict JSON, ``python -m eagle_runtime env`` says what
the install can run, and setup.py falls back to the CPU-only native extension when the CUDA compile fails."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from eagle_runtime import EagleModel, load_target, random_head, save_head
from eagle_runtime.cli import env_report, main
from eagle_runtime.text import continuation_text, load_tokenizer

from conftest import ROOT


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


# ----------------------------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------------------------
def test_continuation_keeps_the_space_before_a_new_word(demo_target_dir):
    tok = load_tokenizer(demo_target_dir)
    ids = tok("Once upon a time there was a girl")["input_ids"]
    cut = len(tok("Once upon a time")["input_ids"])
    assert tok.decode(ids[cut:], skip_special_tokens=True) == "there was a girl"  # what the old code printed
    assert continuation_text(tok, ids[:cut], ids[cut:]) == " there was a girl"


def test_generated_text_follows_the_prompt(demo_target_dir):
    """``prompt + out.text`` equals the decoded whole sequence for every prompt (4 of 20 glued words before)."""
    target = load_target(demo_target_dir, max_len=128)
    tok = load_tokenizer(demo_target_dir)
    model = EagleModel(target, random_head(target), tok, tree="static", backend="torch")
    prompts = ["Once upon a time", "Once upon a time there", "The little dog", "Lily and Tom went to the",
               "One day, a"]
    res = model.generate(prompts, 8)
    spaced = 0
    for p, ids, text in zip(prompts, res.tokens, res.text):
        p_ids = tok(p)["input_ids"]
        assert p + text == tok.decode(p_ids + ids, skip_special_tokens=True), (p, text)
        spaced += text.startswith(" ")
    assert spaced >= 1, "no continuation started a new word: the test would not see glued words"


def test_json_output_is_strict_json(demo_target_dir, tmp_path, capsys):
    """With one new token no decode cycle runs and tau is undefined: null, not NaN."""
    save_head(random_head(load_target(demo_target_dir, max_len=128)), tmp_path / "head")
    rc = main(["generate", "--base", str(demo_target_dir), "--draft", str(tmp_path / "head"), "--prompt", "Once upon",
               "--max-new-tokens", "1", "--json", "--backend", "torch"])
    out = capsys.readouterr().out
    assert rc == 0
    res = _strict_json(out)
    assert res["tau"] is None and len(res["tokens"][0]) == 1 and res["text"][0]


# Prompts that are not UTF-8 (issue 31, item 4): undecodable bytes reach Python as surrogate escapes (sys.argv,
# os.fsdecode), which the tokenizer refused with a TypeError traceback. They are a one-line error naming the offset
# of the first bad byte: ValueError from the API, exit status 2 from the command line.
@pytest.mark.parametrize("argv,message", [
    ([b"Once upon \xff\xfe a time"], "prompt is not valid UTF-8: byte 0xff at offset 10"),
    ([b"\xc3\x28"], "prompt is not valid UTF-8: byte 0xc3 at offset 0"),  # a lead byte without its continuation
    # a latin-1 file's text passed on (``--prompt "$(cat story.txt)"``): generate has no prompt-file option
    (["Once upon a caf\u00e9".encode("latin-1")], "prompt is not valid UTF-8: byte 0xe9 at offset 15"),
    (["Hi", b"caf\xe9"], "prompt [1] is not valid UTF-8: byte 0xe9 at offset 3"),  # the second prompt of a batch
])  # fmt: skip
def test_cli_rejects_a_prompt_that_is_not_utf8(demo_target_dir, argv, message):
    cmd = [sys.executable, "-m", "eagle_runtime", "generate", "--base", str(demo_target_dir), "--device", "cpu",
           "--max-new-tokens", "2"]
    for prompt in argv:
        cmd += ["--prompt", prompt]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'python'}:{ROOT}", "PYTHONUTF8": "1"}  # argv decoded as UTF-8
    proc = subprocess.run(cmd, capture_output=True, timeout=120, env=env)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2 and err == f"error: {message}\n", (proc.returncode, err)


def test_api_rejects_a_prompt_that_is_not_utf8(demo_target_dir):
    model = EagleModel(load_target(demo_target_dir, max_len=64), None, load_tokenizer(demo_target_dir), backend="torch")
    with pytest.raises(ValueError, match=r"^prompt is not valid UTF-8: byte 0xff at offset 5$"):
        model.generate(os.fsdecode(b"Once \xff upon"), 2, speculative=False)
    with pytest.raises(ValueError, match=r"^prompt \[2\] is not valid UTF-8: byte 0xc3 at offset 3$"):
        model.encode(["Once", "upon", os.fsdecode(b"caf\xc3 time")])
    with pytest.raises(ValueError, match=r"^prompt is not valid UTF-8: lone surrogate U\+D800 at offset 6$"):
        model.generate("caf\u00e9 \ud800", 2, speculative=False)  # not from bytes: no byte to name
    assert model.encode("caf\u00e9 \u00fcber")[0] == load_tokenizer(demo_target_dir)("caf\u00e9 \u00fcber")["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# Environment report
# ----------------------------------------------------------------------------------------------------------------
def test_env_reports_versions_and_the_native_extension(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch: {torch.__version__}" in out and "triton:" in out
    assert "native extension eagle_kernels._C: " in out


def test_env_says_why_the_extension_is_cpu_only_or_missing(tmp_path, monkeypatch):
    import eagle_kernels

    info = tmp_path / "_native_build.json"
    info.write_text(json.dumps({"built": True, "cuda": False, "reason": "CPU only: CUDA compile failed: RuntimeError: x"}))
    if eagle_kernels.native_available() and not eagle_kernels._C.with_cuda:
        line = env_report(info)[-1]
        assert line.endswith("built (CPU only: CUDA compile failed: RuntimeError: x)"), line
    monkeypatch.setattr(eagle_kernels, "native_available", lambda: False)
    info.write_text(json.dumps({"built": False, "cuda": False, "reason": "PlatformError: no compiler"}))
    assert env_report(info)[-1].endswith("not built (PlatformError: no compiler); the reference ops are used")
    assert "never built here" in env_report(tmp_path / "absent.json")[-1]


# ----------------------------------------------------------------------------------------------------------------
# setup.py: a failed CUDA compile still gives the CPU extension, and says so
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture
def setup_module():
    spec = importlib.util.spec_from_file_location("eagle_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() runs only as __main__
    return mod


@pytest.fixture
def fake_cuda(tmp_path, monkeypatch):
    """A CUDA build of torch with an nvcc and runtime headers (all fake: nothing here compiles CUDA)."""
    from torch.utils import cpp_extension as ce

    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "include" / "cuda_runtime.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 1\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(ce, "CUDA_HOME", str(home))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    return home


def _build(setup_module, tmp_path, monkeypatch, fail_cpu: bool):
    from setuptools import Distribution
    from torch.utils import cpp_extension as ce

    ext_modules, cmdclass = setup_module._native()
    assert any(s.endswith(".cu") for s in ext_modules[0].sources)
    attempts = []

    def fake_compile(self):  # stands in for torch's ninja build
        sources = list(self.extensions[0].sources)
        attempts.append(sources)
        if any(s.endswith(".cu") for s in sources):
            raise RuntimeError("Error compiling objects for extension\nnvcc fatal: cuda_runtime.h missing")
        if fail_cpu:
            raise RuntimeError("c++: not found")

    monkeypatch.setattr(ce.BuildExtension, "run", fake_compile)
    dist = Distribution({"name": "eagle-kernels", "ext_modules": ext_modules, "cmdclass": cmdclass})
    cmd = dist.get_command_obj("build_ext")
    cmd.build_lib, cmd.build_temp = str(tmp_path / "lib"), str(tmp_path / "tmp")
    cmd.ensure_finalized()
    cmd.run()
    info = json.loads((tmp_path / "lib" / "eagle_kernels" / setup_module.BUILD_INFO).read_text())
    return attempts, ext_modules[0], info, cmd


def test_failed_cuda_compile_builds_the_cpu_extension(setup_module, fake_cuda, tmp_path, monkeypatch, capsys):
    attempts, ext, info, _ = _build(setup_module, tmp_path, monkeypatch, fail_cpu=False)
    assert len(attempts) == 2 and not any(s.endswith(".cu") for s in attempts[1])
    assert sorted(attempts[1]) == sorted(setup_module.CPU_SOURCES)
    assert ("EAGLE_WITH_CUDA", None) not in ext.define_macros and "cudart" not in ext.libraries
    assert info["built"] and not info["cuda"]
    assert info["reason"] == "CPU only: CUDA compile failed: RuntimeError: Error compiling objects for extension"
    assert "building the CPU-only extension" in capsys.readouterr().out


def test_failed_cpu_compile_is_recorded(setup_module, fake_cuda, tmp_path, monkeypatch):
    attempts, _, info, cmd = _build(setup_module, tmp_path, monkeypatch, fail_cpu=True)
    assert len(attempts) == 2 and not info["built"] and "CPU compile failed: RuntimeError: c++: not found" in info["reason"]
    assert cmd.extensions == []  # the install goes on without the extension


def test_missing_cuda_headers_skip_straight_to_cpu(setup_module, fake_cuda):
    (fake_cuda / "include" / "cuda_runtime.h").unlink()
    (ext,), _ = setup_module._native()
    assert sorted(ext.sources) == sorted(setup_module.CPU_SOURCES)
