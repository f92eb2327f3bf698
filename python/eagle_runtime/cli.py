"""Command line: ``python -m eagle_runtime generate --base DIR --draft DIR --prompt TEXT`` and
``python -m eagle_runtime env`` (torch, triton, CUDA and the native extension, and why not).

Bad input is reported as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings

import torch

from .checks import check_seed
from .errors import USER_ERRORS, OneLineParser, fail
from .loading import check_device
from .text import check_utf8_prompts
from .tree import DynamicTree, StaticTree



def _one_line_warning(message, *args, **kwargs) -> None:
    print(f"warning: {message}", file=sys.stderr)


REPRODUCIBILITY = (
    "Reproducibility: greedy output (temperature 0) is the target's plain greedy output. A --seed reproduces sampled "
    "output for a fixed tree (--tree dynamic or static) on any machine, batch layout and tensor-parallel degree. "
    "Under --tree auto the sequence of trees depends on measured time, so seeded sampled output can differ between "
    "machines, runs, and runs with and without torchrun; it still follows the target's distribution.")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m eagle_runtime", description="EAGLE speculative decoding.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    g = sub.add_parser("generate", help="generate text from a prompt", epilog=REPRODUCIBILITY)
    g.add_argument("--base", required=True, help="target model: HF directory or hub id")
    g.add_argument("--draft", help="EAGLE-1 head: directory or hub id (omit for plain decoding)")
    g.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for a batch")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0,
                   help="sampling seed: the same output for a fixed --tree on any machine (see below)")
    g.add_argument("--tree", choices=["auto", "dynamic", "static"], default="auto",
                   help="auto: the tree (or plain decoding) a measured cost model finds fastest here; its choices "
                        "follow measured time, so seeded sampled output may differ between runs")
    g.add_argument("--total-tokens", type=int, default=None,
                   help="dynamic tree size without the root (default 60; any of these three picks --tree dynamic)")
    g.add_argument("--depth", type=int, default=None, help="dynamic tree draft passes (default 6)")
    g.add_argument("--top-k-draft", type=int, default=None, help="dynamic tree branching (default 10)")
    g.add_argument("--backend", choices=["auto", "cpu", "torch", "triton"], default="auto")
    g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each decode step as a CUDA graph (default: on where CUDA, backend triton and the "
                        "native extension allow)")
    g.add_argument("--max-len", type=int, default=None, help="KV cache length (default: min(config, 4096))")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.add_parser("env", help="report torch, triton, CUDA and the native extension (built or not, and why)")
    from .serve.server import add_arguments

    add_arguments(sub.add_parser("serve", help="serve an OpenAI-compatible API and a chat page (needs [serve])"))
    return p


def _finite(x):
    """JSON has no NaN/inf: such values (e.g. tau with no decode cycle) become null."""
    return x if x is None or math.isfinite(x) else None


def generate(a) -> int:
    from .generate import EagleModel
    from .parallel import is_main_process, tensor_parallel_size

    if a.max_new_tokens < 1:
        return fail(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if not math.isfinite(a.temperature):
        return fail(f"--temperature must be finite, got {a.temperature}")
    if a.max_len is not None and a.max_len <= 0:
        return fail(f"--max-len must be a positive integer, got {a.max_len}")
    check_utf8_prompts(a.prompt)  # before the model loads (minutes for a large one)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check_seed(a.seed, "--seed")
    check_device(device)
    sizes = (a.total_tokens, a.depth, a.top_k_draft)
    if a.tree == "static" and any(v is not None for v in sizes):
        return fail("--total-tokens/--depth/--top-k-draft shape a dynamic tree; they do not apply to --tree static")
    if a.tree == "auto" and all(v is None for v in sizes):
        tree = "auto"
    elif a.tree == "static":
        tree = StaticTree()
    else:  # --tree dynamic, or auto with an explicit tree shape: the tree the user described
        tree = DynamicTree(*(d if v is None else v for v, d in zip(sizes, (60, 6, 10))))
    model = EagleModel.from_pretrained(
        a.base, a.draft, dtype=a.dtype, device=device, tree=tree, backend=a.backend,
        max_len=a.max_len, cuda_graphs=a.cuda_graphs,
    )
    prompts = a.prompt if len(a.prompt) > 1 else a.prompt[0]
    res = model.generate(
        prompts, a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
        seed=a.seed, speculative=a.draft is not None,
    )
    if not is_main_process():  # tensor parallel: every rank holds the same result, rank 0 prints it
        return 0
    n = res.num_new_tokens
    rate = n / res.wall_time_s if res.wall_time_s > 0 else None
    if a.json:
        out = {"text": res.text, "tokens": res.tokens, "accept_lengths": res.accept_lengths,
               "tau": _finite(res.tau) if a.draft else None, "tokens_per_s": _finite(rate), "tree": res.tree}
        if tensor_parallel_size(model.target) > 1:
            out["tensor_parallel"] = tensor_parallel_size(model.target)
        print(json.dumps(out, allow_nan=False))
        return 0
    for i, text in enumerate(res.text or [str(t) for t in res.tokens]):
        print(f"[{i}] {a.prompt[i] if i < len(a.prompt) else ''}{text}")
    stats = f"{n} tokens in {res.wall_time_s:.2f} s" + (f" ({rate:.1f} tok/s)" if rate else "")
    if a.draft:
        stats += f", tau {res.tau:.2f}, accept histogram {res.accept_histogram()}, trees {res.tree['steps']}"
    print(stats, file=sys.stderr)
    return 0


def env_report(build_info=None) -> list[str]:
    """Lines describing what this install can run: torch, CUDA, triton, the native extension and why not.
    ``build_info``: the ``_native_build.json`` that setup.py wrote (default: the one beside ``eagle_kernels``)."""
    import json as _json
    from pathlib import Path

    import eagle_kernels
    from eagle_kernels import native_available, triton_available

    lines = [f"python: {sys.version.split()[0]}"]
    cuda = torch.cuda.is_available()
    build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
    lines.append(f"torch: {torch.__version__} ({build}; CUDA device available: {'yes' if cuda else 'no'})")
    if cuda:
        lines.append(f"cuda device: {torch.cuda.get_device_name(0)}")
    try:
        import triton

        ok, why = triton_available()
        lines.append(f"triton: {triton.__version__} ({'kernels can run' if ok else 'kernels cannot run: ' + why})")
    except ImportError as e:
        lines.append(f"triton: not importable ({e})")
    info_path = Path(build_info or Path(eagle_kernels.__file__).parent / "_native_build.json")
    try:
        info = _json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = None
    if native_available():
        from eagle_kernels import _C

        if getattr(_C, "with_cuda", False):
            state = "built with CUDA"
        else:
            reason = info["reason"] if info and not info.get("cuda") else "no build record says why"
            state = f"built (CPU only: {reason.removeprefix('CPU only: ')})"
    else:
        try:
            import eagle_kernels._C  # noqa: F401
            why = ""
        except ImportError as e:
            why = str(e)
        if info and not info.get("built"):
            why = info["reason"]
        elif info is None:
            why = "never built here (pip install --no-build-isolation -e . builds it; see csrc/README.md)"
        state = f"not built ({why}); the reference ops are used"
    lines.append(f"native extension eagle_kernels._C: {state}")
    return lines


def main(argv=None) -> int:
    from .generate import GraphsUnavailable
    from .parallel import is_main_process, shutdown_distributed

    a = _parser().parse_args(argv)
    if a.command == "env":
        print("\n".join(env_report()))
        return 0
    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        try:
            if a.command == "serve":
                from .serve.server import serve

                return serve(a)
            return generate(a)
        except USER_ERRORS + (GraphsUnavailable,) as e:
            if not is_main_process():  # under torchrun every rank fails alike; rank 0 says why
                return 2
            return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
        except KeyboardInterrupt:
            fail("interrupted")
            return 130
        finally:
            shutdown_distributed()  # under torchrun: leave the process group cleanly

if __name__ == "__main__":
    sys.exit(main())
