"""Delta-LoRA (arXiv 2309.02411): also move the frozen W by the change of the low-rank product.

What it changes: after every optimizer step t (past ``start_step``), the base weight takes
the step the adapter took, amplified: ``W <- W + update_ratio * (s B_{t+1} A_{t+1} - s B_t A_t)``
(the paper's Algorithm 1 with lambda = ``update_ratio``, s the LoRA scaling; it also drops the
adapter's dropout so that dL/dW equals dL/d(BA)). W then changes in full rank over training
at no extra memory: no gradient or optimizer state for W. What it costs: one (out x in)
product per layer and step, and the adapter alone no longer describes the fine-tune (W moved).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora import LoRALinear, lora_layers


class DeltaLoRA:
    """Call :meth:`step` right after ``optimizer.step()``; it updates every LoRA layer's base weight."""

    def __init__(self, model: nn.Module, update_ratio: float = 2.0, start_step: int = 0) -> None:
        if isinstance(update_ratio, bool) or not isinstance(update_ratio, (int, float)) or update_ratio < 0:
            raise ValueError(f"update_ratio must be a number >= 0, got {update_ratio!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.layers: dict[str, LoRALinear] = lora_layers(model)
        if not self.layers:
            raise ValueError("model has no LoRA layers: add_lora first")
        self.update_ratio, self.start_step, self.steps = float(update_ratio), start_step, 0
        self.previous = {name: layer.delta_weight().detach().clone() for name, layer in self.layers.items()}

    @torch.no_grad()
    def step(self) -> None:
        """W += update_ratio * (new product - previous product), once ``start_step`` steps have passed."""
        self.steps += 1
        for name, layer in self.layers.items():
            product = layer.delta_weight().detach()  # (out, in) = s B A
            if self.steps > self.start_step:
                change = self.update_ratio * (product - self.previous[name])
                weight = layer.base.weight
                weight += (change.T if layer.fan_in_fan_out else change).to(weight.dtype)
            self.previous[name] = product.clone()
