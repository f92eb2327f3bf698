"""EAGLE speculative decoding and plain decoding over the lean models, batch first.

One cycle: draft a tree from the head's last prediction -> verify the whole tree in one target pass with the
tree mask -> accept (greedy or exact speculative sampling) -> compact the target KV cache to the accepted path
-> run the head over the accepted path's true features (rewinding its cache to the committed prefix).

All per-cycle state lives in device tensors; the only host read per cycle is whether every sequence finished.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eagle_kernels import get_ops

from .draft import EagleHead, load_head
from .loading import load_target
from .model import Transformer
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


@dataclass
class _Sampling:
    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    seed: torch.Tensor
    offset: torch.Tensor


def _check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def _native_cuda() -> bool:
    try:
        from eagle_kernels import _C
    except ImportError:
        return False
    return bool(getattr(_C, "with_cuda", False))


def _bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _CapturedStep:
    """A decode step captured as one CUDA graph over the fixed state buffers, replayed on every call."""

    def __init__(self, fn, state: dict, sp: _Sampling):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: Triton compilation, allocator; the step commits nothing
            for _ in range(2):
                fn(state, sp)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(state, sp)

    def __call__(self, state: dict, sp: _Sampling):
        self.graph.replay()
        return self.outputs


def causal_mask(B: int, T: int, device) -> torch.Tensor:
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device)).expand(B, T, T)


class EagleModel:
    """A target model, its EAGLE draft head, a tokenizer and a draft tree, ready to generate.

    Args:
        target: the lean target model.
        head: the draft head, or ``None`` for plain decoding only.
        tokenizer: a HF tokenizer (optional; without it prompts must be token ids and no text is returned).
        tree: ``"dynamic"``, ``"static"`` or a :class:`DynamicTree` / :class:`StaticTree`.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`eagle_kernels.get_ops`).
        cuda_graphs: on CUDA, capture each decode step (the whole draft + verify + accept cycle, or a plain
            step) as one CUDA graph per power-of-two batch bucket and replay it; needs the ``triton`` backend
            and the native extension built with CUDA. Ignored on CPU. Not yet validated on a GPU.
    """

    def __init__(
        self, target: Transformer, head: EagleHead | None, tokenizer=None, tree="dynamic", backend="auto",
        cuda_graphs: bool = False,
    ):
        self.target, self.head, self.tokenizer = target, head, tokenizer
        self.tree = make_tree(tree)
        self.set_backend(backend)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict = {}
        self._buffers: dict = {}

    @classmethod
    def from_pretrained(
        cls,
        base: str | Path,
        draft: str | Path | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        tree="dynamic",
        backend: str = "auto",
        max_len: int | None = None,
        tensor_parallel: int | None = None,
    ) -> "EagleModel":
        """Load a HF target (local directory or hub id) and an EAGLE-1 head in the published format.

        Inside a torchrun process the target is sharded over the process group (``tensor_parallel``, when
        given, must equal its size; see :mod:`eagle_runtime.parallel`); the head is replicated on every rank."""
        from .parallel import load_target_parallel, resolve_tensor_parallel

        if resolve_tensor_parallel(tensor_parallel) > 1:
            target = load_target_parallel(base, dtype=dtype, device=device, max_len=max_len,
                                          tensor_parallel=tensor_parallel)
        else:
            target = load_target(base, dtype=dtype, device=device, max_len=max_len)
        head = load_head(draft, target) if draft is not None else None
        return cls(target, head, _load_tokenizer(base), tree=tree, backend=backend)

    def _graphs_possible(self, device: torch.device) -> bool:
        return bool(self.cuda_graphs) and device.type == "cuda"

    def _buffer(self, key, make):
        """Per-bucket buffers kept across calls when graphs are on (fixed addresses); fresh ones otherwise."""
        if not self._graphs_possible(self.target.embed_tokens.weight.device):
            return make()
        if key not in self._buffers:
            self._buffers[key] = make()
        return self._buffers[key]

    def set_backend(self, backend: str) -> None:
        self.ops = get_ops(backend)
        if getattr(self.target, "tp", None) is not None:  # tensor parallel: EAGLE_TP_DEBUG checks rank agreement
            self.ops = self.target.tp.wrap_ops(self.ops)
        self.target.ops = self.ops

    # ----------------------------------------------------------------------------------------------------------
    def encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of token ids, or a non-empty list of either")
        out = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise ValueError("a text prompt needs a tokenizer; pass token ids or load one")
                ids = self.tokenizer(p)["input_ids"] if p else []
            else:
                ids = [int(t) for t in p]
            if not ids:
                raise ValueError("empty prompt: give at least one token")
            vocab = self.target.cfg.vocab_size
            if min(ids) < 0 or max(ids) >= vocab:
                raise ValueError(f"prompt token ids must lie in [0, {vocab})")
            out.append(ids)
        return out

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
        _check_sampling(temperature, top_p, top_k, max_new_tokens)
        if speculative and self.head is None:
            raise ValueError("speculative decoding needs a draft head (load one with draft=...)")
        ids = self.encode(prompts)
        B_user, dev = len(ids), self.target.embed_tokens.weight.device
        if self._graphs_possible(dev):
            # pad to a power-of-two bucket so one captured graph serves every batch size up to it
            ids = ids + [ids[-1]] * (_bucket(B_user) - B_user)
        B = len(ids)
        tree = self.tree
        extra = max(tree.num_nodes, tree.draft_slots()) if speculative else 1
        need = max(len(p) for p in ids) + max_new_tokens + extra + 1
        if need > self.target.max_len:
            raise ValueError(
                f"prompt ({max(len(p) for p in ids)} tokens) + max_new_tokens ({max_new_tokens}) + tree room ({extra}) "
                f"exceeds the cache of {self.target.max_len} positions; shorten them or load with a larger max_len"
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
        t0 = time.perf_counter()
        state = self._prefill(ids, sp, speculative)
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
        step = self._step_fn(state, sp, speculative)
        while not bool(finished.all()):
            emitted, n_emit, updates = step(state, sp)
            self._commit(state, sp, updates)
            j = torch.arange(emitted.shape[1], device=dev)
            valid = (j[None] < n_emit[:, None]) & ~finished[:, None]
            pos = torch.where(valid, out_len[:, None] + j, out.shape[1] - 1)
            out.scatter_(1, pos, torch.where(valid, emitted, out.gather(1, pos)))
            hit_eos = (torch.isin(emitted, eos_t) & valid).any(1)
            hist.append(torch.where(finished, 0, n_emit))
            out_len = out_len + torch.where(finished, 0, n_emit)
            finished = finished | hit_eos | (out_len >= max_new_tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        return self._result(ids[:B_user], out, out_len, hist, max_new_tokens, eos, wall, t_prefill, speculative)

    def _step_fn(self, state: dict, sp: _Sampling, speculative: bool):
        """The eager step, or a CUDA graph of it captured once per (batch bucket, mode) and replayed after."""
        fn = self._cycle if speculative else self._plain_step
        if not self._use_graphs(state["L"].device):
            return fn
        key = (state["L"].shape[0], speculative, id(self.tree))
        if key not in self._graphs:
            self._graphs[key] = _CapturedStep(fn, state, sp)
        return self._graphs[key]

    def _use_graphs(self, device: torch.device) -> bool:
        if not self._graphs_possible(device):
            return False
        if self.ops.name != "triton" or not _native_cuda():
            raise RuntimeError(
                "CUDA graphs need the sync-free ops: backend 'triton' and eagle_kernels._C built with CUDA "
                "(pass cuda_graphs=False to run eagerly)"
            )
        return True

    # ----------------------------------------------------------------------------------------------------------
    def _prefill(self, ids: list[list[int]], sp: _Sampling, speculative: bool) -> dict:
        tgt, dev = self.target, self.target.embed_tokens.weight.device
        B, P = len(ids), max(len(p) for p in ids)
        n = torch.tensor([len(p) for p in ids], device=dev)
        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = torch.tensor(p, device=dev)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        pos = torch.arange(P, device=dev).expand(B, P)
        mask = causal_mask(B, P, dev)
        cache = self._buffer(("cache", B), lambda: tgt.new_cache(B))
        feats = tgt(tokens, pos, cache, zero, zero, mask)
        last = feats.gather(1, (n - 1)[:, None, None].expand(B, 1, feats.shape[-1]))[:, 0]
        first = self.ops.sample_tokens(tgt.logits(last), sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        sp.offset += 1
        state = {"cache": cache, "L": n.clone(), "next_tok": first}
        if self._graphs_possible(dev):  # graphs read fixed addresses: copy into this bucket's buffers
            fixed = self._buffer(("state", B, speculative), lambda: {"L": n.clone(), "next_tok": first.clone()})
            fixed["L"].copy_(n)
            fixed["next_tok"].copy_(first)
            state.update(fixed)
        if speculative:
            # head input at position i: (f_i, t_{i+1}); the last pair uses the token just sampled
            shifted = torch.cat([tokens[:, 1:], torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)
            shifted.scatter_(1, (n - 1)[:, None], first[:, None])
            d_cache = self._buffer(("d_cache", B), lambda: self.head.new_cache(B, tgt.max_len))
            d_out = self.head(feats, shifted, tgt, pos, d_cache, zero, zero, mask)
            d_last = d_out.gather(1, (n - 1)[:, None, None].expand(B, 1, d_out.shape[-1]))[:, 0]
            d_logits = tgt.logits(d_last)
            if self._graphs_possible(dev):
                fixed = self._buffer(("draft", B), lambda: {"d_hidden": d_last.clone(), "d_logits": d_logits.clone()})
                fixed["d_hidden"].copy_(d_last)
                fixed["d_logits"].copy_(d_logits)
                d_last, d_logits = fixed["d_hidden"], fixed["d_logits"]
            state.update(d_cache=d_cache, d_hidden=d_last, d_logits=d_logits)
        return state

    def _plain_step(self, state: dict, sp: _Sampling):
        """One plain decoding step. Like :meth:`_cycle` it only reads ``state``; :meth:`_commit` applies it."""
        tgt, L = self.target, state["L"]
        B = L.shape[0]
        ones = torch.ones(B, 1, 1, dtype=torch.bool, device=L.device)
        feats = tgt(state["next_tok"][:, None], L[:, None], state["cache"], L, L, ones)
        nxt = self.ops.sample_tokens(tgt.logits(feats[:, 0]), sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        return nxt[:, None], torch.ones_like(L), {"L": L + 1, "next_tok": nxt, "offset": sp.offset + 1}

    def _draft_step(self, state: dict):
        head, tgt, L = self.head, self.target, state["L"]

        def step(h_in, tokens, positions, write_pos, mask):
            h_out = head(h_in, tokens, tgt, positions, state["d_cache"], L, write_pos, mask)
            return h_out, tgt.logits(h_out)

        return step

    def _cycle(self, state: dict, sp: _Sampling):
        """One draft -> verify -> accept cycle: the emitted tokens ``[B, W]``, their count and the state updates.

        Only cache slots past the committed length are written (tree K/V, compaction, the head's re-read of the
        accepted path), and ``state``/``sp`` are read, not assigned: running it again before :meth:`_commit`
        gives the same result, which CUDA-graph warm-up and capture rely on."""
        tgt, ops, tree = self.target, self.ops, self.tree
        L, root = state["L"], state["next_tok"]
        B, dev = L.shape[0], L.device
        tokens, parents = tree.draft(self._draft_step(state), state["d_hidden"], state["d_logits"], root, L, ops)
        bufs = ops.build_tree_buffers(parents, tree.max_depth)
        feats = tgt(tokens, L[:, None] + bufs.depth, state["cache"], L, L, bufs.mask)
        acc = ops.accept_tree(tgt.logits(feats), tokens, parents, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        ops.kv_compact(state["cache"], L, acc.accept_path, acc.accept_len)
        # The accepted path (root first) and the token after it; the head re-reads them with true features.
        W = tree.max_depth + 1
        j = torch.arange(W, device=dev)
        path = acc.accept_path[:, :W].clamp(min=0)
        path_tok = tokens.gather(1, path)
        shifted = torch.cat([path_tok[:, 1:], torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)
        emitted = torch.where(j[None] == acc.accept_len[:, None], acc.next_token[:, None], shifted)
        path_feats = feats.gather(1, path[..., None].expand(B, W, feats.shape[-1]))
        d_out = self.head(path_feats, emitted, tgt, L[:, None] + j, state["d_cache"], L, L, causal_mask(B, W, dev))
        d_last = d_out.gather(1, acc.accept_len[:, None, None].expand(B, 1, d_out.shape[-1]))[:, 0]
        n_emit = acc.accept_len + 1
        updates = {"L": L + n_emit, "next_tok": acc.next_token, "d_hidden": d_last, "d_logits": tgt.logits(d_last),
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
            text = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return GenerationResult(tokens, text, accepts, [len(p) for p in ids], wall, t_prefill, speculative)


def _load_tokenizer(base):
    from transformers import AutoTokenizer

    from .loading import resolve_dir

    try:
        return AutoTokenizer.from_pretrained(str(resolve_dir(base)))
    except (OSError, ValueError):
        return None


__all__ = ["EagleModel", "GenerationResult", "DynamicTree", "StaticTree"]
