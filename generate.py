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
FLAGGEMS_EXCLUDE set, also every aten operator except the ones it names and FLAGGEMS_BROKEN;
USE_HUMMING=1 runs V4's MXFP4 routed experts (shards of convert.py --dtype fp8) on humming-kernels
(pip install humming-kernels; CUDA, compiled with nvcc at first use); USE_HUMMING=fp8 also quantises
their inputs to FP8 per 128 channels, as DeepSeek's code does (faster prefill, not bf16's numbers).
"""
import os
import signal
import sys


def _interrupted_early(signum, frame):
    """SIGINT before main(), while torch loads: a word from this process (a rank leaves it to the
    launcher) instead of a traceback, status 130. Nothing is open yet, and an exception raised here
    could land inside torch's C++ import code, which aborts on it: the process ends at once."""
    if "RANK" not in os.environ:
        print("generate.py: interrupted", file=sys.stderr, flush=True)
    os._exit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_early)

# imported after the handler is set: loading torch takes seconds
import argparse
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ops import BACKENDS, backend_unavailable
from runtime import (V4, Family, GraphedDecoder, Prompt, Ranks, SetupError, Tokenizer, brief, build_model,
                     check_shard, check_text, end_process_groups, env_expert_kernels, env_flag, family_of, load_args,
                     read_prompts, ready_flaggems, requested_backend, shard_path, tokenize, write_atomically)



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
def generate(model, prompts: List[List[int]], max_new_tokens: int, eos_id: int,
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


def generate_all(model, prompts: List[List[int]], batch_size: int, progress: bool,
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


# The files of a converted checkpoint, which an output file must not replace
CHECKPOINT_FILE = re.compile(r"config\.json|tokenizer.*|.*\.safetensors")


def check_writable(path: str, input_file: str, ckpt_path: str) -> None:
    """Refuse an output path that write_jsonl could not fill or must not replace, before any work: a
    folder, a missing folder, the input file, a file of the checkpoint, or a folder where no file can
    be created (tried with a file of the temporary name, removed). A device or pipe is written in place."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SetupError(f"--output-file {path} is a folder: give a file name")
    if not os.path.isdir(folder):
        raise SetupError(f"the folder of --output-file {path} does not exist")
    if os.path.exists(path) and not os.path.isfile(path):
        if not os.access(path, os.W_OK):
            raise SetupError(f"--output-file {path} cannot be written")
        return
    if os.path.isfile(path) and os.path.isfile(input_file) and os.path.samefile(path, input_file):
        raise SetupError(f"--output-file {path} is the input file: give another name")
    if os.path.samefile(folder, ckpt_path) and CHECKPOINT_FILE.fullmatch(os.path.basename(path)):
        raise SetupError(f"--output-file {path} would replace a file of the checkpoint: give another name")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8"):
            pass
        os.remove(tmp)
    except OSError as e:
        raise SetupError(f"--output-file {path} cannot be written: {e.strerror}") from None


def write_jsonl(path: str, records: List[dict]) -> None:
    """One JSON line a record, in a file that appears only once complete."""
    write_atomically(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def run_interactive(opts: argparse.Namespace, ranks: Ranks, model, tokenizer: Optional[Tokenizer],
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
        try:
            check_text(line, "that line")
        except SetupError as e:
            print(f"{e}: type it again.", flush=True)
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
    if not 0 <= opts.temperature < float("inf") or not 0 < opts.top_p <= 1:
        p.error("--temperature must be finite and >= 0, and --top-p in (0, 1]")
    if not -2 ** 63 <= opts.seed < 2 ** 64:
        p.error("--seed must fit in 64 bits")
    if not opts.timeout > 0:
        p.error("--timeout must be a positive number of seconds")
    if opts.output_file == "":
        p.error("--output-file must name a file (leave it out to print to stdout)")
    if opts.nproc_per_node is not None and opts.nproc_per_node < 1:
        p.error("--nproc-per-node must be at least 1")
    if opts.nnodes < 1:
        p.error("--nnodes must be at least 1")
    if not 0 <= opts.node_rank < opts.nnodes:
        p.error(f"--node-rank must be in 0 .. {opts.nnodes - 1} (--nnodes {opts.nnodes})")
    if opts.nnodes > 1 and not opts.master_addr:
        p.error("--nnodes above 1 needs --master-addr, the address of node 0")
    return opts


def run(opts: argparse.Namespace, ranks: Ranks) -> None:
    mode = "thinking" if opts.thinking else "chat"

    def prepare():
        """Everything checked before the model is built; rank 0 also reads and tokenizes the input."""
        opts.backend = requested_backend(opts.backend)
        experts = env_expert_kernels()
        path = shard_path(opts.ckpt_path, ranks.rank, ranks.world)
        args = load_args(opts.ckpt_path, ranks.world, opts.config, env_flag("USE_OGROUPS_COMM", SetupError),
                         experts, ranks.device, max_batch_size=1 if opts.interactive else opts.max_batch_size,
                         max_seq_len=opts.max_seq_len, dtype=opts.dtype, backend=opts.backend)
        if args.backend == "flaggems":
            ready_flaggems("USE_FLAGGEMS=1" if env_flag("USE_FLAGGEMS", SetupError) else "--backend flaggems")
        why = backend_unavailable(args.backend, ranks.device)
        if why:
            raise SetupError(f"{why}: leave --backend out, or give torch")
        check_shard(path, ranks.world, args.vocab_size)
        tokenizer, prompts, ids = None, None, None
        if ranks.rank == 0:
            if opts.interactive and (sys.stdin is None or sys.stdin.closed):
                raise SetupError("--interactive reads the conversation on stdin, which is closed")
            tokenizer = Tokenizer(opts.ckpt_path, args.vocab_size)
            if not opts.interactive:
                if opts.output_file:
                    check_writable(opts.output_file, opts.input_file, opts.ckpt_path)
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


def main(argv=None) -> int:
    signal.signal(signal.SIGINT, signal.default_int_handler)       # Ctrl-C from here on: KeyboardInterrupt
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    if opts.nproc_per_node is not None and "RANK" not in os.environ:
        return launch(opts, argv)
    ranks = Ranks()
    try:
        ranks.connect(opts.timeout)
        run(opts, ranks)
        return 0
    except SetupError as e:
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
    agent's logging is off and its report is replaced by failure_line(), on a line of its own: the
    agent may have stopped rank 0 halfway through redrawing its progress bar. The ranks get the same
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
    launcher += ["--rdzv-conf", f"timeout={math.ceil(opts.timeout)}"]   # the nodes' meeting (torchrun: 900 s)
    # torchrun would set 1 thread a rank, with a warning; give each rank its share of the cores
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // opts.nproc_per_node)))
    logging.disable(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args([*launcher, os.path.abspath(__file__), *argv]))
        return 0
    except ChildFailedError as e:
        line = failure_line(e.failures)
        if line:
            print(f"\ngenerate.py: error: {line}", file=sys.stderr, flush=True)
        return 1
    except SignalException as e:     # the agent has stopped the ranks
        said = "interrupted" if e.sigval == signal.SIGINT else f"stopped by {e.sigval.name}"
        print(f"\ngenerate.py: {said}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    except Exception as e:           # the ranks never started: a rendezvous that timed out, a port in use
        meet = ""
        if opts.nnodes > 1:
            meet = (f" (the {opts.nnodes} nodes meet at {opts.master_addr}:{opts.master_port or 29500} within "
                    f"--timeout {opts.timeout:g} s: is every node started, with the same address and port?)")
        print(f"generate.py: error: starting the ranks failed: {type(e).__name__}: {brief(e)}{meet}", file=sys.stderr,
              flush=True)
        return 1
    finally:
        logging.disable(logging.NOTSET)


def failure_line(failures: dict) -> Optional[str]:
    """What the launcher adds about a failed job (failures: {rank: torch's ProcessFailure}), or None
    where a rank has said it: exit status 1 follows rank 0's message (or a traceback). The agent stops
    the other ranks with SIGTERM, so a rank killed by another signal is the cause; unless the agent
    recorded it later than the first failure (seconds later: a rank that ignored the SIGTERM, hung
    or stopped, which the agent then killed with SIGKILL)."""
    if any(f.exitcode == 1 for f in failures.values()):
        return None
    first = min(f.timestamp for f in failures.values())
    for rank, f in sorted(failures.items()):
        if f.exitcode < 0 and -f.exitcode != signal.SIGTERM and f.timestamp <= first + 1:
            return f"rank {rank} was killed by {signal.Signals(-f.exitcode).name}"
    for rank, f in sorted(failures.items()):
        if f.exitcode == LOST:
            return f"rank {rank} lost contact with the other ranks (one stopped, or did not answer within --timeout)"
    rank, f = min(failures.items())
    return f"rank {rank} ended with exit status {f.exitcode}"


if __name__ == "__main__":
    sys.exit(main())
