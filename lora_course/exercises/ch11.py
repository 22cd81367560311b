"""Chapter 11, the LoRA variants: the checks that notebooks/11_lora_variants.ipynb calls.

Four exercises in the reading flow, each the core of one variant: PiSSA's split
(:func:`check_pissa_init`), LoRA+'s parameter groups (:func:`check_loraplus_param_groups`),
VeRA's forward (:func:`check_vera_forward`) and LoRA-Pro's adjusted gradients
(:func:`check_lora_pro_grads`). Every expected value comes from the library
(:mod:`lora_course.variants`), which the notebook and ``tests/test_variants.py`` check
against PEFT or the paper. The ``reference_*`` functions are the notebook's fallbacks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check, seeded_tensors


# ---------------------------------------------------------------- PiSSA: the SVD split


def _pissa_init_cases() -> Iterator[Case]:
    from ..variants import pissa_factors

    g = torch.Generator().manual_seed(8)
    for out_f, in_f, r, scaling in [(10, 8, 2, 1.0), (6, 12, 3, 2.0), (16, 16, 4, 0.5)]:
        W = torch.randn(out_f, in_f, generator=g)
        A, B, residual = pissa_factors(W, r, scaling)

        def invariants(fn, W=W, r=r, scaling=scaling):
            a, b, res = fn(W.clone(), r, scaling)
            return (b @ a, res, a @ a.T)  # unchanged if a singular vector pair flips sign

        yield Case(args=(W, r, scaling), expected=(B @ A, residual, A @ A.T), apply=invariants,
                   label=f"pissa_init(W {out_f}x{in_f}, r={r}, scaling={scaling}), compared as (B A, residual, A A^T)",
                   hint="the scaling s multiplies B A in the layer: split the singular values so that s B A is "
                        "the top-r part of W" if scaling != 1.0 else None)


@exercise_check("pissa_init", cases=_pissa_init_cases,
                idea="the top r singular triplets of W make the adapter, shared evenly between A and B; "
                     "the frozen weight keeps whatever the adapter does not hold",
                formula="U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False); A = sqrt(S[:r] / s)[:, None] * "
                        "Vh[:r]; B = U[:, :r] * sqrt(S[:r] / s)[None, :]; residual = W - s * B @ A",
                compare=functools.partial(compare_values, rtol=1e-4, atol=1e-5))
def check_pissa_init(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(weight, r, scaling) -> (A, B, residual)``: PiSSA's split (== PEFT's ``init_lora_weights="pissa"``)."""


# ---------------------------------------------------------------- LoRA+: two learning rates


def _loraplus_cases() -> Iterator[Case]:
    from .. import add_lora
    from ..models import tiny_llama
    from ..variants import loraplus_param_groups

    torch.manual_seed(0)
    mlp = add_lora(nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 4)), ["0"], r=2,
                   modules_to_save=["1", "2"])
    llama = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    for model, name, lr, ratio in ((llama, "tiny Llama, LoRA on q,v", 2e-4, 8.0),
                                   (mlp, "MLP with LoRA, LayerNorm and head trained", 1e-3, 16.0)):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        lr_of = {n: g["lr"] for g in loraplus_param_groups(model, lr, ratio) for n in g["names"]}

        def lrs_in_order(fn, model=model, lr=lr, ratio=ratio, trainable=trainable):
            given = {id(p): g["lr"] for g in fn(model, lr, ratio) for p in g["params"]}
            params = dict(model.named_parameters())
            return [given.get(id(params[n])) for n in trainable]  # None: a trainable tensor left out

        yield Case(args=(model, lr, ratio), expected=[lr_of[n] for n in trainable], apply=lrs_in_order,
                   label=f"loraplus_param_groups({name}, lr={lr}, lr_ratio={ratio}), the lr of each trainable "
                         f"tensor in order ({', '.join(trainable[:3])}, ...)",
                   hint="this model also trains a LayerNorm and a head: which of their tensors does PEFT put "
                        "with the B factors?" if model is mlp else None)


@exercise_check("loraplus_param_groups", cases=_loraplus_cases,
                idea="go over the trainable tensors once and sort each into a slow or a fast group by its name "
                     "and its number of dimensions",
                formula="lr * lr_ratio for names containing 'lora_B' and for 1-D tensors (biases, norm weights); "
                        "lr for every other trainable tensor; frozen tensors in no group")
def check_loraplus_param_groups(fn: Callable[..., list]) -> None:
    """Check ``fn(model, lr, lr_ratio) -> optimizer param groups`` (dicts with ``params`` and ``lr``) against LoRA+'s."""


# ---------------------------------------------------------------- VeRA: the forward


def reference_vera_forward(x: torch.Tensor, base_weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                           lambda_d: torch.Tensor, lambda_b: torch.Tensor) -> torch.Tensor:
    """VeRA's layer output through :class:`~lora_course.variants.VeRALinear`: notebook 11's fallback."""
    from ..variants import VeRALinear

    out_f, in_f = base_weight.shape
    base = nn.Linear(in_f, out_f, bias=False, dtype=base_weight.dtype)
    with torch.no_grad():
        base.weight.copy_(base_weight)
        layer = VeRALinear(base, A, B, A.shape[0])
        layer.vera_lambda_d.copy_(lambda_d)
        layer.vera_lambda_b.copy_(lambda_b)
        return layer(x)


def _vera_forward_cases() -> Iterator[Case]:
    from ..variants import VeRALinear, vera_projections

    g = torch.Generator().manual_seed(6)
    for out_f, in_f, r, max_out, max_in in [(6, 5, 3, 6, 5), (4, 7, 8, 9, 10), (10, 3, 2, 12, 3)]:
        A, B = vera_projections(r, max_in, max_out, key=out_f)
        base = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_f, in_f, generator=g))
        layer = VeRALinear(base, A, B, r)
        with torch.no_grad():
            layer.vera_lambda_d.copy_(torch.randn(r, generator=g))
            layer.vera_lambda_b.copy_(torch.randn(out_f, generator=g))
        x = torch.randn(3, in_f, generator=g)
        yield Case(args=(x, base.weight.detach(), A, B, layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()),
                   expected=layer(x).detach(),
                   label=f"vera_forward(x {tuple(x.shape)}, W {out_f}x{in_f}, shared A {r}x{max_in}, B {max_out}x{r})",
                   hint="the shared matrices are made for the largest layer: this layer uses only the part "
                        "that fits its own shape" if (max_out, max_in) != (out_f, in_f) else None)


@exercise_check("vera_forward", cases=_vera_forward_cases,
                idea="the frozen layer's output plus the low-rank branch, where the two trained vectors rescale "
                     "the branch after each of its two projections",
                formula="x W^T + lambda_b * ((lambda_d * (x A^T)) B^T), with A[:, :in_features] and B[:out_features]")
def check_vera_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, base_weight, A, B, lambda_d, lambda_b) -> output`` against VeRA's layer (== PEFT's)."""


# ---------------------------------------------------------------- LoRA-Pro: the adjusted gradients


def _lora_pro_on_a_layer(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`~lora_course.variants.apply_lora_pro` leaves in ``.grad`` of a LoRA layer with these factors."""
    from .. import add_lora
    from ..variants import apply_lora_pro

    (r, in_f), out_f = A.shape, B.shape[0]
    model = add_lora(nn.Sequential(nn.Linear(in_f, out_f, bias=False, dtype=A.dtype)), ["0"], r=r)
    layer = model[0]
    layer.scaling = scaling
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.lora_A.grad, layer.lora_B.grad = grad_A.clone(), grad_B.clone()
    apply_lora_pro(model)
    return layer.lora_A.grad.clone(), layer.lora_B.grad.clone()


def reference_lora_pro_grads(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                             scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-Pro's (g_A*, g_B*) from the plain LoRA gradients, as ``apply_lora_pro``: notebook 11's fallback."""
    return _lora_pro_on_a_layer(A, B, grad_A, grad_B, scaling)


def _lora_pro_cases() -> Iterator[Case]:
    for seed, (out_f, in_f, r, scaling, zero_b) in enumerate(
            [(7, 6, 2, 1.5, False), (5, 9, 3, 2.0, False), (12, 4, 4, 0.5, False), (8, 6, 2, 2.0, True)]):
        A, B, g = (t.double() for t in seeded_tensors(seed, (r, in_f), (out_f, r), (out_f, in_f)))
        if zero_b:
            B = torch.zeros_like(B)  # LoRA's initialisation: B^T B has no inverse
        grad_A, grad_B = scaling * B.T @ g, scaling * g @ A.T  # the plain LoRA gradients for dL/dW = g
        yield Case(args=(A, B, grad_A, grad_B, scaling), expected=_lora_pro_on_a_layer(A, B, grad_A, grad_B, scaling),
                   label=f"lora_pro_grads(A {r}x{in_f}, B {out_f}x{r}{' = 0' if zero_b else ''}, grad_A, grad_B, "
                         f"scaling={scaling})",
                   hint="B = 0 at LoRA's initialisation, and then B^T B cannot be inverted: which kind of inverse "
                        "still gives an answer?" if zero_b else None)


@exercise_check("lora_pro_grads", cases=_lora_pro_cases,
                idea="the plain gradients already hold s B^T g and s g A^T; solve for g_A first, then take out of "
                     "g_B the part of the step that B g_A already makes (count every factor s)",
                formula="g_A* = (1/s^2) pinv(B^T B) g_A;  g_B* = (1/s^2) (g_B - B pinv(B^T B) g_A A^T) pinv(A A^T)  "
                        "(X = 0; pinv = torch.linalg.pinv)",
                compare=functools.partial(compare_values, rtol=1e-6, atol=1e-8))
def check_lora_pro_grads(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(A, B, grad_A, grad_B, scaling) -> (g_A*, g_B*)`` against ``variants.apply_lora_pro`` (X = 0)."""
