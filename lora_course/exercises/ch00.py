"""Chapter 00, Set-up and tour: the checks that notebooks/00_setup_and_tour.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from .framework import Case, exercise_check


def _linear_param_count_cases() -> Iterator[Case]:
    # Expected values come from real nn.Linear layers; the meta device gives the shapes
    # without allocating memory or drawing random numbers.
    for args, kwargs, hint in [
        ((3, 2), {"bias": True}, None),
        ((1, 1), {}, "bias defaults to True, as in nn.Linear"),
        ((3, 2), {"bias": False}, "with bias=False the layer has no bias vector"),
        ((768, 768), {}, None),
        ((768, 3072), {"bias": True}, "in_features and out_features play different roles when they differ"),
        ((4096, 11008), {"bias": False}, "with bias=False the layer has no bias vector"),
        ((5, 1), {"bias": False}, None),
    ]:
        layer = nn.Linear(*args, **kwargs, device="meta")
        yield Case(args=args, kwargs=kwargs, expected=sum(p.numel() for p in layer.parameters()), hint=hint)


@exercise_check(
    "linear_param_count",
    cases=_linear_param_count_cases,
    idea=(
        "count the entries of every tensor the layer stores; "
        "list them with [p.shape for p in nn.Linear(3, 2).parameters()]"
    ),
    formula="weight: out_features * in_features entries; bias: out_features more when bias=True",
)
def check_linear_param_count(fn: Callable[..., int]) -> None:
    """Check ``fn(in_features, out_features, bias=True)`` -> the parameter count of ``nn.Linear``."""
