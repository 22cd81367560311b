"""AdaLoRA from scratch: an SVD-shaped update whose rank budget moves to where it matters.

AdaLoRA (Zhang et al., 2023, arXiv:2303.10512) writes each update in the form of a
singular value decomposition and prunes singular values during training:

    h = W x + (alpha / (ranknum + 1e-5)) * P diag(lambda) Q x
        Q = lora_A (r x in), lambda = lora_E (r x 1), P = lora_B (out x r)

No SVD is ever computed: P, lambda and Q are ordinary trainable tensors, and a soft penalty
(:func:`orth_regularization`) pulls P and Q towards orthogonality. A
:class:`RankAllocator` scores each triplet (P_i, lambda_i, Q_i) by smoothed sensitivity
times uncertainty and zeroes the lambda_i of the least important triplets *globally*, so
layers that need rank keep it and others give it away. The total budget shrinks from
``init_r`` per layer to ``target_r`` per layer on a cubic schedule.

Everything follows PEFT's AdaLoRA (``peft/tuners/adalora/layer.py``: ``SVDLinear``,
``RankAllocator``; ``model.py``: ``AdaLoraModel.update_and_allocate`` and the orthogonal
penalty added in ``AdaLoraModel.forward``) number for number: same random-number draws
at initialisation, same order of floating-point operations, same budget arithmetic, same
tie rule when masking (a triplet whose score equals the threshold is masked too). The code
is our own; where PEFT does something surprising it is noted next to the line:

* the scaling divides by ``ranknum + 1e-5`` where ``ranknum`` is the *initial* rank, not
  the number of triplets still alive;
* the orthogonality penalty is the mean of Frobenius norms (not squared, unlike the
  paper's formula);
* the final mask is computed from the scores of the step before ``total_step - tfinal``
  (no score update happens at that step), after which the scores are reset.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .checks import check_prob, plain_number
from .lora import LOW_PRECISION_DTYPES, MergesIntoBase
from .surgery import (
    ALL_LINEAR,
    check_base_layer,
    conv1d_type,
    freeze_all_but_adapters,
    plan_adapter_targets,
    replace_layers,
)

RANKNUM_EPS = 1e-5  # PEFT's guard in alpha / (ranknum + 1e-5)
FACTORS = ("lora_A", "lora_E", "lora_B")  # Q, lambda, P


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_adalora_args(r: int, alpha: float, dropout: float, arg: str = "r") -> tuple[int, float, float]:
    """Raise a ``ValueError`` naming the argument for a bad rank, alpha or dropout; returns
    ``(r, alpha, dropout)`` as Python numbers (a numpy integer becomes an ``int``)."""
    if not _is_int(r) or r < 1:
        raise ValueError(f"{arg} must be an int >= 1 (the initial rank of each update), got {arg}={r!r}")
    if not _is_real(alpha) or not math.isfinite(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a finite number > 0 (scaling = alpha / (ranknum + 1e-5)), got alpha={alpha!r}")
    if not _is_real(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got dropout={dropout!r}")
    return int(r), plain_number(float(alpha), alpha), plain_number(float(dropout), dropout)


class SVDLinear(MergesIntoBase, nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus an SVD-shaped update ``P diag(lambda) Q``.

    ``forward(x) = base(x) + (dropout(x) @ (Q * lambda).T @ P.T) * alpha / (ranknum + 1e-5)``

    Attributes: ``base``, ``r``, ``alpha``, ``lora_A`` = Q (r x in), ``lora_E`` = lambda
    (r x 1), ``lora_B`` = P (out x r), ``ranknum`` (a frozen 1-element parameter holding
    the initial rank, as PEFT; it counts in the total parameters), ``merged``.

    Initialisation (as PEFT's ``AdaLoraLayer.update_layer`` + ``reset_lora_parameters``):
    lambda = 0, so the model starts unchanged; Q and P ~ N(0, 0.02^2). The global RNG is
    consumed in PEFT's order (three ``randn`` placeholders for Q, lambda, P, one for
    ``ranknum``, then the normal draws for Q and P), so one seed gives PEFT's factors.
    """

    cast_delta_on_unmerge = False  # PEFT's AdaLoRA subtracts the update without casting it
    adapter_parameter_names = FACTORS  # what freeze_all_but_adapters leaves trainable (not ranknum)

    def __init__(self, base: nn.Module, r: int = 12, alpha: float = 8.0, dropout: float = 0.0) -> None:
        super().__init__()
        r, alpha, dropout = check_adalora_args(r, alpha, dropout)
        check_base_layer(base)
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out = isinstance(base, conv1d_type())  # Conv1D stores W as (in, out)
        w = base.weight.T if self.fan_in_fan_out else base.weight
        self.out_features, self.in_features = w.shape
        self.r, self.alpha = r, alpha
        # PEFT: Identity for p = 0, so no random numbers are drawn in forward
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        A, E, B = self._initial_factors()
        self.lora_A = nn.Parameter(A)  # Q: (r, in), right singular vectors
        self.lora_B = nn.Parameter(B)  # P: (out, r), left singular vectors
        self.lora_E = nn.Parameter(E)  # lambda: (r, 1), singular values
        # the divisor of the scaling; PEFT keeps it in the base weight's dtype
        ranknum = torch.full((1,), float(r), device=base.weight.device, dtype=base.weight.dtype)
        self.ranknum = nn.Parameter(ranknum, requires_grad=False)

    @torch.no_grad()
    def _initial_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r, n_in, n_out = self.r, self.in_features, self.out_features
        A, E, B = torch.randn(r, n_in), torch.randn(r, 1), torch.randn(n_out, r)  # placeholders
        torch.randn(1)  # PEFT draws a placeholder for ranknum too, then fills it with r
        nn.init.zeros_(E)
        nn.init.normal_(A, mean=0.0, std=0.02)
        nn.init.normal_(B, mean=0.0, std=0.02)
        w = self.base.weight  # to the base's device and dtype, then fp16/bf16 upcast (as LoRALinear)
        factors = [t.to(w.device, w.dtype) for t in (A, E, B)]
        if w.dtype in LOW_PRECISION_DTYPES:
            factors = [t.float() for t in factors]
        return tuple(factors)  # type: ignore[return-value]

    @property
    def scaling(self) -> float:
        """``alpha / (ranknum + 1e-5)``: PEFT divides by the initial rank, whatever is masked."""
        return self.alpha / (float(self.ranknum) + RANKNUM_EPS)

    def delta_weight(self) -> torch.Tensor:
        """The update ``P @ (Q * lambda) * alpha / (ranknum + 1e-5)`` as (out x in)."""
        A, E, B = self.lora_A, self.lora_E, self.lora_B
        return B @ (A * E) * self.alpha / (self.ranknum + RANKNUM_EPS)  # (out, r) @ (r, in)

    def rank(self) -> int:
        """Number of triplets still alive (lambda_i != 0)."""
        return int((self.lora_E != 0).sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (batch, seq, out), frozen path
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)
        QE = self.lora_A * self.lora_E  # (r, in): row i of Q times lambda_i
        delta = (self.dropout(x) @ QE.T @ self.lora_B.T) * self.alpha / (self.ranknum + RANKNUM_EPS)
        return (result + delta).to(result.dtype)  # PEFT adds in place into the base output

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"rank now={self.rank()}, merged={self.merged}")


def svd_layers(model: nn.Module) -> dict[str, SVDLinear]:
    """Every :class:`SVDLinear` in ``model``, by name, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, SVDLinear)}


def add_adalora(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    init_r: int = 12,
    alpha: float = 8.0,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`SVDLinear`, in place; returns ``model``.

    Matching is :func:`~lora_course.lora.add_lora`'s (PEFT's rules; ``"all-linear"`` leaves
    out the output head). Trainable afterwards: every Q, lambda, P and the
    ``modules_to_save`` (trained whole, in place). Same layers, same factors for the same
    seed and same trainable parameters as ``get_peft_model(model, AdaLoraConfig(...))``.

    Raises:
        ValueError: bad argument, no matching layer, or a model that already has adapters.
    """
    init_r, alpha, dropout = check_adalora_args(init_r, alpha, dropout, arg="init_r")
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "AdaLoRA")
    replace_layers(model, names,  # named_modules order: PEFT's order, so the RNG stream is the same
                   build=lambda name, base: SVDLinear(base, init_r, alpha, dropout))
    return freeze_all_but_adapters(model, save_names)  # Q, lambda, P and the modules_to_save train


def orth_regularization(model: nn.Module) -> torch.Tensor:
    """Mean over all Q and P of ``||Q Q^T - I||_F`` and ``||P^T P - I||_F`` (not squared).

    This is the value PEFT's ``AdaLoraModel.forward`` multiplies by ``orth_reg_weight`` and
    adds to the loss (summed in the same order, so the result is bit-identical). A soft
    penalty only: nothing projects P or Q back onto orthogonal matrices.
    """
    layers = svd_layers(model)
    if not layers:
        raise ValueError("the model has no SVDLinear layers; call add_adalora(model, ...) first")
    total: torch.Tensor | int = 0
    count = 0
    for layer in layers.values():
        for cov in (layer.lora_A @ layer.lora_A.T, layer.lora_B.T @ layer.lora_B):  # (r, r) each
            eye = torch.eye(*cov.shape, out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return total / count  # type: ignore[return-value]


class RankAllocator:
    """Importance scores and the shrinking rank budget (PEFT's ``RankAllocator`` +
    ``AdaLoraModel.update_and_allocate``).

    For each trainable entry w of Q, lambda and P, after ``backward()``:

    * sensitivity ``I = |w * grad|``;
    * smoothed sensitivity ``Ibar <- beta1 * Ibar + (1 - beta1) * I``;
    * uncertainty ``U <- beta2 * U + (1 - beta2) * |I - Ibar|`` (with the *new* Ibar);
    * entry score ``s = Ibar * U``.

    Triplet i of a layer scores ``s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki)``. At an
    allocation step the ``budget`` best triplets over *all* layers survive; the other
    lambda_i are set to 0 (ties with the threshold are masked too, as PEFT).

    Schedule (``budget_schedule``): the budget is ``init_r * n_layers`` up to ``tinit``,
    then falls cubically to ``target_r * n_layers`` at ``total_step - tfinal``, masking
    every ``deltaT`` steps; at ``total_step - tfinal`` the final mask is forced and the
    scores are reset; after that the final mask is re-applied at every step.

    State (keyed by parameter name, e.g. ``"bert.encoder.layer.0.attention.self.query.lora_A"``):
    ``ipt``, ``exp_avg_ipt``, ``exp_avg_unc``. ``rank_pattern``: the last mask,
    ``{layer name: [bool] * r}`` (``None`` before the first allocation).
    """

    def __init__(self, model: nn.Module, init_r: int = 12, target_r: int = 8, tinit: int = 0,
                 tfinal: int = 0, deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85,
                 total_step: int | None = None) -> None:
        if total_step is None or not _is_int(total_step) or total_step < 1:
            raise ValueError(f"total_step must be an int >= 1 (the number of training steps), "
                             f"got total_step={total_step!r}")
        if not _is_int(init_r) or init_r < 1:
            raise ValueError(f"init_r must be an int >= 1, got init_r={init_r!r}")
        if not _is_int(target_r) or not 1 <= target_r <= init_r:
            raise ValueError(f"target_r must be an int in [1, init_r={init_r}] (the final average rank), "
                             f"got target_r={target_r!r}")
        for name, value in (("tinit", tinit), ("tfinal", tfinal)):
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {name}={value!r}")
        if tinit + tfinal >= total_step:
            raise ValueError(f"tinit + tfinal must be < total_step to leave a budgeting phase, got "
                             f"tinit={tinit}, tfinal={tfinal}, total_step={total_step}")
        if not _is_int(deltaT) or deltaT < 1:
            raise ValueError(f"deltaT must be an int >= 1 (steps between allocations), got deltaT={deltaT!r}")
        check_prob("beta1", beta1)
        check_prob("beta2", beta2)
        layers = svd_layers(model)
        if not layers:
            raise ValueError("the model has no SVDLinear layers; call add_adalora(model, ...) first")
        wrong = {n: m.r for n, m in layers.items() if m.r != init_r}
        if wrong:
            raise ValueError(f"init_r={init_r} differs from the rank of these SVDLinear layers: {wrong}")
        self.init_r, self.target_r, self.tinit, self.tfinal = init_r, target_r, tinit, tfinal
        self.deltaT, self.beta1, self.beta2, self.total_step = deltaT, beta1, beta2, total_step
        self.layer_names = list(layers)
        self.init_bgt = init_r * len(layers)  # triplets alive at the start
        self.target_bgt = target_r * len(layers)  # triplets alive at the end
        self.rank_pattern: dict[str, list[bool]] | None = None
        self.reset_ipt()

    def reset_ipt(self) -> None:
        """Forget all scores (PEFT does this right after the final mask)."""
        self.ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_ipt: dict[str, torch.Tensor] = {}
        self.exp_avg_unc: dict[str, torch.Tensor] = {}

    # -- schedule --------------------------------------------------------------------------

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)``: the number of triplets to keep at ``step``, and whether to mask."""
        tinit, tfinal, total = self.tinit, self.tfinal, self.total_step
        if step <= tinit:  # warm-up: full budget, no masking
            return self.init_bgt, False
        if step > total - tfinal:  # final fine-tuning: the target budget, mask fixed
            return self.target_bgt, True
        progress_left = 1 - (step - tinit) / (total - tfinal - tinit)  # 1 -> 0 over the schedule
        budget = int((self.init_bgt - self.target_bgt) * (progress_left ** 3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    # -- scores ----------------------------------------------------------------------------

    def _params(self, model: nn.Module):
        layers = svd_layers(model)
        if list(layers) != self.layer_names:
            raise ValueError("the model's SVDLinear layers are not the ones this RankAllocator was built for")
        for name, layer in layers.items():
            for factor in FACTORS:
                yield f"{name}.{factor}", getattr(layer, factor)

    @torch.no_grad()
    def update_ipt(self, model: nn.Module) -> None:
        """Update sensitivity, its EMA and the uncertainty EMA from the current gradients."""
        for key, p in self._params(model):
            if p.grad is None:
                raise ValueError(f"{key} has no gradient: call loss.backward() before update_ipt")
            if key not in self.ipt:
                self.exp_avg_ipt[key] = torch.zeros_like(p)
                self.exp_avg_unc[key] = torch.zeros_like(p)
            ipt = (p * p.grad).abs().detach()  # sensitivity |w * dL/dw|
            self.ipt[key] = ipt
            self.exp_avg_ipt[key] = self.beta1 * self.exp_avg_ipt[key] + (1 - self.beta1) * ipt
            self.exp_avg_unc[key] = (self.beta2 * self.exp_avg_unc[key]
                                     + (1 - self.beta2) * (ipt - self.exp_avg_ipt[key]).abs())

    def element_score(self, key: str) -> torch.Tensor:
        """``Ibar * U`` for every entry of one parameter."""
        return self.exp_avg_ipt[key] * self.exp_avg_unc[key]

    def triplet_scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``{layer name: (r,) scores}``: s(lambda_i) + mean_j s(Q_ij) + mean_k s(P_ki)."""
        if not self.exp_avg_ipt:
            raise ValueError("no importance scores yet: call update_ipt(model) after a backward pass")
        list(self._params(model))  # checks the layers
        scores = {}
        for name in self.layer_names:
            s_E = self.element_score(f"{name}.lora_E").view(-1)  # (r,)
            s_Q = torch.mean(self.element_score(f"{name}.lora_A"), dim=1, keepdim=True).view(-1)  # (r,)
            s_P = torch.mean(self.element_score(f"{name}.lora_B"), dim=0).view(-1)  # (r,)
            scores[name] = s_E + (s_Q + s_P)  # PEFT's order of additions
        return scores

    @torch.no_grad()
    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        """Keep the ``budget`` best triplets over all layers, zero the other lambda_i.

        Returns the rank pattern ``{layer name: [kept?] * r}``. The threshold is the
        ``(init_bgt - budget)``-th smallest score (``torch.kthvalue``); scores equal to it
        are masked too.
        """
        if not _is_int(budget) or not 0 <= budget <= self.init_bgt:
            raise ValueError(f"budget must be an int in [0, {self.init_bgt}], got budget={budget!r}")
        scores = self.triplet_scores(model)
        layers = svd_layers(model)
        if budget == self.init_bgt:  # nothing to drop (kthvalue has no 0th value)
            return {name: [True] * layers[name].r for name in self.layer_names}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=self.init_bgt - budget)[0].item()
        pattern = {}
        for name in self.layer_names:
            drop = scores[name] <= threshold  # (r,)
            layers[name].lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            pattern[name] = (~drop).tolist()
        return pattern

    @torch.no_grad()
    def apply_rank_pattern(self, model: nn.Module, pattern: dict[str, list[bool]]) -> None:
        """Zero the lambda_i that ``pattern`` drops (the final phase does this every step)."""
        layers = svd_layers(model)
        for name, keep in pattern.items():
            E = layers[name].lora_E
            E.masked_fill_(~torch.tensor(keep, device=E.device).view(-1, 1), 0.0)

    def update_and_allocate(self, model: nn.Module, step: int) -> tuple[int, dict[str, list[bool]] | None]:
        """Call after ``optimizer.step()`` and before ``zero_grad()`` (PEFT's order).

        Returns ``(budget, rank pattern if a mask was applied at this step else None)``.
        """
        end = self.total_step - self.tfinal
        if step < end:  # budgeting phase (and warm-up): score, and mask on schedule
            self.update_ipt(model)
            budget, mask_now = self.budget_schedule(step)
            if not mask_now:
                return budget, None
            self.rank_pattern = self.mask_to_budget(model, budget)
            return budget, self.rank_pattern
        if step == end:  # final allocation from the last scores (no update at this step)
            budget, _ = self.budget_schedule(step)
            self.rank_pattern = self.mask_to_budget(model, budget)
            self.reset_ipt()
            return budget, self.rank_pattern
        if self.rank_pattern is None:
            raise ValueError(f"step={step} is past total_step - tfinal={end} but no final mask exists; "
                             f"call update_and_allocate at every step from 1 (or 0)")
        self.apply_rank_pattern(model, self.rank_pattern)  # keep the final mask fixed
        return self.target_bgt, self.rank_pattern

    def ranks(self) -> dict[str, int]:
        """Triplets kept per layer by the last mask (``init_r`` everywhere before any mask)."""
        if self.rank_pattern is None:
            return {name: self.init_r for name in self.layer_names}
        return {name: int(sum(keep)) for name, keep in self.rank_pattern.items()}


def magnitude_scores(model: nn.Module) -> dict[str, torch.Tensor]:
    """The magnitude-only score ``lambda_i^2 * ||P_i||^2 * ||Q_i||^2`` per triplet (what AdaLoRA
    does *not* use; for the comparison in notebook 07). ``{layer name: (r,)}``."""
    out = {}
    with torch.no_grad():
        for name, layer in svd_layers(model).items():
            lam = layer.lora_E.view(-1)  # (r,)
            out[name] = lam**2 * (layer.lora_B**2).sum(0) * (layer.lora_A**2).sum(1)
    return out
