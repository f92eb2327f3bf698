"""Draft-head training: it learns, saves the published EAGLE-1 format, reloads exactly, resumes."""

from __future__ import annotations

import json

import pytest
import torch

from eagle_runtime import EagleModel, load_head, load_target
from eagle_runtime.text import load_tokenizer
from eagle_runtime.loading import load_state_dict
from eagle_runtime.train import TrainConfig, encode_chat, train_head


PUBLISHED_KEYS = {
    "fc.weight", "fc.bias",
    "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}  # fmt: skip


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def trained_run(lm, request, tmp_path_factory):
    """(head directory, steps it was trained for, the target's hidden size): stories260k's trained_head_dir (400
    steps of 8 x 128 tokens), or a demo head trained here on the demo target's own stories: 200 steps of 4 x 64
    tokens (6 s on one core; at 120 steps the accuracy gain was 0.26 against the 0.2 asked, at 200 0.42)."""
    if lm == "stories260k":
        return request.getfixturevalue("trained_head_dir"), 400, 64
    out = tmp_path_factory.mktemp("demo-head")
    cfg = TrainConfig(steps=200, batch_size=4, seq_len=64, lr=3e-3, warmup=20, eval_every=200, eval_batches=2)
    train_head(request.getfixturevalue("demo_target_dir"), request.getfixturevalue("demo_corpus"), out, cfg,
               progress=False)
    return out, 200, 128


def test_training_learns_and_saves_published_format(trained_run):
    trained_head_dir, steps, hidden = trained_run
    hist = json.loads((trained_head_dir / "train_config.json").read_text())
    assert hist["steps_done"] == steps
    state = torch.load(trained_head_dir / "train_state.pt", weights_only=False)
    h = state["history"]
    assert _mean([r["loss"] for r in h[-40:]]) < 0.8 * _mean([r["loss"] for r in h[:20]])
    assert _mean([r["acc"] for r in h[-40:]]) > _mean([r["acc"] for r in h[:20]]) + 0.2
    keys = set(load_state_dict(trained_head_dir))
    assert keys == PUBLISHED_KEYS, keys ^ PUBLISHED_KEYS
    cfg = json.loads((trained_head_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == hidden and cfg["vocab_size"] == 512


def test_saved_head_reloads_to_identical_outputs(tmp_path, lm_dir, lm_corpus):
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=64, eval_every=6, eval_batches=1)
    target = load_target(lm_dir, max_len=128)
    tok = load_tokenizer(lm_dir)
    out = tmp_path / "head"
    train_head(target, lm_corpus, out, cfg, tokenizer=tok, progress=False)
    reloaded = load_head(out, target)
    # the in-memory state saved for --resume and the published files hold the same tensors
    st = torch.load(out / "train_state.pt", weights_only=False)["head"]
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, st[k]), k
    a = EagleModel(target, reloaded, tok, tree="static", backend="torch").generate("Once upon a time", 16)
    b = EagleModel(target, load_head(out, target), tok, tree="static", backend="torch").generate("Once upon a time", 16)
    assert a.tokens == b.tokens and a.accept_lengths == b.accept_lengths
    # resume continues from the saved step
    res = train_head(target, lm_corpus, out, TrainConfig(**{**cfg.__dict__, "steps": 9}),
                     resume=True, tokenizer=tok, progress=False)
    assert res["steps"] == 9 and len(res["history"]) == 9


def test_chat_loss_mask_covers_assistant_turns_only(lm_dir):
    tok = load_tokenizer(lm_dir)
    ids, mask = encode_chat(tok, [("user", "What is two and two?"), ("assistant", "Four."), ("user", "Thanks")])
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Four" in text and "two" not in text


def test_train_cli_errors(tmp_path, lm_dir):
    from eagle_runtime.train.command import main

    assert main(["--base", str(lm_dir), "--corpus", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
