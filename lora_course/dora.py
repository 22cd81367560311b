"""DoRA from scratch: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits each pretrained weight into a *magnitude* and a *direction* and fine-tunes them
separately: the magnitude is a trainable vector ``m`` with one entry per output feature,
the direction is the frozen weight plus a LoRA update, normalised row by row::

    W' = m * (W + s B A) / ||W + s B A||        s = alpha / r, norms per output row

``m`` starts at ``||W||`` (B = 0), so the adapted layer starts out equal to the frozen one.

Paper notation vs ``nn.Linear``: the paper writes ``W = m V / ||V||_c`` with ``V`` of shape
(d x k), ``m`` of shape (1 x k) and ``||.||_c`` the norm of each *column* (over d). One
column there holds the weights that feed one output feature. ``nn.Linear`` stores the
transpose, ``weight`` of shape (out, in), so the paper's column n is our *row* n and its
column norm is our ``torch.linalg.norm(weight, dim=1)``: one magnitude per output feature,
as in the paper's official code and in PEFT (``DoraLinearLayer.get_weight_norm``).

Semantics follow PEFT's ``LoraConfig(use_dora=True)`` (``peft/tuners/lora/dora.py``,
``DoraLinearLayer.forward``, and ``peft/tuners/lora/variants.py``, ``DoraLinearVariant``)
number for number:

* The norm ``||W + s B A||`` is computed without gradient and **detached** (paper section
  4.3): it still follows the current B A in value, but no gradient flows through it, which
  saves the memory of the norm's backward. ``detach_norm=False`` keeps it in the graph
  (the paper's un-simplified formula) for comparisons; PEFT has no such switch.
* The forward is written as a correction on top of the frozen layer's output::

      y = base(x) + (m/n - 1) * (x W^T) + (m/n) * s * (x A^T B^T)     n = ||W + s B A||

  which equals ``x W'^T + bias``. Dropout (train mode, p > 0) is applied as PEFT does:
  ``base(x)`` sees the clean x, both correction terms see ``dropout(x)`` (so with dropout
  the result is *not* ``dropout(x) W'^T``). Without dropout the base output is reused and
  its bias subtracted, saving a matmul.
* ``B A`` is computed through the factors' forward (``(A^T B^T)^T``), as PEFT does, so the
  rounding is the same.
* Merging: ``W' = m / ||W + dW|| * (W + dW)`` with ``dW = s B A`` (computed as for LoRA,
  ``(B @ A) * s``), rounded once to the base dtype; the bias is untouched.
* Dtypes: for a float16/bfloat16 base, A, B and m are stored in float32 (PEFT's
  ``autocast_adapter_dtype=True``); ``m`` is the row norm computed in the base dtype at
  init, then upcast (PEFT computes it before the upcast).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool
from .lora import LOW_PRECISION_DTYPES, LoRALinear, check_lora_args
from .surgery import ALL_LINEAR, freeze_all_but_adapters, plan_adapter_targets, replace_layers

__all__ = ["DoRALinear", "add_dora", "dora_layers"]


class DoRALinear(LoRALinear):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) adapted with DoRA: magnitude + LoRA direction.

    ``forward(x)`` computes ``x @ W'.T + bias`` with ``W' = m * (W + s B A) / ||W + s B A||``
    (norms per output row, detached), written as PEFT writes it (see the module docstring).

    Args:
        base: the layer to adapt; its parameters are frozen.
        r: rank of the direction update (>= 1).
        alpha: numerator of the scaling ``s = alpha / r`` (> 0).
        dropout: dropout probability on the adapter path, in [0, 1).
        detach_norm: treat ``||W + s B A||`` as a constant in backward (paper section 4.3,
            PEFT's behaviour; the default). ``False`` backpropagates through it.

    Attributes (besides :class:`~lora_course.lora.LoRALinear`'s): ``magnitude`` (out,), a
    trainable parameter initialised to the row norms of ``W + s B A`` (= ``||W||``, B = 0).

    Raises:
        ValueError: bad ``r``, ``alpha`` or ``dropout`` (the message names the argument), or
            a base that is not an ``nn.Linear`` / ``Conv1D``.
    """

    adapter_parameter_names = ("lora_A", "lora_B", "magnitude")

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        detach_norm: bool = True,
    ) -> None:
        super().__init__(base, r=r, alpha=alpha, dropout=dropout, init="kaiming")
        self.detach_norm = check_bool("detach_norm", detach_norm)
        self.magnitude = nn.Parameter(self._initial_magnitude())  # (out,)
        self._merge_norm: torch.Tensor | None = None  # the norm used by merge(), for unmerge()

    @torch.no_grad()
    def _initial_magnitude(self) -> torch.Tensor:
        """Row norms of ``W + s B A``, computed in the base dtype, stored in A's dtype."""
        W = self._weight()  # (out, in)
        A, B = self.lora_A, self.lora_B
        if W.dtype in LOW_PRECISION_DTYPES:  # PEFT runs this before upcasting A and B
            lora_weight = (B.float() @ A.float()).to(W.dtype)
        else:
            lora_weight = B @ A  # (out, in); zero at init
        norm = torch.linalg.norm(W + self.scaling * lora_weight, dim=1)  # (out,)
        return norm.to(A.dtype)

    # -- the decomposition -------------------------------------------------------------

    def lora_weight(self) -> torch.Tensor:
        """``B @ A`` (out, in), unscaled, computed as ``(A^T B^T)^T`` (PEFT's rounding)."""
        return F.linear(self.lora_A.T.contiguous(), self.lora_B).T  # (in, out) -> (out, in)

    def weight_norm(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``||W + s B A||`` per output row, (out,), without gradient (the detached norm)."""
        dtype = dtype or self.lora_A.dtype
        with torch.no_grad():
            lora_weight = self.lora_weight().to(dtype)
            return self._norm(self._weight().to(dtype), lora_weight)

    def _norm(self, W: torch.Tensor, lora_weight: torch.Tensor) -> torch.Tensor:
        weight = W + self.scaling * lora_weight  # (out, in): the un-normalised direction V + dV
        return torch.linalg.norm(weight, dim=1).to(weight.dtype)  # (out,)

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer applies, ``m * (W + s B A) / ||W + s B A||`` (out, in), float32+."""
        with torch.no_grad():
            dtype = torch.promote_types(self.lora_A.dtype, torch.float32)
            if self.merged:  # the base weight already is W'
                return self._weight().to(dtype).clone()
            V = self._weight().to(dtype) + self.scaling * self.lora_weight().to(dtype)
            return (self.magnitude.to(dtype) / torch.linalg.norm(V, dim=1))[:, None] * V

    # -- merging -----------------------------------------------------------------------

    @torch.no_grad()
    def merge(self) -> None:
        """Fold DoRA into the base weight: ``W <- m / ||W + dW|| * (W + dW)``; warns if merged."""
        if self.merged:
            warnings.warn("DoRALinear.merge(): already merged; nothing done", UserWarning, stacklevel=2)
            return
        w = self.base.weight
        delta = self.delta_weight()  # (out, in) = (B @ A) * s, as PEFT's get_delta_weight
        merged = self._weight() + 1 * delta  # (out, in): PEFT calls get_weight_norm with scaling=1
        norm = torch.linalg.norm(merged, dim=1).to(merged.dtype)  # (out,), from the unmerged W
        self._merge_norm = norm
        factor = (self.magnitude / norm)[:, None]  # (out, 1)
        if self.fan_in_fan_out:  # Conv1D stores W as (in, out)
            new = factor.T * (w + delta.T)
        else:
            new = factor * (w + delta)
        w.data = new.to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Recover the base weight, ``W = W' / (m / n) - dW`` (to float rounding); warns if not merged."""
        if not self.merged:
            warnings.warn("DoRALinear.unmerge(): not merged; nothing done", UserWarning, stacklevel=2)
            return
        w = self.base.weight
        delta = self.delta_weight()
        factor = (self.magnitude / self._merge_norm)[:, None]  # (out, 1)
        new = w / factor.T - delta.T if self.fan_in_fan_out else w / factor - delta
        w.data = new.to(w.dtype)
        self._merge_norm = None
        self.merged = False

    # -- forward -----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (batch, seq, out): the frozen layer on the clean x
        if self.merged:
            return result
        out_dtype = result.dtype
        x = x.to(self.lora_A.dtype)  # the adapter path runs in the adapter's dtype
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)  # PEFT: both correction terms see dropout(x) ...
            base_result = None  # ... so x W^T is recomputed on it
        else:
            base_result = result
        lora_weight = self.lora_weight().to(x.dtype)  # (out, in) = B A
        W = self._weight().to(x.dtype)  # (out, in)
        if self.detach_norm:
            norm = self._norm(W, lora_weight.detach()).detach()  # a constant for autograd
        else:
            norm = self._norm(W, lora_weight)  # gradient flows into A and B through the norm
        scale = (self.magnitude / norm).view(1, -1)  # m / ||W + s B A||, (1, out)
        lora_result = F.linear(F.linear(x, self.lora_A), self.lora_B)  # x A^T B^T: (batch, seq, out)
        if base_result is None:
            base_result = F.linear(x, W)  # x W^T without bias
        elif getattr(self.base, "bias", None) is not None:
            base_result = base_result - self.base.bias  # the bias is not rescaled
        correction = (scale - 1) * base_result + scale * lora_result * self.scaling
        return (result + correction).to(out_dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", detach_norm={self.detach_norm}"


def dora_layers(model: nn.Module) -> dict[str, DoRALinear]:
    """Every :class:`DoRALinear` in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DoRALinear)}


def add_dora(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`DoRALinear`, in place; returns ``model``.

    Same result as ``peft.get_peft_model(model, LoraConfig(use_dora=True, ...))`` with the
    same arguments: the same matched layers (PEFT's name rules, see
    :func:`~lora_course.add_lora`), the same A for the same seed (the layers are wrapped in
    ``named_modules`` order and draw from the global generator as PEFT does), the same
    trainable parameters (A, B, magnitude and the ``modules_to_save``). ``merge_lora``
    merges DoRA layers like LoRA ones.

    Raises:
        ValueError: bad argument (named in the message), no matching layer (the message
            lists the linear layers), a matched layer DoRA cannot wrap, or a model that
            already has adapter layers.
    """
    r, alpha, dropout = check_lora_args(r, alpha, dropout, "kaiming")
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "DoRA")
    replace_layers(model, names,  # named_modules order: PEFT's order, the same random-number stream
                   build=lambda name, base: DoRALinear(base, r=r, alpha=alpha, dropout=dropout))
    return freeze_all_but_adapters(model, save_names)
