"""The 8-bit dynamic map and blockwise 8-bit quantization, used to double-quantize NF4's absmax.

QLoRA (arXiv 2305.14314, section 3) stores one float32 absmax per 64 weights (0.5 bits per
parameter). Double quantization subtracts their mean (``offset``) and quantizes them again,
in blocks of 256, to 8-bit codes of the *dynamic map* (Dettmers, arXiv 1511.04561): a signed
8-bit type whose exponent is written as a run of zeros, so it spans 1e-7 .. 1.

How the 8-bit code is chosen matches bitsandbytes' CPU kernel (0.50): not the nearest code,
but a 65,536-entry lookup table. A value ``v`` in [-1, 1] goes to the table slot
``floor((v + 1) / 2 * 65535 + 0.5)`` (in float32, each step rounded), and slot ``i``
holds the code nearest to the grid point ``-1 + 2 i / 65535``. Near a midpoint between two
codes the slot's grid point can fall on the other side, so about 0.15-0.2% of values get a
neighbouring code instead of the nearest (notebook 04 measures it); near 0, where codes are
closer together than the grid, it can be several codes away (0 itself maps to code 131).
"""

from __future__ import annotations

import torch

from ..checks import check_blocksize, check_float_tensor

BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
LUT_SIZE = 65536

_cache: dict[tuple[str, object], torch.Tensor] = {}


def dynamic_map(signed: bool = True) -> torch.Tensor:
    """The 256 sorted float32 values of the dynamic 8-bit map (``create_dynamic_map``).

    For exponent ``e = 0..6`` the map holds ``10**(e-6)`` times the midpoints of a linspace
    of ``2**e + 1`` (signed: and its negatives) or ``2**(e+1) + 1`` (unsigned) points on
    [0.1, 1]; plus 0 and 1.
    """
    key = ("dyn", bool(signed))
    if key not in _cache:
        parts = [torch.zeros(1), torch.ones(1)]
        for e in range(7):
            n = 2**e + 1 if signed else 2 ** (e + 1) + 1
            edges = torch.linspace(0.1, 1, n, dtype=torch.float32)  # (n,)
            mids = (edges[:-1] + edges[1:]) / 2.0  # (n-1,) fraction values
            parts.append(10.0 ** (e - 6) * mids)  # float32, like bitsandbytes
            if signed:
                parts.append(-(10.0 ** (e - 6)) * mids)
        _cache[key] = torch.cat(parts).sort().values  # (256,)
    return _cache[key].clone()


def code_lut(code: torch.Tensor) -> torch.Tensor:
    """The 65,536-slot table: slot i -> index of the code nearest to ``-1 + 2 i / 65535``.

    ``code`` must be sorted; ties between two codes go to the lower one.
    """
    mids = 0.5 * (code[:-1] + code[1:])  # (255,) float32 midpoints
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    grid = -1.0 + (2.0 * i) / (LUT_SIZE - 1)  # (65536,) float32, each op rounded
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8)  # number of midpoints < grid


def lut_slot(v: torch.Tensor) -> torch.Tensor:
    """``int(((v + 1) * 0.5) * 65535 + 0.5)`` for float32 ``v``, every step rounded to float32.

    No fused multiply-add: bitsandbytes' CPU kernel rounds the product before adding 0.5
    (a fused version differs in about 2 of 10,000 values; the tests check which one matches).
    """
    # NaN (0 * inf when an absmax is subnormal and its reciprocal overflows) goes to slot 0,
    # as the C kernel's float -> uint16 conversion of NaN does on x86.
    t = (torch.nan_to_num(v, nan=-1.0).clamp(-1.0, 1.0) + 1.0) * 0.5  # (..) float32 in [0, 1]
    return (t * float(LUT_SIZE - 1) + 0.5).long()  # truncation == floor (non-negative)


def _dynamic_lut() -> torch.Tensor:
    key = ("lut", True)
    if key not in _cache:
        _cache[key] = code_lut(dynamic_map(True))
    return _cache[key]


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of ``x`` to the signed dynamic map.

    Returns ``(q, absmax)``: ``q`` uint8 with ``x``'s shape, ``absmax`` float32 of length
    ``ceil(n / blocksize)``. Equal to bitsandbytes' CPU ``quantize_blockwise`` (lookup-table codes).
    """
    check_float_tensor("x", x)
    check_blocksize(blocksize, BLOCKSIZES_8BIT)
    flat = x.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    nb = -(-n // blocksize)
    padded = torch.nn.functional.pad(flat, (0, nb * blocksize - n))  # (nb*bs,) zeros do not change absmax
    blocks = padded.view(nb, blocksize)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    zero = absmax == 0  # (nb,) all-zero blocks get code 0 (the C kernel skips them)
    inv = torch.where(zero, 0.0, 1.0 / absmax)  # (nb,) float32 reciprocal, then multiply (as the C kernel)
    q = _dynamic_lut().to(x.device)[lut_slot(blocks * inv[:, None])]  # (nb, bs) uint8
    q = torch.where(zero[:, None], torch.zeros((), dtype=torch.uint8), q)
    return q.reshape(-1)[:n].clone().reshape(x.shape), absmax  # clone: no padded storage kept


def dequantize_blockwise_8bit(
    q: torch.Tensor, absmax: torch.Tensor, blocksize: int = 256, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``code[q] * absmax[block]`` in float32, rounded once to ``dtype``; shape of ``q``."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.uint8:
        raise ValueError(f"q must be a uint8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    check_blocksize(blocksize, BLOCKSIZES_8BIT)
    n = q.numel()
    nb = -(-n // blocksize)
    if not isinstance(absmax, torch.Tensor) or absmax.numel() != nb:
        got = absmax.numel() if isinstance(absmax, torch.Tensor) else type(absmax).__name__
        raise ValueError(f"absmax must have ceil({n}/{blocksize}) = {nb} elements, got {got}")
    code = _dynamic_map_on(q.device)  # (256,) float32, cached per device
    if n == nb * blocksize:  # whole blocks: one gather, one in-place scale, no padding
        vals = torch.index_select(code, 0, q.reshape(-1).to(torch.int32)).view(nb, blocksize)
        out = vals.mul_(absmax.float().reshape(nb, 1))  # (nb, bs) float32
        return out.view(q.shape) if dtype == torch.float32 else out.view(q.shape).to(dtype)
    vals = code[q.reshape(-1).long()]  # (n,) float32
    vals = torch.nn.functional.pad(vals, (0, nb * blocksize - n)).view(nb, blocksize)
    out = vals * absmax.float().reshape(nb, 1)  # (nb, bs)
    return out.reshape(-1)[:n].reshape(q.shape).to(dtype, copy=True)  # copy: no padded storage kept


def _dynamic_map_on(device: torch.device) -> torch.Tensor:
    """The signed dynamic map on ``device``, made once per device (callers must not modify it)."""
    if device.type == "cpu":
        return _DYNAMIC_MAP_CPU  # made at import: no tensor appears inside a caller's memory count
    key = ("dyn-on", str(device))
    if key not in _cache:
        _cache[key] = dynamic_map(True).to(device)
    return _cache[key]


_DYNAMIC_MAP_CPU = dynamic_map(True)  # (256,) float32
