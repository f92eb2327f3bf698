#!/usr/bin/env python
"""One command for a short GPU session: correctness first, then speed; a JSON and a markdown file after every part.

    python benchmarks/gpu_report.py --skip tests --out DIR   # one H100/H200, default budget 500 s, compile included
    python benchmarks/gpu_report.py --plan                   # the parts, their estimated seconds, the budget
    python benchmarks/gpu_report.py --dry-run --budget-s 30  # tiny shapes on CPU (CI): the same code paths

Parts, in order of value (``--plan`` prints them with their estimates; ``--skip``/``--only`` take part names,
``cycle`` for both cycle parts, or a group letter):

(a) ``env``: ``python -m eagle_runtime env``. ``kernel_check``: every op of the ``triton`` table against its
    reference (``eagle_kernels.reference``) in bf16 at Llama-3-8B shapes (a 61-node tree over a 2048 prefix,
    vocabulary 128256): floating outputs need ``err(kernel) <= 2 * err(torch bf16) + atol`` against the fp32
    reference, discrete outputs (tokens, paths, moved cache slots) must equal the reference's. ``generation``:
    greedy generation on a random-weight Llama-3-8B-shaped target (2 layers, full width and vocabulary) and a
    random head, on the default path (``EagleModel(target, head)``: backend, tree and CUDA graphs as the API
    chooses them; which path ran is recorded) and on a 60-token dynamic tree, against plain decoding with backend
    ``torch``: in float32 every output must be token-identical; in bfloat16 near-ties flip between a 61-token
    verify and a 1-token step, so the fraction identical and the mean length before the first divergence are
    reported, not judged. ``tests``: ``pytest -m cuda`` (fails when every CUDA-graph test skipped on a GPU).
(b) ``cycle_llama2-7b``, ``cycle_llama3-8b``: plain step (and its fraction of the copy-bandwidth roofline) and the
    decode cycle at the full shapes, bf16, random weights, as CUDA graphs, each model on its own
    (``benchmarks/cycle_breakdown.py``'s ``run_model``).
(c) ``kernels``: every ``benchmarks/bench_*.py`` that reports through ``_bench_utils.report``: tree attention vs
    SDPA with a mask, flash-attn when installed, FlexAttention with ``--flex`` (its ``torch.compile`` costs tens of
    seconds); top-k expansion, acceptance, KV compaction and grouped MoE vs their PyTorch peers.

Budget: a part starts only while at least half its estimate is left of ``--budget-s``; the others are recorded as
skipped. A running part is cut at the deadline (SIGALRM; a subprocess is killed) and recorded as ``cut`` with what
it had measured. Every part records its seconds, and the Triton specialisations it built and their seconds
(``compile``: JIT cache misses in this process, disk-cache loads included); where a part calls the same thing
twice, ``first_s`` / ``steady_s`` show the compile share too.

Output (``--out``, default ``$EAGLE_RESULTS_DIR``, else ``./results``; never inside the source tree except its
git-ignored ``results/``): ``gpu_report_<device>_<UTC time>.json`` and ``.md``, rewritten atomically after every
part, and ``...-pytest.log`` when the tests ran: at most 3 files. Exit status: 0 when no part failed (skipped and
cut parts are listed, not failures), 1 when one did, 2 for a bad command line or no GPU without ``--dry-run``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if not torch.cuda.is_available():  # CPU: kernels through the interpreter; must precede the first `import triton`
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path[:0] = [str(HERE), str(ROOT), str(ROOT / "python")]

from eagle_runtime.atomic import atomic_write_json, atomic_write_text  # noqa: E402

HEADLINE = "cycle_llama2-7b"  # the part whose first prefix goes to the JSON's top level
START_FRACTION = 0.5  # a part starts while this fraction of its estimate is left of the budget
# Llama-3-8B's width and vocabulary with 2 layers: the shapes every kernel sees at 8B, 1.5 B parameters
GEN_SHAPE = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=500000.0)
GEN_TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)


class Deadline(BaseException):
    """The budget ran out inside a part (a BaseException, so that a part's own ``except Exception`` lets it by)."""


@dataclass
class Part:
    name: str
    group: str
    what: str
    est_s: float  # on one H100/H200, compile included (estimates: nothing here has been timed on a GPU yet)
    est_dry_s: float  # --dry-run on a busy 2-core CPU
    run: Callable


@dataclass
class Ctx:
    args: argparse.Namespace
    dev: torch.device
    log: Callable
    out: Path
    stem: str


# ----------------------------------------------------------------------------------------------------------------
# Machine and bookkeeping
# ----------------------------------------------------------------------------------------------------------------
def _versions() -> dict:
    import transformers
    import triton

    v = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
         "cuda": torch.version.cuda or "none", "python": platform.python_version()}
    try:
        import flash_attn

        v["flash_attn"] = flash_attn.__version__
    except ImportError:
        v["flash_attn"] = None
    return v


def device_info() -> dict:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"device": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
                "capability": f"{p.major}.{p.minor}"}
    return {"device": platform.processor() or platform.machine() or "cpu", "sms": None, "memory_gib": None,
            "capability": None}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class CompileCounter:
    """Triton specialisations built while active: ``JITFunction._do_compile`` calls and their seconds.

    ``_do_compile`` is Triton's internal per-specialisation build (3.3 to 3.9 at least; it also loads from the disk
    cache); where it is missing, or under the interpreter, nothing is counted and ``available`` says so."""

    def __init__(self):
        self.count, self.seconds, self.available = 0, 0.0, False

    @contextlib.contextmanager
    def active(self):
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            yield self
            return
        orig = getattr(JITFunction, "_do_compile", None)
        if orig is None or os.environ.get("TRITON_INTERPRET") == "1":
            yield self
            return
        counter = self

        def timed(fn_self, *a, **kw):
            t0 = time.perf_counter()
            try:
                return orig(fn_self, *a, **kw)
            finally:
                counter.count += 1
                counter.seconds += time.perf_counter() - t0

        self.available = True
        JITFunction._do_compile = timed
        try:
            yield self
        finally:
            JITFunction._do_compile = orig


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`Deadline` in this (main) thread after ``seconds``."""
    if not hasattr(signal, "setitimer") or seconds <= 0:
        if seconds <= 0:
            raise Deadline()
        yield
        return

    def fire(signum, frame):
        raise Deadline()

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def clean(obj):
    """Strict JSON: NaN/inf become null, tensors lists, anything else unknown its ``str``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return clean(obj.tolist())
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


# ----------------------------------------------------------------------------------------------------------------
# (a) env
# ----------------------------------------------------------------------------------------------------------------
def _subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)]
                                                      + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if torch.cuda.is_available():
        env.pop("TRITON_INTERPRET", None)
    return env


def part_env(ctx: Ctx, rec: dict) -> None:
    cmd = [sys.executable, "-m", "eagle_runtime", "env"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(), timeout=120)
    rec.update(command="python -m eagle_runtime env", returncode=r.returncode, output=(r.stdout + r.stderr)[-6000:])
    if r.returncode != 0:
        raise RuntimeError(f"python -m eagle_runtime env exited {r.returncode}")


# ----------------------------------------------------------------------------------------------------------------
# (a) every kernel against its reference
# ----------------------------------------------------------------------------------------------------------------
def _kernel_cases(dry: bool, dev: torch.device, dtype: torch.dtype) -> list[tuple[str, dict, Callable]]:
    """``(op, shape, make)``: ``make()`` gives ``(args, call)`` where ``call(ops, args)`` returns the outputs."""
    from eagle_kernels import reference

    if dry:
        Hq, Hkv, D, T, P, H, I, V, planes, N = 4, 2, 16, 7, 9, 64, 96, 300, 4, 3
    else:  # Llama-3-8B; a 61-node tree (EAGLE-2's 60 drafts + root) over a 2048-token prefix; 32 layers' K and V
        Hq, Hkv, D, T, P, H, I, V, planes, N = 32, 8, 128, 61, 2048, 4096, 14336, 128256, 64, 10
    S = P + T + 3
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=dev, dtype=dt)

    parents = torch.tensor([[-1] + [int(torch.randint(0, i, (1,), generator=g)) for i in range(1, T)]])
    bufs = reference.build_tree_buffers(parents)
    mask, depth = bufs.mask.to(dev), bufs.depth.to(dev)
    prefix = torch.tensor([P], device=dev)
    long = dict(dtype=torch.long, device=dev)
    scalar0 = lambda: torch.zeros((), **long)  # noqa: E731
    greedy = lambda B: (torch.zeros(B, device=dev), torch.ones(B, device=dev), torch.zeros(B, **long))  # noqa: E731

    def rope_tables():
        inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        f = torch.arange(S, dtype=torch.float32)[:, None] * inv[None]
        emb = torch.cat([f, f], -1)
        return emb.cos().to(dev, dtype), emb.sin().to(dev, dtype)

    def tree_attention():
        args = (randn(1, T, Hq, D), randn(1, Hkv, S, D), randn(1, Hkv, S, D), prefix, mask)
        return args, lambda ops, a: ops.tree_attention(*a)

    def rms_norm():
        return (randn(1, T, H), 1 + 0.1 * randn(H), 1e-5), lambda ops, a: ops.rms_norm(*a)

    def add_rms_norm():
        return (randn(1, T, H), randn(1, T, H), 1 + 0.1 * randn(H), 1e-5), lambda ops, a: ops.add_rms_norm(*a)

    def silu_mul():
        return (randn(1, T, 2 * I),), lambda ops, a: ops.silu_mul(*a)

    def rope_kv_write():
        cos, sin = rope_tables()
        args = (randn(1, T, (Hq + 2 * Hkv) * D), cos, sin, P + depth, torch.zeros(1, Hkv, S, D, device=dev, dtype=dtype),
                torch.zeros(1, Hkv, S, D, device=dev, dtype=dtype), P + torch.arange(T, device=dev)[None])

        def call(ops, a):
            q = ops.rope_kv_write(*a, Hq, Hkv)
            return q, a[4], a[5]  # the caches are written in place

        return args, call

    def topk_expand():
        scores = torch.sort(-torch.rand(1, N, generator=g) * 5, descending=True).values.to(dev)
        return (randn(1, N, V), scores, N, N), lambda ops, a: ops.topk_expand(*a)

    def sample_tokens():
        return (randn(4, V), *greedy(4), scalar0(), scalar0()), lambda ops, a: ops.sample_tokens(*a)

    def accept_tree():
        logits = randn(1, T, V)
        chain = min(6, T)
        par = torch.tensor([[-1] + list(range(chain - 1)) + [int(torch.randint(0, i, (1,), generator=g))
                                                              for i in range(chain, T)]], device=dev)
        tokens = torch.randint(0, V, (1, T), generator=g).to(dev)
        for i in range(1, chain - 1):  # a chain the target accepts, then a rejected node
            tokens[0, i] = logits[0, i - 1].float().argmax()
        return (logits, tokens, par, *greedy(1), scalar0(), scalar0()), lambda ops, a: ops.accept_tree(*a)

    def kv_compact():
        n = min(5, T - 1)
        path = torch.full((1, T), -1, **long)
        path[0, 0] = 0
        path[0, 1:n + 1] = torch.sort(torch.randperm(T - 1, generator=g)[:n] + 1).values.to(dev)
        args = (randn(planes, 1, Hkv, S, D), prefix, path, torch.tensor([n], device=dev))
        return args, lambda ops, a: ops.kv_compact(*a)

    shape = {"Hq": Hq, "Hkv": Hkv, "D": D, "T": T, "prefix": P, "hidden": H, "intermediate": I, "vocab": V}
    cases = [tree_attention, rms_norm, add_rms_norm, silu_mul, rope_kv_write, topk_expand, sample_tokens,
             accept_tree, kv_compact]
    return [(c.__name__, shape, c) for c in cases]


def _outputs(out) -> list[tuple[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return [("out", out)]
    names = getattr(out, "_fields", None) or [f"out{i}" for i in range(len(out))]
    return [(n, t) for n, t in zip(names, out) if isinstance(t, torch.Tensor)]


def _clone(args, dtype=None):
    def one(a):
        if not isinstance(a, torch.Tensor):
            return a
        a = a.clone()
        return a.to(dtype) if dtype is not None and a.is_floating_point() else a

    return tuple(one(a) for a in args)


def check_kernel(op: str, shape: dict, make, ops_k, ops_t, dev, atol: float) -> dict:
    """One op: kernel and torch at the same precision against the fp32 reference (error-relative), twice timed."""
    args, call = make()
    t0 = time.perf_counter()
    call(ops_k, _clone(args))
    _sync(dev)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_k = _outputs(call(ops_k, _clone(args)))
    _sync(dev)
    steady = time.perf_counter() - t0
    out_t = _outputs(call(ops_t, _clone(args)))
    out_32 = _outputs(call(ops_t, _clone(args, torch.float32)))
    row = {"op": op, "first_s": round(first, 4), "steady_s": round(steady, 5), "outputs": {}, "ok": True}
    for (name, k), (_, t), (_, r) in zip(out_k, out_t, out_32):
        if k.is_floating_point():
            err_k = (k.float() - r.float()).abs().max().item()
            err_t = (t.float() - r.float()).abs().max().item()
            ok = err_k <= 2 * err_t + atol
            o = {"err_kernel": err_k, "err_torch": err_t, "ok": ok}
            if not ok:
                bad = (k.float() - r.float()).abs() > 2 * err_t + atol
                o.update(mismatches=int(bad.sum()), first_positions=bad.nonzero()[:5].tolist())
        else:
            bad = k != t
            ok = not bool(bad.any())
            o = {"mismatches": int(bad.sum()), "ok": ok}
            if not ok:
                o["first_positions"] = bad.nonzero()[:5].tolist()
        row["outputs"][name] = o
        row["ok"] &= ok
    return row


def part_kernel_check(ctx: Ctx, rec: dict) -> None:
    from eagle_kernels import get_ops

    dry = ctx.args.dry_run
    dtype = torch.float16 if dry else torch.bfloat16  # the interpreter has no bfloat16 (numpy)
    ops_k, ops_t = get_ops("triton", device=ctx.dev), get_ops("torch")
    cases = _kernel_cases(dry, ctx.dev, dtype)
    rec.update(dtype=str(dtype).removeprefix("torch."), shape=cases[0][1], atol=1e-3, rows=[])
    for op, shape, make in cases:
        try:
            row = check_kernel(op, shape, make, ops_k, ops_t, ctx.dev, rec["atol"])
        except Exception as e:  # noqa: BLE001 - one op's error is recorded, the others still run
            row = {"op": op, "ok": False, "error": f"{type(e).__name__}: {e}"}
        rec["rows"].append(row)
        ctx.log(f"  {op}: {'ok' if row['ok'] else 'FAILED ' + str(row.get('error') or row['outputs'])[:300]}")
    failed = [r["op"] for r in rec["rows"] if not r["ok"]]
    if failed:
        raise RuntimeError(f"kernels off their reference: {', '.join(failed)}")


# ----------------------------------------------------------------------------------------------------------------
# (a) greedy generation on the default path against backend torch
# ----------------------------------------------------------------------------------------------------------------
def random_target(cfg: dict, dtypes, dev, max_len: int):
    """Targets with one set of random weights (HF ``LlamaForCausalLM`` initialisation, seed 0), one per dtype."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from eagle_runtime.loading import target_from_state_dict

    torch.manual_seed(0)
    with torch.device(dev):
        hf = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    config = dict(hf.config.to_dict(), model_type="llama")
    state = hf.state_dict()
    try:
        for dt in dtypes:
            yield dt, target_from_state_dict(config, state, dt, dev, max_len)
    finally:
        del hf, state


def part_generation(ctx: Ctx, rec: dict) -> None:
    from eagle_runtime import DynamicTree, EagleModel, random_head
    from mtbench_speed import agreement  # one definition of "fraction identical, common prefix"

    dry = ctx.args.dry_run
    cfg = GEN_TINY if dry else GEN_SHAPE
    n_prompts, prompt_len, max_new = (2, 12, 12) if dry else (4, 32, 48)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, cfg["vocab_size"], (prompt_len,), generator=g).tolist() for _ in range(n_prompts)]
    rec.update(shape={k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers")}, prompts=n_prompts,
               prompt_tokens=prompt_len, max_new_tokens=max_new, reference="plain greedy decoding, backend torch",
               rows=[])
    failures = []
    for dtype, target in random_target(cfg, (torch.float32, torch.bfloat16), ctx.dev, 512):
        dname = str(dtype).removeprefix("torch.")
        head = random_head(target)
        ref_model = EagleModel(target, head, backend="torch", tree=DynamicTree(60, 6, 10))
        ref = ref_model.generate(prompts, max_new, speculative=False).tokens
        del ref_model
        for label, kw in (("default", {}), ("dynamic 60,6,10", {"tree": DynamicTree(60, 6, 10)})):
            # the API's choices: backend "auto", cuda_graphs None, tree "auto" unless given (issue 24 item 3)
            model = EagleModel(target, head, **kw)
            t0 = time.perf_counter()
            model.generate(prompts, max_new)
            first = time.perf_counter() - t0
            r = model.generate(prompts, max_new)
            a = agreement(zip(r.tokens, ref))
            row = {"dtype": dname, "path": label, "backend": model.ops.name, "cuda_graphs": model.cuda_graphs,
                   "tree": type(model.tree).__name__, "tree_summary": r.tree, "first_s": round(first, 3),
                   "steady_s": round(r.wall_time_s, 4), "tau": r.tau, **a,
                   "token_identity_expected": dtype == torch.float32}
            if dtype == torch.float32 and not a["all"]:
                failures.append(f"{label} float32: {a['identical']}/{a['total']} identical")
            rec["rows"].append(row)
            ctx.log(f"  {dname} {label}: backend {row['backend']}, graphs {row['cuda_graphs']}, "
                    f"{a['identical']}/{a['total']} identical, mean common prefix {a['mean_common_prefix']:.1f}")
            del model
        del target, head
        if ctx.dev.type == "cuda":
            torch.cuda.empty_cache()
    default = next((r for r in rec["rows"] if r["path"] == "default"), None)
    if default:
        rec["default_path"] = {k: default[k] for k in ("backend", "cuda_graphs", "tree")}
    if failures:
        raise RuntimeError("float32 greedy generation differs from backend torch: " + "; ".join(failures))


# ----------------------------------------------------------------------------------------------------------------
# (a) pytest -m cuda
# ----------------------------------------------------------------------------------------------------------------
def tests_verdict(counts: dict, returncode: int, graph_outcomes: list[str], cuda: bool) -> tuple[bool, str]:
    """Whether the pytest step passed. On a GPU every CUDA-graph test skipping is a failure: it means the graph
    tests did not run (e.g. data they need is absent), not that graphs work."""
    if counts.get("failed") or counts.get("error") or counts.get("errors"):
        return False, f"pytest exit {returncode}, {counts}"
    if returncode not in (0, 5):
        return False, f"pytest exit {returncode}"
    if cuda:
        if not graph_outcomes:
            return False, "no CUDA-graph test (tests/test_cuda_graphs.py) ran"
        if all(o == "skipped" for o in graph_outcomes):
            return False, f"all {len(graph_outcomes)} CUDA-graph tests skipped"
    return True, ""


def _junit_outcomes(path: Path) -> dict[str, str]:
    out = {}
    if not path.is_file():
        return out
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = {c.tag for c in case}
        outcome = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed")
        out[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return out


def part_tests(ctx: Ctx, rec: dict) -> None:
    files = ["tests/test_moe.py"] if ctx.args.dry_run else []  # dry run: one file, to exercise this path quickly
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "cuda", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *files]
        left = ctx.args.deadline - time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_subprocess_env(),
                               timeout=max(1.0, min(ctx.args.tests_timeout, left)))
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            atomic_write_text(ctx.out / f"{ctx.stem}-pytest.log", out)
            raise Deadline() from None
        outcomes = _junit_outcomes(xml)
    out = r.stdout + r.stderr
    atomic_write_text(ctx.out / f"{ctx.stem}-pytest.log", out)
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", out)}
    graph = [o for k, o in outcomes.items() if "test_cuda_graphs" in k]
    ok, why = tests_verdict(counts, r.returncode, graph, torch.cuda.is_available())
    rec.update(command=" ".join(["pytest -q -rs -m cuda", *files]),
               returncode=r.returncode, counts=counts,
               graph_tests={o: graph.count(o) for o in ("passed", "failed", "skipped")},
               log=f"{ctx.stem}-pytest.log", tail=out[-2000:])
    if not ok:
        raise RuntimeError(why)


# ----------------------------------------------------------------------------------------------------------------
# (b) plain step roofline and cycle, per model
# ----------------------------------------------------------------------------------------------------------------
def _cycle_part(name: str):
    def run(ctx: Ctx, rec: dict) -> None:
        # ---- STEP-LEVEL TIMING: a call into benchmarks/cycle_breakdown.py (owned by the engine's lead). The report
        # ---- itself calls no engine private; run_model(name, dtype, device, prefixes, reps, graphs, log, batches)
        # ---- is the contract, and everything below it (prefill, cycle, captured steps) lives there.
        import cycle_breakdown as cb

        if ctx.args.dry_run:
            shape, dtype, prefixes, reps, batches = "tiny", torch.float32, [32, 64], 2, [1, 2]
        else:
            shape, dtype, prefixes, reps, batches = name, torch.bfloat16, [512, 2048], 30, [1, 2, 4, 8]
        res = cb.run_model(shape, dtype, ctx.dev, prefixes, reps, graphs=True, log=ctx.log,
                           batches=batches if name == "llama2-7b" else ())
        rec.update(res, label=name)

    return run


def headline(parts: dict) -> dict:
    res = parts.get(HEADLINE, {})
    if not res.get("rows"):
        return {}
    r = res["rows"][0]
    plain = r.get("plain_decode_graph_ms", r["plain_decode_ms"])
    cyc = r.get("cycle_graph_ms", r["cycle_eager_ms"])
    return {"headline": f"{res['model']} {res['dtype']} prefix {r['prefix']}, graphs {'cycle_graph_ms' in r}",
            "plain_step_ms": plain, "plain_roofline_fraction": r.get("plain_roofline_fraction"), "cycle_ms": cyc,
            "cycle_over_plain": cyc / plain, "plain_tokens_per_s": 1e3 / plain,
            "hf_generate_tokens_per_s": r.get("hf_generate_tokens_per_s")}


# ----------------------------------------------------------------------------------------------------------------
# (c) kernel benchmarks
# ----------------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _without_flex(off: bool):
    """Hide FlexAttention from the benchmarks (``import`` raises ImportError): its ``torch.compile`` costs tens of
    seconds of a short GPU session. bench_tree_attention.py then reports it unavailable and goes on."""
    name = "torch.nn.attention.flex_attention"
    if not off:
        yield
        return
    saved = sys.modules.get(name)
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if saved is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = saved


def part_kernels(ctx: Ctx, rec: dict) -> None:
    import _bench_utils

    _bench_utils.SAVE = False  # this report is the only file written
    rec.update(rows=[], errors=[], flex=bool(ctx.args.flex), seconds_by_bench={})
    for path in sorted(HERE.glob("bench_*.py")):
        if "report(" not in path.read_text():
            continue
        start = len(_bench_utils.COLLECTED)
        argv = sys.argv
        sys.argv = [str(path)] + (["--quick"] if ctx.args.dry_run else [])
        t0 = time.perf_counter()
        try:
            with _without_flex(not ctx.args.flex):
                runpy.run_path(str(path), run_name="__main__")
        except Exception as e:  # noqa: BLE001 - one benchmark's failure is recorded, the others still run
            rec["errors"].append({"bench": path.name, "error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-2000:]})
            ctx.log(f"  FAILED {path.name}: {type(e).__name__}: {e}")
        finally:
            sys.argv = argv
            for name, bench_rows in _bench_utils.COLLECTED[start:]:
                rec["rows"] += [{"bench": path.stem, "report": name, **r} for r in bench_rows]
            rec["seconds_by_bench"][path.stem] = round(time.perf_counter() - t0, 2)
        ctx.log(f"  {path.name}: {time.perf_counter() - t0:.1f} s")
    if rec["errors"]:
        raise RuntimeError("benchmarks failed: " + ", ".join(e["bench"] for e in rec["errors"]))


# ----------------------------------------------------------------------------------------------------------------
PARTS = [
    Part("env", "a", "python -m eagle_runtime env", 10, 15, part_env),
    Part("kernel_check", "a", "every triton op vs its reference, bf16, Llama-3-8B shapes", 45, 25, part_kernel_check),
    Part("generation", "a", "greedy generation, default path and a 60-token tree, vs backend torch, fp32 and bf16, "
         "random Llama-3-8B-shaped target (2 layers)", 90, 40, part_generation),
    Part("tests", "a", "pytest -m cuda (fails when every CUDA-graph test skipped)", 180, 40, part_tests),
    Part("cycle_llama2-7b", "b", "plain step roofline and cycle, Llama-2-7B, bf16, graphs", 110, 25,
         _cycle_part("llama2-7b")),
    Part("cycle_llama3-8b", "b", "plain step roofline and cycle, Llama-3-8B, bf16, graphs", 110, 25,
         _cycle_part("llama3-8b")),
    Part("kernels", "c", "kernel benchmarks vs SDPA with a mask, flash-attn, FlexAttention (--flex), PyTorch peers",
         120, 60, part_kernels),
]
ALIASES = {"cycle": ["cycle_llama2-7b", "cycle_llama3-8b"]}


def _select(names: list[str]) -> set[str]:
    out = set()
    for n in names:
        if n in ALIASES:
            out |= set(ALIASES[n])
        elif n in {p.group for p in PARTS}:
            out |= {p.name for p in PARTS if p.group == n}
        elif n in {p.name for p in PARTS}:
            out.add(n)
        else:
            raise SystemExit(f"gpu_report.py: error: unknown part {n!r}; choose from "
                             f"{', '.join([p.name for p in PARTS] + list(ALIASES) + ['a', 'b', 'c'])}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _table(rows: list[dict], cols: list[str]) -> list[str]:
    return (["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            + ["| " + " | ".join(_fmt(r.get(k)) for k in cols) + " |" for r in rows])


def markdown(rep: dict) -> str:
    v = rep["versions"]
    L = [f"# GPU report: {rep['device']} ({rep['date']})", "",
         f"torch {v['torch']}, triton {v['triton']}, transformers {v['transformers']}, CUDA {v['cuda']}, "
         f"flash-attn {v['flash_attn'] or 'not installed'}; dry run: {rep['dry_run']}; budget {rep['budget_s']} s, "
         f"{_fmt(rep['seconds'])} s so far.", ""]
    gen = rep["parts"].get("generation", {})
    if gen.get("default_path"):
        d = gen["default_path"]
        L += [f"Measured default path: backend {d['backend']}, CUDA graphs {d['cuda_graphs']}, tree {d['tree']}.", ""]
    if "plain_step_ms" in rep:
        L += [f"**{rep['headline']}**: plain step {rep['plain_step_ms']:.3f} ms "
              f"({_fmt(rep['plain_roofline_fraction'])} of the copy-bandwidth roofline), cycle "
              f"{rep['cycle_ms']:.3f} ms = {rep['cycle_over_plain']:.2f} plain steps.", ""]
    L += ["## Parts", "", "| part | group | status | seconds | compiled | compile s | note |", "|---|---|---|---|---|---|---|"]
    for p in rep["plan"]:
        s = rep["status"][p["name"]]
        L.append(f"| {p['name']} | {p['group']} | {s['status']} | {_fmt(s.get('seconds'))} | "
                 f"{_fmt(s.get('compiled'))} | {_fmt(s.get('compile_s'))} | {(s.get('error') or s.get('why') or '')[:160]} |")
    parts = rep["parts"]
    if parts.get("env", {}).get("output"):
        L += ["", "## Environment", "", "```", parts["env"]["output"].rstrip(), "```"]
    kc = parts.get("kernel_check", {})
    if kc.get("rows"):
        L += ["", f"## Kernels vs reference ({kc['dtype']}, atol {kc['atol']}; shape {kc['shape']})", "",
              "| op | ok | first s | steady s | outputs |", "|---|---|---|---|---|"]
        for r in kc["rows"]:
            outs = r.get("error") or "; ".join(
                f"{n}: " + (f"err {o['err_kernel']:.3g} vs torch {o['err_torch']:.3g}" if "err_kernel" in o
                            else f"{o['mismatches']} mismatches") for n, o in r["outputs"].items())
            L.append(f"| {r['op']} | {r['ok']} | {_fmt(r.get('first_s'))} | {_fmt(r.get('steady_s'))} | {outs} |")
    if gen.get("rows"):
        L += ["", f"## Greedy generation vs {gen['reference']} ({gen['shape']})", "",
              "Token identity is claimed in float32 only; in bfloat16 the fraction identical and the mean common "
              "prefix are the result.", ""]
        L += _table(gen["rows"], ["dtype", "path", "backend", "cuda_graphs", "tree", "identical", "total", "fraction",
                                  "mean_common_prefix", "first_s", "steady_s", "tau"])
    t = parts.get("tests", {})
    if t.get("command"):
        L += ["", f"## Tests (`{t['command']}`)", "", f"exit {t['returncode']}, {t['counts']}; CUDA-graph tests "
              f"{t['graph_tests']}; log {t['log']}"]
    cols = ["prefix", "plain_decode_ms", "plain_decode_graph_ms", "plain_roofline_fraction", "draft_ms",
            "draft_graph_ms", "verify_ms", "verify_graph_ms", "accept_update_ms", "accept_update_graph_ms",
            "cycle_eager_ms", "cycle_graph_ms", "cycle_over_plain", "hf_generate_tokens_per_s"]
    for name in ALIASES["cycle"]:
        c = parts.get(name, {})
        if not c.get("rows"):
            continue
        L += ["", f"## Cycle: {c['model']} ({c['dtype']}, backend {c['backend']}, graphs {c['graphs']})", ""]
        L += _table(c["rows"], cols)
        if c.get("plain_step_by_batch"):
            L += [""] + _table(c["plain_step_by_batch"], ["batch", "plain_step_ms", "ms_per_sequence", "graph"])
    by_bench: dict[str, list[dict]] = {}
    for r in parts.get("kernels", {}).get("rows", []):
        by_bench.setdefault(r["report"], []).append(r)
    for name, rows in by_bench.items():
        cols = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("bench", "report", "op")]
        L += ["", f"## Kernel benchmark: {name}", ""] + _table(rows, cols)
    return "\n".join(L) + "\n"


# ----------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (or any device): check the script")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("EAGLE_RESULTS_DIR") or "results"),
                    help="output folder (default: $EAGLE_RESULTS_DIR, else ./results)")
    ap.add_argument("--budget-s", type=float, default=500.0, help="seconds for the whole report (default 500)")
    ap.add_argument("--skip", nargs="*", default=[], help="parts to skip: names, 'cycle', or a group a/b/c")
    ap.add_argument("--only", nargs="*", default=None, help="run only these parts (names, 'cycle', a/b/c)")
    ap.add_argument("--flex", action="store_true", help="include FlexAttention in the kernel benchmarks (compiles)")
    ap.add_argument("--plan", action="store_true", help="print the parts and their estimated seconds, then exit")
    ap.add_argument("--tests-timeout", type=int, default=480, help="most seconds for the pytest part")
    return ap.parse_args(argv)


def _check_out(out: Path) -> str | None:
    o, root = out.resolve(), ROOT.resolve()
    if (o == root or root in o.parents) and not (o == root / "results" or root / "results" in o.parents):
        return f"--out {out} lies inside the source tree {root}; use $EAGLE_RESULTS_DIR, ./results or a folder outside"
    return None


def main(argv=None) -> int:
    a = parse_args(argv)
    chosen = [p for p in PARTS if (a.only is None or p.name in _select(a.only)) and p.name not in _select(a.skip)]
    est = lambda p: p.est_dry_s if a.dry_run else p.est_s  # noqa: E731
    if a.plan:
        total = 0.0
        print(f"{'part':16} {'group':5} {'est s':>6} {'cum s':>6}  what   ({'dry run' if a.dry_run else 'one GPU'}, "
              f"budget {a.budget_s:g} s)")
        for p in chosen:
            total += est(p)
            print(f"{p.name:16} {p.group:5} {est(p):6.0f} {total:6.0f}  {p.what}"
                  + ("" if total <= a.budget_s else "  (past the budget: skipped unless earlier parts run faster)"))
        print(f"total {total:.0f} s estimated; budget {a.budget_s:g} s")
        return 0
    if not a.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; run with --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    bad = _check_out(a.out)
    if bad:
        print(f"error: {bad}", file=sys.stderr)
        return 2
    a.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    a.deadline = t_start + a.budget_s

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    info = device_info()
    now = datetime.datetime.now(datetime.timezone.utc)
    stem = "gpu_report_" + re.sub(r"[^A-Za-z0-9.]+", "-", info["device"]).strip("-") + now.strftime("_%Y%m%dT%H%M%SZ")
    ctx = Ctx(a, torch.device("cuda" if torch.cuda.is_available() else "cpu"), log, a.out, stem)
    rep: dict = {**info, "date": now.isoformat(timespec="seconds"), "dry_run": a.dry_run, "budget_s": a.budget_s,
                 "versions": _versions(), "seconds": 0.0,
                 "plan": [{"name": p.name, "group": p.group, "what": p.what, "est_s": est(p)} for p in PARTS],
                 "status": {p.name: {"status": "pending" if p in chosen else "not selected"} for p in PARTS},
                 "parts": {}}

    def write() -> None:
        rep["seconds"] = round(time.perf_counter() - t_start, 1)
        rep.update(headline(rep["parts"]))
        atomic_write_json(a.out / f"{stem}.json", clean(rep), indent=1)
        atomic_write_text(a.out / f"{stem}.md", markdown(clean(rep)))

    write()
    for p in chosen:
        left = a.deadline - time.perf_counter()
        st = rep["status"][p.name]
        if left < START_FRACTION * est(p):
            st.update(status="skipped", why=f"budget: {left:.0f} s left, estimate {est(p):.0f} s")
            log(f"part {p.name}: skipped ({st['why']})")
            write()
            continue
        log(f"part {p.name} ({p.what}; estimate {est(p):.0f} s, {left:.0f} s left)")
        rec = rep["parts"].setdefault(p.name, {})
        counter = CompileCounter()
        t0 = time.perf_counter()
        try:
            with counter.active(), deadline(left):
                p.run(ctx, rec)
            st["status"] = "ok"
        except Deadline:
            st.update(status="cut", why=f"the budget ran out after {time.perf_counter() - t0:.0f} s; what it measured is kept")
        except Exception as e:  # noqa: BLE001 - a failed part is part of the report; the others still run
            st.update(status="failed", error=f"{type(e).__name__}: {e}")
            rec["traceback"] = traceback.format_exc()[-3000:]
        st["seconds"] = round(time.perf_counter() - t0, 1)
        if counter.available:
            st.update(compiled=counter.count, compile_s=round(counter.seconds, 1))
        log(f"part {p.name}: {st['status']} in {st['seconds']} s" + (f": {st.get('error') or st.get('why')}"
                                                                     if st["status"] != "ok" else ""))
        write()
    for p in PARTS:
        if rep["status"][p.name]["status"] == "pending":  # not reached (cannot happen today; kept honest)
            rep["status"][p.name].update(status="skipped", why="not reached")
    write()
    log(f"wrote {a.out / stem}.json and .md")
    return 1 if any(s["status"] == "failed" for s in rep["status"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
