"""rsLoRA (arXiv 2312.03732): scale the update by alpha / sqrt(r) instead of alpha / r.

What it changes: only the scaling, ``h = W0 x + (alpha / sqrt(r)) B A x``. With alpha / r
the size of a training step of ``B A`` shrinks like 1 / sqrt(r) as the rank grows (measured
in notebook 10 section 6), so large ranks learn slowly; alpha / sqrt(r) keeps it flat, and
the rank can change without retuning the learning rate. What it costs: nothing.
Same as PEFT's ``LoraConfig(use_rslora=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from ..lora import add_lora, check_lora_args


def rslora_scaling(alpha: float, r: int) -> float:
    """rsLoRA's factor alpha / sqrt(r)."""
    r, alpha, _ = check_lora_args(r, alpha, 0.0, "kaiming")
    return alpha / math.sqrt(r)


def add_rslora(model: nn.Module, target_modules: str | Sequence[str] = "all-linear", r: int = 8,
               alpha: float = 8.0, dropout: float = 0.0, modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """:func:`~lora_course.add_lora` with rsLoRA's scaling (in place)."""
    return add_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout, use_rslora=True,
                    modules_to_save=modules_to_save)
