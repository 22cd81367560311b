"""LoRA-Pro (arXiv 2407.18242): adjust A's and B's gradients so LoRA's step matches full fine-tuning's.

One LoRA step changes W by the *equivalent gradient* ``g~ = s (B gA + gB A)`` (s the scaling).
Plain LoRA uses ``gA = s B^T g`` and ``gB = s g A^T`` (g = dL/dW), whose g~ can be far from g.
LoRA-Pro picks the gA, gB whose g~ is closest to g in Frobenius norm (the paper's
Theorem 2.1):

    gA* = (1/s) (B^T B)^-1 B^T g + X A,
    gB* = (1/s) [I - B (B^T B)^-1 B^T] g A^T (A A^T)^-1 - B X,

for any r x r matrix X (g~ does not depend on X). g itself is never formed: with the LoRA
gradients, B^T g = gA / s and g A^T = gB / s, so

    gA* = (1/s^2) (B^T B)^-1 gA,   gB* = (1/s^2) [gB - B (B^T B)^-1 gA A^T] (A A^T)^-1.

We take X = 0 (the paper chooses X to stay close to the plain gradients, Theorem 2.2; g~, the
quantity the method is about, is the same). Pseudo-inverses handle B = 0 at initialisation,
where gA* = 0 and gB* = (1/s^2) gB (A A^T)^-1, LoRA-FA's projected gradient (arXiv 2308.03303).
What it costs: two r x r inverses and a few (out x r)/(r x in) products per layer and step.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora import lora_layers


def _check_shapes(A: torch.Tensor, B: torch.Tensor, scaling: float) -> None:
    if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"A must be (r x in) and B (out x r) with the same r, got A {tuple(A.shape)}, B {tuple(B.shape)}")
    if not scaling > 0:
        raise ValueError(f"scaling must be > 0, got {scaling!r}")


def _optimal_from_lora_grads(A, B, grad_A, grad_B, scaling):
    """LoRA-Pro's (gA*, gB*) from the plain LoRA gradients (X = 0), in float64."""
    A64, B64, gA, gB = (t.double() for t in (A, B, grad_A, grad_B))
    inv_btb = torch.linalg.pinv(B64.T @ B64)  # (r, r)
    inv_aat = torch.linalg.pinv(A64 @ A64.T)  # (r, r)
    new_A = inv_btb @ gA / scaling**2  # (r, in)
    new_B = (gB - B64 @ (inv_btb @ gA) @ A64.T) @ inv_aat / scaling**2  # (out, r)
    return new_A.to(grad_A.dtype), new_B.to(grad_B.dtype)


def lora_pro_gradients(A: torch.Tensor, B: torch.Tensor, full_grad: torch.Tensor,
                       scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(gA*, gB*) whose equivalent gradient is the closest to ``full_grad`` (out x in)."""
    _check_shapes(A, B, scaling)
    if full_grad.shape != (B.shape[0], A.shape[1]):
        raise ValueError(f"full_grad must be (out x in) = {(B.shape[0], A.shape[1])}, got {tuple(full_grad.shape)}")
    grad_A, grad_B = scaling * B.T @ full_grad, scaling * full_grad @ A.T  # what plain LoRA gets
    return _optimal_from_lora_grads(A, B, grad_A, grad_B, scaling)


def equivalent_gradient(A: torch.Tensor, B: torch.Tensor, grad_A: torch.Tensor, grad_B: torch.Tensor,
                        scaling: float) -> torch.Tensor:
    """The change of W that one step with (grad_A, grad_B) stands for: s (B gA + gB A), (out x in)."""
    _check_shapes(A, B, scaling)
    return scaling * (B @ grad_A + grad_B @ A)


@torch.no_grad()
def apply_lora_pro(model: nn.Module) -> None:
    """Replace the .grad of every LoRA layer's A and B with LoRA-Pro's (call between backward and step)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: add_lora first")
    for layer in layers.values():
        A, B = layer.lora_A, layer.lora_B
        if A.grad is None or B.grad is None:
            continue
        A.grad, B.grad = _optimal_from_lora_grads(A, B, A.grad, B.grad, layer.scaling)
