"""VeRA (arXiv 2310.11454): one pair of frozen random matrices shared by every layer, trained scaling vectors.

What it changes: ``h = W0 x + lambda_b * (B (lambda_d * (A x)))``. A (r x in_max) and
B (out_max x r) are random, frozen and the same for all adapted layers (each layer slices
its shape out of them); each layer trains only two vectors, lambda_d (r,) and lambda_b (out,).
lambda_b starts at 0 (the model is unchanged at step 0), lambda_d at ``d_initial``.
What it costs: trainable parameters r + out per layer instead of r (in + out), so VeRA
affords a large r (256 is typical); the shared matrices are regenerated from a seed
(``projection_prng_key``) rather than stored. Same numbers as PEFT's ``VeraConfig``: the
shared matrices are drawn kaiming-uniform (bound sqrt(6 / fan_in)) from a CPU generator
seeded with the key, A first, then B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import check_int, check_real
from ..lora import MergesIntoBase, check_lora_args
from ..surgery import ALL_LINEAR, check_base_layer, freeze_all_but_adapters, plan_adapter_targets, replace_layers


def vera_projections(r: int, in_features: int, out_features: int, key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen (A (r x in), B (out x r)) drawn from ``key`` as PEFT draws them."""
    gen = torch.Generator(device="cpu").manual_seed(key)

    def kaiming(rows: int, cols: int) -> torch.Tensor:
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(cols)  # gain sqrt(2), fan_in = cols
        return torch.empty(rows, cols).uniform_(-bound, bound, generator=gen)

    A = kaiming(r, in_features)
    return A, kaiming(out_features, r)


def check_vera_base(base: nn.Module) -> None:
    """VeRA wraps ``nn.Linear`` layers only (:class:`~lora_course.surgery.UnsupportedLayerError`
    for a type no adapter wraps, a ``ValueError`` for a ``Conv1D``)."""
    if not isinstance(base, nn.Linear):
        check_base_layer(base)
        raise ValueError(f"VeRALinear wraps nn.Linear layers, got {type(base).__name__}")


class VeRALinear(MergesIntoBase, nn.Module):
    """A frozen Linear plus VeRA's update ``lambda_b * (B[:out] (lambda_d * (A[:, :in] x)))``."""

    adapter_parameter_names: tuple[str, ...] = ("vera_lambda_d", "vera_lambda_b")

    def __init__(self, base: nn.Module, vera_A: torch.Tensor, vera_B: torch.Tensor, r: int,
                 d_initial: float = 0.1, dropout: float = 0.0) -> None:
        super().__init__()
        r, _, dropout = check_lora_args(r, 1.0, dropout, "kaiming")
        check_vera_base(base)
        out_features, in_features = base.weight.shape
        if vera_A.shape[0] != r or vera_B.shape[1] != r or vera_A.shape[1] < in_features or vera_B.shape[0] < out_features:
            raise ValueError(f"vera_A must be (r={r} x >= {in_features}) and vera_B (>= {out_features} x r), "
                             f"got {tuple(vera_A.shape)} and {tuple(vera_B.shape)}")
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out, self.merged, self.r = False, False, r
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("vera_A", vera_A, persistent=False)  # shared, frozen
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial)))
        self.vera_lambda_b = nn.Parameter(torch.zeros(out_features))
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_b) B diag(lambda_d) A, (out x in)."""
        A, B = self.vera_A[:, : self.in_features], self.vera_B[: self.out_features]
        return self.vera_lambda_b[:, None] * (B * self.vera_lambda_d[None, :]) @ A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        if self.merged:
            return result
        A, B = self.vera_A[:, : self.in_features], self.vera_B[: self.out_features]  # (r, in), (out, r)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), A), B)
        return (result + update).to(result.dtype)


def add_vera(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR, r: int = 256, d_initial: float = 0.1,
             projection_prng_key: int = 0, dropout: float = 0.0,
             modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """Wrap the target Linear layers in :class:`VeRALinear` sharing one (A, B) pair, in place."""
    r, _, dropout = check_lora_args(r, 1.0, dropout, "kaiming")
    d_initial = check_real("d_initial", d_initial, what="the initial value of the vector d")
    projection_prng_key = check_int("projection_prng_key", projection_prng_key, low=0)
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "VeRA")
    shapes = [model.get_submodule(n).weight.shape for n in names]  # (out, in)
    max_out, max_in = max(s[0] for s in shapes), max(s[1] for s in shapes)
    vera_A, vera_B = vera_projections(r, max_in, max_out, projection_prng_key)
    replace_layers(model, names, build=lambda name, base: VeRALinear(base, vera_A, vera_B, r, d_initial, dropout),
                   check=lambda name, base: check_vera_base(base))
    return freeze_all_but_adapters(model, save_names)  # the two vectors of each layer and the modules_to_save
