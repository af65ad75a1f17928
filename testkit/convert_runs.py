"""What the V4 and the R1 / V3 convert tests share: the damaged release files both families must
refuse, and conversions that must leave nothing behind (a job that fails part way, one that is
interrupted)."""
import os
import shutil

import pytest

import convert


def own_file(src: str, fname: str) -> str:
    """The path of file fname of the copied release src, made a file of its own where it is a link
    (so that damaging it leaves the linked original whole)."""
    path = os.path.join(src, fname)
    if os.path.islink(path):
        target = os.path.realpath(path)
        os.remove(path)
        shutil.copyfile(target, path)
    return path


def overwrite(src: str, fname: str, offset: int, data: bytes) -> None:
    with open(own_file(src, fname), "r+b") as f:
        f.seek(offset)
        f.write(data)


# The release files of a three-file release, damaged as a download or a disk can damage them:
# name -> (how to spoil a copy of the release, extra CLI arguments, environment, words the error must have)
DAMAGED_FILES = {
    "missing_src": (lambda src: shutil.rmtree(src), [], {}, ["checkpoint folder not found"]),
    "missing_index": (lambda src: os.remove(os.path.join(src, convert.INDEX_FILE)), [], {},
                      [convert.INDEX_FILE, "not found"]),
    "missing_file": (lambda src: os.remove(os.path.join(src, "model-00002-of-00003.safetensors")), [], {},
                     ["model-00002-of-00003.safetensors", "not found"]),
    "truncated_file": (lambda src: os.truncate(own_file(src, "model-00003-of-00003.safetensors"), 10**6), [], {},
                       ["model-00003-of-00003.safetensors", "truncated"]),
    "bad_header_length": (lambda src: overwrite(src, "model-00001-of-00003.safetensors", 0,
                                                (10**12).to_bytes(8, "little")), [], {},
                          ["model-00001-of-00003.safetensors", "header length"]),
    "corrupt_header": (lambda src: overwrite(src, "model-00001-of-00003.safetensors", 8, b"\xff#!~"), [], {},
                       ["model-00001-of-00003.safetensors", "not valid JSON"]),
}


def check_failed_job_leaves_no_shards(src: str, dst: str, monkeypatch, dequant: str, match: str) -> None:
    """convert.py's `dequant` (a name in convert) raises on its fifth call: the conversion to dst for
    2 ranks stops with a ConvertError naming the tensor (the pattern match) and dst stays empty."""
    calls, original = [], getattr(convert, dequant)

    def failing(weight, scale, dtype):
        calls.append(1)
        if len(calls) == 5:
            raise ValueError("injected failure")
        return original(weight, scale, dtype)

    monkeypatch.setattr(convert, dequant, failing)
    with pytest.raises(convert.ConvertError, match=match):
        convert.convert(src, dst, 2, num_workers=1)
    assert os.listdir(dst) == []


def check_interrupt_leaves_no_shards(src: str, dst: str, monkeypatch) -> None:
    """A KeyboardInterrupt in the shard writer reaches the caller and leaves dst empty."""
    def interrupted(self, job):
        raise KeyboardInterrupt
    monkeypatch.setattr(convert.ShardWriter, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert(src, dst, 2, num_workers=1)
    assert os.listdir(dst) == []
