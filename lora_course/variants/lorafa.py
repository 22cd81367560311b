"""LoRA-FA (arXiv 2308.03303): freeze A, train only B, with B's gradient projected.

What it changes: A stays at its random initialisation (frozen), so the backward pass no
longer needs the layer input for A's gradient and the activation memory of the LoRA branch
shrinks to the r-dimensional A x. The update is then ``dW = s dB A``; the B gradient that makes
it closest to full fine-tuning's gradient g (in Frobenius norm) is
``gB* = (1 / s^2) gB (A A^T)^-1`` with the plain LoRA gradient gB = s g A^T (the same
projection as LoRA-Pro with B = 0). What it costs: an r x r inverse per layer and step;
only half the LoRA parameters learn.

The optimizer follows ``peft.optimizers.create_lorafa_optimizer`` (AdamW in the form of
transformers' old ``AdamW``: eps 1e-6 added outside the square root, bias-corrected step
size, decoupled weight decay applied after the step; (A A^T + 1e-8 I) inverted with a
pseudo-inverse). One difference is a choice: PEFT computes the projected gradient under
bfloat16 autocast whenever bfloat16 is available (also on CPU), which rounds it to bfloat16;
``compute_dtype=torch.float32`` (our default) keeps float32, ``torch.bfloat16`` reproduces
PEFT bit for bit (tests/test_variants.py measures both).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..lora import lora_layers

PINV_DELTA = 1e-8


class LoRAFAOptimizer(torch.optim.Optimizer):
    """AdamW over B factors (projected gradients, A given per parameter) and any other trainable tensors."""

    def __init__(self, params: list[dict], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, compute_dtype: torch.dtype = torch.float32) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.bfloat16, got {compute_dtype!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.compute_dtype = compute_dtype

    def projected_grad(self, grad_B: torch.Tensor, A: torch.Tensor, scaling: float) -> torch.Tensor:
        """(1 / s^2) gB (A A^T + delta I)^+, computed in ``compute_dtype``, returned in gB's dtype."""
        inv = torch.linalg.pinv(A @ A.T + PINV_DELTA * torch.eye(A.shape[0], device=A.device, dtype=A.dtype))
        product = grad_B.to(self.compute_dtype) @ inv.to(self.compute_dtype)  # (out, r)
        return ((1 / scaling**2) * product).to(grad_B.dtype)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p, A, scaling in zip(group["params"], group["lora_A"], group["scaling"]):
                if p.grad is None:
                    continue
                grad = p.grad if A is None else self.projected_grad(p.grad, A, scaling)
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(state["exp_avg"], denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def create_lorafa_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0,
                            compute_dtype: torch.dtype = torch.float32) -> LoRAFAOptimizer:
    """Freeze every LoRA layer's A and return the LoRA-FA optimizer over what remains trainable.

    Each layer's own scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) is used, as PEFT reads
    it from the layer.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: add_lora first")
    partner: dict[int, tuple[torch.Tensor, float]] = {}
    for layer in layers.values():
        layer.lora_A.requires_grad_(False)  # LoRA-FA's own rule (A frozen), on top of add_lora's
        partner[id(layer.lora_B)] = (layer.lora_A, layer.scaling)
    params = [p for p in model.parameters() if p.requires_grad]
    group = {"params": params, "lora_A": [partner.get(id(p), (None, None))[0] for p in params],
             "scaling": [partner.get(id(p), (None, None))[1] for p in params]}
    return LoRAFAOptimizer([group], lr=lr, weight_decay=weight_decay, compute_dtype=compute_dtype)
