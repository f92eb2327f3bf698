"""The embedded demo: a 16-layer TinyStories LLaMA target, its 1-layer EAGLE-1 head (``head/``) and its EAGLE-3
head (``head3/``, official EAGLE-3 layout, 256-token draft vocabulary).

Built by ``scripts/build_demo.py`` (settings and measured quality in ``BUILD.json``)::

    from eagle_runtime import EagleModel
    from eagle_runtime.demo import best_head, demo_paths, demo_tree

    target, head = demo_paths(best_head())     # or demo_paths("eagle1") / demo_paths("eagle3")
    model = EagleModel.from_pretrained(target, head, tree=demo_tree())
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent


HEAD_DIRS = {"eagle1": "head", "eagle3": "head3"}


def demo_paths(head: str = "eagle1") -> tuple[Path, Path]:
    """``(target_dir, head_dir)`` of the embedded pair: the HF target checkpoint and its ``"eagle1"`` head
    (published EAGLE-1 format) or ``"eagle3"`` head (official EAGLE-3 layout)."""
    if head not in HEAD_DIRS:
        raise ValueError(f"unknown demo head {head!r}; choose one of {sorted(HEAD_DIRS)}")
    target, head = DEMO_DIR / "target", DEMO_DIR / HEAD_DIRS[head]
    for d in (target, head):
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"the demo pair is missing {d / 'config.json'}; rebuild it with scripts/build_demo.py")
    return target, head


def build_info() -> dict:
    """The settings and measured quality recorded by ``scripts/build_demo.py`` (empty if not built)."""
    path = DEMO_DIR / "BUILD.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def best_head() -> str:
    """The faster demo head: the higher mean tokens/s over the trees ``scripts/build_demo.py`` measured both heads
    with (same prompts, same run). Tokens/s, not tau: the EAGLE-3 head drafts at a higher cost per step (``fc``
    over three taps, attention over twice the width), so on this small target a head can accept more and still
    run slower."""
    meas = (build_info().get("head3") or {}).get("measure") or {}
    both = [m for m in meas.values() if "eagle1" in m and "eagle3" in m]
    if not (DEMO_DIR / HEAD_DIRS["eagle3"] / "config.json").is_file() or not both:
        return "eagle1"

    def mean_speed(kind):
        return sum(m[kind]["tokens_per_s"] for m in both) / len(both)

    return "eagle3" if mean_speed("eagle3") > mean_speed("eagle1") else "eagle1"


def demo_tree():
    """The draft tree the demo pair was tuned for (a :class:`~eagle_runtime.tree.DynamicTree`)."""
    from ..tree import DynamicTree

    t = build_info().get("tree") or {}
    return DynamicTree(t.get("total_tokens", 16), t.get("depth", 4), t.get("top_k", 4))


__all__ = ["demo_paths", "demo_tree", "best_head", "build_info", "DEMO_DIR", "HEAD_DIRS"]
