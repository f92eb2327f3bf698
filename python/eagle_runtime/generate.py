"""EAGLE speculative decoding and plain decoding over the lean models, batch first.

One cycle: draft a tree from the head's last prediction -> verify the whole tree in one target pass with the
tree mask -> accept (greedy or exact speculative sampling) -> compact the target KV cache to the accepted path
-> run the head over the accepted path's true features (rewinding its cache to the committed prefix).

All per-cycle state lives in device tensors; the only host read per cycle is whether every sequence finished.
"""

from __future__ import annotations

import numbers
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle_kernels import get_ops
from eagle_kernels.reference import GREEDY_TEMPERATURE

from .adaptive import AutoTree, fit_kind, path_observations, tree_key
from .draft import load_head
from .drafter import Drafter, target_states
from .loading import load_target
from .model import Transformer
from .text import continuation_text, load_tokenizer
from .tree import DynamicTree, StaticTree, make_tree


@dataclass
class GenerationResult:
    """What :meth:`EagleModel.generate` returns. ``accept_lengths[b]`` lists, per cycle, the tokens sequence ``b``
    gained in that cycle (accepted draft tokens + the bonus/residual token), as the papers count tau."""

    tokens: list[list[int]]
    text: list[str] | None
    accept_lengths: list[list[int]]
    prompt_lengths: list[int]
    wall_time_s: float
    prefill_time_s: float
    speculative: bool
    tree: dict | None = None  # the trees used: {"mode", "steps" per tree key, "plain_fraction", ...}; None if plain

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tau(self) -> float:
        """Mean accepted length per cycle (bonus token included), over all sequences and cycles."""
        lens = [n for seq in self.accept_lengths for n in seq]
        return sum(lens) / len(lens) if lens else float("nan")

    def accept_histogram(self) -> dict[int, int]:
        hist: dict[int, int] = {}
        for seq in self.accept_lengths:
            for n in seq:
                hist[n] = hist.get(n, 0) + 1
        return dict(sorted(hist.items()))


class GraphsUnavailable(RuntimeError):
    """CUDA graphs were requested explicitly but cannot run here (backend or native extension)."""


@dataclass
class _Sampling:
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor


def _check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int = 0) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not -(2**63) <= int(seed) < 2**63:
        raise ValueError(f"seed must fit in 64 bits (signed), got {seed}")


def _native_cuda() -> bool:
    try:
        from eagle_kernels import _C
    except ImportError:
        return False
    return bool(getattr(_C, "with_cuda", False))


def _bucket(n: int) -> int:
    """The batch bucket of ``n`` sequences: 1..8 exactly, then the next multiple of 8 (at most 7 padding rows, and
    one captured graph per bucket: 8 graphs up to batch 8, one more per 8 sequences after)."""
    if n < 1:
        raise ValueError(f"batch must be >= 1, got {n}")
    return n if n <= 8 else -(-n // 8) * 8


class BufferPool:
    """The static buffers that captured graphs read: one target KV cache and one draft KV cache, each allocated
    for the largest batch bucket seen so far; a smaller bucket gets the view ``cache[:, :B]``.

    The caches are ``[planes, B, H_kv, S, D]``: the view keeps every plane ``cache[p, :B]`` contiguous and only
    the plane stride differs from a fresh tensor (every op takes strides: tree attention and the K/V scatter work
    per plane, KV compaction reads all five strides). A larger bucket reallocates (the old cache is dropped, so
    one lives at a time) and bumps :attr:`generation`; graphs captured over the old buffers must then be
    recaptured. :meth:`reserve` sizes the pool up front, so that a process allocates exactly once.

    Small per-bucket state (sampling parameters, lengths, the head's last output) is kept by key in
    :meth:`get`. With ``static=False`` (eager decoding) nothing is kept: every call allocates afresh.
    """

    def __init__(self, make_cache, make_draft_cache, static: bool = False):
        self._make = {"cache": make_cache, "d_cache": make_draft_cache}
        self._full: dict[str, torch.Tensor] = {}
        self._small: dict = {}
        self.static = static
        self.allocations = {"cache": 0, "d_cache": 0}  # full-size allocations made while static (tests count them)
        self.generation = 0

    def reserve(self, batch: int, names=("cache", "d_cache")) -> None:
        """Allocate the ``names`` caches for the bucket of ``batch`` sequences now (grows only)."""
        for name in names:
            self.cache(name, _bucket(batch))

    def cache(self, name: str, B: int) -> torch.Tensor:
        """The ``name`` cache (``"cache"`` or ``"d_cache"``) for ``B`` rows: a fresh one, or the pool's view."""
        if not self.static:
            return self._make[name](B)
        full = self._full.get(name)
        if full is None or full.shape[1] < B:
            self._full.pop(name, None)  # free the smaller one before allocating the larger
            full = self._full[name] = self._make[name](B)
            self.allocations[name] += 1
            self.generation += 1
        return full if full.shape[1] == B else full[:, :B]

    def get(self, key, make):
        """A small buffer kept by ``key`` while static (fixed address for graphs); ``make()`` afresh otherwise."""
        if not self.static:
            return make()
        if key not in self._small:
            self._small[key] = make()
        return self._small[key]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._full.values())


class _CapturedStep:
    """A decode step captured as one CUDA graph over the fixed state buffers, replayed on every call.

    Every capture allocates from ``pool`` (one ``torch.cuda.graph_pool_handle()`` per model): graphs replay one
    at a time on one stream, so their intermediates can share memory; each graph's outputs stay referenced here
    and are never handed to another capture."""

    def __init__(self, fn, state: dict, sp: _Sampling, pool=None):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compilation, allocator; the step commits nothing
            for _ in range(2):
                fn(state, sp)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(state, sp)

    def __call__(self, state: dict, sp: _Sampling):
        self.graph.replay()
        return self.outputs


def _live_len(state: dict) -> torch.Tensor:
    """The cache length a step runs at: the committed length for live rows, 0 for finished and padding rows.

    A finished row keeps being computed (shapes stay static for batching and CUDA graphs) but its output is
    discarded; running it at length 0 makes it write only slots ``[0, tree)`` of its own, dead, cache row, so no
    finished row can run past the cache that :meth:`EagleModel.cache_len_needed` reserves."""
    return torch.where(state["done"], 0, state["L"])


def _advance(state: dict, n_emit: torch.Tensor) -> torch.Tensor:
    """The committed length after a step: live rows advance by their emitted tokens, finished rows stay."""
    return torch.where(state["done"], state["L"], state["L"] + n_emit)


def causal_mask(B: int, T: int, device) -> torch.Tensor:
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device)).expand(B, T, T)


class EagleModel:
    """A target model, its EAGLE draft head, a tokenizer and a draft tree, ready to generate.

    Args:
        target: the lean target model.
        head: the draft head (any :class:`~eagle_runtime.drafter.Drafter`: EAGLE-1 or EAGLE-3), or ``None`` for
            plain decoding only.
        tokenizer: a HF tokenizer (optional; without it prompts must be token ids and no text is returned).
        tree: ``"auto"`` (default: the tree, or plain decoding, that a measured cost model and the running
            acceptance say is fastest; see :mod:`eagle_runtime.adaptive`), ``"dynamic"``, ``"static"``, or a
            :class:`DynamicTree` / :class:`StaticTree` / :class:`~eagle_runtime.adaptive.AutoTree`.
        backend: ``"auto"``, ``"cpu"``, ``"torch"`` or ``"triton"`` (see :func:`eagle_kernels.get_ops`).
        cuda_graphs: on CUDA, capture each decode step (the whole draft + verify + accept cycle, or a plain
            step) as one CUDA graph per batch bucket (1..8, then multiples of 8) and replay it; needs the
            ``triton`` backend and the native extension built with CUDA. ``None`` (default): on when the target
            is on CUDA and both are present, else eager (said once); ``True`` on CUDA without them raises
            :class:`GraphsUnavailable`. Ignored on CPU and for ``tree="auto"`` (whose steps change shape).

    With graphs on, every bucket shares one target KV cache and one draft KV cache sized for the largest bucket
    seen (see :class:`BufferPool`; :meth:`reserve` sizes them up front) and every capture one graph memory pool.
    """

    def __init__(
        self, target: Transformer, head: Drafter | None, tokenizer=None, tree="auto", backend="auto",
        cuda_graphs: bool | None = None,
    ):
        self.target, self.head, self.tokenizer = target, head, tokenizer
        self.tree = make_tree(tree)
        self.set_backend(backend)
        self._graphs: dict = {}
        # At temperature > 0 a chain (top_k 1) draws its drafts from the draft's distribution and is verified by
        # speculative sampling (``eagle_kernels.reference.accept_chain``): it accepts about sum_x min(p, q) per
        # draft where EAGLE-2's deterministic draft gets p(draft). False: deterministic drafts everywhere.
        self.sampled_drafts = True
        self._sampled_drafts_now = False
        self._graph_pool = None
        self._pool = BufferPool(
            lambda B: target.new_cache(B),
            (lambda B: head.new_cache(B, target.max_len)) if head is not None else _no_head_cache,
        )
        self.cuda_graphs = cuda_graphs

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs (resolved from the constructor's argument)."""
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool | None) -> None:
        self._graphs_request = value
        dev = self.target.embed_tokens.weight.device
        self._cuda_graphs = _resolve_graphs(value, dev.type == "cuda", *self._graphs_ready())
        self._pool.static = self._graphs_possible(dev)  # static buffers exactly when graphs will be captured
        self._graphs.clear()

    def _graphs_ready(self) -> tuple[bool, str]:
        if self.ops.name != "triton":
            return False, f"CUDA graphs need the sync-free ops of backend 'triton', not {self.ops.name!r}"
        if not _native_cuda():
            return False, ("CUDA graphs need the native extension eagle_kernels._C built with CUDA, and it is "
                           "missing (see csrc/README.md)")
        return True, ""

    def reserve(self, batch: int) -> None:
        """With graphs on, allocate the target and draft caches for ``batch`` sequences now, so that no later
        call of up to that many sequences reallocates them (and recaptures its graphs)."""
        if self._pool.static:
            self._pool.reserve(batch, ("cache", "d_cache") if self.head is not None else ("cache",))

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        draft: str | Path | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        tree="auto",
        backend: str = "auto",
        max_len: int | None = None,
        cuda_graphs: bool | None = None,
        tensor_parallel: int | None = None,
    ) -> "EagleModel":
        """Load a HF target (local directory or hub id) and an EAGLE-1 or EAGLE-3 head (format auto-detected).

        ``dtype=None`` is bfloat16 on CUDA and float32 elsewhere; ``cuda_graphs`` is the constructor's. Inside a
        torchrun process the target is sharded over the process group (``tensor_parallel``, when given, must
        equal its size; see :mod:`eagle_runtime.parallel`); the head is replicated on every rank."""
        from .parallel import load_target_parallel, resolve_tensor_parallel

        dev = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        if resolve_tensor_parallel(tensor_parallel) > 1:
            target = load_target_parallel(base, dtype=dtype, device=dev, max_len=max_len,
                                          tensor_parallel=tensor_parallel)
        else:
            target = load_target(base, dtype=dtype, device=dev, max_len=max_len)
        head = load_head(draft, target) if draft is not None else None
        return cls(target, head, load_tokenizer(base), tree=tree, backend=backend, cuda_graphs=cuda_graphs)

    def _graphs_possible(self, device: torch.device) -> bool:
        return self.cuda_graphs and device.type == "cuda"

    def _buffer(self, key, make):
        """Small per-bucket buffers kept across calls when graphs are on (fixed addresses); fresh ones otherwise."""
        return self._pool.get(key, make)

    def set_backend(self, backend: str) -> None:
        self.ops = get_ops(backend, device=self.target.embed_tokens.weight.device)
        if getattr(self.target, "tp", None) is not None:  # tensor parallel: EAGLE_TP_DEBUG checks rank agreement
            self.ops = self.target.tp.wrap_ops(self.ops)
        self.target.ops = self.ops
        if hasattr(self, "_pool"):  # re-resolve the graphs request against the new backend
            self.cuda_graphs = self._graphs_request

    # ----------------------------------------------------------------------------------------------------------
    def encode(self, prompts) -> list[list[int]]:
        """Token ids per prompt. A prompt is a string or a sequence of integer ids (list, tuple, 1-D numpy array
        or tensor); a batch is a list/tuple of prompts or a 2-D array."""
        if hasattr(prompts, "tolist") and not isinstance(prompts, str):  # numpy arrays and tensors
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and _is_id(prompts[0])):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of either")
        vocab = self.target.cfg.vocab_size
        k = getattr(self.tree, "top_k", getattr(self.tree, "max_rank", 0))
        if self.head is not None and k > vocab:
            raise ValueError(f"the draft tree's top-k {k} exceeds the vocabulary of {vocab} tokens")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("a text prompt needs a tokenizer; pass token ids or load one")
                ids = self.tokenizer(p)["input_ids"] if p else []
            else:
                if hasattr(p, "tolist"):
                    p = p.tolist()
                if not isinstance(p, (list, tuple)) or not all(_is_id(t) for t in p):
                    raise ValueError(f"a prompt must be a string or a sequence of integer token ids, got {type(p).__name__}")
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("empty prompt: give at least one token")
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"prompt token ids must lie in [0, {vocab})")
            out.append(ids)
        return out

    def cache_len_needed(self, prompts, max_new_tokens: int, speculative: bool = True) -> int:
        """KV-cache positions :meth:`generate` needs for ``prompts`` (text or ids): the longest prompt, the new
        tokens, one tree (or one token when plain) and one spare slot. Load with ``max_len`` at least this."""
        ids = self.encode(prompts)
        extra = max(self.tree.num_nodes, self.tree.draft_slots()) if speculative else 1
        return max(len(p) for p in ids) + max_new_tokens + extra + 1

    @torch.inference_mode()
    def generate(
        self,
        prompts,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        speculative: bool = True,
        stop_on_eos: bool = True,
    ) -> GenerationResult:
        """Generate from one prompt or a batch (text or token ids). ``speculative=False`` is plain decoding
        in the same runtime. Temperature 0 is greedy."""
        _check_sampling(temperature, top_p, top_k, max_new_tokens, seed)
        if speculative and self.head is None:
            raise ValueError("speculative decoding needs a draft head (load one with draft=...)")
        ids = self.encode(prompts)
        B_user, dev = len(ids), self.target.embed_tokens.weight.device
        if self._pool.static:
            # pad to the batch bucket so one captured graph serves every batch size in it
            ids = ids + [ids[-1]] * (_bucket(B_user) - B_user)
        B = len(ids)
        tree = self.tree
        need = self.cache_len_needed(ids, max_new_tokens, speculative)
        if need > self.target.max_len:
            raise ValueError(
                f"prompt ({max(len(p) for p in ids)} tokens) + max_new_tokens ({max_new_tokens}) + tree room "
                f"needs {need} cache positions, which exceeds the cache of {self.target.max_len}; shorten them or "
                f"load with "
                f"max_len >= {need}"
            )
        sp = self._buffer(("sampling", B), lambda: _Sampling(
            torch.empty(B, device=dev), torch.empty(B, device=dev), torch.empty(B, dtype=torch.long, device=dev),
            torch.empty((), dtype=torch.long, device=dev), torch.empty((), dtype=torch.long, device=dev)))
        sp.temperature.fill_(float(temperature))
        sp.top_p.fill_(float(top_p))
        sp.top_k.fill_(int(top_k))
        sp.seed.fill_(int(seed))
        sp.offset.zero_()
        eos = self.target.cfg.eos_token_id if stop_on_eos else []
        self._sampled_drafts_now = bool(self.sampled_drafts and temperature >= GREEDY_TEMPERATURE)
        ctrl = None
        if speculative and isinstance(tree, AutoTree):  # cost model measured (once, cached) before the clock
            ctrl = tree.controller(self, B, temperature, top_p, top_k, prefix=max(len(p) for p in ids))
        t0 = time.perf_counter()
        # auto mode starting with plain steps on equal-length prompts: the head reads the prompt when first needed
        pending: list = []  # auto mode: blocks of (features [B, m, H], next tokens [B, m]) the head has not read
        defer = ctrl is not None and ctrl.choice is None and len({len(p) for p in ids}) == 1
        state = self._prefill(ids, sp, speculative, pending if defer else None)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t_prefill = time.perf_counter() - t0
        W = tree.max_depth + 1 if speculative else 1
        out = torch.zeros(B, max_new_tokens + W + 1, dtype=torch.long, device=dev)
        out[:, 0] = state["next_tok"]
        out_len = torch.ones(B, dtype=torch.long, device=dev)
        eos_t = torch.tensor(eos or [-1], device=dev)
        finished = torch.isin(state["next_tok"], eos_t) | (out_len >= max_new_tokens)
        finished[B_user:] = True  # bucket padding rows
        hist = []
        step = self._step_fn(state, sp, speculative) if ctrl is None else None
        left = done = 0  # auto mode: steps left in / run of the current stretch (a cycle, or plain steps up to a probe)

        def observe(steps):
            # the head's catch-up after plain steps counts as the cycle's: switching to speculation pays it, and
            # leaving it out made marginal speculation look cheaper than it is (stories260k: 0.92x -> 0.97-1.0x plain
            # at temperature 0)
            wall_ms = 1e3 * (time.perf_counter() - t_step) if dev.type == "cpu" else None
            n_tok = int(torch.stack(hist[-steps:])[:, :B_user].sum())
            ctrl.observe(choice, n_tok, wall_ms, self._observations if choice is not None else (), steps=steps)

        while not bool(finished.all()):
            state["done"].copy_(finished)  # finished rows stop advancing and write only their own dead slots
            if ctrl is None:
                emitted, n_emit, updates = step(state, sp)
                self._commit(state, sp, updates)
            else:
                if left == 0:
                    t_step = time.perf_counter()
                    choice = ctrl.next_tree()
                    left = 1 if choice is not None else ctrl.plain_steps_ahead()
                emitted, n_emit = self._auto_step(state, sp, choice, pending)
            j = torch.arange(emitted.shape[1], device=dev)
            valid = (j[None] < n_emit[:, None]) & ~finished[:, None]
            pos = torch.where(valid, out_len[:, None] + j, out.shape[1] - 1)
            out.scatter_(1, pos, torch.where(valid, emitted, out.gather(1, pos)))
            hit_eos = (torch.isin(emitted, eos_t) & valid).any(1)
            gained = torch.where(finished, 0, n_emit)
            hist.append(gained)
            out_len = out_len + gained
            finished = finished | hit_eos | (out_len >= max_new_tokens)
            if ctrl is not None:
                left, done = left - 1, done + 1
                if left == 0:
                    observe(done)
                    done = 0
        if ctrl is not None and done:  # a stretch the end of the generation cut short
            observe(done)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        res = self._result(ids[:B_user], out, out_len, hist, max_new_tokens, eos, wall, t_prefill, speculative)
        if ctrl is not None:
            res.tree = ctrl.summary()
        elif speculative:
            res.tree = {"mode": "fixed", "steps": {tree_key(tree): len(hist)}, "plain_fraction": 0.0}
        return res

    def _auto_step(self, state: dict, sp: _Sampling, choice, pending: list):
        """One step of ``tree="auto"``: a plain step (its feature kept for the head) or a cycle with ``choice``.

        Plain steps leave the head behind; before the next cycle it reads the pairs ``(f_i, t_{i+1})`` of those
        steps in one pass, as in the prefill, so its cache and prediction are what a cycle expects."""
        if choice is None:
            emitted, n_emit, updates, feat = self._plain_step(state, sp, with_features=True)
            pending.append((feat[:, None], updates["next_tok"][:, None]))
            self._commit(state, sp, updates)
            return emitted, n_emit
        if pending:  # the catch-up is timed as part of this cycle (see generate)
            self._resync_head(state, pending)
            pending.clear()
        emitted, n_emit, updates = self._cycle(state, sp, choice)
        parents, acc = self._last_tree
        self._observations = path_observations(parents, acc.accept_path, acc.accept_len, state["L"].shape[0])
        self._commit(state, sp, updates)
        return emitted, n_emit

    def _resync_head(self, state: dict, pending: list) -> None:
        tgt, L, head = self.target, state["L"], self.head
        states = torch.cat([f for f, _ in pending], 1)  # [B, m, what the head reads]
        toks = torch.cat([t for _, t in pending], 1)
        B, m, dev = L.shape[0], states.shape[1], L.device
        start = (L - m).clamp(min=0)
        pos = start[:, None] + torch.arange(m, device=dev)
        d_out = head(head.first_input(states), toks, tgt, pos, state["d_cache"], start, start, causal_mask(B, m, dev))
        d_last = d_out[:, -1]
        state["d_hidden"].copy_(d_last)
        state["d_logits"].copy_(head.draft_logits(d_last, tgt))

    def _step_fn(self, state: dict, sp: _Sampling, speculative: bool):
        """The eager step, or a CUDA graph of it captured once per (batch bucket, mode) and replayed after."""
        fn = self._cycle if speculative else self._plain_step
        if not self._use_graphs(state["L"].device):
            return fn
        # a graph reads the pool's caches at fixed addresses: one that grew since the capture means recapture
        key = (state["L"].shape[0], speculative, id(self.tree), self._pool.generation, self._sampled_drafts_now)
        if key not in self._graphs:
            self._graphs = {k: g for k, g in self._graphs.items() if k[3] == self._pool.generation}
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            self._graphs[key] = _CapturedStep(fn, state, sp, self._graph_pool)
        return self._graphs[key]

    def _use_graphs(self, device: torch.device) -> bool:
        if not self._graphs_possible(device):
            return False
        ready, why = self._graphs_ready()  # the backend may have been changed since construction
        if not ready:
            raise GraphsUnavailable(f"{why} (pass cuda_graphs=False to run eagerly)")
        return True

    # ----------------------------------------------------------------------------------------------------------
    def _prefill(self, ids: list[list[int]], sp: _Sampling, speculative: bool, defer_head: list | None = None) -> dict:
        """Target prefill and first token; with ``speculative`` also the head's pass over the prompt, or, when
        ``defer_head`` is a list (equal-length prompts only), the head's inputs appended to it for later."""
        tgt, dev = self.target, self.target.embed_tokens.weight.device
        B, P = len(ids), max(len(p) for p in ids)
        n = torch.tensor([len(p) for p in ids], device=dev)
        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = torch.tensor(p, device=dev)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        pos = torch.arange(P, device=dev).expand(B, P)
        mask = causal_mask(B, P, dev)
        cache = self._pool.cache("cache", B)
        head = self.head if speculative else None
        feats, states = target_states(tgt, tokens, pos, cache, zero, zero, mask, head)
        last = feats.gather(1, (n - 1)[:, None, None].expand(B, 1, feats.shape[-1]))[:, 0]
        first = self.ops.sample_tokens(tgt.logits(last), sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        sp.offset += 1
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        state = {"cache": cache, "L": n.clone(), "next_tok": first, "done": done}
        if self._pool.static:  # graphs read fixed addresses: copy into this bucket's buffers
            fixed = self._buffer(
                ("state", B, speculative), lambda: {"L": n.clone(), "next_tok": first.clone(), "done": done.clone()}
            )
            fixed["L"].copy_(n)
            fixed["next_tok"].copy_(first)
            fixed["done"].zero_()
            state.update(fixed)
        if speculative:
            # head input at position i: (f_i, t_{i+1}); the last pair uses the token just sampled
            shifted = torch.cat([tokens[:, 1:], torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)
            shifted.scatter_(1, (n - 1)[:, None], first[:, None])
            d_cache = self._pool.cache("d_cache", B)
            if defer_head is not None:
                defer_head.append((states, shifted))
                h0 = feats.new_zeros(B, head.cfg.hidden_size)
                state.update(d_cache=d_cache, d_hidden=h0, d_logits=head.draft_logits(h0, tgt))
                return state
            d_out = head(head.first_input(states), shifted, tgt, pos, d_cache, zero, zero, mask)
            d_last = d_out.gather(1, (n - 1)[:, None, None].expand(B, 1, d_out.shape[-1]))[:, 0]
            d_logits = head.draft_logits(d_last, tgt)
            if self._pool.static:
                fixed = self._buffer(("draft", B), lambda: {"d_hidden": d_last.clone(), "d_logits": d_logits.clone()})
                fixed["d_hidden"].copy_(d_last)
                fixed["d_logits"].copy_(d_logits)
                d_last, d_logits = fixed["d_hidden"], fixed["d_logits"]
            state.update(d_cache=d_cache, d_hidden=d_last, d_logits=d_logits)
        return state

    def _plain_step(self, state: dict, sp: _Sampling, with_features: bool = False):
        """One plain decoding step. Like :meth:`_cycle` it only reads ``state``; :meth:`_commit` applies it."""
        tgt, L = self.target, _live_len(state)
        B = L.shape[0]
        ones = torch.ones(B, 1, 1, dtype=torch.bool, device=L.device)
        head = self.head if with_features else None  # auto mode keeps what the head will read later
        feats, states = target_states(tgt, state["next_tok"][:, None], L[:, None], state["cache"], L, L, ones, head)
        nxt = self.ops.sample_tokens(tgt.logits(feats[:, 0]), sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        n_emit = torch.ones_like(L)
        updates = {"L": _advance(state, n_emit), "next_tok": nxt, "offset": sp.offset + 1}
        if with_features:
            return nxt[:, None], n_emit, updates, states[:, 0]
        return nxt[:, None], n_emit, updates

    def _draft_step(self, state: dict):
        head, tgt, L = self.head, self.target, state["L"]

        def step(h_in, tokens, positions, write_pos, mask):
            return head.step(h_in, tokens, tgt, positions, state["d_cache"], L, write_pos, mask)

        return step

    def _cycle(self, state: dict, sp: _Sampling, tree=None):
        """One draft -> verify -> accept cycle: the emitted tokens ``[B, W]``, their count and the state updates.

        Only cache slots past the committed length are written (tree K/V, compaction, the head's re-read of the
        accepted path), and ``state``/``sp`` are read, not assigned: running it again before :meth:`_commit`
        gives the same result, which CUDA-graph warm-up and capture rely on."""
        tgt, ops, tree = self.target, self.ops, tree or self.tree
        L, root = _live_len(state), state["next_tok"]
        B, dev = L.shape[0], L.device
        head = self.head
        sampled = self._sampled_drafts_now and fit_kind(tree) == "chain"
        if sampled:  # a chain of drafts sampled from the draft's distribution (speculative sampling)
            V = tgt.cfg.vocab_size

            def sampler(logits, node):
                return ops.sample_draft(logits, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset, node,
                                        token_map=head.token_map, vocab_size=V)

            tokens, parents, q = tree.draft_sampled(self._draft_step(state), state["d_hidden"], state["d_logits"],
                                                    root, L, sampler)
        else:
            tokens, parents = tree.draft(
                self._draft_step(state), state["d_hidden"], state["d_logits"], root, L, ops, token_map=head.token_map
            )
        bufs = ops.build_tree_buffers(parents, tree.max_depth)
        feats, states = target_states(tgt, tokens, L[:, None] + bufs.depth, state["cache"], L, L, bufs.mask, head)
        if sampled:
            acc = ops.accept_chain(tgt.logits(feats), tokens, q, sp.temperature, sp.top_p, sp.top_k, sp.seed,
                                   sp.offset)
        else:
            acc = ops.accept_tree(tgt.logits(feats), tokens, parents, sp.temperature, sp.top_p, sp.top_k, sp.seed,
                                  sp.offset)
        ops.kv_compact(state["cache"], L, acc.accept_path, acc.accept_len)
        self._last_tree = (parents, acc)  # for tree="auto"'s acceptance statistics (eager steps only)
        # The accepted path (root first) and the token after it; the head re-reads them with true features.
        W = tree.max_depth + 1
        j = torch.arange(W, device=dev)
        path = acc.accept_path[:, :W].clamp(min=0)
        path_tok = tokens.gather(1, path)
        shifted = torch.cat([path_tok[:, 1:], torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)
        emitted = torch.where(j[None] == acc.accept_len[:, None], acc.next_token[:, None], shifted)
        path_states = states.gather(1, path[..., None].expand(B, W, states.shape[-1]))
        d_in = head.first_input(path_states)
        d_out = head(d_in, emitted, tgt, L[:, None] + j, state["d_cache"], L, L, causal_mask(B, W, dev))
        d_last = d_out.gather(1, acc.accept_len[:, None, None].expand(B, 1, d_out.shape[-1]))[:, 0]
        n_emit = acc.accept_len + 1
        updates = {"L": _advance(state, n_emit), "next_tok": acc.next_token, "d_hidden": d_last,
                   "d_logits": head.draft_logits(d_last, tgt),
                   "offset": sp.offset + 1}
        return emitted, n_emit, updates

    @staticmethod
    def _commit(state: dict, sp: _Sampling, updates: dict) -> None:
        """Apply a step's updates in place, so that captured graphs keep reading the same buffers."""
        for key, value in updates.items():
            (sp.offset if key == "offset" else state[key]).copy_(value)

    def _result(self, ids, out, out_len, hist, max_new, eos, wall, t_prefill, speculative) -> GenerationResult:
        out_l, len_l = out.tolist(), out_len.tolist()
        hist_l = torch.stack(hist, 1).tolist() if hist else [[] for _ in ids]
        tokens, accepts = [], []
        for b in range(len(ids)):
            seq = out_l[b][: min(len_l[b], max_new)]
            for i, t in enumerate(seq):
                if t in eos:
                    seq = seq[: i + 1]
                    break
            tokens.append(seq)
            accepts.append([n for n in hist_l[b] if n > 0])
        text = None
        if self.tokenizer is not None:
            text = [continuation_text(self.tokenizer, p, t) for p, t in zip(ids, tokens)]
        return GenerationResult(tokens, text, accepts, [len(p) for p in ids], wall, t_prefill, speculative)


def _resolve_graphs(request: bool | None, on_cuda: bool, ready: bool, why: str) -> bool:
    """Whether to capture graphs: ``request`` (None = automatic) on a CUDA model or not, with the backend and the
    native extension ``ready`` (else ``why`` not). An explicit request that cannot run raises; automatic says so
    once and runs eagerly; CPU never captures."""
    if not on_cuda:
        return False
    if ready:
        return request is not False
    if request:
        raise GraphsUnavailable(f"cuda_graphs=True cannot run: {why} (pass cuda_graphs=False to run eagerly)")
    if request is None:
        _warn_once(f"eagle_runtime: CUDA graphs off, running eagerly: {why}")
    return False


def _no_head_cache(B: int):
    raise ValueError("plain decoding only: this model has no draft head, so no draft cache")


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def _is_id(t) -> bool:
    """An integer token id (Python, numpy or 0-d tensor integers; not bool)."""
    if isinstance(t, bool):
        return False
    if isinstance(t, numbers.Integral):
        return True
    return isinstance(t, torch.Tensor) and t.ndim == 0 and not t.is_floating_point() and t.dtype != torch.bool


__all__ = ["EagleModel", "GenerationResult", "DynamicTree", "StaticTree", "BufferPool", "GraphsUnavailable"]
