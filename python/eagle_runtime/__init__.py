"""EAGLE speculative decoding runtime: HF LLaMA/Mixtral loading, draft heads, trees, generation.

Importing it does no GPU work.
"""

from .draft import EagleHead, load_head, random_head, save_head
from .draft3 import Eagle3Head, random_head3
from .drafter import Drafter
from .generate import EagleModel, GenerationResult
from .loading import load_target
from .tree import MC_SIM_7B_63, DynamicTree, StaticTree

from_pretrained = EagleModel.from_pretrained

__all__ = [
    "EagleModel",
    "GenerationResult",
    "from_pretrained",
    "load_target",
    "load_head",
    "save_head",
    "random_head",
    "EagleHead",
    "Eagle3Head",
    "Drafter",
    "random_head3",
    "DynamicTree",
    "StaticTree",
    "MC_SIM_7B_63",
]
