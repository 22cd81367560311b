"""Chapter 14, int8 and 8-bit optimizers: the checks that notebooks/14_int8_and_8bit_optimizers.ipynb calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check


def _int8_vectorwise_cases() -> Iterator[Case]:
    import bitsandbytes.functional as BF

    g = torch.Generator().manual_seed(14)
    shapes = [(1, 8), (4, 16), (7, 33), (16, 64)]
    for k, shape in enumerate(shapes):
        x = (torch.randn(shape, generator=g) * (1 + 3 * k)).half()
        if k == 2:
            x[0, :4] = torch.tensor([127.0, 2.5, -2.5, 0.5]).half()  # ties: round half to even
        q, absmax, _ = BF.int8_vectorwise_quant(x.clone(), 0.0)  # bitsandbytes' CPU path, threshold 0
        yield Case(args=(x,), expected=(q, absmax),
                   label=f"int8_vectorwise(x of shape {shape}, float16)",
                   hint="this row holds ties (2.5, -2.5, 0.5 steps): torch.round rounds half to even, "
                        "not away from zero" if k == 2 else None)


@exercise_check(
    "int8_vectorwise",
    cases=_int8_vectorwise_cases,
    idea="one scale per row, from the row's largest magnitude, so that it maps to code 127; "
         "round the way torch.round does (half to even)",
    formula="absmax = x.abs().amax(dim=1).float(); q = torch.round(x * (127 / absmax[:, None])).to(torch.int8); "
            "return q, absmax",
)
def check_int8_vectorwise(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(x) -> (q int8, row_absmax float32)`` against bitsandbytes' ``int8_vectorwise_quant``."""


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
    idea="split the input columns: the outlier ones (any |x| >= threshold) go through a float matmul with the "
         "dequantized weight columns, the rest through row-wise int8 on both sides, rescaled back",
    formula="W and X to float16; wq, ws = quantize_int8_vectorwise(w16); xq, xs = quantize_int8_vectorwise(x16, "
            "threshold) (outlier columns zeroed); y = (xq.int() @ wq.int().T) * xs[:, None] * ws[None, :] / 127**2 "
            "+ x[:, cols] @ dequantize_int8_vectorwise(wq[:, cols], ws).T",
    compare=functools.partial(compare_values, rtol=1e-4, atol=1e-4),
)
def check_outlier_split(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, w, threshold) -> y`` (LLM.int8() with the decomposition) against ``Int8Linear`` (= bitsandbytes)."""


def reference_moment_update(q: torch.Tensor, absmax: torch.Tensor, grad: torch.Tensor,
                            beta1: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 8-bit first-moment update as in bitsandbytes' CPU AdamW8bit: ``(m float32, new codes, new absmax)``."""
    from .. import dequantize_blockwise_8bit, quantize_blockwise_8bit

    m = dequantize_blockwise_8bit(q, absmax)
    m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # bitsandbytes' order of operations
    return (m, *quantize_blockwise_8bit(m))


def _bnb_moment_codes(q: torch.Tensor, absmax: torch.Tensor, grad: torch.Tensor,
                      beta1: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The first moment's codes and absmax after one step of bitsandbytes' AdamW8bit started from ``(q, absmax)``."""
    import warnings

    import bitsandbytes as bnb

    p = nn.Parameter(torch.zeros(grad.numel()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = bnb.optim.AdamW8bit([p], betas=(beta1, 0.999), min_8bit_size=1)  # 8-bit states at any size
        p.grad = torch.zeros_like(p)
        opt.step()  # creates the state; then put our moment in it
        state = opt.state[p]
        state["state1"].copy_(q)
        state["absmax1"].copy_(absmax)
        p.grad = grad.clone()
        opt.step()
    return state["state1"].clone(), state["absmax1"].clone()


def _moment_cases() -> Iterator[Case]:
    from .. import quantize_blockwise_8bit

    g = torch.Generator().manual_seed(16)
    for k, (n, beta1) in enumerate([(256, 0.9), (1000, 0.9), (700, 0.5), (2048, 0.99)]):
        m0 = torch.randn(n, generator=g) * 10.0 ** (-k)
        q, absmax = quantize_blockwise_8bit(m0)
        grad = torch.randn(n, generator=g) * 10.0 ** (-k)
        m = reference_moment_update(q, absmax, grad, beta1)[0]
        yield Case(args=(q, absmax, grad, beta1), expected=(m, *_bnb_moment_codes(q, absmax, grad, beta1)),
                   label=f"moment_update(codes of {n} values, beta1={beta1})")


@exercise_check(
    "moment_update",
    cases=_moment_cases,
    idea="dequantize to a float32 m, update it in place in bitsandbytes' order (scale m, then one add of the "
         "weighted gradient), quantize again; another order of float operations changes m's last bits",
    formula="m = dequantize_blockwise_8bit(q, absmax); m.mul_(beta1).add_(grad, alpha=1 - beta1); "
            "return (m, *quantize_blockwise_8bit(m))",
    compare=functools.partial(compare_values, rtol=0.0, atol=0.0),
)
def check_moment_update(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(q, absmax, grad, beta1) -> (m, q_new, absmax_new)`` bit for bit: m against bitsandbytes'
    order of operations, the codes and absmax against one step of bitsandbytes' ``AdamW8bit``."""
