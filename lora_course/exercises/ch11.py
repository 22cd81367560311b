"""Chapter 11, the LoRA variants: the checks that notebooks/11_lora_variants.ipynb calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check


def _loraplus_cases() -> Iterator[Case]:
    from .. import add_lora
    from ..models import tiny_llama
    from ..variants import loraplus_param_groups

    torch.manual_seed(0)
    mlp = add_lora(nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 4)), ["0"], r=2,
                   modules_to_save=["1", "2"])
    llama = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    for model, name, lr, ratio in ((mlp, "MLP with LoRA, LayerNorm and head trained", 1e-3, 16.0),
                                   (llama, "tiny Llama, LoRA on q,v", 2e-4, 8.0)):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        lr_of = {n: g["lr"] for g in loraplus_param_groups(model, lr, ratio) for n in g["names"]}

        def lrs_in_order(fn, model=model, lr=lr, ratio=ratio, trainable=trainable):
            given = {id(p): g["lr"] for g in fn(model, lr, ratio) for p in g["params"]}
            params = dict(model.named_parameters())
            return [given.get(id(params[n])) for n in trainable]  # None: a trainable tensor left out

        yield Case(args=(model, lr, ratio), expected=[lr_of[n] for n in trainable], apply=lrs_in_order,
                   label=f"loraplus_param_groups({name}, lr={lr}, lr_ratio={ratio}), the lr of each trainable "
                         f"tensor in order ({', '.join(trainable[:3])}, ...)")


@exercise_check("loraplus_param_groups", cases=_loraplus_cases,
                idea="B factors (names with 'lora_B') and 1-D tensors (biases, norm weights) get lr * lr_ratio; "
                     "every other trainable tensor gets lr; frozen ones are left out")
def check_loraplus_param_groups(fn: Callable[..., list]) -> None:
    """Check ``fn(model, lr, lr_ratio) -> optimizer param groups`` (dicts with ``params`` and ``lr``) against LoRA+'s."""


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
                   hint="slice the shared matrices to the layer: A[:, :in_features], B[:out_features]"
                   if (max_out, max_in) != (out_f, in_f) else None)


@exercise_check("vera_forward", cases=_vera_forward_cases,
                idea="x W^T + lambda_b * ((lambda_d * (x A^T)) B^T), with A and B sliced to the layer's shape")
def check_vera_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, base_weight, A, B, lambda_d, lambda_b) -> output`` against VeRA's layer (== PEFT's)."""


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
                   label=f"pissa_init(W {out_f}x{in_f}, r={r}, scaling={scaling}), compared as (B A, residual, A A^T)")


@exercise_check("pissa_init", cases=_pissa_init_cases,
                idea="SVD W = U S Vh (float32): A = sqrt(S_r / scaling) * Vh_r (rows), B = U_r * sqrt(S_r / scaling) "
                     "(columns), residual = W - scaling * B @ A",
                compare=functools.partial(compare_values, rtol=1e-4, atol=1e-5))
def check_pissa_init(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(weight, r, scaling) -> (A, B, residual)``: PiSSA's split (== PEFT's ``init_lora_weights="pissa"``)."""
