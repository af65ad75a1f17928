"""The release's low-precision weight formats: their constants and exact dequantisation.

- FP8: float8_e4m3fn weights [out, in] with one scale per 128x128 block [ceil(out/128), ceil(in/128)],
  edge blocks partial. DeepSeek-V4 stores the scale as ue8m0 (float8_e8m0fnu, a power of two) in
  `<prefix>.scale`; DeepSeek-R1/V3 as float32 in `<name>_scale_inv`.
- MXFP4 (V4's routed experts): int8 [out, in/2] holding two e2m1 codes a byte (low nibble = even
  column), one ue8m0 scale per 32 inputs [out, in/32].

Converted shards hold these weights either dequantised to BF16 or as they are (convert.py --dtype
fp8); shard_weights reads which from the shards' config.json.

Used by convert.py, the models, the test fixtures, and the kernels that compute with such weights.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

FP8_BLOCK = 128  # FP8 e4m3 weights: one ue8m0 scale per 128x128 block
FP4_BLOCK = 32   # MXFP4 experts: one ue8m0 scale per 32 inputs of a row
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn

# How shards may hold the weights the release quantises: the dense format and the experts' formats
# that go with it ('bf16': dequantised; 'fp8': FP8 e4m3 with the block scales; 'fp4': MXFP4 as released).
SHARD_WEIGHTS = {"bf16": ("bf16",), "fp8": ("fp4", "fp8")}

# The 16 values of an e2m1 code: bit 3 is the sign, bits 0-2 index the magnitude.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def fp8_scale_shape(rows: int, cols: int) -> tuple:
    """The scale's shape for an FP8 weight [rows, cols]: one per 128x128 block, edge blocks partial."""
    return -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)


def fp4_scale_shape(rows: int, cols: int) -> tuple:
    """The scale's shape for an MXFP4 weight of rows x cols values (cols / 2 bytes a row): one per 32 inputs."""
    return rows, cols // FP4_BLOCK


def dequant_fp8(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """weight [out, in] float8_e4m3fn, scale [ceil(out/128), ceil(in/128)] (ue8m0 or float32)
    -> [out, in] dtype: the product in float32, then rounded to dtype (as DeepSeek's fp8_cast_bf16).

    With a ue8m0 scale the product is an e4m3 value times a power of two, exact in bf16 too.
    """
    out_f, in_f = weight.shape
    rows, cols = fp8_scale_shape(out_f, in_f)
    if tuple(scale.shape) != (rows, cols):
        raise ValueError(f"FP8 scale has shape {tuple(scale.shape)}, expected {(rows, cols)} "
                         f"for a weight of shape {(out_f, in_f)}")
    w = weight.float()                                     # exact: e4m3 fits in float32
    s = scale.float().repeat_interleave(FP8_BLOCK, 0)[:out_f]                      # [out, cols]
    if in_f % FP8_BLOCK:
        w = w * s.repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    else:
        w = (w.view(out_f, cols, FP8_BLOCK) * s.unsqueeze(-1)).view(out_f, in_f)
    return w.to(dtype)


def dequant_fp4(weight: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """weight [out, in/2] int8 (two e2m1 codes a byte, low nibble = even column),
    scale [out, in/32] ue8m0 -> [out, in] dtype, exactly."""
    out_f, half = weight.shape
    in_f = 2 * half
    if in_f % FP4_BLOCK or tuple(scale.shape) != fp4_scale_shape(out_f, in_f):
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}, expected {fp4_scale_shape(out_f, in_f)} "
                         f"for a packed weight of shape {(out_f, half)}")
    values = torch.tensor(E2M1_VALUES, dtype=dtype, device=weight.device)
    byte = torch.arange(256, device=weight.device)
    pairs = torch.stack([values[byte & 0xF], values[byte >> 4]], dim=-1)          # [256, 2]: a byte's two values
    w = pairs[weight.view(torch.uint8).int()]                                      # [out, in/2, 2]
    return (w.view(out_f, -1, FP4_BLOCK) * scale.to(dtype).unsqueeze(-1)).view(out_f, in_f)


def act_quant_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's activation quantisation (its act_quant with ue8m0 scales): x [.., K] (K a multiple of
    128) -> (float8_e4m3fn [.., K], float32 scale [.., K/128]). Each 128 channels take the power of two
    at or above amax * (1/448) (amax at least 1e-4), the values x / scale clamped to +-448 and rounded
    to nearest even. q times scale is exact in bf16: dequant_act_fp8 gives the numbers a GEMM sees."""
    if x.size(-1) % FP8_BLOCK:
        raise ValueError(f"FP8 activations take a multiple of {FP8_BLOCK} channels, got {x.size(-1)}")
    blocks = x.float().unflatten(-1, (-1, FP8_BLOCK))
    amax = blocks.abs().amax(-1).clamp(min=1e-4) * torch.tensor(1 / E4M3_MAX, dtype=torch.float32)
    mant, exp = torch.frexp(amax)                       # amax = mant 2^exp, mant in [0.5, 1)
    scale = torch.ldexp(torch.ones_like(amax), torch.where(mant == 0.5, exp - 1, exp))
    q = (blocks / scale.unsqueeze(-1)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.flatten(-2), scale


def dequant_act_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
    """act_quant_fp8's (q [.., K], scale [.., K/128]) -> [.., K] dtype, exactly."""
    return (q.float().unflatten(-1, (-1, FP8_BLOCK)) * scale.unsqueeze(-1)).flatten(-2).to(dtype)


def shard_weights(config: dict) -> Tuple[str, str]:
    """(dense, experts): how the shards beside a config.json hold the weights the release quantises,
    from its keys 'weights' and 'expert_weights', which convert.py --dtype fp8 writes: absent, BF16
    shards ('bf16', 'bf16'); else 'fp8' with the experts' 'fp4' (V4's MXFP4 as released) or 'fp8'.
    Raises ValueError for any other value."""
    dense = config.get("weights", "bf16")
    if dense not in SHARD_WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(SHARD_WEIGHTS)}, got {dense!r}")
    experts = config.get("expert_weights", "bf16" if dense == "bf16" else None)
    if experts not in SHARD_WEIGHTS[dense]:
        raise ValueError(f"expert_weights must be one of {', '.join(SHARD_WEIGHTS[dense])} with weights {dense!r}, "
                         f"got {experts!r}")
    return dense, experts


def fp4_to_fp8(weight: torch.Tensor, scale: torch.Tensor):
    """MXFP4 weight [out, in/2] int8 with ue8m0 scales [out, in/32] -> (float8_e4m3fn [out, in], ue8m0
    block scales [ceil(out/128), ceil(in/128)]) holding the same numbers (DeepSeek's --expert-dtype fp8
    cast): each 128x128 block takes the scale 2^-6 times its largest group scale, so that 6 x 2^6 = 384
    fits e4m3, and its values become e2m1 codes times powers of two. Raises ValueError where a block's
    group scales span more than e4m3 holds (a value would round), which DeepSeek's cast does not check."""
    values = dequant_fp4(weight, scale, torch.float32)                                 # exact
    out_f, in_f = values.shape
    rows, cols = fp8_scale_shape(out_f, in_f)
    exp = scale.view(torch.uint8).int() - 127                                          # [out, in/32]
    groups = FP8_BLOCK // FP4_BLOCK
    padded = F.pad(exp, (0, cols * groups - exp.size(1), 0, rows * FP8_BLOCK - out_f), value=-127)
    block = (padded.view(rows, FP8_BLOCK, cols, groups).amax(dim=(1, 3)) - 6).clamp(-127, 127)
    step = torch.exp2(block.float()).repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)
    q = (values / step[:, :in_f]).to(torch.float8_e4m3fn)
    if not torch.equal(q.float() * step[:, :in_f], values):
        raise ValueError("an MXFP4 weight whose group scales within a 128x128 block span more than FP8 e4m3 "
                         "holds: its FP8 copy would not be exact")
    return q, (block + 127).to(torch.uint8).view(torch.float8_e8m0fnu)
