"""The one check of sampling arguments and seeds, shared by the API, the CLI, the trainers and the benchmarks.

Each failure is one ``ValueError`` line naming the argument, which the command lines turn into exit status 2.
"""

from __future__ import annotations

import math
import numbers

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_seed(seed, name: str = "seed", *, lo: int = INT64_MIN, hi: int = INT64_MAX) -> int:
    """``seed`` as an int in ``[lo, hi]`` (default: a signed 64-bit integer, what the device RNG state holds).

    Callers that add offsets to the seed narrow ``hi`` by those offsets, so the sum cannot overflow."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(seed).__name__}")
    seed = int(seed)
    if not lo <= seed <= hi:
        raise ValueError(f"{name} {seed} does not fit in [{lo}, {hi}] (a signed 64-bit integer)")
    return seed


def check_sampling(temperature: float, top_p: float, top_k: int, max_new_tokens: int, seed: int = 0) -> None:
    """Validate ``generate``'s sampling arguments (transformers' meaning: temperature 0 is greedy, top_k 0 and
    top_p 1 disable those filters)."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 0 <= top_k <= INT64_MAX:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens}")
    check_seed(seed)


__all__ = ["INT64_MAX", "INT64_MIN", "check_sampling", "check_seed"]
