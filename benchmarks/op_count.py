"""Device ops per decoder layer, per plain decode step and per EAGLE cycle, counted through the public API.

    python benchmarks/op_count.py                   # backends torch and triton (interpreter on CPU), prints a table
    python benchmarks/op_count.py --backend triton --json out.json

A device op is one kernel a GPU would run: every aten op the runtime dispatches that does work (views, metadata
and allocation ops such as ``view``, ``expand``, ``empty`` are not counted) plus every Triton kernel launch.
Work inside a launch is not counted again (the interpreter's own tensor copies, for instance), and a registered
``eagle_kernels`` op counts as what its launcher does (its aten ops and launches), not as one extra op.

Per layer: a random Llama-structured target (GQA 2:1) with a random EAGLE-1 head is built at two layer counts;
``EagleModel.generate`` runs plain decoding and EAGLE cycles for two lengths each; per step (per cycle) is the
difference of the counts over the difference of steps (cycles), which removes the prefill; per layer is the
difference between the two targets over the difference of layers, which removes embedding, head, sampling,
drafting, acceptance and compaction. Weights are random, so the head's drafts are rejected and a cycle emits one
token; the per-layer count does not depend on that (the target runs one verify pass per cycle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_NOT_WORK = {  # aten ops that launch no kernel: allocation, metadata, host-side scalars
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach", "alias",
    "set_", "resize_", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size",
    "_local_scalar_dense",  # a device->host read of a scalar (the finished flag): a sync, not a kernel
}


def _is_view(func) -> bool:
    """Ops whose outputs alias an input without writing it (view, expand, transpose, split, ...)."""
    rets = func._schema.returns
    return bool(rets) and all(r.alias_info is not None and not r.alias_info.is_write for r in rets)


class OpCounter(TorchDispatchMode):
    """Counts device ops (see the module docstring) while active; ``counts`` maps op names to numbers."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self._in_launch = 0

    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns = func.namespace
        if self._in_launch:
            return func(*args, **kwargs)
        if ns == "aten":
            name = func.overloadpacket.__name__
            if name not in _NOT_WORK and not _is_view(func):
                self.counts[f"aten.{name}"] += 1
            return func(*args, **kwargs)
        impl = _python_impl(func)
        if impl is not None:  # a registered Python op: count what it does, with this mode active inside it
            with self:
                return impl(*args, **kwargs)
        self.counts[f"{ns}.{func.overloadpacket.__name__}"] += 1  # an opaque op (e.g. native): one op
        return func(*args, **kwargs)

    def launched(self, name: str) -> None:
        self.counts[f"triton.{name}"] += 1


def _python_impl(func):
    """The Python function behind a ``torch.library.custom_op``/``triton_op`` registration, if there is one."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # pragma: no cover - older torch
        return None
    opdef = OPDEFS.get(func._schema.name)
    return getattr(opdef, "_init_fn", None) if opdef is not None else None


_ACTIVE: list[OpCounter] = []


def _patch_triton_launches() -> None:
    """Count every Triton launch (compiled or interpreted) into the active counters, and hide its inner work."""
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        if getattr(cls.run, "_op_count_patched", False):
            continue
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not _ACTIVE:
                return _original(self, *args, **kwargs)
            name = getattr(getattr(self, "fn", None), "__name__", None) or getattr(self, "__name__", "kernel")
            for c in _ACTIVE:
                c.launched(name)
                c._in_launch += 1
            try:
                return _original(self, *args, **kwargs)
            finally:
                for c in _ACTIVE:
                    c._in_launch -= 1

        run._op_count_patched = True
        cls.run = run


@contextmanager
def counting():
    _patch_triton_launches()
    counter = OpCounter()
    _ACTIVE.append(counter)
    try:
        with counter:
            yield counter
    finally:
        _ACTIVE.remove(counter)


def random_target(num_layers: int, seed: int = 0, max_len: int = 256, **overrides):
    """A random Llama-structured target loaded through the HF loader (so it gets the load-time weight fusion)."""
    from eagle_runtime.config import ModelConfig
    from eagle_runtime.loading import target_from_state_dict
    from eagle_runtime.model import Transformer

    config = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=max_len, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    config.update(overrides)
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        skeleton = Transformer(ModelConfig.from_dict(config), max_len)
    state = {k: (torch.ones(v.shape) if k.endswith("norm.weight") else torch.randn(v.shape, generator=g) * 0.1)
             for k, v in skeleton.state_dict().items()}  # HF key names (the checkpoint layout)
    return target_from_state_dict(config, state, torch.float32, "cpu", max_len)


def _unfuse_(target) -> None:
    """Put separate q/k/v and gate/up projections back (the state dict keeps the HF layout either way)."""
    from eagle_runtime.model import Transformer

    state = target.state_dict()
    fresh = Transformer(target.cfg, target.max_len).to(target.embed_tokens.weight.dtype)
    fresh.load_state_dict(state, strict=False)
    for mine, theirs in zip(target.layers, fresh.layers):
        mine.self_attn, mine.mlp = theirs.self_attn.eval(), theirs.mlp.eval()


def count_per_layer(backend: str, layers=(1, 3), lengths=(3, 6), tree=None, modes=("plain", "cycle"),
                    unfused: bool = False) -> dict:
    """Device ops per decoder layer per plain step and per EAGLE cycle, plus the totals they came from.

    ``unfused=True`` splits the merged projections back into q/k/v and gate/up (a control: what unfusing costs).
    """
    from eagle_runtime import DynamicTree, EagleModel, random_head

    tree = tree or DynamicTree(total_tokens=8, depth=3, top_k=3)
    prompt = [[5, 17, 33, 2, 90]]
    per = {"plain": {}, "cycle": {}}
    detail = {}
    for n_layers in layers:
        target = random_target(n_layers)
        if unfused:
            _unfuse_(target)
        model = EagleModel(target, random_head(target, seed=1), tree=tree, backend=backend)
        for mode in modes:
            totals, units, breakdown = [], [], []
            for n in lengths:
                with torch.inference_mode(), counting() as c:
                    out = model.generate(prompt, n, speculative=mode == "cycle", stop_on_eos=False)
                totals.append(c.total())
                breakdown.append(c.counts)
                units.append(n if mode == "plain" else len(out.accept_lengths[0]))
            if units[1] == units[0]:
                raise RuntimeError(f"{mode}: both lengths gave {units[0]} steps; choose lengths further apart")
            per[mode][n_layers] = (totals[1] - totals[0]) / (units[1] - units[0])
            detail[(mode, n_layers)] = breakdown[1] - breakdown[0], units[1] - units[0]
    l0, l1 = layers
    result = {"backend": backend}
    for mode in modes:
        result[f"{mode}_per_layer"] = (per[mode][l1] - per[mode][l0]) / (l1 - l0)
        result[f"{mode}_total_{l0}_layers"] = per[mode][l0]
        result[f"{mode}_total_{l1}_layers"] = per[mode][l1]
        diff = detail[(mode, l1)][0].copy()
        diff.subtract(detail[(mode, l0)][0])
        steps = detail[(mode, l1)][1]
        if steps == detail[(mode, l0)][1]:  # the per-op breakdown is meaningful when both ran the same steps
            result[f"{mode}_per_layer_ops"] = {k: v / steps / (l1 - l0) for k, v in sorted(diff.items()) if v}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["torch", "triton", "both"], default="both")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--verbose", action="store_true", help="print the per-layer op breakdown")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported by the backend
    torch.set_num_threads(1)
    backends = ["torch", "triton"] if args.backend == "both" else [args.backend]
    results = [count_per_layer(b) for b in backends]
    print(f"{'backend':8} {'ops/layer/plain step':>21} {'ops/layer/cycle':>16}")
    for r in results:
        print(f"{r['backend']:8} {r['plain_per_layer']:21.1f} {r['cycle_per_layer']:16.1f}")
        if args.verbose:
            for mode in ("plain", "cycle"):
                ops = r.get(f"{mode}_per_layer_ops", {})
                print(f"  {mode}: " + ", ".join(f"{k} {v:g}" for k, v in ops.items()))
    if args.json:
        from eagle_runtime.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps({"device": "cpu" if not torch.cuda.is_available() else
                                                 torch.cuda.get_device_name(), "torch": torch.__version__,
                                                 "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
