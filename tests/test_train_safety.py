"""Draft-head training is safe to run and to stop: resume never runs code from the state file, saves are atomic,
SIGTERM saves and exits, a trained head is never overwritten silently, and bad settings or corpora are one-line
errors (exit status 2 from the command line)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from eagle_runtime import load_head, load_target
from eagle_runtime.draft import EagleHead
from eagle_runtime.drafter import head_config
from eagle_runtime.text import load_tokenizer
from eagle_runtime.loading import CheckpointError
from eagle_runtime.train import Eagle3TrainConfig, TrainConfig, lr_factor, train_head, train_head3
from eagle_runtime.train.command import main
from eagle_runtime.train.loop import _load_state, _save

from conftest import ROOT

SMALL = dict(batch_size=2, seq_len=32, eval_batches=1, warmup=1)
SMALL3 = dict(ttt_steps=2, draft_vocab=64)  # EAGLE-3 extras, kept tiny
HEADS = ("eagle1", "eagle3")
HEAD_FLAGS = {"eagle1": [], "eagle3": ["--head", "eagle3", "--ttt-steps", 2, "--draft-vocab", 64]}


def _trainer(kind: str, **cfg):
    """(train function, its config) for ``kind``: both trainers share their data, checks and checkpointing."""
    if kind == "eagle1":
        return train_head, TrainConfig(**cfg)
    return train_head3, Eagle3TrainConfig(**cfg, **SMALL3)


@pytest.fixture
def small_corpus(tmp_path, lm_corpus) -> Path:
    """The first 60 stories of the model's corpus (a few thousand tokens): the shared validation set for
    stories260k, the demo target's own 60 stories for the demo."""
    stories = lm_corpus.read_text(encoding="utf-8").split("\n\n")[:60]
    path = tmp_path / "stories.txt"
    path.write_text("\n\n".join(stories), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def stories(lm_dir):
    return load_target(lm_dir, max_len=64), load_tokenizer(lm_dir)


def _run_cli(argv, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this object runs a shell command (what a crafted train_state.pt can do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code(tmp_path, stories):
    target, _ = stories
    marker = tmp_path / "code_ran"
    torch.save({"head": _RunsCode(marker), "opt": {}, "step": 1, "history": []}, tmp_path / "train_state.pt")
    head = EagleHead(head_config(target.cfg), 64)
    opt = torch.optim.AdamW(head.parameters())
    with pytest.raises(CheckpointError, match="cannot restore"):
        _load_state(tmp_path / "train_state.pt", head, opt, "cpu")
    assert not marker.exists(), "loading train_state.pt ran code from the file"


def test_saves_are_atomic(tmp_path, stories, monkeypatch):
    """A kill in the middle of any save leaves the previous head and state whole and loadable."""
    target, _ = stories
    head = EagleHead(head_config(target.cfg), 64)
    opt = torch.optim.AdamW(head.parameters())
    cfg = TrainConfig(steps=5)
    _save(head, opt, 1, [{"step": 1}], tmp_path, cfg)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert {"config.json", "pytorch_model.bin", "train_state.pt", "train_config.json"} <= set(before)
    real_save = torch.save
    for kill_at in (1, 2):  # during the head's weights, during the resume state
        calls = []

        def dying_save(obj, f, *a, **k):
            calls.append(f)
            if len(calls) == kill_at:
                with open(f, "wb") as fh:
                    fh.write(b"PK\x03\x04 half a file")
                raise KeyboardInterrupt("killed mid-write")
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", dying_save)
        with torch.no_grad():
            head.fc.bias.add_(1.0)
        with pytest.raises(KeyboardInterrupt):
            _save(head, opt, 2, [{"step": 1}, {"step": 2}], tmp_path, cfg)
        monkeypatch.setattr(torch, "save", real_save)
        now = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
        assert set(now) == set(before), f"left behind: {set(now) ^ set(before)}"
        if kill_at == 1:
            assert now == before
        assert now["train_state.pt"] == before["train_state.pt"]
        load_head(tmp_path, target)
        assert torch.load(tmp_path / "train_state.pt", weights_only=True)["step"] == 1


def _killed_save(out: Path, head, opt, step: int, cfg, kill_at: int, mid_write: bool) -> int:
    """``_save`` of ``step`` into ``out`` in a forked child that dies with ``os._exit`` (what SIGKILL leaves: no
    handler, no cleanup) at the ``kill_at``-th rename of the atomic writer: before it when ``mid_write`` (the
    temporary file is complete and left behind), else just after it. Returns the child's exit status (9: killed)."""
    pid = os.fork()
    if pid == 0:
        try:
            real, calls = os.replace, []

            def dying_replace(src, dst):
                calls.append(dst)
                if len(calls) == kill_at and mid_write:
                    os._exit(9)
                real(src, dst)
                if len(calls) == kill_at:
                    os._exit(9)

            os.replace = dying_replace
            _save(head, opt, step, [{"step": s} for s in range(1, step + 1)], out, cfg)
            os._exit(0)
        except BaseException:
            os._exit(1)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill harness forks")
def test_a_kill_anywhere_in_a_save_resumes_a_consistent_set(tmp_path, stories, monkeypatch):
    """Every point a SIGKILL can hit in a save (inside each file's write and between each pair of renames): the
    resume state and the published head and train_config.json that ``--resume`` leaves are all of one step, and
    no temporary file is left in the output directory."""
    target, _ = stories
    cfg = TrainConfig(steps=5)
    head = EagleHead(head_config(target.cfg), 64)
    opt = torch.optim.AdamW(head.parameters())
    first = tmp_path / "first"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append(dst), real_replace(src, dst)))
    with torch.no_grad():
        head.fc.bias.fill_(1.0)  # the weights tell which step's save they come from
    _save(head, opt, 1, [{"step": 1}], first, cfg)
    monkeypatch.setattr(os, "replace", real_replace)
    files = {f.name for f in first.iterdir()}
    assert files == {"config.json", "pytorch_model.bin", "train_state.pt", "train_config.json"}, files
    with torch.no_grad():
        head.fc.bias.fill_(2.0)
    resumed = set()
    for kill_at in range(1, len(renames) + 1):
        for mid_write in (True, False):
            out = tmp_path / f"kill{kill_at}{'mid' if mid_write else 'after'}"
            shutil.copytree(first, out)
            assert _killed_save(out, head, opt, 2, cfg, kill_at, mid_write) == 9
            fresh = EagleHead(head_config(target.cfg), 64)
            step, history = _load_state(out / "train_state.pt", fresh, torch.optim.AdamW(fresh.parameters()), "cpu")
            where = f"killed at the rename of {renames[kill_at - 1].name} ({'in' if mid_write else 'after'} its write)"
            published = load_head(out, target).fc.bias
            assert torch.all(published == step), f"{where}: published head of step {published[0].item()}, state {step}"
            assert torch.all(fresh.fc.bias == step) and [r["step"] for r in history] == list(range(1, step + 1))
            assert json.loads((out / "train_config.json").read_text())["steps_done"] == step, where
            assert {f.name for f in out.iterdir()} == files, f"{where}: left {sorted(f.name for f in out.iterdir())}"
            resumed.add(step)
    assert resumed == {1, 2}  # kills before the commit resume step 1, the last one (after it) step 2


@pytest.mark.parametrize("kind", HEADS)
def test_sigterm_saves_and_exits_cleanly(tmp_path, lm_dir, small_corpus, kind):
    out = tmp_path / "head"
    cmd = [sys.executable, "-m", "eagle_runtime.train", "--base", lm_dir, "--corpus", small_corpus, "--out", out,
           "--steps", "100000", "--save-every", "2", "--eval-every", "1000", "--batch-size", "2", "--seq-len", "32",
           *HEAD_FLAGS[kind]]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]))
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 120
    while not (out / "train_state.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and "SIGTERM: stopped at step" in stderr
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["step"] >= 2 and json.loads(stdout)["steps"] == state["step"]
    load_head(out, load_target(lm_dir, max_len=64))


@pytest.mark.parametrize("kind", HEADS)
def test_trained_head_is_not_overwritten_silently(tmp_path, lm_dir, small_corpus, capsys, kind):
    out = tmp_path / "head"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"a trained head")
    train, cfg = _trainer(kind, steps=1, **SMALL)
    with pytest.raises(FileExistsError, match="--overwrite"):
        train(lm_dir, small_corpus, out, cfg, progress=False)
    common = ["--base", lm_dir, "--corpus", small_corpus, "--out", out, "--steps", 1, *HEAD_FLAGS[kind]]
    rc, err = _run_cli(common, capsys)
    assert rc == 2 and err.count("\n") == 1 and "--resume" in err and "--overwrite" in err
    assert (out / "pytorch_model.bin").read_bytes() == b"a trained head"
    rc, err = _run_cli([*common, "--resume", "--overwrite"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "exclude each other" in err
    rc, _ = _run_cli([*common, "--overwrite", "--batch-size", 2, "--seq-len", 32], capsys)
    assert rc == 0 and (out / "pytorch_model.bin").read_bytes() != b"a trained head"


@pytest.mark.parametrize("kind", HEADS)
def test_resume_continues_the_saved_run(tmp_path, stories, small_corpus, capsys, kind):
    """Both heads resume from train_state.pt (weights only) with the step count, history and weights it holds."""
    target, tok = stories
    out = tmp_path / "h"
    train, cfg = _trainer(kind, steps=2, **SMALL)
    train(target, small_corpus, out, cfg, tokenizer=tok, progress=False)
    saved = torch.load(out / "train_state.pt", weights_only=True)
    train, cfg = _trainer(kind, steps=3, **SMALL)
    res = train(target, small_corpus, out, cfg, resume=True, tokenizer=tok, progress=False)
    assert res["steps"] == 3 and [r["step"] for r in res["history"]] == [1, 2, 3]
    assert res["history"][:2] == saved["history"]
    rc, err = _run_cli(["--base", tmp_path, "--corpus", small_corpus, "--out", tmp_path / "none", "--resume",
                        *HEAD_FLAGS[kind]], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--resume: no" in err, err


# ----------------------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [
    ("--steps", 0), ("--steps", -3), ("--warmup", -1), ("--eval-every", -1), ("--save-every", -1),
    ("--batch-size", 0), ("--seq-len", 1), ("--lr", 0), ("--lr", "nan"), ("--holdout-fraction", 1.0),
    ("--eval-batches", 0), ("--max-minutes", 0), ("--seed", -1),
])  # fmt: skip
def test_train_flags_rejected_in_one_line(tmp_path, flag, value, capsys):
    rc, err = _run_cli(["--base", tmp_path, "--corpus", tmp_path / "c.txt", "--out", tmp_path / "o", flag, value], capsys)
    assert rc == 2 and err.count("\n") == 1 and flag in err, err


@pytest.mark.parametrize("flag,value", [
    ("--steps", 0), ("--warmup", -1), ("--lr", "nan"), ("--draft-vocab", 0), ("--ttt-steps", 0),
    ("--ttt-decay", 0), ("--ttt-decay", 1.5), ("--taps", "a,b"), ("--taps", "1,,2"),
])  # fmt: skip
def test_eagle3_train_flags_rejected_in_one_line(tmp_path, flag, value, capsys):
    rc, err = _run_cli(["--head", "eagle3", "--base", tmp_path, "--corpus", tmp_path / "c.txt", "--out", tmp_path / "o",
                        flag, value], capsys)
    assert rc == 2 and err.count("\n") == 1 and flag in err, err


@pytest.mark.parametrize("kind", HEADS)
def test_zero_warmup_eval_and_save_intervals_have_a_meaning(tmp_path, stories, small_corpus, kind):
    target, tok = stories
    train, cfg = _trainer(kind, steps=3, warmup=0, eval_every=0, save_every=0,
                          **{k: v for k, v in SMALL.items() if k != "warmup"})
    assert lr_factor(0, cfg) == 1.0  # no warm-up
    res = train(target, small_corpus, tmp_path / "h", cfg, tokenizer=tok, progress=False)
    evals = [r["step"] for r in res["history"] if "eval_loss" in r]
    assert res["steps"] == 3 and evals == [3]  # eval_every 0: only after the last step
    assert (tmp_path / "h" / "pytorch_model.bin").is_file()


# ----------------------------------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HEADS)
def test_chat_corpus_without_assistant_turns_is_an_error(tmp_path, stories, kind):
    target, tok = stories
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Tell me story number {i} about a cat and a dog."}]}
            for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match="no trainable tokens"):
        train, cfg = _trainer(kind, steps=2, **SMALL)
        train(target, path, tmp_path / "h", cfg, tokenizer=tok, progress=False)
    assert not (tmp_path / "h" / "pytorch_model.bin").exists()


@pytest.mark.parametrize("kind", HEADS)
def test_too_small_names_the_held_out_split(tmp_path, lm_dir, small_corpus, capsys, kind):
    # the held-out 5% (3 stories, ~300 tokens) cannot fill 400
    train, cfg = _trainer(kind, steps=2, **{**SMALL, "seq_len": 400})
    with pytest.raises(ValueError, match="held-out split.*shorter than one sequence of 400 tokens"):
        train(lm_dir, small_corpus, tmp_path / "h", cfg, progress=False)
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("Once upon a time there was a cat.")
    rc, err = _run_cli(["--base", lm_dir, "--corpus", one_doc, "--out", tmp_path / "o", *HEAD_FLAGS[kind]], capsys)
    assert rc == 2 and err.count("\n") == 1 and "held-out split needs one of its own" in err, err
    assert not (tmp_path / "h").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("bad_row", ['{"messages": [', '[1, 2]', '{"messages": "hi"}', '{"text": 3}',
                                     '{"question": "q", "answer": null}', '{"other": 1}'])
def test_malformed_jsonl_names_file_and_line(tmp_path, lm_dir, bad_row, capsys):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"question": "What is two and two?", "answer": "Four."})
    path.write_text("\n".join([good, good, bad_row, good]))
    rc, err = _run_cli(["--base", lm_dir, "--corpus", path, "--out", tmp_path / "o"], capsys)
    assert rc == 2 and err.count("\n") == 1 and f"{path}:3:" in err, err


@pytest.mark.parametrize("flag,value", [("--steps", 0), ("--warmup", -1), ("--eval-every", -1), ("--seq-len", 1),
                                        ("--lr", "inf"), ("--store-dtype", "int8")])
def test_target_trainer_flags_rejected_in_one_line(tmp_path, flag, value, capsys):
    from eagle_runtime.train.target import main as target_main

    with pytest.raises(SystemExit) as e:
        target_main(["--out", str(tmp_path / "t"), flag, str(value)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and flag in err and "Traceback" not in err, err


def test_cosine_follows_the_wall_clock_budget_when_it_ends_first():
    cfg = TrainConfig(steps=1000, warmup=0, max_minutes=1.0)
    assert lr_factor(100, cfg, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # steps lead
    assert lr_factor(100, cfg, 0.5) == pytest.approx(0.5)  # half the budget used: half-way down the cosine
    assert lr_factor(100, cfg, 1.0) == pytest.approx(0.0)
    assert lr_factor(900, cfg, 0.5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))  # the later one wins


# ----------------------------------------------------------------------------------------------------------------
# --cache-target
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HEADS)
def test_cached_target_outputs_train_the_same_head(tmp_path, stories, small_corpus, kind):
    """With --cache-target the target runs once over the training rows before the first step; every step then reads
    its rows' slices, and the run is the one that ran the target per step: same losses, same weights."""
    target, tok = stories
    runs = {}
    for cache in (False, True):
        train, cfg = _trainer(kind, steps=4, eval_every=0, cache_target=cache, **SMALL)
        res = train(target, small_corpus, tmp_path / str(cache), cfg, tokenizer=tok, progress=False)
        runs[cache] = (res["history"], load_head(tmp_path / str(cache), target).state_dict())
    (h0, w0), (h1, w1) = runs[False], runs[True]
    assert [r["step"] for r in h1] == [1, 2, 3, 4]
    for a, b in zip(h0, h1):
        assert math.isclose(a["loss"], b["loss"], rel_tol=1e-5) and a["acc"] == b["acc"], (a, b)
    assert h0[-1]["loss"] != h0[0]["loss"]  # the batches differ from step to step: a wrong row slice would show
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", HEADS)
def test_cache_target_refused_when_it_would_not_fit(tmp_path, lm_dir, small_corpus, capsys, monkeypatch, kind):
    import eagle_runtime.train.loop as train_mod

    monkeypatch.setattr(train_mod, "_available_memory", lambda: 1 << 10)  # 1 KiB free: less than any row needs
    rc, err = _run_cli(["--base", lm_dir, "--corpus", small_corpus, "--out", tmp_path / "o", "--steps", 1,
                        "--batch-size", 2, "--seq-len", 32, "--cache-target", *HEAD_FLAGS[kind]], capsys)
    assert rc == 2 and err.count("\n") == 1 and "--cache-target" in err and "GiB" in err, err
    assert not (tmp_path / "o" / "train_state.pt").exists()
    monkeypatch.setattr(train_mod, "_available_memory", lambda: 1 << 40)
    rc, err = _run_cli(["--base", lm_dir, "--corpus", small_corpus, "--out", tmp_path / "o", "--steps", 1,
                        "--batch-size", 2, "--seq-len", 32, "--eval-batches", 1, "--cache-target", *HEAD_FLAGS[kind]],
                       capsys)
    assert rc == 0 and (tmp_path / "o" / "train_state.pt").exists(), err
    saved = json.loads((tmp_path / "o" / "train_config.json").read_text())
    assert saved["train"]["cache_target"] is True
