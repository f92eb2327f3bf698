"""The embedded demo pair: a 16-layer TinyStories LLaMA target and its 1-layer EAGLE-1 head.

Built by ``scripts/build_demo.py`` (settings and measured quality in ``BUILD.json``)::

    from eagle_runtime import EagleModel
    from eagle_runtime.demo import demo_paths, demo_tree

    target, head = demo_paths()
    model = EagleModel.from_pretrained(target, head, tree=demo_tree())
"""

from __future__ import annotations

import json
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent


def demo_paths() -> tuple[Path, Path]:
    """``(target_dir, head_dir)`` of the embedded pair (HF target checkpoint, published-format EAGLE-1 head)."""
    target, head = DEMO_DIR / "target", DEMO_DIR / "head"
    for d in (target, head):
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"the demo pair is missing {d / 'config.json'}; rebuild it with scripts/build_demo.py")
    return target, head


def build_info() -> dict:
    """The settings and measured quality recorded by ``scripts/build_demo.py`` (empty if not built)."""
    path = DEMO_DIR / "BUILD.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def demo_tree():
    """The draft tree the demo pair was tuned for (a :class:`~eagle_runtime.tree.DynamicTree`)."""
    from ..tree import DynamicTree

    t = build_info().get("tree") or {}
    return DynamicTree(t.get("total_tokens", 16), t.get("depth", 4), t.get("top_k", 4))


__all__ = ["demo_paths", "demo_tree", "build_info", "DEMO_DIR"]
