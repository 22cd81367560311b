"""The checks added to chapters 01 and 10 can pass and can fail.

``lora_scaling_fix`` (notebook 01, debugging): a layer scaled by alpha instead of alpha / r
agrees with PEFT at r = 1 only, so the check must catch it; the library's ``LoRALinear``
(the fallback) and the fixed layer pass. ``early_stop_step`` (notebook 10, design): the
rule of ``train.fit`` (no new best for ``patience`` evaluations) passes, the usual
mistakes fail. ``reference_eckart_young_floor`` (notebook 10's fallback) passes its check.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_course import LoRALinear
from lora_course.exercises import run_check
from lora_course.exercises.ch10 import reference_early_stop_step, reference_eckart_young_floor
from lora_course.train import plateaued


class _AlphaScaled(nn.Module):
    """The bug of notebook 01's exercise 3: the branch is scaled by alpha, not alpha / r."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 8.0):
        super().__init__()
        self.base, self.r, self.alpha = base.requires_grad_(False), r, alpha
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def scale(self) -> float:
        return self.alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale() * (x @ self.lora_A.T @ self.lora_B.T)


class _Fixed(_AlphaScaled):
    def scale(self) -> float:
        return self.alpha / self.r


class _SqrtScaled(_AlphaScaled):
    def scale(self) -> float:  # rsLoRA's scale: right only at r = 1
        return self.alpha / math.sqrt(self.r)


def test_lora_scaling_fix_passes_the_fix_and_the_fallback() -> None:
    assert run_check("lora_scaling_fix", _Fixed)[0]
    assert run_check("lora_scaling_fix", LoRALinear)[0]


def test_lora_scaling_fix_catches_the_alpha_bug_and_other_scales() -> None:
    passed, message = run_check("lora_scaling_fix", _AlphaScaled)
    assert not passed and "PEFT" in message and "r=4" in message
    assert not run_check("lora_scaling_fix", _SqrtScaled)[0]


def _stop_step(curve: list[list[float]], patience: int, new_best=lambda v, best: v > best) -> int | None:
    best, since = -math.inf, 0
    for step, value in curve:
        if new_best(value, best):
            best, since = value, 0
        else:
            since += 1
            if since >= patience:
                return step
    return curve[-1][0]


def test_early_stop_step_passes_fits_rule_and_fails_mistakes() -> None:
    assert run_check("early_stop_step", _stop_step) == (True, "8 hidden cases")
    assert run_check("early_stop_step", reference_early_stop_step)[0]
    ties_reset = lambda c, p: _stop_step(c, p, new_best=lambda v, best: v >= best)  # noqa: E731
    passed, message = run_check("early_stop_step", ties_reset)
    assert not passed and "equal to the best" in message
    assert not run_check("early_stop_step", lambda c, p: _stop_step(c, p + 1))[0]  # off by one
    assert not run_check("early_stop_step", lambda c, p: c[-1][0])[0]  # never stops early


def test_reference_early_stop_step_is_fits_rule() -> None:
    curve = [[50, 0.5], [100, 0.7], [150, 0.7], [200, 0.69], [250, 0.71], [300, 0.7], [350, 0.7]]
    assert reference_early_stop_step(curve, 2) == 200 and reference_early_stop_step(curve, 3) == 350  # a tie is no new best
    assert reference_early_stop_step(curve, 1) == 150
    stop = reference_early_stop_step(curve, 2)
    prefix = [row for row in curve if row[0] <= stop]
    assert plateaued(prefix, 2) and not plateaued(prefix[:-1], 2)


def test_reference_eckart_young_floor_passes_its_check() -> None:
    assert run_check("eckart_young_floor", reference_eckart_young_floor)[0]
    assert not run_check("eckart_young_floor", lambda d, r: float((torch.linalg.svdvals(d)[r:] ** 2).sum()))[0]
