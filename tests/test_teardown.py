"""How the torchrun entry points end their process groups, on CPU (gloo, one rank in this process).

bench.py speed (CUDA) printed its table and then did not exit: it destroyed its NCCL group while its
CUDA graphs, which captured the model's collectives, were alive, and NCCL waits for those (seen on
two H100s: destroy_process_group() hung; after the graphs were collected it took 0.4 s). bench.py's
main() now ends the group after the command returns, through runtime.end_process_groups(), which
collects garbage first; generate.py and check.py's workers end theirs with it too.
"""
import gc

import pytest
import torch
import torch.distributed as dist

import bench
import runtime


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("outcome", ["success", "failure"])
def test_bench_main_ends_the_process_group(outcome, one_rank_group, monkeypatch):
    def speed(args):
        dist.all_reduce(torch.ones(1))
        if outcome == "failure":
            raise RuntimeError("a measurement failed")

    monkeypatch.setattr(bench, "bench_speed", speed)
    if outcome == "failure":
        with pytest.raises(RuntimeError, match="a measurement failed"):
            bench.main(["speed"])
    else:
        bench.main(["speed"])
    assert not dist.is_initialized()


def test_end_process_groups_collects_garbage_first(one_rank_group):
    """What a reference cycle keeps alive (a CUDA graph that captured collectives, say) is gone
    before the group is destroyed."""
    seen = []

    class Graph:
        def __del__(self):
            seen.append(dist.is_initialized())

    gc.disable()
    try:
        graph = Graph()
        graph.cycle = graph
        del graph
        runtime.end_process_groups()
    finally:
        gc.enable()
    assert seen == [True] and not dist.is_initialized()
    runtime.end_process_groups()              # nothing left to end: no error
