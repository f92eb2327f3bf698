"""The drafter interface: what the decode cycle asks of a draft head, whatever its kind.

The cycle (``generate.py``) and the trees (``tree.py``) call only these members, so EAGLE-1 and EAGLE-3 heads,
and later drafters (parallel drafting, MTP heads), plug in without head-specific branches:

- ``target_taps``: which target hidden states the head reads. ``None``: the target's final-norm features
  ``[B, T, H]`` (EAGLE-1). A tuple of layer ids: the un-normed hidden states at the *input* of those target
  layers (id ``num_layers``: the last layer's output before the final norm), concatenated
  ``[B, T, len(taps) * H]`` (EAGLE-3's low | mid | high).
- ``first_input(states)``: those states -> the head's hidden input ``[B, T, H_head]`` at true (verified)
  positions (EAGLE-1: the features themselves; EAGLE-3: ``fc`` over the concatenation).
- ``forward(hidden, tokens, target, positions, cache, prefix_len, write_pos, mask, ops)``: one pass of the head over
  ``T`` nodes, position ``i`` reading ``(hidden_i, token_{i+1})``; writes its K/V into ``cache`` like
  :meth:`eagle_runtime.model.Transformer.forward`; returns the hidden state fed to the next draft step.
- ``draft_logits(hidden, target)``: logits ``[..., V_draft]`` over the head's draft vocabulary.
- ``token_map``: ``None`` (draft ids are target ids) or an int64 ``[V_draft]`` device tensor, draft id ->
  target id, handed to :func:`eagle_kernels.topk_expand` so no draft step touches the full vocabulary.
- ``new_cache(batch, max_len)``: a zeroed draft KV cache.

Below the interface, what both head kinds (``draft.py``, ``draft3.py``) and the trainers share, so that neither
head module imports the other: :func:`head_config`, :func:`load_checked`, :func:`init_head_`.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .loading import CheckpointError


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

    def step(self, hidden, tokens, target, positions, cache, prefix_len, write_pos, mask, ops):
        """One draft step over tree nodes on the op table ``ops``: ``(hidden_out, draft_logits)``."""
        out = self(hidden, tokens, target, positions, cache, prefix_len, write_pos, mask, ops)
        return out, self.draft_logits(out, target)


def target_states(target, tokens, positions, cache, prefix_len, write_pos, mask, drafter: Drafter | None, ops):
    """Run the target and return ``(features, states)``: ``states`` what ``drafter`` reads (its taps, or the
    features themselves when it reads the final features or there is no drafter)."""
    taps = drafter.target_taps if drafter is not None else None
    if taps is None:
        feats = target(tokens, positions, cache, prefix_len, write_pos, mask, ops)
        return feats, feats
    return target(tokens, positions, cache, prefix_len, write_pos, mask, ops, taps=taps)


# Shared by both head kinds (draft.py: EAGLE-1, draft3.py: EAGLE-3) and the trainers.
def head_config(target_cfg: ModelConfig, **overrides) -> ModelConfig:
    """A head config matching a target (same widths, heads, vocab, rope), dense MLP."""
    d = dict(target_cfg.raw, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=1)
    d.update(overrides)
    for key in ("num_local_experts", "num_experts_per_tok"):
        d.pop(key, None)
    return ModelConfig.from_dict(d)


def load_checked(head: nn.Module, state: dict, where: str) -> None:
    """Load ``state`` into ``head`` after checking it has exactly the head's keys and shapes (one-line errors)."""
    expected = head.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"draft head {where}: missing {missing}, unexpected {unexpected}")
    for k, v in expected.items():
        if v.shape != state[k].shape:
            raise CheckpointError(f"draft head {where}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}")
    head.load_state_dict(state)


def init_head_(head: nn.Module, seed: int = 0, std: float | None = None) -> nn.Module:
    """Initialise in place: norms 1, biases 0, weights N(0, std) (default std ``1 / sqrt(fan_in)``)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.endswith("norm.weight"):  # input/post_attention layernorms, EAGLE-3's hidden_norm and norm
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                s = std if std is not None else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=g).to(p.device) * s)
    return head
