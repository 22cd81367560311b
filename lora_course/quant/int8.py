"""LLM.int8() from scratch: vector-wise int8 quantization and the outlier decomposition.

LLM.int8() (Dettmers et al., arXiv 2208.07339) stores a linear layer's weight W (out x in) as
int8 with one scale per output row, and at inference quantizes the activations X (tokens x in)
with one scale per token (row)::

    W_q = round(127 * W / absmax_row(W))       X_q = round(127 * X / absmax_row(X))
    Y   = (X_q @ W_q.T)_int32 * absmax(X)[:, None] * absmax(W)[None, :] / 127**2

Large-magnitude "emergent outlier features" live in a few input dimensions (columns of X).
One of them would blow up its token's scale and crush every other value of that row to 0, so
the *mixed-precision decomposition* takes every input column with any ``|x| >= threshold``
out of the int8 product and multiplies it in floating point against the (dequantized) matching
weight columns::

    Y = int8_part(X[:, normal], W[:, normal]) + X[:, outlier] @ dequant(W_q)[:, outlier].T

Everything below reproduces bitsandbytes 0.50 on CPU operation for operation (read in
``bitsandbytes/backends/default/ops.py``: ``int8_vectorwise_quant``, ``int8_mm_dequant``,
``int8_mixed_scaled_mm``; ``bitsandbytes/_ops.py``: ``int8_vectorwise_dequant``;
``bitsandbytes/autograd/_functions.py``: ``MatMul8bitLt``, ``MatMul8bitFp``;
``bitsandbytes/nn/modules.py``: ``Linear8bitLt``, ``Int8Params``). Quirks kept on purpose:

* rounding is ``torch.round``: round half to **even** (2.5 -> 2), not half away from zero;
* the scale is 127 (codes -127..127; -128 is never used);
* the outlier test is ``|x| >= threshold`` (not ``>``); outliers are set to 0 *before* the row
  absmax is taken, and with more than one row the whole outlier column of the int8 activation
  is zeroed (with a single row only the outlier entries themselves are 0);
* the int32 -> float rescale multiplies by the literal ``6.200124e-05``, which is *not*
  1/127**2 = 6.2000124e-05 (a zero is missing): int8 outputs come out 1.8e-5 (relative) too
  large. We keep the same literal so the outputs agree; :data:`INT8_MM_DEQUANT_SCALE`;
* dequantizing a weight for the outlier columns multiplies by ``7.874015718698502e-3``
  (float32(1/127)) after the row scale; the training-mode path instead scales the scale first,
  ``CB * (SCB * (1/127))``. Both orders are kept (they differ in the last bit);
* inputs are cast to float16 before quantization (a warning in bitsandbytes for float32 input);
  the floating-point outlier product runs in the *input's* dtype.

The int8 product itself is exact int32 arithmetic (``torch._int_mm`` on CPUs with AVX-512, which is
what bitsandbytes calls there). Without AVX-512 bitsandbytes falls back to a float32 matmul cast
to int32, which is exact only while partial sums stay below 2**24; we always compute the exact
int32 result (through float64 where ``torch._int_mm`` is unavailable).

This module holds the format and the frozen layer only; putting :class:`Int8Linear` into a model
(``add_int8``) and LoRA on top of it (``Int8LoRALinear``, ``add_int8_lora``) are model-level
and live in :mod:`lora_course.int8_lora`.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_float_input, check_float_tensor

INT8_SCALE = 127.0
#: bitsandbytes' int32 -> float rescale constant (note: 1/127**2 would be 6.2000124e-05)
INT8_MM_DEQUANT_SCALE = 6.200124e-05
#: float32(1/127), the constant of bitsandbytes' ``int8_vectorwise_dequant``
INV_127 = 7.874015718698502e-3


def check_threshold(threshold: object) -> float:
    """``threshold`` must be a number >= 0 (the outlier cut-off); returned as a float."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold >= 0:
        raise ValueError(f"threshold must be a number >= 0 (0 disables the outlier decomposition), "
                         f"got threshold={threshold!r}")
    return float(threshold)


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (int64, sorted) of the columns of 2-D ``x`` holding any ``|x| >= threshold``.

    Empty for ``threshold == 0`` (no decomposition), as bitsandbytes.
    """
    check_threshold(threshold)
    if threshold == 0:
        return torch.empty(0, dtype=torch.long, device=x.device)
    return torch.nonzero((x.abs() >= threshold).any(dim=0)).view(-1)  # (k,)


def quantize_int8_vectorwise(x: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise (vector-wise) absmax int8 quantization: ``(q int8, row_absmax float32)``.

    ``x`` is 2-D (rows x cols), computed in its own dtype (bitsandbytes' ``Linear8bitLt`` casts
    to float16 first; :class:`Int8Linear` does too). ``row_absmax`` is the row's max ``|x|``
    (in ``x``'s dtype, then float32) and ``q = round_half_even(x * (127 / row_absmax))``.
    With ``threshold > 0`` the entries with ``|x| >= threshold`` are zeroed before that, and
    (for more than one row) every column holding one is zeroed in ``q``. An all-zero row gives
    ``0 * inf = nan`` codes, which the cast turns into 0 (as bitsandbytes).
    Equal (``torch.equal``) to ``bitsandbytes.functional.int8_vectorwise_quant(x, threshold)[:2]``.
    """
    check_float_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D (rows x cols), got shape {tuple(x.shape)}")
    q, row_absmax, _ = quantize_with_outliers(x, check_threshold(threshold))
    return q, row_absmax


def quantize_with_outliers(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_int8_vectorwise` without the argument checks, plus the outlier columns
    (:func:`outlier_columns`): ``(q, row_absmax, cols)``. The ``|x| >= threshold`` mask is
    computed once and serves both the columns and the zeroing."""
    cols = torch.empty(0, dtype=torch.long, device=x.device)
    if threshold > 0:
        mask = x.abs() >= threshold  # (rows, cols) the outliers
        cols = torch.nonzero(mask.any(dim=0)).view(-1)  # (k,)
        if cols.numel():
            x = x.masked_fill(mask, 0)  # outliers do not count toward the row max
    row_absmax = x.abs().amax(dim=1).float()  # (rows,) max in x's dtype, then float32
    scaled = x * (INT8_SCALE / row_absmax[:, None])  # (rows, cols) float32
    q = scaled.round_().to(torch.int8)  # half-even, in place
    if x.shape[0] > 1 and cols.numel():
        q[:, cols] = 0  # the outlier columns go through the floating-point matmul instead
    return q, row_absmax, cols


def dequantize_int8_vectorwise(q: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """``q * row_absmax[:, None] * float32(1/127)`` in float32 (bitsandbytes' ``int8_vectorwise_dequant``)."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise ValueError(f"q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    if not isinstance(row_absmax, torch.Tensor) or row_absmax.numel() != q.shape[0]:
        got = tuple(row_absmax.shape) if isinstance(row_absmax, torch.Tensor) else type(row_absmax).__name__
        raise ValueError(f"row_absmax must have one value per row of q ({q.shape[0]}), got {got}")
    return q * row_absmax.float().view(-1, 1) * INV_127  # (rows, cols) float32


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a`` (m x k) and ``b`` (n x k), accumulated in int32."""
    try:
        return torch._int_mm(a, b.t())  # (m, n) int32; what bitsandbytes uses on AVX-512 CPUs
    except (RuntimeError, AttributeError):  # pragma: no cover - depends on the build / CPU
        return (a.double() @ b.double().t()).to(torch.int32)  # exact: |sum| < 2**53


def int8_mm_dequant(acc: torch.Tensor, row_absmax: torch.Tensor, col_absmax: torch.Tensor,
                    bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int32 accumulator -> float: ``acc * (sx[:, None] * sw[None, :]) * 6.200124e-05 (+ bias)``."""
    out = row_absmax.view(-1, 1) * col_absmax.view(1, -1)  # (m, n) float32, then scaled in place:
    if out.shape == acc.shape:
        out.mul_(acc).mul_(INT8_MM_DEQUANT_SCALE)  # acc * scales * 6.200124e-05, each product rounded as above
    else:  # scales broadcast to a larger acc
        out = acc * out * INT8_MM_DEQUANT_SCALE
    if bias is not None:
        out += bias  # in float32, before rounding to dtype (as bitsandbytes)
    return out.to(dtype)


def int8_linear_forward(x2: torch.Tensor, w_q: torch.Tensor, w_absmax: torch.Tensor,
                        bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """LLM.int8() for 2-D ``x2`` (tokens x in): int8 part + floating-point outlier part."""
    x16 = x2.to(torch.float16)  # bitsandbytes quantizes activations from float16
    x_q, x_absmax, cols = quantize_with_outliers(x16, threshold)  # (tokens, in), (tokens,), (k,) outliers
    out = int8_mm_dequant(int8_matmul(x_q, w_q), x_absmax, w_absmax, bias, x2.dtype)  # (tokens, out)
    if cols.numel():
        w_cols = dequantize_int8_vectorwise(w_q[:, cols].contiguous(), w_absmax).to(x2.dtype)  # (out, k)
        out = out.addmm(x2[:, cols], w_cols.t())  # + X[:, outliers] @ W[:, outliers].T in x's dtype
    return out


def dequantize_weight(w_q: torch.Tensor, w_absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight as bitsandbytes' ``MatMul8bitFp`` / backward build it: ``W_q * (absmax * (1/127))``."""
    return w_q.to(dtype).mul_(w_absmax.unsqueeze(1).mul(1.0 / 127.0))  # (out, in)


class _Int8MatMul(torch.autograd.Function):
    """Forward: LLM.int8(); backward: dL/dx = dL/dy @ dequant(W) (bitsandbytes' ``MatMul8bitLt``)."""

    @staticmethod
    def forward(ctx, x2, w_q, w_absmax, bias, threshold):  # type: ignore[override]
        ctx.save_for_backward(w_q, w_absmax)
        ctx.x_dtype = x2.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return int8_linear_forward(x2, w_q, w_absmax, bias, threshold)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        w_q, w_absmax = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.to(ctx.x_dtype) @ dequantize_weight(w_q, w_absmax, ctx.x_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.sum(0, dtype=ctx.bias_dtype)
        return grad_x, None, None, grad_bias, None


class Int8Linear(nn.Module):
    """A frozen linear layer stored as LLM.int8() weights: int8 codes + one float32 scale per row.

    ``Int8Linear(base, threshold=6.0)`` quantizes ``base.weight`` (cast to float16 first, as
    bitsandbytes' ``Int8Params``) row-wise. Attributes: ``weight`` (int8, (out, in), a frozen
    parameter: bitsandbytes' ``CB``), ``weight_absmax`` (float32 (out,) buffer: ``SCB``),
    ``bias`` (frozen, base's dtype), ``threshold``.

    ``forward`` follows bitsandbytes' ``Linear8bitLt(has_fp16_weights=False)`` on CPU:

    * eval mode (and training on other devices): LLM.int8(), :func:`int8_linear_forward`;
    * training mode on CPU: bitsandbytes' ``MatMul8bitFp`` (dequantize, then a floating-point
      ``F.linear``): faster on CPUs, which have no fast int8 quantize kernels.

    The gradient with respect to the input is ``dL/dy @ dequant(W)`` in both modes.
    As bitsandbytes, a call with an input of another floating dtype converts the stored bias to
    that dtype in place (so a float16 call rounds a float32 bias for good). An integer input is
    refused (ValueError) before anything changes (bitsandbytes would return a truncated result).
    """

    def __init__(self, base: nn.Linear, threshold: float = 6.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        self.threshold = check_threshold(threshold)
        self.in_features, self.out_features = base.in_features, base.out_features
        w16 = base.weight.detach().contiguous().to(torch.float16)  # (out, in)
        check_float_tensor("base.weight", w16)
        w_q, w_absmax = quantize_int8_vectorwise(w16)  # no threshold for weights
        self.weight = nn.Parameter(w_q, requires_grad=False)  # (out, in) int8
        self.register_buffer("weight_absmax", w_absmax)  # (out,) float32
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_float_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          threshold: float = 6.0) -> Int8Linear:
        """An Int8Linear quantizing an (out, in) float ``weight`` (used to re-quantize after a merge)."""
        base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        base.weight = nn.Parameter(weight.detach(), requires_grad=False)
        if bias is not None:
            base.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return cls(base, threshold=threshold)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight the codes stand for, ``W_q * (absmax / 127)``."""
        return dequantize_weight(self.weight, self.weight_absmax, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes held by the int8 codes and the row scales (bias not counted)."""
        return self.weight.numel() + 4 * self.weight_absmax.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_input("x", x)  # before the bias below is converted: an int input is refused
        if self.bias is not None and self.bias.dtype != x.dtype:
            # as bitsandbytes' Linear8bitLt: the stored bias is converted in place, once and for all
            self.bias.data = self.bias.data.to(x.dtype)
        bias = self.bias
        if self.training and x.device.type in ("cpu", "xpu"):
            return F.linear(x, self.dequantized_weight(x.dtype), bias)  # bitsandbytes' MatMul8bitFp
        x2 = x.reshape(-1, x.shape[-1])  # (tokens, in)
        out = _Int8MatMul.apply(x2, self.weight, self.weight_absmax, bias, self.threshold)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}")


def int8_layers(model: nn.Module) -> dict[str, Int8Linear]:
    """Every :class:`Int8Linear` in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
