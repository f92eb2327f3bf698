"""The chat page (GET /) in a real headless Chromium, against the real server on the demo pair.

Debian's chromium package drives it through Playwright from PyPI (no `playwright install`: the browser it would
download cannot be fetched here). Without chromium, playwright, fastapi or uvicorn the module skips with the
reason. The page is one file, python/eagle_runtime/serve/chat.html. EAGLE_WRITE_SCREENSHOT=1 writes
docs/chat-page.png from the first test (off by default, so a test run leaves the tree clean).
EAGLE_CHAT_PAGE_URL=http://host:port runs the page tests against a server already running there instead of
starting one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
if CHROMIUM is None:
    pytest.skip("chromium not found (Debian: apt-get install chromium); the chat page test needs a real browser",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
# the server the page talks to runs on FastAPI and uvicorn (the serve extra); without them it cannot start
for _module in ("fastapi", "uvicorn"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} not installed (pip install -e \".[serve]\"); the chat page needs the server",
                    allow_module_level=True)

# Headless, and nothing that would reach for the network (the machine may have none) or for a GPU.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
START_TIMEOUT_S = 120  # a cold start on a loaded 2-core machine imports torch and loads the demo pair
NUMBER = re.compile(r"^\d+(\.\d+)?$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server_url():
    if os.environ.get("EAGLE_CHAT_PAGE_URL"):
        url = os.environ["EAGLE_CHAT_PAGE_URL"].rstrip("/")
        assert _healthy(url), f"EAGLE_CHAT_PAGE_URL={url}: GET /health did not answer 200"
        yield url
        return
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "python"), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    # The log goes to a file, not a pipe: nobody reads a pipe while the tests run, and a full one would block it.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "eagle_runtime", "serve", "--demo", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        log.seek(0)
        return log.read()[-3000:]

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):  # waiting for readiness, not an assertion: /health answers once the model is loaded
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode} before answering /health:\n{log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer /health within {START_TIMEOUT_S} s:\n{log_tail()}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server_url):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))  # an exception in the page's script fails the test
    pg.goto(server_url + "/")
    # the page asks GET /v1/models for the model id on load
    sync_api.expect(pg.locator("#model")).not_to_have_text(re.compile("loading"))
    yield pg
    context.close()
    assert not errors, f"script errors in the page: {errors}"


def _throttle(pg, bytes_per_s: int) -> None:
    """Slows what the browser receives (DevTools network emulation; -1 lifts it). The demo pair writes a whole
    answer in a fraction of a second, faster than anyone can see text grow or press Stop; throttled, the SSE
    events reach the page in bursts about 0.5 s apart (bytes_per_s / 2 bytes each), so growth and a Stop
    mid-stream are observable without timing luck."""
    cdp = pg.context.new_cdp_session(pg)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "downloadThroughput": bytes_per_s,
                                                  "uploadThroughput": -1})


# Records, at every change of #messages, the time, the last answer's length, the page state and the figures shown:
# what the page showed while the stream was still coming, checked after it ends.
RECORD = """() => {
    window.records = [];
    new MutationObserver(() => {
        const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
        window.records.push({t: performance.now(), len: m ? m.textContent.trim().length : 0,
                             state: document.body.dataset.state, tps: document.getElementById('tps').textContent,
                             tau: document.getElementById('tau').textContent});
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def _set_inputs(pg, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> None:
    pg.fill("#max_tokens", str(max_tokens))
    pg.fill("#temperature", str(temperature))
    pg.fill("#top_p", str(top_p))


def _send(pg, text: str) -> dict:
    """Types a message, clicks Send; returns the JSON body the page posted."""
    pg.fill("#input", text)
    with pg.expect_request(lambda r: r.url.endswith("/v1/chat/completions") and r.method == "POST") as req:
        pg.click("#send")
    return json.loads(req.value.post_data)


def _wait_state(pg, *states: str) -> str:
    """Waits until the page leaves `streaming` for one of `states` (body[data-state]); returns it."""
    pg.wait_for_function("states => states.includes(document.body.dataset.state)", arg=list(states))
    return pg.evaluate("document.body.dataset.state")


def _last_answer(pg):
    return pg.locator("#messages .msg.assistant").last


def _answer_text(pg) -> str:
    """The last answer's generated text, without its note (token count, stopped)."""
    return pg.evaluate("""() => {
        const m = [...document.querySelectorAll('#messages .msg.assistant')].pop();
        const c = m.cloneNode(true); c.querySelectorAll('.note').forEach(n => n.remove());
        return c.textContent; }""")


def test_streams_with_draft_highlighting_stats_and_turns(page):
    pg = page
    _set_inputs(pg, max_tokens=40)
    _throttle(pg, 2000)  # about 1 KB per burst: a 40-token answer with its piece lists spans several
    pg.evaluate(RECORD)
    body = _send(pg, "Tell me a story.")
    assert body["messages"] == [{"role": "user", "content": "Tell me a story."}]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["speculative"] is True and body["max_tokens"] == 40 and body["temperature"] == 0
    assert body["model"] and body["top_p"] == 1
    assert _wait_state(pg, "done", "error", "stopped") == "done", pg.text_content("#error")
    _throttle(pg, -1)

    # Streamed: text showed while the answer was still coming, and grew between network reads (bursts ~0.5 s
    # apart; a page that drew the answer only at the end, or all at once, shows one length at one time), with live
    # tokens/s and tau beside it.
    live = [r for r in pg.evaluate("window.records") if r["state"] == "streaming" and r["len"] > 0]
    assert live, "no text shown while the answer was streaming"
    assert live[-1]["len"] > live[0]["len"] and live[-1]["t"] - live[0]["t"] > 100, \
        f"the text did not grow while streaming: {[(round(r['t']), r['len']) for r in live]}"
    assert all(NUMBER.match(r["tps"]) and NUMBER.match(r["tau"]) for r in live), \
        f"no live tokens/s or tau while streaming: {[(r['tps'], r['tau']) for r in live]}"

    answer = _answer_text(pg)
    tps, tau = pg.text_content("#tps"), pg.text_content("#tau")
    assert NUMBER.match(tps) and float(tps) > 0, f"#tps shows {tps!r}"
    assert NUMBER.match(tau) and float(tau) >= 1.0, f"#tau shows {tau!r}"

    # Highlighting: the demo head guesses most tokens of a greedy story, so some text came from the draft; the
    # toggle takes the marks away and brings them back without touching the text.
    drafts = pg.locator("#messages .msg.assistant .draft")
    assert drafts.count() >= 1, "no draft-guessed text highlighted on a speculative answer"
    pg.uncheck("#highlight")
    sync_api.expect(drafts).to_have_count(0)
    assert _answer_text(pg) == answer
    pg.check("#highlight")
    assert drafts.count() >= 1 and _answer_text(pg) == answer

    # A second turn sends the whole conversation, the first answer included.
    body = _send(pg, "What happened next?")
    assert body["messages"] == [{"role": "user", "content": "Tell me a story."},
                                {"role": "assistant", "content": answer},
                                {"role": "user", "content": "What happened next?"}]
    assert _wait_state(pg, "done", "error", "stopped") == "done", pg.text_content("#error")
    sync_api.expect(pg.locator("#messages .msg.assistant")).to_have_count(2)

    # Regenerate resends the last user turn and replaces the last answer (its element and its turn).
    with pg.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        pg.click("#regenerate")
    assert json.loads(req.value.post_data)["messages"] == body["messages"]
    assert _wait_state(pg, "done", "error", "stopped") == "done", pg.text_content("#error")
    sync_api.expect(pg.locator("#messages .msg.assistant")).to_have_count(2)
    sync_api.expect(pg.locator("#messages .msg.user")).to_have_count(2)

    if os.environ.get("EAGLE_WRITE_SCREENSHOT") == "1":  # docs/chat-page.png: two turns, highlighting on
        pg.screenshot(path=str(ROOT / "docs" / "chat-page.png"))


def test_plain_decoding_has_no_draft_text_and_no_tau(page):
    pg = page
    _set_inputs(pg, max_tokens=40)
    pg.uncheck("#speculative")
    body = _send(pg, "Tell me a story.")
    assert body["speculative"] is False
    assert _wait_state(pg, "done", "error", "stopped") == "done", pg.text_content("#error")
    assert _answer_text(pg).strip(), "plain decoding streamed no text"
    assert pg.locator("#messages .draft").count() == 0  # no draft ran, so nothing can be marked as guessed
    tps = pg.text_content("#tps")
    assert NUMBER.match(tps) and float(tps) > 0, f"#tps shows {tps!r}"
    assert pg.text_content("#tau") == "-"  # tau has no meaning without a draft


def test_stop_aborts_mid_stream_and_keeps_the_partial_answer(page):
    pg = page
    _set_inputs(pg, max_tokens=300, temperature=1.0)  # far more than arrives before Stop at the throttled rate
    _throttle(pg, 2000)
    _send(pg, "Tell me a long story.")
    pg.wait_for_function("() => document.querySelector('#messages .msg.assistant').textContent.trim().length > 0")
    assert not pg.is_disabled("#stop") and pg.is_disabled("#send")
    pg.click("#stop")
    assert _wait_state(pg, "done", "error", "stopped") == "stopped"
    stopped = _answer_text(pg)
    assert stopped.strip()
    sync_api.expect(_last_answer(pg).locator(".note")).to_have_text("stopped")
    assert pg.is_disabled("#stop") and not pg.is_enabled("#stop")
    assert pg.is_enabled("#send") and pg.is_enabled("#regenerate")

    # The aborted stream delivers nothing more: after a whole further turn the stopped answer is as it was. The
    # partial answer is part of the conversation the next turn sends.
    _set_inputs(pg, max_tokens=10)
    body = _send(pg, "And then?")
    assert body["messages"][1] == {"role": "assistant", "content": stopped}
    assert _wait_state(pg, "done", "error", "stopped") == "done", pg.text_content("#error")
    first = pg.evaluate("""() => { const c = document.querySelector('#messages .msg.assistant').cloneNode(true);
                                   c.querySelectorAll('.note').forEach(n => n.remove()); return c.textContent; }""")
    assert first == stopped


def test_an_error_response_shows_its_message(page):
    """The page shows the message of an OpenAI-style error body: first one made in the browser (route), a 429
    that the server would give only under load, then the server's own 400."""
    pg = page
    error = {"error": {"message": "too many requests in flight, retry later", "type": "rate_limit_error",
                       "param": None, "code": None}}
    pg.route("**/v1/chat/completions", lambda route: route.fulfill(status=429, content_type="application/json",
                                                                   body=json.dumps(error)))
    _send(pg, "Hello")
    assert _wait_state(pg, "done", "error", "stopped") == "error"
    sync_api.expect(pg.locator("#error")).to_have_text(error["error"]["message"])
    sync_api.expect(_last_answer(pg)).to_contain_text(error["error"]["message"])
    assert pg.is_enabled("#send") and pg.is_enabled("#regenerate")

    # Regenerate after the error resends the user turn alone and, answered this time, replaces the failed answer.
    pg.unroute("**/v1/chat/completions")
    _set_inputs(pg, max_tokens=10)
    with pg.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        pg.click("#regenerate")
    assert json.loads(req.value.post_data)["messages"] == [{"role": "user", "content": "Hello"}]
    assert _wait_state(pg, "done", "error", "stopped") == "done", pg.text_content("#error")
    sync_api.expect(pg.locator("#messages .msg.assistant")).to_have_count(1)
    sync_api.expect(pg.locator("#error")).to_be_empty()

    # The server's own refusal (HTTP 400: top_p must lie in (0, 1]) shows the same way.
    _set_inputs(pg, max_tokens=10, top_p=0)
    _send(pg, "Hello again")
    assert _wait_state(pg, "done", "error", "stopped") == "error"
    sync_api.expect(pg.locator("#error")).to_contain_text("top_p")
