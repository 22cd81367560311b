"""Chapter 04, double quantization: the checks that notebooks/04_double_quantization.ipynb calls."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .framework import Case, exercise_check, fmt


def _dq_bits_cases() -> Iterator[Case]:
    from .. import quantize_nf4

    for n, bs, dq in [(4096, 64, False), (4096, 64, True), (100_003, 64, True), (65_536, 128, True), (999, 32, False)]:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        yield Case(args=(n, bs, dq), expected=quantize_nf4(w, blocksize=bs, double_quant=dq).bits_per_param,
                   hint="with double quantization, count every stored constant: both levels and the one per tensor" if dq else None)


@exercise_check(
    "nf4_bits_per_param",
    cases=_dq_bits_cases,
    idea="count the bytes each stored tensor takes (codes, then every constant), then turn bytes into bits per value",
    formula="bytes = (n+1)//2 + (4 * blocks, or blocks + 4 * ceil(blocks / 256) + 4 with double quantization), "
            "blocks = ceil(n / blocksize); bits per parameter = 8 * bytes / n",
)
def check_nf4_bits_per_param(fn: Callable[..., float]) -> None:
    """Check ``fn(n, blocksize, double_quant) -> bits per parameter`` against ``NF4Weight.bits_per_param``."""


def _dequantize_absmax_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    for n in (64 * 300, 64 * 700 + 5, 64 * 256 * 3):
        w = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02
        _, st = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        expected = bnbF.dequantize_blockwise(st.absmax, st.state2) + st.offset  # bitsandbytes' nested state
        yield Case(args=(st.absmax.clone(), st.state2.absmax.clone(), st.offset.clone()), expected=expected,
                   label=f"dequantize_absmax({st.absmax.numel()} codes of bitsandbytes' nested quant_state)")


@exercise_check(
    "dequantize_absmax",
    cases=_dequantize_absmax_cases,
    idea="undo the two steps of section 4 in reverse order: decode each 8-bit code, rescale it with its group's "
         "second-level absmax, then undo the centring",
    formula="absmax[j] = dynamic_map()[qabsmax[j]] * absmax2[j // 256] + offset",
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
    idea="two steps: a table with one entry per grid point, built once from the map, then each value rounded to "
         "its grid slot; the rounding of every float32 step matters",
    formula="table[i] = number of midpoints of dynamic_map() below -1 + 2*i/65535 (searchsorted); "
            "slot = int(((v + 1) * 0.5) * 65535 + 0.5) in float32; code = table[slot]",
)
def check_lut_code_index(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(v) -> code indices`` against bitsandbytes' CPU 8-bit quantizer (absmax 1)."""


def _dq_bits_prediction_cases() -> Iterator[Case]:
    from .. import quantize_nf4

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    expected = tuple(quantize_nf4(w, blocksize=64, double_quant=dq).bits_per_param for dq in (False, True))
    yield Case(expected=expected, label="your predicted (bits without, bits with double quantization) of a 4096 x 4096 weight")


def _within_a_thousandth(expected: tuple, got: Any) -> str | None:
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return f"got {fmt(got)}, expected two numbers: (without, with double quantization)"
    for what, e, g in zip(("without", "with"), expected, got):
        if isinstance(g, bool) or not isinstance(g, numbers.Real):
            return f"got {fmt(g)} for the value {what} double quantization, expected a number"
        if abs(float(g) - e) > 1e-3:
            return f"{what} double quantization: got {fmt(g)} bits per parameter, expected about {fmt(e)}"
    return None


@exercise_check(
    "dq_bits_prediction",
    cases=_dq_bits_prediction_cases,
    idea="4 bits of code per value, plus each constant's bits shared among the values it covers; "
         "a constant of the second level covers 256 blocks of 64 values",
    formula="without: 4 + 32/64; with: 4 + 8/64 + 32/(64*256) (the 4-byte offset per tensor is negligible)",
    expects="value",
    compare=_within_a_thousandth,
)
def check_dq_bits_prediction(value: tuple) -> None:
    """Check a predicted pair (bits per parameter without, with double quantization) of a 4096 x 4096
    weight at blocksize 64, to 0.001 bits, against ``NF4Weight.bits_per_param``."""


# ---------------------------------------------------------------- notebook 04's fallbacks (the library)


def reference_dequantize_absmax(qabsmax: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``lora_course.dequantize_blockwise_8bit`` plus the offset: notebook 04's fallback for ``dequantize_absmax``."""
    from ..quant.double_quant import dequantize_blockwise_8bit

    return dequantize_blockwise_8bit(qabsmax, absmax2, 256) + offset


def reference_lut_code_index(v: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' table rule as the library builds it: notebook 04's fallback for ``lut_code_index``."""
    from ..quant.double_quant import code_lut, dynamic_map, lut_slot

    return code_lut(dynamic_map())[lut_slot(v.float())].long()
