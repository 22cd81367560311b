"""LoRA-GA (arXiv 2407.05000): initialise A and B from the SVD of the full gradient.

GA means *Gradient Approximation* (not gradient accumulation): with the gradient g = dL/dW
estimated on a few batches before training, ``g ~ U S Vh``, the init ``A = Vh[:r]``,
``B = U[:, r:2r] S[r:2r]`` makes LoRA's first update approximate full fine-tuning's first
update (the best rank-2r approximation of g, up to the scale), and the frozen weight
absorbs ``-s B A`` so the model's function is unchanged at step 0. What it costs: one
forward/backward pass over the estimation batches with gradients for the target weights,
and one (randomized) SVD per layer.

As PEFT's ``init_lora_weights="lora_ga"`` with its defaults (``direction="ArB2r"``,
``scale="stable"``: B is multiplied by ``out_features ** 0.25 / sqrt(gamma)``, gamma = 16):
the SVD is ``torch.svd_lowrank(g, q=min(4r, min(g.shape)), niter=4)``, a randomized method
that draws from the global generator, and each layer first draws what PEFT's two
``nn.Linear`` constructors draw, so one seed gives PEFT's factors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..checks import check_real
from ..lora import LoRALinear, check_lora_args, kaiming_uniform_factor
from ..surgery import ALL_LINEAR, freeze_all_but_adapters, plan_adapter_targets, replace_layers


def estimate_gradients(model: nn.Module, target_names: Sequence[str], train_step: Callable[[], None]) -> dict[str, torch.Tensor]:
    """Mean dL/dW of each named layer over the backward passes ``train_step`` runs (only those
    weights get gradients meanwhile); the model's ``requires_grad`` flags are restored after."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # not surgery.freeze_all_but_adapters: here the *base* weights train, for one estimate, and
    # every flag is put back afterwards
    model.requires_grad_(False)
    layers = {n: model.get_submodule(n) for n in target_names}
    counts = dict.fromkeys(layers, 0)
    hooks = []
    for name, layer in layers.items():
        layer.weight.requires_grad_(True)
        layer.weight.grad = None
        hooks.append(layer.register_full_backward_hook(lambda *_, name=name: counts.__setitem__(name, counts[name] + 1)))
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            train_step()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    grads = {}
    for name, layer in layers.items():
        if counts[name] == 0:
            raise ValueError(f"train_step ran no backward pass through {name!r}")
        grads[name] = layer.weight.grad.detach() / counts[name]
        layer.weight.grad = None
    return grads


def check_lora_ga_rank(grad: torch.Tensor, r: int) -> None:
    """``grad`` must be 2-D (out x in) and ``r`` an int with 2r <= min(out, in); a ``ValueError`` if not."""
    if grad.ndim != 2:
        raise ValueError(f"grad must be a 2-D (out x in) matrix, got shape {tuple(grad.shape)}")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= 2 * r <= min(grad.shape):
        raise ValueError(f"r must be an int with 2r <= min(out, in) = {min(grad.shape)}, got {r!r}")


def lora_ga_factors(grad: torch.Tensor, r: int, gamma: float = 16.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r x in), B (out x r)) of LoRA-GA from a Linear layer's gradient (out x in), float32."""
    check_lora_ga_rank(grad, r)
    U, S, V = torch.svd_lowrank(grad.to(torch.float32), q=min(4 * r, min(grad.shape)), niter=4)  # g ~ U S V^T
    A = V.T[:r]  # (r, in): the top r right singular vectors
    B = U[:, r:2 * r] * S[r:2 * r]  # (out, r): the next r left singular vectors, scaled
    return A, B * (grad.shape[0] ** 0.25 / gamma ** 0.5)


def add_lora_ga(model: nn.Module, gradients: dict[str, torch.Tensor], target_modules: str | Sequence[str] = ALL_LINEAR,
                r: int = 8, alpha: float = 8.0, dropout: float = 0.0, gamma: float = 16.0,
                modules_to_save: Sequence[str] | None = None) -> nn.Module:
    """Wrap the targets in :class:`~lora_course.LoRALinear` with LoRA-GA's factors (in place);
    ``gradients`` maps each target's name to its estimated gradient (:func:`estimate_gradients`)."""
    r, alpha, dropout = check_lora_args(r, alpha, dropout, "kaiming")
    gamma = check_real("gamma", gamma, low=0.0, low_open=True, what="LoRA-GA's scale")
    if not isinstance(gradients, dict):
        raise ValueError(f"gradients must be a dict {{target name: gradient tensor}}, got {type(gradients).__name__}")
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "LoRA-GA")
    missing = [n for n in names if n not in gradients]
    if missing:
        raise ValueError(f"gradients has no entry for the targets {missing}; estimate them with estimate_gradients")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def build(name: str, base: nn.Module) -> LoRALinear:
        with torch.random.fork_rng():  # our constructor's own draws must not move the global stream
            layer = LoRALinear(base, r=r, alpha=alpha, dropout=dropout)
        # PEFT's two nn.Linear constructors draw these
        kaiming_uniform_factor(r, layer.in_features), kaiming_uniform_factor(layer.out_features, r)
        A, B = lora_ga_factors(gradients[name], r, gamma)
        dtype = base.weight.dtype
        factors[name] = A, B = A.to(dtype), B.to(dtype)
        with torch.no_grad():
            layer.lora_A.data, layer.lora_B.data = A.clone(), B.clone()
        return layer

    # named_modules order: PEFT's order, the same random-number stream; every rank checked first
    def check(name: str, base: nn.Module) -> None:
        grad, shape = gradients[name], tuple(base.weight.shape)
        if not isinstance(grad, torch.Tensor) or not grad.is_floating_point() or tuple(grad.shape) != shape:
            got = f"shape {tuple(grad.shape)}, {grad.dtype}" if isinstance(grad, torch.Tensor) else type(grad).__name__
            raise ValueError(f"gradients[{name!r}] must be a float tensor of the layer's weight shape {shape}, "
                             f"got {got}; nothing was changed")
        if not bool(torch.isfinite(grad).all()):
            raise ValueError(f"gradients[{name!r}] contains NaN or inf; nothing was changed")
        try:
            check_lora_ga_rank(grad, r)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}; nothing was changed") from None

    layers = replace_layers(model, names, build=build, check=check)
    with torch.no_grad():  # the frozen weights absorb -s B A only once every layer is built
        for name, layer in layers.items():
            (A, B), w = factors[name], layer.base.weight
            w.data = (w.float() - layer.scaling * (B.float() @ A.float())).to(w.dtype)
    return freeze_all_but_adapters(model, save_names)
