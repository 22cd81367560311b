"""Chapter 13, LoRA at scale: the checks that notebooks/13_lora_at_scale.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import functools

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check


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
                idea="DDP all-reduces each gradient once per step, in the parameter's own dtype; frozen parameters "
                     "have no gradient",
                formula="sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)")
def check_ddp_allreduce_bytes(fn: Callable[[nn.Module], int]) -> None:
    """Check ``fn(model) -> bytes of gradient DDP all-reduces per optimizer step``."""


def _zero_stage_bytes_cases() -> Iterator[Case]:
    from ..distributed import zero_bytes_per_gpu

    for n_params, n_gpus, stage in [(7_500_000_000, 64, 0), (7_500_000_000, 64, 1), (7_500_000_000, 64, 2),
                                    (7_500_000_000, 64, 3), (1_000_000, 8, 2), (65_000_000_000, 8, 3)]:
        yield Case(args=(n_params, n_gpus, stage), expected=zero_bytes_per_gpu(n_params, n_gpus, stage),
                   label=f"zero_stage_bytes({n_params:,}, {n_gpus}, stage={stage})")


@exercise_check("zero_stage_bytes", cases=_zero_stage_bytes_cases,
                idea="count the bytes per parameter of the 16-bit weights, the 16-bit gradients and Adam's states; "
                     "each stage shards one more of the three over the N GPUs (round to whole bytes)",
                formula="per parameter: 2 B weights + 2 B gradients + 12 B Adam states; stage 1 divides the states "
                        "by N, stage 2 also the gradients, stage 3 also the weights; round(total)")
def check_zero_stage_bytes(fn: Callable[[int, int, int], int]) -> None:
    """Check ``fn(n_params, n_gpus, stage) -> model-state bytes per GPU`` (mixed-precision Adam, ZeRO stage 0-3)."""


DDP_LORA = dict(targets=("q_proj", "v_proj"), r=8, alpha=16.0)  # the LoRA of notebook 13's DDP run


def _ddp_bytes_ratio_cases() -> Iterator[Case]:
    from ..distributed import allreduce_bytes_per_step
    from ..lora import add_lora
    from ..models import tiny_llama

    # The two models of notebook 13's DDP run (experiments.ddp_lora.build; a test keeps them equal).
    full, lora = tiny_llama(seed=0), tiny_llama(seed=0)
    add_lora(lora, list(DDP_LORA["targets"]), r=DDP_LORA["r"], alpha=DDP_LORA["alpha"])
    full, lora = allreduce_bytes_per_step(full), allreduce_bytes_per_step(lora)
    yield Case(expected=full / lora, label="your predicted ratio (full fine-tuning bytes / LoRA bytes per step)",
               hint="full fine-tuning sends the gradient of every parameter (embeddings, both matrices of "
                    "attention and MLP, norms, the untied head); LoRA only A and B of the adapted matrices; "
                    "bytes per element cancel in the ratio")


@exercise_check("ddp_bytes_ratio", cases=_ddp_bytes_ratio_cases, expects="value",
                idea="the ratio of bytes is the ratio of trainable parameter counts (both float32)",
                formula="full = 2 * vocab * hidden + layers * (hidden * (2 * hidden + 2 * kv_width) "
                        "+ 3 * hidden * intermediate + 2 * hidden) + hidden; lora = layers * r * "
                        "((hidden + hidden) + (hidden + kv_width)) for q_proj and v_proj; ratio = full / lora",
                compare=functools.partial(compare_values, rtol=0.05, atol=0.0))
def check_ddp_bytes_ratio(value: float) -> None:
    """Check a predicted ratio of DDP's all-reduced bytes per step, full fine-tuning over LoRA (within 5%)."""
