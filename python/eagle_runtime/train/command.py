"""The head trainers' command line: ``python -m eagle_runtime.train [--head eagle1|eagle3] --base DIR --corpus FILE
[FILE ...] --out DIR [--steps N ...]``.

Bad flags, corpora and files are one line on stderr with exit status 2; a signal during training saves and exits
with ``128 + signum``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import asdict

from ..errors import USER_ERRORS, OneLineParser
from .common import TrainConfig
from .eagle1 import train_head
from .eagle3 import Eagle3TrainConfig, train_head3


def main(argv=None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--head", choices=["eagle1", "eagle3"], default="eagle1")
    kind, argv = pre.parse_known_args(argv)
    if kind.head == "eagle3":  # EAGLE-3 heads: training-time test, reduced vocabulary (eagle3.py)
        return run_cli(argv, prog="python -m eagle_runtime.train --head eagle3", cfg_type=Eagle3TrainConfig,
                       train=train_head3, description="Train an EAGLE-3 draft head (official EAGLE-3 layout).",
                       layout="official EAGLE-3 layout")
    return run_cli(argv, prog="python -m eagle_runtime.train", cfg_type=TrainConfig, train=train_head,
                   description="Train an EAGLE-1 draft head (--head eagle3: an EAGLE-3 head, see "
                   "python -m eagle_runtime.train --head eagle3 -h).", layout="published EAGLE-1 format")


def run_cli(argv, *, prog: str, description: str, layout: str, cfg_type: type, train) -> int:
    """The command line both trainers share: ``--base/--corpus/--out/--resume/--overwrite`` plus one flag per
    field of ``cfg_type``; bad flags, corpora and files are one line on stderr with exit status 2; a signal during
    training saves and exits with ``128 + signum``."""
    p = OneLineParser(prog=prog, description=description)
    p.add_argument("--base", required=True, help="target model: HF directory or hub id")
    p.add_argument("--corpus", required=True, nargs="+",
                   help="plain text (blank-line separated documents) or jsonl (chats, text or token ids); several "
                   "files are read as one corpus")
    p.add_argument("--out", required=True, help=f"output directory ({layout})")
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--overwrite", action="store_true", help="replace a head already in OUT")
    d = cfg_type()
    for name, val in asdict(d).items():
        if isinstance(val, bool):  # --cache-target / --no-cache-target
            p.add_argument("--" + name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=val)
            continue
        typ = float if name == "max_minutes" else type(val)
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=val)
    a = p.parse_args(argv)
    try:
        cfg = cfg_type(**{k: getattr(a, k) for k in asdict(d)})
        if a.resume and a.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        res = train(a.base, a.corpus, a.out, cfg, resume=a.resume, overwrite=a.overwrite)
    except (*USER_ERRORS, FileExistsError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the training loop (loading): nothing to save
        print("error: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    last = res["history"][-1] if res["history"] else {}
    print(json.dumps({"out": res["out"], "steps": res["steps"], "interrupted": res["interrupted"],
                      "time_s": res["time_s"], "last": last}, indent=2))
    if res["interrupted"]:
        return 128 + signal.Signals[res["interrupted"]].value
    return 0
