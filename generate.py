"""Generate text with DeepSeek-V4 or DeepSeek-R1 / V3, the model split over the ranks of torch.distributed.

    python generate.py --nproc-per-node N --ckpt-path DST --input-file prompts.txt [--output-file out.jsonl]
    python generate.py --nproc-per-node N --ckpt-path DST --interactive

DST is a folder written by convert.py with --model-parallel N: model{rank}-mp{N}.safetensors,
config.json and the tokenizer. --nproc-per-node starts the ranks through torchrun's launcher in this
process (see launch()), so that a failure ends in one line; `torchrun --nproc-per-node N generate.py
...` works too, with torchrun's own report after a failure. Without either it runs on one process.
The config's model_type picks the model and its chat format (checkpoint_family): deepseek_v3 (R1,
V3) runs model_v3.py with R1's format, whose replies always carry reasoning; deepseek_v4, and our
configs/*.json, run model.py with V4's format.

Input files hold prompts separated by blank lines, or one JSON object a line (a .jsonl file, or a
file whose first line is such an object): {"prompt": "..."} or {"messages": [{"role": ..., "content": ...}]}.
Prompts are grouped by length into batches of at most --max-batch-size; completions come back in
input order, printed or written to --output-file as JSON lines: the answer as completion, the
reasoning (thinking mode, and always for R1) as reasoning, the new token ids as completion_ids.

Rank 0 reads and checks the input, tokenizes, prints and writes; the other ranks get the token ids
from it. Before any work, the ranks exchange what each of them found wrong (missing shard, bad
config, bad input ...), and all exit with status 1 if any rank found a problem. A rank that dies
later makes the others fail in their next collective, and torchrun stops the job. Every rank
destroys its process groups on the way out, after success or failure.

Environment: USE_OGROUPS_COMM=1 runs the o-groups layout (more ranks than o_groups; convert with it
too); USE_FLAGGEMS=1 is --backend flaggems: FlagGems' fused V4 kernels (CUDA only); with
FLAGGEMS_EXCLUDE set, also every aten operator except the ones it names and FLAGGEMS_BROKEN.
"""
import argparse
import contextlib
import gc
import json
import logging
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_model
from tqdm import tqdm

import model_v3
from convert import architecture
from encoding import (ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, check_messages, encode_messages,
                      encode_messages_r1, parse_completion, parse_completion_r1)
from ops import BACKENDS
from model import GraphedDecoder, ModelArgs, Transformer

Prompt = Union[str, List[dict]]   # a user prompt, or a conversation ending with a user message


class GenerateError(Exception):
    """A problem with the setup or the inputs: reported as a message, exit status 1."""


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------- architectures

@dataclass(frozen=True)
class Family:
    """One architecture generate.py runs: its model classes and its chat format."""
    title: str
    args_class: type                                      # ModelArgs, with from_file and validate
    model_class: type                                     # Transformer(args)
    encode: Callable[[List[dict], str], str]              # (messages, mode) -> prompt text
    parse: Callable[[str, str], Tuple[str, str]]          # (completion text, mode) -> (reasoning, answer)
    always_reasons: bool                                  # its records carry reasoning in chat mode too


FAMILIES = {
    "deepseek_v4": Family("DeepSeek-V4", ModelArgs, Transformer, encode_messages, parse_completion, False),
    "deepseek_v3": Family("DeepSeek-R1 / V3", model_v3.ModelArgs, model_v3.Transformer, encode_messages_r1,
                          parse_completion_r1, True),
}
V4 = FAMILIES["deepseek_v4"]


def checkpoint_family(config_path: str) -> Family:
    """The architecture a config file describes (convert.architecture: model_type deepseek_v3 or
    deepseek_v4, our configs/*.json being V4). A missing file is left to ModelArgs.from_file to report."""
    try:
        return FAMILIES[architecture(read_json(config_path))]
    except ValueError as e:
        raise GenerateError(f"config {config_path}: {e}") from None


def family_of(args) -> Family:
    """The family whose ModelArgs args is."""
    return next(f for f in FAMILIES.values() if isinstance(args, f.args_class))


# ---------------------------------------------------------------- generation

def sample(logits: torch.Tensor, temperature: float, top_p: float,
           generator: Optional[torch.Generator]) -> torch.Tensor:
    """Next token of each row of logits [b, vocab]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the smallest set of tokens holding top_p of the mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        beyond = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p   # the mass before them already exceeds top_p
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs.masked_fill(beyond, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Stats:
    """Token counts and forward-pass seconds, summed over batches."""
    prompts: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def summary(self) -> str:
        """One line. A batch's prefill reads its prompts up to the shortest one's length; the rest of
        the longer prompts goes through the decode steps, so prefill tokens can be fewer than prompt tokens."""
        def rate(n, s):
            return f"{n / s:.1f}" if s > 0 else "n/a"
        return (f"{self.prompts} prompts, {self.tokens_in} prompt tokens "
                f"({self.prefill_tokens} in the prefill, which stops at each batch's shortest prompt; "
                f"{self.tokens_in - self.prefill_tokens} with the decode steps), {self.tokens_out} new tokens; "
                f"prefill {self.prefill_s:.2f} s ({rate(self.prefill_tokens, self.prefill_s)} tokens/s), "
                f"decode {self.decode_s:.2f} s ({rate(self.tokens_out, self.decode_s)} new tokens/s)")


@torch.inference_mode()
def generate(model: Transformer, prompts: List[List[int]], max_new_tokens: int, eos_id: int,
             temperature: float = 0.0, top_p: float = 1.0, generator: Optional[torch.Generator] = None,
             stats: Optional[Stats] = None, decoder: Optional[GraphedDecoder] = None,
             on_step: Optional[Callable[[int], None]] = None) -> List[List[int]]:
    """Complete a batch of tokenized prompts; returns the new tokens of each, ending with eos_id
    where the model stopped by itself.

    All sequences share positions: the first pass (prefill) reads every prompt up to the shortest
    one's length, then each step feeds one position, where a sequence still inside its prompt gets
    its own prompt token rather than the sampled one. A sequence is done at EOS or after
    max_new_tokens new tokens; the batch stops when all are done or at max_seq_len.
    Stats, if given, gets the prefill (first pass) and decode (later passes) times and the counts.
    A decoder (CUDA graphs of the model's one-token step) runs the later passes when given.
    on_step, if given, is called after each pass with the number of new tokens it produced.
    """
    lens = [len(p) for p in prompts]
    max_seq_len = model.args.max_seq_len
    if min(lens) == 0 or max(lens) >= max_seq_len:
        raise ValueError(f"prompt lengths must be in 1..{max_seq_len - 1} (max_seq_len={max_seq_len}), got {lens}")
    device = next(model.parameters()).device
    total = min(max_seq_len, max(lens) + max_new_tokens)
    tokens = torch.full((len(prompts), total), -1, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
    in_prompt = tokens != -1
    ends = [min(n + max_new_tokens, total) for n in lens]        # one past each sequence's last new position
    last_step = torch.tensor(ends, device=device) - 1
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    positions = torch.zeros(len(prompts), dtype=torch.long, device=device)

    prev = 0
    for cur in range(min(lens), total):
        start = time.perf_counter()
        if decoder is not None and prev > 0:
            logits = decoder(tokens[:, prev:cur], positions.fill_(prev))
        else:
            logits = model(tokens[:, prev:cur], prev)
        chosen = torch.where(in_prompt[:, cur], tokens[:, cur], sample(logits, temperature, top_p, generator))
        tokens[:, cur] = chosen
        produced = ~in_prompt[:, cur] & ~done
        done |= (~in_prompt[:, cur] & (chosen == eos_id)) | (last_step <= cur)
        finished = bool(done.all())                               # waits for the device
        if on_step is not None:
            on_step(int(produced.sum()))
        if stats is not None:
            if prev == 0:
                stats.prefill_s += time.perf_counter() - start
                stats.prefill_tokens += len(prompts) * cur
            else:
                stats.decode_s += time.perf_counter() - start
        prev = cur
        if finished:
            break

    completions = []
    for i, row in enumerate(tokens.tolist()):
        new = row[lens[i]:ends[i]]
        completions.append(new[:new.index(eos_id) + 1] if eos_id in new else new)
    if stats is not None:
        stats.prompts += len(prompts)
        stats.tokens_in += sum(lens)
        stats.tokens_out += sum(len(c) - (c[-1:] == [eos_id]) for c in completions)
    return completions


def generate_all(model: Transformer, prompts: List[List[int]], batch_size: int, progress: bool,
                 **kw) -> List[List[int]]:
    """Generate for any number of prompts: batches of similar lengths, results in input order.
    The progress bar counts new tokens (with their rate) as they come and the prompts finished, so
    a batch of long completions shows that it is moving."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: List[Optional[List[int]]] = [None] * len(prompts)
    with tqdm(desc="generate", unit="token", disable=not progress, file=sys.stderr,
              postfix=f"0/{len(prompts)} prompts") as bar:
        for first in range(0, len(order), batch_size):
            batch = order[first:first + batch_size]
            step = bar.update if progress else None
            for i, completion in zip(batch, generate(model, [prompts[i] for i in batch], on_step=step, **kw)):
                results[i] = completion
            bar.set_postfix_str(f"{min(first + batch_size, len(order))}/{len(prompts)} prompts")
    return results


# ---------------------------------------------------------------- tokenizer

class Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json through `tokenizers`, else tokenizer.model
    through sentencepiece. Special tokens are never added implicitly (the chat text carries BOS)."""
    SPECIAL = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END)   # kept whole when sentencepiece encodes

    def __init__(self, folder: str):
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            from tokenizers import Tokenizer as HFTokenizer
            self.hf = HFTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
            self.sp = None
        elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
            import sentencepiece
            self.hf = None
            self.sp = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
            self.special = {s: self.sp.piece_to_id(s) for s in self.SPECIAL
                            if self.sp.piece_to_id(s) != self.sp.unk_id()}
        else:
            raise GenerateError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model")
        self.eos_id = self._eos_id(folder)

    def token_id(self, text: str) -> Optional[int]:
        if self.hf is not None:
            return self.hf.token_to_id(text)
        i = self.sp.piece_to_id(text)
        return None if i == self.sp.unk_id() else i

    def encode(self, text: str) -> List[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=False).ids
        if not self.special:
            return self.sp.encode(text)
        ids = []
        for piece in re.split("(" + "|".join(map(re.escape, self.special)) + ")", text):
            ids += [self.special[piece]] if piece in self.special else self.sp.encode(piece) if piece else []
        return ids

    def decode(self, ids: List[int]) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=False)
        return self.sp.decode(ids)

    def _eos_id(self, folder: str) -> int:
        """EOS from tokenizer_config.json's eos_token, else config.json's eos_token_id, else the
        sentencepiece model's own."""
        found = read_json(os.path.join(folder, "tokenizer_config.json")).get("eos_token")
        if isinstance(found, dict):
            found = found.get("content")
        if isinstance(found, str) and self.token_id(found) is not None:
            return self.token_id(found)
        found = read_json(os.path.join(folder, "config.json")).get("eos_token_id")
        if isinstance(found, list) and found:
            found = found[0]
        if isinstance(found, int):
            return found
        if self.sp is not None and self.sp.eos_id() >= 0:
            return self.sp.eos_id()
        raise GenerateError(f"no EOS token id in {folder}: give eos_token in tokenizer_config.json "
                            f"or eos_token_id in config.json")


def read_json(path: str) -> dict:
    """A JSON object from path, {} if the file is absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise GenerateError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- inputs

def read_prompts(path: str) -> List[Prompt]:
    """Prompts of an input file: blank-line separated text, or JSON lines (by extension or content)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise GenerateError(f"input file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"cannot read input file {path}: {e}") from None
    if not text.strip():
        raise GenerateError(f"input file {path} is empty: no prompts")
    if path.endswith(".jsonl") or looks_like_jsonl(text):
        return read_jsonl(text, path)
    return [p.strip() for p in re.split(r"\n[ \t]*\n", text) if p.strip()]


def looks_like_jsonl(text: str) -> bool:
    first = next(line for line in text.splitlines() if line.strip())
    try:
        record = json.loads(first)
    except ValueError:
        return False
    return isinstance(record, dict) and ("prompt" in record or "messages" in record)


def read_jsonl(text: str, path: str) -> List[Prompt]:
    prompts: List[Prompt] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise GenerateError(f"{path} line {number}: not valid JSON ({e})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and "messages" in record:
            try:
                check_messages(record["messages"])
            except ValueError as e:
                raise GenerateError(f"{path} line {number}: {e}") from None
            prompts.append(record["messages"])
        else:
            raise GenerateError(f'{path} line {number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    return prompts


def prompt_text(prompt: Prompt, mode: str, raw: bool, family: Family = V4) -> str:
    """The text the model reads: BOS and the prompt as it is with --raw, else the family's chat format."""
    if raw:
        if not isinstance(prompt, str):
            raise GenerateError("--raw takes plain prompts, not messages")
        return BOS + prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return family.encode(messages, mode)


def tokenize(prompts: List[Prompt], tokenizer: Tokenizer, mode: str, raw: bool,
             max_seq_len: int, family: Family = V4) -> List[List[int]]:
    ids = [tokenizer.encode(prompt_text(p, mode, raw, family)) for p in prompts]
    for number, t in enumerate(ids, 1):
        if len(t) >= max_seq_len:
            raise GenerateError(f"prompt {number} has {len(t)} tokens, which leaves no room for a reply "
                                f"within max_seq_len={max_seq_len} (see --max-seq-len)")
    return ids


# ---------------------------------------------------------------- checkpoint and model

def load_args(opts: argparse.Namespace, world: int) -> Union[ModelArgs, model_v3.ModelArgs]:
    """The ModelArgs of the checkpoint's architecture (checkpoint_family), checked for world ranks."""
    if not os.path.isdir(opts.ckpt_path):
        raise GenerateError(f"checkpoint folder {opts.ckpt_path} not found")
    config = opts.config or os.path.join(opts.ckpt_path, "config.json")
    family = checkpoint_family(config)
    overrides = {k: v for k, v in (("max_batch_size", opts.max_batch_size), ("max_seq_len", opts.max_seq_len),
                                   ("dtype", opts.dtype), ("backend", getattr(opts, "backend", None)))
                 if v is not None}
    if opts.interactive:
        overrides["max_batch_size"] = 1
    if env_flag("USE_OGROUPS_COMM"):
        if family is not V4:
            raise GenerateError(f"USE_OGROUPS_COMM=1 is DeepSeek-V4's o-groups layout; {config} is {family.title}")
        overrides["ogroups_comm"] = True
    try:
        args = family.args_class.from_file(config, **overrides)
        args.validate(world)
    except FileNotFoundError:
        raise GenerateError(f"config {config} not found") from None
    except (OSError, ValueError, TypeError) as e:
        raise GenerateError(f"config {config}: {e}") from None
    return args


def shard_path(ckpt: str, rank: int, world: int, vocab_size: int) -> str:
    """This rank's weights file, checked to exist and to be split for `world` ranks."""
    if not os.path.isdir(ckpt):
        raise GenerateError(f"checkpoint folder {ckpt} not found")
    path = os.path.join(ckpt, f"model{rank}-mp{world}.safetensors")
    if not os.path.isfile(path):
        sizes = sorted({int(m.group(1)) for name in os.listdir(ckpt)
                        if (m := re.fullmatch(r"model\d+-mp(\d+)\.safetensors", name))})
        present = ", ".join(f"mp{n}" for n in sizes) or "none"
        raise GenerateError(f"{path} not found: {world} ranks need model0-mp{world} .. model{world - 1}-mp{world}; "
                            f"present in {ckpt}: {present} (convert.py --model-parallel {world} makes them)")
    try:
        with safe_open(path, "pt") as f:
            rows = f.get_slice("embed.weight").get_shape()[0] if "embed.weight" in f.keys() else None
    except Exception as e:   # safetensors reports a damaged file with its own error type
        raise GenerateError(f"cannot read {path}: {e}") from None
    if rows is None:
        raise GenerateError(f"{path} has no embed.weight: not a shard written by convert.py")
    if rows * world != vocab_size:
        made_for = f"mp{vocab_size // rows}" if rows and vocab_size % rows == 0 else "another model"
        raise GenerateError(f"{path} holds {rows} of the {vocab_size} vocabulary rows: it was made for {made_for}, "
                            f"not for mp{world}")
    return path


def build_model(args: Union[ModelArgs, model_v3.ModelArgs], path: str, device: torch.device,
                world: int) -> Transformer:
    """The Transformer of args' family, with this rank's shard loaded."""
    with torch.device(device):
        built = family_of(args).model_class(args)
    try:
        load_model(built, path, device=str(device))
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4]) + (" ..." if len(lines) > 4 else "")
        layout = ", o-groups layout" if getattr(args, "ogroups_comm", False) else ""
        raise GenerateError(f"{path} does not fit this model ({world} ranks{layout}): {detail}") from None
    return built.eval()


# Backend flaggems runs FlagGems' fused V4 kernels. Routing torch's aten ops through FlagGems too is
# slower on an H100 (flag-gems 5.0.2, 4 real-shape layers, bench.py backends: decode 2.40 against
# 1.61 ms a step, prefill of 512 tokens 102.6 against 26.0 ms), so it is off unless FLAGGEMS_EXCLUDE
# is set. When it is on, these FlagGems functions stay with torch whatever FLAGGEMS_EXCLUDE says,
# each for what tests/flaggems_ops.py measured (BENCHMARKS.md):
FLAGGEMS_BROKEN = {
    "mm": "gave no result within 140 s on the fixture model (slow compilation or a hang)",
    "mul": "returns a wrong shape for the broadcast [b, s, 4, 1] * [b, s, 4, D]",
    "topk": "picks other entries: the fixture model's logits 6.1e-2 off torch's with it routed (float32)",
    "cat": "illegal memory access at real shapes: outputs past 2^31 elements (the stacked experts)",
    "stack": "illegal memory access at real shapes (the stacked experts, as cat)",
    "sum_dim": "logits 5.6e-2 off torch at real shapes with it routed, 0 without it (bf16)",
}


def flaggems_exclude() -> List[str]:
    """FLAGGEMS_EXCLUDE unset: ["*"] (no aten op goes to FlagGems). Set: its comma-separated FlagGems
    function names (possibly none), then those of FLAGGEMS_BROKEN not among them."""
    if "FLAGGEMS_EXCLUDE" not in os.environ:
        return ["*"]
    names = [name.strip() for name in os.environ["FLAGGEMS_EXCLUDE"].split(",") if name.strip()]
    return names + [name for name in FLAGGEMS_BROKEN if name not in names]


def enable_flaggems(exclude: Optional[List[str]] = None, scoped: bool = False, what: str = "--backend flaggems"):
    """Get FlagGems ready for backend 'flaggems': check for CUDA and the flag_gems package, then route
    torch's aten operators through FlagGems except the op names in exclude (default: flaggems_exclude();
    ["*"] patches none, leaving only the fused kernels that kernel.py calls).

    The patching lasts for the whole process; with scoped=True it is undone when the returned context
    (flag_gems.use_gems) exits, so one process can also run a configuration without FlagGems.
    `what` names the request in messages. Raises GenerateError."""
    if exclude is None:
        exclude = flaggems_exclude()
    if not torch.cuda.is_available():
        raise GenerateError(f"{what} needs a CUDA GPU and none is visible"
                            + ("; set USE_FLAGGEMS=0 to run without FlagGems" if what.startswith("USE_") else
                               "; use --backend torch or triton"))
    try:
        import flag_gems
    except ImportError:
        raise GenerateError(f"{what} but FlagGems is not installed: pip install --no-deps flag-gems==5.0.2 && "
                            f"pip install PyYAML sqlalchemy packaging typing_extensions (see README)") from None
    except Exception as e:   # flag_gems raises RuntimeError at import when it finds no device it supports
        raise GenerateError(f"{what}: importing flag_gems failed: {e}") from None
    if "*" in exclude:
        return contextlib.nullcontext()
    if scoped:
        return flag_gems.use_gems(exclude=exclude)
    flag_gems.enable(unused=exclude)
    return contextlib.nullcontext()


def resolve_backend(backend: Optional[str]) -> Optional[str]:
    """--backend, with USE_FLAGGEMS=1 standing for --backend flaggems; None keeps the config's."""
    if env_flag("USE_FLAGGEMS"):
        if backend not in (None, "flaggems"):
            raise GenerateError(f"USE_FLAGGEMS=1 asks for backend flaggems but --backend is {backend}: "
                                f"drop one of them")
        return "flaggems"
    return backend


# ---------------------------------------------------------------- ranks

class Ranks:
    """This process's place in the job and the collectives the driver needs (objects over gloo)."""

    def __init__(self):
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.group = None

    def connect(self, timeout_s: float) -> None:
        """Join the other ranks: the default process group (NCCL on CUDA, else gloo), and a gloo
        group for objects beside NCCL. end_process_groups() undoes it."""
        if self.world > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
            if backend != "gloo":
                self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))

    def agree(self, error: Optional[str]) -> None:
        """Raise GenerateError on every rank if any rank has an error (a message shared by all
        ranks is said once, others with their rank)."""
        errors = [error]
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error, group=self.group)
        found = [(r, e) for r, e in enumerate(errors) if e]
        if not found:
            return
        if len(found) == len(errors) and len({e for _, e in found}) == 1:
            raise GenerateError(error)
        raise GenerateError("\n".join(f"rank {r}: {e}" for r, e in found))

    def share(self, obj, group=None):
        """rank 0's obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group or self.group)
        return box[0]

    def checked(self, step):
        """Run step() on every rank; all raise if any one fails with a GenerateError."""
        result, error = None, None
        try:
            result = step()
        except GenerateError as e:
            error = str(e)
        self.agree(error)
        return result


def end_process_groups() -> None:
    """Destroy this process's process groups, if any, so that it can exit at once after success or
    failure: a process that exits with gloo's threads alive can abort ("terminate called without an
    active exception"), and NCCL's communicator is not destroyed while CUDA graphs that captured
    its collectives live (pytorch issue 115388), so garbage is collected first."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# ---------------------------------------------------------------- modes

def record(index: int, prompt: Prompt, prompt_ids: List[int], new: List[int], tokenizer: Tokenizer,
           eos_id: int, mode: str, family: Family = V4) -> dict:
    """The output line of one prompt; completion_ids are the new tokens without the final EOS."""
    stopped = new[-1:] == [eos_id]
    ids = new[:-1] if stopped else new
    reasoning, answer = family.parse(tokenizer.decode(ids), mode)
    out = {"index": index, "prompt": prompt, "completion": answer}
    if mode == "thinking" or family.always_reasons:
        out["reasoning"] = reasoning
    out.update(prompt_tokens=len(prompt_ids), completion_tokens=len(ids), completion_ids=ids,
               finish_reason="stop" if stopped else "length")
    return out


def report(opts: argparse.Namespace, records: List[dict]) -> None:
    """Write the records to --output-file, or print them."""
    if opts.output_file:
        write_jsonl(opts.output_file, records)
        return
    for r in records:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"], ensure_ascii=False)
        print("Prompt:", prompt)
        if "reasoning" in r:
            print("Reasoning:", r["reasoning"])
        print("Completion:", r["completion"])
        print(flush=True)


def check_writable(path: str) -> None:
    """Refuse an output path that write_jsonl could not fill, before any work: a folder, a missing
    folder, or one where no file can be created (tried with a file of the temporary name, removed)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise GenerateError(f"--output-file {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise GenerateError(f"the folder of --output-file {path} does not exist")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise GenerateError(f"--output-file {path} cannot be written: {e.strerror}") from None


def write_jsonl(path: str, records: List[dict]) -> None:
    """Write under a temporary name, then rename: an interrupted run leaves no complete-looking file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def run_interactive(opts: argparse.Namespace, ranks: Ranks, model: Transformer, tokenizer: Optional[Tokenizer],
                    eos_id: int, generator: torch.Generator, decoder: Optional[GraphedDecoder]) -> None:
    """A conversation typed on rank 0's stdin; /clear forgets it, /exit (or end of input) quits.
    The other ranks wait for each turn without a time limit: a person may take a while to type."""
    waiting = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if ranks.world > 1 else None
    mode = "thinking" if opts.thinking else "chat"
    family = family_of(model.args)
    if ranks.rank == 0:
        print(f"generate.py: chat ({mode} mode) with {opts.ckpt_path}: type a message and press Enter; /clear starts "
              f"a new conversation, /exit (or Ctrl-D) quits", file=sys.stderr, flush=True)
    messages: List[dict] = []
    while True:
        ids = next_turn(messages, tokenizer, mode, model.args.max_seq_len, family) if ranks.rank == 0 else None
        ids = ranks.share(ids, waiting)
        if ids is None:
            return
        new = generate(model, [ids], opts.max_new_tokens, eos_id, opts.temperature, opts.top_p, generator,
                       decoder=decoder)[0]
        if ranks.rank == 0:
            reasoning, answer = family.parse(tokenizer.decode(new[:-1] if new[-1:] == [eos_id] else new), mode)
            if reasoning:
                print(f"[thinking] {reasoning}")
            print(answer, flush=True)
            messages.append({"role": "assistant", "content": answer})


def next_turn(messages: List[dict], tokenizer: Tokenizer, mode: str, max_seq_len: int,
              family: Family = V4) -> Optional[List[int]]:
    """Read lines until one asks for a reply; its prompt ids, or None to quit."""
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            return None
        if line.strip() == "/exit":
            return None
        if line.strip() == "/clear":
            messages.clear()
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        ids = tokenizer.encode(family.encode(messages, mode))
        if len(ids) < max_seq_len:
            return ids
        messages.pop()
        print(f"The conversation would be {len(ids)} tokens, beyond max_seq_len={max_seq_len}: "
              "/clear to start over.", flush=True)


# ---------------------------------------------------------------- main

class ArgumentParser(argparse.ArgumentParser):
    """Every rank parses the same command line under torchrun: only rank 0 reports a usage error."""

    def error(self, message):
        if os.environ.get("RANK", "0") != "0":
            self.exit(2)
        super().error(message)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description="Generate completions with a converted DeepSeek-V4 or DeepSeek-R1 / V3 checkpoint.")
    p.add_argument("--ckpt-path", required=True, help="folder written by convert.py")
    p.add_argument("--config", help="model config (default: CKPT_PATH/config.json)")
    p.add_argument("--input-file", help="prompts: blank-line separated text, or JSON lines")
    p.add_argument("--output-file", help="write one JSON line per prompt here, in input order")
    p.add_argument("--interactive", action="store_true", help="chat on stdin (/clear, /exit)")
    p.add_argument("--max-new-tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=0.6, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler (the same on every rank)")
    p.add_argument("--max-batch-size", type=int, help="override the config's max_batch_size")
    p.add_argument("--max-seq-len", type=int, help="override the config's max_seq_len")
    p.add_argument("--dtype", choices=("bf16", "fp32"), help="override the config's dtype")
    p.add_argument("--backend", choices=BACKENDS,
                   help="kernels (default: the config's, else auto = Triton on CUDA); flaggems = FlagGems' fused "
                        "kernels (CUDA; USE_FLAGGEMS=1 is the same; FLAGGEMS_EXCLUDE set also routes the aten "
                        "operators through FlagGems except the names it lists)")
    p.add_argument("--thinking", action="store_true",
                   help="thinking mode: V4 reasons before it answers; R1, which always reasons, gets its reply opened "
                        "with <think>")
    p.add_argument("--raw", action="store_true", help="feed prompts as they are after BOS, without the chat format")
    p.add_argument("--timeout", type=float, default=600, help="seconds a rank waits for the others before failing")
    ranks = p.add_argument_group("ranks", "start N ranks on this node (on each node, the same command with its "
                                          "--node-rank) through torchrun's launcher, reporting a failure in one line")
    ranks.add_argument("--nproc-per-node", type=int, metavar="N", help="ranks on this node, one a GPU")
    ranks.add_argument("--nnodes", type=int, default=1, help="nodes of the job (default 1)")
    ranks.add_argument("--node-rank", type=int, default=0, help="this node's number, 0 .. nnodes-1")
    ranks.add_argument("--master-addr", help="address of node 0 that every node reaches (needed for several nodes)")
    ranks.add_argument("--master-port", type=int, help="port on node 0 (default: any free one on one node, "
                                                       "29500 across nodes)")
    opts = p.parse_args(argv)
    if not opts.input_file and not opts.interactive:
        p.error("give --input-file or --interactive")
    if opts.interactive and opts.raw:
        p.error("--raw works with --input-file only")
    if opts.max_new_tokens < 1:
        p.error("--max-new-tokens must be at least 1")
    if opts.temperature < 0 or not 0 < opts.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if opts.nproc_per_node is not None and opts.nproc_per_node < 1:
        p.error("--nproc-per-node must be at least 1")
    if opts.nnodes < 1 or not 0 <= opts.node_rank < opts.nnodes:
        p.error(f"--node-rank must be in 0 .. {opts.nnodes - 1} (--nnodes {opts.nnodes})")
    if opts.nnodes > 1 and not opts.master_addr:
        p.error("--nnodes above 1 needs --master-addr, the address of node 0")
    return opts


def run(opts: argparse.Namespace, ranks: Ranks) -> None:
    mode = "thinking" if opts.thinking else "chat"

    def prepare():
        """Everything checked before the model is built; rank 0 also reads and tokenizes the input."""
        opts.backend = resolve_backend(opts.backend)
        args = load_args(opts, ranks.world)
        if args.backend == "flaggems":
            enable_flaggems(what="USE_FLAGGEMS=1" if env_flag("USE_FLAGGEMS") else "--backend flaggems")
        path = shard_path(opts.ckpt_path, ranks.rank, ranks.world, args.vocab_size)
        tokenizer, prompts, ids = None, None, None
        if ranks.rank == 0:
            tokenizer = Tokenizer(opts.ckpt_path)
            if not opts.interactive:
                if opts.output_file:
                    check_writable(opts.output_file)
                prompts = read_prompts(opts.input_file)
                ids = tokenize(prompts, tokenizer, mode, opts.raw, args.max_seq_len, family_of(args))
        return args, path, tokenizer, prompts, ids

    args, path, tokenizer, prompts, ids = ranks.checked(prepare)
    ids, eos_id = ranks.share((ids, tokenizer.eos_id if tokenizer else None))
    start = time.perf_counter()
    model = ranks.checked(lambda: build_model(args, path, ranks.device, ranks.world))
    if ranks.rank == 0:
        print(f"generate.py: loaded {opts.ckpt_path} on {ranks.world} rank(s) ({ranks.device.type}, {args.dtype}) "
              f"in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    generator = torch.Generator(ranks.device).manual_seed(opts.seed)
    # decode steps replay CUDA graphs (one per batch-size bucket) where the Triton kernels run
    decoder = GraphedDecoder(model) if model.ops.graphs else None
    if opts.interactive:
        run_interactive(opts, ranks, model, tokenizer, eos_id, generator, decoder)
        return
    stats = Stats()
    completions = generate_all(model, ids, args.max_batch_size, progress=ranks.rank == 0,
                               max_new_tokens=opts.max_new_tokens, eos_id=eos_id, temperature=opts.temperature,
                               top_p=opts.top_p, generator=generator, stats=stats, decoder=decoder)
    if ranks.rank == 0:
        report(opts, [record(i, p, t, c, tokenizer, eos_id, mode, family_of(args))
                      for i, (p, t, c) in enumerate(zip(prompts, ids, completions))])
        print(f"generate.py: {stats.summary()}", file=sys.stderr, flush=True)


# Exit status of a rank that lost contact with the others. Under torchrun's agent the ranks say
# nothing of it: the agent stops the rest at once (SIGTERM), perhaps while rank 0 is on its way out,
# and the launcher's failure_line() names the cause, a killed rank or this status.
LOST = 3


def lost_contact(e: BaseException) -> bool:
    """Whether e is a collective that failed because another rank stopped or did not answer within
    the timeout: NCCL raises a DistError, gloo a RuntimeError from its transport."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def brief(e: BaseException) -> str:
    """The first sentence of an error, without the source location gloo puts before it."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return re.split(r"(?<=\.) ", re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0]))[0]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.nproc_per_node is not None and "RANK" not in os.environ:
        return launch(opts, argv)
    ranks = Ranks()
    try:
        ranks.connect(opts.timeout)
        run(opts, ranks)
        return 0
    except GenerateError as e:
        if ranks.rank == 0:
            print(f"generate.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        if ranks.world == 1:         # several ranks: the launcher says it once
            print("generate.py: interrupted", file=sys.stderr, flush=True)
        return 130
    except RuntimeError as e:
        if ranks.world == 1 or not lost_contact(e):
            raise
        if ranks.rank == 0 and "TORCHELASTIC_RUN_ID" not in os.environ:
            print(f"generate.py: error: rank 0 lost contact with the other ranks (one stopped, or did not answer "
                  f"within --timeout {opts.timeout:g} s): {brief(e)}", file=sys.stderr, flush=True)
        return LOST
    finally:
        end_process_groups()


# ---------------------------------------------------------------- launcher

def launch(opts: argparse.Namespace, argv: List[str]) -> int:
    """Run this command line on --nproc-per-node ranks of this node through torchrun's launcher, in
    this process, and end with one line at most.

    torchrun logs its agent's steps, and after a failed job prints a ChildFailedError traceback and
    report of some 35 lines, below the line in which rank 0 already said what was wrong. Here the
    agent's logging is off and its report is replaced by failure_line(). The ranks get the same
    command line; they ignore the launch options, since torchrun sets RANK."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    launcher = ["--nnodes", str(opts.nnodes), "--node-rank", str(opts.node_rank),
                "--nproc-per-node", str(opts.nproc_per_node)]
    if opts.master_addr:
        launcher += ["--master-addr", opts.master_addr]
    if opts.master_port is not None:
        launcher += ["--master-port", str(opts.master_port)]
    # torchrun would set 1 thread a rank, with a warning; give each rank its share of the cores
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc_per_node)))
    logging.disable(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args([*launcher, os.path.abspath(__file__), *argv]))
        return 0
    except ChildFailedError as e:
        line = failure_line(e.failures)
        if line:
            print(f"generate.py: error: {line}", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:     # the agent has stopped the ranks
        print("generate.py: interrupted" if e.sigval == signal.SIGINT else f"generate.py: stopped by {e.sigval.name}",
              file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except Exception as e:           # the ranks never started: a rendezvous that timed out, a port in use
        print(f"generate.py: error: starting the ranks failed: {type(e).__name__}: {brief(e)}", file=sys.stderr,
              flush=True)
        return 1
    finally:
        logging.disable(logging.NOTSET)


def failure_line(failures: dict) -> Optional[str]:
    """What the launcher adds about a failed job (failures: {rank: torch's ProcessFailure}), or None
    where a rank has said it: exit status 1 follows rank 0's message (or a traceback). The agent stops
    the other ranks with SIGTERM, so a rank killed by another signal is the cause."""
    if any(f.exitcode == 1 for f in failures.values()):
        return None
    for rank, f in sorted(failures.items()):
        if f.exitcode < 0 and -f.exitcode != signal.SIGTERM:
            return f"rank {rank} was killed by {signal.Signals(-f.exitcode).name}"
    for rank, f in sorted(failures.items()):
        if f.exitcode == LOST:
            return f"rank {rank} lost contact with the other ranks (one stopped, or did not answer within --timeout)"
    rank, f = min(failures.items())
    return f"rank {rank} ended with exit status {f.exitcode}"


if __name__ == "__main__":
    sys.exit(main())
