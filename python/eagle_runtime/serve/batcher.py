"""Continuous batching over the :class:`~eagle_runtime.decoder.Decoder`: requests join a running batch between
steps and leave it when they finish, each row's output what it would be alone.

Rows of a batch are independent in the KV cache (each reads only its own slots up to its own length), so a
request is prefilled on its own (batch 1) and its cache rows, length, next token and draft state are copied into
a free row of the running batch; the next step decodes it with the others. A finished, cancelled or never-used
row runs at length 0 and its output is dropped (:meth:`DecodeState.live_len`), until a new request takes it.

Speculative and plain requests run in two batches (a step is a tree cycle or a plain step for every row); the
scheduler steps each non-empty one in turn. Greedy output is the request's output alone, token for token.
Sampled output follows the target's distribution; it is the seeded output of ``generate`` (same seed and tree)
when the request decodes alone in its batch (it takes row 0 with its seed and offset 0), not when it shares the
batch: the random streams are keyed by the batch's seed, step and row (see docs/serving.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..graphs import bucket
from ..state import DecodeState, Sampling
from ..stream import StreamEvent, TextStream


@dataclass
class Request:
    """One generation request: its prompt ids, settings, and where its events go.

    ``deliver(event)`` is called from the scheduler thread with each :class:`StreamEvent`, the last one with a
    ``finish_reason``; ``cancelled`` (set from any thread) frees the row at the next step boundary."""

    ids: list[int]
    max_new_tokens: int
    deliver: Callable[[StreamEvent], None]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    speculative: bool = True
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # decode to the budget (benchmarks: every request the same length)
    cancelled: bool = False
    # filled by the scheduler
    stream: TextStream | None = None
    steps: int = 0  # target passes this request was in (cycles, or plain steps)
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


class QueueFull(Exception):
    """More requests wait than ``max_queue`` allows (the server answers 429)."""


class RowBatch:
    """``rows`` decode rows over one decoder, all speculative (one fixed ``tree``) or all plain."""

    def __init__(self, decoder, rows: int, tree, speculative: bool):
        self.dec, self.rows, self.tree, self.speculative = decoder, rows, tree, speculative
        self.slots: list[Request | None] = [None] * rows
        self.state: DecodeState | None = None  # made on the first join (the draft state's shapes come from it)
        self.sp = Sampling.empty(rows, decoder.device).fill_(0.0, 1.0, 0, 0)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.slots)

    def free_slot(self) -> int | None:
        return next((i for i, r in enumerate(self.slots) if r is None), None)

    def _new_state(self, one: DecodeState) -> DecodeState:
        R, tgt, head = self.rows, self.dec.target, self.dec.head
        dev = self.dec.device
        zeros = torch.zeros(R, dtype=torch.long, device=dev)
        st = DecodeState(tgt.new_cache(R), zeros.clone(), zeros.clone(), torch.ones(R, dtype=torch.bool, device=dev))
        if self.speculative:
            st.d_cache = head.new_cache(R, tgt.max_len)
            st.d_hidden = one.d_hidden.new_zeros(R, *one.d_hidden.shape[1:])
            st.d_logits = one.d_logits.new_zeros(R, *one.d_logits.shape[1:])
        return st

    @torch.inference_mode()
    def join(self, req: Request) -> int:
        """Prefill ``req`` alone and copy it into a free row; returns its first token. A request that finds the
        batch empty takes row 0 and restarts the batch's random stream at its seed (as ``generate`` alone)."""
        alone = self.active == 0
        slot = self.free_slot()  # the lowest: 0 when alone
        sp1 = Sampling.empty(1, self.dec.device).fill_(req.temperature, req.top_p, req.top_k, req.seed)
        one = self.dec.prefill([req.ids], sp1, self.speculative)
        if self.state is None:
            self.state = self._new_state(one)
        st, n = self.state, len(req.ids)
        st.cache[:, slot, :, :n].copy_(one.cache[:, 0, :, :n])
        st.L[slot], st.next_tok[slot], st.done[slot] = n, one.next_tok[0], False
        if self.speculative:
            st.d_cache[:, slot, :, :n].copy_(one.d_cache[:, 0, :, :n])
            st.d_hidden[slot].copy_(one.d_hidden[0])
            st.d_logits[slot].copy_(one.d_logits[0])
        sp = self.sp
        sp.temperature[slot], sp.top_p[slot], sp.top_k[slot] = float(req.temperature), float(req.top_p), req.top_k
        if alone:
            sp.seed.fill_(req.seed)
            sp.offset.copy_(sp1.offset)
        self.slots[slot] = req
        return int(one.next_tok[0])

    @torch.inference_mode()
    def leave(self, slot: int) -> None:
        self.slots[slot] = None
        if self.state is not None:
            self.state.done[slot] = True

    @torch.inference_mode()
    def step(self) -> tuple[list[list[int]], list[int]]:
        """One step for every row: ``(tokens per row, drafted tokens per row)`` (finished rows' are dropped).

        Only the rows up to the last busy one run (rounded up to a batch bucket): a lone request in a batch of 8
        rows took 5.8 ms per plain step and 14.8 ms per cycle on the demo pair (2 CPU cores), 4.0 and 7.2 ms with
        its row alone. New requests take the lowest free row, so the busy rows stay packed at the front."""
        hi = max(i for i, r in enumerate(self.slots) if r is not None) + 1
        hi = min(self.rows, bucket(hi))
        full, sp_full = self.state, self.sp
        # ``done`` needs no refill: join clears a row's flag, leave sets it, every other row starts set
        st = DecodeState(full.cache[:, :hi], full.L[:hi], full.next_tok[:hi], full.done[:hi],
                         full.d_cache[:, :hi] if full.d_cache is not None else None,
                         full.d_hidden[:hi] if full.d_hidden is not None else None,
                         full.d_logits[:hi] if full.d_logits is not None else None)
        sp = Sampling(sp_full.temperature[:hi], sp_full.top_p[:hi], sp_full.top_k[:hi], sp_full.seed, sp_full.offset)
        dec = self.dec
        o = dec.cycle(st, sp, self.tree) if self.speculative else dec.plain_step(st, sp)
        dec.commit(st, sp, o.update)
        em, n = o.emitted.tolist(), o.n_emit.tolist()
        drafted = [k - 1 for k in n] if self.speculative else [0] * len(n)
        pad = [[]] * (self.rows - hi)
        return [row[:k] for row, k in zip(em, n)] + pad, drafted + [0] * (self.rows - hi)


class Scheduler:
    """Admits requests into the running batches between steps and streams each row's events (a thread).

    Args:
        model: an :class:`~eagle_runtime.generate.EagleModel` (its decoder, tokenizer, lock and EOS ids).
        tree: the fixed draft tree every speculative row uses.
        max_batch: rows decoding at once (speculative and plain together).
        max_queue: requests that may wait for a row; :meth:`submit` raises :class:`QueueFull` beyond it.
        on_step: called after each step with ``(speculative, [(tokens emitted, drafts accepted) per busy row])``
            (the server's metrics).
    """

    def __init__(self, model, tree, max_batch: int = 8, max_queue: int = 64, on_step: Callable | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.max_batch, self.max_queue, self.on_step = model, max_batch, max_queue, on_step
        dec = model.decoder
        self.batches = {True: RowBatch(dec, max_batch, tree, True)} if model.head is not None else {}
        self.batches[False] = RowBatch(dec, max_batch, tree, False)
        self.waiting: deque[Request] = deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="eagle-scheduler", daemon=True)
        self.error: BaseException | None = None
        self.peak_active = 0  # the most rows that decoded in one step (tests: requests did share a batch)

    def start(self) -> "Scheduler":
        """Run the decode loop in a thread of its own (tests, and servers embedded in another program)."""
        self._thread.start()
        return self

    def run(self) -> None:
        """Run the decode loop in the calling thread until :meth:`close`. The command-line server runs it on the
        main thread: torch's intra-op threads driven from a second thread halved the demo pair's speed on 2 cores
        (EAGLE 610 -> 297-316 tokens/s for one request; plain 320 -> 190-301), while uvicorn's event loop is
        fine in a thread."""
        self._run()

    def close(self, timeout: float | None = None) -> None:
        """Stop once the rows in flight and the queue are done (call from any thread)."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def active(self) -> int:
        return sum(b.active for b in self.batches.values())

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def submit(self, req: Request) -> None:
        """Queue ``req``; it joins a batch at the next step boundary with a free row."""
        if req.speculative and True not in self.batches:
            raise ValueError("speculative decoding needs a draft head (the server was started without --draft)")
        eos = [] if req.ignore_eos else self.model.target.cfg.eos_token_id
        req.stream = TextStream(self.model.tokenizer, req.ids, req.max_new_tokens, req.stop, eos)
        with self._cv:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue + self.max_batch - self.active:  # free rows take some now
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(req)
            self._cv.notify()

    # -------------------------------------------------------------------------------------------- the thread
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stop and not self.waiting and self.active == 0:
                        self._cv.wait(0.5)  # bounded: a signal handler on the main thread runs between waits
                    if self._stop and self.active == 0 and not self.waiting:
                        return
                self._admit()
                for batch in self.batches.values():
                    if batch.active:
                        self._step(batch)
        except BaseException as e:  # a fault in a step: fail every request rather than hang them
            self.error = e
            for batch in self.batches.values():
                for i, r in enumerate(batch.slots):
                    if r is not None:
                        r.deliver(r.stream.finish("error"))
                        batch.leave(i)
            while self.waiting:
                r = self.waiting.popleft()
                r.deliver(r.stream.finish("error"))
            raise

    def _admit(self) -> None:
        while True:
            with self._cv:
                while self.waiting and self.waiting[0].cancelled:
                    self.waiting.popleft()
                if not self.waiting or self.active >= self.max_batch:
                    return
                req = self.waiting[0]
                batch = self.batches[req.speculative]
                if batch.free_slot() is None:
                    return
                self.waiting.popleft()
            with self.model._lock:  # the decoder's buffers are shared with generate calls on this model
                first = batch.join(req)
            req.t_first = time.perf_counter()
            ev = req.stream.add([first], 0)
            req.deliver(ev)
            if req.stream.finished:
                batch.leave(batch.slots.index(req))

    def _step(self, batch: RowBatch) -> None:
        for i, r in enumerate(batch.slots):  # a client that went away frees its row before this step
            if r is not None and r.cancelled:
                batch.leave(i)
        if not batch.active:
            return
        self.peak_active = max(self.peak_active, self.active)
        with self.model._lock:
            blocks, drafted = batch.step()
        live = []
        for i, r in enumerate(batch.slots):
            if r is None:
                continue
            r.steps += 1
            ev = r.stream.add(blocks[i], drafted[i])
            live.append((len(ev.tokens), drafted[i]))
            r.deliver(ev)
            if r.stream.finished:
                batch.leave(i)
        if self.on_step is not None:
            self.on_step(batch.speculative, live)


__all__ = ["QueueFull", "Request", "RowBatch", "Scheduler"]
