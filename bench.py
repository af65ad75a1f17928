"""Benchmarks of the toolkit, one subcommand each; results go into BENCHMARKS.md by hand.

    python bench.py speed [--layers 4] [--batch 1 8 32 128] [--context 1024 16384 65536] [--compare hf]
    python bench.py speed --config configs/config_r1.json [--layers 3 --dense-layers 1] [--compare hf]
    torchrun --nproc-per-node 2 bench.py speed --batch 1 32 [--model-ranks 4 8 16]
    python bench.py backends [--layers 4] [--backends torch triton flaggems] [--prompt-len 512] [--steps 16]
    python bench.py moe-tiles [--tokens 4096] [--decode-tokens 1 4 8 16]
    python bench.py attn-tiles [--tokens 4096]
    python bench.py convert --layers 2 --workdir /tmp/bench
    python bench.py weights [--layers 4] [--batch 1 32] [--context 1024] [--prefill 4096] [--humming [bf16] [fp8]]
    python bench.py memory [--ranks 1 2 4 8 16]
    python bench.py rank-share [--ranks 4] [--weights fp8] [--humming [{bf16,fp8}]] [--batch 1 32] [--context 1024]

speed (CUDA): model.py with the real V4-Flash layer shapes (configs/config_flash.json cut to
--layers layers, all experts), random weights made on the GPU, no disk. Caches are filled with
random entries, so a context of C tokens is measured as decode steps (and a prefill chunk) at
position C without computing the C tokens first. Each figure is set against its floor on this
device, from ceilings measured at start: decode = bytes a step must read over the copy bandwidth,
prefill = matmul FLOPs over the bf16 matmul rate. A decode step's time is the mean over the 128
positions from C (see decode_step_ms). Under torchrun each rank holds its share, and the
time spent in collectives per decode step is measured with the profiler. --compare hf runs
transformers' DeepseekV4ForCausalLM on the same weights (experts shared, not copied) side by side.

Under torchrun (N <= o_groups) a second table splits each decode step: compute, a CUDA graph of the
same step with every collective left out (the modules hold a Parallel whose collectives do nothing:
compute_step_ms); collectives, those an eager step makes (recorded with shapes and groups:
record_step) replayed alone from one CUDA graph, with their count and the bytes a rank hands in; and
unexplained = step - compute - collectives, signed (negative where they overlap). Then, for a V4 config,
a MODEL (labelled so, its inputs printed) of the step at the config's full depth on --model-ranks N
(default 4 8 16): each layer kind's decode ms measured at rank 0's share of N on this GPU (RankShare,
--layers layers, the live model freed first) times that kind's layers in the full config, plus the
local head; the recorded collectives costed as rings with latency and bus bandwidth fitted to
all-reduces of 4 KB .. 16 MB on the live ranks (step_model). N above o_groups is left out, with why.

The config's model_type picks the architecture (convert.architecture, as convert.py and generate.py
do). A DeepSeek-R1 / V3 config (configs/config_r1.json) runs model_v3.py at R1's shapes: by default
3 layers, the first --dense-layers 1 of them dense and the others MoE (a MoE layer is 23.0 GB in
bf16, so 1 + 2 fit one 80 GB GPU with caches for batch 32 at 32K positions: about 70 GB at the
peak), batches 1 and 32, contexts 1K and 32K; the floors count the latent cache (576 values a position) and MLA's cheaper
form; --compare hf times transformers' DeepseekV3ForCausalLM on the same tensors (peers.hf_twin_v3);
the run ends with issue 16's targets against its figures (targets_v3).

backends: one model as speed builds it (--dtype bf16 by default), switched in place from backend to
backend; the first of --backends is the reference A. Each prefills the same random prompt from
position 0 and decodes greedily, eager, recording float32 logits: --steps of them, the prefill's
then one a decode step. The others also run teacher-forced along A's tokens and are compared with
check.py's metrics (max_abs, max_rel, top-1, first greedy divergence). Speed: the prefill (median of
3) and a decode step as CUDA graph replays (eager for torch), the mean over the positions after the
prompt. A backend that fails (flaggems
without FlagGems installed) gets its reason in the table, and the others still run. --device cpu
(backends torch and auto) with configs/config_tiny.json runs it all on the CPU, timed once.

convert: writes a synthetic release with the real DeepSeek-V4-Flash tensor shapes (random valid
FP8 / FP4 codes and scales, not quantised numbers), times a plain read of its files and convert.py
at each --model-parallel, and reports throughput and peak memory against the largest shard and the
largest single tensor. The release stays in WORKDIR/release; each conversion's output is deleted
after it has been measured, so the disk needs room for the release and one conversion.
"""
import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import sys
import time
import traceback
import zlib
from typing import Optional

import torch
import torch.distributed as dist

import convert
import model_v3
from model import DecodeStep, ModelArgs, Transformer
from ops import BACKENDS, EXPERT_KERNELS, dequantised, linear_fp32
from parallel import LOWP_DTYPES, Parallel
from peers import hf_twin, hf_twin_v3
from quant import FP8_BLOCK, fp4_scale_shape, fp8_scale_shape
from runtime import GraphedDecoder, SetupError, end_process_groups, greedy, ready_flaggems, write_atomically
from random_release import hf_config, release_specs

ROOT = os.path.dirname(os.path.abspath(__file__))
GB = 1e9
KERNELS_TAKING = {acts: name for name, acts in EXPERT_KERNELS.items()}   # --humming's activations -> expert_kernels
HUMMING_ACTIVATIONS = [acts for acts in KERNELS_TAKING if acts]            # --humming's choices


# ----------------------------------------------------------------------------- speed

def median_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median time of fn() in milliseconds, with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def decode_step_ms(decoder, ids: torch.Tensor, first: int, count: int = 128, reps: int = 5) -> float:
    """Mean time of one decode step of ids [b, 1] over the positions first .. first + count - 1, the
    median of reps such passes. A compressor pools its window at the window's last token only, so
    one position alone is not typical: 128 consecutive ones hold every CSA and HCA window's share."""
    positions = [torch.full((ids.size(0),), p, device=ids.device) for p in range(first, first + count)]

    def run():
        for pos in positions:
            decoder(ids, pos)
    return median_ms(run, reps=reps, warmup=1) / count


class Graphed:
    """fn captured in a CUDA graph (after a warm-up call); a call replays it, which costs what the device
    does, not the host's launches, as in the decode step. It holds fn, and so every tensor fn reads or
    writes: a graph replays on the memory it was captured with, and a tensor only fn's closure held
    would be freed and its memory reused while the graph still reads it."""
    def __init__(self, fn):
        fn()
        torch.cuda.synchronize()
        self.fn, self.graph = fn, torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            fn()

    def __call__(self) -> None:
        self.graph.replay()


def ceilings() -> dict:
    """Measured copy bandwidth (bytes read + written per second) and bf16 matmul rate."""
    a = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)       # 512 MiB
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a))
    n = 8192
    x, y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: x @ y, reps=10)
    return {"bandwidth": 2 * a.numel() * 2 / copy_ms * 1e3, "matmul": 2 * n ** 3 / mm_ms * 1e3}


def random_weights(model: Transformer) -> None:
    device = model.embed.weight.device
    g = torch.Generator(device=device).manual_seed(model.tp.rank)
    for name, p in model.named_parameters():
        if p.dtype == torch.int32:                      # tid2eid: distinct experts per token
            e = model.args.n_routed_experts
            p.copy_(torch.rand(p.shape[0], e, device=device, generator=g).argsort(-1)[:, :p.shape[1]])
        elif name.endswith("norm.weight") or "_scale" in name:
            p.fill_(1.0)
        elif p.dim() == 2 and "hc_" not in name:
            p.normal_(0, p.shape[1] ** -0.5, generator=g)
        else:
            p.normal_(0, 0.02, generator=g)
    model.embed.weight.normal_(0, 1, generator=g)


def fill_caches(model: Transformer) -> None:
    """Random cache entries and compressor states: stand-ins for an already processed context."""
    for m in model.modules():
        for name, buf in m.named_buffers(recurse=False):
            if name in ("kv_cache", "pe_cache", "kv_state", "prev_kv"):
                buf.normal_()
            elif name in ("score_state", "prev_score"):
                buf.normal_(0, 0.1)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def decode_bytes(model: Transformer, batch: int, ctx: int) -> float:
    """Bytes one rank must read in a decode step: its weights of attention, shared expert and gate,
    of the local experts routed to (expected distinct count for `batch` tokens under uniform
    routing), its slice of the head, and the cache entries each row attends to or scores."""
    if isinstance(model, model_v3.Transformer):
        return decode_bytes_v3(model, batch, ctx)
    args = model.args
    total = param_bytes(model.head) + param_bytes(model.norm)
    e, k = args.n_routed_experts, args.n_activated_experts
    for layer in model.layers:
        local = [x for x in layer.ffn.experts if x is not None]
        attn, row = layer.attn, args.head_dim * 2
        total += param_bytes(layer) - sum(param_bytes(x) for x in local)
        total += len(local) * (1 - (1 - k / e) ** batch) * param_bytes(local[0])
        if attn.indexer is not None and not attn.indexed:          # a step leaves it out (Attention.indexed)
            total -= param_bytes(attn.indexer)
        kv = args.window_size * row
        if attn.ratio == 4:
            kv += min(args.index_topk, ctx // 4) * row + attn.indexed * ctx // 4 * args.index_head_dim * 2
        elif attn.ratio:
            kv += ctx // attn.ratio * row
        total += batch * kv
    return total


def prefill_flops(model: Transformer, tokens: int, ctx: int, rows: int = 1) -> float:
    """Matmul FLOPs of one rank for `tokens` new tokens at context ctx: its share of the active
    weights (attention, shared expert, gate, k routed experts on average) plus attention and indexer
    scores of its heads; the head for the last token of each row is left out. rows: how many rows
    the tokens are in (R1 / V3, see prefill_flops_v3)."""
    if isinstance(model, model_v3.Transformer):
        return prefill_flops_v3(model, tokens, ctx, rows)
    args = model.args
    heads = args.n_heads // model.tp.world_size
    index_heads = args.index_n_heads // model.tp.world_size
    flops = 0.0
    for layer in model.layers:
        local = [x for x in layer.ffn.experts if x is not None]
        expert = sum(p.numel() for p in local[0].parameters())
        dense = sum(p.numel() for n, p in layer.named_parameters() if ".experts." not in n and p.dim() == 2)
        flops += 2 * tokens * (dense + args.n_activated_experts * expert * len(local) / args.n_routed_experts)
        keys = args.window_size
        if layer.attn.ratio == 4:
            keys += min(args.index_topk, ctx // 4)
            flops += 2 * tokens * index_heads * args.index_head_dim * ctx // 4
        elif layer.attn.ratio:
            keys += ctx // layer.attn.ratio
        flops += 4 * tokens * heads * args.head_dim * keys
    return flops


def build(config: str, layers: int, max_batch: int, max_seq: int, backend: str, device: str = "cuda",
          dtype: str = "bf16", dense_layers: Optional[int] = None) -> Transformer:
    """The config cut to `layers` layers (no MTP), random weights made on `device`; for an R1 / V3
    config, the model_v3 Transformer with the first dense_layers of them dense (build_v3)."""
    if config_architecture(config) == "deepseek_v3":
        return build_v3(config, layers, dense_layers, max_batch, max_seq, backend, device, dtype)
    args = ModelArgs.from_file(config, n_layers=layers, n_mtp_layers=0, max_batch_size=max_batch,
                               max_seq_len=max_seq, backend=backend, dtype=dtype)
    args.compress_ratios = args.compress_ratios[:layers]
    with torch.device(device):
        model = Transformer(args)
    with torch.no_grad():
        random_weights(model)
    return model


# What speed and backends run when --layers, --batch, --context or --dense-layers are not given, by
# the config's architecture (R1 / V3: see the module docstring).
DEFAULTS = {
    "deepseek_v4": {"layers": 4, "batch": [1, 8, 32, 128], "context": [1024, 16384, 65536]},
    "deepseek_v3": {"layers": 3, "batch": [1, 32], "context": [1024, 32768], "dense_layers": 1},
}


def config_architecture(path: str) -> str:
    """'deepseek_v3' or 'deepseek_v4': convert.architecture of the config file (SystemExit if unreadable)."""
    try:
        with open(path) as f:
            return convert.architecture(json.load(f))
    except (OSError, ValueError) as e:
        raise SystemExit(f"bench.py: config {path}: {e}") from None


def resolve(args, keys) -> None:
    """Fill in the options among keys left unset (None) with the defaults of the config's
    architecture; --dense-layers is refused for a V4 config."""
    defaults = DEFAULTS[config_architecture(args.config)]
    if args.dense_layers is not None and "dense_layers" not in defaults:
        raise SystemExit("bench.py: --dense-layers is for DeepSeek-R1 / V3 configs")
    for key in keys:
        if getattr(args, key) is None:
            setattr(args, key, defaults.get(key))


def build_v3(config: str, layers: int, dense_layers: int, max_batch: int, max_seq: int, backend: str,
             device: str, dtype: str) -> "model_v3.Transformer":
    """An R1 / V3 config cut to `layers` layers, the first dense_layers dense (None: the config's
    first_k_dense_replace, 3 for R1) and the others MoE; random weights made on `device`."""
    dense = {} if dense_layers is None else {"n_dense_layers": dense_layers}
    try:
        args = model_v3.ModelArgs.from_file(config, n_layers=layers, max_batch_size=max_batch, max_seq_len=max_seq,
                                            backend=backend, dtype=dtype, **dense)
        with torch.device(device):
            model = model_v3.Transformer(args)
    except ValueError as e:
        raise SystemExit(f"bench.py: {config} with --layers {layers} --dense-layers {dense_layers}: {e}") from None
    with torch.no_grad():
        random_weights(model)
    return model


def describe_v3(model: "model_v3.Transformer", config: str) -> str:
    """Which layers of the R1 / V3 config the model holds, and their size."""
    a = model.args
    total = model_v3.ModelArgs.from_file(config).n_layers
    moe = a.n_layers - a.n_dense_layers
    return (f"{a.n_layers} of the {total} layers of {config}: {a.n_dense_layers} dense + {moe} MoE "
            f"({a.n_routed_experts} experts, top-{a.n_activated_experts}); change with --layers and --dense-layers. "
            f"Weights {param_bytes(model) / GB:.1f} GB on this rank, caches "
            f"{sum(b.numel() * b.element_size() for b in model.buffers()) / GB:.1f} GB")


def routed(layer) -> list:
    """The local routed experts of an R1 / V3 layer (none in a dense one)."""
    return [x for x in getattr(layer.ffn, "experts", []) if x is not None]


def decode_bytes_v3(model: "model_v3.Transformer", batch: int, ctx: int) -> float:
    """decode_bytes of R1 / V3: the head's slice and the final norm; each layer's weights but its
    routed experts, of which the expected number of distinct local ones `batch` tokens route to
    under uniform routing; and each row's ctx cached latents and rotary keys in every layer
    (kv_lora_rank + qk_rope_head_dim values a position, what the absorbed decode reads)."""
    a = model.args
    total = param_bytes(model.head) + param_bytes(model.norm)
    e, k = a.n_routed_experts, a.n_activated_experts
    position = (a.kv_lora_rank + a.qk_rope_head_dim) * model.embed.weight.element_size()
    for layer in model.layers:
        local = routed(layer)
        total += param_bytes(layer) - sum(param_bytes(x) for x in local)
        if local:
            total += len(local) * (1 - (1 - k / e) ** batch) * param_bytes(local[0])
        total += batch * ctx * position
    return total


def prefill_flops_v3(model: "model_v3.Transformer", tokens: int, ctx: int, rows: int) -> float:
    """prefill_flops of R1 / V3: `tokens` new tokens in `rows` rows, each attending to ctx keys. The
    weights a token uses (attention but wkv_b, the dense MLP or the gate, shared expert and k routed
    experts on average), and attention over the latent cache by the cheaper of MLA's two forms:
    naive, each row's ctx latents expanded by wkv_b into keys and values of its heads, then
    (n + r) + v products per key and head; absorbed, wkv_b folded into each query and output
    (n + v) c products per head, then (c + r) + c per key and head. The head is left out."""
    a = model.args
    h = a.n_heads // model.tp.world_size
    c, r, n, v = a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim
    flops = 0.0
    for layer in model.layers:
        local = routed(layer)
        weights = sum(p.numel() for name, p in layer.named_parameters()
                      if ".experts." not in name and p.dim() == 2 and not name.endswith("wkv_b.weight"))
        if local:
            weights += a.n_activated_experts * len(local) / a.n_routed_experts * param_count(local[0])
        naive = 2 * rows * ctx * h * c * (n + v) + 2 * tokens * ctx * h * (n + r + v)
        absorbed = 2 * tokens * h * c * (n + v) + 2 * tokens * ctx * h * (2 * c + r)
        flops += 2 * tokens * weights + min(naive, absorbed)
    return flops


def targets_v3(rows: list, versus: dict) -> list:
    """Issue 16's decode targets for R1 / V3, each line with its figure from this run: at batch 1 (its
    shortest context) at least 70% of the bandwidth floor and 10x transformers' step (versus: batch ->
    transformers' ms / ours at ctx 1024); at each batch the step at the longest context at most 1.3x
    the shortest's."""
    def verdict(ok):
        return "met" if ok else "NOT met"
    lines = []
    first = [r for r in rows if r["batch"] == 1]
    if first:
        r = min(first, key=lambda r: r["ctx"])
        lines.append(f"decode, batch 1, ctx {r['ctx']}: {r['decode_floor']:.0%} of its bandwidth floor "
                     f"(target >= 70%: {verdict(r['decode_floor'] >= 0.7)})")
    if 1 in versus:
        lines.append(f"decode, batch 1, ctx 1024: {versus[1]:.1f}x transformers' step "
                     f"(target >= 10x: {verdict(versus[1] >= 10)})")
    contexts = sorted({r["ctx"] for r in rows})
    if len(contexts) > 1:
        for b in sorted({r["batch"] for r in rows}):
            ms = {r["ctx"]: r["decode_ms"] for r in rows if r["batch"] == b}
            ratio = ms[contexts[-1]] / ms[contexts[0]]
            lines.append(f"decode, batch {b}: ctx {contexts[-1]} takes {ratio:.2f}x ctx {contexts[0]} "
                         f"(target <= 1.3x: {verdict(ratio <= 1.3)})")
    return lines


def hf_decode_ms(hf, batch: int, ctx: int, steps: int = 8) -> float:
    ids = torch.randint(0, hf.config.vocab_size, (batch, ctx), device="cuda")
    with torch.no_grad():
        out = hf(ids, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf(nxt, past_key_values=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def collective_ms(model: Transformer, batch: int, ctx: int, steps: int = 5) -> tuple:
    """(ms in NCCL kernels, ms in all kernels) of an eager decode step, from the profiler: the median
    over `steps` steps of each. The ranks start each step together (a barrier outside the profiled
    span: its NCCL kernel would count the other rank's lateness), but an NCCL kernel also counts the
    time it waits for the slower rank (eager launches drift, and a rank's profiler may start late: the
    mean of five 1-ms steps once read 23 ms of NCCL kernels on two H200s), so the first figure bounds
    the collectives' cost from above."""
    from torch.profiler import ProfilerActivity, profile
    ids = torch.randint(0, model.args.vocab_size, (batch, 1), device="cuda")
    pos = torch.full((batch,), ctx, device="cuda")
    model.decode(ids, pos)
    nccl, every = [], []
    for _ in range(steps):
        dist.barrier()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.decode(ids, pos)
            torch.cuda.synchronize()
        kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
        nccl.append(sum(e.device_time_total for e in kernels if "nccl" in e.key.lower()) / 1e3)
        every.append(sum(e.device_time_total for e in kernels) / 1e3)
    return statistics.median(nccl), statistics.median(every)


# ----------------------------------------------------------------------------- speed under torchrun: the
# step split into compute, collectives and the rest, and a model of the step on N ranks

@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a step: op 'all_reduce' (in place) or 'all_gather' (of the head's logits, every
    rank's part concatenated on the last dim), the tensor this rank hands in, its process group (None:
    all ranks), and where: a layer's compress ratio (its kind), or None outside the layers."""
    op: str
    shape: tuple
    dtype: torch.dtype
    group: object
    where: Optional[int]

    @property
    def bytes(self) -> int:
        """Bytes this rank hands in (for all_gather its own part, not the gathered whole)."""
        return torch.Size(self.shape).numel() * self.dtype.itemsize


class Recorder(Parallel):
    """inner's place in the world (world size, rank, groups); each collective is run by inner and
    appended to calls (a list shared by the recorders of one step) as a Collective made at `where`."""
    def __init__(self, inner: Parallel, calls: list, where: Optional[int]):
        super().__init__(inner.world_size, inner.rank, inner.pair_group, inner.proj_group)
        self.inner, self.calls, self.where = inner, calls, where

    @property
    def out_group_split(self) -> int:
        return self.inner.out_group_split

    def all_reduce(self, x: torch.Tensor, group=None) -> torch.Tensor:
        self.calls.append(Collective("all_reduce", tuple(x.shape), x.dtype, group, self.where))
        return self.inner.all_reduce(x, group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(Collective("all_gather", tuple(x.shape), x.dtype, None, self.where))
        return self.inner.all_gather(x)


def layer_kind(layer) -> int:
    """A layer's kind: its attention's compress ratio (0 window only, 4 CSA, > 4 HCA; 0 for R1 / V3)."""
    return getattr(layer.attn, "ratio", 0) or 0


@contextlib.contextmanager
def swapped_tp(model, stand_in):
    """Inside the block every module of model holding model.tp holds stand_in(name) instead (name as
    model.named_modules() gives it); back to model.tp on the way out, whatever happens."""
    tp = model.tp
    held = [(name, m) for name, m in model.named_modules() if getattr(m, "tp", None) is tp]
    stand_ins = [stand_in(name) for name, _ in held]          # all made before any module changes
    try:
        for (_, m), other in zip(held, stand_ins):
            m.tp = other
        yield
    finally:
        for _, m in held:
            m.tp = tp


def record_step(model, ids: torch.Tensor, pos: torch.Tensor) -> list:
    """The collectives of one eager decode step of ids [b, 1] at pos [b] (run for real, by model.tp),
    in the order made -> [Collective], each with the kind of the layer that made it."""
    calls, recorders, tp = [], {}, model.tp

    def recorder(name: str) -> Recorder:
        parts = name.split(".")
        where = layer_kind(model.layers[int(parts[1])]) if parts[0] == "layers" and len(parts) > 1 else None
        return recorders.setdefault(where, Recorder(tp, calls, where))
    with swapped_tp(model, recorder):
        model.decode(ids, pos)
    return calls


def silent_twin(model) -> Parallel:
    """A Parallel of model.tp's world size whose collectives do nothing (RankShare; the rank does not
    matter to a step, only to how the weights were cut). Only for N <= o_groups: in the o-groups
    layout the heads' gather over the pair group goes to torch.distributed, not through tp."""
    if model.tp.pair_group is not None:
        raise ValueError("the compute-only step covers N <= o_groups (the o-groups layout gathers heads itself)")
    return RankShare(model.tp.world_size, getattr(model.args, "o_groups", model.tp.world_size))   # R1 / V3: none


class OneStep:
    """model.decode for `batch` rows replayed from one CUDA graph (GraphedDecoder's, for one bucket and
    without the warm-up on a side stream); call with ids [b, 1], pos [b] as a decoder."""
    def __init__(self, model, batch: int):
        device = model.embed.weight.device
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.replay = Graphed(lambda: model.decode(self.ids, self.pos))

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self.ids.copy_(ids)
        self.pos.copy_(pos)
        self.replay()


def compute_step_ms(model, ids: torch.Tensor, ctx: int) -> float:
    """decode_step_ms of the step with its collectives left out: the modules hold silent_twin(model)
    while a graph of the step is captured and timed, then model.tp again. The numbers it computes are
    wrong (partial sums never reduced, the head's logits not gathered); only its time counts: every
    kernel of the step but the collectives'."""
    twin = silent_twin(model)
    with swapped_tp(model, lambda name: twin):
        step = OneStep(model, ids.size(0)) if model.ops.graphs else model.decode
        return decode_step_ms(step, ids, ctx)


def replay_collectives(tp: Parallel, calls: list, device) -> callable:
    """A function making calls' collectives alone, in order, through tp on zero tensors of their shapes
    (zeros: a sum stays finite however often it runs)."""
    buffers = [torch.zeros(c.shape, dtype=c.dtype, device=device) for c in calls]

    def run():
        for c, x in zip(calls, buffers):
            if c.op == "all_reduce":
                tp.all_reduce(x, c.group)
            else:
                tp.all_gather(x)
    return run


def all_reduce_points(tp: Parallel, sizes=(1 << 12, 1 << 16, 1 << 20, 1 << 24), reps: int = 16) -> list:
    """[(bytes, ms)] of one bf16 all-reduce over all ranks at each size, timed as a CUDA graph of reps of
    them in a row."""
    points = []
    for size in sizes:
        x = torch.zeros(size // 2, dtype=torch.bfloat16, device="cuda")

        def run():
            for _ in range(reps):
                tp.all_reduce(x)
        points.append((size, median_ms(Graphed(run)) / reps))
    return points


def fit_ring(points: list, n: int) -> tuple:
    """(a ms, bus bytes/ms) of ms = a + 2 (n - 1) / n * bytes / bus fitted to points [(bytes, ms)] of
    an all-reduce on n ranks, least squares (at least two sizes)."""
    xs, ys = [b for b, _ in points], [ms for _, ms in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, 2 * (n - 1) / n / slope


def collective_model_ms(c: Collective, live_n: int, n: int, a: float, bus: float) -> float:
    """Model of c (made on live_n ranks) on n ranks, as rings with latency a ms and bus bytes/ms:
    all-reduce a + 2 (n - 1) / n * bytes / bus (the bytes do not change with n), all-gather of the
    head's logits a + (n - 1) / n * whole / bus, whole = live_n * the part this rank handed in."""
    if c.op == "all_reduce":
        return a + 2 * (n - 1) / n * c.bytes / bus
    return a + (n - 1) / n * live_n * c.bytes / bus


def step_model(n: int, layer_ms: dict, head_ms: float, depth: dict, calls: list, measured: dict, live_n: int,
               a: float, bus: float) -> dict:
    """A model of a decode step of the full depth on n ranks from measured inputs:
    layer_ms kind -> ms of one layer at rank 0's share of n; head_ms the local head part at n;
    depth kind -> layers of that kind in the full model; calls [Collective] of one step on live_n
    ranks with measured kind -> layers of that kind in the model that made them; a, bus the fitted
    ring (collective_model_ms). A layer's collectives are its kind's calls over its kind's layers;
    those outside the layers (embedding, head) count once. -> {compute, collectives, step} ms (the
    collectives assumed not to overlap compute, launches free as in a CUDA graph)."""
    missing = sorted(set(depth) - set(layer_ms) | set(depth) - set(measured))
    if missing:
        raise ValueError(f"no measured layer of kind(s) {missing}")
    compute = sum(count * layer_ms[kind] for kind, count in depth.items()) + head_ms
    collectives = 0.0
    for c in calls:
        times = 1 if c.where is None else depth.get(c.where, 0) / measured[c.where]
        collectives += times * collective_model_ms(c, live_n, n, a, bus)
    return dict(compute=compute, collectives=collectives, step=compute + collectives)


def bucket(decoder, batch: int) -> int:
    """The rows a decoder's step runs for `batch` rows: GraphedDecoder's bucket, else batch."""
    return next(x for x in decoder.buckets if x >= batch) if isinstance(decoder, GraphedDecoder) else batch


def split_step(model, ids: torch.Tensor, ctx: int) -> dict:
    """A decode step of ids [b, 1] at ctx (under torchrun) in parts: compute_ms (compute_step_ms),
    collective_ms (its collectives alone, as record_step lists them, replayed from a CUDA graph), with
    their count and bytes (those this rank hands in), and the calls themselves."""
    pos = torch.full((ids.size(0),), ctx, device=ids.device)
    calls = record_step(model, ids, pos)
    alone = median_ms(Graphed(replay_collectives(model.tp, calls, ids.device)))
    return dict(compute_ms=compute_step_ms(model, ids, ctx), collective_ms=alone, count=len(calls),
                bytes=sum(c.bytes for c in calls), calls=calls)


def split_lines(rows: list) -> list:
    """The table of the steps split (rows with split_step's parts): unexplained = step - compute -
    collectives, negative where they overlap."""
    out = ["\n| context | batch | step ms (graph) | compute ms (graph, no collectives) | collectives ms alone (count, "
           "MB handed in) | unexplained ms |", "|---|---|---|---|---|---|"]
    for r in rows:
        rest = r["decode_ms"] - r["compute_ms"] - r["collective_ms"]
        out.append(f"| {r['ctx']} | {r['batch']} | {r['decode_ms']:.3f} | {r['compute_ms']:.3f} | "
                   f"{r['collective_ms']:.3f} ({r['count']}, {r['bytes'] / 1e6:.2f}) | {rest:+.3f} |")
    return out


def local_head_ms(model, batch: int) -> float:
    """The local part of the head for `batch` rows (linear_fp32 on this rank's vocabulary slice), graphed."""
    x = torch.randn(batch, model.args.dim, device="cuda").to(model.embed.weight.dtype)
    return median_ms(Graphed(lambda: linear_fp32(x, model.head.weight)))


def kind_ms(model, ids: torch.Tensor, ctx: int) -> dict:
    """kind -> mean decode_step_ms of one layer of that kind alone (LayerSteps of that layer)."""
    times = {}
    for layer in model.layers:
        times.setdefault(layer_kind(layer), []).append(decode_step_ms(LayerSteps(model, ids.size(0), [layer]), ids, ctx))
    return {kind: statistics.fmean(ms) for kind, ms in times.items()}


def rank_share_inputs(args, ranks: int, max_seq: int) -> dict:
    """(ctx, batch) -> (kind_ms, local_head_ms) of --layers layers of args.config at rank 0's share of
    `ranks` ranks on this GPU (RankShare, weights as bench speed's: bf16), for step_model."""
    config = ModelArgs.from_file(args.config)
    model = build_filled(args.config, args.layers, "bf16", max(args.batch), max_seq, RankShare(ranks, config.o_groups),
                         backend=args.backend)
    out = {}
    with torch.no_grad():
        fill_caches(model)
        for ctx in args.context:
            for b in args.batch:
                ids = torch.randint(0, model.args.vocab_size, (b, 1), device="cuda")
                out[ctx, b] = kind_ms(model, ids, ctx), local_head_ms(model, b)
    return out


def model_lines(args, rows: list, live_n: int, measured: dict, fit: tuple, points: list, max_seq: int) -> list:
    """The model of the full-depth step at each --model-ranks N (step_model), labelled, with its inputs;
    an N that cannot be modelled gets its reason."""
    config = ModelArgs.from_file(args.config)
    depth = dict(collections.Counter(config.ratio(i) for i in range(config.n_layers)))
    missing = sorted(set(depth) - set(measured))
    if missing:
        return [f"\nMODEL left out: the layers measured hold no layer of kind(s) {missing} (compress ratio) of "
                f"{args.config}'s full depth; take more --layers"]
    a, bus = fit
    lines = ["\nMODEL (not a measurement) of a decode step of all {} layers of {} on N ranks: the layers' compute "
             "measured per kind at rank 0's share of N on this GPU times the layers of that kind, plus the local head "
             "part; collectives = the calls recorded in a step on these {} ranks (a layer's calls per layer of its "
             "kind, times the layers of that kind; embedding and head once) each costed as a ring on N ranks: "
             "all-reduce a + 2(N-1)/N * bytes / bus, head all-gather a + (N-1)/N * logits bytes / bus; no overlap, "
             "embedding, HC head and norm left out.".format(config.n_layers, args.config, live_n),
             f"inputs: layer kinds (compress ratio: layers) full depth {depth}, measured {measured}; all-reduce fitted "
             f"on {live_n} ranks: a = {a * 1e3:.1f} us, bus {bus / 1e6:.0f} GB/s, from "
             + ", ".join(f"{size} B: {ms * 1e3:.1f} us" for size, ms in points),
             "the bus bandwidth and a are taken as the same at N (one NVSwitch node, N <= 8)"]
    table = ["| N | ctx | batch | layer ms by kind (at N) | local head ms | compute ms | collectives ms | step ms |",
             "|---|---|---|---|---|---|---|---|"]
    for n in args.model_ranks:
        if n > config.o_groups:
            lines.append(f"N = {n}: left out: above o_groups = {config.o_groups} the o-groups layout gathers heads "
                         f"over pair groups, so rank 0's share cannot run alone here, and {n} GPUs span more than "
                         f"one node, whose links a run on one node does not measure")
            continue
        try:
            config.validate(n)
        except ValueError as e:
            lines.append(f"N = {n}: left out: {e}")
            continue
        inputs = rank_share_inputs(args, n, max_seq)
        torch.cuda.empty_cache()
        for r in rows:
            per_kind, head = inputs[r["ctx"], r["batch"]]
            m = step_model(n, per_kind, head, depth, r["calls"], measured, live_n, a, bus)
            kinds = ", ".join(f"{k}: {ms:.3f}" for k, ms in sorted(per_kind.items()))
            table.append(f"| {n} | {r['ctx']} | {r['batch']} | {kinds} | {head:.3f} | {m['compute']:.3f} | "
                         f"{m['collectives']:.3f} | {m['step']:.3f} |")
    return lines + [""] + table


def print_profile(label: str, fn, steps: int = 3, rows: int = 60) -> None:
    """The kernels of fn() by GPU time, and how many launches a call makes."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels) / steps
    launches = sum(e.count for e in kernels) / steps
    print(f"profile of {label}: {launches:.0f} kernel launches, {total / 1e3:.3f} ms of GPU time per call")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:rows]:
        print(f"  {e.device_time_total / steps / 1e3:8.3f} ms {e.count / steps:6.0f}x  {e.key[:110]}")


def bench_speed(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench.py speed: needs a CUDA GPU")
    resolve(args, ("layers", "batch", "context", "dense_layers"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl")
    lead = not dist.is_initialized() or dist.get_rank() == 0

    def say(text):
        if lead:
            print(text, flush=True)

    ceil = ceilings()                      # the device's, measured before FlagGems may take over copies
    if args.backend == "flaggems":
        ready_flaggems("bench.py speed --backend flaggems")
    say(f"device {torch.cuda.get_device_name()} x{world}, {args.layers} layers of {args.config}, backend "
        f"{args.backend}: copy {ceil['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul {ceil['matmul'] / 1e12:.0f} TFLOP/s")
    chunk = args.chunk
    model = build(args.config, args.layers, max(args.batch), max(max(args.context) + chunk, args.prefill),
                  args.backend, dense_layers=args.dense_layers)
    if isinstance(model, model_v3.Transformer):
        say(describe_v3(model, args.config))
    rows, versus = [], {}
    split = world > 1 and model.tp.pair_group is None         # compute_step_ms covers N <= o_groups
    if world > 1 and not split:
        say("the step is not split into compute and collectives in the o-groups layout (N > o_groups)")
    with torch.no_grad():
        fill_caches(model)
        decoder = GraphedDecoder(model) if model.ops.graphs else model.decode
        for ctx in args.context:
            for b in args.batch:
                ids = torch.randint(0, model.args.vocab_size, (b, 1), device="cuda")
                ms = decode_step_ms(decoder, ids, ctx)
                floor_ms = decode_bytes(model, b, ctx) / ceil["bandwidth"] * 1e3
                rows_pre = max(1, min(b, args.prefill_tokens // chunk))
                pids = torch.randint(0, model.args.vocab_size, (rows_pre, chunk), device="cuda")
                pre_ms = median_ms(lambda: model(pids, ctx - chunk), reps=3, warmup=1)
                pre_floor = prefill_flops(model, rows_pre * chunk, ctx, rows_pre) / ceil["matmul"] * 1e3
                comm = collective_ms(model, b, ctx) if world > 1 else (0.0, 0.0)
                rows.append(dict(ctx=ctx, batch=b, decode_ms=ms, decode_floor=floor_ms / ms,
                                 prefill_rows=rows_pre, prefill_tok_s=rows_pre * chunk / pre_ms * 1e3,
                                 prefill_floor=pre_floor / pre_ms, comm_ms=comm[0], eager_ms=comm[1]))
                if split:
                    rows_run = torch.randint(0, model.args.vocab_size, (bucket(decoder, b), 1), device="cuda")
                    rows[-1].update(split_step(model, rows_run, ctx))
                say(f"ctx {ctx:6d} batch {b:4d}: decode {ms:7.3f} ms/step = {b / ms * 1e3:8.0f} tok/s "
                    f"({floor_ms / ms:5.1%} of floor {floor_ms:.3f} ms) | prefill {rows_pre}x{chunk} at ctx: "
                    f"{rows_pre * chunk / pre_ms * 1e3:7.0f} tok/s ({pre_floor / pre_ms:5.1%} of floor)"
                    + (f" | NCCL kernels {comm[0]:.3f} of {comm[1]:.3f} ms GPU time per eager step (waits included)"
                       if world > 1 else ""))
        ids = torch.randint(0, model.args.vocab_size, (1, args.prefill), device="cuda")
        pre_ms = median_ms(lambda: model(ids, 0), reps=3, warmup=1)
        pre_floor = prefill_flops(model, args.prefill, args.prefill // 2) / ceil["matmul"] * 1e3
        say(f"prefill of {args.prefill} tokens from position 0: {pre_ms:.1f} ms = {args.prefill / pre_ms * 1e3:.0f} "
            f"tok/s ({pre_floor / pre_ms:.1%} of the matmul floor {pre_floor:.2f} ms)")
        if args.profile and lead:
            ids = torch.randint(0, model.args.vocab_size, (1, 1), device="cuda")
            ctx = args.context[0]
            positions = itertools.cycle([torch.full((1,), p, device="cuda") for p in range(ctx, ctx + 128)])
            print_profile(f"eager decode, batch 1, mean over positions {ctx} .. {ctx + 127}",
                          lambda: model.decode(ids, next(positions)), steps=128)
            ids = torch.randint(0, model.args.vocab_size, (1, args.prefill), device="cuda")
            print_profile(f"prefill of {args.prefill} tokens", lambda: model(ids, 0), steps=1)
        if args.compare == "hf":
            if world > 1:
                raise SystemExit("bench.py speed: --compare hf runs on one GPU only")
            hf = (hf_twin_v3 if isinstance(model, model_v3.Transformer) else hf_twin)(model)
            for b in (1, 8):
                ctx = 1024
                theirs = hf_decode_ms(hf, b, ctx)
                ids = torch.randint(0, model.args.vocab_size, (b, 1), device="cuda")
                ours = decode_step_ms(decoder, ids, ctx)
                say(f"decode vs transformers, ctx {ctx} batch {b}: ours {ours:.3f} ms/step, transformers "
                    f"{theirs:.3f} ms/step -> {theirs / ours:.1f}x")
                versus[b] = theirs / ours
    say("\n| context | batch | decode ms/step | decode tok/s | of floor | prefill tok/s | of floor |"
        + (" NCCL of all kernel ms, eager step |" if world > 1 else ""))
    say("|---|---|---|---|---|---|---|" + ("---|" if world > 1 else ""))
    for r in rows:
        say(f"| {r['ctx']} | {r['batch']} | {r['decode_ms']:.3f} | {r['batch'] / r['decode_ms'] * 1e3:.0f} | "
            f"{r['decode_floor']:.0%} | {r['prefill_tok_s']:.0f} | {r['prefill_floor']:.0%} |"
            + (f" {r['comm_ms']:.3f} of {r['eager_ms']:.3f} |" if world > 1 else ""))
    if isinstance(model, model_v3.Transformer):
        say("\nissue 16's targets for R1 / V3:\n" + "\n".join(targets_v3(rows, versus)))
    if split:
        say("\n".join(split_lines(rows)))
        if args.model_ranks and isinstance(model, Transformer):
            points = all_reduce_points(model.tp)
            measured = dict(collections.Counter(layer_kind(layer) for layer in model.layers))
            model = decoder = None                              # room for the rank shares on this GPU
            torch.cuda.empty_cache()
            say("\n".join(model_lines(args, rows, world, measured, fit_ring(points, world), points,
                                       max(args.context) + 128)))


def add_speed(commands) -> None:
    p = commands.add_parser("speed", help="the model on one GPU (or torchrun ranks) with real V4-Flash (or R1) "
                                          "layer shapes")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "config_flash.json"),
                   help="model config; its model_type picks the architecture (configs/config_r1.json: DeepSeek-R1)")
    p.add_argument("--layers", type=int, help="layers kept from the config (default 4; 3 for R1 / V3)")
    p.add_argument("--dense-layers", type=int, help="R1 / V3: how many of the layers kept are dense (default 1)")
    p.add_argument("--batch", type=int, nargs="+", help="default 1 8 32 128; 1 32 for R1 / V3")
    p.add_argument("--context", type=int, nargs="+", help="default 1024 16384 65536; 1024 32768 for R1 / V3")
    p.add_argument("--backend", default="triton", choices=["torch", "triton", "flaggems"],
                   help="kernels; flaggems = FlagGems' fused kernels (FLAGGEMS_EXCLUDE set also routes the aten "
                        "ops through FlagGems, minus those it names)")
    p.add_argument("--compare", choices=["hf"], help="also time transformers' DeepseekV4 (or V3) on the same "
                                                     "weights")
    p.add_argument("--chunk", type=int, default=1024, help="prefill chunk length measured at each context")
    p.add_argument("--prefill-tokens", type=int, default=4096, help="tokens per prefill chunk measurement, at most")
    p.add_argument("--prefill", type=int, default=4096, help="length of the prefill measured from position 0")
    p.add_argument("--profile", action="store_true", help="print the top kernels of a decode step and a prefill")
    p.add_argument("--model-ranks", type=int, nargs="*", default=[4, 8, 16],
                   help="under torchrun (V4): N of the model of the full-depth step (none: no model)")
    p.set_defaults(run=bench_speed)


def bench_moe_tiles(args) -> None:
    """The grouped MoE GEMMs at V4-Flash expert shapes under each tile configuration."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py moe-tiles: needs a CUDA GPU")
    import kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    n_exp, dim, inter, k = 256, 4096, 2048, 6
    w13 = torch.randn(n_exp, 2 * inter, dim, device="cuda", dtype=torch.bfloat16, generator=g) / dim ** 0.5
    w2 = torch.randn(n_exp, dim, inter, device="cuda", dtype=torch.bfloat16, generator=g) / inter ** 0.5
    ceil = ceilings()
    matmul, ceil_bw = ceil["matmul"], ceil["bandwidth"]
    print(f"grouped MoE GEMMs, {n_exp} experts of {dim} x {inter}, top-{k}, bf16 matmul ceiling "
          f"{matmul / 1e12:.0f} TFLOP/s")
    for tokens in args.tokens:
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        experts = torch.rand(tokens, n_exp, device="cuda", generator=g).topk(k, dim=-1).indices
        weights = torch.rand(tokens, k, device="cuda", generator=g)
        flops = tokens * k * 3 * dim * inter * 2
        ref = kernel.moe_experts_triton(x, w13, w2, weights, experts, 0, 10.0, kernel.MOE_TILES_SMALL)
        for tiles in [(bm, bn, 64, 8, st) for bm in (64, 128) for bn in (128, 256) for st in (3, 4)]:
            try:
                out = kernel.moe_experts_triton(x, w13, w2, weights, experts, 0, 10.0, tiles)
                ms = median_ms(lambda: kernel.moe_experts_triton(x, w13, w2, weights, experts, 0, 10.0, tiles),
                               reps=5, warmup=1)
            except Exception as e:                  # noqa: BLE001 - a config can exceed shared memory
                print(f"tokens {tokens:6d} tiles {tiles}: {type(e).__name__}")
                continue
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"tokens {tokens:6d} tiles {tiles}: {ms:7.3f} ms = {flops / ms / 1e9:6.0f} TFLOP/s "
                  f"({flops / ms * 1e3 / matmul:5.1%} of the ceiling), rel diff {err:.1e}", flush=True)


    for tokens in args.decode_tokens:
        x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, generator=g)
        experts = torch.rand(tokens, n_exp, device="cuda", generator=g).topk(k, dim=-1).indices
        weights = torch.rand(tokens, k, device="cuda", generator=g)
        distinct = experts.unique().numel()
        grouped = median_ms(Graphed(lambda: kernel.moe_experts_triton(x, w13, w2, weights, experts, 0, 10.0)))
        gemv = median_ms(Graphed(lambda: kernel.moe_gemv_triton(x, w13, w2, weights, experts, 0, 10.0)))
        ref = kernel.moe_experts_triton(x, w13, w2, weights, experts, 0, 10.0)
        err = ((kernel.moe_gemv_triton(x, w13, w2, weights, experts, 0, 10.0) - ref).norm() / ref.norm()).item()
        floor = distinct * 3 * dim * inter * 2 / ceil_bw * 1e3
        print(f"decode {tokens:3d} tokens ({tokens * k} assignments, {distinct} experts; floor {floor:.3f} ms): "
              f"grouped GEMMs {grouped:.3f} ms, few-token kernels {gemv:.3f} ms (rel diff {err:.1e})", flush=True)


def add_moe_tiles(commands) -> None:
    p = commands.add_parser("moe-tiles", help="time the grouped MoE GEMMs under each tile configuration, and "
                                              "against the few-token kernels at decode sizes (CUDA)")
    p.add_argument("--tokens", type=int, nargs="+", default=[4096])
    p.add_argument("--decode-tokens", type=int, nargs="+", default=[1, 4, 8, 16])
    p.set_defaults(run=bench_moe_tiles)


def bench_attn_tiles(args) -> None:
    """Sparse attention at V4 shapes (64 heads of 512, window 128 + top-k 512) under each tile choice."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py attn-tiles: needs a CUDA GPU")
    import kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    h, d, k = 64, 512, 640
    for b, s, n in ((1, args.tokens, args.tokens + 1024), (1, 1, 16640), (32, 1, 16640)):
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
        kv = torch.randn(b, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
        sink = torch.randn(h, device="cuda", generator=g)
        idx = torch.randint(0, n, (b, s, k), device="cuda", generator=g)
        flops = 4 * b * s * h * k * d
        ref = kernel.sparse_attn_triton(q, kv, sink, idx, d ** -0.5)
        for tiles in ((16, 16, 4), (16, 32, 4), (32, 16, 4), (32, 16, 8), (32, 32, 8), (64, 16, 8)):
            try:
                out = kernel.sparse_attn_triton(q, kv, sink, idx, d ** -0.5, tiles)
                ms = median_ms(lambda: kernel.sparse_attn_triton(q, kv, sink, idx, d ** -0.5, tiles), reps=5)
            except Exception as e:                  # noqa: BLE001 - a tile choice can exceed registers or shared memory
                print(f"b {b} s {s} tiles {tiles}: {type(e).__name__}")
                continue
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"b {b:3d} s {s:5d} tiles (heads, keys, warps) {tiles}: {ms:7.3f} ms = {flops / ms / 1e9:5.0f} "
                  f"TFLOP/s, rel diff {err:.1e}", flush=True)


def add_attn_tiles(commands) -> None:
    p = commands.add_parser("attn-tiles", help="time the sparse attention kernel under each tile choice (CUDA)")
    p.add_argument("--tokens", type=int, default=4096, help="prefill tokens of the prefill shape")
    p.set_defaults(run=bench_attn_tiles)


# ----------------------------------------------------------------------------- backends

def use_backend(model: Transformer, name: str, device: str) -> None:
    """Switch a built model's kernels in place (every module holds the same Ops object)."""
    model.ops.use(name, device)


def greedy_run(model: Transformer, prompt: torch.Tensor, steps: int, forced: Optional[torch.Tensor] = None):
    """runtime.greedy (eager one-token passes at tensor positions), timed: float32 logits
    [b, steps, vocab] (on the CPU), their argmax tokens [b, steps], and the seconds of the prefill
    (a separate pass before) and of a one-token pass (the mean of the run's passes)."""
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    start = time.perf_counter()
    model(prompt, 0)
    sync()
    prefill_s = time.perf_counter() - start
    spent = []

    def step(ids, pos):
        begin = time.perf_counter()
        out = model.decode(ids, pos)
        sync()
        spent.append(time.perf_counter() - begin)
        return out
    logits, _ = greedy(model, prompt, steps, forced, step)
    return logits, logits.argmax(-1), prefill_s, sum(spent) / len(spent)


def run_backend(model: Transformer, name: str, prompt: torch.Tensor, steps: int, ref: Optional[tuple]):
    """Speed and logits of the model under backend `name` (already set): (row of numbers, logits,
    tokens). On CUDA the prefill is timed apart (median of 3) and a decode step as a CUDA graph
    replay (eager for torch), the graphs captured first since capturing writes to cache rows; on the
    CPU both come from the consistency run. With ref = (A's logits, A's tokens), also the run
    teacher-forced along A's tokens, compared per prompt row with check.py's metrics."""
    from check import compare
    b, s = prompt.shape
    row = {}
    if prompt.is_cuda:
        decoder = GraphedDecoder(model) if model.ops.graphs else model.decode
        row["prefill_ms"] = median_ms(lambda: model(prompt, 0), reps=3, warmup=1)
        row["decode_ms"] = decode_step_ms(decoder, prompt[:, -1:], s, min(128, model.args.max_seq_len - s), reps=3)
        row["decode"] = "cuda graph" if model.ops.graphs else "eager"
    logits, tokens, prefill_s, step_s = greedy_run(model, prompt, steps)
    if not prompt.is_cuda:
        row.update(prefill_ms=prefill_s * 1e3, decode_ms=step_s * 1e3, decode="eager")
    row["prefill_tok_s"] = b * s / row["prefill_ms"] * 1e3
    if ref is not None:
        forced = greedy_run(model, prompt, steps, forced=ref[1])[0]
        rows = [compare(ref[0][r], forced[r], ref[1][r].tolist(), tokens[r].tolist()) for r in range(b)]
        diverged = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
        row["vs_reference"] = {"max_abs": max(r["max_abs"] for r in rows), "max_rel": max(r["max_rel"] for r in rows),
                               "top1": min(r["top1"] for r in rows), "first_divergence": min(diverged, default=None),
                               "nonfinite": sum(r["nonfinite"] for r in rows), "rows": rows}
    return row, logits, tokens


def backend_cells(row: dict) -> list:
    """The table cells of a backend after its name: speed, then the metrics against A ("-" without A)."""
    if "error" in row:
        return [f"failed: {row['error'].splitlines()[0][:100]}"] + ["-"] * 5
    cells = [f"{row['prefill_ms']:.1f} ({row['prefill_tok_s']:.0f})", f"{row['decode_ms']:.3f}"]
    vs = row.get("vs_reference")
    if vs is None:
        return cells + ["(A)" if row["reference"] else "-"] * 4
    div = "none" if vs["first_divergence"] is None else str(vs["first_divergence"])
    return cells + [f"{vs['max_abs']:.3g}", f"{vs['max_rel']:.3g}", f"{vs['top1']:.3f}", div]


def bench_backends(args) -> None:
    from check import DEFINITIONS, sanitize
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py backends: --device cuda but no CUDA GPU is visible (--device cpu runs backend torch)")
    if device.type == "cpu":
        for name in args.backends:
            if name in ("triton", "flaggems"):
                raise SystemExit(f"bench.py backends: backend {name} needs a CUDA GPU; --device cpu runs backend torch")
    if args.steps < 2 or args.prompt_len < 1:
        raise SystemExit("bench.py backends: --steps must be at least 2 and --prompt-len at least 1")
    resolve(args, ("layers", "dense_layers"))
    model = build(args.config, args.layers, args.batch, args.prompt_len + args.steps, args.backends[0], args.device,
                  args.dtype, args.dense_layers)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.args.vocab_size, (args.batch, args.prompt_len), generator=g).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}: {args.layers} layers of {args.config}, {args.dtype}, batch {args.batch}, prompt "
          f"{args.prompt_len} tokens, {args.steps} steps; reference A = {args.backends[0]}", flush=True)
    rows, ref = [], None
    report = {"device": where, "config": args.config, "layers": args.layers, "dtype": args.dtype,
              "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
              "reference": args.backends[0], "definitions": DEFINITIONS, "backends": rows}
    for i, name in enumerate(args.backends):
        row = {"backend": name, "reference": i == 0}
        try:
            scope = contextlib.nullcontext()
            if name == "flaggems":          # FLAGGEMS_EXCLUDE set: aten ops routed too, for this backend only
                scope = ready_flaggems("bench.py backends: backend flaggems", scoped=True)
            with scope:
                use_backend(model, name, args.device)
                numbers, logits, tokens = run_backend(model, name, prompt, args.steps, ref)
            row.update(numbers)
            if i == 0:
                ref = (logits, tokens)
        except SetupError as e:
            row["error"] = str(e)
        except Exception as e:              # noqa: BLE001 - a backend that fails: its row says why, the others run
            row["error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
        if "error" in row:
            print(f"{name:9s} failed: {row['error']}", flush=True)
        else:
            cells = backend_cells(row)
            print(f"{name:9s} prefill {row['prefill_ms']:.1f} ms ({row['prefill_tok_s']:.0f} tok/s) | decode "
                  f"{row['decode_ms']:.3f} ms/step ({row['decode']}) | "
                  + (f"vs A: max_abs {cells[2]}, max_rel {cells[3]}, top-1 {cells[4]}, divergence {cells[5]}"
                     if "vs_reference" in row else "reference A" if i == 0 else "no reference"), flush=True)
        if args.report:                     # after each backend: a run stopped by a time limit keeps the rows done
            text = json.dumps(sanitize(report), indent=1, allow_nan=False) + "\n"
            write_atomically(args.report, lambda f: f.write(text))
    print("\n| backend | prefill ms (tok/s) | decode ms/step | max_abs vs A | max_rel vs A | top-1 vs A "
          "| first greedy divergence |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join([row["backend"]] + backend_cells(row)) + " |")
    print(f"decode: {'CUDA graph replays, eager for torch' if device.type == 'cuda' else 'eager, the mean of one run'}; "
          f"metrics as check.py's, each backend teacher-forced along A's tokens")
    failed = [row["backend"] for row in rows if "error" in row]
    if failed:
        raise SystemExit(f"bench.py backends: {', '.join(failed)} failed (see the table)")


def add_backends(commands) -> None:
    p = commands.add_parser("backends", help="torch vs triton vs flaggems on one model: speed and logit agreement")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "config_flash.json"))
    p.add_argument("--layers", type=int, help="layers kept from the config (default 4; 3 for R1 / V3)")
    p.add_argument("--dense-layers", type=int, help="R1 / V3: how many of the layers kept are dense (default 1)")
    p.add_argument("--backends", nargs="+", default=["torch", "triton", "flaggems"], choices=list(BACKENDS),
                   help="the first is the reference A; flaggems with FLAGGEMS_EXCLUDE set also routes aten ops")
    p.add_argument("--prompt-len", type=int, default=512, help="random prompt prefilled from position 0")
    p.add_argument("--steps", type=int, default=16, help="logits compared: the prefill's, then steps - 1 decode steps")
    p.add_argument("--batch", type=int, default=1, help="prompt rows, each compared on its own")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--report", help="write the numbers as JSON to this file")
    p.set_defaults(run=bench_backends)


# ----------------------------------------------------------------------------- convert

def v4_flash_config(layers: int) -> dict:
    """A Hugging Face config with V4-Flash shapes and `layers` layers: one hash-routed, then
    compression ratios 4 (compressor + indexer) and 128 alternating; no MTP layer."""
    return hf_config(
        vocab_size=129280, hidden_size=4096, num_hidden_layers=layers, num_attention_heads=64, head_dim=512,
        qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, sliding_window=128,
        compress_ratios=[4 if i % 2 == 0 else 128 for i in range(layers)], num_hash_layers=1,
        n_routed_experts=256, num_experts_per_tok=6, moe_intermediate_size=2048, index_n_heads=64,
        index_head_dim=128, index_topk=512, hc_mult=4, num_nextn_predict_layers=0)


def stored_tensors(spec) -> list:
    """The tensors one layout entry is stored as: (OutTensor, kind of bytes)."""
    if spec.kind == "fp8":
        rows, cols = spec.shape
        scale = fp8_scale_shape(rows, cols)
        return [(convert.OutTensor(spec.name, "F8_E4M3", spec.shape), "e4m3"),
                (convert.OutTensor(spec.name[:-len("weight")] + "scale", "F8_E8M0", scale), "scale")]
    if spec.kind == "fp4":
        rows, cols = spec.shape
        return [(convert.OutTensor(spec.name, "I8", (rows, cols // 2)), "bits"),
                (convert.OutTensor(spec.name[:-len("weight")] + "scale", "F8_E8M0", fp4_scale_shape(rows, cols)), "scale")]
    dtype = {"bf16": "BF16", "fp32": "F32", "int": "I32"}[spec.kind]
    return [(convert.OutTensor(spec.name, dtype, spec.shape), "normal" if spec.kind != "int" else "expert_ids")]


def random_values(t: "convert.OutTensor", kind: str, n_experts: int) -> torch.Tensor:
    """Random contents of a stored tensor, fast: valid codes, not quantised numbers."""
    if kind == "normal":
        return (0.02 * torch.randn(t.shape)).to(convert.DTYPES[t.dtype][0])
    if kind == "expert_ids":
        return torch.randint(0, n_experts, t.shape, dtype=torch.int32)
    if kind == "scale":                                     # 2**-10 .. 2**-4 as ue8m0 bytes
        return torch.randint(127 - 10, 127 - 4 + 1, (t.nbytes,), dtype=torch.uint8)
    data = torch.empty(-(-t.nbytes // 8), dtype=torch.int64).random_().view(torch.uint8)[:t.nbytes]
    if kind == "e4m3":                                      # no NaN codes (0x7f, 0xff)
        data[(data & 0x7F) == 0x7F] -= 1
    return data


def write_synthetic_release(path: str, config: dict, file_bytes: int) -> int:
    """Write the release in files of about file_bytes each; its total size in bytes."""
    os.makedirs(path, exist_ok=True)
    groups, current, size = [], [], 0
    for spec in release_specs(config):
        stored = stored_tensors(spec)
        current += stored
        size += sum(t.nbytes for t, _ in stored)
        if size >= file_bytes:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    weight_map, total = {}, 0
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offsets = convert.layout([t for t, _ in group])
        with open(os.path.join(path, fname), "wb") as f:
            f.write(header)
        writer = convert.ShardWriter([os.path.join(path, fname)])
        try:
            for t, kind in group:
                writer.write(0, random_values(t, kind, config["n_routed_experts"]), offsets[t.name])
                weight_map[t.name] = fname
                total += t.nbytes
        finally:
            writer.close()
    with open(os.path.join(path, convert.INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total


def timed_read(paths: list) -> float:
    """Seconds to read the files front to back, 16 MiB at a time."""
    buf = bytearray(16 * 2**20)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


def _tree_rss(root: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grown = {root}, True
    while grown:
        more = {pid for pid, ppid in parents.items() if ppid in tree} - tree
        tree |= more
        grown = bool(more)
    total = 0
    for pid in tree:
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    return total


def run_measured(argv: list, env: dict) -> dict:
    """Run a command; wall seconds, peak resident bytes of its whole process tree (sampled every
    0.1 s) and of its largest single process (from the kernel, via wait4)."""
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], argv, env)
    peak_tree = 0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        peak_tree = max(peak_tree, _tree_rss(pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"bench.py: {' '.join(argv)} failed with status {os.waitstatus_to_exitcode(status)}")
    return {"seconds": seconds, "peak_tree": peak_tree, "peak_process": usage.ru_maxrss * 1024}


def largest_tensor(release: str) -> tuple:
    """(name, bytes) of the largest tensor once dequantised: what one worker holds at most."""
    best = ("", 0)
    for fname in os.listdir(release):
        if fname.endswith(".safetensors"):
            for t in convert.read_header(os.path.join(release, fname)).values():
                numel = 1
                for d in convert.dequantised_shape(t):
                    numel *= d
                size = numel * 2 if t.dtype in convert.QUANTISED else t.nbytes
                best = max(best, (t.name, size), key=lambda x: x[1])
    return best


def bench_convert(args) -> None:
    config = v4_flash_config(args.layers)
    release = os.path.join(args.workdir, "release")
    shutil.rmtree(release, ignore_errors=True)
    start = time.perf_counter()
    in_bytes = write_synthetic_release(release, config, int(args.file_gb * GB))
    files = sorted(os.path.join(release, f) for f in os.listdir(release) if f.endswith(".safetensors"))
    print(f"release: {args.layers} layers, {len(files)} files, {in_bytes / GB:.2f} GB written in "
          f"{time.perf_counter() - start:.0f} s")
    name, size = largest_tensor(release)
    print(f"largest single tensor once dequantised: {name} {size / GB:.2f} GB")

    first, second = timed_read(files), timed_read(files)
    print(f"plain read of the release: {in_bytes / GB / first:.2f} GB/s (first pass, just written), "
          f"{in_bytes / GB / second:.2f} GB/s (second pass, page cache warm)")

    for n in args.model_parallel:
        out = os.path.join(args.workdir, f"mp{n}")
        shutil.rmtree(out, ignore_errors=True)
        argv = [sys.executable, os.path.join(ROOT, "convert.py"), "--hf-ckpt-path", release, "--save-path", out,
                "--model-parallel", str(n)]
        if args.num_workers:
            argv += ["--num-workers", str(args.num_workers)]
        timed_read(files)                                   # warm the page cache again before each run
        m = run_measured(argv, dict(os.environ))
        shards = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
        out_bytes = sum(os.path.getsize(p) for p in shards)
        print(f"convert --model-parallel {n}: {m['seconds']:.1f} s, {in_bytes / GB / m['seconds']:.3f} GB/s in, "
              f"{out_bytes / GB / m['seconds']:.3f} GB/s out ({out_bytes / GB:.2f} GB in {len(shards)} shards); "
              f"peak RSS {m['peak_tree'] / GB:.2f} GB all processes, {m['peak_process'] / GB:.2f} GB largest process; "
              f"largest shard {max(map(os.path.getsize, shards)) / GB:.2f} GB")
        shutil.rmtree(out)


def add_convert(commands) -> None:
    p = commands.add_parser("convert", help="convert.py on a synthetic V4-Flash-shaped release")
    p.add_argument("--layers", type=int, default=2, help="transformer layers in the synthetic release")
    p.add_argument("--workdir", required=True, help="scratch folder (needs room for the release and one output)")
    p.add_argument("--model-parallel", type=int, nargs="+", default=[8, 1], help="N values to convert for")
    p.add_argument("--num-workers", type=int, help="passed on to convert.py (default: its own)")
    p.add_argument("--file-gb", type=float, default=2.0, help="size of each release file")
    p.set_defaults(run=bench_convert)


# ----------------------------------------------------------------------------- weights: BF16 vs FP8 shards

class RankShare(Parallel):
    """Rank 0's place among world_size ranks, held alone: the layers are built with that rank's share
    of the weights and the collectives do nothing (all_gather repeats the rank's own part in every
    rank's place: the shape and the copy, not the numbers). Above o_groups ranks its output groups are
    those of the o-groups layout, for the memory table (its attention cannot run: heads are not
    gathered)."""
    def __init__(self, world_size: int, o_groups: int):
        super().__init__(world_size, 0)
        self.o_groups = o_groups

    @property
    def out_group_split(self) -> int:
        return min(self.world_size, self.o_groups)

    def all_reduce(self, x: torch.Tensor, group=None) -> torch.Tensor:
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(*[1] * (x.dim() - 1), self.world_size)


def lowp_layout(args, tp: Parallel) -> dict:
    """name -> 'fp8' or 'fp4': the weights a model of args (model.py or model_v3.py) on shards of
    convert.py --dtype fp8 holds quantised (built on the meta device), with args' expert format when
    it is one, else the release's."""
    experts = args.expert_weights if args.weights == "fp8" else ("fp4" if isinstance(args, ModelArgs) else "fp8")
    family = sys.modules[type(args).__module__]
    runtime = dict(weights="fp8", expert_weights=experts, backend="torch")     # the torch backend: any device runs it
    if isinstance(args, ModelArgs):
        runtime["expert_kernels"] = "triton"                                       # which the torch backend takes
    with torch.device("meta"):                  # shapes only
        twin = family.Transformer(dataclasses.replace(args, **runtime), tp)
    return {name: "fp4" if p.dtype == torch.int8 else "fp8" for name, p in twin.named_parameters()
            if p.dtype in LOWP_DTYPES}


def random_codes(fmt: str, rows: int, cols: int, g: torch.Generator, device) -> tuple:
    """Random valid low-precision codes for a [rows, cols] weight with entries about 1/sqrt(cols):
    FP8 e4m3 [rows, cols] with ue8m0 block scales, or MXFP4 packed [rows, cols/2] with ue8m0 scales."""
    log_cols = (cols.bit_length() - 1) // 2
    if fmt == "fp8":
        codes = (torch.randn(rows, cols, device=device, generator=g) * 16).to(torch.float8_e4m3fn)
        exp = torch.randint(-1, 2, fp8_scale_shape(rows, cols), device=device, generator=g) - 4 - log_cols
    else:
        codes = torch.randint(-128, 128, (rows, cols // 2), device=device, generator=g, dtype=torch.int8)
        exp = torch.randint(-1, 2, fp4_scale_shape(rows, cols), device=device, generator=g) - 2 - log_cols
    return codes, (exp + 127).to(torch.uint8).view(torch.float8_e8m0fnu)


def fill_random(model, layout: dict, seed: int = 0) -> None:
    """Random weights that do not depend on how the model holds them: each parameter drawn from a
    generator seeded by its name; a weight that layout names (lowp_layout) as random low-precision
    codes, which a model holding it in BF16 gets dequantised (the same numbers). The rest as
    random_weights draws them."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith(".scale"):
                continue
            g = torch.Generator(device=p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            if name in layout:
                rows, cols = p.shape[0], p.shape[1] * (2 if p.dtype == torch.int8 else 1)
                codes, scale = random_codes(layout[name], rows, cols, g, p.device)
                scale_name = name[:-len("weight")] + "scale"
                if scale_name in params:
                    p.copy_(codes)
                    params[scale_name].copy_(scale)
                else:
                    p.copy_(dequantised(codes, scale, p.dtype))
            elif p.dtype in (torch.int32, torch.int64):          # tid2eid: distinct experts per token
                e = model.args.n_routed_experts
                p.copy_(torch.rand(p.shape[0], e, device=p.device, generator=g).argsort(-1)[:, :p.shape[1]])
            elif name.endswith("norm.weight") or "_scale" in name:
                p.fill_(1.0)
            elif name == "embed.weight":
                p.normal_(0, 1, generator=g)
            elif p.dim() == 2 and "hc_" not in name:
                p.normal_(0, p.shape[1] ** -0.5, generator=g)
            else:
                p.normal_(0, 0.02, generator=g)


def build_filled(config: str, layers: int, weights: str, max_batch: int, max_seq: int, tp: Optional[Parallel] = None,
                 device: str = "cuda", backend: str = "triton", expert_kernels: str = "triton"):
    """model.py with `layers` layers of config (no MTP), holding its weights as shards of --dtype
    weights would (fp8: MXFP4 experts, on expert_kernels), random (fill_random), on device."""
    args = ModelArgs.from_file(config, n_layers=layers, n_mtp_layers=0, max_batch_size=max_batch, max_seq_len=max_seq,
                               backend=backend, weights=weights, expert_weights="fp4" if weights == "fp8" else "bf16",
                               expert_kernels=expert_kernels)
    args.compress_ratios = args.compress_ratios[:layers]
    tp = tp or Parallel()
    layout = lowp_layout(args, tp)
    with torch.device(device):
        model = Transformer(args, tp)
    fill_random(model, layout)
    return model


class LayerSteps:
    """Decode steps through the layers alone (no embedding, HC head or head), replayed from a CUDA
    graph: fixed random streams [b, 1, hc, D] in, positions [b] set per call. layers: those to run
    (default all of model's)."""
    def __init__(self, model, batch: int, layers=None):
        a, device = model.args, model.embed.weight.device
        self.pos = torch.zeros(batch, dtype=torch.long, device=device)
        ids = torch.randint(0, a.vocab_size, (batch, 1), device=device)
        h = torch.randn(batch, 1, a.hc_mult, a.dim, device=device).to(model.embed.weight.dtype)

        def run():
            step = DecodeStep.at(self.pos, a.window_size, model.ops)
            x = h
            for layer in model.layers if layers is None else layers:
                x = layer.decode(x, step, ids)
            return x.streams(model.ops)
        self.replay = Graphed(run)

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        self.pos.copy_(pos)
        self.replay()


def layers_bytes(model, batch: int, ctx: int) -> float:
    """decode_bytes without the head and the final norm: what the layers of a decode step read."""
    return decode_bytes(model, batch, ctx) - param_bytes(model.head) - param_bytes(model.norm)


def layer_floors_ms(model, contexts, batches, bandwidth: float) -> dict:
    """(ctx, batch) -> ms the layers' decode bytes (layers_bytes) take at bandwidth. Call it before
    the first forward: experts that Ops.pack_experts packs then drop their parameters."""
    return {(ctx, b): layers_bytes(model, b, ctx) / bandwidth * 1e3 for ctx in contexts for b in batches}


def layers_prefill_ms(model, tokens: int) -> float:
    """Median ms of `tokens` new tokens (one row, from position 0) through the layers alone, eager."""
    a, device = model.args, model.embed.weight.device
    ids = torch.randint(0, a.vocab_size, (1, tokens), device=device)
    h = torch.randn(1, tokens, a.hc_mult, a.dim, device=device).to(model.embed.weight.dtype)

    def run():
        x = h
        for layer in model.layers:
            x = layer(x, 0, ids)
        x.streams(model.ops)
    return median_ms(run, reps=3, warmup=1)


def bench_weights(args) -> None:
    """The same random V4-Flash layers from BF16 shards and from FP8 shards (MXFP4 experts; with
    --humming once more for each of its activations, the experts on humming-kernels: USE_HUMMING=1 for
    bf16, USE_HUMMING=fp8 for fp8), one after the other in this process:
    decode steps (whole, and the layers alone per layer, against the bandwidth floor of the bytes they
    read) and a prefill (whole, and per layer), then each model's logits on one prompt against BF16's."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py weights: needs a CUDA GPU")
    ceil = ceilings()
    print(f"device {torch.cuda.get_device_name()}, {args.layers} layers of {args.config}: copy "
          f"{ceil['bandwidth'] / 1e12:.2f} TB/s, bf16 matmul {ceil['matmul'] / 1e12:.0f} TFLOP/s", flush=True)
    max_seq = max(max(args.context) + 128, args.prefill)
    prompt = torch.randint(0, 129280, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    rows, logits, flops = [], {}, None
    variants = [("fp8", "fp8", "triton"), ("bf16", "bf16", "triton")]
    for activations in [] if args.humming is None else args.humming or ["bf16"]:
        kernels = KERNELS_TAKING[activations]
        variants.append((f"fp8 {kernels}", "fp8", kernels))
    for label, weights, experts in variants:
        model = build_filled(args.config, args.layers, weights, max(args.batch), max_seq, expert_kernels=experts)
        gb = param_bytes(model.layers) / GB         # these two before a forward (layer_floors_ms)
        floors = layer_floors_ms(model, args.context, args.batch, ceil["bandwidth"])
        with torch.no_grad():
            logits[label] = model(prompt, 0).float().cpu()
            fill_caches(model)
            decoder = GraphedDecoder(model)
            for ctx in args.context:
                for b in args.batch:
                    ids = torch.randint(0, model.args.vocab_size, (b, 1), device="cuda")
                    step = decode_step_ms(decoder, ids, ctx)
                    steps = LayerSteps(model, b)
                    layers = decode_step_ms(steps, ids, ctx)
                    floor = floors[ctx, b]
                    rows.append(dict(weights=label, ctx=ctx, batch=b, step_ms=step, layer_ms=layers / args.layers,
                                     floor=floor / layers))
                    print(f"{label}: ctx {ctx} batch {b}: decode step {step:.3f} ms, layers alone {layers:.3f} ms "
                          f"= {layers / args.layers:.3f} ms a layer ({floor / layers:.0%} of their floor "
                          f"{floor:.3f} ms)", flush=True)
                    if args.profile:
                        pos = torch.full((b,), ctx, device="cuda")
                        print_profile(f"{label} layers, decode batch {b} at {ctx}", lambda: steps(ids, pos), rows=25)
            ids = torch.randint(0, model.args.vocab_size, (1, args.prefill), device="cuda")
            whole = median_ms(lambda: model(ids, 0), reps=3, warmup=1)
            layers = layers_prefill_ms(model, args.prefill)
            if weights == "bf16":                   # the FLOPs of the layers, counted on the BF16 weights
                flops = prefill_flops(model, args.prefill, args.prefill // 2)
            rows.append(dict(weights=label, prefill_ms=whole, prefill_layer_ms=layers / args.layers))
            print(f"{label}: prefill {args.prefill} tokens {whole:.1f} ms, layers alone {layers:.1f} ms = "
                  f"{layers / args.layers:.2f} ms a layer; layers' weights {gb:.2f} GB", flush=True)
        model = decoder = steps = None
        torch.cuda.empty_cache()
    floor = flops / ceil["matmul"] * 1e3
    decode = {(r["weights"], r["ctx"], r["batch"]): r for r in rows if "step_ms" in r}
    prefill = {r["weights"]: r for r in rows if "prefill_ms" in r}
    lowp = [label for label, _, _ in variants if label != "bf16"]
    print("\n| decode (ctx, batch) | shards | bf16 step ms | step ms | bf16 ms/layer | ms/layer | layers speedup "
          "| of floor |\n|---|---|---|---|---|---|---|---|")
    for ctx in args.context:
        for b in args.batch:
            hi = decode["bf16", ctx, b]
            for label in lowp:
                lo = decode[label, ctx, b]
                print(f"| {ctx}, {b} | {label} | {hi['step_ms']:.3f} | {lo['step_ms']:.3f} | {hi['layer_ms']:.3f} | "
                      f"{lo['layer_ms']:.3f} | {hi['layer_ms'] / lo['layer_ms']:.2f}x | {lo['floor']:.0%} |")
    hi = prefill["bf16"]
    print(f"\n| prefill {args.prefill} tokens | shards | bf16 ms | ms | speedup | bf16 ms/layer | ms/layer | layers "
          f"speedup |\n|---|---|---|---|---|---|---|---|")
    for label in lowp:
        lo = prefill[label]
        print(f"| | {label} | {hi['prefill_ms']:.1f} | {lo['prefill_ms']:.1f} | "
              f"{hi['prefill_ms'] / lo['prefill_ms']:.2f}x | {hi['prefill_layer_ms']:.2f} | "
              f"{lo['prefill_layer_ms']:.2f} | {hi['prefill_layer_ms'] / lo['prefill_layer_ms']:.2f}x |")
    print(f"prefill matmul floor (bf16 rate, the layers' FLOPs): {floor:.1f} ms")
    for label in lowp:
        diff = (logits[label] - logits["bf16"]).abs().max()
        same = torch.equal(logits[label].argmax(-1), logits["bf16"].argmax(-1))
        print(f"logits of a 64-token prompt, {label} vs BF16 shards (the same numbers): max abs diff {diff:.3g}, "
              f"argmax {'equal' if same else 'DIFFERENT'}")


def add_weights(commands) -> None:
    p = commands.add_parser("weights", help="model.py with BF16 vs FP8 / MXFP4 weights, the same random V4-Flash "
                                            "layers, decode and prefill (CUDA)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "config_flash.json"))
    p.add_argument("--layers", type=int, default=4, help="layers kept from the config")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, nargs="+", default=[1024])
    p.add_argument("--prefill", type=int, default=4096, help="tokens of the prefill from position 0")
    p.add_argument("--profile", action="store_true", help="print the top kernels of each decode measurement")
    p.add_argument("--humming", nargs="*", choices=HUMMING_ACTIVATIONS,
                   help="also the FP8 shards with their MXFP4 experts on humming-kernels, with bf16 activations "
                        "(USE_HUMMING=1; the default) and / or fp8 ones (USE_HUMMING=fp8)")
    p.set_defaults(run=bench_weights)


# Real configurations for the memory table: name -> (ModelArgs, the expert formats of --dtype fp8).
def real_configs() -> dict:
    return {"V4-Flash": (ModelArgs.from_file(os.path.join(ROOT, "configs", "config_flash.json")), ("fp4", "fp8")),
            "V4-Pro": (ModelArgs.from_file(os.path.join(ROOT, "configs", "config_pro.json")), ("fp4", "fp8")),
            "R1": (model_v3.ModelArgs(), ("fp8",))}


def share_bytes(args, n: int, reference: Optional[dict] = None):
    """Bytes of rank 0's weights on n ranks (built on the meta device), or a reason it cannot run:
    the model's own rules, and for quantised weights that the rank cuts (their shape below
    reference's, the same model on one rank: name -> shape) a part that is not whole 128-blocks,
    which convert.py refuses. -> (bytes or None, reason, name -> shape)."""
    o_groups = getattr(args, "o_groups", n)
    if isinstance(args, ModelArgs):
        args = dataclasses.replace(args, ogroups_comm=n > o_groups)
    family = sys.modules[type(args).__module__]
    try:
        args.validate(n)
    except ValueError as e:
        return None, str(e), {}
    with torch.device("meta"):
        model = family.Transformer(args, RankShare(n, o_groups))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        if p.dtype == torch.float8_e4m3fn and reference is not None:
            for dim, (part, whole) in enumerate(zip(p.shape, reference[name])):
                if part < whole and part % FP8_BLOCK:
                    return None, f"{name}: {part} {'rows' if dim == 0 else 'columns'} a rank", shapes
    return sum(p.numel() * p.element_size() for p in model.parameters()), "", shapes


def bench_memory(args) -> None:
    """The weights one GPU holds for DeepSeek-V4-Flash, V4-Pro and R1 on N ranks, from BF16 shards and
    from FP8 ones (MXFP4 experts, or FP8 ones for V4), as the models allocate them (MTP layers included
    for V4: the shards carry them). CPU only."""
    table = {}
    for name, (model_args, expert_formats) in real_configs().items():
        modes = [("bf16", "bf16")] + [("fp8", e) for e in expert_formats]
        for weights, experts in modes:
            a = dataclasses.replace(model_args, weights=weights, expert_weights=experts)
            _, _, reference = share_bytes(a, 1)
            for n in args.ranks:
                table[name, weights, experts, n] = share_bytes(a, n, reference)[:2]
    columns = list(dict.fromkeys(k[:3] for k in table))
    print("weights per GPU (GB = 1e9 bytes) on N ranks (those where some model runs); '-' cannot run\n")
    print("| N | " + " | ".join(f"{m} {w}" + (f" ({e} experts)" if w == "fp8" and m != "R1" else "")
                               for m, w, e in columns) + " |")
    print("|---|" + "---|" * len(columns))
    reasons = {}
    for n in args.ranks:
        if all(table[(*column, n)][0] is None for column in columns):
            continue
        cells = []
        for column in columns:
            size, why = table[(*column, n)]
            cells.append("-" if size is None else f"{size / GB:.1f}")
            if size is None and column[1] == "fp8" and table[(column[0], "bf16", "bf16", n)][0] is not None:
                reasons[column[0], n] = why
        print(f"| {n} | " + " | ".join(cells) + " |")
    for (model_name, n), why in reasons.items():
        print(f"{model_name} fp8 on {n} ranks: a cut that splits an FP8 block between ranks ({why})")
    print("\nan H100 has 80 GB, an H200 141 GB; the KV caches, activations and CUDA graphs need room beside "
          "the weights")


def add_memory(commands) -> None:
    p = commands.add_parser("memory", help="weights per GPU of V4-Flash, V4-Pro and R1 at N ranks, BF16 vs FP8 "
                                           "shards (CPU)")
    p.add_argument("--ranks", type=int, nargs="+", default=list(range(1, 17)))
    p.set_defaults(run=bench_memory)


def bench_rank_share(args) -> None:
    """Every layer of the config at rank 0's share for --ranks N on this one GPU, random weights held
    as --weights shards would, collectives left out: decode ms/step of the layers (CUDA graph, mean
    over 128 positions from the context) against the bandwidth floor of what they read, and of the
    local head part."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py rank-share: needs a CUDA GPU")
    config = ModelArgs.from_file(args.config)
    if args.ranks > config.o_groups:
        raise SystemExit(f"bench.py rank-share: up to o_groups={config.o_groups} ranks (the o-groups layout gathers "
                         f"heads across ranks)")
    ceil = ceilings()
    experts = KERNELS_TAKING[args.humming]
    model = build_filled(args.config, config.n_layers, args.weights, max(args.batch), max(args.context) + 128,
                         RankShare(args.ranks, config.o_groups), expert_kernels=experts)
    allocated = torch.cuda.memory_allocated() / GB
    floors = layer_floors_ms(model, args.context, args.batch, ceil["bandwidth"])   # before a forward
    print(f"device {torch.cuda.get_device_name()}: {config.n_layers} layers of {args.config} at rank 0's share of "
          f"{args.ranks} ranks, {args.weights} weights (experts on {experts} kernels): {param_bytes(model) / GB:.1f} "
          f"GB of weights, {allocated:.1f} GB allocated; copy {ceil['bandwidth'] / 1e12:.2f} TB/s", flush=True)
    print("\n| ctx | batch | layers ms/step | of floor | local head ms | step ms, collectives excluded |\n"
          "|---|---|---|---|---|---|")
    with torch.no_grad():
        fill_caches(model)
        for ctx in args.context:
            for b in args.batch:
                ids = torch.randint(0, model.args.vocab_size, (b, 1), device="cuda")
                layers = decode_step_ms(LayerSteps(model, b), ids, ctx)
                floor = floors[ctx, b]
                head = local_head_ms(model, b)
                print(f"| {ctx} | {b} | {layers:.3f} | {floor / layers:.0%} | {head:.3f} | {layers + head:.3f} |",
                      flush=True)
    print(f"allocated after the steps {torch.cuda.memory_allocated() / GB:.1f} GB, at most "
          f"{torch.cuda.max_memory_allocated() / GB:.1f} GB")


def add_rank_share(commands) -> None:
    p = commands.add_parser("rank-share", help="every layer at rank 0's share of N ranks on one GPU, collectives "
                                               "excluded: decode ms/step (CUDA)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "config_flash.json"))
    p.add_argument("--ranks", type=int, default=4, help="N, at most o_groups")
    p.add_argument("--weights", choices=("bf16", "fp8"), default="fp8", help="as shards of convert.py --dtype")
    p.add_argument("--humming", nargs="?", const="bf16", choices=HUMMING_ACTIVATIONS,
                   help="MXFP4 experts on humming-kernels, activations bf16 (USE_HUMMING=1; the default) or fp8 "
                        "(USE_HUMMING=fp8)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--context", type=int, nargs="+", default=[1024])
    p.set_defaults(run=bench_rank_share)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_speed(commands)
    add_backends(commands)
    add_moe_tiles(commands)
    add_attn_tiles(commands)
    add_convert(commands)
    add_weights(commands)
    add_memory(commands)
    add_rank_share(commands)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    finally:
        # speed's process group goes here, after success or failure, once the command's CUDA graphs are
        # gone: destroyed while they live (as it was at the end of bench_speed), NCCL waited for them
        end_process_groups()


if __name__ == "__main__":
    main()
