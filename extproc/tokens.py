"""Cheap input-token estimates for the pre-call tpm check.

A real tokenizer costs tens of microseconds per KB and needs encoding files; the estimate only has to be
close enough to keep a deployment under its tpm, because the actual count from the response's ``usage``
replaces it when the request ends. English text averages ~4 characters per token (OpenAI's rule of thumb);
token-id arrays count exactly.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
PER_MESSAGE_OVERHEAD = 4  # role and separators, as in OpenAI's cookbook counting
PER_REQUEST_OVERHEAD = 3


def _text_tokens(value: Any) -> int:
    if isinstance(value, str):
        return (len(value) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    if isinstance(value, list):
        if value and isinstance(value[0], int):
            return len(value)  # already token ids
        total = 0
        for item in value:
            if isinstance(item, dict):  # content parts: {"type": "text", "text": ...}; images are not estimated
                total += _text_tokens(item.get("text"))
            else:
                total += _text_tokens(item)
        return total
    return 0


def estimate_input_tokens(payload: dict[str, Any], operation: str) -> int:
    if operation == "chat/completions":
        messages = payload.get("messages")
        if not isinstance(messages, list):
            return PER_REQUEST_OVERHEAD
        total = PER_REQUEST_OVERHEAD
        for message in messages:
            if isinstance(message, dict):
                total += PER_MESSAGE_OVERHEAD + _text_tokens(message.get("content"))
        return total
    if operation == "completions":
        return _text_tokens(payload.get("prompt"))
    return _text_tokens(payload.get("input"))
