"""The one atomic writer (eagle_runtime.atomic) and the writers that go through it: the file gets the mode a plain
``open(path, "w")`` gives (0666 less the umask), and a failure inside ``write`` leaves the old file and no
temporary file."""

from __future__ import annotations

import json
import os
import stat

import pytest

from eagle_runtime import load_target, random_head3, save_head
from eagle_runtime.atomic import atomic_write, atomic_write_json, atomic_write_text
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
def target(stories_dir):
    return load_target(stories_dir, max_len=64)


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
