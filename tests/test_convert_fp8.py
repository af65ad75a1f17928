"""convert.py --dtype fp8: shards that keep the release's FP8 / MXFP4 weights with their scales.

On releases whose cut weights split into whole 128x128 blocks (testkit/fp8.py), every shard must hold
the quantised weights in their release formats (FP8 e4m3 with ue8m0 block scales and packed MXFP4
experts for V4, FP8 with float32 block scales for R1), each rank's part with its part of the scale,
and these must dequantise to exactly what the BF16 conversion writes. Bad inputs give one clear line.
"""
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
from model import ModelArgs
from ops import dequantised
from quant import shard_weights
from random_release import write_release
from testkit.fp8 import convert_to, write_r1, write_v4

QUANTISED = (torch.float8_e4m3fn, torch.int8)


def shards(folder: str) -> list:
    n = int(folder.rsplit("mp", 1)[1])
    return [load_file(os.path.join(folder, f"model{r}-mp{n}.safetensors")) for r in range(n)]


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """{(dtype, expert dtype, N): converted folder} of one V4 release."""
    root = str(tmp_path_factory.mktemp("v4"))
    release = os.path.join(root, "release")
    write_v4(release)
    out = {"release": release}
    for n in (1, 2, 4):
        out["bf16", None, n] = convert_to(release, root, n, "bf16")
        out["fp8", None, n] = convert_to(release, root, n, "fp8")
    out["fp8", "fp8", 2] = convert_to(release, root, 2, "fp8", "fp8")
    return out


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("r1"))
    release = os.path.join(root, "release")
    write_r1(release)
    out = {"release": release}
    for n in (1, 2):
        out["bf16", n] = convert_to(release, root, n, "bf16")
        out["fp8", n] = convert_to(release, root, n, "fp8")
    return out


def check_against_bf16(fp8_folder: str, bf16_folder: str, weight_dtypes: dict, scale_dtypes: dict) -> set:
    """Every rank's FP8 shard against its BF16 twin: the same names plus one `.scale` a quantised weight,
    quantised weights of weight_dtypes[kind] with scales of scale_dtypes[kind] (kind 'expert' for routed
    experts, else 'dense'), dequantising to the BF16 tensor exactly; every other tensor equal. Returns
    the dtypes of the quantised weights seen."""
    seen = set()
    for lowp, plain in zip(shards(fp8_folder), shards(bf16_folder)):
        assert sorted(n for n in lowp if not n.endswith(".scale")) == sorted(plain)
        for name, value in plain.items():
            stored = lowp[name]
            scale = lowp.get(name[:-len("weight")] + "scale") if name.endswith(".weight") else None
            if scale is None:
                assert stored.dtype == value.dtype and torch.equal(stored, value), name
                continue
            kind = "expert" if ".experts." in name else "dense"
            assert (stored.dtype, scale.dtype) == (weight_dtypes[kind], scale_dtypes[kind]), name
            assert torch.equal(dequantised(stored, scale, torch.bfloat16), value), name
            seen.add(stored.dtype)
    return seen


@pytest.mark.parametrize("n", [1, 2, 4])
def test_v4_shards_keep_fp8_and_fp4_weights(v4, n):
    seen = check_against_bf16(v4["fp8", None, n], v4["bf16", None, n],
                              {"dense": torch.float8_e4m3fn, "expert": torch.int8},
                              {"dense": torch.float8_e8m0fnu, "expert": torch.float8_e8m0fnu})
    assert seen == set(QUANTISED)


def test_v4_rank_parts_carry_their_scale_blocks(v4):
    """wq_b cut by rows over 4 ranks: each rank's weight has 128 rows and its scale the one block row."""
    full = shards(v4["fp8", None, 1])[0]
    for rank, part in enumerate(shards(v4["fp8", None, 4])):
        name = "layers.1.attn.wq_b"
        assert part[f"{name}.weight"].shape == (128, 48) and part[f"{name}.scale"].shape == (1, 1)
        rows = slice(128 * rank, 128 * (rank + 1))
        blocks = slice(rank, rank + 1)
        assert torch.equal(part[f"{name}.scale"].view(torch.uint8), full[f"{name}.scale"][blocks].view(torch.uint8))
        assert torch.equal(part[f"{name}.weight"].view(torch.uint8), full[f"{name}.weight"][rows].view(torch.uint8))


def test_v4_experts_cast_to_fp8_exactly(v4):
    seen = check_against_bf16(v4["fp8", "fp8", 2], v4["bf16", None, 2],
                              {"dense": torch.float8_e4m3fn, "expert": torch.float8_e4m3fn},
                              {"dense": torch.float8_e8m0fnu, "expert": torch.float8_e8m0fnu})
    assert seen == {torch.float8_e4m3fn}
    w1 = shards(v4["fp8", "fp8", 2])[1]["layers.2.ffn.experts.5.w1.weight"]
    assert w1.shape == (512, 64)


@pytest.mark.parametrize("n", [1, 2])
def test_r1_shards_keep_fp8_weights_with_float32_scales(r1, n):
    seen = check_against_bf16(r1["fp8", n], r1["bf16", n],
                              {"dense": torch.float8_e4m3fn, "expert": torch.float8_e4m3fn},
                              {"dense": torch.float32, "expert": torch.float32})
    assert seen == {torch.float8_e4m3fn}


def test_config_records_the_format(v4, r1):
    for release, folder, formats in ((v4, v4["fp8", None, 2], ("fp8", "fp4")),
                                     (v4, v4["fp8", "fp8", 2], ("fp8", "fp8")),
                                     (r1, r1["fp8", 2], ("fp8", "fp8")), (v4, v4["bf16", None, 2], ("bf16", "bf16"))):
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(release["release"], "config.json")) as f:
            original = json.load(f)
        assert shard_weights(config) == formats
        assert {k: v for k, v in config.items() if k not in ("weights", "expert_weights")} == original


def test_fp8_shards_are_about_a_quarter_of_bf16(v4):
    """Bytes on disk: the experts (int8 + one scale byte per 32) dominate the fixture as they do V4."""
    def size(folder):
        return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
    experts = sum(t.nbytes for name, t in shards(v4["bf16", None, 1])[0].items() if ".experts." in name)
    fp8_experts = sum(t.nbytes for name, t in shards(v4["fp8", None, 1])[0].items() if ".experts." in name)
    assert fp8_experts / experts == pytest.approx(0.25 + 1 / 64)
    assert size(v4["fp8", None, 1]) < size(v4["bf16", None, 1])


@pytest.mark.parametrize("value, match", [
    ({"weights": "fp16"}, "weights must be one of bf16, fp8"),
    ({"weights": "fp8"}, "expert_weights must be one of fp4, fp8"),
    ({"weights": "bf16", "expert_weights": "fp4"}, "expert_weights must be one of bf16"),
])
def test_shard_weights_refuses_unknown_formats(value, match, v4):
    with pytest.raises(ValueError, match=match):
        shard_weights(value)
    with open(os.path.join(v4["release"], "config.json")) as f:
        config = {**json.load(f), **value}
    with pytest.raises(ValueError, match="config.json: " + match):
        ModelArgs.from_config(config, "config.json")


# ----------------------------------------------------------------------------- bad input

def _edit(src: str, name: str, edit) -> None:
    """Replace tensor `name` of the release at src by edit(tensor), in its file."""
    with open(os.path.join(src, convert.INDEX_FILE)) as f:
        path = os.path.join(src, json.load(f)["weight_map"][name])
    tensors = load_file(path)
    tensors[name] = edit(tensors[name])
    save_file(tensors, path, metadata={"format": "pt"})


def _spread(scale: torch.Tensor) -> torch.Tensor:
    """Two scales 20 octaves apart inside one 128x128 block: no exact FP8 copy exists."""
    out = scale.view(torch.uint8).clone()
    out[0, 0], out[1, 1] = 140, 120
    return out.view(torch.float8_e8m0fnu)


# case -> (release: v4, r1, tiny or bf16; spoil the copy; CLI arguments; words the message must have)
BAD = {
    "straddling_block": ("tiny", None, ["--model-parallel", "4", "--dtype", "fp8"],
                         ["layers.0.attn.wo_a.weight", "cut into 2 parts of 32 rows", "128x128 scale block",
                          "straddle two ranks", "--dtype bf16"]),
    "bf16_release": ("bf16", None, ["--dtype", "fp8"], ["holds none", "convert it with --dtype bf16"]),
    "expert_dtype_without_fp8": ("v4", None, ["--expert-dtype", "fp8"], ["--expert-dtype fp8 applies to --dtype fp8"]),
    "r1_fp4_experts": ("r1", None, ["--dtype", "fp8", "--expert-dtype", "fp4"],
                       ["DeepSeek-R1 / V3 release's experts can be written as fp8 only"]),
    "no_config": ("v4", lambda src: os.remove(os.path.join(src, "config.json")), ["--dtype", "fp8", "--n-experts", "8"],
                  ["writes the weight format into config.json", "has none"]),
    "inexact_fp8_experts": ("v4", lambda src: _edit(src, "layers.0.ffn.experts.0.w1.scale", _spread),
                            ["--dtype", "fp8", "--expert-dtype", "fp8"],
                            ["layers.0.ffn.experts.0.w1.weight", "FP8 copy would not be exact"]),
    "misshapen_scale": ("v4", lambda src: _edit(src, "layers.1.attn.wq_b.scale", lambda s: torch.cat([s, s])),
                        ["--dtype", "fp8"], ["layers.1.attn.wq_b.scale", "does not fit the FP8 weight",
                                             "expected F8_E8M0 [4, 1]"]),
}


@pytest.fixture(scope="module")
def releases(v4, r1, tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    tiny, bf16 = str(root / "tiny"), str(root / "bf16")
    write_release(tiny, seed=0, n_files=1)
    write_release(bf16, seed=0, n_files=1, bf16=True)
    return {"v4": v4["release"], "r1": r1["release"], "tiny": tiny, "bf16": bf16}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused(case, releases, tmp_path, monkeypatch, capsys):
    which, spoil, args, words = BAD[case]
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    shutil.copytree(releases[which], src)
    if spoil:
        spoil(src)
    monkeypatch.setenv("USE_OGROUPS_COMM", "1" if "4" in args else "0")
    monkeypatch.setattr(sys, "argv", ["convert.py", "--hf-ckpt-path", src, "--save-path", dst,
                                      "--model-parallel", "2", *args])
    with pytest.raises(SystemExit) as exit_:
        convert.main()
    assert exit_.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    message = lines[-1]             # a fault found while writing follows convert.py's line with the plan
    assert message.startswith("convert.py: error: ") and len(lines) <= 2
    for w in words:
        assert w in message, message
    assert not os.path.exists(dst) or os.listdir(dst) == []
