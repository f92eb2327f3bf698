"""Where the optional shared data (stories260k, its Mixtral copy, corpora, MT-bench, GSM8K, HumanEval) is read from.

One order for the tests, benchmarks, scripts and trainer defaults:

1. ``$EAGLE_SHARED_DATA`` when set;
2. ``shared/data`` beside the repository checkout (the team's machines have it; a user's clone does not);
3. the folder ``scripts/fetch_data.py`` fills: ``$XDG_CACHE_HOME/eagle_runtime/data`` or
   ``~/.cache/eagle_runtime/data``.

The first that exists wins; when none does, the last is returned, so messages name where fetched data would go.

    >>> from eagle_runtime.datadir import shared_data_dir
    >>> (shared_data_dir() / "bench" / "mt_bench.jsonl").name
    'mt_bench.jsonl'
"""

from __future__ import annotations

import os
from pathlib import Path

# python/eagle_runtime/datadir.py -> the checkout's root is three levels up (an editable install; a wheel has no
# checkout, and the sibling folder simply does not exist)
_CHECKOUT = Path(__file__).resolve().parents[2]


def fetched_data_dir() -> Path:
    """Where ``scripts/fetch_data.py`` writes by default (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "eagle_runtime" / "data"


def shared_data_dir() -> Path:
    """The data folder, by the order in the module docstring."""
    if os.environ.get("EAGLE_SHARED_DATA"):
        return Path(os.environ["EAGLE_SHARED_DATA"])
    sibling = _CHECKOUT.parent / "shared" / "data"
    return sibling if sibling.is_dir() else fetched_data_dir()
