"""Chapter 03, NF4 from scratch: the checks that notebooks/03_nf4_from_scratch.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .framework import Case, exercise_check, fmt


def _nf4_cases_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, generator=g) * 0.05 for n in (64, 130, 333)]


def _nf4_levels_cases() -> Iterator[Case]:
    from .. import nf4_code

    for offset in (0.9677083, 0.99, 0.95):
        yield Case(args=(offset,), expected=nf4_code(offset),
                   hint=None if offset == 0.9677083 else "the offset is the probability of the outermost level")


@exercise_check(
    "nf4_levels",
    cases=_nf4_levels_cases,
    idea="the levels are quantiles of the standard normal: more on the positive side than on the negative, "
         "and one level that is exactly 0; then scale them into [-1, 1]",
    formula="pos = ndtri(linspace(offset, 0.5, 9)[:-1]); neg = -ndtri(linspace(offset, 0.5, 8)[:-1]) (in float64); "
            "v = sort(cat([pos, 0, neg]).float()); return v / v.max()",
)
def check_nf4_levels(fn: Callable[[float], torch.Tensor]) -> None:
    """Check ``fn(offset) -> (16,) float32`` against ``lora_course.nf4_code`` (equal to bitsandbytes' table)."""


def _pack_nibbles_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    for w in _nf4_cases_weights() + [torch.randn(7, generator=torch.Generator().manual_seed(1))]:
        packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        packed = packed.view(-1)
        codes = torch.stack([packed >> 4, packed & 15], 1).view(-1)[: w.numel()]  # (n,) 0..15
        yield Case(args=(codes.clone(),), expected=packed.clone(), label=f"pack_nibbles({w.numel()} codes)",
                   hint="odd count: pad the last byte's low nibble with 7, the code of 0.0" if w.numel() % 2 else None)


def _exact_uint8(expected: Any, got: Any) -> str | None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.uint8:
        return f"got {fmt(got)}, expected a uint8 tensor"
    if got.shape != expected.shape:
        return f"got shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.equal(got, expected):
        i = int((got != expected).nonzero()[0, 0])
        return f"byte {i}: got {int(got[i])}, expected {int(expected[i])}"
    return None


@exercise_check(
    "pack_nibbles",
    cases=_pack_nibbles_cases,
    idea="a byte has two 4-bit halves; the first code of each pair goes in the upper half",
    compare=_exact_uint8,
    formula="pad an odd count with one code 7; byte i = 16 * codes[2i] + codes[2i+1], as uint8",
)
def check_pack_nibbles(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(codes) -> packed`` (1-D uint8, length (n+1)//2) against bitsandbytes' packing."""


def _dequantize_blocks_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    for w in _nf4_cases_weights():
        for bs in (64, 128):
            packed, st = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4")
            ref = bnbF.dequantize_4bit(packed, st).reshape(-1)
            yield Case(args=(packed.view(-1).clone(), st.absmax.clone(), w.numel(), bs), expected=ref,
                       label=f"dequantize_blocks(packed, absmax, n={w.numel()}, blocksize={bs})",
                       hint="the last block can be shorter than blocksize" if w.numel() % bs else None)


@exercise_check(
    "dequantize_blocks",
    cases=_dequantize_blocks_cases,
    idea="undo the packing first (which half of a byte holds the first value?), then each code is an index into "
         "the table, and every value of a block shares one scale",
    formula="codes = stack([packed >> 4, packed & 15], 1).flatten()[:n]; "
            "value_i = NF4_CODE[codes_i] * absmax[i // blocksize]",
)
def check_dequantize_blocks(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(packed, absmax, n, blocksize) -> (n,) float32`` against bitsandbytes' ``dequantize_4bit``."""


# ---------------------------------------------------------------- notebook 03's fallbacks (the library)


def reference_pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte, high nibble first, odd count padded with 7: notebook 03's fallback."""
    c = torch.nn.functional.pad(codes.reshape(-1).to(torch.uint8), (0, codes.numel() % 2), value=7)
    return (c[0::2] << 4) | c[1::2]


def reference_dequantize_blocks(packed: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int = 64) -> torch.Tensor:
    """``lora_course.dequantize_nf4`` on a flat tensor of ``n`` values: notebook 03's fallback."""
    from ..quant import dequantize_nf4

    return dequantize_nf4(packed.reshape(-1), absmax, (n,), blocksize)
