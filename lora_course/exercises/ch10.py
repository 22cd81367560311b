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
                idea="the best rank-r matrix keeps the r largest singular directions (Eckart-Young): what share of the squared norm is left out?",
                formula="singular values s_i of delta: the best rank-r matrix leaves sum_{i>r} s_i^2 out of sum_i s_i^2",
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
                idea="the adapter parameters grow linearly in r: count them per unit of rank over the target layers",
                formula="each adapted Linear costs r * (in_features + out_features); find the largest r whose total fits the budget")
def check_equal_budget_rank(fn: Callable[..., int]) -> None:
    """Check ``fn(model, target_modules, budget) -> the largest LoRA rank whose adapters fit in budget``."""


def reference_eckart_young_floor(delta: torch.Tensor, r: int) -> float:
    """The fraction of ``||delta||_F^2`` that no rank-``r`` matrix captures, from the truncated SVD.

    Notebook 10's fallback for ``eckart_young_floor`` while the exercise is a stub:
    ``||delta - delta_r||_F^2 / ||delta||_F^2`` with ``delta_r`` the best rank-``r`` matrix
    (Eckart-Young), formed explicitly.
    """
    delta = delta.detach().double()
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    best = (U[:, :r] * S[:r]) @ Vh[:r]
    return float(torch.linalg.matrix_norm(delta - best) ** 2 / torch.linalg.matrix_norm(delta) ** 2)


def reference_early_stop_step(val_curve: list[list[float]], patience: int) -> int:
    """The step at which :func:`lora_course.train.fit` stops on ``val_curve`` with ``patience``.

    Notebook 10's fallback for ``early_stop_step``: the first evaluation whose curve so far
    ends on a plateau (:func:`lora_course.train.plateaued`, the rule ``fit`` applies after
    every evaluation); the last step of the curve if there is none (training ran to
    ``max_steps``).
    """
    from ..train import plateaued

    for i in range(len(val_curve)):
        if plateaued(val_curve[: i + 1], patience):
            return int(val_curve[i][0])
    return int(val_curve[-1][0])


def _early_stop_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(1010)

    def rising(n: int, every: int, top: float, noise: float) -> list[list[float]]:
        """A saturating accuracy curve with evaluation noise, rounded as the results files store it."""
        steps = torch.arange(1, n + 1, dtype=torch.float64)
        values = top * (1 - torch.exp(-steps / (n / 8))) + noise * torch.randn(n, generator=g, dtype=torch.float64)
        return [[int(every * s), round(float(v), 4)] for s, v in zip(steps, values)]

    tie = [[50, 0.5], [100, 0.7], [150, 0.8], [200, 0.8], [250, 0.79], [300, 0.8], [350, 0.8], [400, 0.81]]
    late = [[25, 0.4], [50, 0.6], [75, 0.58], [100, 0.59], [125, 0.57], [150, 0.65], [175, 0.64], [200, 0.63],
            [225, 0.62], [250, 0.61], [275, 0.66]]
    climbing = [[100 * i, round(0.3 + 0.04 * i, 4)] for i in range(1, 13)]
    for curve, patience, hint in [
        (rising(40, 50, 0.8, 0.01), 6, None),
        (rising(30, 50, 0.75, 0.02), 5, None),
        (tie, 3, "an evaluation equal to the best so far is not a new best: it counts toward the patience"),
        (tie, 6, "when the rule never fires, training runs to the end of the curve (max_steps)"),
        (late, 4, "the count starts again at every new best"),
        (late, 1, None),
        (climbing, 2, "when the rule never fires, training runs to the end of the curve (max_steps)"),
        (rising(60, 20, 0.9, 0.005), 4, None),
    ]:
        yield Case(args=(curve, patience), expected=reference_early_stop_step(curve, patience), hint=hint,
                   label=f"early_stop_step({len(curve)} evaluations every {curve[1][0] - curve[0][0]} steps, "
                         f"patience={patience})")


@exercise_check("early_stop_step", cases=_early_stop_cases,
                idea="walk along the curve keeping the best accuracy so far and how many evaluations ago it was set",
                formula="stop at the first evaluation i with i - (index of the earliest maximum of v_0..v_i) >= "
                        "patience; the last step of the curve if there is none")
def check_early_stop_step(fn: Callable[[list[list[float]], int], int]) -> None:
    """Check ``fn(val_curve, patience) -> the step where early stopping ends training``, against ``train.plateaued``."""
