"""Load on the server: N concurrent streaming clients on loopback, EAGLE against the same server decoding plainly.

Starts ``python -m eagle_runtime serve`` over the demo pair (or ``--base/--draft``) as its own process (clients in
the same process would share its interpreter lock and slow every step 5x on the demo pair), then for
each N in ``--clients`` runs N client threads that each send ``--requests-per-client`` streaming completions
(``ignore_eos``: every request decodes ``--max-tokens`` tokens, so both modes do the same work), first all with
``speculative: true``, then all plain, and reports per mode (the median of ``--repeat`` interleaved rounds): time to first token (TTFT) and inter-token latency
(ITL: the gap between streamed chunks divided by the tokens in the chunk, so a speculative chunk of 4 tokens counts
as 4 gaps) percentiles, and total tokens/s over the level's wall time. Bounded: ``--time-limit`` seconds per level
and mode (a level that hits it is marked ``"cut": true``).

    python benchmarks/serve_load.py --out benchmarks/results/cpu_serve_load.json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from eagle_runtime.atomic import atomic_write_json

PROMPTS = ["Once upon a time", "The little dog", "Tom and Sue went to the park", "One day, a bird",
           "Lily found a box", "The sun was hot", "Ben had a toy car", "A cat sat on"]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int, speculative: bool) -> dict:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True,
            "speculative": speculative, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, tokens = None, None, [], 0
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            ch = json.loads(line[6:])
            n = ch.get("eagle", {}).get("tokens", 0) if ch.get("choices") else 0
            if not n:
                continue
            now = time.perf_counter()
            if first is None:
                first = now
            else:
                gaps += [(now - last) / n] * n
            last, tokens = now, tokens + n
    return {"ttft": first - t0, "itl": gaps, "tokens": tokens}


def run_level(url: str, n_clients: int, per_client: int, max_tokens: int, speculative: bool, limit: float) -> dict:
    results, lock = [], threading.Lock()
    t_end = time.perf_counter() + limit

    def client(k: int):
        with httpx.Client(timeout=limit + 60) as c:
            for j in range(per_client):
                if time.perf_counter() > t_end:
                    return
                res = one_request(c, url, PROMPTS[(k + j) % len(PROMPTS)], max_tokens, speculative)
                with lock:
                    results.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r["ttft"] for r in results]
    itl = [g for r in results for g in r["itl"]]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_ms": {q: round(1e3 * pct(ttft, q), 2) for q in (50, 90, 99)},
            "itl_ms": {q: round(1e3 * pct(itl, q), 3) for q in (50, 90, 99)},
            "cut": len(results) < n_clients * per_client}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="target model (default: the embedded demo pair)")
    p.add_argument("--draft")
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="rounds per level, EAGLE and plain interleaved (default 3)")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level and mode (default 120)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write the results as JSON here (atomically)")
    a = p.parse_args(argv)
    clients = [int(x) for x in a.clients.split(",")]
    if min(clients) < 1 or a.requests_per_client < 1 or a.max_tokens < 1 or a.repeat < 1:
        p.error("--clients, --requests-per-client, --max-tokens and --repeat must be >= 1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "eagle_runtime", "serve", "--port", str(port), "--max-batch", str(a.max_batch),
           "--max-queue", str(max(clients) * 2), "--backend", a.backend, "--device", a.device, "--model-name", "bench"]
    cmd += ["--base", a.base] + (["--draft", a.draft] if a.draft else []) if a.base else ["--demo"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if server.poll() is not None:
                sys.exit(f"the server exited: {server.stderr.read().strip().splitlines()[-1:]}")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                sys.exit("the server did not come up in 300 s")
            time.sleep(0.2)
        tree = httpx.get(url + "/v1/models").json()["data"][0]
        return _run_all(a, url, clients, tree)
    finally:
        server.terminate()
        server.wait(30)


def _run_all(a, url: str, clients: list[int], model_info: dict) -> int:
    one_request(httpx.Client(timeout=60), url, PROMPTS[0], 8, True)  # warm-up: first-call allocations
    rows = []
    for n in clients:
        runs = {"eagle": [], "plain": []}
        for _ in range(a.repeat):  # interleaved, so drift on a shared machine hits both modes alike
            for mode, spec in (("eagle", True), ("plain", False)):
                runs[mode].append(run_level(url, n, a.requests_per_client, a.max_tokens, spec, a.time_limit))
        row = {"clients": n}
        for mode, rs in runs.items():  # the run with the median tokens/s stands for the mode; all rates kept
            rs = sorted(rs, key=lambda r: r["tokens_per_s"])
            row[mode] = dict(rs[len(rs) // 2], runs_tokens_per_s=[r["tokens_per_s"] for r in runs[mode]])
        row["speedup"] = round(row["eagle"]["tokens_per_s"] / row["plain"]["tokens_per_s"], 3)
        row["speedup_per_round"] = [round(e["tokens_per_s"] / q["tokens_per_s"], 3)
                                    for e, q in zip(runs["eagle"], runs["plain"])]
        rows.append(row)
        e, q = row["eagle"], row["plain"]
        print(f"N={n:3d}  eagle {e['tokens_per_s']:8.1f} tok/s  TTFT p50 {e['ttft_ms'][50]:7.1f} ms  ITL p50 "
              f"{e['itl_ms'][50]:6.2f} ms | plain {q['tokens_per_s']:8.1f} tok/s  TTFT p50 {q['ttft_ms'][50]:7.1f} "
              f"ms  ITL p50 {q['itl_ms'][50]:6.2f} ms | {row['speedup']:.2f}x", flush=True)
    import torch

    record = {"device": f"{a.device} ({torch.get_num_threads()} torch threads)", "date": time.strftime("%Y-%m-%d"),
              "code_commit": _commit(), "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "model": "demo pair" if not a.base else str(a.base), "torch": torch.__version__,
              "max_tokens": a.max_tokens, "repeat": a.repeat, "requests_per_client": a.requests_per_client,
              "max_batch": a.max_batch, "server": model_info, "levels": rows}
    out = {"what": "the server under N concurrent streaming clients on loopback, EAGLE against plain decoding",
           "devices": {record["device"]: "the machine the benchmark ran on"},
           "note": "per level and mode the median of `repeat` interleaved rounds; ttft_ms and itl_ms are percentiles "
                   "(50, 90, 99); itl is a chunk's gap divided by its tokens; speedup_per_round pairs each round",
           "records": [record]}
    if a.out:
        atomic_write_json(Path(a.out), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
