"""The one atomic writer (eagle_runtime.atomic) and the writers that go through it: the file gets the mode a plain
``open(path, "w")`` gives (0666 less the umask), and a failure inside ``write`` leaves the old file and no
temporary file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from eagle_runtime import load_target, random_head3, save_head
from eagle_runtime.atomic import atomic_write, atomic_write_json, atomic_write_text, remove_orphans
from eagle_runtime.draft import EagleHead
from eagle_runtime.drafter import head_config


@pytest.fixture
def umask():
    """``os.umask`` for one test; the old umask is put back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture(scope="module")
def target(demo_target_dir):
    return load_target(demo_target_dir, max_len=64)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_mode_is_0666_less_the_umask(tmp_path, umask, mask):
    umask(mask)
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write_json(tmp_path / "a.json", {"k": 1})
    atomic_write(tmp_path / "a.bin", lambda p: p.write_bytes(b"\0"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open(path, "w") gives, for comparison
    for name in ("a.txt", "a.json", "a.bin"):
        assert _mode(tmp_path / name) == 0o666 & ~mask == _mode(plain), (name, oct(_mode(tmp_path / name)))
    assert json.loads((tmp_path / "a.json").read_text()) == {"k": 1}


@pytest.mark.parametrize("error", [ValueError("disk full"), KeyboardInterrupt()])
def test_failure_inside_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "state.json"
    atomic_write_text(path, "old")

    def dies(p):
        p.write_text("half a fi")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, dies)
    assert path.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["state.json"], "a temporary file was left behind"


def test_a_new_file_that_fails_is_never_created(tmp_path):
    with pytest.raises(OSError):
        atomic_write(tmp_path / "new.bin", lambda p: (_ for _ in ()).throw(OSError("no space")))
    assert list(tmp_path.iterdir()) == []


def test_json_refuses_nan_before_touching_the_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"tau": 1.5})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"tau": float("nan")})
    assert json.loads(path.read_text()) == {"tau": 1.5} and len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("kind", ["eagle1", "eagle3"])
@pytest.mark.parametrize("safetensors", [False, True])
def test_save_head_is_atomic_with_the_umask_mode(tmp_path, target, umask, monkeypatch, kind, safetensors):
    """Both head kinds write config and weights through the atomic writer: a failing save leaves the previous
    files, no temp file; the files get 0666 less the umask."""
    head = EagleHead(head_config(target.cfg), 64) if kind == "eagle1" else random_head3(target)
    umask(0o027)
    save_head(head, tmp_path, safetensors=safetensors)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    assert "config.json" in before and len(before) == 2, sorted(before)
    assert all(_mode(tmp_path / n) == 0o640 for n in before)

    def dies(obj, f, *args, **kwargs):  # a kill half-way through the weights
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt("killed mid-write")

    import safetensors.torch
    import torch

    monkeypatch.setattr(torch, "save", dies)
    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    with torch.no_grad():
        next(head.parameters()).add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_head(head, tmp_path, safetensors=safetensors)
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before


def test_the_umask_is_never_changed_even_for_a_moment(tmp_path, umask, monkeypatch):
    """The writer never sets the process umask: reading it by setting it (``os.umask(0)`` and back) leaves a window
    in which a file or folder another thread creates is world-writable."""
    umask(0o027)
    real, calls = os.umask, []
    monkeypatch.setattr(os, "umask", lambda m: (calls.append(oct(m)), real(m))[1])
    atomic_write_text(tmp_path / "a.txt", "x")
    atomic_write(tmp_path / "b.bin", lambda p: p.write_bytes(b"\0"))
    assert calls == [], f"os.umask called with {calls}"
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "b.bin") == 0o640


def test_a_writer_that_replaces_the_temp_file_still_gets_the_umask_mode(tmp_path, umask):
    """A ``write`` that puts a new file at the temporary path (its own temp-and-rename, at 0600) still ends at
    0666 less the umask."""
    umask(0o022)

    def own_rename(p):
        side = p.with_name("side")
        side.write_bytes(b"data")
        os.chmod(side, 0o600)
        os.replace(side, p)

    atomic_write(tmp_path / "f.bin", own_rename)
    assert _mode(tmp_path / "f.bin") == 0o644 and (tmp_path / "f.bin").read_bytes() == b"data"


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_writer_gets_the_umask_mode(tmp_path, target, demo_target_dir, umask, mask):
    """What goes through the atomic writer, file by file: a trainer's save (head, ``train_state.pt``,
    ``train_config.json``), the cost cache (``costs.json``), a trained target (weights, configs, tokenizer), a
    distilled corpus and a benchmark's results file all get 0666 less the umask, as the heads always did."""
    import importlib.util

    import torch

    from eagle_runtime.costs import CostModel, save_costs
    from eagle_runtime.train import TrainConfig
    from eagle_runtime.train.loop import _save
    from eagle_runtime.text import load_tokenizer
    from eagle_runtime.train.target import save_hf

    from conftest import ROOT

    umask(mask)
    head = EagleHead(head_config(target.cfg), 64)
    _save(head, torch.optim.AdamW(head.parameters()), 1, [{"step": 1}], tmp_path / "head", TrainConfig(steps=2))
    save_costs(CostModel({1: 1.0}, {1: 1.0}, {1: 0.1}, {1: 0.1}, key="k"), tmp_path / "cache")
    save_hf(target, dict(target.cfg.raw), load_tokenizer(demo_target_dir), tmp_path / "target")
    atomic_write_text(tmp_path / "corpus.jsonl", '{"input_ids": [1]}\n')  # what train.distill writes, its one call
    spec = importlib.util.spec_from_file_location("_bench_utils", ROOT / "benchmarks" / "_bench_utils.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.save_json(tmp_path / "results", "r", {"tau": 1.5})
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    names = {f.name for f in files}
    assert {"pytorch_model.bin", "train_state.pt", "train_config.json", "costs.json", "model.safetensors",
            "generation_config.json", "corpus.jsonl"} <= names, names
    wrong = {str(f.relative_to(tmp_path)): oct(_mode(f)) for f in files if _mode(f) != 0o666 & ~mask}
    assert not wrong, f"umask {oct(mask)}: {wrong}"


def test_remove_orphans_takes_only_the_writers_own_temporaries(tmp_path):
    """What a killed write leaves (``.<name>.<8 characters>.tmp``) goes; other files, whatever they look like, stay."""
    atomic_write_text(tmp_path / "state.pt", "whole")
    orphans = [tmp_path / ".state.pt.ab12cd_9.tmp", tmp_path / ".state.pt.0123abcd.tmp"]
    kept = [".state.pt.short.tmp", "state.pt.ab12cd_9.tmp", ".other.ab12cd_9.tmp", ".state.pt.ab12cd_9.tmp.keep"]
    for f in orphans + [tmp_path / k for k in kept]:
        f.write_text("x")
    assert sorted(remove_orphans(tmp_path / "state.pt")) == sorted(orphans)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(["state.pt", *kept])
    assert remove_orphans(tmp_path / "missing" / "state.pt") == []
