"""PiSSA (arXiv 2404.02948): start the adapter on the top singular directions of W.

What it changes: the initialisation. ``W = V diag(S) Uh`` (SVD); the adapter takes the top
r directions, ``A = sqrt(S_r / s) Uh_r``, ``B = V_r sqrt(S_r / s)`` (s the scaling), and the
frozen weight becomes the residual ``W_res = W - s B A``. The model computes the same
function at step 0, but training moves the principal part of W instead of a random
subspace. What it costs: one SVD per adapted layer at set-up, and the adapter alone no
longer describes the fine-tune (the residual base must be shipped, or the adapter converted).
Same as PEFT's ``init_lora_weights="pissa"`` (``LoRALinear(init="pissa")`` uses this function).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..lora import add_lora


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r x in), B (out x r), residual (out x in)) of PiSSA for a Linear ``weight`` (out x in).

    The SVD runs in float32 (as PEFT: another dtype can flip singular-vector signs); A and B
    are float32, the residual is rounded once to ``weight``'s dtype.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be a 2-D (out x in) matrix, got shape {tuple(weight.shape)}")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= min(weight.shape):
        raise ValueError(f"r must be an int between 1 and min(out, in) = {min(weight.shape)}, got {r!r}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling!r}")
    W = weight.to(torch.float32)
    V, S, Uh = torch.linalg.svd(W, full_matrices=False)  # W = V diag(S) Uh
    sqrt_s = (S[:r] / scaling).sqrt()  # (r,)
    # LAPACK returns column-major factors; .contiguous() gives the row-major layout
    # PEFT's diag matmuls produce (the layout changes a matmul's rounding, not the values)
    A = (sqrt_s[:, None] * Uh[:r]).contiguous()  # (r, in) = diag(sqrt_s) @ Uh_r
    B = (V[:, :r] * sqrt_s[None, :]).contiguous()  # (out, r) = V_r @ diag(sqrt_s)
    residual = (W - scaling * B @ A).to(weight.dtype)  # (out, in)
    return A, B, residual


def add_pissa(model: nn.Module, target_modules: str | Sequence[str] = "all-linear", r: int = 8,
              alpha: float = 8.0, dropout: float = 0.0, modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """:func:`~lora_course.add_lora` with PiSSA's initialisation (in place; base weights become residuals)."""
    return add_lora(model, target_modules, r=r, alpha=alpha, dropout=dropout, init="pissa",
                    modules_to_save=modules_to_save)
