"""Chapter 12, the interview question bank: the checks that notebooks/12_interview_question_bank.ipynb calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch

from .framework import Case, compare_values, exercise_check


def _lora_ga_init_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(12)
    for out_f, in_f, r in [(32, 48, 4), (20, 16, 2), (64, 40, 8)]:
        grad = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * torch.logspace(0, -2, in_f, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(grad, full_matrices=False)

        def first_step(fn, grad=grad, r=r):
            A, B = fn(grad.clone(), r)
            return B @ B.T @ grad + grad @ A.T @ A

        yield Case(args=(grad, r), expected=(U[:, :2 * r] * S[:2 * r]) @ Vh[:2 * r], apply=first_step,
                   label=f"lora_ga_init(grad {out_f}x{in_f}, r={r}), compared as B B^T G + G A^T A")


@exercise_check(
    "lora_ga_init",
    cases=_lora_ga_init_cases,
    idea="the first update is B B^T G + G A^T A: each term projects G onto the space one factor spans; which "
         "orthonormal directions of G make the two projections together its best rank-2r approximation?",
    formula="SVD of the gradient, G = U S Vh: A = the first r rows of Vh (r x in), B = columns r..2r-1 of U (out x r)",
    compare=functools.partial(compare_values, rtol=1e-6, atol=1e-9),
)
def check_lora_ga_init(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(grad, r) -> (A, B)``: LoRA-GA's init, so that B B^T G + G A^T A is G's best rank-2r approximation."""


def reference_lora_ga_init(grad: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-GA's factors before the paper's rescaling (``variants.lora_ga_factors`` rescales them):
    A from the top r right singular vectors of ``grad``, B from the next r left ones."""
    u, _, vh = torch.linalg.svd(grad, full_matrices=False)  # grad = u diag(.) vh
    return vh[:r].clone(), u[:, r : 2 * r].clone()
