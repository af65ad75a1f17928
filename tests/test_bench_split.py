"""bench.py speed's split of a step under torchrun, on the CPU: the collectives a step makes are
recorded where they are made, a stand-in Parallel leaves them all out and gives the modules back, and
the model of N ranks is the formula its docstring states."""
import os
import types

import pytest
import torch
import torch.distributed as dist

import bench
from parallel import Parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "config_tiny.json")


def tiny(tp, layers=3):
    """config_tiny cut to `layers` layers (compress ratios 0, 4, 16), caches filled, on the CPU."""
    model = bench.build_filled(TINY, layers, "bf16", 2, 64, tp, device="cpu", backend="torch")
    with torch.no_grad():
        bench.fill_caches(model)
    return model


def step(model, batch=2, at=20):
    ids = torch.randint(0, model.args.vocab_size, (batch, 1), generator=torch.Generator().manual_seed(0))
    return ids, torch.full((batch,), at)


def refuse(*args, **kwargs):
    raise AssertionError("a collective reached torch.distributed")


def test_a_step_records_each_layers_collectives_with_their_shapes():
    model = tiny(bench.RankShare(2, 2))
    calls = bench.record_step(model, *step(model))
    where = [c.where for c in calls]
    assert where == [None, 0, 0, 4, 4, 4, 16, 16, None]          # embedding, layers (CSA: indexer too), head
    assert [c.op for c in calls] == ["all_reduce"] * 8 + ["all_gather"]
    dim = model.args.dim
    assert calls[0].shape == (2, 1, dim) and calls[0].dtype == torch.bfloat16
    assert calls[-1].shape == (2, model.args.vocab_size // 2) and calls[-1].dtype == torch.float32
    assert calls[-1].bytes == 2 * model.args.vocab_size // 2 * 4
    attn = [c for c in calls[1:-1] if c.shape[-1] == dim]
    assert len(attn) == 6 and all(c.shape[0] == 2 for c in attn)
    assert all(m.tp is model.tp for m in model.modules() if hasattr(m, "tp"))


def test_the_silent_twin_makes_no_collective_and_gives_the_modules_back(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", refuse)
    monkeypatch.setattr(dist, "all_gather", refuse)
    tp = Parallel(2, 0)                                  # a live rank's Parallel: its collectives go to dist
    model = tiny(tp)
    ids, pos = step(model)
    with pytest.raises(AssertionError, match="reached torch.distributed"):
        model.decode(ids, pos)
    twin = bench.silent_twin(model)
    with bench.swapped_tp(model, lambda name: twin):
        logits = model.decode(ids, pos)
        assert model.layers[1].attn.indexer.tp is twin and model.head.tp is twin
    assert logits.shape == (2, model.args.vocab_size)
    held = [m for m in model.modules() if hasattr(m, "tp")]
    assert len(held) > 5 and all(m.tp is tp for m in held)
    with pytest.raises(AssertionError, match="reached torch.distributed"):
        model.decode(ids, pos)


def test_swapped_tp_gives_the_modules_back_after_an_error():
    model = tiny(bench.RankShare(2, 2), layers=1)
    with pytest.raises(RuntimeError):
        with bench.swapped_tp(model, lambda name: Parallel(2, 1)):
            assert model.embed.tp.rank == 1
            raise RuntimeError
    assert model.embed.tp is model.tp and model.layers[0].ffn.tp is model.tp


def test_the_o_groups_layout_has_no_silent_twin():
    model = types.SimpleNamespace(tp=Parallel(16, 0, pair_group=object()), args=types.SimpleNamespace(o_groups=8))
    with pytest.raises(ValueError, match="o_groups"):
        bench.silent_twin(model)


def test_the_collectives_replay_as_recorded():
    model = tiny(bench.RankShare(2, 2))
    calls = bench.record_step(model, *step(model))
    again = []
    bench.replay_collectives(bench.Recorder(bench.RankShare(2, 2), again, None), calls, "cpu")()
    assert [(c.op, c.shape, c.dtype, c.group) for c in again] == [(c.op, c.shape, c.dtype, c.group) for c in calls]


def test_fit_ring_recovers_latency_and_bus_bandwidth():
    for n in (2, 4):
        a, bus = 0.02, 150e6                              # ms, bytes per ms
        points = [(size, a + 2 * (n - 1) / n * size / bus) for size in (1 << 12, 1 << 20, 1 << 24)]
        fa, fbus = bench.fit_ring(points, n)
        assert fa == pytest.approx(a) and fbus == pytest.approx(bus)


def call(op, nbytes, where):
    """A Collective of nbytes (bf16 all-reduce, float32 all-gather) made at where."""
    dtype = torch.bfloat16 if op == "all_reduce" else torch.float32
    return bench.Collective(op, (nbytes // dtype.itemsize,), dtype, None, where)


def test_step_model_is_its_formula():
    a, bus = 0.01, 100e6                                  # 10 us, 100 GB/s
    calls = ([call("all_reduce", 8192, None)]            # embedding
             + [call("all_reduce", 8192, 0)] * 4          # 2 measured window layers, 2 calls each
             + [call("all_reduce", 8192, 4), call("all_reduce", 8192, 4), call("all_reduce", 2048, 4)]
             + [call("all_gather", 1_000_000, None)])     # the head's logits: this rank's half
    measured, depth = {0: 2, 4: 1}, {0: 3, 4: 40}
    layer_ms, head = {0: 0.1, 4: 0.2}, 0.05
    m = bench.step_model(4, layer_ms, head, depth, calls, measured, 2, a, bus)
    assert m["compute"] == pytest.approx(3 * 0.1 + 40 * 0.2 + 0.05)
    reduce8k = a + 2 * 3 / 4 * 8192 / bus
    reduce2k = a + 2 * 3 / 4 * 2048 / bus
    gather = a + 3 / 4 * 2 * 1_000_000 / bus
    expected = reduce8k + 3 * 2 * reduce8k + 40 * (2 * reduce8k + reduce2k) + gather
    assert m["collectives"] == pytest.approx(expected)
    assert m["step"] == pytest.approx(m["compute"] + m["collectives"])
    at8 = bench.step_model(8, layer_ms, head, depth, calls, measured, 2, a, bus)
    assert at8["collectives"] > m["collectives"] and at8["compute"] == pytest.approx(m["compute"])
    free = bench.step_model(4, layer_ms, head, depth, calls, measured, 2, 0.0, float("inf"))
    assert free["collectives"] == 0 and free["step"] == pytest.approx(m["compute"])


def test_step_model_on_the_live_ranks_costs_a_collective_as_fitted():
    c = call("all_reduce", 1 << 20, None)
    a, bus = 0.005, 200e6
    assert bench.collective_model_ms(c, 2, 2, a, bus) == pytest.approx(a + (1 << 20) / bus)
    g = call("all_gather", 1 << 20, None)
    assert bench.collective_model_ms(g, 2, 2, a, bus) == pytest.approx(a + (1 << 20) / bus)


def test_step_model_needs_every_kind_of_the_full_depth():
    with pytest.raises(ValueError, match=r"\[128\]"):
        bench.step_model(4, {0: 0.1, 4: 0.2}, 0.0, {0: 3, 4: 20, 128: 20}, [], {0: 2, 4: 1}, 2, 0.01, 1e8)


def test_the_tables_print_the_split_and_the_labelled_model(monkeypatch):
    """split_lines and model_lines on made-up measurements (rank_share_inputs needs a GPU): the
    unexplained time signed, the model labelled with its inputs, N = 16 left out with its reason."""
    calls = [call("all_reduce", 8192, None)] + [call("all_reduce", 8192, k) for k in (0, 0, 4, 128)]
    row = dict(ctx=1024, batch=1, decode_ms=1.0, compute_ms=0.8, collective_ms=0.3, count=5, bytes=40960,
               calls=calls)
    assert bench.split_lines([row])[-1] == "| 1024 | 1 | 1.000 | 0.800 | 0.300 (5, 0.04) | -0.100 |"
    flash = os.path.join(ROOT, "configs", "config_flash.json")
    asked = []

    def inputs(args, n, max_seq):
        asked.append(n)
        return {(1024, 1): ({0: 0.1, 4: 0.2, 128: 0.15}, 0.05)}
    monkeypatch.setattr(bench, "rank_share_inputs", inputs)
    args = types.SimpleNamespace(config=flash, model_ranks=[4, 8, 16])
    lines = bench.model_lines(args, [row], 2, {0: 2, 4: 1, 128: 1}, (0.01, 1e8), [(4096, 0.011)], 1152)
    text = "\n".join(lines)
    assert asked == [4, 8] and "MODEL (not a measurement)" in text and "all 43 layers" in text
    assert "full depth {0: 2, 4: 21, 128: 20}" in text and "N = 16: left out" in text
    compute = 2 * 0.1 + 21 * 0.2 + 20 * 0.15 + 0.05
    assert f"| 4 | 1024 | 1 | 0: 0.100, 4: 0.200, 128: 0.150 | 0.050 | {compute:.3f} |" in text
    short = bench.model_lines(args, [row], 2, {0: 2}, (0.01, 1e8), [], 1152)
    assert "MODEL left out" in short[0] and "[4, 128]" in short[0]
