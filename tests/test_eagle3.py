"""EAGLE-3 heads: target taps, both checkpoint layouts, refused variants, reduced-vocabulary drafting, exactness
(greedy token for token, sampling in distribution), the training-time test and the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from eagle_kernels import get_ops, reference
from eagle_runtime import DynamicTree, EagleModel, StaticTree, load_head, load_target, save_head
from eagle_runtime.draft3 import Eagle3Head, default_taps, random_head3
from eagle_runtime.generate import causal_mask
from eagle_runtime.text import load_tokenizer
from eagle_runtime.loading import CheckpointError, load_state_dict

from conftest import SHARED_TWIN, require
from spec_helpers import chi2_pvalue, exact_joint, spec_counts
from test_generate import PROMPTS

TORCH_OPS = get_ops("torch")  # the references: what the model-level tests compare against
TAPS = (0, 2, 4)  # stories260k has 5 layers: the defaults (2, 2, 2) would tap one layer thrice (the demo has 16)


def official_keys(H, Ht, nh, nkv, d, inter, Vd, V) -> dict:
    """The official layout's tensors and shapes, as listed in the project's FORMATS.md (EAGLE-3 table)."""
    return {
        "fc.weight": (H, 3 * Ht),
        "midlayer.input_layernorm.weight": (H,),
        "midlayer.hidden_norm.weight": (H,),
        "midlayer.self_attn.q_proj.weight": (nh * d, 2 * H),
        "midlayer.self_attn.k_proj.weight": (nkv * d, 2 * H),
        "midlayer.self_attn.v_proj.weight": (nkv * d, 2 * H),
        "midlayer.self_attn.o_proj.weight": (H, nh * d),
        "midlayer.post_attention_layernorm.weight": (H,),
        "midlayer.mlp.gate_proj.weight": (inter, H),
        "midlayer.mlp.up_proj.weight": (inter, H),
        "midlayer.mlp.down_proj.weight": (H, inter),
        "norm.weight": (H,),
        "lm_head.weight": (Vd, H),
        "d2t": (Vd,),
        "t2d": (V,),
    }


def check_official_layout(d, target, Vd):
    c = target.cfg
    want = official_keys(c.hidden_size, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim,
                         c.intermediate_size, Vd, c.vocab_size)
    state = load_state_dict(d)
    assert {k: tuple(v.shape) for k, v in state.items()} == want
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["draft_vocab_size"] == Vd and cfg["vocab_size"] == c.vocab_size and cfg["num_hidden_layers"] == 1
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is False


@pytest.fixture(scope="module")
def target(lm_dir):
    return load_target(lm_dir, max_len=320)


def _draft_outputs(head, target, seed=0):
    """Head outputs and draft logits on a random prefix (prefill-style pass through the draft cache)."""
    g = torch.Generator().manual_seed(seed)
    tok = torch.randint(3, target.cfg.vocab_size, (2, 9), generator=g)
    _, taps = target.forward_causal(tok, taps=head.target_taps)
    z = torch.zeros(2, dtype=torch.long)
    pos = torch.arange(8).expand(2, 8)
    out = head(head.first_input(taps[:, :8]), tok[:, 1:], target, pos, head.new_cache(2, 32), z, z, causal_mask(2, 8, "cpu"),
               TORCH_OPS)
    return out, head.draft_logits(out, target)


# ---------------------------------------------------------------------------------------------------------------
# Target taps
# ---------------------------------------------------------------------------------------------------------------
def test_target_taps_are_the_inputs_of_the_tapped_layers(lm_dir, target):
    """Taps equal HF ``hidden_states[i]`` (the un-normed input of layer i), in the order asked, both forwards."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(lm_dir), torch_dtype=torch.float32).eval()
    tok = torch.tensor([[1, 45, 300, 7, 99, 12]])
    with torch.no_grad():
        hs = hf(tok, output_hidden_states=True).hidden_states
        feats, taps = target.forward_causal(tok, taps=(4, 0, 2))
        T = tok.shape[1]
        z = torch.zeros(1, dtype=torch.long)
        feats2, taps2 = target(tok, torch.arange(T)[None], target.new_cache(1, 16), z, z, causal_mask(1, T, "cpu"),
                               TORCH_OPS, taps=(4, 0, 2))
    want = torch.cat([hs[4], hs[0], hs[2]], -1)
    torch.testing.assert_close(taps, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(taps2, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats2, feats, rtol=1e-5, atol=1e-5)
    assert default_taps(32) == (2, 16, 29)

    # Tap id L is the last layer's output before the final norm: HF's hidden_states[L] is that output normed.
    L, H = target.cfg.num_layers, target.cfg.hidden_size
    with torch.no_grad():
        _, last = target.forward_causal(tok, taps=(L, 1))
        _, last2 = target(tok, torch.arange(T)[None], target.new_cache(1, 16), z, z, causal_mask(1, T, "cpu"),
                          TORCH_OPS, taps=(L, 1))
    torch.testing.assert_close(last[..., H:], hs[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last2, last, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target.norm(last[..., :H]), hs[L], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(last[..., :H], hs[L], atol=1e-2)  # un-normed, unlike HF's last entry
    with pytest.raises(ValueError, match="tap layers"):
        target.forward_causal(tok, taps=(L + 1,))


# ---------------------------------------------------------------------------------------------------------------
# Loading both layouts, saving the official one, refused variants
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_official_layout_round_trip(tmp_path, target, fmt):
    head = random_head3(target, 100, TAPS, seed=3, std=0.1)
    d = save_head(head, tmp_path / "h", safetensors=fmt == "safetensors")
    assert (d / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).is_file()
    check_official_layout(d, target, 100)
    loaded = load_head(d, target)
    assert isinstance(loaded, Eagle3Head) and loaded.target_taps == TAPS and loaded.draft_vocab_size == 100
    assert torch.equal(loaded.token_map, head.token_map)
    for a, b in zip(_draft_outputs(head, target), _draft_outputs(loaded, target)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _write_official(d, head: Eagle3Head, drop_taps=True, **cfg_changes):
    """A checkpoint as the official repository ships it: no tap list in config.json, max_position_embeddings 2048."""
    save_head(head, d)
    cfg = json.loads((d / "config.json").read_text())
    if drop_taps:
        cfg.pop("eagle_aux_hidden_state_layer_ids")
    cfg.pop("norm_before_residual")
    cfg.update({"max_position_embeddings": 2048, **cfg_changes})
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _write_speculators(d, head: Eagle3Head, extra_cfg=None, extra_state=None, rename=True):
    d.mkdir(parents=True, exist_ok=True)
    layer = json.loads(json.dumps(head.cfg.raw))
    layer.pop("draft_vocab_size", None)
    cfg = {
        "architectures": ["Eagle3Speculator"], "speculators_version": "0.1.0", "speculators_model_type": "eagle3",
        "speculators_config": {"algorithm": "eagle3", "proposal_methods": [
            {"proposal_type": "greedy", "speculative_tokens": 5, "verifier_accept_k": 1}],
            "default_proposal_method": "greedy", "verifier": {"name_or_path": "x", "architectures": ["LlamaForCausalLM"]}},
        "transformer_layer_config": layer, "draft_vocab_size": head.draft_vocab_size, "target_hidden_size": None,
        "norm_before_residual": False, "eagle_aux_hidden_state_layer_ids": list(head.target_taps),
    }
    cfg.update(extra_cfg or {})
    (d / "config.json").write_text(json.dumps(cfg))
    state = {(k.replace("midlayer.", "layers.0.") if rename else k): v for k, v in head.state_dict().items()}
    state.update(extra_state or {})
    from safetensors.torch import save_file

    save_file(state, str(d / "model.safetensors"))
    return d


def test_speculators_layout_loads_to_the_same_head(tmp_path, target):
    head = random_head3(target, 120, TAPS, seed=4, std=0.1)
    loaded = load_head(_write_speculators(tmp_path / "s", head), target)
    assert loaded.target_taps == TAPS and loaded.draft_vocab_size == 120
    for a, b in zip(_draft_outputs(head, target), _draft_outputs(loaded, target)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # norm_before_residual = true is a different head (the residual is the normed hidden state): it loads and differs
    nbr = load_head(_write_speculators(tmp_path / "n", head, {"norm_before_residual": True}), target)
    assert nbr.midlayer.norm_before_residual
    assert not torch.allclose(_draft_outputs(nbr, target)[0], _draft_outputs(head, target)[0])


def test_official_head_defaults_taps_and_sizes_rotary_from_the_target(tmp_path, target, lm_tokenizer):
    tokenizer = lm_tokenizer
    head = random_head3(target, 64, default_taps(target.cfg.num_layers), seed=5)
    loaded = load_head(_write_official(tmp_path / "o", head, max_position_embeddings=16), target)
    assert loaded.target_taps == {5: (2, 2, 2), 16: (2, 8, 13)}[target.cfg.num_layers]  # stories260k, the demo
    assert loaded.rotary.cos.shape[0] == target.max_len == 320  # not the config's 16
    model = EagleModel(target, loaded, tokenizer, tree=DynamicTree(6, 2, 3), backend="torch")
    # stop_on_eos=False: the demo target ends this story after 20 tokens; all 40 run past position 16
    plain = model.generate("Once upon a time", 40, speculative=False, stop_on_eos=False)
    spec = model.generate("Once upon a time", 40, stop_on_eos=False)  # positions past 16
    assert spec.tokens == plain.tokens and len(spec.tokens[0]) == 40
    # taps= overrides the config's
    assert load_head(tmp_path / "o", target, taps=(1, 3, 4)).target_taps == (1, 3, 4)


def test_unsupported_variants_are_refused(tmp_path, target):
    head = random_head3(target, 50, TAPS)
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        with pytest.raises(CheckpointError, match=flag):
            load_head(_write_speculators(tmp_path / flag, head, {flag: True}), target)
    w = torch.ones(head.cfg.hidden_size * 3)
    with pytest.raises(CheckpointError, match="norm_before_fc"):
        load_head(_write_speculators(tmp_path / "in", head, extra_state={"input_norm.weight": w}), target)
    with pytest.raises(CheckpointError, match="fc_norm"):
        load_head(_write_speculators(tmp_path / "fn", head, extra_state={"fc_norm.0.weight": w[:64]}), target)
    extra = {k.replace("midlayer.", "layers.1."): v.clone() for k, v in head.state_dict().items()
             if k.startswith("midlayer.")}
    with pytest.raises(CheckpointError, match="more than one"):
        load_head(_write_speculators(tmp_path / "two", head, extra_state=extra), target)
    with pytest.raises(CheckpointError, match="more than one"):
        load_head(_write_official(tmp_path / "two_o", head, num_hidden_layers=2), target)
    with pytest.raises(CheckpointError, match="'peagle'"):
        load_head(_write_speculators(tmp_path / "pe", head, {"speculators_model_type": "peagle"}), target)
    H, L = target.cfg.hidden_size, target.cfg.num_layers
    with pytest.raises(CheckpointError, match="target_hidden_size"):  # stories260k: 128 for 64
        load_head(_write_official(tmp_path / "th", head, target_hidden_size=2 * H), target)
    with pytest.raises(CheckpointError, match="tap layers"):  # stories260k: 9 of [0, 5]
        load_head(_write_official(tmp_path / "tap", head, drop_taps=False,
                                  eagle_aux_hidden_state_layer_ids=[0, 2, L + 4]), target)
    bad = _write_speculators(tmp_path / "d2t", head, extra_state={"d2t": torch.full((50,), 600, dtype=torch.int64)})
    with pytest.raises(CheckpointError, match="d2t"):
        load_head(bad, target)


# ---------------------------------------------------------------------------------------------------------------
# Drafting over the draft vocabulary
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_topk_expand_maps_draft_ids_through_d2t(impl):
    from eagle_kernels.topk_expand import topk_expand

    g = torch.Generator().manual_seed(7)
    Vd, V = 111, 500
    ids = torch.randperm(V, generator=g)[:Vd].sort().values
    token_map = torch.arange(Vd) + (ids - torch.arange(Vd))  # target id = draft id + d2t[draft id]
    logits = torch.randn(2, 3, Vd, generator=g)
    parent = torch.randn(2, 3, generator=g)
    fn = reference.topk_expand if impl == "reference" else topk_expand
    got = fn(logits, parent, 5, 7, token_map)
    plain = reference.topk_expand(logits, parent, 5, 7)
    assert torch.equal(got.child_tokens, ids[plain.child_tokens])
    assert torch.equal(got.top_tokens, ids[plain.top_tokens])
    assert torch.equal(got.top_index, plain.top_index)
    torch.testing.assert_close(got.child_scores, plain.child_scores)


def test_draft_reads_only_the_draft_vocabulary(target, lm_tokenizer):
    """Every draft logits row the trees expand has draft_vocab_size entries; the target's lm_head runs only on
    the prefill's last position and the verified trees."""
    head = random_head3(target, 77, TAPS)
    assert tuple(head.lm_head.weight.shape) == (77, target.cfg.hidden_size)
    model = EagleModel(target, head, lm_tokenizer, tree=DynamicTree(8, 3, 2), backend="torch")
    seen, target_rows = [], []
    orig = model.ops.topk_expand

    def spy(logits, parent_scores, k, out_k=None, token_map=None):
        seen.append((logits.shape[-1], token_map))
        return orig(logits, parent_scores, k, out_k, token_map)

    model.ops = type(model.ops)(**{**model.ops.__dict__, "topk_expand": spy})
    handle = target.lm_head.register_forward_hook(lambda m, inp, out: target_rows.append(inp[0].shape))
    try:
        res = model.generate(["Once upon a time", "The dog"], 12)
    finally:
        handle.remove()
    assert seen and all(v == 77 and t is head.token_map for v, t in seen)
    cycles = max(len(a) for a in res.accept_lengths)
    assert len(target_rows) == 1 + cycles  # prefill + one verify per cycle, nothing from the draft
    assert all(set(res.tokens[b]) <= set(range(target.cfg.vocab_size)) for b in range(2))


# ---------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------
TREES = {"dynamic": DynamicTree(6, 2, 3), "static": StaticTree([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])}


def _greedy_equal(model, prompts, batch, n):
    plain = model.generate(prompts, n, speculative=False)
    lens = []
    for i in range(0, len(prompts), batch):
        spec = model.generate(prompts[i : i + batch], n)
        for j, toks in enumerate(spec.tokens):
            assert toks == plain.tokens[i + j], f"prompt {prompts[i + j]!r}: speculative output differs from greedy"
        lens += [a for seq in spec.accept_lengths for a in seq]
    return sum(lens) / len(lens)


@pytest.mark.parametrize("tree,taps", [("dynamic", TAPS), ("static", TAPS), ("dynamic", "last")])
def test_greedy_exact_random_head3(target, lm_tokenizer, tree, taps):
    """Also with taps (1, 3, L), L the last layer's output (stories260k: 5, the demo: 16; the verify forward hands
    it over from the final norm)."""
    taps = (1, 3, target.cfg.num_layers) if taps == "last" else taps
    model = EagleModel(target, random_head3(target, 200, taps, seed=1), lm_tokenizer, tree=TREES[tree],
                       backend="torch")
    for batch in (1, 3):
        _greedy_equal(model, PROMPTS, batch, 10)


@pytest.fixture(scope="module")
def demo3():
    from eagle_runtime.demo import DEMO_DIR

    require(DEMO_DIR / "head3" / "config.json")
    t = load_target(DEMO_DIR / "target", max_len=48)  # short: the sampling test runs batches of 1000
    return EagleModel(t, load_head(DEMO_DIR / "head3", t), load_tokenizer(DEMO_DIR / "target"), backend="torch")


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_greedy_exact_demo_eagle3(demo3, tree):
    demo3.tree = TREES[tree]
    assert isinstance(demo3.head, Eagle3Head) and demo3.head.draft_vocab_size < demo3.target.cfg.vocab_size
    taus = [_greedy_equal(demo3, PROMPTS, batch, 12) for batch in (1, 3)]
    assert min(taus) > 1.5, f"the trained EAGLE-3 head should draft well, tau = {taus}"


def test_sampling_matches_target_distribution_demo_eagle3(demo3):
    """The same chi-square test as EAGLE-1's (tests/test_generate.py), drafts from the reduced vocabulary."""
    demo3.tree = DynamicTree(6, 2, 3)
    prompt = demo3.encode("Once upon a time, there was a little")[0]
    joint = exact_joint(demo3, prompt, 1.0, 4)
    counts, taus, n = {}, [], 0
    for seed in range(2):  # chunks of 1000 keep the KV cache small (400 MB)
        c, out = spec_counts(demo3, prompt, 1000, 1.0, 4, seed=100 + seed)
        for k, v in c.items():
            counts[k] = counts.get(k, 0) + v
        taus.append(out.tau)
        n += 1000
    tau = sum(taus) / len(taus)
    assert tau > 1.3, "the test must exercise accepted draft tokens"
    p = chi2_pvalue(counts, joint, n)
    print(f"EAGLE-3 speculative sampling vs exact target joint of 3 tokens: chi-square p = {p:.3g}, tau {tau:.2f}")
    assert p > 1e-3, f"speculative sampling deviates from the target distribution: chi-square p = {p:.2e}"


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
def test_training_time_test_equals_drafting(target):
    """Step j of the training-time test at index q equals the head drafting a chain after true position q."""
    from eagle_runtime.train import ttt_forward

    head = random_head3(target, 90, TAPS, seed=2, std=0.2)
    tok = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    _, taps = target.forward_causal(tok, taps=head.target_taps)
    steps = [o for o in ttt_forward(head, tok, taps, target, 3)]
    q = 5
    n = q + 1
    cache = head.new_cache(1, 64)
    z = torch.zeros(1, dtype=torch.long)
    h = head(head.first_input(taps[:, :n]), tok[:, 1 : n + 1], target, torch.arange(n)[None], cache, z, z,
             causal_mask(1, n, "cpu"), TORCH_OPS)[:, q:]
    # fp32 rounding grows with the hidden state's size (|h| reaches ~25 by step 2, errors ~1.2e-5): the absolute
    # tolerance is relative to it; a wrong position, mask or input shows as differences of order |h|.
    torch.testing.assert_close(h[0, 0], steps[0][0, q], rtol=1e-5, atol=2e-6 * float(steps[0][0, q].abs().max()))
    L = torch.tensor([n])
    for j in (1, 2):
        h = head(h, tok[:, q + 1 + j : q + 2 + j], target, torch.tensor([[q + j]]), cache, L, L + j - 1,
                 torch.ones(1, 1, j, dtype=torch.bool), TORCH_OPS)
        torch.testing.assert_close(h[0, 0], steps[j][0, q], rtol=1e-5, atol=2e-6 * float(steps[j][0, q].abs().max()))


def test_trainer_learns_and_saves_the_official_layout(tmp_path, target, lm_tokenizer, lm_corpus):
    from eagle_runtime.train import Eagle3TrainConfig, draft_vocabulary, load_corpus, pack, train_head3

    tokenizer, corpus = lm_tokenizer, lm_corpus
    # the demo head (width 128) on the demo's own sampled stories learns slower per step: loss ratio last 4 / first
    # 4 steps 0.84 after 24 steps, 0.76 after 48; 60 steps take ~3 s
    steps = 24 if target.cfg.num_layers == 5 else 60
    cfg = Eagle3TrainConfig(steps=steps, batch_size=4, seq_len=64, lr=3e-3, warmup=4, eval_every=steps, eval_batches=1,
                            draft_vocab=160, ttt_steps=3, taps="0,2,4")
    res = train_head3(target, corpus, tmp_path / "h", cfg, tokenizer=tokenizer, progress=False)
    h = res["history"]
    assert res["steps"] == steps and sum(r["loss"] for r in h[-4:]) < 0.8 * sum(r["loss"] for r in h[:4])
    check_official_layout(tmp_path / "h", target, 160)
    head = load_head(tmp_path / "h", target)
    assert head.target_taps == TAPS
    # the draft vocabulary is the corpus' most frequent tokens
    docs = load_corpus(corpus, tokenizer)
    import random

    random.Random(0).shuffle(docs)
    t, m = pack(docs[max(1, int(len(docs) * 0.05)) :], 64)
    counts = torch.bincount(t[m > 0], minlength=512)  # loss-masked positions (not the BOS of each story)
    assert torch.equal(head.token_map, draft_vocabulary(t, m, 512, 160))
    assert counts[head.token_map].min() >= counts[~head.t2d].max()


def test_train_cli_head_flag_errors(tmp_path, lm_dir, capsys):
    from eagle_runtime.train.command import main

    L = json.loads((lm_dir / "config.json").read_text())["num_hidden_layers"]  # stories260k 5, the demo 16
    base = ["--head", "eagle3", "--base", str(lm_dir), "--corpus", str(tmp_path / "c.txt"), "--out", str(tmp_path)]
    for bad in (["--ttt-decay", "0"], ["--draft-vocab", "0"], ["--taps", "a,b"]):
        assert main(base + bad) == 2  # one-line errors, status 2 (as --head eagle1)
    # stories260k has 5 layers: tap 5 is its last layer's output, 6 names nothing (checked before the corpus is read)
    capsys.readouterr()
    assert main(base + ["--taps", f"0,2,{L + 1}"]) == 2
    assert f"layer ids must lie in [0, {L}]" in capsys.readouterr().err
    assert main(base + ["--taps", f"0,2,{L}"]) == 2  # only the missing corpus now
    assert "layer ids" not in capsys.readouterr().err
    assert main(base) == 2  # missing corpus
    with pytest.raises(SystemExit) as e:
        main(["--head", "eagle4"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------------
def test_best_head_is_the_faster_one(monkeypatch):
    """The demo default head is picked by tokens/s over the measured trees, not by tau."""
    import eagle_runtime.demo as demo

    require(demo.DEMO_DIR / "head3" / "config.json")

    def info(s1, s3, tau1=3.0, tau3=3.1):
        m = {"eagle1": {"tau": tau1, "tokens_per_s": s1}, "eagle3": {"tau": tau3, "tokens_per_s": s3}}
        return {"head3": {"measure": {"8,3,2": m, "16,4,4": dict(m)}}}

    monkeypatch.setattr(demo, "build_info", lambda: info(300.0, 250.0))
    assert demo.best_head() == "eagle1"  # higher tau, slower: not chosen
    monkeypatch.setattr(demo, "build_info", lambda: info(250.0, 300.0, tau1=3.2, tau3=3.0))
    assert demo.best_head() == "eagle3"
    monkeypatch.setattr(demo, "build_info", lambda: {"head3": {"measure": {}}})
    assert demo.best_head() == "eagle1"


@pytest.mark.parametrize("questions", ["builtin", pytest.param("mt_bench", marks=SHARED_TWIN)])
def test_benchmark_names_the_head(tmp_path, questions):
    """On the benchmark's built-in questions (a bare clone) and on the shared MT-bench file."""
    from eagle_runtime.demo import DEMO_DIR, best_head

    require(DEMO_DIR / "head3" / "config.json")
    from test_demo_and_bench import _bench_module

    bench = _bench_module()
    if questions == "mt_bench":
        require(bench.DEFAULT_QUESTIONS)
    else:
        bench.DEFAULT_QUESTIONS = tmp_path / "absent.jsonl"  # what a clone without the shared data reads
    common = ["--num-questions", "1", "--max-new-tokens", "6", "--temperatures", "0", "--no-hf", "--out", str(tmp_path)]
    res = bench.main(["--head", "eagle3", *common])
    assert res["config"]["head"] == "eagle3" and res["config"]["draft"].endswith("head3")
    assert res["config"]["draft_vocab_size"] < 512 and res["results"]["0"]["eagle_identical_to_plain"]["all"]
    assert best_head() in ("eagle1", "eagle3")
    with pytest.raises(SystemExit) as e:  # a head of the other kind than --head asks for
        bench.main(["--base", str(DEMO_DIR / "target"), "--draft", str(DEMO_DIR / "head"), "--head", "eagle3", *common])
    assert e.value.code == 2
