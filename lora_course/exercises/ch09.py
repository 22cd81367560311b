"""Chapter 09, LongLoRA's S2-Attn: the checks that notebooks/09_longlora_shift_short_attention.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from .framework import Case, compare_values, exercise_check, fmt, seeded_tensors


def _to_groups_cases() -> Iterator[Case]:
    for seed, (b, h, n, d, g) in enumerate([(1, 2, 8, 3, 4), (2, 4, 12, 2, 6), (3, 2, 16, 5, 2), (1, 6, 8, 4, 8)]):
        (x,) = seeded_tensors(seed, (b, h, n, d))
        # reference: the groups cut out one by one (batch-major, then group order)
        expected = torch.stack([x[i, :, j * g:(j + 1) * g] for i in range(b) for j in range(n // g)])
        yield Case(args=(x, g), expected=expected, label=f"to_groups(x of shape {(b, h, n, d)}, group_size={g})",
                   hint="move seq next to batch (transpose(1, 2)), reshape, then move heads back" if b > 1 else None)


@exercise_check(
    "to_groups",
    cases=_to_groups_cases,
    idea="group j of sequence i holds tokens j*G .. (j+1)*G - 1 of every head; the batch index varies slowest",
)
def check_to_groups(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, group_size)``: (b, h, n, d) -> (b * n // G, h, G, d)."""


def _roll_second_half_cases() -> Iterator[Case]:
    from ..longlora import roll_half_heads

    for seed, (shape, shifts) in enumerate([((1, 2, 8, 3), -2), ((2, 4, 12, 2), 3), ((1, 6, 10, 1), -5), ((2, 2, 4, 2), 0)]):
        (x,) = seeded_tensors(seed, shape)
        yield Case(args=(x, shifts), expected=roll_half_heads(x, shifts),
                   label=f"roll_second_half(x of shape {shape}, shifts={shifts})")


@exercise_check(
    "roll_second_half",
    cases=_roll_second_half_cases,
    idea="leave heads[:h//2] alone; torch.roll the rest along the sequence dimension (dim 2); glue them back",
)
def check_roll_second_half(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, shifts)`` against ``lora_course.longlora.roll_half_heads``."""


def _group_causal_mask_cases() -> Iterator[Case]:
    from ..longlora import s2attn_mask

    for n, g in [(8, 4), (16, 4), (12, 6), (6, 2), (8, 8)]:
        yield Case(args=(n, g), expected=s2attn_mask(n, g, shifted=False),
                   label=f"group_causal_mask({n}, {g})",
                   hint="a causal mask (key <= query) AND the same group (position // group_size)" if g < n else None)


def _compare_masks(expected: Any, got: Any) -> str | None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
        return f"got {fmt(got)}, expected a bool tensor of shape {tuple(expected.shape)}"
    return compare_values(expected, got)


@exercise_check(
    "group_causal_mask",
    cases=_group_causal_mask_cases,
    idea="query i may see key j when j <= i and both lie in the same group of group_size consecutive tokens",
    compare=_compare_masks,
)
def check_group_causal_mask(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(seq_len, group_size)`` against ``s2attn_mask(seq_len, group_size, shifted=False)``."""
