"""Threads sharing one model get the tokens each call gets alone (issue 31, item 1).

The decode state is per call and the ``cpu`` table's memos live for one forward (``Ops.for_forward``), so on the
eager backends this test passes even with ``EagleModel``'s lock removed; the lock serializes calls for what does
belong to the model (CUDA graph buffers, the cost model). On 7705158, before both, the ``cpu`` case raised
tensor-size mismatches from the shared memos in several of its 18 concurrent calls.
"""

from __future__ import annotations

import threading

import pytest

from eagle_runtime import DynamicTree, EagleModel, load_head, load_target
from eagle_runtime.demo import demo_paths
from eagle_runtime.text import load_tokenizer

# mixed prompt lengths, batch sizes and sampling settings; temperature 1 with a seed is deterministic alone
CALLS = [
    (["Once upon a time"], dict(temperature=0.0)),
    (["The little dog ran to the park and", "Tom"], dict(temperature=0.0)),
    ([[5, 6, 7, 8, 9, 10, 11]], dict(temperature=1.0, seed=3)),
    (["Lily had a big red ball", "One day, a bird", "Sue"], dict(temperature=0.8, top_p=0.9, seed=7)),
    (["A boy named Tim"], dict(temperature=1.0, seed=11, speculative=False)),
    (["The sun was"], dict(temperature=0.0, speculative=False)),
]


@pytest.mark.parametrize("backend", ["cpu", "torch", pytest.param("triton", marks=pytest.mark.cuda)])
def test_threads_sharing_a_model_get_what_each_call_gets_alone(backend):
    target_dir, head_dir = demo_paths()
    # triton runs on the GPU, in float32 like the CPU backends, with its CUDA graphs (the constructor's default)
    target = load_target(target_dir, max_len=160, device="cuda" if backend == "triton" else "cpu")
    model = EagleModel(target, load_head(head_dir, target), load_tokenizer(target_dir), tree=DynamicTree(8, 3, 2),
                       backend=backend)
    alone = [model.generate(p, 24, stop_on_eos=False, **kw).tokens for p, kw in CALLS]
    rounds, got, errors = 3, {}, []
    start = threading.Barrier(len(CALLS) * rounds)

    def run(i, r):
        prompts, kw = CALLS[i]
        try:
            start.wait()
            got[i, r] = model.generate(prompts, 24, stop_on_eos=False, **kw).tokens
        except BaseException as e:  # noqa: BLE001 - reported below with the call that raised
            errors.append((i, r, repr(e)))

    threads = [threading.Thread(target=run, args=(i, r)) for r in range(rounds) for i in range(len(CALLS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    mismatches = [(i, r) for (i, r), toks in got.items() if toks != alone[i]]
    print(f"{backend}: {len(got)} concurrent calls, {len(mismatches)} differ from the call alone")
    assert len(got) == len(threads) and not mismatches, mismatches
