"""Exactness with the fused decoder-layer kernels active (Triton; the interpreter on CPU).

tests/test_generate.py runs the dense target on the ``triton`` backend (greedy); here: the Mixtral layer (fused
attention side and norms beside the MoE) and speculative sampling's distribution with the fused layer kernels.
"""

from __future__ import annotations

import pytest
import torch

from eagle_kernels import get_ops, triton_available
from eagle_runtime import DynamicTree, EagleModel, load_head, load_target
from eagle_runtime.text import load_tokenizer

from test_generate import PROMPTS, _chi2_pvalue, _exact_joint, _spec_counts

SMALL = DynamicTree(total_tokens=12, depth=3, top_k=4)
# Half of test_generate's 3000: the interpreter spends ~1 s of CPU per layer pass over the 3000-row batch, and
# the kernels themselves are held to their references in test_fused_norm/test_rope_cache/test_silu_mul.
SAMPLES = 1500


pytestmark = pytest.mark.interpreter  # the Triton backend on CPU models


@pytest.fixture(autouse=True)
def _needs_triton():
    ok, why = triton_available()
    if not ok:
        pytest.skip(why)


# The demo twins are smaller: its 16 layers of width 128 cost the interpreter ~3.3x stories260k's 5 of width 64
# per sample (measured on 2 cores: 500 demo samples 22 s, 1500 stories260k samples 20 s; one demo prompt of 16
# greedy tokens 8 s, stories260k's two 17 s). 500 samples still put ~8 per cell on the 64-cell joint's likelier half.
DEMO_SAMPLES = 500


def test_greedy_exact_moe_triton(lm, lm_moe_dir, lm_head_dir):
    target = load_target(lm_moe_dir, max_len=160)
    model = EagleModel(target, load_head(lm_head_dir, target), load_tokenizer(lm_moe_dir), tree=SMALL,
                       backend="torch")
    prompts = PROMPTS[:2] if lm == "stories260k" else PROMPTS[:1]
    plain = model.generate(prompts, 16, speculative=False)
    model.set_backend("triton")
    assert target.layers[0].self_attn.fused and not hasattr(target.layers[0].self_attn, "q_proj")
    spec = model.generate(prompts, 16)
    assert spec.tokens == plain.tokens
    assert spec.tau > 1.3


def test_sampling_distribution_with_fused_layer_kernels(lm, lm_dir, lm_head_dir):
    """Speculative sampling with the fused Triton layer kernels (tree attention and acceptance from the torch
    backend: the interpreter would take minutes over a batch of 3000) follows the target's exact joint."""
    target = load_target(lm_dir, max_len=64)
    model = EagleModel(target, load_head(lm_head_dir, target), load_tokenizer(lm_dir), tree=SMALL,
                       backend="torch")
    prompt = model.encode("Once upon a time, there was a little")[0]
    joint = _exact_joint(model, prompt, 1.0, 4)
    fused = get_ops("triton")
    mixed = {f: getattr(fused, f) for f in ("rms_norm", "add_rms_norm", "rope_kv_write", "silu_mul")}
    model.ops = type(model.ops)(**{**model.ops.__dict__, **mixed, "name": "torch+fused"})
    samples = SAMPLES if lm == "stories260k" else DEMO_SAMPLES
    counts, out = _spec_counts(model, prompt, samples, 1.0, 4, seed=11)
    assert out.tau > 1.3, "the test must exercise accepted draft tokens"
    p = _chi2_pvalue(counts, joint, samples)
    print(f"fused layer kernels, speculative sampling vs exact joint of 3 tokens: chi-square p = {p:.3g}")
    assert p > 1e-3, f"speculative sampling deviates from the target distribution: chi-square p = {p:.2e}"
