"""End-to-end speed on MT-bench: plain decoding vs EAGLE in our runtime, and HF transformers ``generate``.

    python benchmarks/mtbench_speed.py                       # the embedded demo pair, cuda if present else cpu
    python benchmarks/mtbench_speed.py --base lmsys/vicuna-7b-v1.3 --draft yuhuili/EAGLE-Vicuna-7B-v1.3 \\
        --num-questions 80 --max-new-tokens 512 --tree dynamic
    python benchmarks/mtbench_speed.py --head eagle3         # the demo's EAGLE-3 head (default: the higher-tau one)

``--tree auto`` (the default) lets the runtime pick the tree, or plain decoding, per cycle from a measured cost
model and the running acceptance (``eagle_runtime.adaptive``); the trees it used are printed and kept in the JSON
(``summary.eagle.trees``: steps per tree and the plain fraction; with auto, tau counts plain steps as 1).

Questions: ``--questions FILE`` (MT-bench jsonl: question_id, category, turns[2]); by default the shared
``mt_bench.jsonl`` beside the repository when it is there, else a built-in set of 16 two-turn questions in
MT-bench's 8 categories. ``--num-questions N`` takes them round-robin over the categories. Both turns run; as in
the official evaluation the second turn's prompt holds the first turn's answer. So that every method decodes the
same prompts, that answer is plain decoding's at the same temperature. Prompts use the tokenizer's chat template
when it has one, else ``User: ...\\nAssistant:``; a prompt longer than the context allows keeps its last tokens.

Per temperature (``--temperatures``, default 0 and 1): tokens/s of each method (prefill included, one warm-up
generation per method excluded), speedups over plain, EAGLE's mean accepted length tau (accepted drafts + the
bonus token per cycle) and acceptance histogram, a per-category table, and at temperature 0 how EAGLE's outputs
agree with plain decoding's: the number identical, their fraction and the mean length of the common prefix (tokens
before the first divergence). In float32 every output must be identical (token identity); in bfloat16 near-ties
flip between a 61-token verify pass and a 1-token step (different GEMM shapes and attention tiles), so there the
fraction and the prefix length are the result, not a pass/fail. ``--dtype`` defaults to the API's choice
(``EagleModel.from_pretrained(dtype=None)``: bfloat16 on CUDA, float32 on CPU); the dtype used is printed. Writes ``mtbench_<device>_<model>_<UTC time>.json`` (every
printed field) and the matching ``.png`` into ``--out`` (default: ``$EAGLE_RESULTS_DIR``, else ``results/`` under
the current directory), each written atomically (a temporary file in the same folder, then a rename), so runs never
overwrite each other and an interrupted run leaves no partial file. Bad arguments (including a malformed
``--questions`` file or an unwritable ``--out``) are one-line errors with exit status 2, before any model loads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))  # runs from a checkout even without the editable install

from eagle_runtime import DynamicTree, EagleModel, StaticTree  # noqa: E402
from eagle_runtime.adaptive import AutoTree  # noqa: E402
from eagle_runtime.atomic import atomic_write, atomic_write_json  # noqa: E402
from eagle_runtime.chat import encode_prompt as encode, make_prompt  # noqa: E402,F401  (cpu_cycle_phases imports both from here)
from eagle_runtime.datadir import shared_data_dir  # noqa: E402
from eagle_runtime.errors import USER_ERRORS  # noqa: E402
from eagle_runtime.parallel import is_main_process, shutdown_distributed, tensor_parallel_size  # noqa: E402
from eagle_runtime.tree import step_room  # noqa: E402

DEFAULT_QUESTIONS = shared_data_dir() / "bench" / "mt_bench.jsonl"
CATEGORIES = ["writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"]
METHODS = ["plain", "eagle", "hf"]
# Columns of the printed tables; each is a key of the matching JSON entry (tests/test_demo_and_bench.py checks).
SUMMARY_COLUMNS = ["method", "tokens", "time_s", "prefill_s", "tokens_per_s", "ms_per_token", "speedup", "tau"]
CATEGORY_COLUMNS = ["category", "plain_tokens_per_s", "eagle_tokens_per_s", "hf_tokens_per_s", "speedup", "tau"]

# Used when the MT-bench file is not reachable: two questions per MT-bench category, written for this benchmark.
BUILTIN_QUESTIONS = [
    ("writing", "Write a short story about a lighthouse keeper who finds a message in a bottle.", "Now retell the story as a four-line poem."),
    ("writing", "Write a friendly letter inviting your neighbours to a garden party on Saturday.", "Make the letter half as long and more formal."),
    ("roleplay", "Pretend you are a pirate captain. Tell your crew why you are sailing to a new island.", "A sailor asks if there is treasure there. What do you answer?"),
    ("roleplay", "You are a friendly dragon meeting a child in the forest. What do you say first?", "The child is scared. How do you calm them down?"),
    ("reasoning", "Tom is taller than Ann. Ann is taller than Ben. Who is the shortest of the three?", "If Ben grows taller than Tom, who is the tallest now?"),
    ("reasoning", "A box has three red balls and two blue balls. You take out two red balls. What is left in the box?", "Now you put one blue ball back in. How many balls are in the box?"),
    ("math", "What is 17 plus 25? Explain each step.", "Now multiply the result by 3."),
    ("math", "A farmer has 12 apples and gives a third of them to his friend. How many apples does he keep?", "He then buys 5 more apples. How many does he have now?"),
    ("coding", "Write a Python function that returns the largest number in a list.", "Change the function so that it works on an empty list."),
    ("coding", "Explain what a for loop does, with a small example in Python.", "Rewrite the example using a while loop."),
    ("extraction", "From this sentence, list the animals: 'The cat chased the dog while a bird watched from the tree.'", "Now list the places mentioned in the same sentence."),
    ("extraction", "Find the name and the age in: 'Lily is seven years old and loves to paint.'", "Return the same information as a JSON object."),
    ("stem", "Why is the sky blue? Explain it simply.", "Why are sunsets red and orange then?"),
    ("stem", "What do plants need to grow, and why?", "What happens to a plant that is kept in the dark?"),
    ("humanities", "Why do people tell stories to children?", "Name a famous fairy tale and explain its lesson."),
    ("humanities", "What is the purpose of a library in a town?", "How could a library attract more young readers?"),
]


# ----------------------------------------------------------------------------------------------------------------
# Questions and prompts
# ----------------------------------------------------------------------------------------------------------------
def load_questions(path: Path | None, n: int | None) -> tuple[list[dict], str]:
    """Questions taken round-robin over the categories (so any ``n`` covers them evenly); and their source."""
    if path is not None:
        rows = read_questions(path)
        source = str(path)
    else:
        rows = [{"question_id": i, "category": c, "turns": [a, b]} for i, (c, a, b) in enumerate(BUILTIN_QUESTIONS, 1)]
        source = "built-in"
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    order = [c for c in CATEGORIES if c in by_cat] + sorted(c for c in by_cat if c not in CATEGORIES)
    picked, i = [], 0
    while len(picked) < len(rows):
        for c in order:
            if i < len(by_cat[c]):
                picked.append(by_cat[c][i])
        i += 1
    return picked[:n] if n else picked, source


def read_questions(path: Path) -> list[dict]:
    """MT-bench jsonl rows, checked: a JSON object per line with a ``category`` string and ``turns`` (a non-empty
    list of strings); ``question_id`` (an integer) defaults to the line number. Errors name the file and line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--questions {path}: cannot read it ({e})") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"--questions {path}:{n}: not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("category"), str):
            raise ValueError(f"--questions {path}:{n}: a row must be an object with a 'category' string")
        turns = r.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
            raise ValueError(f"--questions {path}:{n}: 'turns' must be a non-empty list of non-empty strings")
        qid = r.setdefault("question_id", n)
        if isinstance(qid, bool) or not isinstance(qid, int):
            raise ValueError(f"--questions {path}:{n}: 'question_id' must be an integer")
        rows.append(r)
    if not rows:
        raise ValueError(f"--questions {path} holds no questions")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Runners: each returns (new tokens, wall seconds, prefill seconds, accept lengths)
# ----------------------------------------------------------------------------------------------------------------
class OurRunner:
    def __init__(self, model: EagleModel, speculative: bool):
        self.model, self.speculative = model, speculative

    def __call__(self, ids, max_new, temperature, seed):
        r = self.model.generate([ids], max_new, temperature=temperature, seed=seed, speculative=self.speculative)
        self.last_tree = r.tree
        return r.tokens[0], r.wall_time_s, r.prefill_time_s, (r.accept_lengths[0] if self.speculative else [])


class HFRunner:
    """``transformers`` ``generate`` with its default (dynamic) KV cache; no speculation."""

    def __init__(self, base: str, dtype, device, eos: list[int], pad: int | None):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device).eval()
        self.device, self.eos, self.pad = torch.device(device), eos, pad

    @torch.inference_mode()
    def __call__(self, ids, max_new, temperature, seed):
        x = torch.tensor([ids], device=self.device)
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        torch.manual_seed(seed)
        self._sync()
        t0 = time.perf_counter()
        out = self.model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=max_new,
            eos_token_id=self.eos or None,
            pad_token_id=self.pad if self.pad is not None else (self.eos[0] if self.eos else 0),
            **kw,
        )
        self._sync()
        wall = time.perf_counter() - t0
        new = out[0, len(ids) :].tolist()
        for i, t in enumerate(new):  # generate pads finished sequences; cut after the first EOS like our runtime
            if t in self.eos:
                new = new[: i + 1]
                break
        return new, wall, None, []  # generate does not expose its prefill time

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------------
def parse_tree(spec: str, demo: bool):
    if spec == "auto":
        return AutoTree()
    if spec == "demo":
        from eagle_runtime.demo import demo_tree

        return demo_tree()
    if spec == "dynamic":
        return DynamicTree()
    if spec == "static":
        return StaticTree()
    m = re.fullmatch(r"(\d+),(\d+),(\d+)", spec)
    if not m:
        raise ValueError(f"--tree {spec!r}: use auto, demo, dynamic, static or TOTAL,DEPTH,TOPK (e.g. 16,4,4)")
    return DynamicTree(*map(int, m.groups()))


def summarize(rows: list[dict], method: str) -> dict:
    tok = sum(r["tokens"] for r in rows)
    wall = sum(r["time_s"] for r in rows)
    lens = [n for r in rows for n in r["accept_lengths"]]
    hist: dict[str, int] = {}
    for n in lens:
        hist[str(n)] = hist.get(str(n), 0) + 1
    return {
        "method": method,
        "generations": len(rows),
        "tokens": tok,
        "time_s": wall,
        "prefill_s": None if any(r["prefill_s"] is None for r in rows) else sum(r["prefill_s"] for r in rows),
        "tokens_per_s": tok / wall if wall > 0 else None,
        "ms_per_token": 1e3 * wall / tok if tok else None,
        "tau": sum(lens) / len(lens) if lens else None,
        "cycles": len(lens) if lens else None,
        "accept_histogram": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))) if lens else None,
    }


def trees_used(rows: list[dict]) -> dict:
    """Steps per tree over the generations (``plain`` = plain steps taken by ``tree="auto"``)."""
    steps: dict[str, int] = {}
    for r in rows:
        for k, n in r.get("trees", {}).items():
            steps[k] = steps.get(k, 0) + n
    total = sum(steps.values())
    return {"steps": dict(sorted(steps.items(), key=lambda kv: -kv[1])),
            "plain_fraction": steps.get("plain", 0) / total if total else 0.0}


def resolve_dtype(name: str | None, device: str | torch.device) -> torch.dtype:
    """``--dtype NAME``, or with ``None`` the API's default for ``device`` (as ``EagleModel.from_pretrained``):
    bfloat16 on CUDA (fp32 weights would double the bytes read per token), float32 elsewhere."""
    if name is not None:
        return getattr(torch, name)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def agreement(pairs) -> dict:
    """How outputs ``a`` agree with references ``b`` over ``pairs`` of token lists: ``identical`` / ``total``,
    ``all``, ``fraction`` identical and ``mean_common_prefix`` (tokens before the first divergence; an identical
    pair counts its whole length). Example: ``[([1, 2, 3], [1, 2, 3]), ([1, 5], [1, 2, 4])]`` gives 1/2 identical,
    fraction 0.5, mean_common_prefix (3 + 1) / 2 = 2.0."""
    pairs = list(pairs)
    same = sum(a == b for a, b in pairs)
    prefix = []
    for a, b in pairs:
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return {"identical": same, "total": len(pairs), "all": same == len(pairs),
            "fraction": same / len(pairs) if pairs else None,
            "mean_common_prefix": sum(prefix) / len(prefix) if prefix else None}


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(args, questions: tuple[list[dict], str] | None = None) -> dict:
    t_start = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, device)
    demo = args.base is None
    if demo:
        from eagle_runtime.demo import best_head, demo_paths

        base, draft = (str(p) for p in demo_paths(best_head() if args.head == "auto" else args.head))
    else:
        base, draft = args.base, args.draft
        if draft is None:
            raise ValueError("--base needs --draft (an EAGLE-1 or EAGLE-3 head)")
    tree = parse_tree(args.tree, demo)
    model = EagleModel.from_pretrained(base, draft, dtype=dtype, device=device, tree=tree, backend=args.backend,
                                       max_len=args.max_len, cuda_graphs=args.cuda_graphs)
    from eagle_runtime.draft3 import Eagle3Head

    head_kind = "eagle3" if isinstance(model.head, Eagle3Head) else "eagle1"
    if args.head not in ("auto", head_kind):
        print(f"error: --head {args.head}, but {draft} is an {head_kind} head", file=sys.stderr)
        raise SystemExit(2)
    tok = model.tokenizer
    if tok is None:
        raise ValueError(f"no tokenizer in {base}")
    cfg = model.target.cfg
    eos = cfg.eos_token_id
    runners = {"plain": OurRunner(model, False), "eagle": OurRunner(model, True)}
    tp = tensor_parallel_size(model.target)  # > 1 under torchrun: the target is sharded over the ranks
    if not args.no_hf and tp > 1 and is_main_process():
        print(f"note: tensor_parallel={tp}: skipping the transformers baseline (it would load the whole model per rank)")
    if not args.no_hf and tp == 1:
        from eagle_runtime.loading import resolve_dir

        runners["hf"] = HFRunner(str(resolve_dir(base)), dtype, device, eos, tok.pad_token_id)
    methods = [m for m in METHODS if m in runners]
    qpath = Path(args.questions) if args.questions else (DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.is_file() else None)
    questions, source = questions or load_questions(qpath, args.num_questions)
    room = step_room(tree) + 2
    budget = model.target.max_len - args.max_new_tokens - room
    if budget < 8:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in {model.target.max_len} positions")

    # Warm-up (excluded): one short generation per method.
    warm_ids, _ = encode(tok, make_prompt(tok, [(questions[0]["turns"][0], None)]), budget)
    for m in methods:
        for t in args.temperatures:
            runners[m](warm_ids, 8, t, args.seed)

    from tqdm import tqdm

    total = len(args.temperatures) * len(questions) * 2 * len(methods)
    bar = tqdm(total=total, desc="mt-bench", dynamic_ncols=True, disable=not is_main_process())
    results, truncated = {}, 0
    exact = dtype == torch.float32  # token identity is claimed in float32 only (see the module docstring)
    for temp in args.temperatures:
        rows = {m: [] for m in methods}
        pairs: dict[str, list] = {"eagle": [], "hf": []}  # (output, plain decoding's output) at temperature 0
        for q in questions:
            history: list[tuple[str, str | None]] = []
            for turn, question in enumerate(q["turns"][:2]):
                ids, cut = encode(tok, make_prompt(tok, history + [(question, None)]), budget)
                truncated += cut and temp == args.temperatures[0]
                outs = {}
                for m in methods:
                    new, wall, prefill, lens = runners[m](ids, args.max_new_tokens, temp, args.seed + q["question_id"])
                    outs[m] = new
                    rows[m].append({
                        "question_id": q["question_id"], "category": q["category"], "turn": turn + 1,
                        "prompt_tokens": len(ids), "tokens": len(new), "time_s": wall, "prefill_s": prefill,
                        "accept_lengths": lens,
                        **({"trees": runners[m].last_tree["steps"]} if m == "eagle" else {}),
                    })
                    bar.update(1)
                if temp == 0:
                    for m in pairs:
                        if m in outs:
                            pairs[m].append((outs[m], outs["plain"]))
                answer = tok.decode(outs["plain"], skip_special_tokens=True).strip()
                history.append((question, answer))
        summary = {m: summarize(rows[m], m) for m in methods}
        summary["eagle"]["trees"] = trees_used(rows["eagle"])
        for m in methods:
            summary[m]["speedup"] = _ratio(summary[m]["tokens_per_s"], summary["plain"]["tokens_per_s"])
        per_cat = {}
        for c in dict.fromkeys(q["category"] for q in questions):
            s = {m: summarize([r for r in rows[m] if r["category"] == c], m) for m in methods}
            per_cat[c] = {
                "category": c,
                **{f"{m}_tokens_per_s": s[m]["tokens_per_s"] for m in methods},
                "speedup": _ratio(s["eagle"]["tokens_per_s"], s["plain"]["tokens_per_s"]),
                "tau": s["eagle"]["tau"],
            }
        entry = {"temperature": temp, "summary": summary, "per_category": per_cat, "generations": rows}
        if temp == 0:
            # keys identical/total/all as before; fraction and mean_common_prefix added (the bf16 result)
            entry["eagle_identical_to_plain"] = dict(agreement(pairs["eagle"]), token_identity_expected=exact)
            if "hf" in methods:
                entry["hf_identical_to_plain"] = dict(agreement(pairs["hf"]), token_identity_expected=exact)
        results[f"{temp:g}"] = entry
    bar.close()
    import transformers

    return {
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else f"cpu ({platform.processor() or platform.machine()})",
        "config": {
            "base": base if not demo else "eagle_runtime.demo target",
            "draft": draft if not demo else f"eagle_runtime.demo {Path(draft).name}",
            "head": head_kind,
            "draft_vocab_size": getattr(model.head, "draft_vocab_size", cfg.vocab_size),
            "questions": source if qpath is None else qpath.name,
            "num_questions": len(questions),
            "max_new_tokens": args.max_new_tokens,
            "temperatures": args.temperatures,
            "tree": ({k: getattr(tree, k) for k in ("total_tokens", "depth", "top_k")} if isinstance(tree, DynamicTree)
                     else "auto" if isinstance(tree, AutoTree) else "static"),
            "backend": model.ops.name,
            "dtype": str(dtype).removeprefix("torch."),
            "dtype_source": "--dtype" if args.dtype else f"default for {torch.device(device).type}",
            "tensor_parallel": tp,
            "threads": torch.get_num_threads(),
            "seed": args.seed,
            "context": model.target.max_len,
            "prompts_truncated": int(truncated),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        },
        "results": results,
        "benchmark_wall_s": time.perf_counter() - t_start,
    }


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    width = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(columns)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, width))  # noqa: E731
    return "\n".join([line(columns)] + [line(x) for x in cells])


def report(res: dict) -> str:
    c = res["config"]
    out = [f"device: {res['device']}  backend: {c['backend']}  dtype: {c['dtype']} ({c.get('dtype_source', '--dtype')})  "
           f"threads: {c['threads']}  tree: {c['tree']}",
           f"questions: {c['num_questions']} ({c['questions']}), 2 turns, max_new_tokens {c['max_new_tokens']}, "
           f"prompts_truncated {c['prompts_truncated']}"]
    for key, e in res["results"].items():
        out.append(f"\n== temperature {key} ==")
        out.append(table(list(e["summary"].values()), SUMMARY_COLUMNS))
        out.append(f"accept_histogram (eagle): {e['summary']['eagle']['accept_histogram']}")
        t = e["summary"]["eagle"]["trees"]
        out.append(f"trees (eagle): {t['steps']} plain_fraction {t['plain_fraction']:.2f}")
        for key in ("eagle_identical_to_plain", "hf_identical_to_plain"):
            if key in e:
                out.append(f"{key}: {agreement_line(e[key], c['dtype'])}")
        out.append(table(list(e["per_category"].values()), CATEGORY_COLUMNS))
    out.append(f"\nbenchmark_wall_s: {res['benchmark_wall_s']:.1f}")
    return "\n".join(out)


def agreement_line(i: dict, dtype: str) -> str:
    """``3/4 (all=False), fraction 0.750, 41.2 tokens before the first divergence`` plus what the numbers mean."""
    line = f"{i['identical']}/{i['total']} (all={i['all']})"
    if i.get("fraction") is not None:
        line += f", fraction {i['fraction']:.3f}, {i['mean_common_prefix']:.1f} tokens before the first divergence"
    if dtype != "float32":
        line += f" [{dtype}: near-ties may flip; token identity is claimed in float32 only]"
    return line


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(res["results"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    methods = list(res["results"][temps[0]]["summary"])
    for i, m in enumerate(methods):
        vals = [res["results"][t]["summary"][m]["tokens_per_s"] or 0 for t in temps]
        axes[0].bar([j + 0.27 * (i - 1) for j in range(len(temps))], vals, width=0.27, label=m)
    axes[0].set_xticks(range(len(temps)), [f"T={t}" for t in temps])
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("throughput (prefill included)")
    axes[0].legend()
    cats = list(res["results"][temps[0]]["per_category"])
    for i, t in enumerate(temps):
        vals = [res["results"][t]["per_category"][c]["speedup"] or 0 for c in cats]
        axes[1].bar([j + 0.4 * (i - 0.5) for j in range(len(cats))], vals, width=0.4, label=f"T={t}")
    axes[1].axhline(1.0, color="gray", lw=0.8)
    axes[1].set_xticks(range(len(cats)), cats, rotation=35, ha="right")
    axes[1].set_ylabel("EAGLE / plain")
    axes[1].set_title("speedup per category")
    axes[1].legend()
    for t in temps:
        h = res["results"][t]["summary"]["eagle"]["accept_histogram"] or {}
        n = sum(h.values()) or 1
        tau = res["results"][t]["summary"]["eagle"]["tau"]
        axes[2].plot([int(k) for k in h], [v / n for v in h.values()], marker="o", label=f"T={t} (tau {_fmt(tau)})")
    axes[2].set_xlabel("tokens per cycle")
    axes[2].set_ylabel("fraction of cycles")
    axes[2].set_title("EAGLE acceptance")
    axes[2].legend()
    fig.suptitle(f"MT-bench speed: {res['config']['base']} on {res['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")  # the path may be a temporary name
    plt.close(fig)


def check_args(args) -> tuple[list[dict], str]:
    """Every argument checked before any model loads (ValueError, one line); returns the questions."""
    from eagle_runtime.loading import check_device

    if args.num_questions < 0:
        raise ValueError(f"--num-questions must be >= 0 (0 = all), got {args.num_questions}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    bad = [t for t in args.temperatures if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise ValueError(f"--temperatures must be finite and >= 0, got {bad}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0 (0 = torch's default), got {args.threads}")
    if args.max_len is not None and args.max_len <= 0:
        raise ValueError(f"--max-len must be a positive integer, got {args.max_len}")
    if not -(2**63) <= args.seed < 2**63 - 10**6:
        raise ValueError(f"--seed {args.seed} does not fit in a signed 64-bit integer (with the question ids added)")
    if args.base is not None and args.draft is None:
        raise ValueError("--base needs --draft (an EAGLE-1 head)")
    if args.device is not None:
        check_device(args.device)
    parse_tree(args.tree, args.base is None)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(f"--out {out}: not a writable directory ({e.strerror or e})") from None
    qpath = Path(args.questions) if args.questions else (DEFAULT_QUESTIONS if DEFAULT_QUESTIONS.is_file() else None)
    return load_questions(qpath, args.num_questions)


def result_name(res: dict, when: datetime | None = None) -> str:
    """``mtbench_<device>_<model>_<UTC time>``: one file per run, comparable across devices and models."""
    slug = lambda x: re.sub(r"[^A-Za-z0-9]+", "_", str(x)).strip("_").lower()[:60]  # noqa: E731
    base = res["config"]["base"]
    model = "demo" if base.startswith("eagle_runtime.demo") else Path(base.rstrip("/")).name
    stamp = (when or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    tp = res["config"].get("tensor_parallel", 1)
    return f"mtbench_{slug(res['device'])}_{slug(model)}{f'_tp{tp}' if tp > 1 else ''}_{stamp}"


def save_json(out: str | Path, stem: str, res: dict) -> Path:
    """``res`` as ``<out>/<stem>_<UTC time>.json``, written atomically (``out`` is created); prints and returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    atomic_write_json(path, res, indent=1)
    print(f"wrote {path}")
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="target: HF directory or hub id (default: the embedded demo pair)")
    p.add_argument("--draft", default=None, help="EAGLE-1 or EAGLE-3 head: directory or hub id (format auto-detected)")
    p.add_argument("--head", default="auto", choices=["auto", "eagle1", "eagle3"],
                   help="demo pair: which embedded head (auto: the faster one in BUILD.json, by tokens/s); "
                        "with --draft: the kind the head must be")
    p.add_argument("--questions", default=None, help="MT-bench jsonl (default: shared mt_bench.jsonl, else built-in)")
    p.add_argument("--num-questions", type=int, default=16, help="questions taken round-robin over categories (0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--tree", default="auto", help="auto (chosen per cycle by the measured cost model and the running "
                   "acceptance, plain decoding included), demo (the demo pair's tuned tree), dynamic, static, T,D,K")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "torch", "triton"])
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: the API's (bfloat16 on CUDA, float32 on CPU); the dtype used is printed")
    p.add_argument("--max-len", type=int, default=None, help="KV cache length (default: the model's context, <= 4096)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="replay decode steps as CUDA graphs (default: on where CUDA and the native extension allow)")
    # Every core by default: on a quiet 2-core machine 2 threads made prefill 1.5x and tree verification faster
    # for every method (demo pair: plain 166 -> 191, HF 141 -> 158 tok/s). On a machine busy with other jobs the
    # spinning second thread can make decoding several times slower (270 vs 19 ms/token once): pass --threads 1.
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads for every method (0 = torch's default: "
                   "one per core; prefill and tree verification use them, single-token steps barely)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.environ.get("EAGLE_RESULTS_DIR", "results"),
                   help="results folder (default: $EAGLE_RESULTS_DIR, else results/ under the current directory)")
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line, no usage block
    args = p.parse_args(argv)
    try:
        questions = check_args(args)
    except ValueError as e:
        p.error(str(e).splitlines()[0])

    try:
        res = run(args, questions)
    except USER_ERRORS as e:  # e.g. a model directory that does not exist or does not load
        p.error(str(e).splitlines()[0] if str(e) else type(e).__name__)
    main_rank = is_main_process()
    shutdown_distributed()
    if not main_rank:  # under torchrun every rank holds the same result; rank 0 reports it
        return res
    print(report(res))
    out = Path(args.out)
    name = result_name(res)
    json_path, png_path = out / f"{name}.json", out / f"{name}.png"
    atomic_write_json(json_path, res, indent=1)
    atomic_write(png_path, lambda t: plot(res, t))
    print(f"wrote {json_path.resolve()} and {png_path.name}")
    return res


if __name__ == "__main__":
    main()
