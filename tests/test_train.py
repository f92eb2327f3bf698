"""Draft-head training: it learns, saves the published EAGLE-1 format, reloads exactly, resumes."""

from __future__ import annotations

import json

import pytest
import torch

from eagle_runtime import EagleModel, load_head, load_target
from eagle_runtime.text import load_tokenizer
from eagle_runtime.loading import load_state_dict
from eagle_runtime.train import TrainConfig, encode_chat, train_head

from conftest import CORPUS, require

PUBLISHED_KEYS = {
    "fc.weight", "fc.bias",
    "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
    "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight",
    "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
    "layers.0.post_attention_layernorm.weight",
}  # fmt: skip


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.shared_data
def test_training_learns_and_saves_published_format(tmp_path, stories_dir, trained_head_dir):
    hist = json.loads((trained_head_dir / "train_config.json").read_text())
    assert hist["steps_done"] == 400
    state = torch.load(trained_head_dir / "train_state.pt", weights_only=False)
    h = state["history"]
    assert _mean([r["loss"] for r in h[-40:]]) < 0.8 * _mean([r["loss"] for r in h[:20]])
    assert _mean([r["acc"] for r in h[-40:]]) > _mean([r["acc"] for r in h[:20]]) + 0.2
    keys = set(load_state_dict(trained_head_dir))
    assert keys == PUBLISHED_KEYS, keys ^ PUBLISHED_KEYS
    cfg = json.loads((trained_head_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["hidden_size"] == 64 and cfg["vocab_size"] == 512


@pytest.mark.shared_data
def test_saved_head_reloads_to_identical_outputs(tmp_path, stories_dir):
    require(CORPUS / "tinystories_val.txt")
    cfg = TrainConfig(steps=6, batch_size=2, seq_len=64, eval_every=6, eval_batches=1)
    target = load_target(stories_dir, max_len=128)
    tok = load_tokenizer(stories_dir)
    out = tmp_path / "head"
    train_head(target, CORPUS / "tinystories_val.txt", out, cfg, tokenizer=tok, progress=False)
    reloaded = load_head(out, target)
    # the in-memory state saved for --resume and the published files hold the same tensors
    st = torch.load(out / "train_state.pt", weights_only=False)["head"]
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, st[k]), k
    a = EagleModel(target, reloaded, tok, tree="static", backend="torch").generate("Once upon a time", 16)
    b = EagleModel(target, load_head(out, target), tok, tree="static", backend="torch").generate("Once upon a time", 16)
    assert a.tokens == b.tokens and a.accept_lengths == b.accept_lengths
    # resume continues from the saved step
    res = train_head(target, CORPUS / "tinystories_val.txt", out, TrainConfig(**{**cfg.__dict__, "steps": 9}),
                     resume=True, tokenizer=tok, progress=False)
    assert res["steps"] == 9 and len(res["history"]) == 9


@pytest.mark.shared_data
def test_chat_loss_mask_covers_assistant_turns_only(stories_dir):
    tok = load_tokenizer(stories_dir)
    ids, mask = encode_chat(tok, [("user", "What is two and two?"), ("assistant", "Four."), ("user", "Thanks")])
    assert len(ids) == len(mask) and 0 < sum(mask) < len(mask)
    text = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "Four" in text and "two" not in text


@pytest.mark.shared_data
def test_train_cli_errors(tmp_path, stories_dir):
    from eagle_runtime.train.command import main

    assert main(["--base", str(stories_dir), "--corpus", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")]) == 2
