"""scripts/fetch_data.py: downloads against a real HTTP server on 127.0.0.1, and the llama2.c -> HF conversion.

Downloads use small synthetic files with their checksums passed in (``fetch(..., table=...)``), so nothing here
needs the network or the shared data. The failure cases (wrong checksum, a body shorter than its Content-Length,
a 404) must each end in one line naming the cause and leave neither the file nor a temporary file behind.

The conversion is checked on a tiny random llama2.c checkpoint written here, against a direct implementation of
llama2.c's forward pass (interleaved RoPE, as run.c) and of its tokenizer's encoder, and, where the shared data is
present, on stories260K against the team's stories260k-hf.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import importlib.util
import math
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "fetch_data.py"
SHARED = Path(os.environ.get("EAGLE_SHARED_DATA") or ROOT.parent / "shared" / "data")

_spec = importlib.util.spec_from_file_location("fetch_data", SCRIPT)
fd = importlib.util.module_from_spec(_spec)
sys.modules["fetch_data"] = fd  # dataclasses look their module up there while the module runs
_spec.loader.exec_module(fd)


# ---- a local HTTP server ----------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's directory; a path in ``server.truncate`` announces its full length but sends half the
    body and closes, as a dropped connection does."""

    def do_GET(self):
        self.server.requests.append(self.path)
        rel = self.path.lstrip("/")
        if rel in self.server.truncate:
            body = (Path(self.directory) / rel).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep test output clean
        pass


@contextlib.contextmanager
def _http_server(directory: Path):
    """(base_url, httpd) of a server for ``directory`` on an ephemeral port, in a thread."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            lambda *a, **k: _Handler(*a, directory=str(directory), **k))
    httpd.requests, httpd.truncate = [], set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(tmp_path):
    """(base_url, served directory, httpd)."""
    root = tmp_path / "served"
    root.mkdir()
    with _http_server(root) as (base, httpd):
        yield base, root, httpd


def _serve(root: Path, rel: str, data: bytes) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _files(out: Path) -> list[str]:
    """Every file under ``out`` (temporary files of the atomic writer included: they start with a dot)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []


def _table(**entries) -> dict:
    return {name: fd.DataFile(path, f"https://invalid.example/{path}", sha) for name, (path, sha) in entries.items()}


# ---- downloads --------------------------------------------------------------------------------------------------


def test_fetch_good_files_then_rerun_skips(server, tmp_path):
    base, root, httpd = server
    a = os.urandom(200_000)  # several read chunks
    b = b'{"question_id": 1}\n'
    table = _table(a=("models/x/a.bin", _serve(root, "models/x/a.bin", a)),
                   b=("bench/b.jsonl", _serve(root, "bench/b.jsonl", b)))
    out = tmp_path / "out"
    assert fd.fetch(out, base_url=base, table=table, progress=False, log=lambda s: None) == ["a", "b"]
    assert (out / "models/x/a.bin").read_bytes() == a and (out / "bench/b.jsonl").read_bytes() == b
    assert _files(out) == ["bench/b.jsonl", "models/x/a.bin"]  # no temporary file left
    n = len(httpd.requests)
    assert fd.fetch(out, base_url=base + "/", table=table, progress=False, log=lambda s: None) == []
    assert len(httpd.requests) == n, "a present file with the right checksum was downloaded again"
    # only what was asked for
    assert fd.fetch(tmp_path / "one", ["b"], base_url=base, table=table, progress=False, log=lambda s: None) == ["b"]
    assert _files(tmp_path / "one") == ["bench/b.jsonl"]


def test_present_file_with_wrong_checksum_is_replaced(server, tmp_path):
    base, root, _ = server
    table = _table(a=("a.bin", _serve(root, "a.bin", b"right")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"stale")
    assert fd.fetch(out, base_url=base, table=table, progress=False, log=lambda s: None) == ["a"]
    assert (out / "a.bin").read_bytes() == b"right" and _files(out) == ["a.bin"]


def test_progress_bar_on_a_terminal_only(server, tmp_path, monkeypatch):
    base, root, _ = server
    table = _table(a=("a.bin", _serve(root, "a.bin", os.urandom(300_000))))

    class Tty(io.StringIO):
        def isatty(self):
            return True

    for tty, out in ((True, tmp_path / "tty"), (False, tmp_path / "log")):
        err = Tty() if tty else io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        fd.fetch(out, base_url=base, table=table, log=lambda s: None)
        monkeypatch.undo()
        assert ("a.bin:" in err.getvalue() and "B/s" in err.getvalue()) == tty, repr(err.getvalue())


def _failure(server, tmp_path, case: str) -> tuple[str, Path]:
    base, root, httpd = server
    sha = _serve(root, "bench/f.jsonl", b"x" * 100_000)
    if case == "checksum":
        sha = hashlib.sha256(b"something else").hexdigest()
    elif case == "truncated":
        httpd.truncate.add("bench/f.jsonl")
    elif case == "404":
        (root / "bench/f.jsonl").unlink()
    out = tmp_path / "out"
    with pytest.raises(fd.FetchError) as e:
        fd.fetch(out, base_url=base, table=_table(f=("bench/f.jsonl", sha)), progress=False, log=lambda s: None)
    return str(e.value), out


@pytest.mark.parametrize("case, words", [("checksum", "checksum mismatch"), ("truncated", "truncated download"),
                                         ("404", "HTTP 404")])
def test_failure_is_one_line_and_leaves_nothing(server, tmp_path, case, words):
    msg, out = _failure(server, tmp_path, case)
    assert words in msg and "\n" not in msg, msg
    assert _files(out) == [], f"{case}: left {_files(out)}"


def test_truncated_body_is_caught_by_length_not_only_checksum(server, tmp_path):
    """The recorded checksum is that of the half the server sends, so only the Content-Length check can refuse it
    (as it must for a file whose checksum matched a short upstream copy)."""
    base, root, httpd = server
    body = os.urandom(100_000)
    _serve(root, "t.bin", body)
    httpd.truncate.add("t.bin")
    half = hashlib.sha256(body[:50_000]).hexdigest()
    with pytest.raises(fd.FetchError, match="truncated download.*50000 of 100000 bytes"):
        fd.fetch(tmp_path / "out", base_url=base, table=_table(t=("t.bin", half)), progress=False,
                 log=lambda s: None)
    assert _files(tmp_path / "out") == []


@pytest.mark.parametrize("case", ["checksum", "truncated", "404"])
def test_cli_failure_exit_2_one_line(server, tmp_path, case):
    """The script itself, with its real checksum table: mt_bench.jsonl from the local server is wrong, cut short
    or missing."""
    base, root, httpd = server
    rel = fd.FILES["mt_bench"].path
    _serve(root, rel, b'{"question_id": 81}\n' * 500)
    if case == "truncated":
        httpd.truncate.add(rel)
    elif case == "404":
        (root / rel).unlink()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--only", "mt_bench", "--base-url", base],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fetch_data: error: "), r.stderr
    assert {"checksum": "checksum mismatch", "truncated": "truncated download", "404": "HTTP 404"}[case] in lines[0]
    assert _files(out) == []


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE_SHARED_DATA", str(tmp_path / "shared"))
    assert fd.data_dir() == tmp_path / "shared"
    monkeypatch.delenv("EAGLE_SHARED_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert fd.data_dir() == tmp_path / "cache" / "eagle_runtime" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fd.data_dir() == tmp_path / "home" / ".cache" / "eagle_runtime" / "data"


# ---- a tiny llama2.c model --------------------------------------------------------------------------------------

# Pieces after the 3 specials and 256 bytes, best first (llama2.c scores are minus the merge rank); single characters
# come last, as in SentencePiece vocabularies.
_PIECES = ["▁t", "he", "▁the", "▁a", "an", "▁an", "nd", "▁and", "ca", "▁ca", "t.", "at",
           "▁", "t", "h", "e", "a", "n", "d", "c", "."]


def _write_tok(path: Path) -> list[tuple[bytes, float]]:
    toks = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    toks += [(f"<0x{i:02X}>".encode(), 0.0) for i in range(256)]
    toks += [(p.replace("▁", " ").encode(), -float(r)) for r, p in enumerate(_PIECES)]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(t) for t, _ in toks)))
        for t, s in toks:
            f.write(struct.pack("<fi", s, len(t)) + t)
    return toks


def _write_ckpt(path: Path, dim=16, hidden=40, layers=2, heads=4, kv_heads=2, vocab=259 + len(_PIECES),
                seq_len=32, shared=False, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    hd, kv = dim // heads, kv_heads * dim // heads
    w = {"emb": (vocab, dim), "rms_att": (layers, dim), "wq": (layers, dim, dim), "wk": (layers, kv, dim),
         "wv": (layers, kv, dim), "wo": (layers, dim, dim), "rms_ffn": (layers, dim), "w1": (layers, hidden, dim),
         "w2": (layers, dim, hidden), "w3": (layers, hidden, dim), "rms_final": (dim,)}
    w = {k: torch.randn(s, generator=g) * (0.3 if k.startswith("w") else 1.0) for k, s in w.items()}
    for k in ("rms_att", "rms_ffn", "rms_final"):
        w[k] = 1.0 + 0.2 * w[k]
    w["freq"] = torch.zeros(2, seq_len, hd // 2)  # unused by the converter and by the reference (recomputed)
    order = ["emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "freq"]
    if not shared:
        w["wcls"] = torch.randn(vocab, dim, generator=g) * 0.3
        order.append("wcls")
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab if shared else -vocab, seq_len))
        for k in order:
            f.write(w[k].to(torch.float32).contiguous().numpy().tobytes())
    if shared:
        w["wcls"] = w["emb"]
    return dict(w=w, heads=heads, kv_heads=kv_heads, layers=layers)


def _llama2c_forward(m: dict, tokens: list[int]) -> torch.Tensor:
    """Logits (T, V), float64, of llama2.c's run.c forward from the raw checkpoint arrays: RMSNorm eps 1e-5, RoPE on
    interleaved pairs (2j, 2j+1) of each head at frequency 10000^(-2j/head_dim), grouped-query causal attention,
    SwiGLU FFN."""
    w = {k: v.double() for k, v in m["w"].items()}
    H, KVH = m["heads"], m["kv_heads"]
    x = w["emb"][tokens]
    T, D = x.shape
    hd = D // H
    pos = torch.arange(T, dtype=torch.float64)[:, None]
    ang = pos * 10000.0 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (T, hd/2)
    cos, sin = ang.cos(), ang.sin()

    def rms(v, g):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + 1e-5) * g

    def rope(v):  # (T, n, hd), rotating pairs (2j, 2j+1)
        a, b = v[..., 0::2], v[..., 1::2]
        return torch.stack([a * cos[:, None] - b * sin[:, None], a * sin[:, None] + b * cos[:, None]], -1).flatten(-2)

    mask = torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
    for i in range(m["layers"]):
        h = rms(x, w["rms_att"][i])
        q = rope((h @ w["wq"][i].T).view(T, H, hd))
        k = rope((h @ w["wk"][i].T).view(T, KVH, hd)).repeat_interleave(H // KVH, dim=1)
        v = (h @ w["wv"][i].T).view(T, KVH, hd).repeat_interleave(H // KVH, dim=1)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask, -1)
        x = x + torch.einsum("hts,shd->thd", att, v).reshape(T, D) @ w["wo"][i].T
        h = rms(x, w["rms_ffn"][i])
        x = x + (torch.nn.functional.silu(h @ w["w1"][i].T) * (h @ w["w3"][i].T)) @ w["w2"][i].T
    return rms(x, w["rms_final"]) @ w["wcls"].T


def _llama2c_encode(toks: list[tuple[bytes, float]], text: str) -> list[int]:
    """llama2.c's encode(text, bos=1, eos=0): a dummy space prefix, one piece per UTF-8 character (its bytes as
    <0xNN> ids, +3, when the character is not a piece), then merge the adjacent pair whose concatenation scores
    best until none is in the vocabulary."""
    ids = {t: i for i, (t, _) in enumerate(toks)}
    seq = []
    for ch in " " + text:
        b = ch.encode()
        seq += [ids[b]] if b in ids else [x + 3 for x in b]
    while True:
        best = max(((toks[ids[toks[a][0] + toks[b][0]]][1], j) for j, (a, b) in enumerate(zip(seq, seq[1:]))
                    if toks[a][0] + toks[b][0] in ids), default=None)
        if best is None:
            return [1] + seq
        j = best[1]
        seq[j:j + 2] = [ids[toks[seq[j]][0] + toks[seq[j + 1]][0]]]


@pytest.fixture(scope="module", params=[False, True], ids=["unshared_classifier", "shared_classifier"])
def tiny(request, tmp_path_factory):
    """A converted tiny random model: (data root, raw model, tokenizer entries)."""
    root = tmp_path_factory.mktemp("tiny")
    src = root / "models" / "stories260K"
    src.mkdir(parents=True)
    m = _write_ckpt(src / "stories260K.bin", shared=request.param)
    toks = _write_tok(src / "tok512.bin")
    fd.convert_stories(root, log=lambda s: None)
    return root, m, toks


_TOKENS = [1, 259, 260, 271, 275, 3 + ord("x"), 270, 264, 2, 0, 261, 262]


def test_converted_llama_matches_llama2c_forward(tiny):
    from transformers import LlamaForCausalLM

    root, m, _ = tiny
    model = LlamaForCausalLM.from_pretrained(root / fd.STORIES_HF, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(torch.tensor([_TOKENS])).logits[0].double()
    ref = _llama2c_forward(m, _TOKENS)
    err = (got - ref).abs().max().item()
    # float32 against float64 on logits of size ~5: a few 1e-6; a wrong rotary layout gives ~1
    assert err < 1e-4, f"max |HF - llama2.c| = {err:.3g} (logit scale {ref.abs().max().item():.3g})"


def test_converted_tokenizer_matches_llama2c_encode(tiny):
    from transformers import AutoTokenizer

    root, _, toks = tiny
    tok = AutoTokenizer.from_pretrained(root / fd.STORIES_HF)
    for text in ["the cat.", "and then the ant ran", "the  and", "x", "hé ✓ done.", "  leading", "cat.cat.the"]:
        assert tok(text)["input_ids"] == _llama2c_encode(toks, text), text
    assert tok.decode(tok("the cat and hé")["input_ids"], skip_special_tokens=True) == "the cat and hé"


def test_mixtral_copy_logits_equal_dense(tiny):
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    root, m, _ = tiny
    dense = LlamaForCausalLM.from_pretrained(root / fd.STORIES_HF, dtype=torch.float32).eval()
    moe = MixtralForCausalLM.from_pretrained(root / fd.STORIES_MOE, dtype=torch.float32).eval()
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    with torch.no_grad():
        err = (moe(torch.tensor([_TOKENS])).logits - dense(torch.tensor([_TOKENS])).logits).abs().max().item()
    assert err < 1e-4, f"max |Mixtral - LLaMA| = {err:.3g}"


def test_rerun_conversion_writes_nothing(tiny):
    root, _, _ = tiny
    lines = []
    mtimes = {p: p.stat().st_mtime_ns for p in (root / fd.STORIES_HF).iterdir()}
    fd.convert_stories(root, log=lines.append)
    assert lines == [f"up to date {fd.STORIES_HF}", f"up to date {fd.STORIES_MOE}"]
    assert {p: p.stat().st_mtime_ns for p in (root / fd.STORIES_HF).iterdir()} == mtimes


def test_truncated_checkpoint_is_one_line_error(tmp_path):
    _write_ckpt(tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "m.bin").write_bytes(data[:-4])
    with pytest.raises(fd.FetchError, match="expected .* for this header"):
        fd.read_llama2c(tmp_path / "m.bin")


# ---- the real stories260K ---------------------------------------------------------------------------------------


@pytest.mark.shared_data
def test_stories260k_conversion_matches_shared(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM, MixtralForCausalLM

    src = SHARED / "models" / "stories260K"
    for p in (src / "stories260K.bin", src / "tok512.bin", SHARED / fd.STORIES_HF, SHARED / fd.STORIES_MOE):
        if not p.exists():
            pytest.skip(f"shared data not found at {p} (set EAGLE_SHARED_DATA to the shared data folder)")
    dst = tmp_path / "models" / "stories260K"
    dst.mkdir(parents=True)
    for name in ("stories260K.bin", "tok512.bin"):
        (dst / name).write_bytes((src / name).read_bytes())
    fd.convert_stories(tmp_path, log=lambda s: None)

    ids = torch.tensor([[1, 403, 407, 261, 378, 30, 259, 266, 260, 271, 281, 302, 13, 2, 300]])
    with torch.no_grad():
        for cls, rel in ((LlamaForCausalLM, fd.STORIES_HF), (MixtralForCausalLM, fd.STORIES_MOE)):
            ours = cls.from_pretrained(tmp_path / rel, dtype=torch.float32).eval()(ids).logits
            theirs = cls.from_pretrained(SHARED / rel, dtype=torch.float32).eval()(ids).logits
            assert torch.equal(ours, theirs), f"{rel}: max diff {(ours - theirs).abs().max().item():.3g}"
    ours, theirs = (AutoTokenizer.from_pretrained(d / fd.STORIES_HF) for d in (tmp_path, SHARED))
    texts = ["Once upon a time, there was a little girl named Lily.", "  Two spaces\nand a newline",
             "Ünïcødé ✓ 猫 and emoji 🙂", "", "Tom's dog said: \"Wow!\" 123"]
    for text in texts:
        assert ours(text)["input_ids"] == theirs(text)["input_ids"], text
    for rel in (fd.STORIES_HF, fd.STORIES_MOE):  # the whole directory, byte for byte
        for f in sorted((SHARED / rel).iterdir()):
            assert (tmp_path / rel / f.name).read_bytes() == f.read_bytes(), f"{rel}/{f.name} differs"


@pytest.mark.shared_data
def test_cli_from_a_mirror_of_shared_data(tmp_path):
    """End to end with the real checksum table: every file from a local mirror of the shared folder (its layout is
    the data directory's, which --base-url expects), then the conversion, which must reproduce the shared models."""
    for f in fd.FILES.values():
        if not (SHARED / f.path).is_file():
            pytest.skip(f"shared data not found at {SHARED / f.path} (set EAGLE_SHARED_DATA to the shared data folder)")
    with _http_server(SHARED) as (base, httpd):
        out = tmp_path / "data"
        env = dict(os.environ, EAGLE_DATA_BASE_URL=base)
        r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        assert len(httpd.requests) == len(fd.FILES)
        for f in fd.FILES.values():
            assert (out / f.path).read_bytes() == (SHARED / f.path).read_bytes(), f.path
        for rel in (fd.STORIES_HF, fd.STORIES_MOE):
            assert sorted(p.name for p in (out / rel).iterdir()) == sorted(p.name for p in (SHARED / rel).iterdir())
            for p in (SHARED / rel).iterdir():
                assert (out / rel / p.name).read_bytes() == p.read_bytes(), f"{rel}/{p.name}"
        r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True,
                           env=env, timeout=300)
        assert r.returncode == 0 and len(httpd.requests) == len(fd.FILES), "a rerun downloaded again"
        assert "up to date models/stories260k-hf" in r.stdout
