"""``EagleModel``: loading, prompt encoding and ``generate`` over the :class:`~eagle_runtime.decoder.Decoder`.

``generate`` runs one of two loops over the decoder's steps: a fixed tree (one captured graph per batch bucket
and step kind on CUDA), or ``tree="auto"`` (:mod:`eagle_runtime.adaptive` picks a tree or plain decoding per
stretch of steps; on CUDA each pick replays its own graph, captured the first time it is picked). The only host
read per step is whether every sequence finished.
"""

from __future__ import annotations

import numbers
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from eagle_kernels import get_ops
from eagle_kernels.reference import GREEDY_TEMPERATURE

from .adaptive import AutoTree, make_tree, path_observations
from .checks import check_max_new_tokens, check_sampling
from .decoder import Decoder, causal_mask
from .draft import load_head
from .drafter import Drafter
from .graphs import BufferPool, GraphsUnavailable, StepGraphs, bucket, graphs_ready, resolve_graphs
from .loading import check_dtype, check_model_path, load_target
from .model import Transformer
from .state import DecodeState, Sampling
from .stream import StreamEvent, TextStream
from .text import check_utf8_prompts, continuation_text, load_tokenizer
from .tree import DynamicTree, StaticTree, fit_kind, shape_key, step_room, tree_key


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
    finish_reasons: list[str] | None = None  # per sequence: "stop" (EOS or a stop string) or "length"

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


class _Output:
    """The emitted tokens of one ``generate`` call, gathered on device: ``out [B, max_new + W + 1]`` (the last
    column a sink for invalid writes), ``out_len [B]``, ``finished [B]`` and the per-step gains ``hist``."""

    def __init__(self, state: DecodeState, B_user: int, max_new: int, width: int, eos: list[int]):
        B, dev = state.batch, state.L.device
        self.max_new, self.B_user = max_new, B_user
        self.out = torch.zeros(B, max_new + width + 1, dtype=torch.long, device=dev)
        self.out[:, 0] = state.next_tok
        self.out_len = torch.ones(B, dtype=torch.long, device=dev)
        self.eos = torch.tensor(eos or [-1], device=dev)
        self.finished = torch.isin(state.next_tok, self.eos) | (self.out_len >= max_new)
        self.finished[B_user:] = True  # bucket padding rows
        self.hist: list[torch.Tensor] = []

    def all_done(self) -> bool:
        return bool(self.finished.all())

    def add(self, emitted: torch.Tensor, n_emit: torch.Tensor) -> None:
        out, dev = self.out, emitted.device
        j = torch.arange(emitted.shape[1], device=dev)
        valid = (j[None] < n_emit[:, None]) & ~self.finished[:, None]
        pos = torch.where(valid, self.out_len[:, None] + j, out.shape[1] - 1)
        out.scatter_(1, pos, torch.where(valid, emitted, out.gather(1, pos)))
        hit_eos = (torch.isin(emitted, self.eos) & valid).any(1)
        gained = torch.where(self.finished, 0, n_emit)
        self.hist.append(gained)
        self.out_len = self.out_len + gained
        self.finished = self.finished | hit_eos | (self.out_len >= self.max_new)

    def tokens_of_last(self, steps: int) -> int:
        """Tokens the user's rows gained over the last ``steps`` steps (a host read)."""
        return int(torch.stack(self.hist[-steps:])[:, : self.B_user].sum())


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
        cuda_graphs: on CUDA, capture each decode step as one CUDA graph per batch bucket (1..8, then multiples
            of 8) and step (plain, or a cycle of one tree shape; under ``tree="auto"`` one per tree it picks) and
            replay it; needs the ``triton`` backend and the native extension built with CUDA. ``None``
            (default): on when the target is on CUDA and both are present, else eager (said once); ``True`` on
            CUDA without them raises :class:`GraphsUnavailable`. Ignored on CPU.
        graph_capture: replaces CUDA-graph capture by ``capture(fn, args, pool) -> replayable`` on any device
            (the CPU tests' recording stand-in; see :class:`~eagle_runtime.graphs.StepGraphs`).

    With graphs on, every bucket shares one target KV cache and one draft KV cache sized for the largest bucket
    seen (see :class:`~eagle_runtime.graphs.BufferPool`; :meth:`reserve` sizes them up front) and every capture
    one graph memory pool. Concurrent ``generate`` calls on one model are serialized by a lock (they share
    those buffers); use one model per thread to decode in parallel.

    Reproducibility: a seed reproduces sampled output for a fixed tree on any machine, batch layout and
    tensor-parallel degree. Under ``tree="auto"`` the sequence of trees depends on measured time, so seeded
    sampled output can differ between machines or runs (greedy output never does).
    """

    def __init__(
        self, target: Transformer, head: Drafter | None, tokenizer=None, tree="auto", backend="auto",
        cuda_graphs: bool | None = None, graph_capture: Callable | None = None,
    ):
        self.target, self.head, self.tokenizer = target, head, tokenizer
        self.tree = make_tree(tree)
        dev = target.embed_tokens.weight.device
        self.pool = BufferPool(
            lambda B: target.new_cache(B),
            (lambda B: head.new_cache(B, target.max_len)) if head is not None else _no_head_cache,
            dev,
        )
        self.graphs = StepGraphs(self.pool, capture=graph_capture,
                                 new_pool=(lambda: "recorded-pool") if graph_capture is not None else None)
        self._graph_capture = graph_capture
        # At temperature > 0 a chain (top_k 1) draws its drafts from the draft's distribution and is verified by
        # speculative sampling (see Decoder.cycle). False: deterministic drafts everywhere.
        self.sampled_drafts = True
        self._lock = threading.Lock()
        self._graphs_request = cuda_graphs
        self.set_backend(backend)

    # ---------------------------------------------------------------------------------------------- configuration
    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps are captured as CUDA graphs (resolved from the constructor's argument)."""
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, value: bool | None) -> None:
        self._graphs_request = value
        on_cuda = self.target.embed_tokens.weight.device.type == "cuda"
        self._cuda_graphs = resolve_graphs(value, on_cuda, *graphs_ready(self.ops.name))
        captured = self._cuda_graphs or self._graph_capture is not None
        self.pool.static = captured  # static buffers exactly when graphs are captured
        self.graphs.enabled = captured
        self.graphs.clear()

    def set_backend(self, backend: str) -> None:
        """Switch the op table (``"auto"``, ``"cpu"``, ``"torch"``, ``"triton"``); re-resolves ``cuda_graphs``."""
        ops = get_ops(backend, device=self.target.embed_tokens.weight.device)
        if getattr(self.target, "tp", None) is not None:  # tensor parallel: EAGLE_TP_DEBUG checks rank agreement
            ops = self.target.tp.wrap_ops(ops)
        self.ops = ops

    @property
    def ops(self):
        """The op table every step runs on; assign an :class:`eagle_kernels.Ops` to run on a custom one."""
        return self._ops

    @ops.setter
    def ops(self, ops) -> None:
        self._ops = ops
        self.decoder = Decoder(self.target, self.head, ops, self.pool)
        self.cuda_graphs = self._graphs_request

    def reserve(self, batch: int) -> None:
        """With graphs on, allocate the target and draft caches for ``batch`` sequences now, so that no later
        call of up to that many sequences reallocates them (and recaptures its graphs)."""
        if self.pool.static:
            self.pool.reserve(batch, ("cache", "d_cache") if self.head is not None else ("cache",))

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        draft: str | Path | None = None,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device = "cpu",
        tree="auto",
        backend: str = "auto",
        max_len: int | None = None,
        cuda_graphs: bool | None = None,
        tensor_parallel: int | None = None,
    ) -> "EagleModel":
        """Load a HF target (local directory or hub id) and an EAGLE-1 or EAGLE-3 head (format auto-detected).

        ``dtype=None`` is bfloat16 on CUDA and float32 elsewhere; a name (``"float32"``, ``"float16"``,
        ``"bfloat16"`` or ``"fp32"``, ``"fp16"``, ``"bf16"``) or a floating-point ``torch.dtype`` otherwise.
        ``cuda_graphs`` is the constructor's. Inside a torchrun process the target is sharded over the process
        group (``tensor_parallel``, when given, must equal its size; see :mod:`eagle_runtime.parallel`); the head
        is replicated on every rank."""
        from .parallel import load_target_parallel, resolve_tensor_parallel

        check_model_path(base, "base")
        if draft is not None:
            check_model_path(draft, "draft")
        dev = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
        dtype = check_dtype(dtype)
        if resolve_tensor_parallel(tensor_parallel) > 1:
            target = load_target_parallel(base, dtype=dtype, device=dev, max_len=max_len,
                                          tensor_parallel=tensor_parallel)
        else:
            target = load_target(base, dtype=dtype, device=dev, max_len=max_len)
        head = load_head(draft, target) if draft is not None else None
        return cls(target, head, load_tokenizer(base), tree=tree, backend=backend, cuda_graphs=cuda_graphs)

    # ---------------------------------------------------------------------------------------------------- prompts
    def encode(self, prompts) -> list[list[int]]:
        """Token ids per prompt. A prompt is a string or a sequence of integer ids (list, tuple, 1-D numpy array
        or tensor); a batch is a list/tuple of prompts or a 2-D array."""
        if hasattr(prompts, "tolist") and not isinstance(prompts, str):  # numpy arrays and tensors
            prompts = prompts.tolist()
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and _is_id(prompts[0])):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of either")
        check_utf8_prompts(prompts)
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
        check_max_new_tokens(max_new_tokens)
        ids = self.encode(prompts)
        return max(len(p) for p in ids) + max_new_tokens + step_room(self.tree, speculative) + 1

    # ------------------------------------------------------------------------------------------------- generation
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
        stop: str | list[str] | None = None,
        streamer=None,
    ) -> GenerationResult:
        """Generate from one prompt or a batch (text or token ids). ``speculative=False`` is plain decoding
        in the same runtime. Temperature 0 is greedy; ``seed`` makes sampled output reproducible for a fixed
        tree (under ``tree="auto"`` the trees chosen depend on measured time, see the class docstring).

        ``stop``: strings that end an output before them (cut exactly, see :mod:`eagle_runtime.stream`);
        ``streamer``: an object with transformers' streamer protocol (``put(token_ids)``, ``end()``:
        ``TextStreamer``, ``TextIteratorStreamer``), given the prompt first and then each step's new tokens
        (one prompt only, as in transformers). Either makes each step read its tokens on the host."""
        run = self._run(prompts, max_new_tokens, temperature, top_p, top_k, seed, speculative, stop_on_eos, stop,
                        watch=stop is not None or streamer is not None)
        if streamer is not None and len(run.ids) != 1:
            raise ValueError("a streamer takes one prompt (as transformers' streamers do)")
        if streamer is not None:
            streamer.put(torch.tensor([run.ids[0]]))
        while True:
            try:
                events = next(run.steps)
            except StopIteration as done:
                if streamer is not None:
                    streamer.end()
                return done.value
            if streamer is not None and events[0].tokens:
                streamer.put(torch.tensor(events[0].tokens))

    def stream(
        self,
        prompt,
        max_new_tokens: int = 128,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        speculative: bool = True,
        stop_on_eos: bool = True,
        stop: str | list[str] | None = None,
    ) -> Iterator[StreamEvent]:
        """Generate from one prompt, yielding a :class:`~eagle_runtime.stream.StreamEvent` per decode step: the
        text it adds, its token ids and how many came from the draft; the last event has ``finish_reason``
        (``"stop"`` or ``"length"``). The tokens and text are :meth:`generate`'s for the same arguments.

        Arguments are checked here, before the first event. The generator holds the model's lock until it is
        exhausted or closed (``close()``, or leaving a ``with contextlib.closing(...)`` block).

        Example::

            for ev in model.stream("Once upon a time", 48, stop=["."]):
                print(ev.text, end="", flush=True)
        """
        run = self._run(prompt, max_new_tokens, temperature, top_p, top_k, seed, speculative, stop_on_eos, stop,
                        watch=True)
        if len(run.ids) != 1:
            raise ValueError("stream takes one prompt; use generate for a batch")
        return self._stream_events(run)

    @staticmethod
    def _stream_events(run) -> Iterator[StreamEvent]:
        for events in run.steps:
            yield events[0]

    def _run(self, prompts, max_new_tokens, temperature, top_p, top_k, seed, speculative, stop_on_eos, stop,
             watch: bool) -> "_Run":
        """Check the arguments now; the decoding itself is ``_Run.steps``, a generator that yields a list of
        :class:`StreamEvent` (one per prompt) after each step when ``watch``, and returns the result."""
        check_sampling(temperature, top_p, top_k, max_new_tokens, seed)
        if speculative and self.head is None:
            raise ValueError("speculative decoding needs a draft head (load one with draft=...)")
        ids = self.encode(prompts)
        B_user = len(ids)
        eos = self.target.cfg.eos_token_id if stop_on_eos else []
        streams = [TextStream(self.tokenizer, p, max_new_tokens, stop, eos) for p in ids] if watch else None
        if self.pool.static:  # pad to the batch bucket so one captured graph serves every batch size in it
            ids = ids + [ids[-1]] * (bucket(B_user) - B_user)
        need = self.cache_len_needed(ids, max_new_tokens, speculative)
        if need > self.target.max_len:
            raise ValueError(
                f"prompt ({max(len(p) for p in ids)} tokens) + max_new_tokens ({max_new_tokens}) + tree room "
                f"needs {need} cache positions, which exceeds the cache of {self.target.max_len}; shorten them or "
                f"load with max_len >= {need}"
            )
        steps = self._steps(ids, B_user, max_new_tokens, temperature, top_p, top_k, seed, speculative, eos,
                            streams)
        return _Run(ids[:B_user], steps)

    @torch.inference_mode()
    def _steps(self, ids, B_user, max_new, temperature, top_p, top_k, seed, speculative, eos, streams):
        with self._lock:
            sp = self.decoder.sampling(len(ids), temperature, top_p, top_k, seed)
            sampled = bool(self.sampled_drafts and temperature >= GREEDY_TEMPERATURE)
            if speculative and isinstance(self.tree, AutoTree):
                loop = self._loop_auto(ids, B_user, sp, max_new, eos, temperature, top_p, top_k, sampled)
            else:
                loop = self._loop_fixed(ids, B_user, sp, max_new, eos, speculative, sampled)
            while True:
                try:
                    out, o = next(loop)
                except StopIteration as done:
                    res, summary = done.value
                    break
                if streams is not None:
                    yield _feed(streams, out, o)
        res.tree = summary
        if streams is not None:  # the cut outputs: no token after an EOS or a stop string
            for b, ts in enumerate(streams):
                ts.finish("stop" if ts.tokens and ts.tokens[-1] in eos else "length")
                res.tokens[b] = ts.tokens
                if res.text is not None:
                    res.text[b] = ts.text
            res.finish_reasons = [ts.finish_reason for ts in streams]
        return res

    def _loop_fixed(self, ids, B_user, sp, max_new, eos, speculative, sampled):
        """Plain decoding, or EAGLE with the one tree ``self.tree``: the same step every time (one graph).
        Yields ``(output so far, step output)`` after each step; returns ``(result, tree summary)``."""
        dec, dev, tree = self.decoder, self.decoder.device, self.tree
        t0 = time.perf_counter()
        state = dec.prefill(ids, sp, speculative)
        t_prefill = _elapsed(t0, dev)
        out = _Output(state, B_user, max_new, tree.max_depth + 1 if speculative else 1, eos)
        yield out, None  # the prefill's first token
        if speculative:
            key = (state.batch, "cycle", shape_key(tree), sampled if fit_kind(tree) == "chain" else None)
            step = lambda: self.graphs.step(key, dec.cycle, state, sp, tree, sampled)  # noqa: E731
        else:
            step = lambda: self.graphs.step((state.batch, "plain", False), dec.plain_step, state, sp)  # noqa: E731
        while not out.all_done():
            state.done.copy_(out.finished)  # finished rows stop advancing and write only their own dead slots
            o = step()
            dec.commit(state, sp, o.update)
            out.add(o.emitted, o.n_emit)
            yield out, o
        wall = _elapsed(t0, dev)
        res = self._result(ids[:B_user], out, eos, wall, t_prefill, speculative)
        summary = {"mode": "fixed", "steps": {tree_key(tree): len(out.hist)}, "plain_fraction": 0.0} if speculative \
            else None
        return res, summary

    def _loop_auto(self, ids, B_user, sp, max_new, eos, temperature, top_p, top_k, sampled):
        """``tree="auto"``: stretches of plain steps or single cycles, each picked by the controller and timed
        as a whole (a host sync at each stretch's end, so the time is the device's on CUDA too). Yields and
        returns as :meth:`_loop_fixed`."""
        dec, dev = self.decoder, self.decoder.device
        B = len(ids)
        # the cost model is measured (once, cached) before the clock
        ctrl = self.tree.controller(self, B, temperature, top_p, top_k, prefix=max(len(p) for p in ids),
                                    sampled=sampled)
        t0 = time.perf_counter()
        # starting with plain steps on equal-length prompts, the head reads the prompt when first needed
        defer = ctrl.choice is None and len({len(p) for p in ids}) == 1
        state = dec.prefill(ids, sp, True, defer_head=defer)
        t_prefill = _elapsed(t0, dev)
        out = _Output(state, B_user, max_new, self.tree.max_depth + 1, eos)
        yield out, None
        while not out.all_done():
            t_stretch = time.perf_counter()
            choice = ctrl.next_tree()
            steps_left = 1 if choice is not None else ctrl.plain_steps_ahead()
            steps, observations = 0, ()
            while steps < steps_left and not out.all_done():
                state.done.copy_(out.finished)
                if choice is None:
                    o = self.graphs.step((B, "plain", True), dec.plain_step, state, sp, True)
                    # graph outputs are overwritten by the next replay: keep copies for the head's catch-up
                    state.pending.append((o.features[:, None].clone(), o.update.next_tok[:, None].clone()))
                else:
                    dec.resync_head(state)  # timed as part of this cycle: switching to speculation pays it
                    key = (B, "cycle", shape_key(choice), sampled if fit_kind(choice) == "chain" else None)
                    o = self.graphs.step(key, dec.cycle, state, sp, choice, sampled)
                    observations = path_observations(o.parents, o.accept_path, o.accept_len, B)
                dec.commit(state, sp, o.update)
                out.add(o.emitted, o.n_emit)
                steps += 1
                yield out, o
            # the head's catch-up after plain steps counts as the cycle's: leaving it out made marginal speculation
            # look cheaper than it is (stories260k: 0.92x -> 0.97-1.0x plain at temperature 0)
            wall_ms = 1e3 * (_elapsed(t_stretch, dev))
            ctrl.observe(choice, out.tokens_of_last(steps), wall_ms, observations, steps=steps)
        wall = _elapsed(t0, dev)
        res = self._result(ids[:B_user], out, eos, wall, t_prefill, True)
        return res, ctrl.summary()

    def _result(self, ids, out: _Output, eos, wall, t_prefill, speculative) -> GenerationResult:
        out_l, len_l = out.out.tolist(), out.out_len.tolist()
        hist_l = torch.stack(out.hist, 1).tolist() if out.hist else [[] for _ in ids]
        tokens, accepts, reasons = [], [], []
        for b in range(len(ids)):
            seq = out_l[b][: min(len_l[b], out.max_new)]
            for i, t in enumerate(seq):
                if t in eos:
                    seq = seq[: i + 1]
                    break
            tokens.append(seq)
            accepts.append([n for n in hist_l[b] if n > 0])
            reasons.append("stop" if seq and seq[-1] in eos else "length")
        text = None
        if self.tokenizer is not None:
            text = [continuation_text(self.tokenizer, p, t) for p, t in zip(ids, tokens)]
        return GenerationResult(tokens, text, accepts, [len(p) for p in ids], wall, t_prefill, speculative,
                                finish_reasons=reasons)


@dataclass
class _Run:
    """A checked generation: the prompts' ids and the generator of its steps (see :meth:`EagleModel._run`)."""

    ids: list[list[int]]
    steps: Iterator


def _feed(streams: list[TextStream], out: _Output, o) -> list[StreamEvent]:
    """Hand each output's new tokens to its :class:`TextStream` (``o=None``: the prefill's first token); a stream
    that ends there (EOS, a stop string, the budget) finishes its row, so no later step adds to it."""
    if o is None:
        first = out.out[: len(streams), 0].tolist()
        blocks, drafted = [[t] for t in first], [0] * len(streams)
    else:
        em, n = o.emitted[: len(streams)].tolist(), o.n_emit[: len(streams)].tolist()
        cycle = getattr(o, "accept_len", None) is not None
        blocks = [row[:k] for row, k in zip(em, n)]
        drafted = [k - 1 if cycle else 0 for k in n]
    events = []
    for b, ts in enumerate(streams):
        was_done = ts.finished
        ev = ts.add(blocks[b], drafted[b]) if not was_done else StreamEvent("", [], 0, [], ts.finish_reason)
        if ts.finished and not was_done:
            out.finished[b] = True
        events.append(ev)
    return events


def _elapsed(t0: float, dev: torch.device) -> float:
    """Seconds since ``t0``, after the device finished its queued work."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def _no_head_cache(B: int):
    raise ValueError("plain decoding only: this model has no draft head, so no draft cache")


def _is_id(t) -> bool:
    """An integer token id (Python, numpy or 0-d tensor integers; not bool)."""
    if isinstance(t, bool):
        return False
    if isinstance(t, numbers.Integral):
        return True
    return isinstance(t, torch.Tensor) and t.ndim == 0 and not t.is_floating_point() and t.dtype != torch.bool


__all__ = ["EagleModel", "GenerationResult", "StreamEvent", "DynamicTree", "StaticTree", "GraphsUnavailable", "Sampling",
           "causal_mask"]
