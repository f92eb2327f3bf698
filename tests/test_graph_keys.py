"""The graph cache's keys on CPU, with a recording stand-in for CUDA-graph capture: which steps ``tree="auto"``
and fixed trees capture, that only what a step reads changes its key, and that every capture shares one pool."""

from __future__ import annotations

import pytest
import torch

from eagle_runtime import DynamicTree, EagleModel, StaticTree, load_head, load_target
from eagle_runtime.adaptive import AutoTree
from eagle_runtime.demo import demo_paths
from eagle_runtime.text import load_tokenizer
from eagle_runtime.tree import shape_key

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park"]
CHAIN, TREE = DynamicTree(4, 3, 1), DynamicTree(8, 3, 2)


class Recorder:
    """Stands in for :class:`~eagle_runtime.graphs.CudaGraphCapture`: "captures" by running the step once and
    "replays" by running it again (the outputs are fresh each time, so the decode stays exact)."""

    made: list = []

    def __init__(self, fn, args, pool):
        self.fn, self.args, self.pool = fn, args, pool
        Recorder.made.append(self)
        self.replays = 0

    def __call__(self):
        self.replays += 1
        return self.fn(*self.args)


@pytest.fixture()
def recorder():
    Recorder.made = []
    return Recorder


@pytest.fixture(scope="module")
def pair():
    base, draft = demo_paths("eagle1")
    target = load_target(base, max_len=256)
    return target, load_head(draft, target), load_tokenizer(base)


def _model(pair, tree, capture):
    target, head, tok = pair
    return EagleModel(target, head, tok, tree=tree, backend="cpu", graph_capture=capture)


def test_auto_captures_one_graph_per_bucket_and_pick(pair, recorder, tmp_path, monkeypatch):
    monkeypatch.setenv("EAGLE_RUNTIME_CACHE", str(tmp_path))
    schedule = [None, None, CHAIN, TREE, None, CHAIN, TREE, TREE, None, CHAIN]
    auto = AutoTree(candidates=[CHAIN, TREE], schedule=lambda s: schedule[s % len(schedule)])
    model = _model(pair, auto, recorder)
    eager = _model(pair, auto, None)
    assert model.graphs.enabled and model.pool.static and not eager.graphs.enabled
    got = model.generate(PROMPTS[:2], 40)
    assert got.tokens == eager.generate(PROMPTS[:2], 40, speculative=False).tokens
    gen = model.pool.generation
    want = {(2, "plain", True, gen), (2, "cycle", shape_key(CHAIN), False, gen), (2, "cycle", shape_key(TREE), None, gen)}
    assert set(model.graphs.keys()) == want, model.graphs.keys()
    assert model.graphs.captures == [(2, "plain", True, gen), (2, "cycle", shape_key(CHAIN), False, gen),
                                     (2, "cycle", shape_key(TREE), None, gen)], "captured when first chosen"
    assert len({id(g.pool) for g in recorder.made}) == 1 and recorder.made[0].pool is not None, "one graph pool"
    assert sum(g.replays for g in recorder.made) == sum(got.tree["steps"].values())
    # a second call replays: nothing captured again
    model.generate(PROMPTS[:2], 40)
    assert len(recorder.made) == 3


def test_temperature_changes_no_key_of_a_tree_and_the_mode_of_a_chain(pair, recorder):
    tree_model = _model(pair, TREE, recorder)
    for t in (0.0, 0.7, 1.0):
        tree_model.generate(PROMPTS[:1], 12, temperature=t, seed=1)
    assert len(recorder.made) == 1, "a tree's cycle reads the temperature from its buffers: one graph"
    chain_model = _model(pair, CHAIN, recorder)
    for t in (0.0, 0.7, 1.0):
        chain_model.generate(PROMPTS[:1], 12, temperature=t, seed=1)
    keys = chain_model.graphs.keys()
    assert [k[3] for k in keys] == [False, True], "a chain: one graph per drafting mode, none per temperature"
    chain_model.sampled_drafts = False
    chain_model.generate(PROMPTS[:1], 12, temperature=1.0, seed=1)
    assert len(chain_model.graphs.keys()) == 2, "deterministic drafts at temperature 1 reuse the greedy graph"


def test_buckets_and_generations_key_the_graphs(pair, recorder):
    model = _model(pair, StaticTree(), recorder)
    for B in (1, 3, 2):
        model.generate(PROMPTS[:B], 8)
    gens = {k[-1] for k in model.graphs.keys()}
    assert {k[0] for k in model.graphs.keys()} == {2, 3}, "bucket 1's graph is stale after the cache grew to 3"
    assert gens == {model.pool.generation}
    model.generate(PROMPTS[:1], 8, speculative=False)
    assert (1, "plain", False, model.pool.generation) in model.graphs.keys()


def test_sampling_buffers_belong_to_the_pool(pair, recorder):
    model = _model(pair, TREE, recorder)
    model.generate(PROMPTS[:1], 8, temperature=1.0, seed=2)
    sp = recorder.made[0].args[1]
    assert model.decoder.sampling(1, 0.5) is sp, "a caller gets the buffers the graph captured, refilled"
    assert float(sp.temperature[0]) == 0.5
    state = recorder.made[0].args[0]
    model.generate(PROMPTS[0], 8)
    assert recorder.made[0].args[0].L is state.L and len(recorder.made) == 1
    assert torch.equal(state.L, torch.tensor([state.L.item()]))
