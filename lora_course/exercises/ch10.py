"""Chapter 10, rank versus accuracy: the checks that notebooks/10_rank_vs_accuracy.ipynb calls."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check


def _eckart_young_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(10)
    for out_f, in_f, true_rank, r in [(24, 16, 6, 2), (16, 32, 4, 4), (20, 20, 8, 5), (12, 30, 3, 7)]:
        delta = torch.randn(out_f, true_rank, generator=g, dtype=torch.float64) @ torch.randn(
            true_rank, in_f, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vh[:r]  # the best rank-r matrix: truncated SVD
        left = float(torch.linalg.matrix_norm(delta - best) ** 2 / torch.linalg.matrix_norm(delta) ** 2)
        yield Case(args=(delta, r), expected=left, label=f"eckart_young_floor(delta {out_f}x{in_f} of rank {true_rank}, r={r})",
                   hint="0 when r >= rank(delta): a rank-r product can then represent delta exactly" if r >= true_rank else None)


@exercise_check("eckart_young_floor", cases=_eckart_young_cases,
                idea="singular values s_i of delta: the best rank-r matrix leaves sum_{i>r} s_i^2 out of sum_i s_i^2",
                compare=functools.partial(compare_values, rtol=1e-6, atol=1e-9))
def check_eckart_young_floor(fn: Callable[[torch.Tensor, int], float]) -> None:
    """Check ``fn(delta, r) -> fraction of ||delta||_F^2 that no rank-r matrix can capture``."""


def _equal_budget_rank_cases() -> Iterator[Case]:
    import copy

    from .. import add_lora, count_parameters
    from ..models import tiny_llama

    llama = tiny_llama()
    mlp = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48), nn.Linear(48, 10))
    for model, targets, budget in [(llama, ["q_proj", "v_proj"], 5000), (llama, ["q_proj", "k_proj", "v_proj", "o_proj"], 5000),
                                   (mlp, ["0", "2"], 1000), (mlp, ["0"], 143)]:
        per_rank = count_parameters(add_lora(copy.deepcopy(model), targets, r=1))[0]  # adapters only: the rest is frozen
        yield Case(args=(model, targets, budget), expected=budget // per_rank,
                   label=f"equal_budget_rank({type(model).__name__}, {targets}, budget={budget})")


@exercise_check("equal_budget_rank", cases=_equal_budget_rank_cases,
                idea="each adapted Linear costs r * (in_features + out_features); find the largest r whose total fits the budget")
def check_equal_budget_rank(fn: Callable[..., int]) -> None:
    """Check ``fn(model, target_modules, budget) -> the largest LoRA rank whose adapters fit in budget``."""
