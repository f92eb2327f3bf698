"""Command line: ``python -m eagle_runtime generate --base DIR --draft DIR --prompt TEXT``."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from eagle_kernels import BackendUnavailable

from .config import ConfigError
from .loading import CheckpointError
from .tree import DynamicTree, StaticTree

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eagle_runtime", description="EAGLE speculative decoding.")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("--base", required=True, help="target model: HF directory or hub id")
    g.add_argument("--draft", help="EAGLE-1 head: directory or hub id (omit for plain decoding)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tree", choices=["dynamic", "static"], default="dynamic")
    g.add_argument("--total-tokens", type=int, default=60, help="dynamic tree size (without the root)")
    g.add_argument("--depth", type=int, default=6, help="dynamic tree draft passes")
    g.add_argument("--top-k-draft", type=int, default=10, help="dynamic tree branching")
    g.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    g.add_argument("--max-len", type=int, default=None, help="KV cache length (default: min(config, 4096))")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    from .parallel import shutdown_distributed

    try:
        return _generate(a)
    finally:
        shutdown_distributed()  # under torchrun: leave the process group cleanly


def _generate(a) -> int:
    from .generate import EagleModel
    from .parallel import is_main_process, tensor_parallel_size

    tree = (
        DynamicTree(a.total_tokens, a.depth, a.top_k_draft) if a.tree == "dynamic" else StaticTree()
    )
    try:
        model = EagleModel.from_pretrained(
            a.base, a.draft, dtype=_DTYPES[a.dtype], device=a.device, tree=tree, backend=a.backend, max_len=a.max_len
        )
        prompts = a.prompt if len(a.prompt) > 1 else a.prompt[0]
        res = model.generate(
            prompts, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
            seed=a.seed, speculative=a.draft is not None,
        )
    except (FileNotFoundError, ConfigError, CheckpointError, BackendUnavailable, ValueError) as e:
        if is_main_process():
            print(f"error: {e}", file=sys.stderr)
        return 2
    if not is_main_process():  # tensor parallel: every rank holds the same result, rank 0 prints it
        return 0
    n = res.num_new_tokens
    if a.json:
        out = {"text": res.text, "tokens": res.tokens, "accept_lengths": res.accept_lengths,
               "tau": res.tau if a.draft else None, "tokens_per_s": n / res.wall_time_s}
        if tensor_parallel_size(model.target) > 1:
            out["tensor_parallel"] = tensor_parallel_size(model.target)
        print(json.dumps(out))
        return 0
    for i, text in enumerate(res.text or [str(t) for t in res.tokens]):
        print(f"[{i}] {a.prompt[i] if i < len(a.prompt) else ''}{text}")
    stats = f"{n} tokens in {res.wall_time_s:.2f} s ({n / res.wall_time_s:.1f} tok/s)"
    if a.draft:
        stats += f", tau {res.tau:.2f}, accept histogram {res.accept_histogram()}"
    print(stats, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
