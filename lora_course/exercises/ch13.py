"""Chapter 13, LoRA at scale: the checks that notebooks/13_lora_at_scale.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from .framework import Case, exercise_check


def _ddp_allreduce_bytes_cases() -> Iterator[Case]:
    from .. import add_lora
    from ..distributed import allreduce_bytes_per_step

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    adapted = add_lora(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), ["0", "2"], r=4)
    half = add_lora(nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 6)), ["0"], r=2).half()
    frozen_head = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    frozen_head[0].requires_grad_(False)
    for name, model in (("plain MLP", plain), ("MLP with LoRA r=4", adapted), ("float16 LoRA model", half),
                        ("first layer frozen", frozen_head)):
        yield Case(args=(model,), expected=allreduce_bytes_per_step(model), label=f"ddp_allreduce_bytes({name})",
                   hint="frozen parameters have no gradient, so DDP sends nothing for them" if name != "plain MLP" else None)


@exercise_check("ddp_allreduce_bytes", cases=_ddp_allreduce_bytes_cases,
                idea="DDP all-reduces each gradient once per step: sum numel * element_size over parameters with requires_grad")
def check_ddp_allreduce_bytes(fn: Callable[[nn.Module], int]) -> None:
    """Check ``fn(model) -> bytes of gradient DDP all-reduces per optimizer step``."""


def _zero_stage_bytes_cases() -> Iterator[Case]:
    from ..distributed import zero_bytes_per_gpu

    for n_params, n_gpus, stage in [(7_500_000_000, 64, 0), (7_500_000_000, 64, 1), (7_500_000_000, 64, 2),
                                    (7_500_000_000, 64, 3), (1_000_000, 8, 2), (65_000_000_000, 8, 3)]:
        yield Case(args=(n_params, n_gpus, stage), expected=zero_bytes_per_gpu(n_params, n_gpus, stage),
                   label=f"zero_stage_bytes({n_params:,}, {n_gpus}, stage={stage})")


@exercise_check("zero_stage_bytes", cases=_zero_stage_bytes_cases,
                idea="per parameter: 2 B weights + 2 B gradients + 12 B Adam states; stage 1 divides the states by N, "
                     "stage 2 also the gradients, stage 3 everything (round to whole bytes)")
def check_zero_stage_bytes(fn: Callable[[int, int, int], int]) -> None:
    """Check ``fn(n_params, n_gpus, stage) -> model-state bytes per GPU`` (mixed-precision Adam, ZeRO stage 0-3)."""
