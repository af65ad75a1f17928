"""generate.py on a DeepSeek-R1 checkpoint, end to end on CPU.

The random R1-format release of testkit/release_v3.py is converted by convert.py for 1, 2 and 4 ranks.
generate.py, in R1's chat format at --dtype fp32 with greedy decoding, must continue every prompt
token for token as transformers' DeepseekV3ForCausalLM does when loaded with the values the release
encodes: in this process (one rank), under torchrun on gloo (two ranks), with run_mp8.sh (four ranks)
and with run_node_0.sh + run_node_1.sh as two nodes on localhost. Every bad input of V4's list
(tests/test_generate.py) is refused on R1 shards too, with one clear line.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import convert
import generate
import runtime
from encoding import encode_messages_r1, parse_completion_r1
from random_release import write_release
from testkit.release_v3 import r1_config, without_mtp, write_release_v3
from testkit.runs import (BAD_INPUT_LINES, bad_input, env, free_port,  # noqa: F401  (one_thread: a fixture)
                          one_thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(ROOT, "generate.py")
LAUNCH_TIMEOUT = 240
MAX_NEW = 6
EOS = 1

PROMPTS = ["Hello there", "What is two plus two?", "Tell me a story about a dragon who lives in a cave.", "ok"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nBlue."},
                {"role": "user", "content": "Another one?"}]
GREEDY = ["--max-new-tokens", str(MAX_NEW), "--temperature", "0", "--dtype", "fp32", "--max-batch-size", "3",
          "--max-seq-len", "128"]


def read_records(path) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(release folder, the state dict it encodes, {N: folder converted for N ranks})."""
    root = tmp_path_factory.mktemp("generate_v3")
    path = str(root / "release")
    reference = write_release_v3(path, seed=0, n_files=2)
    converted = {}
    for n in (1, 2, 4):
        converted[n] = str(root / f"mp{n}")
        convert.convert(path, converted[n], n, num_workers=1)
    return path, reference, converted


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "prompts.jsonl"
    records = [{"prompt": p} for p in PROMPTS] + [{"messages": CONVERSATION}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def conversations():
    return [[{"role": "user", "content": p}] for p in PROMPTS] + [CONVERSATION]


# ---------------------------------------------------------------- the oracle

def transformers_state(reference: dict, cfg: dict) -> dict:
    """The release's tensors in transformers' layout: each MoE layer's experts stacked, gate and up
    projections side by side (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I])."""
    state = {k: v for k, v in without_mtp(reference, cfg).items() if ".mlp.experts." not in k}
    for layer in range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.mlp.experts."
        experts = range(cfg["n_routed_experts"])
        state[p + "gate_up_proj"] = torch.stack([torch.cat([reference[f"{p}{e}.gate_proj.weight"],
                                                            reference[f"{p}{e}.up_proj.weight"]]) for e in experts])
        state[p + "down_proj"] = torch.stack([reference[f"{p}{e}.down_proj.weight"] for e in experts])
    return state


@pytest.fixture(scope="module")
def oracle(release):
    transformers = pytest.importorskip("transformers")
    with open(os.path.join(release[0], "config.json")) as f:
        cfg = json.load(f)
    config = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k != "quantization_config"})
    config._attn_implementation = "eager"
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    model.load_state_dict(transformers_state(release[1], cfg), strict=True)
    return model


@torch.no_grad()
def oracle_greedy(model, prompt: list) -> list:
    """Up to MAX_NEW argmax tokens after prompt, ending at EOS; every step a full forward pass."""
    new = []
    while len(new) < MAX_NEW and new[-1:] != [EOS]:
        new.append(int(model(torch.tensor([prompt + new])).logits[0, -1].argmax()))
    return new


@pytest.fixture(scope="module")
def expected(release, oracle):
    """{mode: [(prompt ids, transformers' greedy continuation)] for the input file's prompts}."""
    tok = runtime.Tokenizer(release[2][1])
    out = {}
    for mode in ("chat", "thinking"):
        prompts = [tok.encode(encode_messages_r1(m, mode)) for m in conversations()]
        out[mode] = [(p, oracle_greedy(oracle, p)) for p in prompts]
    return out


def check_records(records, expected, tok, mode):
    assert [r["index"] for r in records] == list(range(len(expected)))
    for r, (prompt, new) in zip(records, expected):
        stopped = new[-1:] == [EOS]
        ids = new[:-1] if stopped else new
        assert r["completion_ids"] == ids
        assert (r["prompt_tokens"], r["completion_tokens"]) == (len(prompt), len(ids))
        assert r["finish_reason"] == ("stop" if stopped else "length")
        assert (r["reasoning"], r["completion"]) == parse_completion_r1(tok.decode(ids), mode)


# ---------------------------------------------------------------- runs

def test_oracle_continuations_are_not_trivial(expected):
    continuations = [tuple(new) for mode in expected.values() for _, new in mode]
    assert len(set(continuations)) > 4 and all(len(c) == MAX_NEW or c[-1] == EOS for c in continuations)


@pytest.mark.parametrize("mode", ["chat", "thinking"])
def test_one_rank_matches_transformers(release, inputs, expected, tmp_path, mode):
    out = tmp_path / "out.jsonl"
    thinking = ["--thinking"] if mode == "thinking" else []
    assert generate.main(["--ckpt-path", release[2][1], "--input-file", inputs, "--output-file", str(out),
                          *GREEDY, *thinking]) == 0
    records = read_records(out)
    assert [r["prompt"] for r in records] == PROMPTS + [CONVERSATION]
    check_records(records, expected[mode], runtime.Tokenizer(release[2][1]), mode)


@pytest.mark.slow
def test_two_ranks_match_transformers(release, inputs, expected, tmp_path):
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", GENERATE,
           "--ckpt-path", release[2][2], "--input-file", inputs, "--output-file", str(out), *GREEDY]
    done = subprocess.run(cmd, env=env(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    check_records(read_records(out), expected["chat"], runtime.Tokenizer(release[2][2]), "chat")
    assert "5 prompts" in done.stderr and done.stdout == ""


@pytest.mark.slow
def test_four_ranks_match_transformers(release, inputs, expected, tmp_path):
    out = tmp_path / "out.jsonl"
    done = subprocess.run([os.path.join(ROOT, "run_mp8.sh"), *GREEDY, "--output-file", str(out)],
                          env=env(NPROC_PER_NODE="4", CKPT_PATH=release[2][4], INPUT_FILE=inputs,
                                  MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    check_records(read_records(out), expected["chat"], runtime.Tokenizer(release[2][4]), "chat")


@pytest.mark.slow
def test_two_nodes_match_transformers(release, inputs, expected, tmp_path):
    """run_node_0.sh and run_node_1.sh on 127.0.0.1, two ranks each over gloo: four ranks, the mp4
    shards. USE_OGROUPS_COMM=0, as the README says for R1 (the scripts turn V4's o-groups layout on)."""
    out = tmp_path / "out.jsonl"
    extra = env(NNODES="2", NPROC_PER_NODE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                CKPT_PATH=release[2][4], INPUT_FILE=inputs, USE_OGROUPS_COMM="0")
    nodes = [subprocess.Popen([os.path.join(ROOT, f"run_node_{i}.sh"), *GREEDY, "--output-file", str(out)],
                              env=extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for i in (0, 1)]
    results = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results
    check_records(read_records(out), expected["chat"], runtime.Tokenizer(release[2][4]), "chat")


# ---------------------------------------------------------------- bad input (V4's list, on R1 shards)

@pytest.fixture(scope="module")
def broken(release, tmp_path_factory):
    """R1 checkpoint folders with one thing wrong each (shards linked, not copied)."""
    root = tmp_path_factory.mktemp("broken_v3")
    mp1, mp2 = release[2][1], release[2][2]

    def folder(name, src, shard, side=("config.json", "tokenizer.json", "tokenizer_config.json")):
        path = root / name
        path.mkdir()
        os.symlink(os.path.join(src, shard), path / shard)
        for fname in side:
            os.symlink(os.path.join(src, fname), path / fname)
        return str(path)

    bad_config = folder("bad_config", mp1, "model0-mp1.safetensors", ("tokenizer.json", "tokenizer_config.json"))
    with open(os.path.join(mp1, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(bad_config, "config.json"), "w") as f:
        json.dump({**config, "n_group": 3}, f)
    return {
        "no_tokenizer": folder("no_tokenizer", mp1, "model0-mp1.safetensors", ("config.json",)),
        "no_config": folder("no_config", mp1, "model0-mp1.safetensors", ("tokenizer.json", "tokenizer_config.json")),
        "bad_config": bad_config,
        "rank1_missing": folder("rank1_missing", mp2, "model0-mp2.safetensors"),
    }


@pytest.mark.parametrize("case, match", {
    **BAD_INPUT_LINES,
    "bad_config": r"config .*config\.json: n_routed_experts=16 is not divisible by n_expert_groups=3",
}.items())
def test_bad_input_is_refused_with_a_clear_message(case, match, release, broken, inputs, tmp_path, capsys,
                                                    monkeypatch):
    argv = {"--ckpt-path": release[2][1], "--input-file": inputs}
    extra = bad_input(case, argv, tmp_path, broken, CONVERSATION, release[2][2], monkeypatch)
    assert generate.main([a for kv in argv.items() for a in kv] + GREEDY + extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rank1_missing", "too_long"])
def test_a_problem_on_one_rank_stops_every_rank(case, release, broken, inputs):
    """A shard missing on rank 1 only, or a prompt rank 0 refuses: both ranks exit 1, one message."""
    ckpt = broken["rank1_missing"] if case == "rank1_missing" else release[2][2]
    limit = ["--max-seq-len", "8"] if case == "too_long" else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", GENERATE,
           "--ckpt-path", ckpt, "--input-file", inputs, *limit, "--timeout", "30"]
    start = time.monotonic()
    done = subprocess.run(cmd, env=env(MASTER_PORT=str(free_port())), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    errors = [line for line in done.stderr.splitlines() if line.startswith("generate.py: error: ")]
    assert len(errors) == 1, done.stderr
    if case == "too_long":
        assert re.match(r"generate\.py: error: rank 0: prompt 2 has \d+ tokens", errors[0]), errors[0]
    else:
        assert errors[0].startswith("generate.py: error: rank 1: ") and "model1-mp2.safetensors not found" in errors[0]


# ---------------------------------------------------------------- pieces

def test_the_config_picks_the_family(release, tmp_path):
    assert runtime.checkpoint_family(os.path.join(release[2][1], "config.json")) is runtime.FAMILIES["deepseek_v3"]
    assert runtime.checkpoint_family(os.path.join(ROOT, "configs", "config_flash.json")) is runtime.V4
    assert runtime.checkpoint_family(str(tmp_path / "absent.json")) is runtime.V4
    other = tmp_path / "other.json"
    other.write_text(json.dumps(r1_config(model_type="mixtral")))
    with pytest.raises(runtime.SetupError, match="model_type 'mixtral' is not one of"):
        runtime.checkpoint_family(str(other))


def test_v4_records_carry_completion_ids_and_no_reasoning_in_chat_mode(release):
    tok = runtime.Tokenizer(release[2][1])
    new = tok.encode("<think>\nHmm.\n</think>\n\nFour.") + [EOS]
    v4 = generate.record(0, "p", [0, 5], new, tok, EOS, "chat")
    assert v4["completion_ids"] == new[:-1] and v4["completion_tokens"] == len(new) - 1
    assert "reasoning" not in v4 and v4["finish_reason"] == "stop"
    r1 = generate.record(0, "p", [0, 5], new[:-1], tok, EOS, "chat", runtime.FAMILIES["deepseek_v3"])
    assert (r1["reasoning"], r1["completion"], r1["finish_reason"]) == ("Hmm.", "Four.", "length")


@pytest.mark.parametrize("case, match", [
    ("other_n", r"holds 64640 of the 129280 vocabulary rows: it was made for mp2, not for mp1"),
    ("ogroups", r"USE_OGROUPS_COMM=1 is DeepSeek-V4's o-groups layout; .*config\.json is DeepSeek-R1 / V3"),
    ("v4_shard", r"does not fit this model \(1 ranks\)"),
])
def test_bad_checkpoints_are_refused(case, match, release, inputs, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        os.symlink(os.path.join(release[2][1], name), folder / name)
    if case == "other_n":
        os.symlink(os.path.join(release[2][2], "model0-mp2.safetensors"), folder / "model0-mp1.safetensors")
    elif case == "ogroups":
        monkeypatch.setenv("USE_OGROUPS_COMM", "1")
        os.symlink(os.path.join(release[2][1], "model0-mp1.safetensors"), folder / "model0-mp1.safetensors")
    else:                                   # a V4 shard beside R1's config.json
        v4 = tmp_path / "v4"
        write_release(str(v4), n_files=1)
        convert.convert(str(v4), str(tmp_path / "v4mp1"), 1, num_workers=1)
        os.symlink(tmp_path / "v4mp1" / "model0-mp1.safetensors", folder / "model0-mp1.safetensors")
    assert generate.main(["--ckpt-path", str(folder), "--input-file", inputs, *GREEDY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err
