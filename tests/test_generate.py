"""End-to-end exactness of EAGLE decoding: greedy token-for-token, sampling in distribution."""

from __future__ import annotations

import pytest
import torch

from eagle_kernels import reference
from eagle_runtime import DynamicTree, EagleModel, StaticTree, load_head, load_target, random_head
from eagle_runtime.text import load_tokenizer

from spec_helpers import chi2_pvalue as _chi2_pvalue, exact_joint as _exact_joint, spec_counts as _spec_counts

PROMPTS = [
    "Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird", "Lily had a big",
    "The sun was", "A boy named Tim", "In the forest there", "Mom said", "The cat wanted to", "It was a rainy day",
    "Ben and his friend", "The princess", "There was a tree", "Sam liked to eat", "The red car", "Anna saw a",
    "Grandpa told a story", "The fish swam", "At night, the moon",
]
TREES = {"dynamic": DynamicTree(), "static": StaticTree(), "small": DynamicTree(total_tokens=12, depth=3, top_k=4)}


def _model(path, head_dir=None, tree="dynamic"):
    target = load_target(path, max_len=320)
    head = load_head(head_dir, target) if head_dir else random_head(target, seed=1)
    return EagleModel(target, head, load_tokenizer(path), tree=TREES[tree], backend="torch")


def _check_greedy(model, prompts, batch, n=48):
    plain = model.generate(prompts, n, speculative=False)
    taus = []
    for i in range(0, len(prompts), batch):
        spec = model.generate(prompts[i : i + batch], n)
        for j, toks in enumerate(spec.tokens):
            assert toks == plain.tokens[i + j], f"prompt {prompts[i + j]!r}: speculative output differs from greedy"
        assert all(1 <= a <= model.tree.max_depth + 1 for seq in spec.accept_lengths for a in seq)
        # the first token comes from the prefill, every later one from a cycle
        assert sum(map(sum, spec.accept_lengths)) + len(spec.tokens) >= sum(map(len, spec.tokens))
        taus.append(spec.tau)
    return sum(taus) / len(taus)


@pytest.mark.parametrize("tree", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_exact_random_head(stories_dir, tree, batch):
    model = _model(stories_dir, tree=tree)
    _check_greedy(model, PROMPTS, batch, n=24)


@pytest.mark.parametrize("tree", ["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_exact_trained_head(stories_dir, trained_head_dir, tree, batch):
    model = _model(stories_dir, trained_head_dir, tree=tree)
    tau = _check_greedy(model, PROMPTS, batch)
    floor = {"dynamic": 2.5, "static": 2.0}[tree]  # a random head gives 1.0
    assert tau > floor, f"the trained head should draft well, tau = {tau:.2f}"


@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_greedy_exact_moe(stories_moe_dir, stories_dir, trained_head_dir, tree):
    # the MoE model has the dense model's weights in every expert, so the dense model's head drafts well for it
    model = _model(stories_moe_dir, trained_head_dir, tree=tree)
    tau = _check_greedy(model, PROMPTS, 3, n=32)
    assert tau > 1.8
    model.head = random_head(model.target)
    _check_greedy(model, PROMPTS[:6], 3, n=16)


def test_batch_rows_equal_their_own_runs(stories_dir, trained_head_dir):
    model = _model(stories_dir, trained_head_dir, tree="small")
    prompts = ["Once upon a time there was a girl", "Hi", "The dog ran to the big tree and"]
    for temperature in (0.0, 1.0):
        batched = model.generate(prompts, 30, temperature=temperature, seed=5)
        assert len(batched.accept_lengths) == 3
        if temperature == 0:
            for p, toks in zip(prompts, batched.tokens):
                assert model.generate([p], 30).tokens[0] == toks


def test_draft_attention_follows_the_tree(stories_dir, trained_head_dir):
    """Each drafted node's head output equals running the head along the node's own root path as a chain."""
    model = _model(stories_dir, trained_head_dir, tree="small")
    tgt, head, ops = model.target, model.head, model.ops
    ids = model.encode(["Once upon a time, there was"])
    state = model.decoder.prefill(ids, model.decoder.sampling(1), True)
    recorded = []
    L = state.L

    def spy(h_in, tokens, positions, write_pos, mask):
        out = head.step(h_in, tokens, tgt, positions, state.d_cache, L, write_pos, mask)
        recorded.append((h_in.clone(), tokens.clone(), positions.clone(), mask.clone(), out[0].clone()))
        return out

    model.tree.draft(spy, state.d_hidden, state.d_logits, state.next_tok, L, ops)
    # Replay every node of the last step: a chain over its ancestors' slots only must give the same output.
    h_in, tokens, positions, mask, out = recorded[-1]
    k = model.tree.top_k
    all_h = torch.cat([r[0] for r in recorded], 1)
    all_t = torch.cat([r[1] for r in recorded], 1)
    all_p = torch.cat([r[2] for r in recorded], 1)
    for i in range(k):
        anc = mask[0, i].nonzero().flatten()
        cache = head.new_cache(1, tgt.max_len)
        cache[:, :, :, : int(L)] = state.d_cache[:, :, :, : int(L)]
        chain = torch.tril(torch.ones(len(anc), len(anc), dtype=torch.bool))[None]
        ref = head(all_h[:, anc], all_t[:, anc], tgt, all_p[:, anc], cache, L, L, chain)
        torch.testing.assert_close(ref[0, -1], out[0, i], rtol=1e-4, atol=1e-5)
