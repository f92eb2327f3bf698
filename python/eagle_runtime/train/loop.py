"""The training loop both head trainers share, and its saves.

AdamW with warm-up and cosine decay (following wall time under ``--max-minutes``, see :func:`lr_factor`),
gradient clipping, held-out evaluation, saves of the published head files, ``train_config.json`` and
``train_state.pt`` (for ``--resume``; a save's one commit point, see :func:`_save`), and SIGINT/SIGTERM stopping at
a step boundary with a save.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import atomic_write, atomic_write_text, file_sha256, remove_orphans
from ..draft import save_head
from ..loading import CheckpointError
from .common import TrainConfig


def fit(head, target, train_rows, hold_rows, out, cfg: TrainConfig, loss_fn, eval_fn, *, resume: bool, progress: bool,
        desc: str, target_fn) -> dict:
    """The training loop both trainers share: AdamW (betas 0.9/0.95) with :func:`lr_factor`, gradient clipping,
    held-out evaluation every ``cfg.eval_every`` steps and after the last, atomic saves every ``cfg.save_every``
    steps and at the end, the ``--max-minutes`` cap, ``resume`` from ``out/train_state.pt`` (weights only), and
    SIGINT/SIGTERM (main thread) stopping at the next step boundary with a save.

    ``loss_fn(tokens [B, T], mask [B, T], given) -> (loss, {name: float})`` (the dict has ``acc``) trains one batch;
    ``given`` is None (the loss runs the target itself) or, under ``cfg.cache_target``, the batch rows' slices of
    ``target_fn(tokens) -> tuple of [B, T, ..] tensors`` computed for every training row before the first step;
    ``eval_fn(tokens, mask) -> {"eval_loss", "eval_acc"}`` scores the held-out rows (it may leave ``head`` in eval
    mode). Returns ``{"history", "out", "steps", "interrupted" (the signal's name or None), "time_s"}``."""
    out = Path(out)
    dev = target.embed_tokens.weight.device
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    step, history = 0, []
    if resume:
        step, history = _load_state(out / "train_state.pt", head, opt, dev)
    else:
        _remove_orphans(out)
    (train_t, train_m), (hold_t, hold_m) = train_rows, hold_rows
    gen = torch.Generator().manual_seed(cfg.seed + step)
    t_start = time.time()
    cached = cache_target_outputs(target_fn, train_t, cfg.batch_size, dev, progress) if cfg.cache_target else None
    # Under --max-minutes the bar shows the share of the run done (the larger of steps and wall time, as the
    # schedule counts it), not the step count against a --steps the cap will never reach.
    capped = cfg.max_minutes is not None
    bar = tqdm(total=100 if capped else cfg.steps, initial=0 if capped else step, disable=not progress,
               desc=f"{desc} ({cfg.max_minutes:g} min budget)" if capped else desc, dynamic_ncols=True,
               unit="%" if capped else "it", bar_format="{l_bar}{bar}| {n:.0f}/100% [{elapsed}<{remaining}{postfix}]"
               if capped else None)
    head.train()
    stop: list[str] = []
    with _stop_on_signals(stop):
        while step < cfg.steps and not stop:
            if cfg.max_minutes is not None and time.time() - t_start > 60 * cfg.max_minutes:
                bar.write(f"stopping at step {step}: --max-minutes {cfg.max_minutes} reached")
                bar.update(100 - bar.n)  # the budget is spent: the run is done
                if history and "eval_loss" not in history[-1]:  # the saved head gets its held-out score
                    history[-1].update(eval_fn(hold_t, hold_m))
                break
            idx = torch.randint(0, train_t.shape[0], (cfg.batch_size,), generator=gen)
            elapsed = (time.time() - t_start) / (60 * cfg.max_minutes) if cfg.max_minutes is not None else 0.0
            for g in opt.param_groups:
                g["lr"] = cfg.lr * lr_factor(step, cfg, elapsed)
            given = None if cached is None else tuple(c[idx].to(dev) for c in cached)
            loss, metrics = loss_fn(train_t[idx].to(dev), train_m[idx].to(dev), given)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            if capped:
                bar.update(min(100.0, 100 * max(step / cfg.steps, elapsed)) - bar.n)  # as lr_factor counts it
            else:
                bar.update(1)
            bar.set_postfix(step=step, loss=f"{loss.item():.4f}", acc=f"{metrics['acc']:.3f}")
            rec = {"step": step, "loss": loss.item(), **metrics, "time_s": time.time() - t_start}
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
                rec.update(eval_fn(hold_t, hold_m))
                bar.write(f"step {step}: held-out loss {rec['eval_loss']:.4f} top-1 {rec['eval_acc']:.3f}")
                head.train()
            history.append(rec)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                _save(head, opt, step, history, out, cfg)
    bar.close()
    head.eval()
    _save(head, opt, step, history, out, cfg)
    if stop:
        print(f"{stop[0]}: stopped at step {step}, saved to {out} (continue with --resume)", file=sys.stderr)
    return {"history": history, "out": str(out), "steps": step, "interrupted": stop[0] if stop else None,
            "time_s": time.time() - t_start}


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cache_target_outputs(target_fn, tokens: torch.Tensor, batch_size: int, dev, progress: bool) -> tuple:
    """``--cache-target``: ``target_fn`` over every row of ``tokens [N, T]`` once, in batches, kept in CPU memory
    (``[N, T, ..]`` per output, the target's dtype). Refused in one line, before the rows are run, when the outputs
    would take more than 80% of the memory available."""
    n = tokens.shape[0]
    first = target_fn(tokens[:batch_size].to(dev))
    need = sum(o[0].numel() * o.element_size() for o in first) * n
    avail = _available_memory()
    if avail is not None and need > 0.8 * avail:
        raise ValueError(f"--cache-target: the target's outputs for {n} training rows need {need / 2**30:.2f} GiB, "
                         f"more than 80% of the {avail / 2**30:.2f} GiB available; train without it (one target "
                         "forward per step) or on a smaller corpus")
    cached = tuple(torch.empty((n, *o.shape[1:]), dtype=o.dtype) for o in first)
    for c, o in zip(cached, first):
        c[: o.shape[0]] = o.cpu()
    bar = tqdm(range(batch_size, n, batch_size), disable=not progress, desc=f"target outputs ({need / 2**20:.0f} MiB)",
               dynamic_ncols=True, initial=1, total=math.ceil(n / batch_size))
    for s in bar:
        for c, o in zip(cached, target_fn(tokens[s : s + batch_size].to(dev))):
            c[s : s + o.shape[0]] = o.cpu()
    return cached


def lr_factor(step: int, cfg: TrainConfig, time_fraction: float = 0.0) -> float:
    """Linear warm-up over ``cfg.warmup`` steps (none when 0), then cosine decay to 0 at ``cfg.steps`` or, under
    ``--max-minutes``, at the end of the wall-clock budget if that comes first (``time_fraction``: the share of
    the budget used), so a run stopped by the cap has completed its schedule."""
    warm = 1.0 if cfg.warmup == 0 else min(1.0, (step + 1) / cfg.warmup)
    return warm * 0.5 * (1 + math.cos(math.pi * min(max(step / cfg.steps, time_fraction), 1.0)))


# What a save writes into ``out``: the published files (what a user reads), then the resume state, the commit.
PUBLISHED = ("config.json", "pytorch_model.bin", "train_config.json")
STATE = "train_state.pt"


def _sha256(path: Path) -> str | None:
    try:
        return file_sha256(path)
    except FileNotFoundError:  # a published file a kill removed: it differs from any record
        return None


def _remove_orphans(out: Path) -> None:
    for name in (*PUBLISHED, STATE):
        remove_orphans(out / name)


def _publish(head, out: Path, summary: dict) -> dict[str, str]:
    """The published head files and ``train_config.json`` (each atomically); returns their sha256s."""
    save_head(head, out)  # creates ``out``; the trainers always write the .bin layout (PUBLISHED)
    atomic_write_text(out / "train_config.json", json.dumps(summary, indent=2))
    return {name: _sha256(out / name) for name in PUBLISHED}


def _load_state(state_path: Path, head, opt, dev) -> tuple[int, list]:
    """Restore a ``train_state.pt`` written by :func:`_save` (tensors and plain values only: ``weights_only``
    loading never runs code from the file) into ``head`` and ``opt``; returns ``(step, history)``.

    The state is the last committed save. A kill after the published files of a later save were written but before
    its state was leaves them a save ahead: files whose sha256 differs from the state's record are written again
    from the state, so the directory holds one step's set again. Temporary files of killed writes are removed."""
    out = state_path.parent
    _remove_orphans(out)
    if not state_path.is_file():
        raise FileNotFoundError(f"--resume: no {state_path}")
    try:
        st = torch.load(state_path, map_location=dev, weights_only=True)
        head.load_state_dict(st["head"])
        opt.load_state_dict(st["opt"])
        step, history = int(st["step"]), list(st["history"])
        published, summary = st.get("published"), st.get("summary")
    except Exception as e:  # unpickling refusals, truncation and foreign files raise many types
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"--resume: cannot restore {state_path} ({type(e).__name__}: "
                              f"{lines[0][:200] if lines else ''})") from None
    # A state from before the record was kept (no "published") has nothing to check the files against.
    if isinstance(published, dict) and isinstance(summary, dict):
        if any(_sha256(out / name) != published.get(name) for name in PUBLISHED):
            _publish(head, out, summary)
    return step, history


def _save(head, opt, step, history, out: Path, cfg: TrainConfig) -> None:
    """One save, with one commit point: the published files (head config and weights, ``train_config.json``) are
    written first, then ``train_state.pt``, which holds everything ``--resume`` needs (head weights included) and
    the sha256 of each published file. A kill before the state's rename leaves the previous state, the last
    consistent save, and :func:`_load_state` rewrites published files that do not match it; a kill after it leaves
    the new save whole. Each file is written atomically, so none is ever partial."""
    summary = {"train": asdict(cfg), "steps_done": step, "last": history[-1] if history else None}
    published = _publish(head, out, summary)
    state = {"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
             "summary": summary, "published": published}
    atomic_write(out / STATE, lambda p: torch.save(state, p))


@contextlib.contextmanager
def _stop_on_signals(stop: list):
    """While active, SIGINT and SIGTERM append their name to ``stop`` (the loop then saves and returns) instead of
    killing the process mid-write. Only the main thread can install handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGINT, signal.SIGTERM]
    old = {s: signal.getsignal(s) for s in sigs}

    def handler(signum, frame):
        stop.append(signal.Signals(signum).name)

    for s in sigs:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s in sigs:
            signal.signal(s, old[s])
