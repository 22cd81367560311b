"""Chapter 06, training memory: the checks that notebooks/06_memory_full_vs_lora_vs_qlora.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .framework import Case, exercise_check


def _full_ft_bytes_cases() -> Iterator[Case]:
    from .. import estimate_training_memory

    n = 1_000_000
    for dtype, master in [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]:
        est = estimate_training_memory(n, "full", dtype=dtype, master_weights=master)
        d = torch.tensor([], dtype=dtype).element_size()
        yield Case(args=(d, master), expected=est.total // n, label=f"full_ft_bytes_per_param({d}, master_weights={master})",
                   hint="a float32 master copy adds 4 bytes when the weights are not float32" if master else None)


@exercise_check(
    "full_ft_bytes_per_param",
    cases=_full_ft_bytes_cases,
    idea="weights (d) + gradients (d) + AdamW's two float32 moments (8), plus 4 for a float32 master copy",
)
def check_full_ft_bytes_per_param(fn: Callable[..., int]) -> None:
    """Check ``fn(dtype_bytes, master_weights) -> bytes per parameter`` against ``estimate_training_memory``."""


def _peak_cases() -> Iterator[Case]:
    from ..memory import MemoryBreakdown

    g = torch.Generator().manual_seed(6)
    for k in range(6):
        parts = [int(v) for v in torch.randint(0, 10_000, (7,), generator=g)]
        if k % 2:
            parts[2] = 50_000  # gradients large: the optimizer step is the worst moment
        b = MemoryBreakdown("lora", *parts)
        names = ("weights", "quant_constants", "gradients", "optimizer_states", "activations",
                 "backward_workspace", "optimizer_workspace")
        yield Case(kwargs=dict(zip(names, parts)), expected=b.peak,
                   label="peak_bytes(" + ", ".join(f"{n}={v}" for n, v in zip(names, parts)) + ")")


@exercise_check(
    "peak_bytes",
    cases=_peak_cases,
    idea="the static parts are always there; on top: max(activations + backward workspace, gradients + optimizer workspace)",
)
def check_peak_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(**parts) -> peak bytes`` against ``MemoryBreakdown.peak``."""
