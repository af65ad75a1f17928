"""Conversions that must leave nothing behind, for the V4 and the R1 / V3 convert tests: a job that
fails part way, and one that is interrupted."""
import os

import pytest

import convert


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
