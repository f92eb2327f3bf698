"""The decode steps: prefill, a plain step, an EAGLE cycle, the head's catch-up, and commit.

One cycle (:meth:`Decoder.cycle`): draft a tree from the head's last prediction -> verify the whole tree in one
target pass with the tree mask -> accept (greedy, or exact speculative sampling) -> compact the target KV cache
to the accepted path -> run the head over the accepted path's true features (rewinding its cache to the
committed prefix). All per-step state lives in device tensors (:class:`~eagle_runtime.state.DecodeState`).

Steps only *read* the state and write cache slots past the committed length, and return what they produced;
:meth:`Decoder.commit` applies a step's :class:`~eagle_runtime.state.StepUpdate`. Running a step twice before
committing gives the same result, which CUDA-graph warm-up and capture, and the cost model's timing, rely on.
Every step runs under ``torch.inference_mode()`` (its buffers are inference tensors).

Example (greedy, one prompt of token ids)::

    dec = model.decoder
    sp = dec.sampling(1, temperature=0.0)
    state = dec.prefill([[1, 403, 29]], sp)
    out = dec.cycle(state, sp, DynamicTree(8, 7, 1))
    dec.commit(state, sp, out.update)
    out.emitted[0, : out.n_emit[0]]    # the tokens this cycle emitted
"""

from __future__ import annotations

import torch

from .drafter import Drafter, target_states
from .graphs import BufferPool
from .model import Transformer
from .state import CycleOutput, DecodeState, Sampling, StepOutput, StepUpdate
from .tree import fit_kind


def causal_mask(B: int, T: int, device) -> torch.Tensor:
    """``[B, T, T]`` bool: query ``i`` sees nodes ``0..i`` (a prompt, or an accepted path, as a chain)."""
    return torch.tril(torch.ones(T, T, dtype=torch.bool, device=device)).expand(B, T, T)


class Decoder:
    """The steps of decoding over a target, an optional draft head and an op table.

    Args:
        target: the lean target model.
        head: the draft head (any :class:`~eagle_runtime.drafter.Drafter`), or ``None``: plain steps only.
        ops: the op table every step runs on (:func:`eagle_kernels.get_ops`).
        pool: where caches and per-bucket buffers come from (static while graphs are captured).
    """

    def __init__(self, target: Transformer, head: Drafter | None, ops, pool: BufferPool):
        self.target, self.head, self.ops, self.pool = target, head, ops, pool

    @property
    def device(self) -> torch.device:
        return self.target.embed_tokens.weight.device

    @torch.inference_mode()
    def sampling(self, batch: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int = 0) -> Sampling:
        """The sampling buffers for ``batch`` rows (the pool's, when static), filled with these settings."""
        return self.pool.sampling(batch).fill_(temperature, top_p, top_k, seed)

    # ----------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: list[list[int]], sp: Sampling, speculative: bool = True,
                defer_head: bool = False) -> DecodeState:
        """Run the target over the prompts ``ids`` and sample each row's first token; with ``speculative`` the head
        also reads the prompt, or, with ``defer_head`` (equal-length prompts only), its inputs are left in
        :attr:`DecodeState.pending` for :meth:`resync_head` (tree="auto" starting with plain steps)."""
        tgt, dev = self.target, self.device
        B, P = len(ids), max(len(p) for p in ids)
        n = torch.tensor([len(p) for p in ids], device=dev)
        tokens = torch.zeros(B, P, dtype=torch.long, device=dev)
        for b, p in enumerate(ids):
            tokens[b, : len(p)] = torch.tensor(p, device=dev)
        zero = torch.zeros(B, dtype=torch.long, device=dev)
        pos = torch.arange(P, device=dev).expand(B, P)
        mask = causal_mask(B, P, dev)
        cache = self.pool.cache("cache", B)
        head = self.head if speculative else None
        feats, states = target_states(tgt, tokens, pos, cache, zero, zero, mask, head, self.ops)
        last = feats.gather(1, (n - 1)[:, None, None].expand(B, 1, feats.shape[-1]))[:, 0]
        first = self.ops.sample_tokens(tgt.logits(last), sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        sp.offset += 1
        # graphs read fixed addresses: the pool's buffers of this bucket, refilled (fresh ones when eager)
        fixed = self.pool.get(("state", B), lambda: (n.clone(), first.clone(), torch.zeros_like(n, dtype=torch.bool)))
        fixed[0].copy_(n)
        fixed[1].copy_(first)
        fixed[2].zero_()
        state = DecodeState(cache, *fixed)
        if not speculative:
            return state
        # head input at position i: (f_i, t_{i+1}); the last pair uses the token just sampled
        shifted = torch.cat([tokens[:, 1:], torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)
        shifted.scatter_(1, (n - 1)[:, None], first[:, None])
        state.d_cache = self.pool.cache("d_cache", B)
        if defer_head:
            state.pending.append((states, shifted))
            d_last = feats.new_zeros(B, head.cfg.hidden_size)
        else:
            d_out = head(head.first_input(states), shifted, tgt, pos, state.d_cache, zero, zero, mask, self.ops)
            d_last = d_out.gather(1, (n - 1)[:, None, None].expand(B, 1, d_out.shape[-1]))[:, 0]
        d_logits = head.draft_logits(d_last, tgt)
        fixed = self.pool.get(("draft", B), lambda: (d_last.clone(), d_logits.clone()))
        fixed[0].copy_(d_last)
        fixed[1].copy_(d_logits)
        state.d_hidden, state.d_logits = fixed
        return state

    @torch.inference_mode()
    def plain_step(self, state: DecodeState, sp: Sampling, keep_features: bool = False) -> StepOutput:
        """One plain decoding step. With ``keep_features`` the output carries what the head reads at this position
        (tree="auto" hands it to :meth:`resync_head` before the next cycle)."""
        tgt, L = self.target, state.live_len()
        B = L.shape[0]
        ones = torch.ones(B, 1, 1, dtype=torch.bool, device=L.device)
        head = self.head if keep_features else None
        feats, states = target_states(tgt, state.next_tok[:, None], L[:, None], state.cache, L, L, ones, head,
                                      self.ops)
        nxt = self.ops.sample_tokens(tgt.logits(feats[:, 0]), sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset)
        n_emit = torch.ones_like(L)
        update = StepUpdate(state.advanced(n_emit), nxt, sp.offset + 1)
        return StepOutput(nxt[:, None], n_emit, update, states[:, 0] if keep_features else None)

    @torch.inference_mode()
    def resync_head(self, state: DecodeState) -> None:
        """Let the head read the blocks in :attr:`DecodeState.pending` (the pairs ``(f_i, t_{i+1})`` of plain
        steps, in one pass as in the prefill), so its cache and prediction are what a cycle expects; clears them."""
        if not state.pending:
            return
        tgt, L, head = self.target, state.L, self.head
        states = torch.cat([f for f, _ in state.pending], 1)  # [B, m, what the head reads]
        toks = torch.cat([t for _, t in state.pending], 1)
        state.pending.clear()
        B, m, dev = L.shape[0], states.shape[1], L.device
        start = (L - m).clamp(min=0)
        pos = start[:, None] + torch.arange(m, device=dev)
        d_out = head(head.first_input(states), toks, tgt, pos, state.d_cache, start, start, causal_mask(B, m, dev),
                     self.ops)
        d_last = d_out[:, -1]
        state.d_hidden.copy_(d_last)
        state.d_logits.copy_(head.draft_logits(d_last, tgt))

    @torch.inference_mode()
    def cycle(self, state: DecodeState, sp: Sampling, tree, sampled_drafts: bool = False) -> CycleOutput:
        """One draft -> verify -> accept cycle over ``tree``.

        ``sampled_drafts`` (chains only, at temperature > 0): draw the chain's drafts from the draft's
        distribution and verify them by speculative sampling
        (:func:`eagle_kernels.reference.accept_chain`), which accepts about ``sum_x min(p, q)`` per draft where
        a deterministic draft gets ``p(draft)``. Ignored for trees and at temperature 0."""
        tgt, ops, head = self.target, self.ops, self.head
        L, root = state.live_len(), state.next_tok
        B, dev = L.shape[0], L.device
        sampled = sampled_drafts and fit_kind(tree) == "chain"

        # The head runs at the live length too: a finished row at its committed length would read and write past
        # the draft cache that cache_len_needed reserves (a sampled chain in a batch of 12 overran it by one).
        def step(h_in, tokens, positions, write_pos, mask):
            return head.step(h_in, tokens, tgt, positions, state.d_cache, L, write_pos, mask, ops)

        if sampled:
            V = tgt.cfg.vocab_size

            def sampler(logits, node):
                return ops.sample_draft(logits, sp.temperature, sp.top_p, sp.top_k, sp.seed, sp.offset, node,
                                        token_map=head.token_map, vocab_size=V)

            tokens, parents, q = tree.draft_sampled(step, state.d_hidden, state.d_logits, root, L, sampler)
        else:
            tokens, parents = tree.draft(step, state.d_hidden, state.d_logits, root, L, ops, token_map=head.token_map)
        bufs = ops.build_tree_buffers(parents, tree.max_depth)
        feats, states = target_states(tgt, tokens, L[:, None] + bufs.depth, state.cache, L, L, bufs.mask, head, ops)
        if sampled:
            acc = ops.accept_chain(tgt.logits(feats), tokens, q, sp.temperature, sp.top_p, sp.top_k, sp.seed,
                                   sp.offset)
        else:
            acc = ops.accept_tree(tgt.logits(feats), tokens, parents, sp.temperature, sp.top_p, sp.top_k, sp.seed,
                                  sp.offset)
        ops.kv_compact(state.cache, L, acc.accept_path, acc.accept_len)
        # The accepted path (root first) and the token after it; the head re-reads them with true features.
        W = tree.max_depth + 1
        j = torch.arange(W, device=dev)
        path = acc.accept_path[:, :W].clamp(min=0)
        path_tok = tokens.gather(1, path)
        shifted = torch.cat([path_tok[:, 1:], torch.zeros(B, 1, dtype=torch.long, device=dev)], dim=1)
        emitted = torch.where(j[None] == acc.accept_len[:, None], acc.next_token[:, None], shifted)
        path_states = states.gather(1, path[..., None].expand(B, W, states.shape[-1]))
        d_out = head(head.first_input(path_states), emitted, tgt, L[:, None] + j, state.d_cache, L, L,
                     causal_mask(B, W, dev), ops)
        d_last = d_out.gather(1, acc.accept_len[:, None, None].expand(B, 1, d_out.shape[-1]))[:, 0]
        n_emit = acc.accept_len + 1
        update = StepUpdate(state.advanced(n_emit), acc.next_token, sp.offset + 1, d_last,
                            head.draft_logits(d_last, tgt))
        return CycleOutput(emitted, n_emit, update, parents=parents, accept_path=acc.accept_path,
                           accept_len=acc.accept_len)

    @staticmethod
    @torch.inference_mode()
    def commit(state: DecodeState, sp: Sampling, update: StepUpdate) -> None:
        """Apply a step's update in place (captured graphs keep reading the same buffers)."""
        state.L.copy_(update.L)
        state.next_tok.copy_(update.next_tok)
        sp.offset.copy_(update.offset)
        if update.d_hidden is not None:
            state.d_hidden.copy_(update.d_hidden)
            state.d_logits.copy_(update.d_logits)


__all__ = ["Decoder", "causal_mask"]
