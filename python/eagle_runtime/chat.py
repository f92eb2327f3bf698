"""Prompts in chat form, as the benchmark and the self-distillation corpus build them.

A tokenizer with a chat template renders the conversation through it; one without (the demo target, stories260k)
gets ``User: ...\\nAssistant:`` turns. Both end with the assistant's turn to speak.
"""

from __future__ import annotations


def make_prompt(tokenizer, history: list[tuple[str, str | None]]) -> str:
    """The conversation so far (``(user, answer or None)`` per turn), ending with the assistant's turn to speak."""
    if getattr(tokenizer, "chat_template", None):
        msgs = []
        for user, answer in history:
            msgs.append({"role": "user", "content": user})
            if answer is not None:
                msgs.append({"role": "assistant", "content": answer})
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    parts = []
    for user, answer in history:
        parts.append(f"User: {user}\nAssistant:" + (f" {answer}" if answer is not None else ""))
    return "\n".join(parts)


def encode_prompt(tokenizer, text: str, budget: int) -> tuple[list[int], bool]:
    """Token ids of a prompt and whether it was cut: a prompt over ``budget`` tokens keeps its first token (BOS)
    and its last ``budget - 1``."""
    if budget < 2:
        raise ValueError(f"a prompt budget must be >= 2 tokens, got {budget}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    ids = tokenizer(text, add_special_tokens=not has_template)["input_ids"]
    if len(ids) <= budget:
        return ids, False
    return ids[:1] + ids[len(ids) - budget + 1 :], True


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[str, bool, list[str]]:
    """An OpenAI-style conversation (``{"role", "content"}`` dicts, roles system/user/assistant) as prompt text
    ending with the assistant's turn, whether the tokenizer should add its special tokens (BOS) to it, and the
    stop strings the format needs. A chat template renders it (it writes BOS itself); without one the turns are
    ``System:``/``User:``/``Assistant:`` lines, as :func:`make_prompt` writes them, and an answer ends where the
    model starts the next ``User:`` turn."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, False, []
    lines = []
    for m in messages:
        role = {"system": "System", "user": "User", "assistant": "Assistant"}[m["role"]]
        lines.append(f"{role}: {m['content']}")
    return "\n".join(lines) + "\nAssistant:", True, ["\nUser:"]
