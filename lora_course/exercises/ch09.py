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
                   hint="with batch > 1, which dimension must sit next to the batch before a reshape may cut the sequence?" if b > 1 else None)


@exercise_check(
    "to_groups",
    cases=_to_groups_cases,
    idea="group j of sequence i holds tokens j*G .. (j+1)*G - 1 of every head; the batch index varies slowest",
    formula="x.transpose(1, 2).reshape(b * (n // G), G, h, d).transpose(1, 2): seq next to batch, cut it, heads back",
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
    idea="only the second half of the heads moves, and it moves along the sequence, wrapping around",
    formula="torch.cat([x[:, :h // 2], x[:, h // 2:].roll(shifts, dims=2)], dim=1)",
)
def check_roll_second_half(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, shifts)`` against ``lora_course.longlora.roll_half_heads``."""


def _group_causal_mask_cases() -> Iterator[Case]:
    from ..longlora import s2attn_mask

    for n, g in [(8, 4), (16, 4), (12, 6), (6, 2), (8, 8)]:
        yield Case(args=(n, g), expected=s2attn_mask(n, g, shifted=False),
                   label=f"group_causal_mask({n}, {g})",
                   hint="two conditions must both hold; one of them is the usual causal one" if g < n else None)


def _compare_masks(expected: Any, got: Any) -> str | None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
        return f"got {fmt(got)}, expected a bool tensor of shape {tuple(expected.shape)}"
    return compare_values(expected, got)


@exercise_check(
    "group_causal_mask",
    cases=_group_causal_mask_cases,
    idea="query i may see key j when j <= i and both lie in the same group of group_size consecutive tokens",
    compare=_compare_masks,
    formula="pos = arange(seq_len); (pos[:, None] // G == pos[None, :] // G) & (pos[None, :] <= pos[:, None])",
)
def check_group_causal_mask(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(seq_len, group_size)`` against ``s2attn_mask(seq_len, group_size, shifted=False)``."""


def _group_pairs_cases() -> Iterator[Case]:
    from ..longlora import s2attn_mask

    yield Case(expected=int(s2attn_mask(16, 4, shifted=False).sum()),
               label="your predicted number of query-key pairs (n=16, G=4, unshifted heads)")


@exercise_check(
    "group_pairs",
    cases=_group_pairs_cases,
    idea="count the pairs of one group, causally, then multiply by the number of groups",
    formula="(n / G) groups x G (G + 1) / 2 pairs each",
    expects="value",
)
def check_group_pairs(predicted_pairs: int) -> None:
    """Check a prediction: query-key pairs one unshifted S2-Attn head computes for n=16, G=4."""


# ---------------------------------------------------------------- notebook 09's fallbacks and reference


def reference_to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(b, h, n, d) -> (b * n // G, h, G, d), the groups cut out one by one: notebook 09's fallback."""
    b, _, n, _ = x.shape
    return torch.stack([x[i, :, j * group_size:(j + 1) * group_size] for i in range(b) for j in range(n // group_size)])


def reference_group_causal_mask(seq_len: int, group_size: int) -> torch.Tensor:
    """``s2attn_mask(seq_len, group_size, shifted=False)``: notebook 09's fallback."""
    from ..longlora import s2attn_mask

    return s2attn_mask(seq_len, group_size, shifted=False)


def longlora_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group_size: int) -> torch.Tensor:
    """LongLoRA's non-flash S2-Attn (its ``forward_noflashattn`` after RoPE), transcribed.

    q, k, v: (batch, heads, seq, dim), heads even, seq divisible by ``group_size``. Roll the
    second half of the heads by -G/2, reshape into groups, one causal mask per group, softmax
    in float32 (LongLoRA's upcast for fp16/bf16; float64 input stays float64), roll back.
    Kept here, not on notebook 09's page, because it holds the answers to that notebook's
    exercises (the grouping, the roll and the mask).
    """
    import math

    import torch.nn.functional as F

    b, h, n, d = q.shape

    def shift(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[:, h // 2:] = t[:, h // 2:].roll(-group_size // 2, dims=2)
        return t.transpose(1, 2).reshape(b * n // group_size, group_size, h, d).transpose(1, 2)

    qs, ks, vs = shift(q), shift(k), shift(v)  # (b * n/G, h, G, d)
    scores = qs @ ks.transpose(2, 3) / math.sqrt(d)
    mask = torch.full((group_size, group_size), float("-inf"), dtype=q.dtype).triu(1)
    weights = F.softmax(scores + mask, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = (weights @ vs).transpose(1, 2).reshape(b, n, h, d)
    out[:, :, h // 2:] = out[:, :, h // 2:].roll(group_size // 2, dims=1)  # roll back
    return out.transpose(1, 2)  # (batch, heads, seq, dim)
