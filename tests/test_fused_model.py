"""Load-time weight fusion: merged qkv_proj/gate_up_proj, HF-layout state dicts, same outputs as unfused."""

from __future__ import annotations

import pytest
import torch

from eagle_kernels import get_ops
from eagle_runtime import load_head, load_target, random_head
from eagle_runtime.draft import save_head
from eagle_runtime.generate import causal_mask
from eagle_runtime.loading import load_state_dict
from eagle_runtime.model import MLP, Transformer


def _features(model, tokens, ops):
    B, T = tokens.shape
    cache = model.new_cache(B, 32)
    zero = torch.zeros(B, dtype=torch.long)
    pos = torch.arange(T)[None].expand(B, T)
    return model(tokens, pos, cache, zero, zero, causal_mask(B, T, "cpu"), ops), cache


def test_loaded_target_is_fused_and_keeps_the_hf_layout(demo_target_dir):
    model = load_target(demo_target_dir, max_len=32)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert attn.fused and mlp.fused and not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    assert attn.qkv_proj.out_features == (attn.num_heads + 2 * attn.num_kv_heads) * attn.head_dim
    hf = load_state_dict(demo_target_dir)
    state = model.state_dict()
    with torch.device("meta"):
        unfused_keys = set(Transformer(model.cfg, 32).state_dict())
    assert set(state) == unfused_keys
    for name in ("layers.1.self_attn.k_proj.weight", "layers.1.self_attn.v_proj.weight", "layers.0.mlp.up_proj.weight"):
        assert torch.equal(state[name], hf["model." + name].float()), name


@pytest.mark.interpreter
def test_fused_equals_unfused(demo_target_dir):
    fused = load_target(demo_target_dir, max_len=32)
    plain = Transformer(fused.cfg, 32).eval().requires_grad_(False)
    plain.load_state_dict(fused.state_dict())  # HF layout into separate projections
    assert not plain.layers[0].self_attn.fused
    tokens = torch.randint(0, fused.cfg.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref, ref_cache = _features(plain, tokens, get_ops("torch"))
        for ops in (get_ops("torch"), get_ops("triton")):
            got, cache = _features(fused, tokens, ops)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{ops.name}")
            torch.testing.assert_close(cache, ref_cache, rtol=1e-5, atol=1e-5, msg=f"{ops.name} cache")
        torch.testing.assert_close(fused.forward_causal(tokens), ref, rtol=1e-5, atol=1e-5)
        # loading HF-layout tensors into an already fused model merges them
        fused.load_state_dict(plain.state_dict())
        torch.testing.assert_close(_features(fused, tokens, get_ops("torch"))[0], ref, rtol=1e-5, atol=1e-5)


def test_fused_head_saves_in_the_published_layout(tmp_path, demo_target_dir):
    target = load_target(demo_target_dir, max_len=32)
    head = random_head(target, seed=3, std=0.1)
    assert head.layers[0].self_attn.fused and head.layers[0].input_layernorm is None
    save_head(head, tmp_path)
    saved = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert "layers.0.self_attn.q_proj.weight" in saved and "layers.0.mlp.gate_proj.weight" in saved
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in saved)
    again = load_head(tmp_path, target)
    B, T = 1, 5
    feats = torch.randn(B, T, target.cfg.hidden_size)
    tokens = torch.randint(0, target.cfg.vocab_size, (B, T))
    pos = torch.arange(T)[None]
    zero = torch.zeros(B, dtype=torch.long)
    with torch.inference_mode():
        outs = [h(feats, tokens, target, pos, h.new_cache(B, 16), zero, zero, causal_mask(B, T, "cpu"), get_ops("torch"))
                for h in (head, again)]
        assert torch.equal(outs[0], outs[1])
        torch.testing.assert_close(head.forward_causal(feats, tokens, target), outs[0], rtol=1e-5, atol=1e-5)


def test_training_path_of_an_unfused_layer_is_the_hf_expression():
    from eagle_runtime.config import ModelConfig

    cfg = ModelConfig.from_dict(dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=50,
                                     hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    mlp = MLP(cfg)
    x = torch.randn(3, 32, requires_grad=True)
    y = mlp(x)
    torch.testing.assert_close(y, mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
    y.sum().backward()
    assert x.grad is not None and mlp.gate_proj.weight.grad is not None
