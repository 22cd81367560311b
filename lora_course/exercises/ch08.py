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


def _peft_dora_layer(out_f: int, in_f: int, r: int, bias: bool, seed: int, init_lora_weights: bool = True):
    """PEFT's DoRA layer (``LoraConfig(use_dora=True)``) around a seeded ``nn.Linear``, in eval mode."""
    import warnings

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(nn.Sequential(nn.Linear(in_f, out_f, bias=bias)),
                               LoraConfig(target_modules=["0"], r=r, lora_alpha=2.0 * r, use_dora=True,
                                          init_lora_weights=init_lora_weights))
    return model.base_model.model[0].eval()


def _peft_parts(layer: Any) -> tuple[torch.Tensor, ...]:
    """(W, A, B, m) of a PEFT DoRA layer, as plain tensors."""
    return tuple(t.detach().clone() for t in (layer.get_base_layer().weight, layer.lora_A["default"].weight,
                                              layer.lora_B["default"].weight,
                                              layer.lora_magnitude_vector["default"].weight))


def _dora_magnitude_init_cases() -> Iterator[Case]:
    for layer, desc in _dora_layers_for_checks():
        W, A, B, _ = _dora_parts(layer)
        yield Case(args=(W, A, B, layer.scaling), expected=layer.weight_norm(),
                   label=f"dora_magnitude_init on a layer {desc}")
    # PEFT with init_lora_weights=False draws B != 0 at creation and sets m from W + s B A
    peft_layer = _peft_dora_layer(10, 14, 3, True, seed=7, init_lora_weights=False)
    W, A, B, m = _peft_parts(peft_layer)
    yield Case(args=(W, A, B, peft_layer.scaling["default"]), expected=m,
               label="dora_magnitude_init vs PEFT's lora_magnitude_vector at creation (10 x 14, r=3, B != 0)",
               hint="the norm is of the direction W + scaling * B @ A, not of W alone")


@exercise_check(
    "dora_magnitude_init",
    cases=_dora_magnitude_init_cases,
    idea="m starts as the length of each output feature's row of the direction W + scaling * B @ A",
    formula="torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1), shape (out,)",
)
def check_dora_magnitude_init(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, scaling) -> magnitude`` against ``DoRALinear``'s norm."""


def _forward_and_grads(run: Callable[..., torch.Tensor], x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(output, dL/dA, dL/dB, dL/dm) of ``run(A, B, m)`` for L = mean(output^2), A, B, m fresh leaves."""
    A, B, m = (t.detach().clone().requires_grad_(True) for t in (A, B, m))
    y = run(A, B, m)
    y.square().mean().backward()
    return y.detach(), A.grad, B.grad, m.grad


def _module_forward_and_grads(layer: nn.Module, params: tuple[torch.nn.Parameter, ...], x: torch.Tensor):
    """The same for a module whose (A, B, m) are ``params``."""
    for p in params:
        p.grad = None
    y = layer(x)
    y.square().mean().backward()
    return (y.detach(),) + tuple(p.grad.detach().clone() for p in params)


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
    # PEFT's use_dora=True on trained-looking values: output, then the gradients (the norm detached)
    peft_layer = _peft_dora_layer(12, 20, 4, True, seed=11)
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.copy_(torch.randn(12, 4, generator=g) * 0.3)
        peft_layer.lora_magnitude_vector["default"].weight.mul_(0.5 + torch.rand(12, generator=g))
    W, A, B, m = _peft_parts(peft_layer)
    bias = peft_layer.get_base_layer().bias.detach().clone()
    s = peft_layer.scaling["default"]
    (x,) = seeded_tensors(40, (4, 20))
    params = (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight,
              peft_layer.lora_magnitude_vector["default"].weight)
    expected = _module_forward_and_grads(peft_layer, params, x)
    yield Case(args=(x, W, bias, A, B, m, s), expected=expected[0],
               label="dora_forward vs PEFT's LoraConfig(use_dora=True) layer (12 x 20, r=4): output")
    yield Case(expected=expected[1:],
               apply=lambda fn: _forward_and_grads(lambda a, b, mm: fn(x, W, bias, a, b, mm, s), x, A, B, m)[1:],
               label="dora_forward vs PEFT (12 x 20, r=4): gradients (A, B, m) of mean(y^2)",
               hint="the paper (section 4.3) and PEFT treat the norm as a constant in backward: no gradient through it")


@exercise_check(
    "dora_forward",
    cases=_dora_forward_cases,
    idea="rescale the moved direction row by row so each output row has length magnitude; the norm gets no gradient",
    formula="V = W + scaling * B @ A; W' = magnitude[:, None] * V / ||V|| (row norms, .detach()); "
            "return x @ W'.T + bias",
)
def check_dora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, weight, bias, lora_A, lora_B, magnitude, scaling)`` against ``DoRALinear.forward`` and
    PEFT's ``use_dora=True`` layer (outputs, and the gradients of A, B and m)."""


def reference_dora_magnitude_init(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                                  scaling: float) -> torch.Tensor:
    """``DoRALinear.weight_norm()`` of a layer holding these tensors (notebook 08's fallback)."""
    return _library_layer(weight, None, lora_A, lora_B, None, scaling).weight_norm()


def reference_dora_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                           lora_B: torch.Tensor, magnitude: torch.Tensor, scaling: float) -> torch.Tensor:
    """``DoRALinear.forward`` run on these tensors (``torch.func.functional_call``: gradients reach them);
    notebook 08's fallback."""
    layer = _library_layer(weight, bias, lora_A, lora_B, magnitude, scaling).eval()
    tensors = {"base.weight": weight, "lora_A": lora_A, "lora_B": lora_B, "magnitude": magnitude}
    if bias is not None:
        tensors["base.bias"] = bias
    return torch.func.functional_call(layer, tensors, (x,))


def _library_layer(weight, bias, lora_A, lora_B, magnitude, scaling) -> Any:
    from .. import DoRALinear

    out_f, in_f = weight.shape
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        base = nn.Linear(in_f, out_f, bias=bias is not None)
        layer = DoRALinear(base, r=lora_A.shape[0], alpha=1.0)
        layer.scaling = scaling
        base.weight.copy_(weight)
        if bias is not None:
            base.bias.copy_(bias)
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
        if magnitude is not None:
            layer.magnitude.copy_(magnitude)
    return layer


def _dora_merge_cases() -> Iterator[Case]:
    import copy

    for layer, desc in _dora_layers_for_checks():
        W, A, B, m = _dora_parts(layer)
        expected = copy.deepcopy(layer).merged_module().weight.detach()
        yield Case(args=(W, A, B, m, layer.scaling), expected=expected, label=f"dora_merge on a layer {desc}")


@exercise_check(
    "dora_merge",
    cases=_dora_merge_cases,
    idea="the merged layer must give the DoRA output for every input: one matrix, the moved direction rescaled row by row",
    formula="merged weight = (magnitude / ||W + dW||)[:, None] * (W + dW) with dW = scaling * B @ A, "
            "norms per output row",
)
def check_dora_merge(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, magnitude, scaling) -> merged weight`` against ``DoRALinear.merge``."""
