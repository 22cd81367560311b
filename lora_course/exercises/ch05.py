"""Chapter 05, QLoRA: the checks that notebooks/05_qlora.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check, seeded_tensors


def _bnb_linear4bit(base: nn.Linear, double_quant: bool) -> nn.Module:
    """A bitsandbytes ``Linear4bit`` (nf4, blocksize 64, float32 compute) holding ``base``'s weight and bias."""
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                            compute_dtype=torch.float32, quant_type="nf4", compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(base.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                   blocksize=64, compress_statistics=double_quant)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
    return lin.to("cpu")  # .to() quantizes


def _bnb_peft_cases() -> Iterator[tuple[Any, nn.Module, nn.Module, str]]:
    """Our QLoRALinear with a trained-looking B, and PEFT LoRA on bitsandbytes' Linear4bit with the same
    base weight, bias and factors."""
    import warnings

    import peft

    from .. import QLoRALinear

    for seed, (out_f, in_f, r, dq, bias) in enumerate([(24, 64, 4, True, True), (40, 128, 8, False, False),
                                                        (16, 192, 2, True, False)]):
        torch.manual_seed(seed)
        base = nn.Linear(in_f, out_f, bias=bias)
        layer = QLoRALinear(base, r=r, alpha=2.0 * r, double_quant=dq)
        with torch.no_grad():
            layer.lora_B.normal_()  # B = 0 would hide the branch
        lin = _bnb_linear4bit(base, dq)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(nn.Sequential(lin), peft.LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=["0"]))
        twin = model.base_model.model[0]
        with torch.no_grad():
            twin.lora_A["default"].weight.copy_(layer.lora_A)
            twin.lora_B["default"].weight.copy_(layer.lora_B)
        yield layer, model, lin, f"({out_f} x {in_f}, r={r}, double_quant={dq}, bias={bias})"


def _qlora_forward_cases() -> Iterator[Case]:
    for seed, (layer, model, _, desc) in enumerate(_bnb_peft_cases()):
        (x,) = seeded_tensors(10 + seed, (3, layer.in_features))
        with torch.no_grad():
            expected = model(x)  # PEFT LoRA on bitsandbytes' Linear4bit
        bias = None if layer.bias is None else layer.bias.detach().clone()
        yield Case(args=(x, layer.nf4, bias, layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling),
                   expected=expected, label=f"qlora_forward on a layer {desc}")


@exercise_check(
    "qlora_forward",
    cases=_qlora_forward_cases,
    idea="two paths added together: the frozen base with its weight brought back from 4 bits (the NF4Weight can "
         "do that), and the low-rank branch scaled as in notebook 01",
    formula="W = nf4.dequantize().to(x.dtype); y = x @ W.T + (x @ lora_A.T @ lora_B.T) * scaling (+ bias if not None)",
)
def check_qlora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, nf4, bias, lora_A, lora_B, scaling)`` against PEFT LoRA on bitsandbytes' ``Linear4bit``."""


def _nf4_input_grad_cases() -> Iterator[Case]:
    for seed, (layer, _, lin, desc) in enumerate(_bnb_peft_cases()):
        x, grad_out = seeded_tensors(20 + seed, (2, 5, layer.in_features), (2, 5, layer.out_features))
        x.requires_grad_(True)
        lin(x).backward(grad_out)  # bitsandbytes' MatMul4Bit backward: dL/dx through the frozen NF4 weight
        yield Case(args=(grad_out, layer.nf4), expected=x.grad.clone(), label=f"nf4_input_grad on a layer {desc}")


@exercise_check(
    "nf4_input_grad",
    cases=_nf4_input_grad_cases,
    idea="nothing of W was saved in float: bring it back from 4 bits again, then apply the chain rule of a matmul "
         "(check the shapes: the result has x's shape)",
    formula="dL/dx = grad_out @ nf4.dequantize().to(grad_out.dtype)",
)
def check_nf4_input_grad(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(grad_out, nf4) -> grad_x`` against the input gradient of bitsandbytes' ``Linear4bit``."""


def _qlora_layer_bytes_cases() -> Iterator[Case]:
    from .. import QLoRALinear
    from ..memory import storage_bytes

    for out_f, in_f, r, blocksize, dq in [(64, 64, 8, 64, True), (1024, 1024, 16, 64, True),
                                          (1000, 300, 4, 64, False), (512, 1408, 8, 128, True)]:
        base = nn.Linear(in_f, out_f, bias=False)
        layer = QLoRALinear(base, r=r, blocksize=blocksize, double_quant=dq)
        expected = storage_bytes([*layer.parameters(), *layer.buffers()])
        yield Case(args=(out_f, in_f, r), kwargs=dict(blocksize=blocksize, double_quant=dq), expected=expected,
                   label=f"qlora_layer_bytes({out_f}, {in_f}, {r}, blocksize={blocksize}, double_quant={dq})")


@exercise_check(
    "qlora_layer_bytes",
    cases=_qlora_layer_bytes_cases,
    idea="add up what the layer keeps: the packed codes, the constants of notebook 04 (they depend on "
         "double_quant), and the two LoRA factors in float32",
    formula="(out*in + 1)//2 + (4 * blocks, or blocks + 4 * ceil(blocks / 256) + 4 with double quantization) "
            "+ 4 * r * (in + out), blocks = ceil(out*in / blocksize)",
)
def check_qlora_layer_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(out_features, in_features, r, blocksize=64, double_quant=True) -> bytes`` against a real QLoRALinear."""


# ---------------------------------------------------------------- notebook 05's fallbacks (the library)


def _nf4_matmul(x: torch.Tensor, nf4: Any, bias: torch.Tensor | None) -> torch.Tensor:
    """The library's NF4 autograd Function (dequantize in forward and again in backward) on ``x``."""
    from ..qlora import nf4_linear

    return nf4_linear(x, nf4, bias)


def reference_qlora_forward(x, nf4, bias, lora_A, lora_B, scaling):
    """The library's QLoRA forward (``QLoRALinear``'s order of operations): notebook 05's fallback."""
    branch = torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B) * scaling
    return _nf4_matmul(x, nf4, bias) + branch.to(x.dtype)


def reference_nf4_input_grad(grad_out, nf4):
    """dL/dx from the library's NF4 autograd Function: notebook 05's fallback for ``nf4_input_grad``."""
    x = torch.zeros(*grad_out.shape[:-1], nf4.shape[1], dtype=grad_out.dtype, requires_grad=True)
    with torch.enable_grad():
        _nf4_matmul(x, nf4, None).backward(grad_out)
    return x.grad


def reference_qlora_layer_bytes(out_features, in_features, r, blocksize=64, double_quant=True):
    """Bytes a real ``QLoRALinear`` (no bias) stores, counted with ``memory.storage_bytes``: notebook 05's fallback."""
    from .. import QLoRALinear
    from ..memory import storage_bytes

    with torch.random.fork_rng(devices=[]):
        layer = QLoRALinear(nn.Linear(in_features, out_features, bias=False), r=r,
                            blocksize=blocksize, double_quant=double_quant)
    return storage_bytes([*layer.parameters(), *layer.buffers()])
