"""Streamed text: the text each decode step adds, cut exactly at EOS, a stop string or the token budget.

A speculative step emits a block of tokens at once (accepted drafts, then the target's own token); an EOS or a
stop string can fall anywhere inside it. :class:`TextStream` takes the blocks one at a time and keeps exactly
the tokens up to and including the one that ends the output: nothing after it is emitted or counted, so usage
equals the tokens emitted (sglang #31599, vllm #47616 and transformers #47912 each leaked or miscounted such
tokens).

Text is decoded as transformers' streamers do it: the whole continuation decoded after the prompt, never a token
on its own (SentencePiece would drop a word's leading space and glue words), and held back while it may still
change: a trailing half UTF-8 character (decoded as U+FFFD), the text after the last whitespace (a tokenizer's
clean-up can still rewrite " ." as "."), and a tail that may be the start of a stop string.

Example::

    ts = TextStream(tokenizer, prompt_ids, max_new_tokens=64, stop=["\\n\\n"], eos=[2])
    ev = ts.add([306, 763, 29889], n_draft=2)   # one cycle: two accepted drafts and the target's token
    ev.text, ev.pieces, ev.finish_reason        # released text, its runs by origin, None while running
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Prompt tokens decoded before the new ones: enough for the tokenizer to see the word boundary (SentencePiece's
# leading-space rule needs one token), far fewer than a long prompt (decoding 4k prompt tokens per step cost more
# than the step on the demo pair).
PROMPT_CONTEXT = 16


@dataclass
class StreamEvent:
    """What one decode step added to one output.

    ``text`` is the released text (``""`` while a word, a half character or a possible stop is held back);
    ``pieces`` splits it into runs ``(text, from_draft)``; ``tokens`` are the step's counted token ids, of
    which ``draft_tokens`` were accepted from the draft; ``finish_reason`` is ``"stop"`` (EOS or a stop
    string), ``"length"`` (the token budget) or ``None`` while the output runs."""

    text: str
    tokens: list[int]
    draft_tokens: int
    pieces: list[tuple[str, bool]] = field(default_factory=list)
    finish_reason: str | None = None


class TextStream:
    """One output's tokens and text, fed one step's block at a time (see the module docstring).

    Args:
        tokenizer: a HF tokenizer, or ``None`` (token ids only: no text, stop strings refused).
        prompt: the prompt's token ids (the text is what the new tokens add after it).
        max_new_tokens: the token budget; the output finishes with ``"length"`` when it is reached.
        stop: stop strings; the output ends before the first one (it is not part of the text).
        eos: token ids that end the output (kept in ``tokens``, as :meth:`EagleModel.generate` keeps them).
    """

    def __init__(self, tokenizer, prompt: list[int], max_new_tokens: int, stop=(), eos=()):
        stop = [stop] if isinstance(stop, str) else list(stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must be a string or a list of non-empty strings")
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        self.tokenizer, self.stop, self.eos = tokenizer, stop, set(eos or ())
        self.max_new = max_new_tokens
        self._context = list(prompt[-PROMPT_CONTEXT:])
        self._before = tokenizer.decode(self._context, skip_special_tokens=True) if tokenizer is not None else ""
        self.tokens: list[int] = []
        self._from_draft: list[bool] = []
        self._ends: list[int] = []  # text length after each token (where its text ends)
        self.text = ""  # the decoded continuation so far (cut before a stop string)
        self.released = 0  # characters of ``text`` already handed out
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _decode(self) -> str:
        if self.tokenizer is None:
            return ""
        full = self.tokenizer.decode(self._context + self.tokens, skip_special_tokens=True)
        if full.startswith(self._before):
            return full[len(self._before):]
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)  # a tokenizer that rewrote the prompt

    def add(self, tokens: list[int], n_draft: int = 0) -> StreamEvent:
        """Feed one step's block: ``tokens`` in order, the first ``n_draft`` of them accepted drafts."""
        if self.finished:
            return StreamEvent("", [], 0, [], self.finish_reason)
        kept, kept_draft = [], 0
        for i, t in enumerate(tokens):
            from_draft = i < n_draft
            self.tokens.append(int(t))
            self._from_draft.append(from_draft)
            kept.append(int(t))
            kept_draft += from_draft
            if int(t) in self.eos:
                self._ends.append(len(self.text))  # special tokens add no text
                self.finish_reason = "stop"
                break
            prev = len(self.text)
            text = self._decode()
            cut = self._find_stop(text, prev)
            if cut is not None:
                self.text = text[:max(cut, self.released)]  # released text cannot be taken back
                self._ends.append(len(self.text))
                self.finish_reason = "stop"
                break
            self.text = text
            self._ends.append(len(text))
            if len(self.tokens) >= self.max_new:
                self.finish_reason = "length"
                break
        return self._release(kept, kept_draft)

    def finish(self, reason: str = "length") -> StreamEvent:
        """End the output from outside (a cancelled request, a cache that is full): release what is held."""
        if not self.finished:
            self.finish_reason = reason
        return self._release([], 0)

    def _find_stop(self, text: str, prev: int) -> int | None:
        """The start of the earliest stop string in ``text`` that the newest token completed, else None."""
        if not self.stop:
            return None
        hits = []
        for s in self.stop:
            k = text.find(s, max(0, prev - len(s) + 1))
            if k >= 0:
                hits.append(k)
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        """How much of ``text`` can be released now (all of it once finished)."""
        text = self.text
        if self.finished:
            return len(text)
        end = len(text)
        while end > 0 and text[end - 1] == "\ufffd":  # half a UTF-8 character so far
            end -= 1
        ws = max(text.rfind(c, 0, end) for c in (" ", "\n", "\t"))
        end = max(ws, 0) if ws >= self.released else self.released
        for s in self.stop:  # a tail that may grow into a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text.endswith(s[:k], 0, end):
                    end -= k
                    break
        return max(end, self.released)

    def _release(self, kept: list[int], kept_draft: int) -> StreamEvent:
        end = self._safe_end()
        a, self.released = self.released, end
        return StreamEvent(self.text[a:end], kept, kept_draft, self._pieces(a, end), self.finish_reason)

    def _pieces(self, a: int, b: int) -> list[tuple[str, bool]]:
        """``text[a:b]`` as runs of equal origin: a character belongs to the token whose decode added it."""
        runs: list[tuple[str, bool]] = []
        pos = a
        while pos < b:
            i = min(bisect.bisect_right(self._ends, pos), len(self._ends) - 1)
            flag = self._from_draft[i]
            j = i
            while j + 1 < len(self._ends) and self._from_draft[j + 1] == flag:
                j += 1
            end = min(b, self._ends[j]) if self._ends[j] > pos else b
            if runs and runs[-1][1] == flag:
                runs[-1] = (runs[-1][0] + self.text[pos:end], flag)
            else:
                runs.append((self.text[pos:end], flag))
            pos = end
        return runs


__all__ = ["PROMPT_CONTEXT", "StreamEvent", "TextStream"]
