"""PiSSA (arXiv 2404.02948): start the adapter on the top singular directions of W.

What it changes: the initialisation. ``W = V diag(S) Uh`` (SVD); the adapter takes the top
r directions, ``A = sqrt(S_r / s) Uh_r``, ``B = V_r sqrt(S_r / s)`` (s the scaling), and the
frozen weight becomes the residual ``W_res = W - s B A``. The model computes the same
function at step 0, but training moves the principal part of W instead of a random
subspace. What it costs: one SVD per adapted layer at set-up, and the adapter alone no
longer describes the fine-tune (the residual base must be shipped, or the adapter converted).
Same as PEFT's ``init_lora_weights="pissa"``. The split itself, :func:`pissa_factors`, lives
with the LoRA layer (``lora.py``) because ``LoRALinear(init="pissa")`` uses it, as PEFT's
``lora/layer.py`` holds ``pissa_init``; it is re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..lora import add_lora, pissa_factors

__all__ = ["add_pissa", "pissa_factors"]


def add_pissa(model: nn.Module, target_modules: str | Sequence[str] = "all-linear", r: int = 8,
              alpha: float = 8.0, dropout: float = 0.0, modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """:func:`~lora_course.add_lora` with PiSSA's initialisation (in place; base weights become residuals)."""
    return add_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout, init="pissa",
                    modules_to_save=modules_to_save)
