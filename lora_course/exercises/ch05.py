"""Chapter 05, QLoRA: the checks that notebooks/05_qlora.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check, seeded_tensors


def _qlora_layers_for_checks() -> Iterator[tuple[Any, str]]:
    from .. import QLoRALinear

    for seed, (out_f, in_f, r, dq, bias) in enumerate([(24, 64, 4, True, True), (40, 128, 8, False, False),
                                                        (16, 192, 2, True, False)]):
        torch.manual_seed(seed)
        layer = QLoRALinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=2.0 * r, double_quant=dq)
        with torch.no_grad():
            layer.lora_B.normal_()  # B = 0 would hide the branch
        yield layer, f"({out_f} x {in_f}, r={r}, double_quant={dq}, bias={bias})"


def _qlora_forward_cases() -> Iterator[Case]:
    for seed, (layer, desc) in enumerate(_qlora_layers_for_checks()):
        (x,) = seeded_tensors(10 + seed, (3, layer.in_features))
        with torch.no_grad():
            expected = layer(x)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        yield Case(args=(x, layer.nf4, bias, layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling),
                   expected=expected, label=f"qlora_forward on a layer {desc}",
                   hint="remember the bias when there is one" if bias is not None else None)


@exercise_check(
    "qlora_forward",
    cases=_qlora_forward_cases,
    idea="dequantize W (nf4.dequantize()), then x @ W.T + bias + (x @ A.T @ B.T) * scaling",
)
def check_qlora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, nf4, bias, lora_A, lora_B, scaling)`` against ``QLoRALinear.forward``."""


def _nf4_input_grad_cases() -> Iterator[Case]:
    for seed, (layer, desc) in enumerate(_qlora_layers_for_checks()):
        x, grad_out = seeded_tensors(20 + seed, (2, 5, layer.in_features), (2, 5, layer.out_features))
        x.requires_grad_(True)
        layer.base_forward(x).backward(grad_out)  # our autograd Function's backward
        yield Case(args=(grad_out, layer.nf4), expected=x.grad.clone(), label=f"nf4_input_grad on a layer {desc}")


@exercise_check(
    "nf4_input_grad",
    cases=_nf4_input_grad_cases,
    idea="y = x @ W.T gives dL/dx = dL/dy @ W: dequantize W again (nothing was saved) and multiply",
)
def check_nf4_input_grad(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(grad_out, nf4) -> grad_x`` against the backward of ``QLoRALinear``'s NF4 matmul."""


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
    idea="(out*in+1)//2 packed bytes, the block constants (4 per block, or 1 per block + 4 per 256 blocks + 4), "
         "and r*(in+out) float32 LoRA values",
)
def check_qlora_layer_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(out_features, in_features, r, blocksize=64, double_quant=True) -> bytes`` against a real QLoRALinear."""
