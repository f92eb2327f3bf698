"""benchmarks/cycle_breakdown.py times the runtime's own graphs over the runtime's own buffers: a graph captured
at one prefix and replayed at the next reads the pool's sampling and state buffers, refilled, never freed ones."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from eagle_runtime import DynamicTree, EagleModel, random_head

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import cycle_breakdown as cb  # noqa: E402


class Recorder:
    made: list = []

    def __init__(self, fn, args, pool):
        self.fn, self.args = fn, args
        Recorder.made.append(self)

    def __call__(self):
        return self.fn(*self.args)


def test_graphs_replay_over_the_pools_buffers_at_every_prefix():
    Recorder.made = []
    dev = torch.device("cpu")
    hf, target = cb.build(dict(cb.TINY, num_hidden_layers=2), torch.float32, dev, max_len=160)
    model = EagleModel(target, random_head(target), None, tree=DynamicTree(8, 3, 2), backend="cpu",
                       graph_capture=Recorder)
    rows = [cb.measure(model, hf, prefix, dev, reps=1) for prefix in (16, 48)]
    assert all("cycle_graph_ms" in r and "plain_decode_graph_ms" in r for r in rows)
    assert len(Recorder.made) == 2, "one cycle graph and one plain graph serve both prefixes"
    sp = model.decoder.sampling(1)
    for g in Recorder.made:
        state, g_sp = g.args[0], g.args[1]
        assert g_sp is sp, "the graph must read the pool's sampling buffers"
        assert int(state.L[0]) == 48, "the replay at prefix 48 reads the state refilled at 48"
