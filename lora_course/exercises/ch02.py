"""Chapter 02, PEFT in practice: the checks that notebooks/02_peft_in_practice.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check


def _peft_lora_model(shapes: list[tuple[int, int]], **config: Any):
    """PEFT's LoRA on an ``nn.Sequential`` of ``nn.Linear(in, out)`` layers (all targeted)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(*(nn.Linear(d_in, d_out) for d_in, d_out in shapes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(target_modules=[str(i) for i in range(len(shapes))], **config))


def _peft_scaling_cases() -> Iterator[Case]:
    for alpha, r, rs in [(8, 8, False), (16, 8, False), (16, 4, True), (32, 64, True), (1, 3, False), (8.0, 16, True)]:
        layer = _peft_lora_model([(8, 8)], r=r, lora_alpha=alpha, use_rslora=rs).base_model.model[0]
        yield Case(args=(alpha, r, rs), expected=float(layer.scaling["default"]),
                   label=f"peft_scaling(lora_alpha={alpha}, r={r}, use_rslora={rs})",
                   hint="rsLoRA divides by sqrt(r) instead of r" if rs else None)


@exercise_check("peft_scaling", cases=_peft_scaling_cases,
                idea="lora_alpha / r, or lora_alpha / sqrt(r) when use_rslora=True")
def check_peft_scaling(fn: Callable[..., float]) -> None:
    """Check ``fn(lora_alpha, r, use_rslora) -> scaling`` against PEFT's ``LoraLayer.scaling``."""


_PEFT_SHAPES = [[(8, 8)], [(16, 4), (4, 16)], [(12, 20), (20, 20), (20, 6)], [(32, 8)]]


def _lora_config_trainable_cases() -> Iterator[Case]:
    for k, (shapes, r, bias) in enumerate(zip(_PEFT_SHAPES, (2, 4, 3, 8), ("none", "lora_only", "lora_only", "none"))):
        model = _peft_lora_model(shapes, r=r, bias=bias)
        yield Case(args=(shapes, r, bias), expected=model.get_nb_trainable_parameters()[0],
                   label=f"lora_config_trainable({shapes}, r={r}, bias={bias!r})",
                   hint="bias='lora_only' also trains each adapted layer's bias (out_features numbers)"
                   if bias == "lora_only" else None)


@exercise_check("lora_config_trainable", cases=_lora_config_trainable_cases,
                idea="r * (in + out) per adapted layer, plus out per layer when bias='lora_only'")
def check_lora_config_trainable(fn: Callable[..., int]) -> None:
    """Check ``fn(shapes, r, bias) -> trainable`` against PEFT's ``get_nb_trainable_parameters``."""


def _adapter_file_bytes_cases() -> Iterator[Case]:
    from peft import get_peft_model_state_dict

    for shapes, r, dtype in zip(_PEFT_SHAPES, (2, 4, 3, 8), (torch.float32, torch.float16, torch.bfloat16, torch.float32)):
        model = _peft_lora_model(shapes, r=r).to(dtype)
        tensors = get_peft_model_state_dict(model)  # what save_pretrained writes
        size = dtype.itemsize
        yield Case(args=(shapes, r, size), expected=sum(t.numel() * t.element_size() for t in tensors.values()),
                   label=f"adapter_file_bytes({shapes}, r={r}, dtype_bytes={size})")


@exercise_check("adapter_file_bytes", cases=_adapter_file_bytes_cases,
                idea="each layer stores A (r x in) and B (out x r): r * (in + out) numbers, times the bytes per number")
def check_adapter_file_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(shapes, r, dtype_bytes) -> bytes`` against the tensors PEFT's ``save_pretrained`` writes."""
