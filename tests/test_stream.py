"""Streaming (``EagleModel.stream``, ``generate(stop=, streamer=)``) and :class:`TextStream`'s cuts, on the demo
pair (float32, CPU ops). The stream must be ``generate``'s output split per step, and a stop string, EOS or the
token budget anywhere inside an accepted block must end the output exactly there."""

from __future__ import annotations

import threading

import pytest
import torch

from eagle_runtime import EagleModel
from eagle_runtime.demo import demo_paths
from eagle_runtime.stream import TextStream

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def model():
    base, head = demo_paths()
    return EagleModel.from_pretrained(base, head, tree="dynamic", backend="cpu")


def _joined(events):
    events = list(events)
    return "".join(e.text for e in events), [t for e in events for t in e.tokens]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_is_generate_split_per_step(model, temperature):
    res = model.generate(PROMPT, 40, temperature=temperature, seed=11)
    events = list(model.stream(PROMPT, 40, temperature=temperature, seed=11))
    text, tokens = _joined(events)
    assert tokens == res.tokens[0] and text == res.text[0]
    assert events[-1].finish_reason == res.finish_reasons[0]
    assert all(e.finish_reason is None for e in events[:-1])
    # a speculative stream: some step emitted several tokens, drafted ones among them, never more than it emitted
    assert max(len(e.tokens) for e in events) > 1
    assert all(0 <= e.draft_tokens <= max(len(e.tokens) - 1, 0) or e.finish_reason for e in events)
    assert all("".join(p for p, _ in e.pieces) == e.text for e in events)
    if temperature == 0:
        plain = model.generate(PROMPT, 40, speculative=False)
        assert tokens == plain.tokens[0]


def test_stream_plain_and_auto_tree_match_generate():
    base, head = demo_paths()
    auto = EagleModel.from_pretrained(base, head, backend="cpu")  # tree="auto": the loop that picks per stretch
    res = auto.generate(PROMPT, 24)
    assert _joined(auto.stream(PROMPT, 24))[1] == res.tokens[0]
    plain = list(auto.stream(PROMPT, 24, speculative=False))
    assert all(e.draft_tokens == 0 and len(e.tokens) <= 1 for e in plain)
    assert _joined(plain)[1] == res.tokens[0]


def _reference_cut(tok, prompt_ids, tokens, text, stop):
    """What a stop must leave: the text before its first occurrence, and the tokens up to the one whose text
    completes it (each token's text end from decoding the prefix, as a reader would)."""
    k = text.find(stop)
    assert k >= 0
    for j in range(len(tokens)):
        ts = TextStream(tok, prompt_ids, 10**6)
        ts.add(tokens[: j + 1])
        if len(ts.text) >= k + len(stop) and ts.text[k:].startswith(stop):
            return text[:k], tokens[: j + 1]
    raise AssertionError("stop not completed")


def test_a_stop_at_every_offset_of_a_block(model):
    """Stop strings starting at every character of the first long accepted block: the output ends just before
    the stop, its tokens end at the token that completed it, and usage (the events' tokens) equals them."""
    full = model.generate(PROMPT, 40)
    tokens, text = full.tokens[0], full.text[0]
    events = list(model.stream(PROMPT, 40))
    # the character span of the first step that emitted >= 4 tokens
    ends, n = [], 0
    for e in events:
        n += len(e.tokens)
        ends.append(n)
    i = next(k for k, e in enumerate(events) if len(e.tokens) >= 4)
    ids = model.encode(PROMPT)[0]
    lo = len(model.tokenizer.decode(ids + tokens[: ends[i] - len(events[i].tokens)], skip_special_tokens=True)) \
        - len(model.tokenizer.decode(ids, skip_special_tokens=True))
    hi = len(model.tokenizer.decode(ids + tokens[: ends[i]], skip_special_tokens=True)) \
        - len(model.tokenizer.decode(ids, skip_special_tokens=True))
    assert hi - lo >= 8, "the block should span several words"
    checked = 0
    for k in range(lo, hi):
        stop = text[k : k + 3]
        if not stop.strip():
            continue
        want_text, want_tokens = _reference_cut(model.tokenizer, ids, tokens, text, stop)
        evs = list(model.stream(PROMPT, 40, stop=[stop]))
        got_text, got_tokens = _joined(evs)
        assert (got_text, got_tokens) == (want_text, want_tokens), stop
        assert evs[-1].finish_reason == "stop" and stop not in got_text
        res = model.generate(PROMPT, 40, stop=stop)
        assert (res.text[0], res.tokens[0], res.finish_reasons) == (want_text, want_tokens, ["stop"])
        checked += 1
    assert checked >= 8


def test_eos_and_budget_inside_a_block(model):
    long = model.generate(PROMPT, 200)
    eos = model.target.cfg.eos_token_id
    assert long.tokens[0][-1] in eos and long.finish_reasons == ["stop"], "the demo story ends with EOS"
    evs = list(model.stream(PROMPT, 200))
    assert _joined(evs)[1] == long.tokens[0] and evs[-1].finish_reason == "stop"
    n = len(long.tokens[0])
    for budget in range(1, min(n, 24)):
        evs = list(model.stream(PROMPT, budget))
        got = _joined(evs)[1]
        assert got == long.tokens[0][:budget] and evs[-1].finish_reason == "length", budget
        assert model.generate(PROMPT, budget).tokens[0] == got


def test_transformers_streamers(model):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(model.tokenizer, skip_prompt=True, skip_special_tokens=True)
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("res", model.generate(PROMPT, 30, streamer=streamer)))
    th.start()
    pieces = list(streamer)  # blocks until generate calls end()
    th.join()
    res = box["res"]
    assert "".join(pieces) == model.tokenizer.decode(res.tokens[0], skip_special_tokens=True)
    with pytest.raises(ValueError, match="one prompt"):
        model.generate([PROMPT, PROMPT], 4, streamer=streamer)


def test_text_is_never_half_a_character(model):
    """Byte-fallback tokens of one character arrive one step each: no event holds U+FFFD, and the joined text
    is the decoded whole."""
    tok = model.tokenizer
    ids = tok("a café € ok", add_special_tokens=False)["input_ids"]
    euro = [tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "€".encode()]
    seq = ids[:4] + euro + ids[-2:]
    ts = TextStream(tok, [1], 100)
    texts = [ts.add([t]).text for t in seq] + [ts.finish().text]
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == tok.decode(seq, skip_special_tokens=True)
    assert sum(bool(t) for t in texts) >= 2, "released as words complete, not only at the end"


def test_held_back_stop_prefix_and_bad_stop(model):
    tok = model.tokenizer
    ids = tok("one two. three", add_special_tokens=False)["input_ids"]
    ts = TextStream(tok, [1], 100, stop=[". th"])
    out = [ts.add([t]) for t in ids]
    assert out[-1].finish_reason == "stop" and "".join(e.text for e in out) == "one two"
    with pytest.raises(ValueError, match="stop"):
        TextStream(tok, [1], 10, stop=[""])
    with pytest.raises(ValueError, match="stop"):
        model.stream(PROMPT, 4, stop=[3])
    with pytest.raises(ValueError, match="temperature"):
        model.stream(PROMPT, 4, temperature=-1)  # checked at the call, before any event


def test_stream_releases_the_lock_when_closed(model):
    gen = model.stream(PROMPT, 40)
    next(gen)
    assert model._lock.locked()
    gen.close()
    assert not model._lock.locked()
    assert torch.equal(torch.tensor(model.generate(PROMPT, 8).tokens[0]),
                       torch.tensor(model.generate(PROMPT, 8).tokens[0]))
