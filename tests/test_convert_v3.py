"""convert.py on a tiny random DeepSeek-R1 / V3 release (testkit/release_v3.py): every output tensor
against the float32 products of the stored FP8 values and scales rounded to BF16, the rank layout, the
MTP module left out, a BF16 copy of the release as input, and each kind of bad input.

The release has 4 heads, 16 experts, intermediate sizes 320 (dense) and 48 (experts), so N = 1, 2
and 4 are all possible. The expected names and layout are written out here, from the official
DeepSeek-V3 convert.py's table, rather than taken from model_v3.py.
"""
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
from random_release import read_release
from testkit.release_v3 import dequantize_release_v3, r1_config, write_release_v3
from testkit.convert_runs import DAMAGED_FILES, check_failed_job_leaves_no_shards, check_interrupt_leaves_no_shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_EXPERTS, N_LAYERS = 16, 4

# Hugging Face name part -> ours, and our names split across ranks (the rest is copied whole).
RENAMED = {"embed_tokens": "embed", "lm_head": "head", "self_attn": "attn", "mlp": "ffn",
           "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "q_a_proj": "wq_a",
           "q_a_layernorm": "q_norm", "q_b_proj": "wq_b", "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm",
           "kv_b_proj": "wkv_b", "o_proj": "wo", "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3",
           "e_score_correction_bias": "bias"}
ROWS = re.compile(r"^(embed|head)\.weight$|\.attn\.(wq_b|wkv_b)\.weight$|\.ffn\.(shared_experts\.)?w[13]\.weight$")
COLS = re.compile(r"\.attn\.wo\.weight$|\.ffn\.(shared_experts\.)?w2\.weight$")
EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def ours(hf_name):
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    return ".".join(RENAMED.get(part, part) for part in name.split("."))


def expected_piece(name, value, rank, n):
    """What rank `rank` of n should hold of a tensor (our name); None when it holds nothing."""
    expert = EXPERT.search(name)
    if expert:
        return value if int(expert.group(1)) // (N_EXPERTS // n) == rank else None
    if ROWS.search(name):
        return value.chunk(n, 0)[rank]
    if COLS.search(name):
        return value.chunk(n, 1)[rank]
    return value


def shard_paths(dst, n):
    return [os.path.join(dst, f"model{r}-mp{n}.safetensors") for r in range(n)]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, what write_release_v3 returned, the same read back from the files, stored dtypes)."""
    path = str(tmp_path_factory.mktemp("r1"))
    reference = write_release_v3(path, seed=0, n_files=3)
    stored = {name: t.dtype for name, t in read_release(path).items()}
    return path, reference, dequantize_release_v3(path), stored


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
    """N -> output folder, converted in this process."""
    out = {}
    for n in (1, 2, 4):
        out[n] = str(tmp_path_factory.mktemp(f"r1-mp{n}"))
        convert.convert(release[0], out[n], n, num_workers=1)
    return out


def test_fixture_has_partial_blocks_and_inexact_products(release):
    """The fixture exercises what matters: edge blocks, and products that a bf16 multiply would get wrong."""
    path, reference, from_files, _ = release
    assert sorted(reference) == sorted(from_files)
    assert all(torch.equal(reference[k], from_files[k]) for k in reference)
    with open(os.path.join(path, convert.INDEX_FILE)) as f:
        scales = [k for k in json.load(f)["weight_map"] if k.endswith("_scale_inv")]
    stored = read_release(path)
    partial = [k for k in scales if any(d % 128 for d in stored[k[:-len("_scale_inv")]].shape)]
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv" in partial and len(partial) > 100
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 1)
    assert stored["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (1, 3)
    assert all(stored[k].dtype == torch.float32 for k in scales)
    w = "model.layers.1.self_attn.q_b_proj.weight"
    in_bf16 = stored[w].to(torch.bfloat16) * stored[w + "_scale_inv"].to(torch.bfloat16).repeat_interleave(
        128, 0).repeat_interleave(128, 1)[:192, :96]
    assert not torch.equal(in_bf16.float(), reference[w])


@pytest.mark.parametrize("n", [1, 2, 4])
def test_every_tensor_is_the_expected_slice(release, converted, n):
    _, _, from_files, stored = release
    model = {ours(k): v for k, v in from_files.items() if not k.startswith(f"model.layers.{N_LAYERS}.")}
    for rank, path in enumerate(shard_paths(converted[n], n)):
        shard = load_file(path)
        wanted = {name: expected_piece(name, value, rank, n) for name, value in model.items()}
        wanted = {name: value for name, value in wanted.items() if value is not None}
        assert sorted(shard) == sorted(wanted)
        for name, value in wanted.items():
            assert shard[name].dtype == (torch.float32 if name.endswith(".gate.bias") else torch.bfloat16), name
            assert shard[name].shape == value.shape, name
            assert torch.equal(shard[name].float(), value), name


def test_experts_land_on_their_ranks(converted):
    for rank, path in enumerate(shard_paths(converted[4], 4)):
        with safe_open(path, "pt") as f:
            experts = {int(m.group(1)) for m in map(EXPERT.search, f.keys()) if m}
        assert experts == set(range(4 * rank, 4 * rank + 4))


def test_the_mtp_module_is_left_out(release, converted):
    assert any(k.startswith(f"model.layers.{N_LAYERS}.") for k in release[1])
    for n, dst in converted.items():
        for path in shard_paths(dst, n):
            with safe_open(path, "pt") as f:
                names = list(f.keys())
            assert not [k for k in names if k.startswith(f"layers.{N_LAYERS}.")
                        or re.search(r"eh_proj|enorm|hnorm|shared_head", k)]
            assert sum(k.startswith(f"layers.{N_LAYERS - 1}.") for k in names) > 0


def test_side_files_copied(release, converted):
    for fname in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(os.path.join(release[0], fname), os.path.join(converted[2], fname), shallow=False)


def test_bf16_release_gives_identical_shards(converted, tmp_path):
    src, dst = str(tmp_path / "bf16"), str(tmp_path / "out")
    write_release_v3(src, seed=0, n_files=2, bf16=True)
    with open(os.path.join(src, convert.INDEX_FILE)) as f:
        assert not any(k.endswith("_scale_inv") for k in json.load(f)["weight_map"])
    convert.convert(src, dst, 2, num_workers=1)
    for ours_, theirs in zip(shard_paths(dst, 2), shard_paths(converted[2], 2)):
        assert filecmp.cmp(ours_, theirs, shallow=False)


def test_worker_pool_matches_in_process(release, converted, tmp_path):
    dst = str(tmp_path / "pool")
    convert.convert(release[0], dst, 4, num_workers=2)
    for ours_, theirs in zip(shard_paths(dst, 4), shard_paths(converted[4], 4)):
        assert filecmp.cmp(ours_, theirs, shallow=False)


@pytest.mark.parametrize("config, expected", [
    (r1_config(), "deepseek_v3"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "deepseek_v3"),
    ({"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"]}, "deepseek_v4"),
    ({"dim": 4096, "n_layers": 43}, "deepseek_v4"),      # our configs/*.json
    ({}, "deepseek_v4"),
])
def test_architecture(config, expected):
    assert convert.architecture(config) == expected


@pytest.mark.parametrize("config, match", [
    ({"model_type": "llama"}, "model_type 'llama' is not one of deepseek_v3, deepseek_v4"),
    ({"architectures": ["LlamaForCausalLM"]}, "names none of"),
    ({"model_type": "deepseek_v4", "architectures": ["DeepseekV3ForCausalLM"]}, "name different models"),
])
def test_architecture_refuses_other_models(config, match):
    with pytest.raises(ValueError, match=match):
        convert.architecture(config)


# ----------------------------------------------------------------------------- failures

def _file_of(src, name):
    with open(os.path.join(src, convert.INDEX_FILE)) as f:
        return os.path.join(src, json.load(f)["weight_map"][name])


def _copy_release(src, dst):
    """The release at dst: its tensor and tokenizer files linked, the JSON files it spoils copied."""
    os.makedirs(dst)
    for fname in os.listdir(src):
        if fname.endswith(".safetensors") or fname.startswith("tokenizer"):
            os.symlink(os.path.join(src, fname), os.path.join(dst, fname))
        else:
            shutil.copyfile(os.path.join(src, fname), os.path.join(dst, fname))


def _edit(src, name, change):
    """Rewrite the file holding tensor `name` after change(dict of its tensors) edits it in place
    (a new file in place of the link)."""
    path = _file_of(src, name)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    os.remove(path)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_index(src, change):
    path = os.path.join(src, convert.INDEX_FILE)
    with open(path) as f:
        index = json.load(f)
    change(index["weight_map"])
    with open(path, "w") as f:
        json.dump(index, f)


def _edit_config(src, **values):
    path = os.path.join(src, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(values)
    for key in [k for k, v in values.items() if v is None]:
        del config[key]
    with open(path, "w") as f:
        json.dump(config, f)


def _drop(src, name):
    _edit(src, name, lambda t: t.pop(name))
    _edit_index(src, lambda m: m.pop(name))


def _add(src, beside, name, value):
    """A new tensor in the file that holds `beside`."""
    _edit(src, beside, lambda t: t.update({name: value}))
    _edit_index(src, lambda m: m.update({name: m[beside]}))


W = "model.layers.1.self_attn.q_b_proj.weight"
S = W + "_scale_inv"
DENSE = "model.layers.0.mlp.gate_proj.weight"
NORM = "model.layers.0.input_layernorm.weight"

# name -> (how to spoil a copy of the release, extra CLI arguments, environment, words the error must have).
# The damaged files both families refuse (testkit.convert_runs), then R1's own.
BAD_INPUTS = {
    **DAMAGED_FILES,
    "scale_inv_absent_from_file": (lambda src: _edit(src, S, lambda t: t.pop(S)), [], {}, [S, "absent from the file"]),
    "float16_tensor": (lambda src: _edit(src, NORM, lambda t: t.update({NORM: t[NORM].half()})), [], {},
                       [NORM, "F16"]),
    "weight_without_scale_inv": (lambda src: _drop(src, S), [], {}, [W, "F8_E4M3 weight without its scale", S]),
    "scale_inv_without_weight": (lambda src: _drop(src, W), [], {}, [S, "scale without a weight"]),
    "scale_inv_shape": (lambda src: _edit(src, S, lambda t: t.update({S: t[S][:1]})), [], {},
                        [S, "F32 scale of shape [1, 1] does not fit", "expected F32 [2, 1]"]),
    "scale_inv_dtype": (lambda src: _edit(src, S, lambda t: t.update({S: t[S].to(torch.bfloat16)})), [], {},
                        [S, "BF16 scale", "expected F32 [2, 1]"]),
    "scale_inv_beside_bf16": (lambda src: _add(src, NORM, NORM + "_scale_inv", torch.ones(1, 1)), [], {},
                              [NORM, "BF16 weight with a scale tensor"]),
    "unknown_tensor": (lambda src: _add(src, NORM, "model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)),
                       [], {}, ["model.layers.0.self_attn.rotary_emb.inv_freq", "not a DeepSeek-V3 checkpoint tensor"]),
    "int8_tensor": (lambda src: _edit(src, NORM, lambda t: t.update({NORM: t[NORM].to(torch.int8)})), [], {},
                    [NORM, "dtype I8 is not converted", "or FP8 with a scale"]),      # I8 holds V4's FP4 only
    "cannot_split": (lambda src: _edit(src, DENSE, lambda t: t.update({DENSE: t[DENSE][:319]})), [], {},
                     [DENSE, "shape [319, 128] cannot be split into 2 equal parts along dim 0"]),
    "expert_out_of_range": (lambda src: _edit_config(src, n_routed_experts=8), [], {},
                            ["layers.2.ffn.experts.10.w2.weight", "expert 10 is out of range for 8 experts"]),
    "experts_not_divisible": (lambda src: None, ["--model-parallel", "3"], {},
                              ["with --model-parallel 3", "is not divisible by the world size 3"]),
    "heads_not_divisible": (lambda src: None, ["--model-parallel", "8"], {},
                            ["n_heads=4 is not divisible by the world size 8"]),
    "vocab_not_divisible": (lambda src: _edit_config(src, vocab_size=129281), [], {},
                            ["vocab_size=129281 is not divisible by the world size 2"]),
    "dense_width_not_divisible": (lambda src: _edit_config(src, intermediate_size=322), ["--model-parallel", "4"], {},
                                  ["inter_dim=322 is not divisible by the world size 4"]),
    "expert_width_not_divisible": (lambda src: _edit_config(src, moe_intermediate_size=50), ["--model-parallel", "4"],
                                   {}, ["moe_inter_dim=50 is not divisible by the world size 4"]),
    "experts_disagree": (lambda src: None, ["--n-experts", "8"], {}, ["--n-experts 8", "n_routed_experts=16"]),
    "no_layer_count": (lambda src: _edit_config(src, num_hidden_layers=None), [], {},
                       ["missing config key 'num_hidden_layers'"]),
    "other_model": (lambda src: _edit_config(src, model_type="qwen2"), [], {}, ["config.json", "model_type 'qwen2'"]),
    "o_groups": (lambda src: None, ["--o-groups", "2"], {}, ["--o-groups is a DeepSeek-V4 setting"]),
    "ogroups_comm": (lambda src: None, [], {"USE_OGROUPS_COMM": "1"}, ["USE_OGROUPS_COMM=1 is a DeepSeek-V4 setting"]),
}


def _spoiled(release, root, case):
    """A spoiled copy of the release and an empty output folder for one case: (src, dst)."""
    src, dst = str(root / "src"), str(root / "dst")
    _copy_release(release[0], src)
    BAD_INPUTS[case][0](src)
    os.makedirs(dst)
    return src, dst


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused(release, tmp_path, monkeypatch, capsys, case):
    _, args, env, words = BAD_INPUTS[case]
    src, dst = _spoiled(release, tmp_path, case)
    monkeypatch.delenv("USE_OGROUPS_COMM", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["convert.py", "--hf-ckpt-path", src, "--save-path", dst,
                                      "--model-parallel", "2", *args])
    with pytest.raises(SystemExit) as exit_:
        convert.main()
    assert exit_.value.code == 1
    message = capsys.readouterr().err.strip()
    assert message.startswith("convert.py: error: ") and "\n" not in message
    for w in words:
        assert w in message, message
    assert os.listdir(dst) == []


def test_command_line_exits_non_zero(release, tmp_path):
    src, dst = _spoiled(release, tmp_path, "truncated_file")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "convert.py"), "--hf-ckpt-path", src, "--save-path", dst,
                           "--model-parallel", "2"], env={k: v for k, v in os.environ.items() if k != "USE_OGROUPS_COMM"},
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().startswith("convert.py: error: ") and "truncated" in done.stderr
    assert os.listdir(dst) == []


def test_failed_job_leaves_no_shards(release, tmp_path, monkeypatch):
    check_failed_job_leaves_no_shards(release[0], str(tmp_path / "out"), monkeypatch, "dequant_fp8",
                                      r"tensor model\.layers\.\d+\..*: injected failure")


def test_interrupt_leaves_no_shards(release, tmp_path, monkeypatch):
    check_interrupt_leaves_no_shards(release[0], str(tmp_path / "out"), monkeypatch)
