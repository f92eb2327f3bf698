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


def continuation_text(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text that ``new`` adds after ``prompt``: decode(prompt + new) minus decode(prompt), as transformers'
    streamers do. Decoding ``new`` alone drops a word's leading space (SentencePiece's "▁there" decodes to
    "there" at the start of a string), so ``prompt + text`` would read "timethere"."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    full = tokenizer.decode(prompt + new, skip_special_tokens=True)
    if full.startswith(before):
        return full[len(before):]
    return tokenizer.decode(new, skip_special_tokens=True)  # a tokenizer that rewrites the prompt's text


__all__ = ["continuation_text", "load_tokenizer"]
