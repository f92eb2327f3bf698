"""EAGLE speculative decoding runtime: HF LLaMA/Mixtral loading, draft heads, trees, generation.

Importing it does no GPU work.
"""

from .draft import EagleHead, load_head, random_head, save_head
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
    "DynamicTree",
    "StaticTree",
    "MC_SIM_7B_63",
]
