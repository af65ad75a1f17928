"""DeepSeek-V4 chat format: messages -> prompt text, and a completion -> reasoning and answer.

A conversation is rendered as

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜></think>          (one string: the line break is only for reading)

System text stands as it is, right after BOS. Every user turn that the assistant answers (or is
about to answer) is followed by <｜Assistant｜> and a mode token: in chat mode always </think>; in
thinking mode <think> after the last user turn, so the model writes its reasoning, then </think>
and the answer. Earlier answers are rendered without their reasoning, after </think>, in both modes.

Covered: system, user and assistant messages. Not covered: tools, developer messages, quick
instruction tasks and the reasoning-effort preamble of the full V4 format.
"""
from typing import Dict, List, Tuple

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"

MODES = ("chat", "thinking")
ROLES = ("system", "user", "assistant")


def check_messages(messages: List[Dict]) -> None:
    """Raise ValueError unless messages is a conversation this module can render for a reply:
    dicts with a known role and string content, ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: expected an object with a role among {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be from the user (the model writes the reply)")


def encode_messages(messages: List[Dict], mode: str = "chat") -> str:
    """Render a conversation that ends with a user message into the prompt text for the reply."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_messages(messages)
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    parts = [BOS]
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            parts.append(content)
        elif role == "assistant":
            parts.append(content + EOS)
        else:
            parts.append(USER + content)
            following = messages[i + 1]["role"] if i + 1 < len(messages) else None
            if following in (None, "assistant"):
                thinks = mode == "thinking" and i == last_user
                parts.append(ASSISTANT + (THINK_START if thinks else THINK_END))
    return "".join(parts)


def parse_completion(text: str, mode: str = "chat") -> Tuple[str, str]:
    """Split the model's text (after the prompt, without EOS) into (reasoning, answer).

    In thinking mode the reasoning runs up to the first </think>; a completion cut off before it
    is all reasoning. In chat mode there is no reasoning.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "chat":
        return "", text
    reasoning, found, answer = text.partition(THINK_END)
    return (reasoning, answer) if found else (text, "")
