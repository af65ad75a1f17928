"""check.py on DeepSeek-R1 shards (CPU): the random R1-format release of testkit/release_v3.py
converted for 1 and 2 ranks.

Prompts must be encoded in R1's chat format (as generate.py encodes them for this checkpoint), so A's
greedy tokens are generate.py's completion; float32 mp=1 and mp=2 must agree to float32 rounding;
an R1 side against a V4 side is refused (same vocabulary size, not one model).
"""
import json

import pytest

import convert
import generate
import runtime
from encoding import encode_messages, encode_messages_r1
from random_release import write_release
from testkit.checks import PROMPTS, STEPS, converted_release, run_check
from testkit.release_v3 import write_release_v3
from testkit.runs import clean_env, one_thread  # noqa: F401  (fixtures)

FP32_CPU = "backend=torch,dtype=fp32,device=cpu"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """{N: R1 folder converted for N ranks}, and the prompt file."""
    return converted_release(tmp_path_factory.mktemp("check_v3"), write_release_v3, 1)


def prompt_lengths(ckpt, encode, mode="chat"):
    tok = runtime.Tokenizer(ckpt[1])
    return [len(tok.encode(encode([{"role": "user", "content": p}], mode))) for p in PROMPTS]


@pytest.mark.slow
def test_mp1_and_mp2_agree_in_fp32(ckpt, tmp_path):
    rc, report = run_check(ckpt, f"mp=1,{FP32_CPU}", f"mp=2,{FP32_CPU},ckpt={ckpt[2]}", tmp_path,
                           "--max-abs", "1e-4", "--min-top1", "1", "--same-greedy")
    assert rc == 0 and report["ok"], report["failures"]
    rows = report["prompts"]
    assert [r["prompt_tokens"] for r in rows] == prompt_lengths(ckpt, encode_messages_r1)
    assert prompt_lengths(ckpt, encode_messages_r1) != prompt_lengths(ckpt, encode_messages)   # V4's has </think>
    assert all(r["a_tokens"] == r["b_tokens"] and r["steps"] == STEPS for r in rows)
    assert len({tuple(r["a_tokens"]) for r in rows}) == len(rows)


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_greedy_tokens_are_generate_py_s(ckpt, tmp_path, mode):
    """A's greedy tokens are the completion generate.py writes for the same checkpoint and prompt."""
    thinking = ["--thinking"] if mode == "thinking" else []
    rc, report = run_check(ckpt, f"mp=1,{FP32_CPU}", f"mp=1,{FP32_CPU}", tmp_path, *thinking)
    assert rc == 0
    out = tmp_path / "out.jsonl"
    assert generate.main(["--ckpt-path", ckpt[1], "--input-file", ckpt["prompts"], "--output-file", str(out),
                          "--max-new-tokens", str(STEPS), "--temperature", "0", "--dtype", "fp32",
                          "--max-batch-size", "1", "--max-seq-len", "128", *thinking]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    tok = runtime.Tokenizer(ckpt[1])
    for row, rec in zip(report["prompts"], records):
        assert row["prompt_tokens"] == rec["prompt_tokens"] == prompt_lengths(ckpt, encode_messages_r1, mode)[
            rec["index"]]
        ids = rec["completion_ids"]
        assert row["a_tokens"][:len(ids)] == ids
        assert len(ids) == STEPS or row["a_tokens"][len(ids)] == tok.eos_id


def test_an_r1_side_against_a_v4_side_is_refused(ckpt, tmp_path, capsys):
    v4 = str(tmp_path / "v4")
    write_release(v4, n_files=1)
    convert.convert(v4, str(tmp_path / "v4mp1"), 1, num_workers=1)
    rc, report = run_check(ckpt, f"mp=1,{FP32_CPU}", f"mp=1,{FP32_CPU},ckpt={tmp_path / 'v4mp1'}", tmp_path)
    assert rc == 2 and report is None
    err = capsys.readouterr().err
    assert "--a is DeepSeek-R1 / V3, --b is DeepSeek-V4: not one model" in err
