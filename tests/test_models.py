"""Our LLaMA/Mixtral modules and loader against HF transformers on the same weights (float32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from eagle_kernels.reference import process_logits, sample_tokens
from eagle_runtime import load_target
from eagle_runtime.config import ConfigError
from eagle_runtime.generate import EagleModel, causal_mask
from eagle_runtime.loading import CheckpointError
from eagle_kernels import get_ops

transformers = pytest.importorskip("transformers")


def _ours_full(model, tokens):
    """Logits of whole sequences through the cached forward path (prefill with a causal tree mask)."""
    B, T = tokens.shape
    zero = torch.zeros(B, dtype=torch.long)
    feats = model(tokens, torch.arange(T).expand(B, T), model.new_cache(B, T + 4), zero, zero, causal_mask(B, T, "cpu"),
                  get_ops("torch"))
    return model.logits(feats)


def _assert_close(ours, ref, what):
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= 1e-4 * scale + 1e-5, f"{what}: max abs error {err:.3e} vs logit scale {scale:.3e}"


# demo_moe_dir: the Mixtral copy of the demo target (conftest), the repo-only twin of stories260k-moe-hf
@pytest.mark.parametrize("which", ["demo_target_dir", "demo_moe_dir",
                                   pytest.param("stories_dir", marks=pytest.mark.shared_data),
                                   pytest.param("stories_moe_dir", marks=pytest.mark.shared_data)])
def test_shared_checkpoints_match_hf(which, request):
    path = request.getfixturevalue(which)
    ours = load_target(path, max_len=128)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(tokens).logits
    _assert_close(_ours_full(ours, tokens), ref, which)
    _assert_close(ours.logits(ours.forward_causal(tokens)), ref, which + " (causal path)")


def _random_hf(kind: str, **kw):
    torch.manual_seed(0)
    common = dict(vocab_size=111, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=256)
    common.update(kw)
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **common)
        return transformers.MixtralForCausalLM(cfg).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


@pytest.mark.parametrize(
    "kind,kw,fmt",
    [
        ("llama", dict(num_key_value_heads=2, rope_theta=500000.0), "safetensors"),  # GQA 4:1
        ("llama", dict(tie_word_embeddings=True), "bin"),
        ("llama", dict(rope_scaling=LLAMA3_ROPE, num_key_value_heads=8), "sharded"),
        ("mixtral", dict(), "safetensors"),
    ],
    ids=["gqa4-theta5e5", "tied-bin", "llama3-rope-sharded", "mixtral"],
)
def test_random_configs_match_hf(tmp_path, kind, kw, fmt):
    hf = _random_hf(kind, **kw)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
    else:
        hf.config.save_pretrained(tmp_path)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if fmt == "bin":
            torch.save(state, tmp_path / "pytorch_model.bin")
        else:  # two safetensors shards with an index
            keys = sorted(state)
            shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
            wmap = {}
            for name, ks in shards.items():
                save_file({k: state[k] for k in ks}, str(tmp_path / name))
                wmap.update({k: name for k in ks})
            (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    ours = load_target(tmp_path, max_len=256)
    tokens = torch.randint(0, 111, (2, 150), generator=torch.Generator().manual_seed(1))  # past the llama3 window
    with torch.no_grad():
        ref = hf(tokens).logits
    _assert_close(_ours_full(ours, tokens), ref, f"{kind} {kw} {fmt}")


def test_plain_greedy_equals_hf_generate(demo_target_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(demo_target_dir, dtype=torch.float32).eval()
    model = EagleModel.from_pretrained(demo_target_dir, None, backend="torch", max_len=256)
    for prompt in ["Once upon a time", "The cat sat", "Tom had a red ball and"]:
        ids = model.encode(prompt)[0]
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
        ours = model.generate([ids], 40, speculative=False, stop_on_eos=False)
        assert ours.tokens[0] == ref[0, len(ids):].tolist(), prompt


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 1.0, 20), (0.8, 0.8, 50)])
def test_sampling_distribution_matches_hf(demo_target_dir, temperature, top_p, top_k):
    """Our processed distribution equals HF's warpers', and our sampler draws from it (chi-square)."""
    from scipy.stats import chisquare
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    model = EagleModel.from_pretrained(demo_target_dir, None, backend="torch", max_len=128)
    ids = torch.tensor([model.encode("Once upon a time, there was a")[0]])
    logits = _ours_full(model.target, ids)[:, -1]
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k:
        warp.append(TopKLogitsWarper(top_k))
    if top_p < 1:
        warp.append(TopPLogitsWarper(top_p))
    hf_probs = torch.softmax(warp(ids, logits.clone()), dim=-1)[0]
    B = 4000
    ours = process_logits(logits, torch.tensor([temperature]), torch.tensor([top_p]), torch.tensor([top_k]))[0]
    assert torch.allclose(ours, hf_probs, atol=1e-6), (ours - hf_probs).abs().max()
    draws = sample_tokens(logits.expand(B, -1), torch.full((B,), temperature), torch.full((B,), top_p),
                          torch.full((B,), top_k), torch.tensor(7), torch.tensor(0))
    counts = torch.bincount(draws, minlength=512).double()
    assert counts[hf_probs == 0].sum() == 0, "sampled a token outside the processed support"
    exp = hf_probs.double() * B
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    ex = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = ex > 0
    p = chisquare(obs[keep].numpy(), ex[keep].numpy() * obs[keep].sum().item() / ex[keep].sum().item()).pvalue
    assert p > 1e-3, f"chi-square p = {p:.2e}"


def test_loader_errors(tmp_path, demo_target_dir):
    with pytest.raises(FileNotFoundError):
        load_target(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match="unknown architecture"):
        load_target(tmp_path)
    cfg = json.loads((demo_target_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no weights"):
        load_target(tmp_path)
    cfg["hidden_size"] *= 2  # a size the weights do not have
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").symlink_to(demo_target_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape"):
        load_target(bad)


def _sharded_target(d, demo_target_dir):
    """The demo target as two safetensors shards with an index in ``d``; returns (shard names, weight map)."""
    from safetensors.torch import load_file

    full = load_file(str(demo_target_dir / "model.safetensors"))
    keys = sorted(full)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text((demo_target_dir / "config.json").read_text())
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    wmap = {}
    for name, part in zip(names, (keys[::2], keys[1::2])):
        save_file({k: full[k] for k in part}, str(d / name))
        wmap.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return names, wmap


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_shards_outside_the_directory_are_refused(tmp_path, demo_target_dir, how):
    """An index naming a shard outside the model directory (``..``, an absolute path, a symlink that leaves it) is a
    one-line error naming the shard, for the plain and the tensor-parallel loader; the outside file is never read."""
    from eagle_runtime.config import ModelConfig
    from eagle_runtime.parallel import ShardPlan, read_shards

    d = tmp_path / "model"
    names, wmap = _sharded_target(d, demo_target_dir)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (d / names[1]).rename(outside / names[1])
    bad = {"dotdot": f"../elsewhere/{names[1]}", "absolute": str(outside / names[1]), "symlink": names[1]}[how]
    if how == "symlink":
        (d / names[1]).symlink_to(outside / names[1])
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: bad if v == names[1] else v for k, v in wmap.items()}}))
    plan = ShardPlan.make(ModelConfig.from_file(d / "config.json"), 2, 0, True)
    for load in (lambda: load_target(d, max_len=64), lambda: read_shards(d, plan)):
        with pytest.raises(ValueError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and bad in msg and "outside" in msg, msg


def test_index_shards_in_subfolders_and_the_hub_cache_still_load(tmp_path, demo_target_dir):
    """What stays allowed: a shard in a subfolder, and the Hugging Face cache's layout, where a snapshot's files are
    symlinks into the repository's ``blobs`` folder (``snapshots/<rev>/x -> ../../blobs/<hash>``)."""
    ref = load_target(demo_target_dir, max_len=64).state_dict()
    d = tmp_path / "sub"
    names, wmap = _sharded_target(d, demo_target_dir)
    (d / "shards").mkdir()
    (d / names[0]).rename(d / "shards" / names[0])
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f"shards/{v}" if v == names[0] else v for k, v in wmap.items()}}))
    repo = tmp_path / "hub" / "models--org--stories"
    snap = repo / "snapshots" / "0123abc"
    _sharded_target(snap, demo_target_dir)
    (repo / "blobs").mkdir()
    for f in list(snap.iterdir()):
        (f.rename(repo / "blobs" / f"blob-{f.name}"))
        f.symlink_to(Path("..") / ".." / "blobs" / f"blob-{f.name}")
    for where in (d, snap):
        got = load_target(where, max_len=64).state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref), where
