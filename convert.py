"""Convert the official DeepSeek-V4 or DeepSeek-R1 / V3 release to model-parallel shards in one streaming pass.

    python convert.py --hf-ckpt-path SRC --save-path DST --n-experts 256 --model-parallel 8 [--dtype fp8]

SRC is a release as published, or a BF16 copy of it; its config.json says which (architecture()):
- DeepSeek-V4 (model_type deepseek_v4, or no config.json): FP8 e4m3 weights with one ue8m0 scale
  per 128x128 block, MXFP4 routed experts with one ue8m0 scale per 32 inputs, each scale stored as
  `<prefix>.scale` beside `<prefix>.weight`. Quantised weights become BF16 exactly (a small float
  times a power of two). The shards follow model.py's layout.
- DeepSeek-R1 / V3 (model_type deepseek_v3): Hugging Face names (`model.layers.N.self_attn...`),
  FP8 e4m3 weights with one float32 scale per 128x128 block in `<name>_scale_inv`. Each weight
  becomes the product of its values and scales in float32, rounded to BF16 (as DeepSeek's
  fp8_cast_bf16.py). The shards hold model_v3.py's names and layout. The multi-token-prediction
  module (layer num_hidden_layers) is dropped: the model does not use it.
DST receives model{rank}-mp{N}.safetensors for every rank, config.json and the tokenizer files.
Every tensor that is not quantised keeps its dtype.

--dtype fp8 keeps the quantised weights as the release stores them instead (about 0.27x the bytes
of BF16 shards for V4), each with its scale as `<prefix>.scale` (V4 and R1 alike): FP8 weights with
their 128x128 block scales, cut over the ranks with their scales (a rank's part must hold whole
blocks: a 128-block that would straddle two ranks is refused), and V4's MXFP4 experts packed with
their per-32 scales, or with --expert-dtype fp8 cast to FP8 with ue8m0 block scales (exact,
DeepSeek's cast). config.json then carries "weights": "fp8" and "expert_weights" ("fp4" or "fp8"),
from which the models build their layers (quant.shard_weights).

Nothing is held whole. Every output header is computed from the input headers alone; then a pool
of workers takes one input tensor at a time, dequantises it and writes each rank's piece at its
place in that rank's file. Shards are written under temporary names and renamed only once all of
them are complete and checked, so a failed or interrupted run leaves no file that looks finished.
With USE_OGROUPS_COMM=1 the output projections follow the o-groups layout of model.py.
"""
import argparse
import ctypes
import json
import multiprocessing
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from tqdm import tqdm

from model import EXPERT, OUTPUT_PROJ, SPLIT_COLS, SPLIT_ROWS, VOCAB, ModelArgs
from model_v3 import ModelArgs as V3Args, expert_index, expert_rank, release_name, split_dim
from quant import (FP4_BLOCK, FP8_BLOCK, SHARD_WEIGHTS, dequant_fp4, dequant_fp8, fp4_scale_shape, fp4_to_fp8,
                   fp8_scale_shape)

INDEX_FILE = "model.safetensors.index.json"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# safetensors dtype codes this converter reads, with their torch dtype and item size.
DTYPES = {
    "BF16": (torch.bfloat16, 2), "F32": (torch.float32, 4),
    "I32": (torch.int32, 4), "I64": (torch.int64, 8),
    "F8_E4M3": (torch.float8_e4m3fn, 1), "I8": (torch.int8, 1), "F8_E8M0": (torch.float8_e8m0fnu, 1),
}
KEPT = ("BF16", "F32", "I32", "I64")        # copied as they are
QUANTISED = {"F8_E4M3": "FP8", "I8": "FP4"}  # need a scale; become BF16, or stay as they are with --dtype fp8

# config.json's model_type -> its architectures entry, for the two models this project runs.
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM"}



class ConvertError(Exception):
    """Bad input or a failed write; the message names the file and tensor."""


# ----------------------------------------------------------------------------- safetensors files

@dataclass(frozen=True)
class Stored:
    """One tensor inside an input file; offset is from the start of the file."""
    path: str
    name: str
    dtype: str
    shape: Tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: str) -> Dict[str, Stored]:
    """Parse and check a safetensors header: every tensor must lie inside the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            length = int.from_bytes(head, "little")
            if length > size - 8:
                raise ConvertError(f"{path}: header length {length} exceeds the file size {size} "
                                   f"(truncated or corrupt)")
            raw = f.read(length)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: header is not a JSON object")
    start = 8 + length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (TypeError, KeyError, ValueError):
            raise ConvertError(f"{path}: tensor {name}: malformed header entry {entry!r}") from None
        if dtype not in DTYPES:
            raise ConvertError(f"{path}: tensor {name}: unsupported dtype {dtype}")
        if not 0 <= begin <= end or end - begin != numel * DTYPES[dtype][1]:
            raise ConvertError(f"{path}: tensor {name}: data_offsets {[begin, end]} do not fit "
                               f"dtype {dtype} and shape {list(shape)}")
        if start + end > size:
            raise ConvertError(f"{path}: tensor {name}: data ends at byte {start + end} but the file has "
                               f"{size} bytes (truncated)")
        tensors[name] = Stored(path, name, dtype, shape, start + begin, end - begin)
    return tensors


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype][1]
        for d in self.shape:
            n *= d
        return n


def layout(tensors: List[OutTensor]) -> Tuple[bytes, Dict[str, int]]:
    """Header bytes of an output file and each tensor's offset from the start of the file.

    Wider dtypes come first so that every tensor starts at a multiple of its item size, and the
    header is padded with spaces to a multiple of 8 bytes, as safetensors itself does.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPES[t.dtype][1], t.name))
    header, begins, pos = {"__metadata__": {"format": "pt"}}, {}, 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        begins[t.name] = pos
        pos += t.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {name: start + b for name, b in begins.items()}


# ----------------------------------------------------------------------------- architectures

def architecture(config: dict) -> str:
    """'deepseek_v3' or 'deepseek_v4' for the contents of a config.json: its model_type, else its
    architectures, else deepseek_v4 (our configs/*.json, or no config.json at all). Raises ValueError
    for another model, or a model_type and architectures that disagree."""
    by_type = config.get("model_type")
    listed = config.get("architectures") or []
    by_class = {t for t, cls in ARCHITECTURES.items() if cls in listed}
    if by_type is not None and by_type not in ARCHITECTURES:
        raise ValueError(f"model_type {by_type!r} is not one of {', '.join(ARCHITECTURES)}")
    if not by_class and listed and by_type is None:
        raise ValueError(f"architectures {listed} names none of {', '.join(ARCHITECTURES.values())}")
    if len(by_class) > 1 or (by_type is not None and by_class and by_class != {by_type}):
        raise ValueError(f"model_type {by_type!r} and architectures {listed} name different models")
    return by_type or (by_class.pop() if by_class else "deepseek_v4")


# Each release class below is what the planner knows of one architecture, for n ranks: which tensors
# are block scales and of which weight, the quantised dtypes it holds, the names written, and
# targets(name): None to drop the tensor, else (dim, parts, [(rank, part)]): the tensor is cut into
# `parts` equal chunks along dim and each listed rank takes chunk `part`; dim None means whole copies.
Targets = Optional[Tuple[Optional[int], int, List[Tuple[int, int]]]]


@dataclass(frozen=True)
class V4Release:
    """DeepSeek-V4: a ue8m0 `<prefix>.scale` beside `<prefix>.weight`, FP8 and FP4 weights, model.py's layout."""
    n: int
    n_experts: int
    o_groups: int
    ogroups_comm: bool
    scale_dtype = "F8_E8M0"
    quantised = ("F8_E4M3", "I8")
    expert_formats = ("fp4", "fp8")         # with --dtype fp8: the MXFP4 experts kept, or cast to FP8

    def is_scale(self, name: str, dtype: str) -> bool:
        return dtype == self.scale_dtype

    def weight_of(self, scale: str) -> Optional[str]:
        return scale[:-len("scale")] + "weight" if scale.endswith(".scale") else None

    def scale_of(self, weight: str) -> Optional[str]:
        return weight[:-len("weight")] + "scale" if weight.endswith(".weight") else None

    def our_name(self, name: str) -> Optional[str]:
        return name[len("model."):] if name.startswith("model.") else name

    def targets(self, name: str) -> Targets:
        everyone = range(self.n)
        if name.startswith("mtp.") and ("emb" in name or name.endswith("head.weight")):
            return None                                     # MTP copies of the shared embedding / head
        expert = EXPERT.search(name)
        if expert:
            e = int(expert.group(1))
            if e >= self.n_experts:
                raise ConvertError(f"tensor {name}: expert {e} is out of range for {self.n_experts} experts")
            return None, 1, [(e // (self.n_experts // self.n), 0)]
        for suffix, dim in OUTPUT_PROJ.items():
            if name.endswith("." + suffix):
                if self.ogroups_comm:
                    per_group = self.n // self.o_groups
                    return dim, self.o_groups, [(r, r // per_group) for r in everyone]
                return dim, self.n, [(r, r) for r in everyone]
        if name in VOCAB or any(name.endswith("." + s) for s in SPLIT_ROWS):
            return 0, self.n, [(r, r) for r in everyone]
        if any(name.endswith("." + s) for s in SPLIT_COLS):
            return 1, self.n, [(r, r) for r in everyone]
        return None, 1, [(r, 0) for r in everyone]


@dataclass(frozen=True)
class V3Release:
    """DeepSeek-R1 / V3: Hugging Face names, a float32 `<name>_scale_inv` beside each FP8 weight,
    model_v3.py's names and layout; the MTP module (layers n_layers and up) is dropped."""
    n: int
    n_experts: int
    n_layers: int
    scale_dtype = "F32"
    quantised = ("F8_E4M3",)
    expert_formats = ("fp8",)

    def is_scale(self, name: str, dtype: str) -> bool:
        return name.endswith("_scale_inv")

    def weight_of(self, scale: str) -> Optional[str]:
        return scale[:-len("_scale_inv")]

    def scale_of(self, weight: str) -> Optional[str]:
        return weight + "_scale_inv"

    def our_name(self, name: str) -> Optional[str]:
        try:
            return release_name(name, self.n_layers)
        except ValueError as e:
            raise ConvertError(str(e)) from None

    def targets(self, name: str) -> Targets:
        expert = expert_index(name)
        if expert is not None:
            if expert >= self.n_experts:
                raise ConvertError(f"tensor {name}: expert {expert} is out of range for {self.n_experts} experts")
            return None, 1, [(expert_rank(name, self.n_experts, self.n), 0)]
        dim = split_dim(name)
        if dim is None:
            return None, 1, [(r, 0) for r in range(self.n)]
        return dim, self.n, [(r, r) for r in range(self.n)]


Release = Union[V4Release, V3Release]


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class Piece:
    rank: int
    start: int        # along the job's dim, in values (both 0 when the job has no dim: the whole tensor)
    length: int
    offset: int       # in the rank's output file
    scale_offset: int = 0     # of the piece's scale, when the weight is written quantised


@dataclass(frozen=True)
class Job:
    """One input tensor (with its scale when quantised) and the pieces it becomes. fmt: how a quantised
    weight is written, 'bf16' (dequantised), 'fp8' (FP8 kept, or FP4 cast to FP8) or 'fp4' (kept)."""
    name: str
    weight: Stored
    scale: Optional[Stored]
    dim: Optional[int]
    pieces: Tuple[Piece, ...]
    fmt: Optional[str] = None

    @property
    def scale_name(self) -> str:
        return self.name[:-len("weight")] + "scale"

    @property
    def out_bytes(self) -> int:
        return sum(t.nbytes for p in self.pieces for t in out_tensors(self, p))


def dequantised_shape(w: Stored) -> Tuple[int, ...]:
    """Shape of a weight once dequantised: FP4 packs two values a byte."""
    return (w.shape[0], 2 * w.shape[1]) if QUANTISED.get(w.dtype) == "FP4" else w.shape


def expected_scale_shape(w: Stored) -> Tuple[int, ...]:
    """The scale shape quant.dequant_fp8 / dequant_fp4 accept for weight w."""
    rows, cols = dequantised_shape(w)
    if QUANTISED[w.dtype] == "FP8":
        return fp8_scale_shape(rows, cols)
    return fp4_scale_shape(rows, cols)


def out_tensors(job: Job, piece: Piece) -> List[OutTensor]:
    """What one piece of a job writes: the weight, and its scale when it stays quantised."""
    shape = list(dequantised_shape(job.weight))
    if job.dim is not None:
        shape[job.dim] = piece.length
    rows, cols = shape[0], shape[-1]
    if job.scale is None:
        return [OutTensor(job.name, job.weight.dtype, tuple(shape))]
    if job.fmt == "bf16":
        return [OutTensor(job.name, "BF16", tuple(shape))]
    if job.fmt == "fp4":
        return [OutTensor(job.name, "I8", (rows, cols // 2)),
                OutTensor(job.scale_name, "F8_E8M0", fp4_scale_shape(rows, cols))]
    scale_dtype = job.scale.dtype if QUANTISED[job.weight.dtype] == "FP8" else "F8_E8M0"
    return [OutTensor(job.name, "F8_E4M3", (rows, cols)),
            OutTensor(job.scale_name, scale_dtype, fp8_scale_shape(rows, cols))]


# A quantised weight written as it is may be cut only between its scales' blocks: (rows, columns) of one.
BLOCKS = {"fp8": (FP8_BLOCK, FP8_BLOCK), "fp4": (1, FP4_BLOCK)}


def quantised_format(w: Stored, formats: Tuple[str, str]) -> str:
    """How a quantised weight is written for formats (dense, experts) (quant.shard_weights): 'bf16'
    when dense is, else FP8 weights stay FP8 and FP4 ones (V4's experts) become the experts' format."""
    dense, experts = formats
    if dense == "bf16" or QUANTISED[w.dtype] == "FP8":
        return dense
    return experts


def cut(job: Job, value: torch.Tensor, scale: Optional[torch.Tensor], piece: Piece):
    """A piece's part of the weight as written (value: dequantised, or FP8 [rows, cols], or MXFP4
    packed [rows, cols / 2]) and of its scale (None when dequantised)."""
    if job.dim is None:
        return value, scale
    start, length = piece.start, piece.length
    if scale is None:
        return value.narrow(job.dim, start, length), None
    if job.fmt == "fp4":
        per = 1 if job.dim == 0 else FP4_BLOCK
        packed = (start, length) if job.dim == 0 else (start // 2, length // 2)
        return value.narrow(job.dim, *packed), scale.narrow(job.dim, start // per, length // per)
    return value.narrow(job.dim, start, length), scale.narrow(job.dim, start // FP8_BLOCK, -(-length // FP8_BLOCK))


def plan(src: str, weight_map: Dict[str, str], headers: Dict[str, Dict[str, Stored]],
         release: Release, formats: Tuple[str, str] = ("bf16", "bf16")) -> Tuple[List[Tuple[bytes, int]], List[Job]]:
    """Check every tensor and place it: (header, size) of each rank's file, and the jobs in file order.

    headers maps each file named in the index to its parsed header; formats (dense, experts) says how
    the quantised weights are written (quant.shard_weights' values)."""
    def stored(name):
        tensors = headers[weight_map[name]]
        if name not in tensors:
            raise ConvertError(f"{os.path.join(src, weight_map[name])}: tensor {name} is listed in "
                               f"{INDEX_FILE} but absent from the file")
        return tensors[name]

    jobs, seen = [], set()
    for name in sorted(weight_map):
        w = stored(name)
        if release.is_scale(name, w.dtype):
            if release.weight_of(name) not in weight_map:
                raise ConvertError(f"{w.path}: tensor {name}: a {w.dtype} scale without a weight")
            continue
        try:
            out_name = release.our_name(name)
            where = None if out_name is None else release.targets(out_name)
        except ConvertError as e:
            raise ConvertError(f"{w.path}: {e}") from None
        if where is None:
            continue
        scale, scale_name = None, release.scale_of(name)
        if w.dtype in release.quantised:
            if scale_name not in weight_map:
                raise ConvertError(f"{w.path}: tensor {name}: {w.dtype} weight without its scale "
                                   f"tensor {scale_name or '(no .weight suffix)'}")
            scale = stored(scale_name)
            if len(w.shape) != 2 or scale.dtype != release.scale_dtype or scale.shape != expected_scale_shape(w):
                raise ConvertError(f"{scale.path}: tensor {scale_name}: {scale.dtype} scale of shape "
                                   f"{list(scale.shape)} does not fit the {QUANTISED[w.dtype]} weight of shape "
                                   f"{list(w.shape)} (expected {release.scale_dtype} "
                                   f"{list(expected_scale_shape(w))})")
        elif w.dtype not in KEPT:
            kinds = " / ".join(QUANTISED[d] for d in release.quantised)
            raise ConvertError(f"{w.path}: tensor {name}: dtype {w.dtype} is not converted "
                               f"(expected one of {', '.join(KEPT)}, or {kinds} with a scale)")
        elif scale_name in weight_map:
            raise ConvertError(f"{w.path}: tensor {name}: a {w.dtype} weight with a scale tensor {scale_name} "
                               f"(only {' / '.join(release.quantised)} weights are scaled)")
        if out_name in seen:
            raise ConvertError(f"{w.path}: tensor {name}: {out_name} appears twice in the checkpoint")
        seen.add(out_name)
        dim, parts, ranks = where
        shape = dequantised_shape(w)
        fmt = quantised_format(w, formats) if scale is not None else None
        if dim is None:
            pieces = tuple(Piece(rank, 0, 0, 0) for rank, _ in ranks)
        elif dim < len(shape) and shape[dim] % parts == 0:
            chunk = shape[dim] // parts
            block = BLOCKS[fmt][dim] if fmt in BLOCKS and parts > 1 else 1
            if chunk % block:
                unit = "128x128 scale block" if fmt == "fp8" else f"{FP4_BLOCK}-input scale group"
                raise ConvertError(f"{w.path}: tensor {name}: cut into {parts} parts of {chunk} "
                                   f"{'rows' if dim == 0 else 'columns'}, a {unit} of its {fmt.upper()} weight would "
                                   f"straddle two ranks; convert with --dtype bf16, or for another --model-parallel")
            pieces = tuple(Piece(rank, part * chunk, chunk, 0) for rank, part in ranks)
        else:
            raise ConvertError(f"{w.path}: tensor {name}: shape {list(shape)} cannot be split into "
                               f"{parts} equal parts along dim {dim}")
        jobs.append(Job(out_name, w, scale, dim, pieces, fmt))
    if formats[0] != "bf16" and not any(job.scale is not None for job in jobs):
        raise ConvertError(f"{src}: --dtype {formats[0]} keeps the release's quantised weights, and this checkpoint "
                           f"holds none (a BF16 copy?): convert it with --dtype bf16")

    per_rank = [[] for _ in range(release.n)]
    for job in jobs:
        for piece in job.pieces:
            per_rank[piece.rank] += out_tensors(job, piece)
    files = [layout(tensors) for tensors in per_rank]

    def placed_piece(job: Job, p: Piece) -> Piece:
        offsets = files[p.rank][1]
        return Piece(p.rank, p.start, p.length, offsets[job.name], offsets[job.scale_name] if job.fmt in BLOCKS else 0)
    placed = [replace(j, pieces=tuple(placed_piece(j, p) for p in j.pieces)) for j in jobs]
    placed.sort(key=lambda j: (j.weight.path, j.weight.offset))
    sizes = [(header, len(header) + sum(t.nbytes for t in tensors))
             for (header, _), tensors in zip(files, per_rank)]
    return sizes, placed


# ----------------------------------------------------------------------------- workers

def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview((ctypes.c_char * t.nbytes).from_address(t.data_ptr())).cast("B")


class ShardWriter:
    """The open files of one process: inputs read and outputs written at given positions."""

    def __init__(self, outputs: List[str]):
        self.outputs = outputs
        self.fds: Dict[str, int] = {}

    def _fd(self, path: str, flags: int) -> int:
        if path not in self.fds:
            self.fds[path] = os.open(path, flags)
        return self.fds[path]

    def read(self, t: Stored) -> torch.Tensor:
        buf = torch.empty(t.nbytes, dtype=torch.uint8)
        if t.nbytes:
            view, fd, done = tensor_bytes(buf), self._fd(t.path, os.O_RDONLY), 0
            while done < t.nbytes:
                n = os.preadv(fd, [view[done:]], t.offset + done)
                if n == 0:
                    raise ConvertError("the file ended early (was it changed during the conversion?)")
                done += n
        return buf.view(DTYPES[t.dtype][0]).reshape(t.shape)

    def write(self, rank: int, t: torch.Tensor, offset: int) -> None:
        t = t.contiguous()
        if t.nbytes:
            view, fd, done = tensor_bytes(t), self._fd(self.outputs[rank], os.O_WRONLY), 0
            while done < t.nbytes:
                done += os.pwrite(fd, view[done:], offset + done)

    def run(self, job: Job) -> int:
        """Read, dequantise (or cast, or keep) and write one tensor; the number of bytes written."""
        try:
            value, scale = self.read(job.weight), None
            if job.fmt == "bf16":
                dequant = dequant_fp8 if QUANTISED[job.weight.dtype] == "FP8" else dequant_fp4
                value = dequant(value, self.read(job.scale), torch.bfloat16)
            elif job.fmt is not None:
                scale = self.read(job.scale)
                if job.fmt == "fp8" and QUANTISED[job.weight.dtype] == "FP4":
                    value, scale = fp4_to_fp8(value, scale)
            for p in job.pieces:
                part, part_scale = cut(job, value, scale, p)
                self.write(p.rank, part, p.offset)
                if part_scale is not None:
                    self.write(p.rank, part_scale, p.scale_offset)
        except (ConvertError, ValueError, OSError, RuntimeError, MemoryError) as e:
            raise ConvertError(f"{job.weight.path}: tensor {job.weight.name}: {e}") from None
        return job.out_bytes

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


_writer: Optional[ShardWriter] = None   # one per pool worker


def _start_worker(outputs: List[str], threads: int) -> None:
    global _writer
    torch.set_num_threads(threads)
    _writer = ShardWriter(outputs)


def _run_job(job: Job) -> int:
    return _writer.run(job)


# ----------------------------------------------------------------------------- driver

FLAG_ON, FLAG_OFF = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def env_flag(name: str, error=ConvertError) -> bool:
    """A USE_* switch of the environment, read alike by every entry point: on for 1, true, yes, on; off
    unset or for 0, false, no, off; any other value (a typo, or 2) raises error."""
    value = os.environ.get(name, "0").strip().lower()
    if value not in FLAG_ON + FLAG_OFF:
        raise error(f"{name} must be 1 or 0 (or true / false, yes / no, on / off), got {os.environ[name]!r}")
    return value in FLAG_ON


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConvertError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConvertError(f"{path}: cannot read {what} ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: {what} is not a JSON object")
    return data


def _expert_count(config: dict, n: int, n_experts: Optional[int]) -> int:
    """The routed experts: config.json's n_routed_experts, which --n-experts must match, else --n-experts."""
    if n < 1:
        raise ConvertError(f"--model-parallel must be at least 1, got {n}")
    if "n_routed_experts" in config:
        if n_experts is not None and n_experts != config["n_routed_experts"]:
            raise ConvertError(f"--n-experts {n_experts} differs from n_routed_experts="
                               f"{config['n_routed_experts']} in config.json")
        n_experts = config["n_routed_experts"]
    if n_experts is None:
        raise ConvertError("--n-experts is needed: the checkpoint has no config.json giving n_routed_experts")
    if not config and n_experts % n:   # experts go whole to ranks by index (with config.json, the model's rules say so)
        raise ConvertError(f"n_routed_experts={n_experts} is not divisible by --model-parallel {n}")
    return n_experts


def _check_runs(model_args, config: dict, n: int, **overrides) -> None:
    """Refuse a release the model (model_args: model.ModelArgs or model_v3.ModelArgs) cannot run on
    n ranks, with the model's own rules; a release without config.json is checked by the loader."""
    if not config:
        return
    try:
        model_args.from_config(config, "config.json", **overrides).validate(n)
    except (ValueError, TypeError) as e:
        raise ConvertError(f"config.json with --model-parallel {n}: {e}") from None


def check_parallel(config: dict, n: int, n_experts: Optional[int], o_groups: Optional[int],
                   ogroups_comm: bool, formats: Tuple[str, str] = ("bf16", "bf16")) -> V4Release:
    """DeepSeek-V4: settle the expert count and o_groups, and refuse layouts the model cannot run
    (with formats (dense, experts) as the shards will hold the quantised weights)."""
    n_experts = _expert_count(config, n, n_experts)
    if o_groups is not None and (o_groups < 1 or o_groups != config.get("o_groups", o_groups)):
        raise ConvertError(f"--o-groups {o_groups} " + ("must be at least 1" if o_groups < 1 else
                           f"differs from o_groups={config['o_groups']} of config.json, which the model reads"))
    g = o_groups if o_groups is not None else config.get("o_groups", 8)
    _check_runs(ModelArgs, config, n, n_routed_experts=n_experts, o_groups=g, ogroups_comm=ogroups_comm,
                weights=formats[0], expert_weights=formats[1])
    return V4Release(n, n_experts, g, ogroups_comm)


def check_parallel_v3(config: dict, n: int, n_experts: Optional[int], o_groups: Optional[int],
                      ogroups_comm: bool, formats: Tuple[str, str] = ("bf16", "bf16")) -> V3Release:
    """DeepSeek-R1 / V3: settle the expert count and the layer count, and refuse layouts model_v3.py cannot run."""
    if o_groups is not None or ogroups_comm:
        raise ConvertError(f"{'--o-groups' if o_groups is not None else 'USE_OGROUPS_COMM=1'} is a DeepSeek-V4 "
                           f"setting; this release is DeepSeek-R1 / V3 (model_type deepseek_v3), which has none")
    n_experts = _expert_count(config, n, n_experts)
    _check_runs(V3Args, config, n, n_routed_experts=n_experts, weights=formats[0], expert_weights=formats[1])
    n_layers = config.get("num_hidden_layers")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ConvertError(f"config.json: num_hidden_layers must be a positive integer, got {n_layers!r} "
                           f"(it tells the model's layers from the MTP module)")
    return V3Release(n, n_experts, n_layers)


def shard_formats(release_class, dtype: str, expert_dtype: Optional[str]) -> Tuple[str, str]:
    """(dense, experts), as quant.shard_weights reads them back, for --dtype and --expert-dtype on a
    release of release_class: BF16 shards, or the quantised weights kept with the experts as the
    release has them (its first expert format) or as --expert-dtype asks."""
    if dtype not in SHARD_WEIGHTS:
        raise ConvertError(f"--dtype must be one of {', '.join(SHARD_WEIGHTS)}, got {dtype!r}")
    if dtype == "bf16":
        if expert_dtype is not None:
            raise ConvertError(f"--expert-dtype {expert_dtype} applies to --dtype fp8 only (BF16 shards dequantise "
                               f"the experts too)")
        return "bf16", "bf16"
    experts = expert_dtype or release_class.expert_formats[0]
    if experts not in release_class.expert_formats:
        kind = "DeepSeek-R1 / V3" if release_class is V3Release else "DeepSeek-V4"
        raise ConvertError(f"--expert-dtype {experts}: a {kind} release's experts can be written as "
                           f"{' or '.join(release_class.expert_formats)} only")
    return dtype, experts


def check_release(config: dict, n: int, n_experts: Optional[int], o_groups: Optional[int], ogroups_comm: bool,
                  dtype: str = "bf16", expert_dtype: Optional[str] = None) -> Tuple[Release, Tuple[str, str]]:
    """What the planner needs for the release that config.json (possibly {}) describes: the release and
    the shards' formats (dense, experts) for --dtype and --expert-dtype."""
    try:
        kind = architecture(config)
    except ValueError as e:
        raise ConvertError(f"config.json: {e}") from None
    check = check_parallel_v3 if kind == "deepseek_v3" else check_parallel
    formats = shard_formats(V3Release if kind == "deepseek_v3" else V4Release, dtype, expert_dtype)
    if formats[0] != "bf16" and not config:
        raise ConvertError(f"--dtype {dtype} writes the weight format into config.json, and the checkpoint has none: "
                           f"put the release's config.json beside it")
    return check(config, n, n_experts, o_groups, ogroups_comm, formats), formats


def convert(hf_ckpt_path: str, save_path: str, model_parallel: int, n_experts: Optional[int] = None,
            o_groups: Optional[int] = None, num_workers: Optional[int] = None,
            ogroups_comm: Optional[bool] = None, dtype: str = "bf16", expert_dtype: Optional[str] = None,
            log: Callable[[str], None] = lambda line: None) -> List[str]:
    """Write the shards and side files; the shard paths. ogroups_comm None reads USE_OGROUPS_COMM;
    dtype 'bf16' dequantises the release, 'fp8' keeps its quantised weights (experts as expert_dtype
    says: None as released, or 'fp8'). log gets a line once everything is checked and before the
    writing starts, and one at the end."""
    if not os.path.isdir(hf_ckpt_path):
        raise ConvertError(f"{hf_ckpt_path}: checkpoint folder not found")
    if os.path.exists(save_path) and not os.path.isdir(save_path):
        raise ConvertError(f"--save-path {save_path} is a file: give a folder (new, or of an earlier conversion)")
    if os.path.isdir(save_path) and os.path.samefile(hf_ckpt_path, save_path):
        raise ConvertError(f"--save-path {save_path} is the release folder {hf_ckpt_path}: the shards and "
                           f"config.json need a folder of their own")
    config_path = os.path.join(hf_ckpt_path, "config.json")
    config = _read_json(config_path, "config") if os.path.exists(config_path) else {}
    if ogroups_comm is None:
        ogroups_comm = env_flag("USE_OGROUPS_COMM")
    release, formats = check_release(config, model_parallel, n_experts, o_groups, ogroups_comm, dtype, expert_dtype)

    index_path = os.path.join(hf_ckpt_path, INDEX_FILE)
    weight_map = _read_json(index_path, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConvertError(f"{index_path}: no weight_map")
    headers = {}
    for fname in sorted(set(weight_map.values())):
        path = os.path.join(hf_ckpt_path, fname)
        if not os.path.isfile(path):
            raise ConvertError(f"{path}: file named in {INDEX_FILE} not found")
        headers[fname] = read_header(path)
    files, jobs = plan(hf_ckpt_path, weight_map, headers, release, formats)

    os.makedirs(save_path, exist_ok=True)
    need, free = sum(size for _, size in files), shutil.disk_usage(save_path).free
    if need > free:
        raise ConvertError(f"{save_path}: the shards need {need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB free")
    n = release.n
    finals = [os.path.join(save_path, f"model{r}-mp{n}.safetensors") for r in range(n)]
    temps = [os.path.join(save_path, f".model{r}-mp{n}.safetensors.partial") for r in range(n)]
    workers = max(1, min(num_workers or min(n, os.cpu_count() or 1), len(jobs)))
    log(f"{len(jobs)} tensors of {len(headers)} files in {hf_ckpt_path} -> {n} shards in {save_path} "
        f"({need / 2**30:.2f} GiB), {workers} worker(s)")
    start = time.perf_counter()
    try:
        for temp, (header, size) in zip(temps, files):
            with open(temp, "wb") as f:
                f.write(header)
                f.truncate(size)
        _write_all(jobs, temps, workers, sum(job.out_bytes for job in jobs))
        for temp, (header, size) in zip(temps, files):
            _check_written(temp, header, size)
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    finally:
        for temp in temps:
            if os.path.exists(temp):
                os.remove(temp)
    copied = []
    for fname in SIDE_FILES:
        src = os.path.join(hf_ckpt_path, fname)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(save_path, fname))
            copied.append(fname)
    if formats[0] != "bf16":
        with open(os.path.join(save_path, "config.json"), "w") as f:
            json.dump({**config, "weights": formats[0], "expert_weights": formats[1]}, f, indent=2)
    shards = " .. ".join(dict.fromkeys(os.path.basename(path) for path in (finals[0], finals[-1])))
    log(f"wrote {shards} and {', '.join(copied) or 'no side files'} to {save_path} "
        f"in {time.perf_counter() - start:.1f} s")
    return finals


def _write_all(jobs: List[Job], temps: List[str], workers: int, total: int) -> None:
    """Run every job, in this process or in a pool; progress in bytes written."""
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert",
              file=sys.stderr, disable=None) as bar:
        if workers == 1:
            writer = ShardWriter(temps)
            try:
                for job in jobs:
                    bar.update(writer.run(job))
            finally:
                writer.close()
            return
        threads = max(1, (os.cpu_count() or 1) // workers)
        context = multiprocessing.get_context("spawn")   # no fork of a process that already runs torch threads
        # The workers are born ignoring Ctrl-C (Python keeps an ignored SIGINT ignored), even while they
        # import torch: the parent handles it and cleans up.
        parents = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            pool = context.Pool(workers, initializer=_start_worker, initargs=(temps, threads))
        finally:
            signal.signal(signal.SIGINT, parents)
        with pool:
            for written in pool.imap_unordered(_run_job, jobs):
                bar.update(written)


def _check_written(path: str, header: bytes, size: int) -> None:
    """A finished temporary shard: the planned size and header, flushed to disk."""
    with open(path, "rb+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() != size:
            raise ConvertError(f"{path}: {f.tell()} bytes written, expected {size}")
        f.seek(0)
        if f.read(len(header)) != header:
            raise ConvertError(f"{path}: header was overwritten")
        os.fsync(f.fileno())


class Stopped(Exception):
    """SIGTERM (a job scheduler, kill) raised in the main thread, so that the partial shards are removed."""


def _stopped(signum, frame):
    raise Stopped()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-ckpt-path", required=True, help="the release folder (with " + INDEX_FILE + ")")
    parser.add_argument("--save-path", required=True, help="output folder")
    parser.add_argument("--n-experts", type=int, help="routed experts (default: n_routed_experts of config.json)")
    parser.add_argument("--model-parallel", type=int, required=True, help="number of ranks N")
    parser.add_argument("--o-groups", type=int,
                        help="DeepSeek-V4's output projection groups (default: config.json, else 8)")
    parser.add_argument("--num-workers", type=int,
                        help="worker processes, 1 .. CPU count (default: min(N, CPU count))")
    parser.add_argument("--dtype", choices=SHARD_WEIGHTS, default="bf16",
                        help="bf16: dequantise the quantised weights (any GPU); fp8: keep them as released, with "
                             "their scales, for the FP8 / MXFP4 kernels")
    parser.add_argument("--expert-dtype", choices=("fp4", "fp8"),
                        help="with --dtype fp8, DeepSeek-V4's routed experts: fp4 (as released, the default) or "
                             "fp8 (cast exactly to FP8 with 128x128 block scales, twice the bytes)")
    args = parser.parse_args()
    if args.num_workers is not None and not 1 <= args.num_workers <= (os.cpu_count() or 1):
        parser.error(f"--num-workers must be in 1 .. {os.cpu_count() or 1} (the CPU count)")
    signal.signal(signal.SIGTERM, _stopped)
    try:
        convert(args.hf_ckpt_path, args.save_path, args.model_parallel, args.n_experts, args.o_groups,
                args.num_workers, dtype=args.dtype, expert_dtype=args.expert_dtype,
                log=lambda line: print(f"convert.py: {line}", file=sys.stderr, flush=True))
    except (ConvertError, OSError) as e:
        print(f"convert.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("convert.py: interrupted; partial shards removed", file=sys.stderr)
        sys.exit(130)
    except Stopped:
        print("convert.py: stopped by SIGTERM; partial shards removed", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    main()
