"""QLoRA (Dettmers et al., 2023, arXiv:2305.14314): LoRA on top of a frozen NF4 base weight.

The base weight W (out x in) is stored only as NF4 codes plus their (optionally double-
quantized) block constants, about 4.1-4.5 bits per value. It is dequantized on the fly:

    forward:   y = x @ dequant(W).T + b + (dropout(x) @ A.T @ B.T) * (alpha / r)
    backward:  dL/dx = dL/dy @ dequant(W)         (dequantized a second time)

The dequantized (out x in) matrix lives only inside one call of the autograd Function; it
is never stored on the module nor saved for backward (the Function saves the packed uint8
codes and the small constants). W gets no gradient: only A and B train.

Same numbers as PEFT's LoRA on a bitsandbytes ``Linear4bit`` (``quant_type="nf4"``) on CPU,
which does, per call (bitsandbytes 0.50 ``Linear4bit.forward`` / ``MatMul4Bit``):

* forward: cast x and the bias to ``compute_dtype``; dequantize W *directly* to
  ``compute_dtype`` (float32 arithmetic, rounded once); ``F.linear(x, W_dq, bias)``; cast
  the result back to x's dtype;
* backward: dequantize W to the *stored weight's* dtype, cast to the gradient's dtype,
  ``grad_x = grad_out @ W_dq``;
* PEFT adds ``(lora_B(lora_A(dropout(x))) * scaling).to(result.dtype)`` with the factors
  in float32 (a 4-bit base has no float dtype for them to follow).

Not reproduced: bitsandbytes' CPU inference shortcut (eval mode, input without grad, CPU
with AVX512-BF16), which repacks the weight and computes in bfloat16.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import check_lora_args, draw_factors
from .surgery import (
    ALL_LINEAR,
    adapter_layers,
    check_base_layer,
    check_names_arg,
    conv1d_type,
    freeze_all_but_adapters,
    is_lora_target_type,
    output_head_name,
    plan_adapter_targets,
    raw_weight_layers,
    replace_layers,
)
from .checks import FLOAT_DTYPES, check_blocksize, check_float_input
from .quant.nf4 import BLOCKSIZES_4BIT, NF4Weight, dequantize_nf4, quantize_nf4

__all__ = ["NF4Linear", "Packed4bitParameter", "QLoRALinear", "add_qlora", "check_nf4_base", "qlora_layers",
           "quantize_linear_layers"]


def check_qlora_args(r, alpha, dropout, blocksize, double_quant, compute_dtype) -> tuple[int, float, float]:
    """LoRA's argument checks plus the quantization ones; a ``ValueError`` naming the argument.
    Returns ``(r, alpha, dropout)`` as Python numbers (:func:`~lora_course.lora.check_lora_args`)."""
    r, alpha, dropout = check_lora_args(r, alpha, dropout, "kaiming")
    check_nf4_args(blocksize, double_quant, compute_dtype)
    return r, alpha, dropout


def check_nf4_args(blocksize, double_quant, compute_dtype) -> None:
    """The quantization arguments of :class:`NF4Linear`; a ``ValueError`` naming the argument."""
    check_blocksize(blocksize, BLOCKSIZES_4BIT)
    if not isinstance(double_quant, bool):
        raise ValueError(f"double_quant must be True or False, got double_quant={double_quant!r}")
    if compute_dtype not in FLOAT_DTYPES:
        allowed = ", ".join(map(str, FLOAT_DTYPES))
        raise ValueError(f"compute_dtype={compute_dtype!r} is not allowed; allowed values: {allowed}")


def check_nf4_base(base: nn.Module) -> None:
    """The layer :class:`NF4Linear` quantizes: an ``nn.Linear`` / ``Conv1D`` with a float weight."""
    check_base_layer(base)
    if base.weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"base weight must be float32/float16/bfloat16, got {base.weight.dtype}")


class Packed4bitParameter(nn.Parameter):
    """Frozen uint8 parameter holding two 4-bit codes per byte.

    ``numel()`` reports the 4-bit values it holds (2 per byte), which is how PEFT's
    ``get_nb_trainable_parameters`` counts a bitsandbytes ``Params4bit``; so
    :func:`lora_course.count_parameters` gives PEFT's totals for a QLoRA model.
    ``.detach()`` / ``.data`` are plain uint8 tensors (``numel()`` = bytes).
    """

    def numel(self) -> int:  # type: ignore[override]
        return 2 * super().numel()


class _NF4Linear(torch.autograd.Function):
    """``y = x @ dequant(W).T + bias`` with W in NF4; W is dequantized in forward and again in
    backward, and only the packed codes and constants are saved (never the (out, in) matrix)."""

    @staticmethod
    def forward(ctx, x, bias, meta, *qtensors):
        shape, dtype, blocksize = meta
        nf4 = _nf4_from(qtensors, shape, dtype, blocksize)
        # bitsandbytes' gemm_4bit: dequantize straight to the compute dtype, one F.linear
        w = dequantize_nf4(nf4.packed, nf4.block_absmax(), shape, blocksize, x.dtype)  # (out, in)
        out = F.linear(x, w, bias)  # (..., out)
        ctx.meta = meta
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(*qtensors)  # uint8 codes + small float32 constants
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        saved = ctx.saved_tensors  # read once: non-reentrant checkpointing allows one unpack
        if ctx.needs_input_grad[0]:
            shape, dtype, blocksize = ctx.meta
            nf4 = _nf4_from(saved, shape, dtype, blocksize)
            w = nf4.dequantize().to(grad_out.dtype)  # (out, in), in the stored dtype first, as bnb
            grad_x = torch.matmul(grad_out, w)  # (..., in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (out,)
        return grad_x, grad_bias, None, *([None] * len(saved))


def _nf4_from(qtensors, shape, dtype, blocksize) -> NF4Weight:
    """Rebuild the NF4Weight from (packed, absmax) or (packed, qabsmax, absmax2, offset)."""
    if len(qtensors) == 2:
        packed, absmax = qtensors
        return NF4Weight(packed=packed, absmax=absmax, shape=shape, dtype=dtype, blocksize=blocksize)
    packed, qabsmax, absmax2, offset = qtensors
    return NF4Weight(packed=packed, absmax=None, shape=shape, dtype=dtype, blocksize=blocksize,
                     qabsmax=qabsmax, absmax2=absmax2, offset=offset)


def nf4_linear(x: torch.Tensor, nf4: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ dequant(nf4).T + bias`` through QLoRA's autograd function: the weight is
    dequantized in the forward and again in the backward, and only its packed codes and
    constants are kept for the backward."""
    q = (nf4.packed, nf4.absmax) if not nf4.double_quant else (nf4.packed, nf4.qabsmax, nf4.absmax2, nf4.offset)
    return _NF4Linear.apply(x, bias, (nf4.shape, nf4.dtype, nf4.blocksize), *q)


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) whose weight is kept only in NF4.

    ``forward(x) = x @ dequant(W).T + bias`` in ``compute_dtype``, W dequantized on the fly
    (bitsandbytes' ``Linear4bit`` without an adapter, what ``BitsAndBytesConfig(load_in_4bit=
    True)`` puts in place of every linear layer). Stored: ``packed`` (a frozen
    :class:`Packed4bitParameter`, uint8, ``(out*in+1)//2``), buffers ``absmax`` or
    ``qabsmax``/``absmax2``/``offset``, ``bias`` (frozen, or None). No floating (out x in)
    tensor is kept; ``nf4`` rebuilds the :class:`~lora_course.NF4Weight` view.
    """

    def __init__(
        self,
        base: nn.Module,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_nf4_args(blocksize, double_quant, compute_dtype)
        check_nf4_base(base)
        weight = base.weight.detach()
        if isinstance(base, conv1d_type()):
            weight = weight.T.contiguous()  # Conv1D stores (in, out); quantize the (out, in) layout
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.double_quant, self.compute_dtype = blocksize, double_quant, compute_dtype
        self.weight_shape, self.weight_dtype = torch.Size(weight.shape), weight.dtype
        nf4 = quantize_nf4(weight, blocksize=blocksize, double_quant=double_quant)
        del weight  # nothing of the full-precision weight stays on the module
        self.packed = Packed4bitParameter(nf4.packed, requires_grad=False)
        for name in self._constant_names():
            self.register_buffer(name, getattr(nf4, name))
        bias = getattr(base, "bias", None)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _constant_names(self) -> tuple[str, ...]:
        return ("qabsmax", "absmax2", "offset") if self.double_quant else ("absmax",)

    def _qtensors(self) -> tuple[torch.Tensor, ...]:
        return (self.packed.detach(), *(getattr(self, n) for n in self._constant_names()))

    @property
    def nf4(self) -> NF4Weight:
        """The quantized base weight as an :class:`~lora_course.NF4Weight` (shares storage)."""
        return _nf4_from(self._qtensors(), self.weight_shape, self.weight_dtype, self.blocksize)

    def dequantized_weight(self) -> torch.Tensor:
        """dequant(W), (out x in) in the original weight dtype (a fresh tensor, not stored)."""
        return self.nf4.dequantize()

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dequant(W).T + bias`` in ``compute_dtype``, returned in x's dtype (bitsandbytes).
        An integer ``x`` is refused (ValueError): the result would be truncated to integers."""
        check_float_input("x", x)
        meta = (self.weight_shape, self.weight_dtype, self.blocksize)
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        result = _NF4Linear.apply(x.to(self.compute_dtype), bias, meta, *self._qtensors())
        return result.to(x.dtype)  # (..., out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


class QLoRALinear(NF4Linear):
    """A frozen NF4-quantized ``nn.Linear`` (or GPT-2 ``Conv1D``) plus trainable LoRA factors.

    ``forward(x) = x @ dequant(W).T + bias + (dropout(x) @ A.T @ B.T) * scaling``.

    Args:
        base: the layer to quantize; its weight is quantized once and then dropped (a
            ``Conv1D``'s (in, out) weight is transposed to (out, in) first). The bias is
            kept, frozen, in its dtype.
        r, alpha, dropout: as :class:`~lora_course.LoRALinear` (``scaling = alpha / r``).
        blocksize: NF4 block size (64 as QLoRA / bitsandbytes' default).
        double_quant: quantize the block constants too (bitsandbytes' ``compress_statistics``).
        compute_dtype: dtype of the base matmul (bitsandbytes' ``bnb_4bit_compute_dtype``).

    Stored: what :class:`NF4Linear` stores, plus ``lora_A`` (r x in) and ``lora_B`` (out x r)
    in float32 (A kaiming-uniform, B zeros, drawn as PEFT draws them). No floating (out x in)
    tensor is kept.
    """

    adapter_parameter_names: tuple[str, ...] = ("lora_A", "lora_B")  # what trains

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        r, alpha, dropout = check_qlora_args(r, alpha, dropout, blocksize, double_quant, compute_dtype)
        super().__init__(base, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()  # PEFT: Identity at 0
        device = self.packed.device
        A, B = draw_factors(r, self.in_features, self.out_features)  # as LoRALinear, as PEFT
        self.lora_A = nn.Parameter(A.to(device))  # (r, in), float32
        self.lora_B = nn.Parameter(B.to(device))  # (out, r), float32

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * B @ A, (out x in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merged_module(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``dequant(W) + scaling * B @ A`` (in the original weight
        dtype) and the bias: what :func:`~lora_course.merge_lora` puts in our place."""
        w = self.dequantized_weight()  # (out, in)
        w = w + self.delta_weight().to(w.dtype)
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=w.device, dtype=w.dtype)
        layer.weight.copy_(w)
        if self.bias is not None:
            layer.bias.copy_(self.bias)
        return layer.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)  # (..., out) in x's dtype, as bitsandbytes returns it
        xa = x.to(self.lora_A.dtype)
        h = F.linear(self.dropout(xa), self.lora_A)  # x @ A.T: (..., r)
        delta = F.linear(h, self.lora_B) * self.scaling  # h @ B.T: (..., out)
        return result + delta.to(result.dtype)  # PEFT casts the branch, then adds

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, blocksize={self.blocksize}, "
            f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )


def qlora_layers(model: nn.Module) -> dict[str, QLoRALinear]:
    """Every :class:`QLoRALinear` in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def add_qlora(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Replace the target layers of ``model`` by :class:`QLoRALinear`, in place; returns ``model``.

    Name matching as :func:`~lora_course.add_lora` (PEFT's rules; ``"all-linear"`` leaves out
    the output head). Layers are wrapped in ``named_modules`` order, so one seed gives PEFT's
    A factors. Everything is frozen except the LoRA factors and the ``modules_to_save``
    (trained whole, in their dtype, as :func:`~lora_course.add_lora`). Note: unlike
    ``BitsAndBytesConfig`` loading, only the targeted layers are quantized (the output head and
    embeddings stay as they are).

    :func:`~lora_course.count_parameters` then returns PEFT's ``get_nb_trainable_parameters()``
    numbers: the total counts each quantized weight as its out*in 4-bit values (rounded up
    to even, as PEFT counts bitsandbytes' packed bytes x 2) plus the other parameters.

    Raises:
        ValueError: bad argument, no matching layer (the message lists the linear layers), a
            matched layer that is not Linear/Conv1D, or a model that already has adapters.
    """
    r, alpha, dropout = check_qlora_args(r, alpha, dropout, blocksize, double_quant, compute_dtype)
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "QLoRA")
    replace_layers(  # named_modules order: PEFT's order of random draws
        model, names,
        build=lambda name, base: QLoRALinear(base, r=r, alpha=alpha, dropout=dropout, blocksize=blocksize,
                                             double_quant=double_quant, compute_dtype=compute_dtype),
        check=lambda name, base: check_nf4_base(base))
    # the modules_to_save are counted as PEFT counts its trained copy (see count_parameters)
    return freeze_all_but_adapters(model, save_names)


def quantize_linear_layers(
    model: nn.Module,
    skip_modules: Sequence[str] = (),
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Replace every remaining ``nn.Linear`` / ``Conv1D`` of ``model`` by a frozen :class:`NF4Linear`,
    in place; returns ``model``. What ``BitsAndBytesConfig(load_in_4bit=True)`` does when it
    loads a model: the output head (``lm_head``, found as in ``"all-linear"``) and every module
    named (or ending with a name) in ``skip_modules`` (e.g. ``["classifier"]``) stay as they are.
    Call it after :func:`add_qlora` to quantize the layers without adapter as well.

    Raises:
        ValueError: a bad quantization argument or a ``skip_modules`` name that matches nothing.
    """
    check_nf4_args(blocksize, double_quant, compute_dtype)
    if isinstance(skip_modules, str):
        skip_modules = [skip_modules]
    check_names_arg(skip_modules, "skip_modules", allow_str=False)
    names = [n for n, _ in model.named_modules()]
    for skip in skip_modules:
        if not any(n == skip or n.endswith("." + skip) for n in names):
            raise ValueError(f"skip_modules entry {skip!r} matches no module of the model")
    head = output_head_name(model)
    inside_adapters = [a + "." for a in adapter_layers(model)]  # e.g. a LoRALinear's base layer
    raw = set(raw_weight_layers(model))  # nn.MultiheadAttention reads its out_proj's weight directly
    skipped = lambda n: (n == head or any(n == s or n.endswith("." + s) for s in skip_modules)  # noqa: E731
                         or any(n.startswith(a) for a in inside_adapters) or n in raw)
    targets = [n for n, m in model.named_modules()
               if n and is_lora_target_type(m) and not isinstance(m, NF4Linear) and not skipped(n)]
    replace_layers(model, targets,
                   build=lambda name, base: NF4Linear(base, blocksize=blocksize, double_quant=double_quant,
                                                      compute_dtype=compute_dtype).requires_grad_(False),
                   check=lambda name, base: check_nf4_base(base))
    return model
