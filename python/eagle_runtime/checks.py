"""The one check of sampling arguments and seeds, shared by the API, the CLI, the trainers and the benchmarks.

Each failure is one line naming the argument: a ``ValueError`` (which the command lines turn into exit status 2),
or a ``TypeError`` for a seed that is not an integer (the command lines parse theirs as integers).
"""

from __future__ import annotations

import math
import numbers

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_seed(seed, name: str = "seed", *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """``seed`` as an int in ``[lo, hi]`` (default: a signed 64-bit integer, what the device RNG state holds).
    ``None`` is refused, not taken as "unseeded": sampling is a counter-based hash of the seed (see
    docs/reproducibility.md), so every run has one, and the default 0 is as good as any.

    Callers that add offsets to the seed narrow ``hi`` by those offsets, so the sum cannot overflow."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(seed).__name__}")
    seed = int(seed)
    if not lo <= seed <= hi:
        raise ValueError(f"{name} {seed} does not fit in [{lo}, {hi}] (a signed 64-bit integer)")
    return seed


def check_settings(temperature: float, top_p: float, top_k: int, seed: int = 0) -> None:
    """Validate the sampling settings (transformers' meaning: temperature 0 is greedy, top_k 0 and top_p 1 disable
    those filters) where they enter device tensors: ``generate`` and the step-level ``Decoder.sampling`` (through
    :meth:`~eagle_runtime.state.Sampling.fill_`, which would otherwise truncate top_k 2.5 to 2). A bool is not a
    number here: ``top_k=True`` is a mistake, not top-1."""
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
                                             and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_p, bool) or not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= INT64_MAX:
        raise ValueError(f"top_k must be an integer in [0, {INT64_MAX}] (0 disables it), got {top_k!r}")
    check_seed(seed)


def check_max_new_tokens(max_new_tokens, name: str = "max_new_tokens") -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {max_new_tokens!r}")
    return int(max_new_tokens)


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int = 0) -> None:
    """Validate ``generate``'s sampling arguments: :func:`check_settings` and :func:`check_max_new_tokens`."""
    check_settings(temperature, top_p, top_k, seed)
    check_max_new_tokens(max_new_tokens)


__all__ = ["INT64_MAX", "INT64_MIN", "check_max_new_tokens", "check_sampling", "check_seed", "check_settings"]
