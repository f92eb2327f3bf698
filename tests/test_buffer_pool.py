"""Static-buffer policy of the CUDA-graph path, on CPU: batch buckets, one target and one draft cache shared by
every bucket (views), growth only for a larger bucket, and the graphs defaults / errors."""

from __future__ import annotations

import gc
import json
import warnings
import weakref

import pytest
import torch

from eagle_runtime import EagleModel, load_target, random_head
from eagle_runtime import graphs
from eagle_runtime.graphs import BufferPool, GraphsUnavailable, bucket, graphs_ready, resolve_graphs
from eagle_runtime.text import load_tokenizer

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird", "Lily had a big",
           "The sun was", "A boy named Tim", "In the forest there", "Mom said"]


def test_buckets():
    assert [bucket(n) for n in range(1, 10)] == [1, 2, 3, 4, 5, 6, 7, 8, 16]
    assert [bucket(n) for n in (15, 16, 17, 24, 25, 64, 65)] == [16, 16, 24, 24, 32, 64, 72]
    with pytest.raises(ValueError):
        bucket(0)


def _model(demo_target_dir, static: bool):
    target = load_target(demo_target_dir, max_len=160)
    model = EagleModel(target, random_head(target, seed=1), load_tokenizer(demo_target_dir), backend="torch",
                       cuda_graphs=True)
    assert not model.cuda_graphs, "graphs requested on CPU are ignored"
    model.pool.static = static  # the switch the CUDA path sets: static buffers as if graphs were captured
    return model


def _counting(model):
    """Count every full-size cache allocation, whatever allocates it."""
    made = {"cache": [], "d_cache": []}
    for name in made:
        make = model.pool._make[name]
        model.pool._make[name] = lambda B, make=make, name=name: made[name].append(B) or make(B)
    return made


def test_one_target_cache_for_batches_1_2_3_8(demo_target_dir):
    eager = _model(demo_target_dir, static=False)
    model = _model(demo_target_dir, static=True)
    made = _counting(model)
    model.reserve(8)
    for B in (1, 2, 3, 8):
        for speculative in (True, False) if B in (3, 8) else (True,):
            got = model.generate(PROMPTS[:B], 8, speculative=speculative)
            want = eager.generate(PROMPTS[:B], 8, speculative=speculative)
            assert got.tokens == want.tokens, f"batch {B}: a cache view changed the output"
            assert got.accept_lengths == want.accept_lengths
    assert made == {"cache": [8], "d_cache": [8]}, "one target cache and one draft cache for every bucket"
    assert model.pool.allocations == {"cache": 1, "d_cache": 1}
    cache = model.pool._full["cache"]
    assert cache.shape[1] == 8
    # a smaller bucket is a view of the one cache: same storage, batch rows [0, B)
    view = model.pool.cache("cache", 3)
    assert view.data_ptr() == cache.data_ptr() and view.shape[1] == 3 and view.stride() == cache.stride()


def test_grows_only_for_a_largerbucket(demo_target_dir):
    model = _model(demo_target_dir, static=True)
    made = _counting(model)
    refs = []
    for B in (1, 2, 3, 8, 1, 2, 3, 8, 9):
        model.generate(PROMPTS[:B], 4)
        full = model.pool._full["cache"]
        if not refs or refs[-1]() is not full:
            refs.append(weakref.ref(full))
    assert made["cache"] == [1, 2, 3, 8, 16] and made["d_cache"] == [1, 2, 3, 8, 16]
    gc.collect()
    assert [r() is not None for r in refs] == [False] * 4 + [True], "a replaced cache is still alive"
    assert model.pool.generation == 10  # 5 growths of each cache: graphs keyed by generation are recaptured


def test_eager_allocates_per_call(demo_target_dir):
    model = _model(demo_target_dir, static=False)
    made = _counting(model)
    model.generate(PROMPTS[:2], 4)
    model.generate(PROMPTS[:2], 4)
    assert made["cache"] == [2, 2] and model.pool._full == {}  # nothing held between calls


def test_pool_without_a_head():
    def no_head(B):
        raise ValueError("plain decoding only: no draft head")

    pool = BufferPool(lambda B: torch.zeros(2, B, 1, 4, 2), no_head, "cpu", static=True)
    pool.reserve(5, ("cache",))
    assert pool.cache("cache", 2).shape == (2, 2, 1, 4, 2) and pool.allocations["cache"] == 1
    with pytest.raises(ValueError, match="no draft head"):
        pool.cache("d_cache", 1)


def testresolve_graphs(monkeypatch):
    monkeypatch.setattr(graphs, "_warned", set())
    assert resolve_graphs(None, True, True, "") and resolve_graphs(True, True, True, "")
    assert not resolve_graphs(False, True, True, "")
    assert not resolve_graphs(True, False, True, "") and not resolve_graphs(None, False, False, "x")
    with pytest.raises(GraphsUnavailable, match="native extension"):
        resolve_graphs(True, True, False, "the native extension eagle_kernels._C is missing")
    with pytest.warns(UserWarning, match="running eagerly"):
        assert not resolve_graphs(None, True, False, "why")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not resolve_graphs(None, True, False, "why")  # said once


def test_graphs_ready_names_the_missing_extension(demo_target_dir, monkeypatch):
    model = _model(demo_target_dir, static=False)
    ok, why = graphs_ready(model.ops.name)
    assert not ok and "triton" in why
    model.set_backend("triton")  # CPU tensors under the interpreter
    monkeypatch.setattr(graphs, "native_cuda", lambda: False)
    ok, why = graphs_ready(model.ops.name)
    assert not ok and "native extension" in why and "missing" in why


def test_from_pretrained_defaults(demo_target_dir):
    model = EagleModel.from_pretrained(demo_target_dir, max_len=64)
    assert model.target.embed_tokens.weight.dtype == torch.float32 and not model.cuda_graphs


@pytest.mark.interpreter  # the Triton kernel on CPU tensors
def test_kv_compact_on_a_pool_view():
    from eagle_kernels import reference
    from eagle_kernels.kv_compact import kv_compact

    full = torch.randn(4, 5, 2, 24, 8)
    want = full.clone()
    view, want_view = full[:, :3], want[:, :3]  # the pool's bucket-3 view of a bucket-5 cache
    prefix = torch.tensor([2, 0, 7])
    path = torch.tensor([[0, 2, 5, -1], [0, 1, 3, 4], [0, -1, -1, -1]])
    n = torch.tensor([2, 3, 0])
    kv_compact(view, prefix, path, n)
    reference.kv_compact(want_view, prefix, path, n)
    assert torch.equal(full, want), "the view's moves differ, or rows outside the view were touched"


@pytest.mark.parametrize("flag", ["--cuda-graphs"])
def test_cli_graphs_flag(flag, capsys):
    from eagle_runtime import cli
    from eagle_runtime.demo import demo_paths

    base, draft = (str(p) for p in demo_paths())
    rc = cli.main(["generate", "--base", base, "--draft", draft, "--prompt", "Once upon", "--max-new-tokens", "3",
                   "--backend", "torch", "--json", flag])
    assert rc == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) == 3  # CPU: graphs ignored, float32 default
