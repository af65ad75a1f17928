"""Parallel.all_reduce against NCCL's all-reduce on the GPUs of one node (not run by pytest):

    torchrun --standalone --nproc-per-node 2 -m tools.all_reduce_check

Where parallel.one_shot_unusable allows it, small all-reduces take torch's symmetric-memory one-shot
kernel (parallel.OneShotAllReduce). For bf16 and float32 tensors of a decode step's shapes, eager and
replayed from a CUDA graph with new inputs, its sums must equal NCCL's bit for bit and be the same on
every rank; then both are timed, each a CUDA graph of 32 in a row. Exits non-zero on a difference, or
when the one-shot way is not taken (the reason printed)."""
import os
import sys

import torch
import torch.distributed as dist

import parallel

SHAPES = ((1, 4096), (32, 4096), (1, 1, 4096), (64, 4096), (1, 288))
TIMED = ((torch.float32, (1, 4096)), (torch.bfloat16, (1, 4096)), (torch.float32, (32, 4096)),
         (torch.float32, (64, 4096)))


def graphed(fn, reps: int = 1) -> torch.cuda.CUDAGraph:
    """fn called reps times, captured in a CUDA graph after a warm-up call on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph


def same_as_nccl(tp: parallel.Parallel, dtype: torch.dtype, shape: tuple, g: torch.Generator) -> bool:
    """tp.all_reduce equals dist.all_reduce bitwise, eager and graphed, and is the same on every rank."""
    x = torch.randn(shape, generator=g, device="cuda").to(dtype)
    ref = x.clone()
    dist.all_reduce(ref)
    same = torch.equal(tp.all_reduce(x.clone()), ref)
    src, out = torch.zeros_like(x), []
    graph = graphed(lambda: out.append(tp.all_reduce(src.clone())))
    for _ in range(3):
        y = torch.randn(shape, generator=g, device="cuda").to(dtype)
        src.copy_(y)
        graph.replay()
        dist.all_reduce(y)
        same &= torch.equal(out[-1], y)
    parts = [torch.empty_like(out[-1]) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, out[-1])
    return same and all(torch.equal(parts[0], p) for p in parts)


def graph_us(fn, reps: int = 32) -> float:
    """Median us of one fn call, from 5 replays of a graph of reps calls, the ranks started together."""
    graph = graphed(fn, reps)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        dist.barrier()
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    return sorted(times)[2]


def main() -> int:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    reason = parallel.one_shot_unusable(world)
    tp = parallel.Parallel.current()
    bad = 0
    if tp.one_shot is None:
        print(f"rank {rank}: the one-shot all-reduce is not taken: {reason}", flush=True)
        bad = 1
    else:
        g = torch.Generator(device="cuda").manual_seed(100 + rank)
        for dtype in (torch.bfloat16, torch.float32):
            for shape in SHAPES:
                ok = same_as_nccl(tp, dtype, shape, g)
                bad += not ok
                if rank == 0:
                    print(f"{dtype} {shape}: {'equal to NCCL' if ok else 'DIFFERENT from NCCL'}", flush=True)
        for dtype, shape in TIMED:
            x = torch.randn(shape, device="cuda").to(dtype)
            nccl, one_shot = graph_us(lambda: dist.all_reduce(x)), graph_us(lambda: tp.all_reduce(x))
            if rank == 0:
                print(f"{dtype} {shape}: NCCL {nccl:.2f} us, one-shot {one_shot:.2f} us", flush=True)
    dist.barrier()
    tp = None
    dist.destroy_process_group()
    if rank == 0:
        print(f"ALL-REDUCE CHECK {'PASSED' if not bad else 'FAILED'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
