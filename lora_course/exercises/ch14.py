"""Chapter 14, int8 and 8-bit optimizers: the checks that notebooks/14_int8_and_8bit_optimizers.ipynb calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check


def _int8_vectorwise_cases() -> Iterator[Case]:
    from .. import quantize_int8_vectorwise

    g = torch.Generator().manual_seed(14)
    shapes = [(1, 8), (4, 16), (7, 33), (16, 64)]
    for k, shape in enumerate(shapes):
        x = (torch.randn(shape, generator=g) * (1 + 3 * k)).half()
        if k == 2:
            x[0, :4] = torch.tensor([127.0, 2.5, -2.5, 0.5]).half()  # ties: round half to even
        yield Case(args=(x,), expected=quantize_int8_vectorwise(x),
                   label=f"int8_vectorwise(x of shape {shape}, float16)",
                   hint="per row: absmax = max |x|; q = round(x * 127 / absmax) with torch.round "
                        "(half to even), as int8; absmax as float32" if k == 2 else None)


@exercise_check(
    "int8_vectorwise",
    cases=_int8_vectorwise_cases,
    idea="one scale per row: absmax = max |x| over the row (float32), q = torch.round(x * (127 / absmax)) as int8",
)
def check_int8_vectorwise(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(x) -> (q int8, row_absmax float32)`` against bitsandbytes' ``int8_vectorwise_quant`` (via ours)."""


def _outlier_split_cases() -> Iterator[Case]:
    from .. import Int8Linear

    g = torch.Generator().manual_seed(15)
    for k, (tokens, d_in, d_out, thr) in enumerate([(4, 16, 8, 6.0), (6, 32, 12, 6.0), (5, 24, 10, 0.0),
                                                     (3, 40, 16, 3.0)]):
        x = torch.randn(tokens, d_in, generator=g)
        x[:, k + 1] *= 12  # an outlier feature (a whole column)
        w = torch.randn(d_out, d_in, generator=g) * 0.1
        layer = nn.Linear(d_in, d_out, bias=False)
        layer.weight.data = w.clone()
        expected = Int8Linear(layer, threshold=thr).eval()(x).detach()
        yield Case(args=(x, w, thr), expected=expected,
                   label=f"int8_matmul_with_outliers(x {tokens}x{d_in}, w {d_out}x{d_in}, threshold={thr})",
                   hint="threshold 0 means no decomposition: every column goes through int8" if thr == 0 else None)


@exercise_check(
    "outlier_split",
    cases=_outlier_split_cases,
    idea="W and X to float16, row-wise int8 (X's outlier columns, any |x| >= threshold, zeroed first); "
         "int32 product rescaled by absmax_x * absmax_w / 127**2; plus X[:, cols] @ dequant(W)[:, cols].T in float",
    compare=functools.partial(compare_values, rtol=1e-4, atol=1e-4),
)
def check_outlier_split(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, w, threshold) -> y`` (LLM.int8() with the decomposition) against ``Int8Linear`` (= bitsandbytes)."""


def _moment_cases() -> Iterator[Case]:
    from .. import dequantize_blockwise_8bit, quantize_blockwise_8bit

    g = torch.Generator().manual_seed(16)
    for k, (n, beta1) in enumerate([(256, 0.9), (1000, 0.9), (700, 0.5), (2048, 0.99)]):
        m0 = torch.randn(n, generator=g) * 10.0 ** (-k)
        q, absmax = quantize_blockwise_8bit(m0)
        grad = torch.randn(n, generator=g) * 10.0 ** (-k)
        m = dequantize_blockwise_8bit(q, absmax)
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # bitsandbytes' order of operations
        yield Case(args=(q, absmax, grad, beta1), expected=quantize_blockwise_8bit(m),
                   label=f"moment_update(codes of {n} values, beta1={beta1})")


@exercise_check(
    "moment_update",
    cases=_moment_cases,
    idea="dequantize (dequantize_blockwise_8bit), m = beta1 * m + (1 - beta1) * grad in float32, "
         "quantize again (quantize_blockwise_8bit): new codes and new block absmax",
)
def check_moment_update(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(q, absmax, grad, beta1) -> (q_new, absmax_new)``: one 8-bit first-moment update (AdamW8bit)."""
