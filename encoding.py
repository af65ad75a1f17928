"""DeepSeek-V4 and DeepSeek-R1 chat formats: messages -> prompt text, and a completion -> reasoning and answer.

A conversation is rendered as

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜></think>          (one string: the line break is only for reading)

System text stands as it is, right after BOS. Every user turn that the assistant answers (or is
about to answer) is followed by <｜Assistant｜> and a mode token: in chat mode always </think>; in
thinking mode <think> after the last user turn, so the model writes its reasoning, then </think>
and the answer. Earlier answers are rendered without their reasoning, after </think>, in both modes.

Covered: system, user and assistant messages. Not covered: tools, developer messages, quick
instruction tasks and the reasoning-effort preamble of the full V4 format.

DeepSeek-R1 (encode_messages_r1, parse_completion_r1) follows the chat template of R1's
tokenizer_config.json:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜>
    <｜User｜>{user}<｜Assistant｜>                  (one string, as above)

All system texts, joined by a blank line, stand right after BOS wherever they occur. An earlier
answer keeps only what follows its last </think>. R1 always reasons: it opens its reply with
<think>, writes its reasoning, then </think> and the answer. In chat mode the prompt ends at
<｜Assistant｜> as the template has it; thinking mode adds "<think>\n" there, which R1's model card
recommends so that the model cannot skip its reasoning. Tools are not covered.
"""
from typing import Dict, List, Tuple

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
R1_THINK_OPEN = THINK_START + "\n"   # what R1's thinking mode puts after <｜Assistant｜>

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


def encode_messages_r1(messages: List[Dict], mode: str = "chat") -> str:
    """Render a conversation that ends with a user message into DeepSeek-R1's prompt text for the reply."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_messages(messages)
    parts = [BOS, "\n\n".join(m["content"] for m in messages if m["role"] == "system")]
    for m in messages:
        if m["role"] == "user":
            parts.append(USER + m["content"])
        elif m["role"] == "assistant":
            parts.append(ASSISTANT + m["content"].rpartition(THINK_END)[2] + EOS)
    parts.append(ASSISTANT + (R1_THINK_OPEN if mode == "thinking" else ""))
    return "".join(parts)


def parse_completion_r1(text: str, mode: str = "chat") -> Tuple[str, str]:
    """Split DeepSeek-R1's text (after the prompt, without EOS) into (reasoning, answer).

    The reasoning is what stands between <think> (written by the model in chat mode, by the prompt in
    thinking mode) and the first </think>; a completion cut off before </think> is all reasoning. A
    chat-mode reply that does not open with <think> has no reasoning. The whitespace R1 puts around
    its reasoning and before its answer is removed.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    opened = mode == "thinking" or text.lstrip().startswith(THINK_START)
    if opened and mode == "chat":
        text = text.lstrip()[len(THINK_START):]
    reasoning, found, answer = text.partition(THINK_END)
    if found:
        return reasoning.strip(), answer.lstrip()
    return (text.strip(), "") if opened else ("", text)
