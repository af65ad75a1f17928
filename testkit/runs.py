"""What the tests that start generate.py / check.py jobs share: one torch thread in this process
(each torchrun worker has one too; the 2 cores are shared), an environment cleared of launch and
layout settings for in-process runs, the environment a job gets, a free port, and generate.py's
bad-input cases."""
import json
import os
import socket

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process runs use one thread, like each torchrun worker. Imported into a test module, it
    applies to that module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def clean_env():
    """In-process runs see no launch, layout or FlagGems settings of the caller's, and one OpenMP thread.
    Imported into a test module, it applies to the whole module, its module-scoped fixtures included
    (an autouse fixture of a wider scope is set up before them)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("USE_FLAGGEMS", "USE_OGROUPS_COMM", "USE_HUMMING", "FLAGGEMS_EXCLUDE", "RANK", "WORLD_SIZE",
                     "LOCAL_RANK"):
            patch.delenv(name, raising=False)
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def env(**extra) -> dict:
    """This process's environment for a job: no launch or layout settings of its own, one thread a
    rank, FlagGems off, then extra."""
    out = {k: v for k, v in os.environ.items()
           if k not in ("USE_OGROUPS_COMM", "USE_HUMMING", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out.update(OMP_NUM_THREADS="1", USE_FLAGGEMS="0", **extra)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# generate.py's bad-input cases that both families' tests run (bad_input sets each up): case -> a
# pattern of the one line that refuses it
BAD_INPUT_LINES = {
    "missing_file": r"input file .*absent\.txt not found",
    "empty_file": r"is empty: no prompts",
    "bad_jsonl": r"bad\.jsonl line 3: not valid JSON",
    "bad_record": r"bad_record\.jsonl line 1: expected",
    "bad_messages": r"line 1: the last message must be from the user",
    "too_long": r"prompt 2 has \d+ tokens, which leaves no room for a reply within max_seq_len=16",
    "raw_messages": r"--raw takes plain prompts",
    "missing_shards": r"model0-mp1\.safetensors not found: .*present in .*: mp2",
    "no_tokenizer": r"no tokenizer in .*: expected tokenizer\.json or tokenizer\.model",
    "no_config": r"config .*config\.json not found",
    "no_output_folder": r"the folder of --output-file .* does not exist",
    "output_is_a_folder": r"--output-file .* is a folder: give a file name",
    "output_not_writable": r"--output-file /proc/out\.jsonl cannot be written: ",
    "no_ckpt_folder": r"checkpoint folder .*absent not found",
    "output_is_the_input": r"--output-file .* is the input file: give another name",
    "output_in_checkpoint": r"--output-file .*config\.json would replace a file of the checkpoint",
    "lone_surrogate": r"prompt 2 is not valid Unicode text",
    "damaged_tokenizer": r"cannot read the tokenizer .*tokenizer\.json: ",
    "foreign_tokenizer": r"tokenizer\.json has ids up to \d+, beyond the model's vocab_size 129280: it is not this "
                         r"model's tokenizer",
    "flaggems_on_cpu": r"USE_FLAGGEMS=1 needs a CUDA GPU",
    "triton_on_cpu": r"backend 'triton' needs a CUDA device and the triton package: leave --backend out, or give torch",
    "flaggems_switch_2": r"USE_FLAGGEMS must be 1 or 0 \(or true / false, yes / no, on / off\), got '2'",
    "ogroups_switch_typo": r"USE_OGROUPS_COMM must be 1 or 0 \(or true / false, yes / no, on / off\), got 'ture'",
}


def tokenizer_spoiled(ckpt: str, folder: str, truncated: bool) -> str:
    """folder: ckpt's files linked, but for a tokenizer.json cut short (truncated) or given one more
    token (the tokenizers library numbers it after the last: beyond the models' vocabularies here)."""
    os.makedirs(folder)
    for name in os.listdir(ckpt):
        if name != "tokenizer.json":
            os.symlink(os.path.join(ckpt, name), os.path.join(folder, name))
    with open(os.path.join(ckpt, "tokenizer.json")) as f:
        text = f.read()
    if not truncated:
        spec = json.loads(text)
        spec["added_tokens"].append({"id": 199999, "content": "<|foreign|>", "single_word": False, "lstrip": False,
                                     "rstrip": False, "normalized": False, "special": True})
        text = json.dumps(spec)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write(text[:len(text) // 2] if truncated else text)
    return folder


def bad_input(case: str, argv: dict, tmp_path, broken: dict, messages: list, no_shards: str, monkeypatch) -> list:
    """One of generate.py's bad-input cases, as the V4 and R1 tests share them: argv (--ckpt-path,
    --input-file, --output-file) and the environment changed for it; returns its extra arguments.
    broken: checkpoint folders by case; messages: a conversation (for --raw, which takes none);
    no_shards: a checkpoint folder without this N's shards."""
    files = {"empty_file": ("empty.txt", " \n\n"), "bad_jsonl": ("bad.jsonl", '{"prompt": "a"}\n\n{"prompt": }\n'),
             "bad_record": ("bad_record.jsonl", '{"text": "a"}\n'),
             "bad_messages": ("m.jsonl", json.dumps({"messages": [{"role": "assistant", "content": "a"}]}) + "\n"),
             "raw_messages": ("m.jsonl", json.dumps({"messages": messages}) + "\n"),
             "too_long": ("long.txt", "short\n\n" + "word " * 40),
             "lone_surrogate": ("s.jsonl", '{"prompt": "a"}\n{"prompt": "b\\ud800"}\n')}
    if case in files:
        name, text = files[case]
        (tmp_path / name).write_text(text)
        argv["--input-file"] = str(tmp_path / name)
    elif case == "missing_file":
        argv["--input-file"] = str(tmp_path / "absent.txt")
    elif case == "missing_shards":
        argv["--ckpt-path"] = no_shards
    elif case in broken:
        argv["--ckpt-path"] = broken[case]
    elif case == "no_output_folder":
        argv["--output-file"] = str(tmp_path / "nowhere" / "out.jsonl")
    elif case == "output_is_a_folder":
        argv["--output-file"] = str(tmp_path)
    elif case == "output_not_writable":
        argv["--output-file"] = "/proc/out.jsonl"      # no file can be made there, even by root
    elif case == "no_ckpt_folder":
        argv["--ckpt-path"] = str(tmp_path / "absent")
    elif case == "output_is_the_input":
        argv["--output-file"] = argv["--input-file"]
    elif case == "output_in_checkpoint":
        argv["--output-file"] = os.path.join(argv["--ckpt-path"], "config.json")
    elif case in ("damaged_tokenizer", "foreign_tokenizer"):
        argv["--ckpt-path"] = tokenizer_spoiled(argv["--ckpt-path"], str(tmp_path / "ckpt"), case == "damaged_tokenizer")
    elif case in ("flaggems_switch_2", "ogroups_switch_typo"):
        monkeypatch.setenv(*{"flaggems_switch_2": ("USE_FLAGGEMS", "2"),
                             "ogroups_switch_typo": ("USE_OGROUPS_COMM", "ture")}[case])
    elif case in ("flaggems_on_cpu", "triton_on_cpu"):
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        if case == "flaggems_on_cpu":
            monkeypatch.setenv("USE_FLAGGEMS", "1")
    return {"too_long": ["--max-seq-len", "16"], "raw_messages": ["--raw"],
            "triton_on_cpu": ["--backend", "triton"]}.get(case, [])
