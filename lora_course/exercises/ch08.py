"""Chapter 08, DoRA: the checks that notebooks/08_dora.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check, seeded_tensors


def _dora_layers_for_checks() -> Iterator[tuple[Any, str]]:
    from .. import DoRALinear

    for seed, (out_f, in_f, r, bias) in enumerate([(12, 20, 4, True), (24, 16, 2, False), (8, 40, 8, True)]):
        torch.manual_seed(seed)
        layer = DoRALinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=2.0 * r).eval()
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():  # B = 0 and m = ||W|| would hide every DoRA term
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.magnitude.mul_(0.5 + torch.rand(layer.magnitude.shape, generator=g))
        yield layer, f"({out_f} x {in_f}, r={r}, bias={bias})"


def _dora_parts(layer: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude))


def _dora_magnitude_init_cases() -> Iterator[Case]:
    for layer, desc in _dora_layers_for_checks():
        W, A, B, _ = _dora_parts(layer)
        yield Case(args=(W, A, B, layer.scaling), expected=layer.weight_norm(),
                   label=f"dora_magnitude_init on a layer {desc}",
                   hint="one norm per output row: torch.linalg.norm(W + scaling * B @ A, dim=1), shape (out,)")


@exercise_check(
    "dora_magnitude_init",
    cases=_dora_magnitude_init_cases,
    idea="m starts as the row norms (one per output feature) of the direction W + scaling * B @ A",
)
def check_dora_magnitude_init(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, scaling) -> magnitude`` against ``DoRALinear``'s norm."""


def _dora_forward_cases() -> Iterator[Case]:
    for seed, (layer, desc) in enumerate(_dora_layers_for_checks()):
        (x,) = seeded_tensors(30 + seed, (3, 5, layer.in_features))
        W, A, B, m = _dora_parts(layer)
        bias = None if layer.base.bias is None else layer.base.bias.detach().clone()
        with torch.no_grad():
            expected = layer(x)
        yield Case(args=(x, W, bias, A, B, m, layer.scaling), expected=expected,
                   label=f"dora_forward on a layer {desc}",
                   hint="the bias is added once, after the rescaled weight" if bias is not None else None)


@exercise_check(
    "dora_forward",
    cases=_dora_forward_cases,
    idea="V = W + scaling * B @ A; W' = magnitude[:, None] * V / ||V|| (row norms, detached); "
         "return x @ W'.T + bias",
)
def check_dora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, weight, bias, lora_A, lora_B, magnitude, scaling)`` against ``DoRALinear.forward``."""


def _dora_merge_cases() -> Iterator[Case]:
    import copy

    for layer, desc in _dora_layers_for_checks():
        W, A, B, m = _dora_parts(layer)
        expected = copy.deepcopy(layer).merged_module().weight.detach()
        yield Case(args=(W, A, B, m, layer.scaling), expected=expected, label=f"dora_merge on a layer {desc}")


@exercise_check(
    "dora_merge",
    cases=_dora_merge_cases,
    idea="merged weight = (magnitude / ||W + dW||)[:, None] * (W + dW) with dW = scaling * B @ A, "
         "norms per output row",
)
def check_dora_merge(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, magnitude, scaling) -> merged weight`` against ``DoRALinear.merge``."""
