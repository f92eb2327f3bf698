"""An OpenAI-compatible HTTP server over the continuous-batching :class:`~eagle_runtime.serve.batcher.Scheduler`.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both stream as Server-Sent Events in OpenAI's
chunk format with ``"stream": true``), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text),
``GET /`` (the chat page). Request fields beyond OpenAI's: ``top_k``, ``speculative`` (false: plain decoding
for this request) and ``ignore_eos`` (decode to ``max_tokens``, as vLLM's benchmarks do). Each chunk carries an ``eagle`` object: the text's runs by origin (``pieces``: accepted
draft tokens or the target's own) and the step's token counts; the usage chunk adds tau and tokens/s.

Bad input is HTTP 400 with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``, a full queue
429; no request sees a traceback. Example::

    app = create_app(EagleModel.from_pretrained(base, draft, tree="dynamic"), model_name="demo")
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import threading
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ..chat import chat_prompt
from ..checks import INT64_MAX, INT64_MIN
from ..tree import step_room
from .batcher import QueueFull, Request, Scheduler

DEFAULT_MAX_TOKENS = 256  # when a request gives none (OpenAI's own default is "what fits"; 256 bounds a row's time)
MAX_STOP = 4  # OpenAI's limit on stop strings


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


def error_response(message: str, status: int = 400, param=None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status)


# ------------------------------------------------------------------------------------------------------- metrics
class Metrics:
    """Counters for ``/metrics`` (Prometheus text format 0.0.4, written by hand: a dozen series need no
    dependency). Updated from the scheduler thread and the request handlers, under one lock."""

    def __init__(self, max_depth: int):
        self.lock = threading.Lock()
        self.requests = {"ok": 0, "error": 0, "rejected": 0, "cancelled": 0}
        self.prompt_tokens = self.completion_tokens = 0
        self.steps = {"eagle": 0, "plain": 0}  # row-steps: one row in one target pass
        self.step_tokens = {"eagle": 0, "plain": 0}
        self.accepted_at_depth = [0] * (max_depth + 1)  # rows whose cycle accepted at least d drafts
        self.recent: list[tuple[float, int]] = []  # (time, tokens) of the last steps, for tokens/s
        self.queue = self.active = 0

    def on_step(self, speculative: bool, rows: list[tuple[int, int]]) -> None:
        """One step's ``(tokens emitted, drafts accepted)`` per busy row."""
        mode = "eagle" if speculative else "plain"
        now = time.perf_counter()
        with self.lock:
            for emitted, accepted in rows:
                self.steps[mode] += 1
                self.step_tokens[mode] += emitted
                for d in range(1, min(accepted, len(self.accepted_at_depth) - 1) + 1):
                    self.accepted_at_depth[d] += 1
            self.recent.append((now, sum(r[0] for r in rows)))
            self.recent = [x for x in self.recent if now - x[0] <= 10.0]

    def tokens_per_s(self) -> float:
        now = time.perf_counter()
        pts = [x for x in self.recent if now - x[0] <= 10.0]
        if len(pts) < 2:
            return 0.0
        span = now - pts[0][0]
        return sum(n for _, n in pts[1:]) / span if span > 0 else 0.0

    def text(self) -> str:
        with self.lock:
            out = []

            def series(name, kind, help_, values):
                out.append(f"# HELP {name} {help_}")
                out.append(f"# TYPE {name} {kind}")
                for labels, v in values:
                    out.append(f"{name}{labels} {v}")

            series("eagle_requests_total", "counter", "Requests by outcome.",
                   [(f'{{status="{k}"}}', v) for k, v in self.requests.items()])
            series("eagle_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
                   [("", self.prompt_tokens)])
            series("eagle_completion_tokens_total", "counter", "Tokens emitted to clients.",
                   [("", self.completion_tokens)])
            series("eagle_row_steps_total", "counter", "Rows decoded per target pass, by mode.",
                   [(f'{{mode="{k}"}}', v) for k, v in self.steps.items()])
            series("eagle_step_tokens_total", "counter", "Tokens gained in decode steps, by mode.",
                   [(f'{{mode="{k}"}}', v) for k, v in self.step_tokens.items()])
            cyc = self.steps["eagle"]
            tau = self.step_tokens["eagle"] / cyc if cyc else float("nan")
            series("eagle_tau", "gauge", "Mean tokens gained per target pass in EAGLE cycles.", [("", _num(tau))])
            series("eagle_acceptance_by_depth", "gauge",
                   "Fraction of EAGLE cycles that accepted at least depth draft tokens.",
                   [(f'{{depth="{d}"}}', _num(self.accepted_at_depth[d] / cyc if cyc else float("nan")))
                    for d in range(1, len(self.accepted_at_depth))])
            series("eagle_tokens_per_second", "gauge", "Tokens emitted per second over the last 10 s.",
                   [("", round(self.tokens_per_s(), 3))])
            series("eagle_queue_length", "gauge", "Requests waiting for a row.", [("", self.queue)])
            series("eagle_active_rows", "gauge", "Rows decoding now.", [("", self.active)])
        return "\n".join(out) + "\n"


def _num(x: float) -> str:
    return "NaN" if math.isnan(x) else repr(round(x, 6))


# ---------------------------------------------------------------------------------------------------- validation
def _get(body: dict, name: str, kind, default, check=None, what: str = ""):
    v = body.get(name, default)
    if v is None:
        v = default
    ok = isinstance(v, kind) and (kind is bool or not isinstance(v, bool))  # JSON true is no number here
    if not ok or (check is not None and not check(v)):
        raise BadRequest(f"'{name}' must be {what}, got {json.dumps(v)[:60]}", name)
    return v


def parse_settings(body: dict, has_head: bool) -> dict:
    """The generation settings of a request body, checked; a bad one is :class:`BadRequest` naming the field."""
    num = (int, float)
    s = {
        "temperature": float(_get(body, "temperature", num, 1.0, lambda v: math.isfinite(v) and v >= 0,
                                  "a number >= 0")),
        "top_p": float(_get(body, "top_p", num, 1.0, lambda v: 0 < v <= 1, "a number in (0, 1]")),
        "top_k": _get(body, "top_k", int, 0, lambda v: 0 <= v <= INT64_MAX, "an integer >= 0 (0: off)"),
        "seed": _get(body, "seed", int, 0, lambda v: INT64_MIN <= v <= INT64_MAX, "a 64-bit integer"),
        "speculative": _get(body, "speculative", bool, has_head, None, "true or false"),
        "stream": _get(body, "stream", bool, False, None, "true or false"),
        "ignore_eos": _get(body, "ignore_eos", bool, False, None, "true or false"),
    }
    mt = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, numbers.Integral) or mt < 1):
        raise BadRequest(f"'{name}' must be an integer >= 1, got {json.dumps(mt)[:60]}", name)
    s["max_tokens"] = mt
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest("'n' must be 1: one choice per request", "n")
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > MAX_STOP or any(not isinstance(x, str) or not x for x in stop):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    s["stop"] = stop
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    s["include_usage"] = bool(opts.get("include_usage", False))
    if s["speculative"] and not has_head:
        raise BadRequest("'speculative' needs a draft head; this server was started without --draft", "speculative")
    return s


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{i}] must have a role of system, user or assistant", f"messages[{i}].role")
        c = m.get("content")
        if isinstance(c, list):  # OpenAI's content parts: text only here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                raise BadRequest(f"messages[{i}].content parts must be text parts", f"messages[{i}].content")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        out.append({"role": m["role"], "content": c})
    if not any(m["content"].strip() for m in out):
        raise BadRequest("'messages' are all empty: give some text", "messages")
    return out


# ------------------------------------------------------------------------------------------------------ the app
def create_app(model, tree=None, model_name: str = "eagle", max_batch: int = 8, max_queue: int = 64,
               scheduler_thread: bool = True) -> FastAPI:
    """The server's FastAPI app over ``model`` (an :class:`~eagle_runtime.generate.EagleModel`); ``tree``: the
    fixed tree of speculative rows (default: the model's, or the dynamic tree when the model's is ``"auto"``,
    whose per-call choice does not apply to a batch that requests join and leave). With ``scheduler_thread``
    the app's startup runs the decode loop in a thread; without, the caller runs ``app.state.scheduler.run()``
    (the command line does, on the main thread)."""
    from ..adaptive import AutoTree, make_tree

    if tree is None:
        tree = model.tree if not isinstance(model.tree, AutoTree) else make_tree("dynamic")
    metrics = Metrics(tree.max_depth)
    state: dict = {}
    tok = model.tokenizer

    sched = Scheduler(model, tree, max_batch, max_queue, on_step=metrics.on_step)
    state["scheduler"] = sched

    @asynccontextmanager
    async def lifespan(app):
        if scheduler_thread:
            sched.start()
        yield
        sched.close(timeout=30)

    app = FastAPI(title="eagle_runtime", lifespan=lifespan)

    def room(n_prompt: int, speculative: bool) -> int:  # new tokens that fit: as EagleModel.cache_len_needed
        return model.target.max_len - n_prompt - step_room(tree, speculative) - 1

    def encode_text(text: str, add_special: bool) -> list[int]:
        if tok is None:
            raise BadRequest("this model has no tokenizer: send 'prompt' as a list of token ids", "prompt")
        try:
            ids = tok(text, add_special_tokens=add_special)["input_ids"]
        except Exception as e:  # a tokenizer refusing its input (lone surrogates) is the request's fault
            raise BadRequest(f"the prompt cannot be tokenized: {str(e).splitlines()[0][:120]}", "prompt") from None
        if not ids:
            raise BadRequest("the prompt is empty", "prompt")
        return ids

    async def read_body(request: HTTPRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        m = body.get("model")
        if m is not None and m != model_name:
            raise BadRequest(f"unknown model {json.dumps(m)[:60]}; this server serves '{model_name}'", "model")
        return body

    def make_request(ids: list[int], s: dict, stop: list[str], deliver) -> Request:
        left = room(len(ids), s["speculative"])
        if left < 1:
            raise BadRequest(f"the prompt ({len(ids)} tokens) leaves no room in the cache of "
                             f"{model.target.max_len} positions", "messages")
        mt = s["max_tokens"]
        if mt is None:
            mt = min(DEFAULT_MAX_TOKENS, left)
        elif mt > left:
            raise BadRequest(f"max_tokens {mt} is past the cache: the prompt ({len(ids)} tokens) leaves room for "
                             f"{left}", "max_tokens")
        return Request(ids, mt, deliver, s["temperature"], s["top_p"], s["top_k"], s["seed"], s["speculative"],
                       stop, s["ignore_eos"])

    async def run(request: HTTPRequest, ids, s, stop, chat: bool):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = make_request(ids, s, stop, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        sched: Scheduler = state["scheduler"]
        try:
            sched.submit(req)
        except QueueFull as e:
            with metrics.lock:
                metrics.requests["rejected"] += 1
            raise BadRequest(str(e), status=429, kind="rate_limit_error") from None
        with metrics.lock:
            metrics.prompt_tokens += len(ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if s["stream"]:
            gen = sse(req, q, rid, s, chat)
            return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await whole(request, req, q, rid, s, chat)

    def usage(req: Request) -> dict:
        n = len(req.stream.tokens)
        return {"prompt_tokens": len(req.ids), "completion_tokens": n, "total_tokens": len(req.ids) + n}

    def stats(req: Request) -> dict:
        n = len(req.stream.tokens)
        wall = time.perf_counter() - req.t_submit
        gained = n - 1  # the prefill's token is no step's
        tau = gained / req.steps if (req.speculative and req.steps) else None
        return {"tau": tau, "tokens_per_s": n / wall if wall > 0 else 0.0, "steps": req.steps,
                "speculative": req.speculative}

    def finished(req: Request, ok: bool) -> None:
        with metrics.lock:
            metrics.requests["ok" if ok else ("cancelled" if req.cancelled else "error")] += 1
            metrics.completion_tokens += len(req.stream.tokens)

    def chunk(rid, chat, text, finish, ev=None) -> dict:
        if chat:
            delta = {"content": text} if text or finish is None else {}
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        c = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": [choice]}
        if ev is not None:
            c["eagle"] = {"pieces": [list(p) for p in ev.pieces], "tokens": len(ev.tokens),
                          "draft_tokens": ev.draft_tokens}
        return c

    async def sse(req: Request, q: asyncio.Queue, rid, s, chat):
        def line(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        done_ok = False
        try:
            if chat:
                first = chunk(rid, chat, "", None)
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield line(first)
            while True:
                ev = await q.get()
                if ev.finish_reason == "error":
                    yield line({"error": {"message": "the decoder failed; see the server log", "type": "server_error",
                                          "param": None, "code": None}})
                    return
                if ev.text or ev.finish_reason is None:
                    yield line(chunk(rid, chat, ev.text, None, ev))
                if ev.finish_reason is not None:
                    yield line(chunk(rid, chat, "", ev.finish_reason))
                    if s["include_usage"]:
                        u = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                             "created": int(time.time()), "model": model_name, "choices": [], "usage": usage(req),
                             "eagle": stats(req)}
                        yield line(u)
                    yield "data: [DONE]\n\n"
                    done_ok = True
                    return
        finally:  # a client that went away: its row is freed at the next step boundary
            if not done_ok:
                req.cancelled = True
            finished(req, done_ok)

    async def whole(request, req: Request, q: asyncio.Queue, rid, s, chat):
        text, ev = [], None
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancelled = True
                        finished(req, False)
                        return error_response("client went away", 499)
                    continue
                text.append(ev.text)
                if ev.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            req.cancelled = True
            finished(req, False)
            raise
        if ev.finish_reason == "error":
            finished(req, False)
            return error_response("the decoder failed; see the server log", 500, kind="server_error")
        finished(req, True)
        out = "".join(text)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out}, "finish_reason": ev.finish_reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": out, "finish_reason": ev.finish_reason, "logprobs": None}
            obj = "text_completion"
        return JSONResponse({"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
                             "choices": [choice], "usage": usage(req), "eagle": stats(req)})

    @app.exception_handler(BadRequest)
    async def bad_request(request, e: BadRequest):
        if e.status == 400:
            with metrics.lock:
                metrics.requests["error"] += 1
        return error_response(e.message, e.status, e.param, e.kind)

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        return error_response(f"internal error: {type(e).__name__}", 500, kind="server_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request)
        s = parse_settings(body, model.head is not None)
        msgs = parse_messages(body)
        if tok is None:
            raise BadRequest("this model has no tokenizer, so no chat: use /v1/completions with token ids")
        text, add_special, fmt_stop = chat_prompt(tok, msgs)
        ids = encode_text(text, add_special)
        return await run(request, ids, s, s["stop"] + fmt_stop, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request)
        s = parse_settings(body, model.head is not None)
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if not p:
                raise BadRequest("'prompt' is empty", "prompt")
            ids = encode_text(p, True)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            V = model.target.cfg.vocab_size
            if min(p) < 0 or max(p) >= V:
                raise BadRequest(f"prompt token ids must lie in [0, {V})", "prompt")
            ids = list(p)
        else:
            raise BadRequest("'prompt' must be a non-empty string or a list of token ids (one prompt)", "prompt")
        return await run(request, ids, s, s["stop"], chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "eagle_runtime", "max_model_len": model.target.max_len,
                                            "eagle": {"tree": repr(tree), "max_batch": max_batch,
                                                      "draft_head": model.head is not None}}]}

    @app.get("/health")
    async def health():
        sched = state.get("scheduler")
        if sched is None or sched.error is not None:
            return JSONResponse({"status": "error"}, status_code=503)
        return {"status": "ok", "active": sched.active, "queued": sched.queued}

    @app.get("/metrics")
    async def prom():
        sched = state["scheduler"]
        metrics.queue, metrics.active = sched.queued, sched.active
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page():
        try:
            html = resources.files("eagle_runtime.serve").joinpath("chat.html").read_text(encoding="utf-8")
        except FileNotFoundError:
            return error_response("the chat page is not installed", 404, kind="not_found_error")
        return HTMLResponse(html)

    app.state.metrics, app.state.sched, app.state.scheduler = metrics, state, sched
    return app


__all__ = ["BadRequest", "Metrics", "create_app", "parse_messages", "parse_settings"]
