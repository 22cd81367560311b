"""Chapter 04, double quantization: the checks that notebooks/04_double_quantization.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .framework import Case, exercise_check


def _dq_bits_cases() -> Iterator[Case]:
    from .. import quantize_nf4

    for n, bs, dq in [(4096, 64, False), (4096, 64, True), (100_003, 64, True), (65_536, 128, True), (999, 32, False)]:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        yield Case(args=(n, bs, dq), expected=quantize_nf4(w, blocksize=bs, double_quant=dq).bits_per_param,
                   hint="with double quantization: 1 byte per block, 4 bytes per 256 blocks, and 4 bytes of offset" if dq else None)


@exercise_check(
    "nf4_bits_per_param",
    cases=_dq_bits_cases,
    idea="count bytes: (n+1)//2 packed, plus 4 per block (or 1 per block + 4 per 256 blocks + 4), times 8, over n",
)
def check_nf4_bits_per_param(fn: Callable[..., float]) -> None:
    """Check ``fn(n, blocksize, double_quant) -> bits per parameter`` against ``NF4Weight.bits_per_param``."""


def _dequantize_absmax_cases() -> Iterator[Case]:
    from .. import quantize_nf4

    for n in (64 * 300, 64 * 700 + 5):
        q = quantize_nf4(torch.randn(n, generator=torch.Generator().manual_seed(n)), double_quant=True)
        yield Case(args=(q.qabsmax.clone(), q.absmax2.clone(), q.offset.clone()), expected=q.block_absmax(),
                   label=f"dequantize_absmax({q.qabsmax.numel()} codes)")


@exercise_check(
    "dequantize_absmax",
    cases=_dequantize_absmax_cases,
    idea="dynamic_map()[code] times absmax2 of its group of 256, then add the offset back",
)
def check_dequantize_absmax(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(qabsmax, absmax2, offset) -> float32 absmax`` against bitsandbytes' nested dequantization."""


def _lut_index_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(0)
    for k in (255, 1020):
        v = torch.rand(k, generator=g) * 2 - 1  # normalised values in [-1, 1)
        blocks = torch.cat([torch.ones(k // 255, 1), v.view(-1, 255)], 1).reshape(-1)  # absmax 1 per block
        q, _ = bnbF.quantize_blockwise(blocks, blocksize=256)
        expected = q.view(-1, 256)[:, 1:].reshape(-1).long()
        yield Case(args=(v.clone(),), expected=expected, label=f"lut_code_index({k} values)")


@exercise_check(
    "lut_code_index",
    cases=_lut_index_cases,
    idea="slot = int(((v + 1) * 0.5) * 65535 + 0.5) in float32; the table maps slot i to the code nearest -1 + 2*i/65535",
)
def check_lut_code_index(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(v) -> code indices`` against bitsandbytes' CPU 8-bit quantizer (absmax 1)."""
