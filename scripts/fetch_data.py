"""Fetch the optional test and benchmark data from their public homes, and convert stories260K to Hugging Face.

    python scripts/fetch_data.py                     # everything, into data_dir() (see below)
    python scripts/fetch_data.py --out DIR           # somewhere else
    python scripts/fetch_data.py --only mt_bench gsm8k
    python scripts/fetch_data.py --base-url http://mirror/data   # MIRROR/<path in the data dir> for every file

The data directory is laid out like the team's shared one (``shared/data/README.md``)::

    models/stories260K/stories260K.bin, tok512.bin   llama2.c checkpoint and tokenizer (karpathy/tinyllamas)
    models/stories260k-hf/                           the same model as a LlamaForCausalLM directory (converted here)
    models/stories260k-moe-hf/                       its MixtralForCausalLM copy: 4 experts, each the dense MLP
    bench/mt_bench.jsonl                             FastChat's MT-bench question.jsonl (80 questions)
    bench/HumanEval.jsonl.gz, bench/gsm8k_test.jsonl

After the downloads, the two Hugging Face directories are built from the llama2.c files whenever both are present
(``--no-convert`` skips this); they reproduce the team's shared copies byte for byte.

Where it goes (:func:`data_dir`): ``--out``, else ``$EAGLE_SHARED_DATA``, else ``$XDG_CACHE_HOME/eagle_runtime/data``,
else ``~/.cache/eagle_runtime/data``. Every download is checked against the sha256 recorded below; a file already
present with the right checksum is not downloaded again, and converted files are rewritten only when their bytes
would change, so a rerun against a complete (even read-only) directory writes nothing.

Failures (HTTP error, unreachable host, truncated body, checksum mismatch, a malformed checkpoint) are one line on
stderr and exit status 2. Nothing is left half-written: a download goes to a temporary file beside its target
(``eagle_runtime.atomic``), is checksummed there and renamed into place only when complete and correct.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import re
import struct
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))  # runs from a checkout even without the editable install

from eagle_runtime.atomic import atomic_write, file_sha256 as sha256_file  # noqa: E402
from eagle_runtime.datadir import fetched_data_dir  # noqa: E402

BASE_URL_ENV = "EAGLE_DATA_BASE_URL"
CHUNK = 1 << 16


@dataclass(frozen=True)
class DataFile:
    path: str  # relative to the data directory; also its path under --base-url
    url: str  # its public home
    sha256: str


# Checksums of the copies in the team's shared data folder, which were taken from these homes. mt_bench.jsonl there
# is FastChat's question.jsonl byte for byte (same 48929 bytes and 80 lines, same \u escapes, checked against
# lm-sys/FastChat 589532dc), so its checksum is the upstream file's. The homes are moving branches (main, master):
# a checksum mismatch after an upstream edit is reported, never silently accepted.
FILES: dict[str, DataFile] = {
    "stories260K": DataFile(
        "models/stories260K/stories260K.bin",
        "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/stories260K.bin",
        "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"),
    "tok512": DataFile(
        "models/stories260K/tok512.bin",
        "https://huggingface.co/karpathy/tinyllamas/resolve/main/stories260K/tok512.bin",
        "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"),
    "mt_bench": DataFile(
        "bench/mt_bench.jsonl",
        "https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/question.jsonl",
        "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"),
    "humaneval": DataFile(
        "bench/HumanEval.jsonl.gz",
        "https://github.com/openai/human-eval/raw/master/data/HumanEval.jsonl.gz",
        "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"),
    "gsm8k": DataFile(
        "bench/gsm8k_test.jsonl",
        "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
        "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14"),
}

STORIES_BIN = "models/stories260K/stories260K.bin"
STORIES_TOK = "models/stories260K/tok512.bin"
STORIES_HF = "models/stories260k-hf"
STORIES_MOE = "models/stories260k-moe-hf"


class FetchError(Exception):
    """A failure reported as one line on stderr with exit status 2."""


def data_dir() -> Path:
    """Where fetched data lives: ``$EAGLE_SHARED_DATA``, else ``$XDG_CACHE_HOME/eagle_runtime/data``, else
    ``~/.cache/eagle_runtime/data``. Tests and benchmarks that want fetched data call this (``--out`` is only
    for this script)."""
    if os.environ.get("EAGLE_SHARED_DATA"):
        return Path(os.environ["EAGLE_SHARED_DATA"])
    return fetched_data_dir()  # where eagle_runtime.datadir looks last


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal, so a failure under a test or a log is exactly one line
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled else True)


def download(url: str, dest: Path, sha256: str, *, progress: bool = True, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``dest``: streamed into a temporary file beside it, the byte count checked against
    Content-Length and the sha256 against ``sha256``, then renamed over ``dest``. Raises :class:`FetchError`; on
    any failure neither ``dest`` (if it did not exist) nor the temporary file is left behind."""

    def fill(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                expected = int(length) if length is not None and length.isdigit() else None
                h, got = hashlib.sha256(), 0
                with open(tmp, "wb") as f, _progress(expected, dest.name, progress) as bar:
                    # read(n) returns b"" when the server closes early, without raising (http.client keeps it
                    # quiet for compatibility), so the byte count is checked here
                    for block in iter(lambda: resp.read(CHUNK), b""):
                        f.write(block)
                        h.update(block)
                        got += len(block)
                        bar.update(len(block))
        except urllib.error.HTTPError as e:
            raise FetchError(f"HTTP {e.code} {e.reason} for {url}") from None
        except urllib.error.URLError as e:
            raise FetchError(f"cannot fetch {url}: {e.reason}") from None
        except (http.client.HTTPException, OSError) as e:  # IncompleteRead, a reset, a timeout mid-body
            raise FetchError(f"download of {url} failed: {type(e).__name__}: {e}") from None
        if expected is not None and got != expected:
            raise FetchError(f"truncated download of {url}: {got} of {expected} bytes (connection closed early)")
        if h.hexdigest() != sha256:
            raise FetchError(f"checksum mismatch for {url}: sha256 {h.hexdigest()}, expected {sha256}")

    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dest, fill)


def fetch(out: Path, names: list[str] | None = None, *, base_url: str | None = None,
          table: dict[str, DataFile] | None = None, progress: bool = True, log=print) -> list[str]:
    """Make sure each file of ``table`` (default :data:`FILES`) named in ``names`` (default all) is in ``out`` with
    its checksum; returns the names downloaded. ``base_url`` replaces every home with ``base_url/<path>``."""
    table = FILES if table is None else table
    fetched = []
    for name in names or list(table):
        if name not in table:
            raise FetchError(f"unknown file {name!r}; choose from {', '.join(table)}")
        f = table[name]
        dest = out / f.path
        if dest.is_file():
            if sha256_file(dest) == f.sha256:
                log(f"present  {f.path}")
                continue
            log(f"checksum differs, fetching again: {f.path}")
        url = f"{base_url.rstrip('/')}/{f.path}" if base_url else f.url
        download(url, dest, f.sha256, progress=progress)
        log(f"fetched  {f.path}")
        fetched.append(name)
    return fetched


# ---- llama2.c -> Hugging Face ---------------------------------------------------------------------------------


def read_llama2c(path: Path) -> tuple[dict, dict]:
    """(config, weights) of a llama2.c checkpoint in its original ("legacy", version 0) format.

    Header: 7 int32 ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len`` (a negative vocab_size
    means an unshared classifier follows), then float32 arrays in this order: token embedding (V, D), attention
    norms (L, D), wq (L, D, D), wk (L, KV, D), wv (L, KV, D), wo (L, D, D), FFN norms (L, D), w1 (L, H, D),
    w2 (L, D, H), w3 (L, H, D), final norm (D), RoPE cos and sin tables (2 x seq_len x head_dim/2, unused: HF
    recomputes them), then the classifier (V, D) when unshared. Weights are returned as float32 torch tensors.
    """
    import torch

    raw = path.read_bytes()
    if len(raw) < 28:
        raise FetchError(f"{path.name}: {len(raw)} bytes, too short for a llama2.c header")
    if raw[:4] == b"ak42":  # export.py's version 1/2 files start with this magic
        raise FetchError(f"{path.name}: a versioned llama2.c export; only the original (legacy) format is read")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv:
        raise FetchError(f"{path.name}: implausible llama2.c header {(dim, hidden, n_layers, n_heads, n_kv)}")
    hd = dim // n_heads
    kv = n_kv * hd
    shapes = [("emb", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
              ("wk", (n_layers, kv, dim)), ("wv", (n_layers, kv, dim)), ("wo", (n_layers, dim, dim)),
              ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
              ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)), ("freq", (2, seq_len, hd // 2))]
    if not shared:
        shapes.append(("wcls", (vocab, dim)))
    n = sum(torch.Size(s).numel() for _, s in shapes)
    if len(raw) != 28 + 4 * n:
        raise FetchError(f"{path.name}: {len(raw)} bytes, expected {28 + 4 * n} for this header (truncated?)")
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    w, off = {}, 0
    for key, shape in shapes:
        size = torch.Size(shape).numel()
        w[key] = flat[off:off + size].view(shape)
        off += size
    if shared:
        w["wcls"] = w["emb"]
    config = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
                  vocab_size=vocab, seq_len=seq_len)
    return config, w


def _rotary_to_hf(w, n_heads: int):
    """llama2.c (like Meta's checkpoints) rotates interleaved pairs (0,1), (2,3), ... of each head; HF's LLaMA
    rotates halves (i, i + head_dim/2). Reorder the rows of wq/wk so each head's even rows come first, then its odd
    rows: ``q_hf @ x`` is then the same vector as ``q @ x`` in HF's layout."""
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_state_dict(cfg: dict, w: dict) -> dict:
    """HF LlamaForCausalLM tensors (contiguous float32) from :func:`read_llama2c`'s weights."""
    sd = {"model.embed_tokens.weight": w["emb"], "model.norm.weight": w["rms_final"], "lm_head.weight": w["wcls"]}
    for i in range(cfg["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = w["rms_att"][i]
        sd[p + "self_attn.q_proj.weight"] = _rotary_to_hf(w["wq"][i], cfg["n_heads"])
        sd[p + "self_attn.k_proj.weight"] = _rotary_to_hf(w["wk"][i], cfg["n_kv_heads"])
        sd[p + "self_attn.v_proj.weight"] = w["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = w["wo"][i]
        sd[p + "post_attention_layernorm.weight"] = w["rms_ffn"][i]
        sd[p + "mlp.gate_proj.weight"] = w["w1"][i]
        sd[p + "mlp.down_proj.weight"] = w["w2"][i]
        sd[p + "mlp.up_proj.weight"] = w["w3"][i]
    return {k: v.clone().contiguous() for k, v in sd.items()}


def llama_config(cfg: dict) -> dict:
    # Key order and values as in the shared stories260k-hf/config.json, so a conversion reproduces it byte for byte.
    # tie_word_embeddings stays false even for a shared classifier: lm_head is stored as its own copy.
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg["dim"], "intermediate_size": cfg["hidden_dim"], "num_hidden_layers": cfg["n_layers"],
        "num_attention_heads": cfg["n_heads"], "num_key_value_heads": cfg["n_kv_heads"],
        "head_dim": cfg["dim"] // cfg["n_heads"], "vocab_size": cfg["vocab_size"],
        "max_position_embeddings": cfg["seq_len"], "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32", "attention_bias": False, "mlp_bias": False,
    }


def mixtral_from_llama(config: dict, sd: dict, n_experts: int = 4, top_k: int = 2, seed: int = 0) -> tuple[dict, dict]:
    """A MixtralForCausalLM (config, tensors) whose every expert is the dense MLP: the routing weights of the top-k
    experts sum to 1 and each expert computes the same function, so the logits equal the dense model's whatever
    the router picks. The router is random (N(0, 0.5^2), one torch.Generator seeded ``seed``, layer by layer) so
    routing is not degenerate; seed 0 reproduces the shared stories260k-moe-hf exactly."""
    import torch

    moe_cfg = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias")}
    moe_cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=n_experts,
                   num_experts_per_tok=top_k, router_aux_loss_coef=0.0, output_router_logits=False,
                   sliding_window=None)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if ".mlp." not in k:
            out[k] = v
    for i in range(config["num_hidden_layers"]):
        p, moe = f"model.layers.{i}.mlp.", f"model.layers.{i}.block_sparse_moe."
        for e in range(n_experts):
            out[f"{moe}experts.{e}.w1.weight"] = sd[p + "gate_proj.weight"].clone()
            out[f"{moe}experts.{e}.w2.weight"] = sd[p + "down_proj.weight"].clone()
            out[f"{moe}experts.{e}.w3.weight"] = sd[p + "up_proj.weight"].clone()
        # 0.5: router logits of O(1) on these activations, so the top-2 choice varies from token to token
        out[moe + "gate.weight"] = torch.randn(n_experts, config["hidden_size"], generator=gen) * 0.5
    return moe_cfg, out


def read_tok512(path: Path, vocab_size: int) -> list[tuple[str, float]]:
    """(piece, score) per id of a llama2.c tokenizer file: int32 max_token_length, then per token float32 score,
    int32 byte length, the bytes. Pieces are SentencePiece's with "▁" written as a space, and BOS/EOS as
    "\\n<s>\\n" / "\\n</s>\\n"; this returns them in SentencePiece's spelling ("▁", "<s>", "</s>")."""
    raw = path.read_bytes()
    off, pieces = 4, []
    try:
        while off < len(raw):
            score, n = struct.unpack_from("<fi", raw, off)
            text = raw[off + 8:off + 8 + n]
            if n < 0 or len(text) != n:
                raise FetchError(f"{path.name}: truncated at token {len(pieces)}")
            off += 8 + n
            pieces.append((text.decode("utf-8").strip("\n") if len(pieces) in (1, 2) else
                           text.decode("utf-8").replace(" ", "\u2581"), score))
    except (struct.error, UnicodeDecodeError) as e:
        raise FetchError(f"{path.name}: not a llama2.c tokenizer ({e})") from None
    if len(pieces) != vocab_size:
        raise FetchError(f"{path.name}: {len(pieces)} tokens, the checkpoint has vocab_size {vocab_size}")
    return pieces


_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def tokenizer_json(pieces: list[tuple[str, float]]) -> dict:
    """A ``tokenizers`` BPE tokenizer (byte fallback) that encodes as llama2.c / SentencePiece do.

    llama2.c's encoder repeatedly merges the adjacent pair whose concatenation is the highest-scoring vocabulary
    piece. BPE with one merge per way of splitting each piece into two pieces, ranked by the piece's score (ties by
    id), applies the same merges in the same order. Ids 0-2 are <unk>, <s>, </s> and 3-258 the byte pieces
    <0x00>..<0xFF>, neither of which takes part in merges.
    """
    vocab = {p: i for i, (p, _) in enumerate(pieces)}
    normal = {p for i, (p, _) in enumerate(pieces) if i > 2 and not _BYTE_PIECE.fullmatch(p)}
    ranked = sorted((i for i, (p, _) in enumerate(pieces) if p in normal), key=lambda i: -pieces[i][1])  # stable
    merges = []
    for i in ranked:
        p = pieces[i][0]
        splits = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal]
        merges += sorted(splits, key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    special = [{"id": i, "content": pieces[i][0], "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i in range(3)]
    bos = pieces[1][0]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
        # SentencePiece (add_dummy_prefix) puts "▁" before the text and writes every space as "▁"
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "\u2581"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},  # the prefix space Prepend added
        "model": {"type": "BPE", "dropout": None, "unk_token": pieces[0][0], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }


def _tokenizer_config(pieces, seq_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": pieces[1][0], "eos_token": pieces[2][0],
            "unk_token": pieces[0][0], "add_bos_token": True, "model_max_length": seq_len}


_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` atomically unless ``path`` already holds exactly it (a read-only complete copy stays
    untouched)."""
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic_write(path, lambda p: p.write_bytes(data))
    return True


def _write_model_dir(out: Path, config: dict, state: dict, tok: dict, tok_cfg: dict) -> bool:
    from safetensors.torch import save

    def js(obj, **kw) -> bytes:  # the shared files' formatting: no trailing newline
        return json.dumps(obj, allow_nan=False, **kw).encode("utf-8")

    out.mkdir(parents=True, exist_ok=True)
    files = [("model.safetensors", save(state, metadata={"format": "pt"})),
             ("tokenizer.json", js(tok, ensure_ascii=False)),
             ("tokenizer_config.json", js(tok_cfg, indent=2)),
             ("generation_config.json", js(_GENERATION_CONFIG, indent=2)),
             # last: from_pretrained needs config.json, so a directory a kill interrupted is not taken for a model
             ("config.json", js(config, indent=2))]
    changed = False
    for name, data in files:
        changed |= _write_if_changed(out / name, data)
    return changed


def convert_stories(root: Path, *, log=print) -> None:
    """``root/models/stories260K`` (llama2.c) -> ``stories260k-hf`` (LLaMA) and ``stories260k-moe-hf`` (Mixtral)."""
    cfg, w = read_llama2c(root / STORIES_BIN)
    pieces = read_tok512(root / STORIES_TOK, cfg["vocab_size"])
    config, sd = llama_config(cfg), llama_state_dict(cfg, w)
    tok, tok_cfg = tokenizer_json(pieces), _tokenizer_config(pieces, cfg["seq_len"])
    for rel, (c, s) in ((STORIES_HF, (config, sd)), (STORIES_MOE, mixtral_from_llama(config, sd))):
        changed = _write_model_dir(root / rel, c, s, tok, tok_cfg)
        log(f"{'converted' if changed else 'up to date'} {rel}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="data directory (default: see data_dir())")
    p.add_argument("--only", nargs="+", choices=list(FILES), metavar="NAME",
                   help=f"fetch only these ({', '.join(FILES)})")
    p.add_argument("--base-url", default=os.environ.get(BASE_URL_ENV),
                   help=f"fetch BASE_URL/<path in the data dir> instead of each file's home (or ${BASE_URL_ENV})")
    p.add_argument("--no-convert", action="store_true", help="skip building stories260k-hf and stories260k-moe-hf")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    out = a.out if a.out is not None else data_dir()
    try:
        fetch(out, a.only, base_url=a.base_url, progress=not a.no_progress)
        if not a.no_convert and all((out / f).is_file() for f in (STORIES_BIN, STORIES_TOK)):
            convert_stories(out)
    except FetchError as e:
        print(f"fetch_data: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # the data directory not writable, a full disk
        print(f"fetch_data: error: {type(e).__name__}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"data in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
