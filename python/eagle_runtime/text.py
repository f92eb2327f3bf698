"""Tokenizers and text: loading a checkpoint's tokenizer, and the text new tokens add after a prompt."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(base: str | Path):
    """The Hugging Face tokenizer stored with the checkpoint ``base`` (a directory or hub id), or ``None`` when
    it has none (prompts must then be token ids, and no text is returned)."""
    from transformers import AutoTokenizer

    from .loading import resolve_dir

    try:
        return AutoTokenizer.from_pretrained(str(resolve_dir(base)))
    except (OSError, ValueError):
        return None


def check_utf8_prompts(prompts) -> None:
    """A one-line ``ValueError`` for the first text prompt of ``prompts`` (a list; token-id prompts are skipped)
    that is not valid UTF-8, naming the byte offset of its first undecodable byte: "prompt is not valid UTF-8: byte
    0xff at offset 10" (``prompt [i]`` in a batch, numbered from 0 as the command line prints its outputs).

    Undecodable bytes reach a ``str`` as surrogate escapes (``sys.argv``, ``os.fsdecode``: byte 0xff becomes
    U+DCFF), which the tokenizer refuses with a TypeError about ``TextEncodeInput``. A surrogate that is no such
    escape (``"\\ud800"`` typed in Python) has no byte to name; it is reported as a lone surrogate."""
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            continue
        try:
            text.encode("utf-8")
            continue
        except UnicodeEncodeError as e:
            first = e.start
        what = "prompt" if len(prompts) == 1 else f"prompt [{i}]"
        offset = len(text[:first].encode("utf-8"))  # what precedes the first surrogate encodes as it was read
        code = ord(text[first])
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape maps byte b to U+DC00 + b
            raise ValueError(f"{what} is not valid UTF-8: byte 0x{code - 0xDC00:02x} at offset {offset}")
        raise ValueError(f"{what} is not valid UTF-8: lone surrogate U+{code:04X} at offset {offset}")


def continuation_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text that ``new`` adds after ``prompt``: decode(prompt + new) minus decode(prompt), as transformers'
    streamers do. Decoding ``new`` alone drops a word's leading space (SentencePiece's "▁there" decodes to
    "there" at the start of a string), so ``prompt + text`` would read "timethere"."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    full = tokenizer.decode(prompt + new, skip_special_tokens=True)
    if full.startswith(before):
        return full[len(before):]
    return tokenizer.decode(new, skip_special_tokens=True)  # a tokenizer that rewrites the prompt's text


__all__ = ["check_utf8_prompts", "continuation_text", "load_tokenizer"]
