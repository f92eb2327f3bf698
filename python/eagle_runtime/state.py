"""The decode state and what each step returns: typed containers of device tensors, no logic beyond views.

Shapes: ``B`` rows (a batch bucket, padding rows included), ``S`` cache positions, ``H`` the target's hidden
size, ``H_d`` the head's, ``V_d`` the head's draft vocabulary, ``W`` a step's emitted width (tree depth + 1, or 1
for a plain step), ``T`` tree nodes (root included). Integer tensors are int64, flags bool.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .checks import check_settings


@dataclass
class Sampling:
    """The sampling settings of a call, in device tensors (graphs read them; a call refills them in place)."""

    temperature: torch.Tensor  # [B] float32; < 1e-5 is greedy
    top_p: torch.Tensor  # [B] float32 in (0, 1]
    top_k: torch.Tensor  # [B] int64; 0 = off
    seed: torch.Tensor  # [] int64
    offset: torch.Tensor  # [] int64: steps taken; with seed, selects each step's random numbers

    @classmethod
    def empty(cls, batch: int, device) -> "Sampling":
        dev = torch.device(device)
        return cls(torch.empty(batch, device=dev), torch.empty(batch, device=dev),
                   torch.empty(batch, dtype=torch.long, device=dev), torch.empty((), dtype=torch.long, device=dev),
                   torch.empty((), dtype=torch.long, device=dev))

    def fill_(self, temperature: float, top_p: float, top_k: int, seed: int) -> "Sampling":
        """Set every row to these settings and the step offset to 0 (in place: fixed addresses for graphs).
        Checked first (:func:`~eagle_runtime.checks.check_settings`): ``int()`` and ``fill_`` would truncate
        top_k 2.5 to 2 and fail on 2**63 with an overflow from torch."""
        check_settings(temperature, top_p, top_k, seed)
        self.temperature.fill_(float(temperature))
        self.top_p.fill_(float(top_p))
        self.top_k.fill_(int(top_k))
        self.seed.fill_(int(seed))
        self.offset.zero_()
        return self


@dataclass
class DecodeState:
    """Everything a step reads. Steps never assign its fields; :meth:`Decoder.commit` copies a step's
    :class:`StepUpdate` into them in place, so captured graphs keep reading the same buffers."""

    cache: torch.Tensor  # [2 * layers, B, H_kv, S, D] target K/V; slots [0, L) committed
    L: torch.Tensor  # [B] committed cache length per row
    next_tok: torch.Tensor  # [B] the last emitted token, not yet in the cache (the next step's input / root)
    done: torch.Tensor  # [B] rows that finished (EOS, max_new_tokens) or pad the bucket: they run at length 0
    d_cache: torch.Tensor | None = None  # [2, B, H_kv_d, S, D_d] the head's K/V (None: plain decoding only)
    d_hidden: torch.Tensor | None = None  # [B, H_d] the head's output at the last committed position
    d_logits: torch.Tensor | None = None  # [B, V_d] its draft logits (the first draft level expands them)
    # blocks (states [B, m, what the head reads], next tokens [B, m]) of plain steps the head has not read yet;
    # :meth:`Decoder.resync_head` reads and clears them before the next cycle (host-side list, tree="auto")
    pending: list = field(default_factory=list)

    @property
    def batch(self) -> int:
        return self.L.shape[0]

    def live_len(self) -> torch.Tensor:
        """``[B]``: the length a step runs at: committed for live rows, 0 for finished and padding rows.

        A finished row is still computed (static shapes for batching and graphs) but its output is discarded;
        at length 0 it writes only slots ``[0, tree)`` of its own, dead, row, so no finished row runs past the
        cache that :meth:`EagleModel.cache_len_needed` reserves."""
        return torch.where(self.done, 0, self.L)

    def advanced(self, n_emit: torch.Tensor) -> torch.Tensor:
        """``[B]``: the committed length after a step: live rows advance by their emitted tokens."""
        return torch.where(self.done, self.L, self.L + n_emit)


@dataclass
class StepUpdate:
    """What a step changes in the state (and the sampling offset); applied by :meth:`Decoder.commit`."""

    L: torch.Tensor  # [B]
    next_tok: torch.Tensor  # [B]
    offset: torch.Tensor  # []
    d_hidden: torch.Tensor | None = None  # [B, H_d] (cycles only)
    d_logits: torch.Tensor | None = None  # [B, V_d] (cycles only)


@dataclass
class StepOutput:
    """A plain step's result: ``emitted[b, :n_emit[b]]`` are row ``b``'s new tokens."""

    emitted: torch.Tensor  # [B, W] (W = 1)
    n_emit: torch.Tensor  # [B]
    update: StepUpdate
    features: torch.Tensor | None = None  # [B, what the head reads]: kept for the head (``keep_features``)


@dataclass
class CycleOutput(StepOutput):
    """A draft -> verify -> accept cycle's result, with the tree it verified (tree="auto" learns from it)."""

    parents: torch.Tensor | None = None  # [B, T] parent node of each tree node (-1: the root)
    accept_path: torch.Tensor | None = None  # [B, >= W] accepted node ids from the root, -1 padded
    accept_len: torch.Tensor | None = None  # [B] accepted draft tokens (n_emit - 1)
