"""The op table reaches every forward as an argument (issue 23, item 4): nothing is read from the model, MoE included,
and the ``cpu`` table's per-forward memos live for one forward only."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import torch

from eagle_kernels import Ops, get_ops
from eagle_runtime import random_head
from eagle_runtime.config import ModelConfig
from eagle_runtime.decoder import causal_mask
from eagle_runtime.model import Transformer

# the ops of a decoder layer's forward (the rest of the table belongs to the decode cycle)
LAYER_OPS = ("rms_norm", "add_rms_norm", "rope_kv_write", "tree_attention", "silu_mul", "moe_experts")


def _target(moe: bool, layers: int = 2) -> Transformer:
    d = dict(model_type="mixtral" if moe else "llama", vocab_size=64, hidden_size=32, intermediate_size=48,
             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if moe:
        d.update(num_local_experts=4, num_experts_per_tok=2)
    model = Transformer(ModelConfig.from_dict(d), 64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the experts are torch.empty until loaded
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return model.eval().requires_grad_(False).fuse_weights_()


def _counting(ops: Ops) -> tuple[Ops, Counter]:
    """``ops`` with every layer op counted, the per-forward binding kept (the spy wraps what it binds)."""
    calls: Counter = Counter()

    def wrap(name, fn):
        def spy(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return spy

    def wrapped(table: Ops) -> Ops:
        return dataclasses.replace(table, **{n: wrap(n, getattr(table, n)) for n in LAYER_OPS},
                                   bind=None if table.bind is None else lambda t: wrapped(ops.bind(ops)))

    return wrapped(ops), calls


def _forward(model, ops, T=5):
    tok = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    z = torch.zeros(2, dtype=torch.long)
    with torch.inference_mode():
        return model(tok, torch.arange(T).expand(2, T), model.new_cache(2, 16), z, z, causal_mask(2, T, "cpu"), ops)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_every_layer_op_comes_from_the_table_passed(moe, backend):
    model = _target(moe)
    assert not hasattr(model, "ops"), "the model must not hold an op table: it is passed per forward"
    spy, calls = _counting(get_ops(backend))
    out = _forward(model, spy)
    n = model.cfg.num_layers
    # per layer: the input norm (plain for layer 0, fused with the residual add after), the post-attention norm,
    # rotary + KV write, attention, and the MLP's activation (dense) or the routed experts (MoE); the final norm
    want = {"rms_norm": 1, "add_rms_norm": 2 * n, "rope_kv_write": n, "tree_attention": n,
            "silu_mul": 0 if moe else n, "moe_experts": n if moe else 0}
    assert dict(calls) == {k: v for k, v in want.items() if v}
    torch.testing.assert_close(out, _forward(model, get_ops("torch")), rtol=1e-5, atol=1e-6)


def test_the_head_runs_on_the_table_passed():
    target = _target(False)
    head = random_head(target, seed=1)
    spy, calls = _counting(get_ops("torch"))
    B, T = 1, 3
    z = torch.zeros(B, dtype=torch.long)
    with torch.inference_mode():
        head(torch.randn(B, T, 32), torch.randint(0, 64, (B, T)), target, torch.arange(T)[None], head.new_cache(B, 16),
             z, z, causal_mask(B, T, "cpu"), spy)
    assert calls["rope_kv_write"] == 1 and calls["tree_attention"] == 1 and calls["silu_mul"] == 1


def test_cpu_memos_do_not_outlive_a_forward():
    """Two forwards over the same position and mask objects, refilled in place between them under inference mode
    (no version counter to notice): each forward sees the new contents, as the graph buffers and decode state
    need. A memo that survived the first forward would reuse its rotary tables and attention plan."""
    model = _target(False)
    ops = get_ops("cpu")
    T = 3
    tok = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        pos = torch.arange(T).expand(2, T).clone()
        plen = torch.zeros(2, dtype=torch.long)
        mask = causal_mask(2, T, "cpu").clone()
        cache = model.new_cache(2, 16)
        model(tok, pos, cache, plen, plen, mask, ops)
        pos.add_(T)
        plen.fill_(T)
        got = model(tok, pos, cache, plen, plen, mask, ops)
        ref_cache = cache.clone()
        ref = model(tok, pos, ref_cache, plen.clone(), plen.clone(), mask.clone(), get_ops("torch"))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
