"""generate.py on shards that keep the release's FP8 / MXFP4 weights (convert.py --dtype fp8), on CPU.

Dequantising an FP8 or FP4 weight is exact, so at float32 the model on FP8 shards computes what the
model on BF16 shards does: the same logits bit for bit (prefill), and greedy completions token for
token on 1 rank, on 2 and 4 ranks under torchrun (4 in the o-groups layout), and as two nodes
(run_node_0.sh + run_node_1.sh on localhost), for V4 with MXFP4 or FP8 experts and for R1. The
Triton path on FP8 shards is checked in Triton's interpreter against the torch path on BF16 shards.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import generate
from testkit.fp8 import convert_to, shard_model, write_r1, write_v4
from testkit.runs import env, free_port, one_thread  # noqa: F401  (one_thread: a fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT = 240
PROMPTS = ["Hello there", "What is two plus two?", "Tell me a story about a dragon who lives in a cave.",
           "hi again", "Why is the sky blue? Answer in one sentence, please.", "ok", "List three prime numbers."]
GREEDY = ["--max-new-tokens", "6", "--temperature", "0", "--dtype", "fp32", "--max-batch-size", "3",
          "--max-seq-len", "256"]


def completion_ids(path) -> list:
    with open(path) as f:
        return [json.loads(line)["completion_ids"] for line in f]


def run_here(ckpt: str, prompts: str, out) -> list:
    assert generate.main(["--ckpt-path", ckpt, "--input-file", prompts, "--output-file", str(out), *GREEDY]) == 0
    return completion_ids(out)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "prompts.txt"
    path.write_text("\n\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """{name: converted folder} of one V4 release: bf16 and fp8 for 1, 2 and 4 ranks, fp8 experts for 1."""
    root = str(tmp_path_factory.mktemp("v4"))
    release = os.path.join(root, "release")
    write_v4(release)
    out = {"bf16": convert_to(release, root, 1, "bf16"), "fp8 fp8-experts": convert_to(release, root, 1, "fp8", "fp8")}
    for n in (1, 2, 4):
        out[f"fp8 mp{n}"] = convert_to(release, root, n, "fp8")
    return out


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("r1"))
    release = os.path.join(root, "release")
    write_r1(release)
    return {"bf16": convert_to(release, root, 1, "bf16"), "fp8 mp1": convert_to(release, root, 1, "fp8"),
            "fp8 mp2": convert_to(release, root, 2, "fp8")}


@pytest.fixture(scope="module")
def reference(v4, r1, prompts, tmp_path_factory):
    """Greedy completion ids from the BF16 shards on one rank, for V4 and R1."""
    out = tmp_path_factory.mktemp("reference")
    found = {name: run_here(ckpts["bf16"], prompts, out / f"{name}.jsonl") for name, ckpts in (("v4", v4), ("r1", r1))}
    assert all(len(set(map(tuple, ids))) > 1 for ids in found.values())      # not one reply for every prompt
    return found


@pytest.mark.parametrize("family, load", [("v4", "fp8 mp1"), ("v4", "fp8 fp8-experts"), ("r1", "fp8 mp1")])
def test_logits_equal_bf16_shards_bit_for_bit(family, load, v4, r1):
    ckpts = {"v4": v4, "r1": r1}[family]
    ids = torch.randint(0, 129280, (3, 17), generator=torch.Generator().manual_seed(5))
    plain, lowp = (shard_model(ckpts[name], "fp32", "torch", "cpu") for name in ("bf16", load))
    assert torch.equal(plain(ids[:, :12]), lowp(ids[:, :12]))
    assert torch.equal(plain(ids[:, 12:14], 12), lowp(ids[:, 12:14], 12))
    pos = torch.tensor([14, 14, 14])
    for step in range(3):       # the decode step stacks other matrices (FP8 and BF16 apart): sums may differ in order
        torch.testing.assert_close(lowp.decode(ids[:, 14 + step:15 + step], pos),
                                   plain.decode(ids[:, 14 + step:15 + step], pos), rtol=1e-5, atol=1e-5)
        pos = pos + 1


def test_fp8_layers_hold_low_precision_weights(v4):
    model = shard_model(v4["fp8 mp1"], "bf16", "torch", "cpu")
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["layers.1.attn.wq_a.weight"] == torch.float8_e4m3fn
    assert dtypes["layers.1.attn.wo_a.scale"] == torch.float8_e8m0fnu
    assert dtypes["layers.1.ffn.experts.3.w2.weight"] == torch.int8
    assert dtypes["layers.1.attn.indexer.weights_proj.weight"] == torch.bfloat16
    assert dtypes["layers.1.attn.compressor.wkv.weight"] == torch.bfloat16
    plain = shard_model(v4["bf16"], "bf16", "torch", "cpu")

    def nbytes(m, part):
        return sum(p.numel() * p.element_size() for name, p in m.named_parameters() if part in name)
    assert nbytes(model, ".experts.") / nbytes(plain, ".experts.") == (0.5 + 1 / 32) / 2   # e2m1 + a scale per 32
    assert nbytes(model, "layers.") / nbytes(plain, "layers.") < 0.5


def test_mxfp4_expert_scales_stack_group_major(v4):
    """MoE.stacked_weights lays the MXFP4 experts' scales out group after group (parallel.group_major: a
    group's scales of all rows side by side, as the kernels load them): the same values, each expert's
    scale parameters views into the stacks, the logits unchanged; FP8 experts' block scales as they were."""
    model = shard_model(v4["fp8 mp1"], "fp32", "torch", "cpu")
    ids = torch.randint(0, 129280, (2, 9), generator=torch.Generator().manual_seed(6))
    want = model(ids)
    moe = model.layers[1].ffn
    experts = [moe.experts[i] for i in moe.local]
    scales = {name: p.clone() for name, p in moe.named_parameters() if name.endswith("scale")}
    (w13, s13), (w2, s2) = moe.stacked_weights()[:2]
    inter = experts[0].w1.weight.size(0)
    for s in (s13, s2):
        assert s.dtype == torch.float8_e8m0fnu and s.stride(1) == 1 and s.stride(2) == s.size(1)
    for j, (i, e) in enumerate(zip(moe.local, experts)):
        parts = {"w1": s13[j, :inter], "w3": s13[j, inter:], "w2": s2[j]}
        for name, part in parts.items():
            assert torch.equal(part.view(torch.uint8), scales[f"experts.{i}.{name}.scale"].view(torch.uint8))
            assert getattr(e, name).scale.data_ptr() == part.data_ptr()
    assert torch.equal(model(ids), want)
    fp8 = shard_model(v4["fp8 fp8-experts"], "fp32", "torch", "cpu").layers[1].ffn
    assert fp8.stacked_weights()[0][1].is_contiguous()


@pytest.mark.parametrize("family, load", [("v4", "fp8 mp1"), ("v4", "fp8 fp8-experts"), ("r1", "fp8 mp1")])
def test_one_rank_greedy_equals_bf16_shards(family, load, v4, r1, prompts, reference, tmp_path):
    ckpts = {"v4": v4, "r1": r1}[family]
    assert run_here(ckpts[load], prompts, tmp_path / "out.jsonl") == reference[family]


@pytest.mark.slow
@pytest.mark.parametrize("family, n", [("v4", 2), ("v4", 4), ("r1", 2)])
def test_torchrun_greedy_equals_bf16_shards(family, n, v4, r1, prompts, reference, tmp_path):
    ckpts = {"v4": v4, "r1": r1}[family]
    out = tmp_path / "out.jsonl"
    extra = {"NPROC_PER_NODE": str(n), "CKPT_PATH": ckpts[f"fp8 mp{n}"], "INPUT_FILE": prompts,
             "MASTER_PORT": str(free_port()), "USE_OGROUPS_COMM": "1" if n == 4 else "0"}
    done = subprocess.run([os.path.join(ROOT, "run_mp8.sh"), *GREEDY, "--output-file", str(out)], env=env(**extra),
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert completion_ids(out) == reference[family]


@pytest.mark.slow
def test_two_nodes_greedy_equals_bf16_shards(v4, prompts, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    extra = env(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                CKPT_PATH=v4["fp8 mp2"], INPUT_FILE=prompts, USE_OGROUPS_COMM="0")
    nodes = [subprocess.Popen([os.path.join(ROOT, f"run_node_{i}.sh"), *GREEDY, "--output-file", str(out)],
                              env=extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = [node.communicate(timeout=LAUNCH_TIMEOUT) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], results
    assert completion_ids(out) == reference["v4"]


def test_shards_that_do_not_fit_the_config_are_refused(v4, prompts, tmp_path, capsys):
    """FP8 shards beside a config.json without the format (as a hand-made config would be): one line."""
    folder = tmp_path / "stripped"
    shutil.copytree(v4["fp8 mp1"], folder)
    with open(folder / "config.json") as f:
        config = json.load(f)
    del config["weights"], config["expert_weights"]
    (folder / "config.json").write_text(json.dumps(config))
    assert generate.main(["--ckpt-path", str(folder), "--input-file", prompts, *GREEDY]) == 1
    err = capsys.readouterr().err
    assert err.startswith("generate.py: error: ") and err.count("\n") == 1, err
    assert re.search(r"does not fit this model \(1 ranks\): layers\.0\.attn\.wq_a\.weight is torch\.float8_e4m3fn "
                     r"in the checkpoint and torch\.float32 in the model: config\.json's weights", err), err


def test_mxfp4_scales_above_two_are_refused(v4, prompts, tmp_path, capsys):
    """A shard whose MXFP4 expert holds a scale of 4 (ue8m0 exponent 129, beyond what the kernels widen
    exactly): one line naming the tensor, exit status 1; a scale of exactly 2 (128) loads."""
    for exponent, refused in ((128, False), (129, True)):
        folder = tmp_path / f"scale{exponent}"
        shutil.copytree(v4["fp8 mp1"], folder)
        shard = folder / "model0-mp1.safetensors"
        tensors = load_file(shard)
        name = "layers.1.ffn.experts.2.w3.scale"
        raw = tensors[name].view(torch.uint8).clone()
        raw[3, 1] = exponent
        tensors[name] = raw.view(torch.float8_e8m0fnu)
        save_file(tensors, shard)
        code = generate.main(["--ckpt-path", str(folder), "--input-file", prompts, *GREEDY])
        err = capsys.readouterr().err
        if refused:
            assert code == 1 and err.startswith("generate.py: error: ") and err.count("\n") == 1, err
            assert f"{name} holds MXFP4 scales above 2 (ue8m0 exponent 129 > 128)" in err, err
        else:
            assert code == 0, err


def test_triton_path_on_fp8_shards_in_the_interpreter():
    run = subprocess.run([sys.executable, "-m", "testkit.fp8"], cwd=ROOT, env=dict(os.environ, TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=900)
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" ok\n") == 3, run.stdout
