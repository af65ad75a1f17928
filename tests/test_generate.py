"""generate.py end to end on CPU.

A random fixture release is converted once for 1, 2 and 4 ranks (4 in the o-groups layout). Greedy
runs of several ranks (run_mp8.sh, and run_node_0.sh + run_node_1.sh as two nodes on localhost)
must give the completions of a single-process run, which itself must equal a step-by-step argmax
of Transformer.forward. Single-process cases run in this process through generate.main. A failure
of several ranks started by generate.py --nproc-per-node (as the README documents) must show one
line; every rank must end by itself, promptly, after success and after failure. Tests that start
several ranks are marked slow.
"""
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import types

import pytest
import torch
from safetensors.torch import load_model

import generate
import runtime
from encoding import encode_messages
from random_release import write_release
from model import ModelArgs, Transformer
from testkit.runs import (BAD_INPUT_LINES, bad_input, env, free_port,  # noqa: F401  (one_thread: a fixture)
                          one_thread)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATE = os.path.join(ROOT, "generate.py")
LAUNCH_TIMEOUT = 240          # seconds for one torchrun job of this file (they take 5-15 s)

PROMPTS = ["Hello there", "What is two plus two?", "Tell me a story about a dragon who lives in a cave.",
           "hi again", "Why is the sky blue? Answer in one sentence, please.", "ok", "List three prime numbers."]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
GREEDY = ["--max-new-tokens", "6", "--temperature", "0", "--dtype", "fp32", "--max-batch-size", "3",
          "--max-seq-len", "256"]


def torchrun(n: int, *args: str) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), GENERATE, *args]


def ranks(n: int, *args: str) -> list:
    """The README's command for n ranks: generate.py starts them itself."""
    return [sys.executable, GENERATE, "--nproc-per-node", str(n), *args]


def said(stderr: str) -> list:
    """The lines of stderr a user reads, less the progress bar's redraws (text mode splits at \r)."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("generate: ")]


def launch(cmd, extra_env=None, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(**(extra_env or {})), input=stdin, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, cwd=ROOT)


def run_here(*argv: str) -> int:
    return generate.main(list(argv))


def completions(path) -> list:
    with open(path) as f:
        return [json.loads(line)["completion"] for line in f]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """{N: folder converted for N ranks} from one random release."""
    root = tmp_path_factory.mktemp("generate")
    release = str(root / "release")
    write_release(release, seed=0, n_files=2)
    out = {}
    for n in (1, 2, 4):
        out[n] = str(root / f"mp{n}")
        subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-ckpt-path", release,
                        "--save-path", out[n], "--n-experts", "8", "--model-parallel", str(n)],
                       env=env(**({"USE_OGROUPS_COMM": "1"} if n == 4 else {})), check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    jsonl, text = root / "prompts.jsonl", root / "prompts.txt"
    records = [{"prompt": p} for p in PROMPTS] + [{"messages": MESSAGES}]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    text.write_text("\n\n".join(PROMPTS) + "\n")
    return {"jsonl": str(jsonl), "text": str(text)}


@pytest.fixture(scope="module")
def reference(ckpt, inputs, tmp_path_factory):
    """Greedy records of a single-process run over the JSONL prompts (8 prompts, batches of 3)."""
    out = tmp_path_factory.mktemp("reference") / "out.jsonl"
    assert run_here("--ckpt-path", ckpt[1], "--input-file", inputs["jsonl"], "--output-file", str(out), *GREEDY) == 0
    with open(out) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------- the generation loop

@pytest.fixture(scope="module")
def model(ckpt):
    args = ModelArgs.from_file(os.path.join(ckpt[1], "config.json"), dtype="fp32", max_batch_size=3, max_seq_len=48)
    m = Transformer(args)
    load_model(m, os.path.join(ckpt[1], "model0-mp1.safetensors"))
    return m


def stepwise(model, prompt, max_new_tokens, eos_id):
    """Greedy decoding of one prompt alone: prefill, then one argmax token at a time."""
    logits, pos, out = model(torch.tensor([prompt]), 0), len(prompt), []
    while True:
        out.append(int(logits.argmax()))
        if out[-1] == eos_id or len(out) == max_new_tokens or pos + 1 >= model.args.max_seq_len:
            return out
        logits = model(torch.tensor([out[-1:]]), pos)
        pos += 1


def test_batched_greedy_equals_stepwise_argmax_of_each_prompt_alone(model):
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, 128000, (n,), generator=gen).tolist() for n in (3, 11, 20)]
    # 40 new tokens: the 20-token prompt runs into max_seq_len=48 after 28
    expected = [stepwise(model, p, 40, eos_id=-1) for p in prompts]
    assert [len(e) for e in expected] == [40, 37, 28]
    stats, steps = generate.Stats(), []
    assert generate.generate(model, prompts, 40, eos_id=-1, temperature=0.0, stats=stats, on_step=steps.append) == expected
    assert (stats.prompts, stats.tokens_in, stats.tokens_out, stats.prefill_tokens) == (3, 34, 105, 9)
    assert sum(steps) == 105 and len(steps) == 45           # one call a pass: positions 3 .. 47 (max_seq_len 48)
    assert "34 prompt tokens (9 in the prefill, which stops at each batch's shortest prompt; 25 with the decode steps)" \
        in stats.summary()

    eos = expected[1][4]       # a token the model emits: every sequence stops at its first one
    cut = [e[:e.index(eos) + 1] if eos in e else e[:10] for e in expected]
    assert generate.generate(model, prompts, 10, eos_id=eos) == cut


def test_sample():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0]])
    assert generate.sample(logits, 0.0, 1.0, None).tolist() == [1, 0]
    assert generate.sample(logits, 1.0, 1e-6, torch.Generator().manual_seed(0)).tolist() == [1, 0]   # nucleus of one
    draws = torch.stack([generate.sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2}             # 1 and 2 hold 0.9 of the mass; 0 and 3 are cut
    again = torch.stack([generate.sample(logits, 1.0, 0.9, torch.Generator().manual_seed(s)) for s in range(200)])
    assert torch.equal(draws, again)


# ---------------------------------------------------------------- runs across world sizes

def test_reference_records(ckpt, reference):
    assert [r["index"] for r in reference] == list(range(8))
    assert [r["prompt"] for r in reference] == PROMPTS + [MESSAGES]
    tok = runtime.Tokenizer(ckpt[1])
    for r in reference:
        messages = [{"role": "user", "content": r["prompt"]}] if isinstance(r["prompt"], str) else r["prompt"]
        assert r["prompt_tokens"] == len(tok.encode(encode_messages(messages)))
        assert (r["finish_reason"], r["completion_tokens"]) == ("length", 6) or \
            (r["finish_reason"] == "stop" and r["completion_tokens"] < 6)
    assert len({r["completion"] for r in reference}) > 1


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_greedy_is_the_same_on_2_and_4_ranks(n, ckpt, inputs, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    extra = {"NPROC_PER_NODE": str(n), "CKPT_PATH": ckpt[n], "INPUT_FILE": inputs["jsonl"],
             "MASTER_PORT": str(free_port())}
    if n == 4:
        extra["USE_OGROUPS_COMM"] = "1"      # 4 ranks > o_groups=2
    done = launch([os.path.join(ROOT, "run_mp8.sh"), *GREEDY, "--output-file", str(out)], extra)
    assert done.returncode == 0, done.stderr
    assert completions(out) == [r["completion"] for r in reference]
    assert "8 prompts" in done.stderr and "tokens/s" in done.stderr
    assert done.stdout == ""


@pytest.mark.slow
def test_two_nodes_match_one(ckpt, inputs, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    extra = env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                CKPT_PATH=ckpt[2], INPUT_FILE=inputs["jsonl"], USE_OGROUPS_COMM="0")
    nodes = [subprocess.Popen([os.path.join(ROOT, f"run_node_{i}.sh"), *GREEDY, "--output-file", str(out)],
                              env=extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in (0, 1)]
    results = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results
    assert completions(out) == [r["completion"] for r in reference]


def test_plain_text_input_matches_jsonl(ckpt, inputs, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    assert run_here("--ckpt-path", ckpt[1], "--input-file", inputs["text"], "--output-file", str(out), *GREEDY) == 0
    assert completions(out) == [r["completion"] for r in reference[:len(PROMPTS)]]


@pytest.mark.slow
def test_sampling_is_the_same_on_one_and_two_ranks(ckpt, inputs, reference, tmp_path):
    sampling = ["--max-new-tokens", "6", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3", "--dtype", "fp32",
                "--max-batch-size", "3", "--max-seq-len", "256"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert run_here("--ckpt-path", ckpt[1], "--input-file", inputs["text"], "--output-file", str(one), *sampling) == 0
    done = launch(torchrun(2, "--ckpt-path", ckpt[2], "--input-file", inputs["text"], "--output-file", str(two),
                           *sampling))
    assert done.returncode == 0, done.stderr
    assert completions(one) == completions(two)
    assert completions(one) != [r["completion"] for r in reference[:len(PROMPTS)]]


@pytest.mark.slow
def test_interactive_on_two_ranks(ckpt, reference, tmp_path):
    """hello, /clear, then a two-turn chat: the turn after /clear is the single prompt's greedy
    completion, and the next one is that of the whole conversation given as messages."""
    done = launch(torchrun(2, "--ckpt-path", ckpt[2], "--interactive", *GREEDY),
                  stdin="hello\n/clear\nhi again\nsecond\n/exit\nnever read\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("/clear starts a new conversation, /exit (or Ctrl-D) quits") == 1, done.stderr
    turns = done.stdout.split(">>> ")
    assert len(turns) == 6 and turns[2] == "" and turns[5] == ""     # /clear and /exit print nothing
    first = turns[3][:-1]
    assert first == reference[PROMPTS.index("hi again")]["completion"]

    conversation = tmp_path / "conversation.jsonl"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": "hi again"},
                                                     {"role": "assistant", "content": first},
                                                     {"role": "user", "content": "second"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert run_here("--ckpt-path", ckpt[1], "--input-file", str(conversation), "--output-file", str(out), *GREEDY) == 0
    assert turns[4][:-1] == completions(out)[0]


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def broken(ckpt, tmp_path_factory):
    """Checkpoint folders with one thing wrong each (shards linked, not copied)."""
    root = tmp_path_factory.mktemp("broken")

    def folder(name, files):
        path = root / name
        path.mkdir()
        for target, source in files.items():
            os.symlink(source, path / target)
        return str(path)

    def side(src, names=("config.json", "tokenizer.json", "tokenizer_config.json")):
        return {n: os.path.join(src, n) for n in names}

    mp1, mp2 = ckpt[1], ckpt[2]
    return {
        "no_tokenizer": folder("no_tokenizer", {"model0-mp1.safetensors": os.path.join(mp1, "model0-mp1.safetensors"),
                                                **side(mp1, ("config.json",))}),
        "no_config": folder("no_config", {"model0-mp1.safetensors": os.path.join(mp1, "model0-mp1.safetensors"),
                                          **side(mp1, ("tokenizer.json", "tokenizer_config.json"))}),
        "other_n": folder("other_n", {"model0-mp1.safetensors": os.path.join(mp2, "model0-mp2.safetensors"),
                                      **side(mp1)}),
        "rank1_missing": folder("rank1_missing", {"model0-mp2.safetensors": os.path.join(mp2, "model0-mp2.safetensors"),
                                                  **side(mp2)}),
    }


@pytest.mark.parametrize("case, match", {
    **BAD_INPUT_LINES,
    "other_n": r"holds 64640 of the 129280 vocabulary rows: it was made for mp2, not for mp1",
}.items())
def test_bad_input_is_refused_with_a_clear_message(case, match, ckpt, broken, inputs, tmp_path, capsys, monkeypatch):
    argv = {"--ckpt-path": ckpt[1], "--input-file": inputs["text"]}
    extra = bad_input(case, argv, tmp_path, broken, MESSAGES, ckpt[2], monkeypatch)
    assert run_here(*[a for kv in argv.items() for a in kv], *extra) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_a_shard_that_is_no_file_and_a_closed_stdin_are_one_line(ckpt, inputs, tmp_path, monkeypatch, capsys):
    for name in os.listdir(ckpt[1]):
        target = "/nonexistent" if name.endswith(".safetensors") else os.path.join(ckpt[1], name)
        os.symlink(target, tmp_path / name)
    assert run_here("--ckpt-path", str(tmp_path), "--input-file", inputs["text"]) == 1
    assert capsys.readouterr().err == (f"generate.py: error: {tmp_path}/model0-mp1.safetensors is not a file (a folder, "
                                       f"or a link to nothing)\n")
    monkeypatch.setattr(sys, "stdin", None)
    assert run_here("--ckpt-path", ckpt[1], "--interactive") == 1
    assert capsys.readouterr().err == "generate.py: error: --interactive reads the conversation on stdin, which is closed\n"


def test_a_config_error_names_the_file_once(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(runtime.SetupError) as error:
        runtime.load_args(str(tmp_path), 1)
    assert str(error.value).count(str(tmp_path / "config.json")) == 1, error.value


def test_a_model_too_large_for_memory_is_one_line(ckpt, inputs, monkeypatch, capsys):
    """The caches of a huge --max-seq-len (here the CPU allocator's refusal, raised by hand: a real one
    would first take the machine's memory)."""
    def refused(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 32000000000 bytes. Error code 12 (Cannot allocate memory)")
    monkeypatch.setattr(runtime, "family_of", lambda args: dataclasses.replace(runtime.V4, model_class=refused))
    assert run_here("--ckpt-path", ckpt[1], "--input-file", inputs["text"], "--max-seq-len", "100000") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_seq_len=100000 does not fit in memory (cpu, 1 rank): lower" in err, err


@pytest.mark.parametrize("flags, match", [
    (["--temperature", "nan"], "--temperature must be finite and >= 0"),
    (["--temperature", "inf"], "--temperature must be finite and >= 0"),
    (["--seed", str(2 ** 64)], "--seed must fit in 64 bits"),
    (["--timeout", "0"], "--timeout must be a positive number of seconds"),
    (["--output-file", ""], "--output-file must name a file"),
    (["--nnodes", "0"], "--nnodes must be at least 1"),
])
def test_flag_values_are_checked_before_any_work(flags, match, capsys):
    with pytest.raises(SystemExit) as stop:
        generate.parse_args(["--ckpt-path", "/nonexistent", "--input-file", "p.txt", *flags])
    assert stop.value.code == 2 and f"error: {match}" in capsys.readouterr().err


def test_a_byte_order_mark_is_not_part_of_the_prompts(tmp_path):
    for name, text, want in (("p.txt", "Hello\n\nThere\n", ["Hello", "There"]),
                             ("p.txt", '{"prompt": "hi"}\n{"prompt": "there"}\n', ["hi", "there"]),    # JSON lines
                             ("p.jsonl", '{"prompt": "hi"}\n', ["hi"])):
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
        assert runtime.read_prompts(str(tmp_path / name)) == want


def test_an_output_file_that_is_not_a_regular_file_is_written_in_place(tmp_path):
    """Renaming over /dev/null or /dev/stdout would replace them (as root), over a pipe would leave its
    reader waiting: such paths are written as they are. Here a pipe, read by a thread."""
    pipe = str(tmp_path / "pipe")
    os.mkfifo(pipe)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(pipe).read()), daemon=True)
    reader.start()
    generate.write_jsonl(pipe, [{"index": 0}, {"index": 1}])
    reader.join(timeout=30)
    assert got == ['{"index": 0}\n{"index": 1}\n'] and stat.S_ISFIFO(os.stat(pipe).st_mode)
    generate.check_writable(pipe, str(tmp_path / "p.txt"), str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["rank1_missing", "all_missing", "too_long", "missing_file", "no_tokenizer"])
def test_a_clean_error_of_several_ranks_is_one_line(case, ckpt, broken, inputs, tmp_path):
    """A shard missing on rank 1 only or on both, a prompt rank 0 refuses, a missing input file, no tokenizer:
    every rank exits, with status 1, and the user reads one line (torchrun itself adds some 35 lines
    of report, and a rank exiting with gloo's threads alive added an abort message)."""
    args = {"rank1_missing": ["--ckpt-path", broken["rank1_missing"], "--input-file", inputs["text"]],
            "too_long": ["--ckpt-path", ckpt[2], "--input-file", inputs["text"], "--max-seq-len", "8"],
            "missing_file": ["--ckpt-path", ckpt[2], "--input-file", str(tmp_path / "absent.txt")],
            "no_tokenizer": ["--ckpt-path", str(tmp_path / "mp2"), "--input-file", inputs["text"]],
            "all_missing": ["--ckpt-path", ckpt[1], "--input-file", inputs["text"]]}[case]
    if case == "no_tokenizer":
        shutil.copytree(ckpt[2], tmp_path / "mp2", ignore=shutil.ignore_patterns("tokenizer*"))
    start = time.monotonic()
    done = launch(ranks(2, *args, "--timeout", "30"))
    assert time.monotonic() - start < 60
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    line = done.stderr.strip()
    assert {"rank1_missing": "generate.py: error: rank 1: ", "too_long": "generate.py: error: rank 0: prompt 2 has 10 tokens",
            "missing_file": "generate.py: error: rank 0: input file ", "no_tokenizer": "generate.py: error: rank 0: no tokenizer",
            "all_missing": "generate.py: error: rank 0: "}[case] in line, line
    if case == "all_missing":
        assert "model0-mp2.safetensors not found" in line and line.endswith("(rank 1 failed too)"), line
    if case == "rank1_missing":
        assert "model1-mp2.safetensors not found" in line


@pytest.mark.slow
def test_a_usage_error_is_said_once(ckpt):
    """Under the README's command the command line is checked before any rank starts; under plain
    torchrun every rank checks it, and only rank 0 says what is wrong."""
    for cmd in (ranks(2, "--ckpt-path", ckpt[2]), torchrun(2, "--ckpt-path", ckpt[2])):
        done = launch(cmd)
        assert done.returncode != 0
        assert done.stderr.count("generate.py: error: give --input-file or --interactive") == 1, done.stderr
        assert done.stderr.count("usage: generate.py") == 1, done.stderr


def test_launch_scripts_pass_only_what_the_user_sets(tmp_path):
    """run_mp8.sh and run_node_*.sh hand generate.py the launch settings, the checkpoint and the
    input file, then the user's arguments: no generation setting of their own."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_FILE"\n')
    stub.chmod(0o755)
    base = env(PATH=f"{tmp_path}:{os.environ['PATH']}", ARGS_FILE=str(tmp_path / "args"), CKPT_PATH="/ckpt",
               INPUT_FILE="p.txt", MASTER_ADDR="10.0.0.1")
    generation = re.compile(r"--(max-new-tokens|temperature|top-p|seed|max-batch-size|max-seq-len|dtype|backend)$")
    for script in ("run_mp8.sh", "run_node_0.sh", "run_node_1.sh"):
        subprocess.run([os.path.join(ROOT, script), "--temperature", "0"], env=base, check=True, timeout=30)
        args = (tmp_path / "args").read_text().split("\n")[:-1]
        assert args[0] == GENERATE or args[0].endswith("/generate.py")
        assert args[-2:] == ["--temperature", "0"]
        assert not [a for a in args[:-2] if generation.match(a)], (script, args)
        assert args[args.index("--ckpt-path") + 1] == "/ckpt" and args[args.index("--input-file") + 1] == "p.txt"
        if script != "run_mp8.sh":
            assert args[args.index("--node-rank") + 1] == script[-4] and args[args.index("--master-addr") + 1] == "10.0.0.1"


# ---------------------------------------------------------------- a rank that dies

def children(pid: int) -> dict:
    """{RANK: pid} of the torchrun workers started by process pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, ValueError, IndexError):
            continue                                      # gone meanwhile, or not ours to read
        if parent == pid and b"RANK" in environ:
            found[int(environ[b"RANK"])] = int(entry)
    return found


def start_long_job(ckpt, inputs, log):
    """A job of 2 ranks with a long generation ahead, once every rank holds its weights: the Popen of
    generate.py (in a session of its own, as a shell's foreground job is), its stderr so far."""
    with open(log, "w") as err:
        job = subprocess.Popen(ranks(2, "--ckpt-path", ckpt[2], "--input-file", inputs["jsonl"], "--max-new-tokens",
                                     "500", "--max-batch-size", "1", "--temperature", "0", "--max-seq-len", "600"),
                               env=env(), stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while "generate.py: loaded" not in log.read_text():
        if job.poll() is not None or time.monotonic() > deadline:
            os.killpg(job.pid, signal.SIGKILL)
            pytest.fail(log.read_text())
        time.sleep(0.2)
    return job, log.read_text()


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_with_one_line(ckpt, inputs, tmp_path):
    job, before = start_long_job(ckpt, inputs, tmp_path / "stderr.txt")
    try:
        workers = children(job.pid)
        assert sorted(workers) == [0, 1]
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        assert job.wait(timeout=60) == 1
        assert time.monotonic() - killed < 60
        assert not os.path.exists(f"/proc/{workers[0]}")          # rank 0 did not outlive the job
        after = said((tmp_path / "stderr.txt").read_text()[len(before):])
        assert after == ["generate.py: error: rank 1 was killed by SIGKILL"]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.mark.slow
def test_ctrl_c_ends_the_job_with_one_line(ckpt, inputs, tmp_path):
    """Ctrl-C reaches the foreground job's process group: generate.py, not its ranks, which the
    launcher stops. Before, each rank and torchrun printed a traceback (77 lines)."""
    job, before = start_long_job(ckpt, inputs, tmp_path / "stderr.txt")
    try:
        workers = children(job.pid)
        os.killpg(job.pid, signal.SIGINT)
        assert job.wait(timeout=60) == 130
        assert not any(os.path.exists(f"/proc/{pid}") for pid in workers.values())
        assert said((tmp_path / "stderr.txt").read_text()[len(before):]) == ["generate.py: interrupted"]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


@pytest.mark.slow
def test_a_node_left_alone_gives_up_at_the_timeout_with_one_line(ckpt, inputs, tmp_path):
    """Node 0 of two whose other node never comes: torchrun's own wait is 15 minutes; --timeout bounds it."""
    started = time.monotonic()
    done = subprocess.run(ranks(1, "--nnodes", "2", "--node-rank", "0", "--master-addr", "127.0.0.1", "--master-port",
                                str(free_port()), "--timeout", "4", "--ckpt-path", ckpt[2], "--input-file",
                                inputs["text"], "--output-file", str(tmp_path / "out.jsonl"), *GREEDY),
                          env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60
    lines = said(done.stderr)
    assert len(lines) == 1 and re.fullmatch(
        r"generate\.py: error: starting the ranks failed: .*\(the 2 nodes meet at 127\.0\.0\.1:\d+ within --timeout "
        r"4 s: is every node started, with the same address and port\?\)", lines[0]), done.stderr
    assert not (tmp_path / "out.jsonl").exists()


def loading_torch(pids: list, n: int) -> bool:
    """Whether n processes pids have each begun to load torch's library."""
    try:
        return len(pids) == n and all("libtorch" in open(f"/proc/{pid}/maps").read() for pid in pids)
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2])
def test_ctrl_c_while_torch_loads_ends_with_one_line(ckpt, inputs, tmp_path, n):
    """Ctrl-C as soon as torch begins to load (seconds): in one process; with 2 ranks, in both, the
    launcher passing it on to them. Before, each printed a traceback."""
    argv = ["--ckpt-path", ckpt[n], "--input-file", inputs["text"], "--output-file", str(tmp_path / "out.jsonl")]
    job = subprocess.Popen([sys.executable, GENERATE, *argv] if n == 1 else ranks(n, *argv), env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while not loading_torch([job.pid] if n == 1 else list(children(job.pid).values()), n) \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(job.pid, signal.SIGINT)
        _, err = job.communicate(timeout=60)
        assert job.returncode == 130 and said(err) == ["generate.py: interrupted"], err
        assert not (tmp_path / "out.jsonl").exists()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def test_failure_line_names_what_no_rank_said():
    def failures(later=(), **codes):
        """{rank: a failure of that exit status}, recorded at 0 s, or at 31 s for the ranks in later."""
        return {int(rank[1:]): types.SimpleNamespace(exitcode=code, timestamp=31 if int(rank[1:]) in later else 0)
                for rank, code in codes.items()}
    assert generate.failure_line(failures(r0=1, r1=-signal.SIGTERM)) is None              # rank 0 said it
    assert generate.failure_line(failures(r0=-signal.SIGTERM, r1=1)) is None
    assert generate.failure_line(failures(r0=-signal.SIGTERM, r1=-signal.SIGKILL, r2=generate.LOST)) == \
        "rank 1 was killed by SIGKILL"
    assert generate.failure_line(failures(r0=-signal.SIGTERM, r1=generate.LOST)).startswith(
        "rank 1 lost contact with the other ranks")
    assert generate.failure_line(failures(r3=-signal.SIGTERM)) == "rank 3 ended with exit status -15"
    # rank 1 stopped answering: rank 0 lost contact at the timeout, the agent's SIGTERM went unheeded
    # and its SIGKILL came 30 s later
    assert generate.failure_line(failures(later=(1,), r0=generate.LOST, r1=-signal.SIGKILL)).startswith(
        "rank 0 lost contact with the other ranks")


@pytest.mark.parametrize("ending", ["killed", "interrupted"])
def test_the_launchers_line_follows_an_unfinished_progress_bar_on_a_line_of_its_own(ending, monkeypatch, capsys):
    """The agent stops rank 0 wherever it is, perhaps after it drew a progress bar and before it
    ended that line (CI once read the launcher's line glued to the bar's)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def stopped_mid_bar(config):
        sys.stderr.write("\rgenerate: 12token [00:01, 9.0token/s, 0/8 prompts]")
        if ending == "interrupted":
            raise SignalException("stopped", signal.SIGINT)
        raise ChildFailedError("generate.py", {r: ProcessFailure(r, 100 + r, code, "/nonexistent")
                                               for r, code in ((0, -signal.SIGTERM), (1, -signal.SIGKILL))})
    monkeypatch.setattr(torchrun, "run", stopped_mid_bar)
    assert run_here("--nproc-per-node", "2", "--ckpt-path", "/ckpt", "--input-file", "p.txt") == \
        {"killed": 1, "interrupted": 130}[ending]
    assert said(capsys.readouterr().err) == [{"killed": "generate.py: error: rank 1 was killed by SIGKILL",
                                               "interrupted": "generate.py: interrupted"}[ending]]


def ranks_by_hand(n: int, cmd: list) -> list:
    """n ranks of cmd started as torchrun starts them (RANK, WORLD_SIZE, MASTER_*), but with no agent
    that would stop the others once one exits: each one's own exit can be timed."""
    port = str(free_port())
    return [subprocess.Popen(cmd, env=env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                                          MASTER_PORT=port), cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
            for r in range(n)]


def exit_after(procs: list, marker: str) -> tuple:
    """Read rank 0's stderr until a line holding marker; (seconds from it until the last rank has
    exited, exit statuses, rank 0's stderr)."""
    seen, lines = None, []
    for line in procs[0].stderr:
        lines.append(line)
        if marker in line:
            seen = time.monotonic()
            break
    statuses = [p.wait(timeout=LAUNCH_TIMEOUT) for p in procs]
    lines += procs[0].stderr.readlines()
    assert seen is not None, "".join(lines)
    return time.monotonic() - seen, statuses, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_every_rank_ends_promptly(outcome, ckpt, inputs, tmp_path):
    """Every rank destroys its process groups and returns, after success (rank 0 wrote the output and
    the summary) and after a failure (rank 0 said what was wrong), within seconds and with its own
    exit status, while --timeout (600 s) is what a rank left waiting would take."""
    args = ["--ckpt-path", ckpt[2], "--input-file", inputs["text"], *GREEDY, "--output-file", str(tmp_path / "o.jsonl")]
    if outcome == "failure":
        args[args.index("--input-file") + 1] = str(tmp_path / "absent.txt")
    procs = ranks_by_hand(2, [sys.executable, GENERATE, *args])
    try:
        seconds, statuses, err = exit_after(procs, "generate.py: 7 prompts" if outcome == "success" else "error: ")
        assert statuses == ([0, 0] if outcome == "success" else [1, 1]), err
        assert seconds < 15, err
        assert "terminate called" not in err and "destroy_process_group() was not called" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# ---------------------------------------------------------------- pieces

def test_read_prompts(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("first\nstill first\n\n \n\n  second  \n\n\n")
    assert runtime.read_prompts(str(text)) == ["first\nstill first", "second"]
    looks_json = tmp_path / "q.txt"
    looks_json.write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    assert runtime.read_prompts(str(looks_json)) == ["a", [{"role": "user", "content": "b"}]]
    not_json = tmp_path / "r.txt"
    not_json.write_text("{curly} text\n\nmore")
    assert runtime.read_prompts(str(not_json)) == ["{curly} text", "more"]


def test_output_is_written_atomically(tmp_path):
    path = tmp_path / "out.jsonl"
    generate.write_jsonl(str(path), [{"a": 1}, {"b": "é"}])
    assert path.read_text(encoding="utf-8") == '{"a": 1}\n{"b": "é"}\n'
    with pytest.raises(TypeError):
        generate.write_jsonl(str(tmp_path / "bad.jsonl"), [{"a": 1}, {"b": object()}])
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl"]     # neither the target nor the temporary file


def test_sentencepiece_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=40,
                                   user_defined_symbols=list(runtime.Tokenizer.SPECIAL), minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<｜end▁of▁sentence｜>"}))
    tok = runtime.Tokenizer(str(tmp_path))
    special = {s: tok.token_id(s) for s in runtime.Tokenizer.SPECIAL}
    assert tok.eos_id == special["<｜end▁of▁sentence｜>"]
    ids = tok.encode(encode_messages([{"role": "user", "content": "hello fox"}]))
    assert ids[:2] == [special["<｜begin▁of▁sentence｜>"], special["<｜User｜>"]]
    assert ids[-2:] == [special["<｜Assistant｜>"], special["</think>"]]
    assert tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
