"""LoRA+ (arXiv 2402.12354): give B a larger learning rate than A.

What it changes: only the optimizer. A and B play different roles (B starts at zero and
maps to the output width), and the paper shows that one learning rate for both is
inefficient in wide models; LoRA+ sets lr_B = ratio * lr_A (ratio 16 by default). What it
costs: nothing in memory or time; one more hyper-parameter.
Parameter groups as ``peft.optimizers.create_loraplus_optimizer`` builds them, in its order:
A-like parameters (lr, weight decay), LoRA embedding factors (``lr_embedding``; this library
adapts no embeddings, so that group is empty), B and other 1-D parameters with decay
(lr * ratio), and those without decay (biases, LayerNorm weights: lr * ratio, decay 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _no_decay_names(model: nn.Module) -> set[str]:
    """Parameters that take no weight decay: biases and the weights of LayerNorm layers."""
    names = {n for n, _ in model.named_parameters() if "bias" in n}
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            names |= {f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters()}
    return names


def loraplus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0, lr_embedding: float = 1e-6,
                          weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """The four optimizer parameter groups of LoRA+ (each with ``params``, ``names``, ``lr``, ``weight_decay``)."""
    for name, value in (("lr", lr), ("lr_embedding", lr_embedding), ("weight_decay", weight_decay)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if isinstance(lr_ratio, bool) or not isinstance(lr_ratio, (int, float)) or lr_ratio <= 0:
        raise ValueError(f"lr_ratio must be a number > 0 (the paper uses 16), got {lr_ratio!r}")
    no_decay = _no_decay_names(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append((name, p))
        else:
            groups["A"].append((name, p))
    settings = {"A": (lr, weight_decay), "embedding": (lr_embedding, weight_decay),
                "B": (lr * lr_ratio, weight_decay), "B_no_decay": (lr * lr_ratio, 0.0)}
    return [{"params": [p for _, p in members], "names": [n for n, _ in members], "lr": settings[key][0],
             "weight_decay": settings[key][1]} for key, members in groups.items()]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW,
                              lr: float = 1e-3, lr_ratio: float = 16.0, lr_embedding: float = 1e-6,
                              weight_decay: float = 0.0, **optimizer_kwargs: Any) -> torch.optim.Optimizer:
    """``optimizer_cls`` over :func:`loraplus_param_groups` (extra keyword arguments go to the optimizer)."""
    groups = loraplus_param_groups(model, lr, lr_ratio, lr_embedding, weight_decay)
    for group in groups:
        group.pop("names")
    return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
