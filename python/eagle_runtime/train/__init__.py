"""Training: EAGLE-1 and EAGLE-3 draft heads for a frozen target, the demo target, self-distillation corpora.

Commands::

    python -m eagle_runtime.train [--head eagle1|eagle3] --base TARGET_DIR --corpus FILE [FILE ...] --out HEAD_DIR
    python -m eagle_runtime.train.distill --base TARGET_DIR --prompts FILE [FILE ...] --out CORPUS.jsonl
    python -m eagle_runtime.train.target --out DIR

Modules, each importing only those above it (none imports the runtime's command line, :mod:`eagle_runtime.cli`):

- :mod:`.common`: :class:`TrainConfig`, the corpus (:func:`load_corpus`, :func:`pack`, :func:`split_heldout`),
  :func:`prepare_training`, ``--init`` (:func:`load_init`, :func:`start_from`).
- :mod:`.loop`: :func:`fit`, the loop both head trainers share (schedule, evaluation, atomic saves, resume,
  signals).
- :mod:`.eagle1` (:func:`train_head`) and :mod:`.eagle3` (:func:`train_head3`, the training-time test).
- :mod:`.command`: the command line of both head trainers (``__main__`` runs it).
- :mod:`.target`: the demo target trained from scratch; :mod:`.distill`: the target's own answers as a corpus.
  Neither is imported here (``python -m`` runs them as scripts).
"""

from .common import TrainConfig, encode_chat, load_corpus, load_init, pack, prepare_training, split_heldout, start_from
from .eagle1 import head_loss, train_head
from .eagle3 import Eagle3TrainConfig, draft_vocabulary, train_head3, ttt_forward, ttt_loss
from .loop import fit, lr_factor

__all__ = [
    "Eagle3TrainConfig",
    "TrainConfig",
    "draft_vocabulary",
    "encode_chat",
    "fit",
    "head_loss",
    "load_corpus",
    "load_init",
    "lr_factor",
    "pack",
    "prepare_training",
    "split_heldout",
    "start_from",
    "train_head",
    "train_head3",
    "ttt_forward",
    "ttt_loss",
]
