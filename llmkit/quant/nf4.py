"""4-bit NormalFloat (NF4) with double quantisation (Dettmers et al. 2023, "QLoRA", sec. 3).

NF4: weights are cut into blocks of 64; each block is divided by its absolute maximum (so it lies
in [-1, 1]) and every value is replaced by the index of the nearest of 16 code values. The code
values are quantiles of N(0, 1) rescaled to [-1, 1], with an exact zero: 8 positive and 7
negative quantiles (appendix E) — `NF4_CODE` below, the exact float32 table of bitsandbytes.
Two 4-bit indices are packed in one byte (first in the high nibble, as bitsandbytes does).

Double quantisation: the fp32 block scales (32 bits per 64 weights = 0.5 bit/param) are
themselves quantised: their mean is subtracted and the centred scales are quantised to 8 bits in
blocks of 256 with bitsandbytes' signed "dynamic" 8-bit code (Dettmers 2016), each block keeping
one fp32 scale: 8/64 + 32/(64·256) ≈ 0.127 bits per parameter (sec. 3, "Double Quantization").

These are the pure functions; the "nf4" record in methods.py makes them a quantization method
like int8 and int4 (`QuantLinear` dequantises to the compute dtype in each forward: the frozen base
of QLoRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# bitsandbytes' NF4 table (bitsandbytes/backends/utils.py, _NF4_QUANT_TABLE; QLoRA appendix E)
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=torch.float32)

BLOCKSIZE = 64
BLOCKSIZE2 = 256  # block size of the double quantisation of the scales


def nf4_code_from_quantiles(offset: float = 0.9677083) -> torch.Tensor:
    """The NF4 values derived as in the paper: quantiles q_i = Φ⁻¹(p_i) for 8 probabilities evenly
    spaced in [0.5, offset] (positive side) and 7 on the negative side, plus 0, scaled to [-1, 1].
    `offset` = ½(1 - 1/(2·15) + 1 - 1/(2·16)) keeps the end quantiles finite. Equals NF4_CODE to ~1e-7."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    return (v / v.max()).float()


def dynamic_code(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' 8-bit dynamic-tree code (create_dynamic_map): for each exponent e = 0..6 a set of
    linearly spaced fractions scaled by 10^(e-6), both signs, plus 0 and 1; 256 sorted values."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, n, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, n values) -> (indices (n,) int64 of the nearest code value, absmax (ceil(n/bs),) fp32).
    The last block may be partial (its absmax is over its own values)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    nblocks = math.ceil(n / blocksize)
    padded = F.pad(flat, (0, nblocks * blocksize - n)).view(nblocks, blocksize)  # zeros never raise absmax
    absmax = padded.abs().amax(dim=1)  # (nblocks,)
    scaled = (padded * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1).reshape(-1)[:n]
    midpoints = (code[:-1] + code[1:]) / 2  # code is sorted: nearest value = bucket between midpoints
    return torch.bucketize(scaled, midpoints), absmax


def dequantize_blockwise(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of quantize_blockwise: (n,) indices -> (n,) fp32 values."""
    n = idx.numel()
    vals = code[idx.long()]
    nblocks = absmax.numel()
    padded = F.pad(vals, (0, nblocks * blocksize - n)).view(nblocks, blocksize) * absmax[:, None]
    return padded.reshape(-1)[:n]


def pack_4bit(idx: torch.Tensor) -> torch.Tensor:
    """(n,) indices < 16 -> (ceil(n/2),) uint8, element 2i in the high nibble."""
    q = idx.to(torch.uint8)
    if q.numel() % 2:
        q = F.pad(q, (0, 1))
    return (q[0::2] << 4) | q[1::2]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)
    return out[:n]


def nf4_quantize(w: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """w (any shape) -> state: packed (ceil(n/2),) uint8 and the block scales, either
    absmax (nblocks,) fp32, or with double quantisation absmax_q (nblocks,) uint8 + absmax2
    (ceil(nblocks/256),) fp32 + absmax_offset () fp32."""
    idx, absmax = quantize_blockwise(w, NF4_CODE.to(w.device), blocksize)
    state = {"packed": pack_4bit(idx)}
    if double_quant:
        offset = absmax.mean()
        q2, absmax2 = quantize_blockwise(absmax - offset, DYNAMIC_CODE.to(w.device), BLOCKSIZE2)
        state.update(absmax_q=q2.to(torch.uint8), absmax2=absmax2, absmax_offset=offset)
    else:
        state["absmax"] = absmax
    return state


def nf4_absmax(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The per-block fp32 scales (dequantising them first under double quantisation)."""
    if "absmax" in state:
        return state["absmax"]
    return dequantize_blockwise(state["absmax_q"], state["absmax2"], DYNAMIC_CODE.to(state["absmax2"].device),
                                BLOCKSIZE2) + state["absmax_offset"]


def nf4_dequantize(state: dict[str, torch.Tensor], shape, blocksize: int = BLOCKSIZE,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = math.prod(shape)
    packed, absmax = state["packed"], nf4_absmax(state)
    if n % blocksize or blocksize % 2:  # a ragged last block: the general path
        idx = unpack_4bit(packed, n)
        return dequantize_blockwise(idx, absmax, NF4_CODE.to(idx.device), blocksize).view(shape).to(dtype)
    # QLoRA dequantises every linear in every forward and backward: one lookup per packed byte into a
    # table of its two fp32 codes held as one int64 (a 1-D take, the fastest gather on CPU), instead of
    # unpacking to int64 indices and padding; the same values, code[idx] * absmax
    code = NF4_CODE.to(packed.device)
    lut = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # byte b -> (code[b >> 4], code[b & 15])
    vals = torch.take(lut.view(torch.int64).view(-1), packed.long()).view(torch.float32)  # (n,)
    return vals.view(-1, blocksize).mul_(absmax[:, None]).view(shape).to(dtype)  # (nblocks, blocksize) scaled


def nf4_bits_per_param(state: dict[str, torch.Tensor], n: int) -> dict[str, float]:
    """Storage per parameter: the 4-bit codes and the overhead of the scales (in bits)."""
    scale_bits = sum(state[k].numel() * state[k].element_size() * 8 for k in state if k != "packed")
    return {"code_bits": state["packed"].numel() * 8 / n, "scale_bits": scale_bits / n}
