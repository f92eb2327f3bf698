"""CUDA-graph replay of the decode step equals eager decoding (runs only where a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from eagle_runtime import DynamicTree, EagleModel, StaticTree, load_head, load_target, random_head
from eagle_runtime.text import load_tokenizer

pytestmark = pytest.mark.cuda

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park"]


def _pair(stories_dir, head_dir, tree, graphs):
    target = load_target(stories_dir, device="cuda", max_len=320)
    head = load_head(head_dir, target) if head_dir else random_head(target)
    return EagleModel(target, head, load_tokenizer(stories_dir), tree=tree, backend="triton", cuda_graphs=graphs)


@pytest.mark.parametrize("tree", [DynamicTree(), StaticTree()], ids=["dynamic", "static"])
@pytest.mark.parametrize("batch", [1, 2, 3])
def test_graphs_equal_eager(stories_dir, trained_head_dir, tree, batch):
    eager = _pair(stories_dir, trained_head_dir, tree, graphs=False)
    graphed = _pair(stories_dir, trained_head_dir, tree, graphs=True)
    prompts = PROMPTS[:batch]
    for temperature in (0.0, 1.0):
        a = eager.generate(prompts, 40, temperature=temperature, seed=3)
        b = graphed.generate(prompts, 40, temperature=temperature, seed=3)
        assert a.tokens == b.tokens and a.accept_lengths == b.accept_lengths
    plain_a = eager.generate(prompts, 24, speculative=False)
    plain_b = graphed.generate(prompts, 24, speculative=False)
    assert plain_a.tokens == plain_b.tokens


def test_many_calls_without_recapture_or_growth(stories_dir, trained_head_dir):
    model = _pair(stories_dir, trained_head_dir, DynamicTree(), graphs=True)
    model.generate(PROMPTS, 32)
    graphs = dict(model._graphs)
    torch.cuda.synchronize()
    mem = torch.cuda.memory_allocated()
    for i in range(20):
        model.generate(PROMPTS[: 1 + i % 3], 32, temperature=float(i % 2), seed=i)
    torch.cuda.synchronize()
    gen = model._pool.generation
    assert model._graphs.keys() - graphs.keys() <= {(1, True, id(model.tree), gen), (2, True, id(model.tree), gen)}
    for key, g in graphs.items():
        assert model._graphs[key] is g, "a graph was captured again"
    assert model._pool.allocations == {"cache": 1, "d_cache": 1}, "batch 3 came first: buckets 1 and 2 are views"
    assert torch.cuda.memory_allocated() <= mem + (1 << 20), "memory grew across calls"


def test_one_cache_and_one_graph_pool_across_buckets(stories_dir, trained_head_dir):
    model = _pair(stories_dir, trained_head_dir, DynamicTree(), graphs=True)
    model.reserve(8)
    for B in (1, 2, 3, 8):
        model.generate((PROMPTS * 3)[:B], 16)
    assert model._pool.allocations == {"cache": 1, "d_cache": 1}
    assert {k[0] for k in model._graphs} == {1, 2, 3, 8}
    pool = model._graph_pool
    assert pool is not None and all(g.graph.pool() == pool for g in model._graphs.values())


def test_cuda_defaults_and_missing_extension(stories_dir, monkeypatch):
    from eagle_runtime import generate as gen

    model = EagleModel.from_pretrained(stories_dir, device="cuda", max_len=128)
    assert model.target.embed_tokens.weight.dtype == torch.bfloat16
    assert model.cuda_graphs == gen._native_cuda()  # on by default where the extension is built with CUDA
    monkeypatch.setattr(gen, "_native_cuda", lambda: False)
    monkeypatch.setattr(gen, "_warned", set())
    with pytest.raises(gen.GraphsUnavailable, match="native extension"):
        EagleModel(model.target, None, backend="triton", cuda_graphs=True)
    with pytest.warns(UserWarning, match="running eagerly"):
        assert not EagleModel(model.target, None, backend="triton").cuda_graphs
