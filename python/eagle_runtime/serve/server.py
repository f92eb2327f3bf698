"""``python -m eagle_runtime serve``: load a model and run the HTTP server (uvicorn) until SIGTERM or Ctrl-C.

uvicorn serves HTTP from a thread; the decode loop runs on the main thread (:meth:`Scheduler.run`). SIGTERM (or
SIGINT) stops accepting connections, lets in-flight requests finish for up to ``--drain-timeout`` seconds (then
cancels them: their rows are freed), stops the decode loop and exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", help="target model: HF directory or hub id")
    p.add_argument("--draft", help="EAGLE-1 or EAGLE-3 head (omit: plain decoding only)")
    p.add_argument("--demo", action="store_true", help="serve the embedded demo pair (instead of --base/--draft)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default=None, help="the id /v1/models reports (default: the base's name)")
    p.add_argument("--max-batch", type=int, default=8, help="rows decoding at once (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a row; beyond it the server answers 429 (default 64)")
    p.add_argument("--tree", choices=["dynamic", "static"], default=None,
                   help="the draft tree of every speculative row (default: the tree the demo pair was tuned for "
                        "with --demo, else the dynamic EAGLE-2 tree; auto's per-call choice does not apply to a "
                        "batch that requests join and leave)")
    p.add_argument("--backend", choices=["auto", "cpu", "torch", "triton"], default="auto")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--max-len", type=int, default=None, help="KV cache length per row")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM (default 30)")


def serve(a) -> int:
    """Run the server for parsed arguments ``a``; a bad argument is a one-line ``ValueError``."""
    try:
        import uvicorn
    except ImportError:
        raise ValueError('serving needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    import torch

    from ..generate import EagleModel
    from .app import create_app

    if a.demo == bool(a.base):
        raise ValueError("give either --demo or --base (with an optional --draft)")
    if not 0 <= a.port <= 65535:
        raise ValueError(f"--port must lie in [0, 65535], got {a.port}")
    if a.max_batch < 1 or a.max_queue < 0:
        raise ValueError(f"--max-batch must be >= 1 and --max-queue >= 0, got {a.max_batch} and {a.max_queue}")
    if a.demo:
        from ..demo import demo_paths

        from ..demo import demo_tree

        base, draft = demo_paths()
        name = a.model_name or "eagle-demo"
        tree = a.tree or demo_tree()  # 5 nodes: the dynamic 60-node tree is slower than plain on a CPU
    else:
        base, draft = a.base, a.draft
        name = a.model_name or str(base).rstrip("/").split("/")[-1]
        tree = a.tree or "dynamic"
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EagleModel.from_pretrained(base, draft, dtype=a.dtype, device=device, tree=tree, backend=a.backend,
                                       max_len=a.max_len, cuda_graphs=False)
    app = create_app(model, model_name=name, max_batch=a.max_batch, max_queue=a.max_queue, scheduler_thread=False)
    config = uvicorn.Config(app, host=a.host, port=a.port, log_level="info",
                            timeout_graceful_shutdown=a.drain_timeout)
    server = uvicorn.Server(config)  # in a thread it installs no signal handlers: ours below
    sched = app.state.scheduler

    def http():
        try:
            server.run()
        finally:
            sched.close()  # after the drain (or a failed start): the decode loop below returns

    def on_signal(*_):  # SIGTERM / Ctrl-C: uvicorn stops accepting, drains for --drain-timeout, then exits
        server.should_exit = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    th = threading.Thread(target=http, name="uvicorn", daemon=True)
    th.start()
    print(f"starting {name} on http://{a.host}:{a.port} (max batch {a.max_batch}, queue {a.max_queue})",
          file=sys.stderr, flush=True)
    sched.run()  # the decode loop on the main thread (see Scheduler.run)
    th.join(a.drain_timeout + 10)
    if not server.started:
        raise ValueError(f"the server could not listen on {a.host}:{a.port} (see the log above)")
    return 0


__all__ = ["add_arguments", "serve"]
