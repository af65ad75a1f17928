"""The release's low-precision weight formats: their constants and exact dequantisation.

- FP8: float8_e4m3fn weights [out, in] with one scale per 128x128 block [ceil(out/128), ceil(in/128)],
  edge blocks partial. DeepSeek-V4 stores the scale as ue8m0 (float8_e8m0fnu, a power of two) in
  `<prefix>.scale`; DeepSeek-R1/V3 as float32 in `<name>_scale_inv`.
- MXFP4 (V4's routed experts): int8 [out, in/2] holding two e2m1 codes a byte (low nibble = even
  column), one ue8m0 scale per 32 inputs [out, in/32].

Used by convert.py, the test fixtures, and the kernels that compute with such weights.
"""
import torch

FP8_BLOCK = 128  # FP8 e4m3 weights: one ue8m0 scale per 128x128 block
FP4_BLOCK = 32   # MXFP4 experts: one ue8m0 scale per 32 inputs of a row

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
