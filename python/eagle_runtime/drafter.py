"""The drafter interface: what the decode cycle asks of a draft head, whatever its kind.

The cycle (``generate.py``) and the trees (``tree.py``) call only these members, so EAGLE-1 and EAGLE-3 heads,
and later drafters (parallel drafting, MTP heads), plug in without head-specific branches:

- ``target_taps``: which target hidden states the head reads. ``None``: the target's final-norm features
  ``[B, T, H]`` (EAGLE-1). A tuple of layer ids: the un-normed hidden states at the *input* of those target
  layers (id ``num_layers``: the last layer's output before the final norm), concatenated
  ``[B, T, len(taps) * H]`` (EAGLE-3's low | mid | high).
- ``first_input(states)``: those states -> the head's hidden input ``[B, T, H_head]`` at true (verified)
  positions (EAGLE-1: the features themselves; EAGLE-3: ``fc`` over the concatenation).
- ``forward(hidden, tokens, target, positions, cache, prefix_len, write_pos, mask)``: one pass of the head over
  ``T`` nodes, position ``i`` reading ``(hidden_i, token_{i+1})``; writes its K/V into ``cache`` like
  :meth:`eagle_runtime.model.Transformer.forward`; returns the hidden state fed to the next draft step.
- ``draft_logits(hidden, target)``: logits ``[..., V_draft]`` over the head's draft vocabulary.
- ``token_map``: ``None`` (draft ids are target ids) or an int64 ``[V_draft]`` device tensor, draft id ->
  target id, handed to :func:`eagle_kernels.topk_expand` so no draft step touches the full vocabulary.
- ``new_cache(batch, max_len)``: a zeroed draft KV cache.
"""

from __future__ import annotations

import torch
from torch import nn


class Drafter(nn.Module):
    """Base of the draft heads. Subclasses set ``target_taps`` and implement the abstract members."""

    target_taps: tuple[int, ...] | None = None

    @property
    def token_map(self) -> torch.Tensor | None:
        return None

    def first_input(self, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def draft_logits(self, hidden: torch.Tensor, target) -> torch.Tensor:
        raise NotImplementedError

    def new_cache(self, batch: int, max_len: int | None = None) -> torch.Tensor:
        raise NotImplementedError

    def step(self, hidden, tokens, target, positions, cache, prefix_len, write_pos, mask):
        """One draft step over tree nodes: ``(hidden_out, draft_logits)``."""
        out = self(hidden, tokens, target, positions, cache, prefix_len, write_pos, mask)
        return out, self.draft_logits(out, target)


def target_states(target, tokens, positions, cache, prefix_len, write_pos, mask, drafter: Drafter | None):
    """Run the target and return ``(features, states)``: ``states`` what ``drafter`` reads (its taps, or the
    features themselves when it reads the final features or there is no drafter)."""
    taps = drafter.target_taps if drafter is not None else None
    if taps is None:
        feats = target(tokens, positions, cache, prefix_len, write_pos, mask)
        return feats, feats
    return target(tokens, positions, cache, prefix_len, write_pos, mask, taps=taps)
