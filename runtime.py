"""From a converted checkpoint to a model running on this rank: what generate.py, check.py and
bench.py share.

  SetupError                   a problem with the setup or the inputs (one message, exit status 1)
  Family, checkpoint_family    the architecture a config describes: model classes and chat format
  Tokenizer                    the checkpoint's tokenizer
  read_prompts, tokenize       a prompt file (text or JSON lines) to token ids in the family's chat format
  shard_path, load_args, check_shard, build_model
                               this rank's shard, the checked config, the shard checked, the loaded model
  use_backend                  the backend asked for (USE_FLAGGEMS), FlagGems made ready
  Ranks, end_process_groups    this process's place in the job, errors agreed by all ranks
  GraphedDecoder, greedy       decode steps from CUDA graphs; the greedy loop of check.py, bench.py, tools
  write_atomically             an output file that appears only once complete
"""
import gc
import json
import os
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_model

import flaggems
import kernel_humming
import kernel_lowp
import model_v3
from convert import FLAG_OFF, FLAG_ON, architecture, env_flag
from encoding import (ASSISTANT, BOS, EOS, THINK_END, THINK_START, USER, check_messages, encode_messages,
                      encode_messages_r1, parse_completion, parse_completion_r1)
from model import ModelArgs, Transformer
from parallel import Linear

Prompt = Union[str, List[dict]]   # a user prompt, or a conversation ending with a user message


class SetupError(Exception):
    """A problem with the setup or the inputs: reported as a message, exit status 1."""


def env_expert_kernels() -> str:
    """The routed experts' kernels USE_HUMMING asks for (model.ModelArgs.expert_kernels): unset or 0
    'triton', 1 'humming' (bf16 activations), fp8 'humming-fp8'. SetupError for any other value."""
    value = os.environ.get("USE_HUMMING", "0").strip().lower()
    if value == "fp8":
        return "humming-fp8"
    if value in FLAG_ON:
        return "humming"
    if value in FLAG_OFF:
        return "triton"
    raise SetupError(f"USE_HUMMING must be 0, 1 or fp8, got {os.environ['USE_HUMMING']!r}")


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
        raise SetupError(f"config {config_path}: {e}") from None


def family_of(args) -> Family:
    """The family whose ModelArgs args is."""
    return next(f for f in FAMILIES.values() if isinstance(args, f.args_class))


# ---------------------------------------------------------------- tokenizer

def brief(e: BaseException) -> str:
    """The first sentence of an error, without the source location (gloo's, for one) put before it."""
    text = str(e).strip()
    if not text:
        return type(e).__name__
    return re.split(r"(?<=\.) ", re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0]))[0]


def check_text(text: str, what: str) -> None:
    """Refuse text that is not Unicode the tokenizer can take: lone surrogates, which undecodable
    input bytes or a JSON escape such as \\ud800 leave in a Python string."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SetupError(f"{what} is not valid Unicode text (undecodable bytes or a lone surrogate)") from None


class Tokenizer:
    """The checkpoint's tokenizer: tokenizer.json through `tokenizers`, else tokenizer.model
    through sentencepiece. Special tokens are never added implicitly (the chat text carries BOS).
    vocab_size: the model's; a tokenizer with ids at or above it is refused (another model's)."""
    SPECIAL = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END)   # kept whole when sentencepiece encodes

    def __init__(self, folder: str, vocab_size: Optional[int] = None):
        path = os.path.join(folder, "tokenizer.json")
        try:
            if os.path.isfile(path):
                from tokenizers import Tokenizer as HFTokenizer
                self.hf, self.sp = HFTokenizer.from_file(path), None
                size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1
            elif os.path.isfile(path := os.path.join(folder, "tokenizer.model")):
                import sentencepiece
                self.hf, self.sp = None, sentencepiece.SentencePieceProcessor(model_file=path)
                self.special = {s: self.sp.piece_to_id(s) for s in self.SPECIAL
                                if self.sp.piece_to_id(s) != self.sp.unk_id()}
                size = self.sp.get_piece_size()
            else:
                raise SetupError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer.model")
        except (SetupError, MemoryError):
            raise
        except Exception as e:       # the tokenizer libraries' own error types
            raise SetupError(f"cannot read the tokenizer {path}: {brief(e)}") from None
        if vocab_size is not None and size > vocab_size:
            raise SetupError(f"the tokenizer {path} has ids up to {size - 1}, beyond the model's vocab_size "
                             f"{vocab_size}: it is not this model's tokenizer")
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
        raise SetupError(f"no EOS token id in {folder}: give eos_token in tokenizer_config.json "
                            f"or eos_token_id in config.json")


def read_json(path: str) -> dict:
    """A JSON object from path, {} if the file is absent."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else {}


# ---------------------------------------------------------------- inputs

def read_prompts(path: str) -> List[Prompt]:
    """Prompts of an input file (UTF-8, a byte-order mark dropped): blank-line separated text, or JSON
    lines (by extension or content)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise SetupError(f"input file {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SetupError(f"cannot read input file {path}: {e}") from None
    if not text.strip():
        raise SetupError(f"input file {path} is empty: no prompts")
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
            raise SetupError(f"{path} line {number}: not valid JSON ({e})") from None
        if isinstance(record, dict) and isinstance(record.get("prompt"), str):
            prompts.append(record["prompt"])
        elif isinstance(record, dict) and "messages" in record:
            try:
                check_messages(record["messages"])
            except ValueError as e:
                raise SetupError(f"{path} line {number}: {e}") from None
            prompts.append(record["messages"])
        else:
            raise SetupError(f'{path} line {number}: expected {{"prompt": "..."}} or {{"messages": [...]}}')
    return prompts


def prompt_text(prompt: Prompt, mode: str, raw: bool, family: Family = V4) -> str:
    """The text the model reads: BOS and the prompt as it is with --raw, else the family's chat format."""
    if raw:
        if not isinstance(prompt, str):
            raise SetupError("--raw takes plain prompts, not messages")
        return BOS + prompt
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return family.encode(messages, mode)


def tokenize(prompts: List[Prompt], tokenizer: Tokenizer, mode: str, raw: bool,
             max_seq_len: int, family: Family = V4) -> List[List[int]]:
    texts = [prompt_text(p, mode, raw, family) for p in prompts]
    for number, text in enumerate(texts, 1):
        check_text(text, f"prompt {number}")
    ids = [tokenizer.encode(text) for text in texts]
    for number, t in enumerate(ids, 1):
        if len(t) >= max_seq_len:
            raise SetupError(f"prompt {number} has {len(t)} tokens, which leaves no room for a reply "
                                f"within max_seq_len={max_seq_len} (see --max-seq-len)")
    return ids


# ---------------------------------------------------------------- checkpoint and model

def load_args(ckpt_path: str, world: int, config: Optional[str] = None, ogroups_comm: bool = False,
              expert_kernels: str = "triton", device: Optional[torch.device] = None,
              **overrides) -> Union[ModelArgs, model_v3.ModelArgs]:
    """The ModelArgs of the checkpoint's architecture (checkpoint_family), checked for world ranks.
    config: the config file (default ckpt_path/config.json); ogroups_comm: V4's o-groups layout;
    expert_kernels: V4's MXFP4 experts on humming-kernels (env_expert_kernels), checked to run on device
    where it is given; overrides: runtime fields (max_batch_size, max_seq_len, dtype, backend), None
    keeping the config's."""
    if not os.path.isdir(ckpt_path):
        raise SetupError(f"checkpoint folder {ckpt_path} not found")
    config = config or os.path.join(ckpt_path, "config.json")
    family = checkpoint_family(config)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if ogroups_comm:
        if family is not V4:
            raise SetupError(f"USE_OGROUPS_COMM=1 is DeepSeek-V4's o-groups layout; {config} is {family.title}")
        overrides["ogroups_comm"] = True
    if expert_kernels != "triton":
        if family is not V4:
            raise SetupError(f"expert kernels {expert_kernels!r} (USE_HUMMING) run DeepSeek-V4's MXFP4 experts; "
                             f"{config} is {family.title}")
        overrides["expert_kernels"] = expert_kernels
    try:
        args = family.args_class.from_file(config, **overrides)
        args.validate(world)
    except FileNotFoundError:
        raise SetupError(f"config {config} not found") from None
    except (OSError, ValueError, TypeError) as e:
        text = str(e)              # from_file's own messages start with the file's path
        raise SetupError(f"config {text}" if text.startswith(config) else f"config {config}: {text}") from None
    why = None if expert_kernels == "triton" or device is None else kernel_humming.unavailable(device, args.backend)
    if why:
        raise SetupError(f"expert kernels {expert_kernels!r} (USE_HUMMING): humming-kernels cannot run them: {why}")
    return args


def shard_path(ckpt: str, rank: int, world: int) -> str:
    """This rank's weights file for `world` ranks, checked to exist: checked before the config is held
    against the world size, a checkpoint made for another N is named as such."""
    if not os.path.isdir(ckpt):
        raise SetupError(f"checkpoint folder {ckpt} not found")
    path = os.path.join(ckpt, f"model{rank}-mp{world}.safetensors")
    if os.path.lexists(path) and not os.path.isfile(path):
        raise SetupError(f"{path} is not a file (a folder, or a link to nothing)")
    if not os.path.isfile(path):
        sizes = sorted({int(m.group(1)) for name in os.listdir(ckpt)
                        if (m := re.fullmatch(r"model\d+-mp(\d+)\.safetensors", name))})
        present = ", ".join(f"mp{n}" for n in sizes) or "none"
        raise SetupError(f"{path} not found: {world} ranks need model0-mp{world} .. model{world - 1}-mp{world}; "
                            f"present in {ckpt}: {present} (convert.py --model-parallel {world} makes them)")
    return path


def check_shard(path: str, world: int, vocab_size: int) -> None:
    """A shard (shard_path) readable and split for `world` ranks of this vocabulary."""
    try:
        with safe_open(path, "pt") as f:
            rows = f.get_slice("embed.weight").get_shape()[0] if "embed.weight" in f.keys() else None
    except Exception as e:   # safetensors reports a damaged file with its own error type
        raise SetupError(f"cannot read {path}: {e}") from None
    if rows is None:
        raise SetupError(f"{path} has no embed.weight: not a shard written by convert.py")
    if rows * world != vocab_size:
        made_for = f"mp{vocab_size // rows}" if rows and vocab_size % rows == 0 else "another model"
        raise SetupError(f"{path} holds {rows} of the {vocab_size} vocabulary rows: it was made for {made_for}, "
                            f"not for mp{world}")


def build_model(args: Union[ModelArgs, model_v3.ModelArgs], path: str, device: torch.device,
                world: int) -> Transformer:
    """The Transformer of args' family, with this rank's shard loaded."""
    try:
        with torch.device(device):
            built = family_of(args).model_class(args)
    except RuntimeError as e:   # torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError
        if not isinstance(e, torch.OutOfMemoryError) and "can't allocate memory" not in str(e):
            raise
        ranks = f"{world} rank{'s' * (world > 1)}"
        raise SetupError(f"the model with its caches for max_batch_size={args.max_batch_size} x max_seq_len="
                         f"{args.max_seq_len} does not fit in memory ({device}, {ranks}): lower --max-seq-len or "
                         f"--max-batch-size, or use more ranks") from None
    try:
        load_model(built, path, device=str(device))
    except RuntimeError as e:
        lines = str(e).splitlines()
        detail = "; ".join(line.strip() for line in lines[1:4]) + (" ..." if len(lines) > 4 else "")
        layout = ", o-groups layout" if getattr(args, "ogroups_comm", False) else ""
        raise SetupError(f"{path} does not fit this model ({world} ranks{layout}): {detail}") from None
    check_fp4_scales(built, path)
    return built.eval()


def check_fp4_scales(built: torch.nn.Module, path: str) -> None:
    """The MXFP4 layers' scales within what kernel_lowp widens exactly (kernel_lowp.FP4_SCALE_EXPONENT_MAX)."""
    layers = {name: m for name, m in built.named_modules()
              if isinstance(m, Linear) and m.quant is not None and m.quant.fmt == "fp4" and m.scale.numel()}
    if not layers:
        return
    peaks = torch.stack([m.scale.view(torch.uint8).max() for m in layers.values()]).tolist()
    for name, peak in zip(layers, peaks):
        if peak > kernel_lowp.FP4_SCALE_EXPONENT_MAX:
            raise SetupError(f"{path}: {name}.scale holds MXFP4 scales above 2 (ue8m0 exponent {peak} > "
                             f"{kernel_lowp.FP4_SCALE_EXPONENT_MAX}), beyond what the MXFP4 kernels widen exactly")


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
        """Raise SetupError on every rank if any rank has an error, in one line: a message shared by
        all ranks as it is, else the first failing rank's with its number (and the others' numbers:
        their messages are its own for their files, such as each rank's missing shard)."""
        errors = [error]
        if self.world > 1:
            errors = [None] * self.world
            dist.all_gather_object(errors, error, group=self.group)
        found = [(r, e) for r, e in enumerate(errors) if e]
        if not found:
            return
        if len(found) == len(errors) and len({e for _, e in found}) == 1:
            raise SetupError(error)
        others = [str(r) for r, _ in found[1:]]
        more = f" (rank{'s' * (len(others) > 1)} {', '.join(others)} failed too)" if others else ""
        raise SetupError(f"rank {found[0][0]}: {found[0][1]}{more}")

    def share(self, obj, group=None):
        """rank 0's obj, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=group or self.group)
        return box[0]

    def checked(self, step):
        """Run step() on every rank; all raise if any one fails with a SetupError."""
        result, error = None, None
        try:
            result = step()
        except SetupError as e:
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




# ---------------------------------------------------------------- backend

def requested_backend(backend: Optional[str]) -> Optional[str]:
    """--backend, with USE_FLAGGEMS=1 standing for --backend flaggems; None keeps the config's."""
    if env_flag("USE_FLAGGEMS", SetupError):
        if backend not in (None, "flaggems"):
            raise SetupError(f"USE_FLAGGEMS=1 asks for backend flaggems but --backend is {backend}: "
                                f"drop one of them")
        return "flaggems"
    return backend


def ready_flaggems(what: str, scoped: bool = False):
    """flaggems.enable with its refusal as a SetupError; the context that scopes its patching."""
    try:
        return flaggems.enable(scoped=scoped, what=what)
    except flaggems.Unavailable as e:
        raise SetupError(str(e)) from None


# ---------------------------------------------------------------- running a model

class GraphedDecoder:
    """A model's decode steps (model.decode: V4's or V3's Transformer) replayed from CUDA graphs, one per batch-size bucket (powers of two up to
    max_batch_size), all captured up front: capturing writes to cache rows, so it must happen
    before any sequence lives there.

    A call with b rows replays the smallest bucket >= b; rows b .. bucket-1 are scratch rows whose
    caches get overwritten, so live sequences must occupy rows 0 .. b-1."""
    def __init__(self, model: Transformer):
        self.model = model
        top = model.args.max_batch_size
        self.buckets = sorted({min(1 << i, top) for i in range(top.bit_length() + 1)})
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs = {bb: self._capture(bb) for bb in reversed(self.buckets)}

    def _capture(self, bb: int):
        device = self.model.embed.weight.device
        ids = torch.zeros(bb, 1, dtype=torch.long, device=device)
        pos = torch.zeros(bb, dtype=torch.long, device=device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):          # compiles the kernels and stacks the experts outside the graph
                self.model.decode(ids, pos)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.decode(ids, pos)
        return graph, ids, pos, logits

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """ids [b, 1], pos [b] -> float32 logits [b, vocab] (a copy, safe to keep)."""
        b = ids.size(0)
        bb = next(x for x in self.buckets if x >= b)
        graph, ids_buf, pos_buf, logits = self.graphs[bb]
        ids_buf[:b].copy_(ids)
        pos_buf[:b].copy_(pos)
        pos_buf[b:].zero_()
        graph.replay()
        return logits[:b].clone()       # the graph's output buffer is overwritten by the next replay


@torch.inference_mode()
def greedy(model, prompt: torch.Tensor, steps: int, forced: Optional[torch.Tensor] = None, step=None):
    """Prefill prompt [b, s] from position 0, then steps - 1 one-token passes at positions s, s+1, ..
    -> float32 logits [b, steps, vocab] of the last position at each pass (on the CPU) and the tokens
    fed [b, steps - 1]: the argmax, or forced[:, i] after pass i (teacher forcing). step(ids, pos) runs
    a pass (default model.decode; a GraphedDecoder replays graphs)."""
    b, s = prompt.shape
    step = step or model.decode
    rows, fed = [model(prompt, 0).float().cpu()], []
    for i in range(1, steps):
        nxt = forced[:, i - 1] if forced is not None else rows[-1].argmax(-1)
        fed.append(nxt)
        pos = torch.full((b,), s + i - 1, device=prompt.device)
        rows.append(step(nxt.to(prompt.device).view(b, 1), pos).float().cpu())
    return torch.stack(rows, dim=1), (torch.stack(fed, dim=1) if fed else torch.empty(b, 0, dtype=torch.long))


def write_atomically(path: str, write: Callable, binary: bool = False) -> None:
    """write(f) into a file at a temporary name beside path, then renamed to path: an interrupted
    run leaves no file that looks complete (and no temporary one). A path that exists but is not a
    regular file (/dev/null, /dev/stdout, a pipe) is written in place: a rename would replace it."""
    mode, kw = ("wb", {}) if binary else ("w", {"encoding": "utf-8"})
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, mode, **kw) as f:
            write(f)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, mode, **kw) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
