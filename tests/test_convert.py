"""convert.py on a tiny random release: every output tensor against the dequantised reference,
the rank layout, BF16 input, and each kind of bad input through the command line.

The release has 4 heads, 16 indexer heads, 8 experts and o_groups 2, so N = 1 and 2 are plain
layouts and N = 4 is the o-groups layout (USE_OGROUPS_COMM=1).
"""
import filecmp
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file

import convert
import random_release
from random_release import hf_config, read_release, write_release
from testkit.convert_runs import DAMAGED_FILES, check_failed_job_leaves_no_shards, check_interrupt_leaves_no_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EXPERTS, O_GROUPS = 8, 2
VOCAB = ("embed.weight", "head.weight")
ROWS = (".attn.wq_b.weight", ".attn.attn_sink", ".attn.indexer.wq_b.weight",
        ".attn.indexer.weights_proj.weight", ".ffn.shared_experts.w1.weight", ".ffn.shared_experts.w3.weight")
COLS = (".ffn.shared_experts.w2.weight",)
GROUPED = {".attn.wo_a.weight": 0, ".attn.wo_b.weight": 1}


def expected_piece(name, value, rank, n):
    """What rank `rank` of n should hold of a reference tensor; None when it holds nothing."""
    expert = re.search(r"\.ffn\.experts\.(\d+)\.", name)
    if expert:
        return value if int(expert.group(1)) // (N_EXPERTS // n) == rank else None
    for suffix, dim in GROUPED.items():
        if name.endswith(suffix):
            if n > O_GROUPS:
                return value.chunk(O_GROUPS, dim)[rank // (n // O_GROUPS)]
            return value.chunk(n, dim)[rank]
    if name in VOCAB or name.endswith(ROWS):
        return value.chunk(n, 0)[rank]
    if name.endswith(COLS):
        return value.chunk(n, 1)[rank]
    return value


def shard_paths(dst, n):
    return [os.path.join(dst, f"model{r}-mp{n}.safetensors") for r in range(n)]


def finished_outputs(dst):
    return glob.glob(os.path.join(dst, "model*-mp*.safetensors"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("release"))
    reference = write_release(path, seed=0, n_files=3)
    stored = {name: t.dtype for name, t in read_release(path).items()}
    return path, reference, stored


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    """N -> output folder, converted in this process."""
    out = {}
    for n in (1, 2, 4):
        dst = str(tmp_path_factory.mktemp(f"mp{n}"))
        convert.convert(release[0], dst, n, num_workers=1, ogroups_comm=n > O_GROUPS)
        out[n] = dst
    return out


@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_tensor_is_the_expected_slice(release, converted, n):
    _, reference, stored = release
    for rank, path in enumerate(shard_paths(converted[n], n)):
        shard = load_file(path)
        wanted = {name: expected_piece(name, value, rank, n) for name, value in reference.items()}
        wanted = {name: value for name, value in wanted.items() if value is not None}
        assert sorted(shard) == sorted(wanted)
        for name, value in wanted.items():
            quantised = stored[name] in (torch.float8_e4m3fn, torch.int8)
            assert shard[name].dtype == (torch.bfloat16 if quantised else stored[name]), name
            assert shard[name].shape == value.shape, name
            assert torch.equal(shard[name].float(), value.float()), name


@pytest.mark.parametrize("n", [2, 4])
def test_shards_concatenate_back(converted, n):
    whole = load_file(shard_paths(converted[1], 1)[0])
    shards = [load_file(p) for p in shard_paths(converted[n], n)]
    for name, full in whole.items():
        pieces = [s[name] for s in shards if name in s]
        if len(pieces) == 1 or pieces[0].shape == full.shape:      # an expert, or a replicated tensor
            assert all(torch.equal(p, full) for p in pieces), name
            continue
        dim = next(d for d in range(full.dim()) if pieces[0].shape[d] != full.shape[d])
        parts = full.shape[dim] // pieces[0].shape[dim]
        distinct = pieces[::n // parts]                            # o-groups: n // parts ranks share a part
        assert all(torch.equal(p, distinct[i * parts // n]) for i, p in enumerate(pieces)), name
        assert torch.equal(torch.cat(distinct, dim), full), name


def test_experts_land_on_their_ranks(converted):
    for rank, path in enumerate(shard_paths(converted[4], 4)):
        with safe_open(path, "pt") as f:
            experts = {int(m.group(1)) for m in map(re.compile(r"\.experts\.(\d+)\.").search, f.keys()) if m}
        assert experts == {2 * rank, 2 * rank + 1}


def test_side_files_copied(release, converted):
    for fname in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(os.path.join(release[0], fname), os.path.join(converted[2], fname), shallow=False)


def test_bf16_release_gives_identical_shards(converted, tmp_path):
    src, dst = str(tmp_path / "bf16"), str(tmp_path / "out")
    write_release(src, seed=0, n_files=2, bf16=True)
    convert.convert(src, dst, 2, num_workers=1)
    for ours, theirs in zip(shard_paths(dst, 2), shard_paths(converted[2], 2)):
        assert filecmp.cmp(ours, theirs, shallow=False)


def test_int64_tensors_keep_their_dtype(tmp_path, monkeypatch):
    monkeypatch.setattr(random_release, "TID2EID_DTYPE", torch.int64)
    src, dst = str(tmp_path / "src"), str(tmp_path / "out")
    reference = write_release(src, config=hf_config(vocab_size=256), n_files=1)
    convert.convert(src, dst, 2, num_workers=1)
    shard = load_file(shard_paths(dst, 2)[1])
    assert shard["layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert torch.equal(shard["layers.0.ffn.gate.tid2eid"], reference["layers.0.ffn.gate.tid2eid"])


def test_converted_model_gives_the_reference_logits(release, converted):
    model_py = pytest.importorskip("model")
    config = os.path.join(converted[1], "config.json")
    ids = torch.tensor([[5, 77, 1023, 9, 4000, 12, 600, 31, 2, 128000]])
    logits = []
    for load in (lambda m: load_model(m, shard_paths(converted[1], 1)[0]),
                 lambda m: m.load_state_dict(release[1], strict=False)):
        model = model_py.Transformer(model_py.ModelArgs.from_file(config, dtype="fp32", max_seq_len=64,
                                                                  max_batch_size=1))
        load(model)
        logits.append(model(ids))
    assert torch.equal(logits[0], logits[1])


# ----------------------------------------------------------------------------- failures

def test_failed_job_leaves_no_shards(release, tmp_path, monkeypatch):
    check_failed_job_leaves_no_shards(release[0], str(tmp_path / "out"), monkeypatch, "dequant_fp4",
                                      r"tensor layers\.\d+\.ffn\.experts\.\d+\.w\d\.weight: injected")


def test_interrupt_leaves_no_shards(release, tmp_path, monkeypatch):
    check_interrupt_leaves_no_shards(release[0], str(tmp_path / "out"), monkeypatch)


def test_sigterm_leaves_no_shards_and_one_line(release, tmp_path, monkeypatch, capsys):
    """A scheduler's SIGTERM while two workers (where there are two CPUs) write: the signal arrives in
    the main thread, the partial shards go, one line, status 143 (128 + SIGTERM)."""
    write_all, pool = convert._write_all, min(2, os.cpu_count() or 1)

    def stopped_midway(jobs, temps, workers, total):
        assert workers == pool and all(os.path.exists(t) for t in temps)
        os.kill(os.getpid(), signal.SIGTERM)
        write_all(jobs, temps, workers, total)         # the handler raises before or during it

    monkeypatch.setattr(convert, "_write_all", stopped_midway)
    argv = _argv(release[0], str(tmp_path / "out"), ["--num-workers", str(pool)])
    monkeypatch.setattr(sys, "argv", ["convert.py", *argv])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            convert.main()
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stop.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.splitlines()[-1] == "convert.py: stopped by SIGTERM; partial shards removed"
    assert os.listdir(tmp_path / "out") == []


def test_a_file_as_save_path_is_refused(release, tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(convert.ConvertError, match=r"--save-path .*afile is a file: give a folder"):
        convert.convert(release[0], str(tmp_path / "afile"), 1, num_workers=1)
    assert (tmp_path / "afile").read_text() == "mine"


def test_switches_and_worker_counts(release, tmp_path, monkeypatch):
    """USE_OGROUPS_COMM reads as generate.py reads it (on/off too, other values refused); --num-workers
    stays within the CPUs."""
    for value, on in (("on", True), ("1", True), ("yes", True), ("off", False), ("0", False), ("", False)):
        monkeypatch.setenv("USE_OGROUPS_COMM", value)
        assert convert.env_flag("USE_OGROUPS_COMM") is on
    for value in ("2", "ture"):
        monkeypatch.setenv("USE_OGROUPS_COMM", value)
        with pytest.raises(convert.ConvertError, match=f"USE_OGROUPS_COMM must be 1 or 0 .*, got '{value}'"):
            convert.env_flag("USE_OGROUPS_COMM")
    monkeypatch.delenv("USE_OGROUPS_COMM")
    for workers in ("0", str((os.cpu_count() or 1) + 1)):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"),
                               *_argv(release[0], str(tmp_path / "out"), ["--num-workers", workers])],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "--num-workers must be in 1 .. " in done.stderr, done.stderr
    assert not os.path.exists(tmp_path / "out")


def _rewrite(path, edit):
    """Rewrite one safetensors file after edit(dict of its tensors) changes the dict in place."""
    tensors = {}
    with safe_open(path, "pt") as f:
        for name in f.keys():
            tensors[name] = f.get_tensor(name)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _file_of(src, name):
    with open(os.path.join(src, convert.INDEX_FILE)) as f:
        return os.path.join(src, json.load(f)["weight_map"][name])


def _drop_from_index(src, name):
    index_path = os.path.join(src, convert.INDEX_FILE)
    with open(index_path) as f:
        index = json.load(f)
    del index["weight_map"][name]
    with open(index_path, "w") as f:
        json.dump(index, f)


SCALE = "layers.1.attn.wq_b.scale"
EXPERT_SCALE = "layers.0.ffn.experts.3.w2.scale"

# name -> (how to spoil a copy of the release, extra CLI arguments, environment, words the error must have):
# the damaged files both families refuse, then V4's own
BAD_INPUTS = {
    **DAMAGED_FILES,
    "scale_absent_from_file": (lambda src: _rewrite(_file_of(src, SCALE), lambda t: t.pop(SCALE)), [], {},
                               [SCALE, "absent from the file"]),
    "weight_without_scale": (lambda src: (_rewrite(_file_of(src, SCALE), lambda t: t.pop(SCALE)),
                                          _drop_from_index(src, SCALE)), [], {},
                             ["layers.1.attn.wq_b.weight", "without its scale"]),
    "fp8_scale_shape": (lambda src: _rewrite(_file_of(src, SCALE), lambda t: t.update({SCALE: t[SCALE][:, :0]})),
                        [], {}, [SCALE, "does not fit"]),
    "fp4_scale_shape": (lambda src: _rewrite(_file_of(src, EXPERT_SCALE),
                                             lambda t: t.update({EXPERT_SCALE: t[EXPERT_SCALE][:-1]})),
                        [], {}, [EXPERT_SCALE, "does not fit"]),
    "float16_tensor": (lambda src: _rewrite(_file_of(src, "norm.weight"),
                                            lambda t: t.update({"norm.weight": t["norm.weight"].half()})),
                       [], {}, ["norm.weight", "F16"]),
    "experts_not_divisible": (lambda src: None, ["--model-parallel", "3"], {},
                              ["with --model-parallel 3", "is not divisible by the world size 3"]),
    "heads_not_divisible": (lambda src: None, ["--model-parallel", "8"], {"USE_OGROUPS_COMM": "1"},
                            ["n_heads=4 is not divisible by the world size 8"]),
    "experts_disagree": (lambda src: None, ["--n-experts", "16"], {}, ["--n-experts 16", "n_routed_experts=8"]),
    "above_o_groups": (lambda src: None, ["--model-parallel", "4"], {}, ["USE_OGROUPS_COMM=1", "o_groups=2"]),
    "o_groups_comm_too_few_ranks": (lambda src: None, ["--model-parallel", "2"], {"USE_OGROUPS_COMM": "1"},
                                    ["USE_OGROUPS_COMM=1 needs", "got 2"]),
    "o_groups_disagree": (lambda src: None, ["--model-parallel", "4", "--o-groups", "1"], {"USE_OGROUPS_COMM": "1"},
                          ["--o-groups 1 differs from o_groups=2 of config.json"]),
    "o_groups_zero": (lambda src: None, ["--o-groups", "0"], {}, ["--o-groups 0 must be at least 1"]),
    "config_width_a_string": (lambda src: _edit_config(src, hidden_size="64"), [], {},
                              ["config.json", "dim must be an integer >= 1, got '64'"]),
    "config_rope_scaling_a_string": (lambda src: _edit_config(src, rope_scaling="yarn"), [], {},
                                     ["rope_scaling must be an object, got 'yarn'"]),
}


def _edit_config(src, **changes):
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(dict(config, **changes), f)


def _spoiled(release, root, case):
    """A spoiled copy of the release and an empty output folder for one case: (src, dst)."""
    src, dst = str(root / case / "src"), str(root / case / "dst")
    shutil.copytree(release[0], src)
    BAD_INPUTS[case][0](src)
    os.makedirs(dst)
    return src, dst


def _argv(src, dst, args):
    return ["--hf-ckpt-path", src, "--save-path", dst, "--model-parallel", "2", *args]   # a later flag wins


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused(release, tmp_path, monkeypatch, capsys, case):
    _, args, env, words = BAD_INPUTS[case]
    src, dst = _spoiled(release, tmp_path, case)
    monkeypatch.delenv("USE_OGROUPS_COMM", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["convert.py", *_argv(src, dst, args)])
    with pytest.raises(SystemExit) as exit_:
        convert.main()
    assert exit_.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("convert.py: error: ") and "\n" not in message
    for w in words:
        assert w in message
    assert finished_outputs(dst) == [] and os.listdir(dst) == []


@pytest.mark.parametrize("how", ["same", "trailing_slash", "symlink", "dot_dot"])
def test_save_path_that_is_the_release_is_refused(release, tmp_path, how):
    """Refused before any work: converting into the release folder wrote every shard there, then
    failed copying config.json onto itself."""
    src = str(tmp_path / "release")
    shutil.copytree(release[0], src)
    os.symlink(src, tmp_path / "link")
    dst = {"same": src, "trailing_slash": src + "/", "symlink": str(tmp_path / "link"),
           "dot_dot": os.path.join(src, "..", "release", ".")}[how]
    before = sorted(os.listdir(src))
    with pytest.raises(convert.ConvertError, match=r"--save-path .* is the release folder .*: the shards and config\.json "
                                                   r"need a folder of their own"):
        convert.convert(src, dst, 2, num_workers=1)
    assert sorted(os.listdir(src)) == before


def _cli(src, dst, args, env):
    base = {k: v for k, v in os.environ.items() if k != "USE_OGROUPS_COMM"}
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "convert.py"), *_argv(src, dst, args)],
                            env={**base, **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def cli_runs(release, tmp_path_factory):
    """A few command lines run as real processes, at once (each spends seconds importing torch):
    name -> (exit status, stderr, output folder)."""
    root = tmp_path_factory.mktemp("cli")
    runs = {}
    for case in ("truncated_file", "above_o_groups"):
        src, dst = _spoiled(release, root, case)
        runs[case] = (_cli(src, dst, BAD_INPUTS[case][1], BAD_INPUTS[case][2]), dst)
    good = str(root / "good")
    workers = str(min(2, os.cpu_count() or 1))
    runs["workers"] = (_cli(release[0], good, ["--model-parallel", "4", "--num-workers", workers],
                            {"USE_OGROUPS_COMM": "yes"}), good)
    results = {}
    for name, (proc, dst) in runs.items():
        _, err = proc.communicate(timeout=300)
        results[name] = (proc.returncode, err, dst)
    return results


@pytest.mark.parametrize("case", ["truncated_file", "above_o_groups"])
def test_command_line_exits_non_zero(cli_runs, case):
    rc, err, dst = cli_runs[case]
    assert rc == 1
    assert err.strip().startswith("convert.py: error: ") and BAD_INPUTS[case][3][-1] in err
    assert os.listdir(dst) == []


def test_worker_pool_matches_in_process(cli_runs, converted):
    rc, err, dst = cli_runs["workers"]
    assert rc == 0, err
    # stderr is no terminal here (no progress bar), as in a log file: it still says what was done
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert re.fullmatch(r"convert\.py: \d+ tensors of 3 files in .* -> 4 shards in .*good \([\d.]+ GiB\), 2 worker\(s\)",
                        lines[0]), err
    assert re.fullmatch(r"convert\.py: wrote model0-mp4\.safetensors \.\. model3-mp4\.safetensors and config\.json, "
                        r"tokenizer\.json, tokenizer_config\.json to .*good in [\d.]+ s", lines[1]), err
    for ours, theirs in zip(shard_paths(dst, 4), shard_paths(converted[4], 4)):
        assert filecmp.cmp(ours, theirs, shallow=False)
