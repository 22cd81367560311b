"""LoRA from scratch: the layer, and adding it to a model, merging it back, counting.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes a pretrained weight W (out x in) and
learns a low-rank update instead:

    h = W x + (alpha / r) * B A x        A: (r x in), B: (out x r), r << min(in, out)

B starts at zero, so the adapted model starts out equal to the pretrained one.

Everything here follows PEFT's ``LoraConfig`` / ``lora.Linear`` semantics number for
number (same initialisation, same random-number stream, same dtype rules, same order of
floating-point operations), so results can be compared with ``torch.equal``. This file
holds the layer's own math (PEFT's ``tuners/lora/layer.py``); which layers to adapt, how
they are swapped in and what trains is model surgery, shared by every method, in
``surgery.py`` (PEFT's ``model.py``); reading and writing adapters lives in ``peft_io.py``.
The names of ``surgery`` that this module used to define are still importable from here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_bool, check_int, check_real, plain_number
from .surgery import (  # several re-exported (see __all__): their old home was this module
    ALL_LINEAR,
    MODULES_TO_SAVE_FLAG,
    MergeableAdapter,
    ModuleSnapshot,
    UnsupportedLayerError,
    adapter_layers,
    check_base_layer,
    clear_modules_to_save,
    conv1d_type,
    find_lora_targets,
    find_modules_to_save,
    freeze_all_but_adapters,
    is_lora_target_type,
    linear_layer_names,
    modules_to_save_names,
    naming_layer,
    plan_adapter_targets,
    replace_layers,
    swap_modules,
)

__all__ = [
    # the LoRA layer
    "INITS", "LOW_PRECISION_DTYPES", "LoRALinear", "MergesIntoBase", "check_lora_args", "check_lora_layer",
    "draw_factors", "kaiming_uniform_factor", "lora_layers", "pissa_factors",
    # adding, merging, counting
    "add_lora", "count_parameters", "merge_lora", "wrap_layers", "mark_trainable",
    # re-exported from surgery
    "ALL_LINEAR", "MODULES_TO_SAVE_FLAG", "MergeableAdapter", "UnsupportedLayerError", "adapter_layers",
    "check_base_layer", "find_lora_targets", "find_modules_to_save", "freeze_all_but_adapters",
    "is_lora_target_type", "linear_layer_names", "modules_to_save_names", "plan_adapter_targets",
]

INITS = ("kaiming", "gaussian", "pissa")
#: dtypes whose adapter factors PEFT stores in float32 (``autocast_adapter_dtype=True``)
LOW_PRECISION_DTYPES = (torch.float16, torch.bfloat16)
#: the old name of :func:`~lora_course.surgery.freeze_all_but_adapters`
mark_trainable = freeze_all_but_adapters


def check_lora_args(r: int, alpha: float, dropout: float, init: str,
                    use_rslora: bool = False) -> tuple[int, float, float]:
    """Raise a ``ValueError`` naming the argument for a bad r, alpha, dropout, init or
    use_rslora; returns ``(r, alpha, dropout)`` as Python numbers (a numpy integer becomes an
    ``int``, so that what is stored and later written to JSON is a Python value; an integral
    ``alpha`` stays an ``int``)."""
    r = check_int("r", r, low=1)  # the rank of the update
    alpha = plain_number(check_real("alpha", alpha, low=0.0, low_open=True, what="scaling = alpha / r"), alpha)
    dropout = plain_number(check_real("dropout", dropout, low=0.0, high=1.0, high_open=True,
                                      what="a dropout probability"), dropout)
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"init={init!r} is unknown; allowed values: {', '.join(INITS)}")
    check_bool("use_rslora", use_rslora)
    return r, alpha, dropout


def check_lora_layer(base: nn.Module, r: int, alpha: float = 8.0, dropout: float = 0.0,
                     init: str = "kaiming", use_rslora: bool = False) -> None:
    """Everything :class:`LoRALinear` checks before it changes anything: the arguments, the
    layer type, and for ``init="pissa"`` the base weight's dtype and ``r <= min(in, out)``."""
    r, alpha, dropout = check_lora_args(r, alpha, dropout, init, use_rslora)
    check_base_layer(base)
    if init == "pissa":
        dtype = base.weight.dtype
        if dtype not in (torch.float32, *LOW_PRECISION_DTYPES):
            raise ValueError(f"init='pissa' needs a float32/float16/bfloat16 base weight, got {dtype}")
        if r > min(base.weight.shape):
            raise ValueError(f"init='pissa' needs r <= min(in, out) = {min(base.weight.shape)}, got r={r}")


def kaiming_uniform_factor(rows: int, cols: int) -> torch.Tensor:
    """A (rows x cols) float32 tensor drawn like ``nn.Linear``'s default weight init."""
    w = torch.empty(rows, cols)  # default device and dtype, as nn.Linear(cols, rows)
    return nn.init.kaiming_uniform_(w, a=math.sqrt(5))


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A (r x in), B (out x r), residual (out x in)) of PiSSA for a Linear ``weight`` (out x in).

    PiSSA (arXiv 2404.02948, :mod:`lora_course.variants.pissa`): ``W = V diag(S) Uh``,
    ``A = sqrt(S_r / s) Uh_r``, ``B = V_r sqrt(S_r / s)``, residual ``W - s B A``. The SVD runs
    in float32 (as PEFT: another dtype can flip singular-vector signs); A and B are float32,
    the residual is rounded once to ``weight``'s dtype.
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


@torch.no_grad()
def draw_factors(r: int, in_features: int, out_features: int, init: str = "kaiming") -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r) in float32 on the default device, drawn as PEFT draws them.

    PEFT builds A and B as nn.Linear layers, whose constructors draw kaiming-uniform weights
    from the global RNG before PEFT's own init overwrites them. We draw the same numbers, so
    one seed gives PEFT's A exactly and leaves the RNG where PEFT does. ``init`` is
    ``"kaiming"`` (A kaiming-uniform, B zeros) or ``"gaussian"`` (A normal, std 1/r, B zeros).
    """
    A = kaiming_uniform_factor(r, in_features)  # (r, in)
    B = kaiming_uniform_factor(out_features, r)  # (out, r)
    if init == "kaiming":
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        raise ValueError(f"init={init!r} is not drawn here; allowed values: kaiming, gaussian")
    nn.init.zeros_(B)
    return A, B


class MergesIntoBase:
    """``merge`` / ``unmerge`` / ``merged_module`` for wrappers that add ``delta_weight()`` to
    ``self.base.weight`` (LoRA, AdaLoRA's SVD form). Needs ``base``, ``merged``,
    ``fan_in_fan_out`` (Conv1D's (in, out) layout) and ``delta_weight()``.
    ``cast_delta_on_unmerge``: PEFT's LoRA casts the update to W's dtype before subtracting it,
    PEFT's AdaLoRA does not; each wrapper follows its reference."""

    cast_delta_on_unmerge: bool = True

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (W <- W + delta); warns if already merged."""
        if self.merged:
            warnings.warn(f"{type(self).__name__}.merge(): already merged; nothing done", UserWarning, stacklevel=2)
            return
        delta = self._checked_delta()
        self.base.weight.data += delta.T if self.fan_in_fan_out else delta  # in W's dtype, as PEFT
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight; warns if not merged."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged; nothing done", UserWarning, stacklevel=2)
            return
        delta = self._checked_delta()
        if self.cast_delta_on_unmerge:
            delta = delta.to(self.base.weight.dtype)
        self.base.weight.data -= delta.T if self.fan_in_fan_out else delta
        self.merged = False

    def _checked_delta(self) -> torch.Tensor:
        """``delta_weight()``, refused (ValueError, nothing changed) unless it has the weight's
        (out, in) shape: an in-place add would broadcast a factor of the wrong shape silently."""
        delta = self.delta_weight()
        w = self.base.weight
        shape = tuple(w.T.shape if self.fan_in_fan_out else w.shape)
        if tuple(delta.shape) != shape:
            raise ValueError(f"{type(self).__name__}: the update B @ A has shape {tuple(delta.shape)}, the base "
                             f"weight needs {shape} (were lora_A/lora_B replaced?); nothing was changed")
        return delta

    def merged_module(self) -> nn.Module:
        """The base layer with the update merged in (what :func:`merge_lora` puts in our place)."""
        if not self.merged:
            self.merge()
        return self.base


class LoRALinear(MergesIntoBase, nn.Module):
    """A frozen ``nn.Linear`` (or GPT-2 ``Conv1D``) plus a trainable low-rank update.

    ``forward(x) = base(x) + (dropout(x) @ A.T @ B.T) * scaling`` with
    ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``, arXiv:2312.03732).

    Args:
        base: the layer to adapt; its parameters are frozen.
        r: rank of the update (>= 1).
        alpha: numerator of the scaling (> 0).
        dropout: dropout probability on the LoRA branch only, in [0, 1).
        init: ``"kaiming"`` (A kaiming-uniform with a=sqrt(5), B = 0; PEFT's default),
            ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``"pissa"`` (A, B from the top r
            singular triplets of W; the base weight becomes the residual; arXiv:2404.02948).
        use_rslora: rank-stabilised scaling alpha / sqrt(r).

    Attributes: ``base``, ``r``, ``alpha``, ``scaling``, ``lora_A`` (r x in), ``lora_B``
    (out x r), ``merged``, ``fan_in_fan_out`` (True for ``Conv1D``, whose weight is (in x out)).

    Dtypes (as PEFT with ``autocast_adapter_dtype=True``): A and B live on the base's
    device; for a float16/bfloat16 base they are stored in float32 (after a round trip
    through the base dtype, as PEFT), the branch is computed in float32 and the sum is
    cast back to the base output's dtype.
    """

    # the trainable tensors surgery.freeze_all_but_adapters unfreezes (subclasses such as DoRA add theirs)
    adapter_parameter_names: tuple[str, ...] = ("lora_A", "lora_B")

    def __init__(
        self,
        base: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        check_lora_layer(base, r, alpha, dropout, init, use_rslora)  # before anything changes
        r, alpha, dropout = check_lora_args(r, alpha, dropout, init, use_rslora)  # Python numbers
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out = isinstance(base, conv1d_type())  # Conv1D stores W as (in, out)
        out_features, in_features = self._weight().shape
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.init, self.use_rslora = r, alpha, init, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        # PEFT uses Identity for p = 0 (no random numbers drawn); so do we
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        A, B = self._initial_factors()
        self.lora_A = nn.Parameter(A)  # (r, in)
        self.lora_B = nn.Parameter(B)  # (out, r)

    # -- weights ---------------------------------------------------------------------

    def _weight(self) -> torch.Tensor:
        """The base weight as a Linear weight, (out, in) (a transposed view for Conv1D)."""
        w = self.base.weight
        return w.T if self.fan_in_fan_out else w

    @torch.no_grad()
    def _initial_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.init == "pissa":
            # PEFT's nn.Linear constructors still draw from the RNG before the SVD init
            kaiming_uniform_factor(self.r, self.in_features), kaiming_uniform_factor(self.out_features, self.r)
            A, B = self._pissa_factors()
        else:
            A, B = draw_factors(self.r, self.in_features, self.out_features, self.init)
        # PEFT moves the factors to the base's device and dtype, then upcasts fp16/bf16 to
        # float32 (autocast_adapter_dtype=True): the values keep the base dtype's rounding.
        w = self.base.weight
        A, B = A.to(w.device, w.dtype), B.to(w.device, w.dtype)
        if w.dtype in LOW_PRECISION_DTYPES:
            A, B = A.float(), B.float()
        return A, B

    def _pissa_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA's factors (:func:`pissa_factors`, checked by :func:`check_lora_layer`); the base
        weight becomes the residual W - scaling B A."""
        A, B, residual = pissa_factors(self._weight(), self.r, self.scaling)
        self.base.weight.data = residual.T if self.fan_in_fan_out else residual
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * B @ A as an (out x in) tensor (a Linear weight's layout)."""
        A, B = self.lora_A, self.lora_B
        if A.device.type == "cpu" and A.dtype in LOW_PRECISION_DTYPES:
            # PEFT multiplies low-precision factors in float32 on CPU, then casts back
            return ((B.float() @ A.float()) * self.scaling).to(A.dtype)
        return (B @ A) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    # -- forward ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (batch, seq, out), frozen path
        if self.merged:
            return result
        x = x.to(self.lora_A.dtype)  # the branch runs in the adapter's dtype
        h = F.linear(self.dropout(x), self.lora_A)  # x @ A.T: (batch, seq, r)
        delta = F.linear(h, self.lora_B)  # h @ B.T: (batch, seq, out)
        return (result + delta * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
            f"scaling={self.scaling:.4g}, init={self.init!r}, merged={self.merged}"
        )


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def wrap_layers(model: nn.Module, settings: dict[str, dict], dropout: float = 0.0,
                init: str = "kaiming", use_rslora: bool = False) -> dict[str, LoRALinear]:
    """Replace each named layer by a LoRALinear, all or nothing, in ``named_modules`` order
    (PEFT's order, which keeps the random-number stream the same); returns the new layers.
    ``settings[name] = {"r": .., "alpha": ..}``."""
    return replace_layers(  # callers pass names in named_modules order
        model, list(settings),
        build=lambda name, base: LoRALinear(base, dropout=dropout, init=init, use_rslora=use_rslora,
                                            **settings[name]),
        check=lambda name, base: check_lora_layer(base, dropout=dropout, init=init, use_rslora=use_rslora,
                                                  **settings[name]),
    )


def add_lora(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    r: int = 8,
    alpha: float = 8.0,
    dropout: float = 0.0,
    init: str = "kaiming",
    use_rslora: bool = False,
    modules_to_save: Sequence[str] | None = None,
) -> nn.Module:
    """Wrap the target layers of ``model`` in :class:`LoRALinear`, in place; returns ``model``.

    Same result as ``peft.get_peft_model(model, LoraConfig(...))`` with the same arguments
    (same matched layers, same A for the same seed, same trainable parameters). Every
    parameter is frozen except the LoRA factors and the ``modules_to_save`` (trained in
    place, as a whole). ``"all-linear"`` leaves out the output head (``lm_head``) as PEFT
    does; a sequence classifier's ``classifier`` head is adapted like any linear layer unless
    it is in ``modules_to_save`` (PEFT's ``task_type="SEQ_CLS"`` adds it there for you): pass
    ``modules_to_save=["classifier"]`` to train a fresh classification head. The new
    layers start in training mode (``nn.Module``'s default, as PEFT's do, so dropout is on);
    call ``model.eval()`` for inference.

    Raises:
        ValueError: bad argument, no matching layer (the message lists the linear layers),
            a matched layer LoRA cannot wrap, or a model that already has adapter layers.
    """
    r, alpha, dropout = check_lora_args(r, alpha, dropout, init, use_rslora)
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "LoRA")
    wrap_layers(model, {n: {"r": r, "alpha": alpha} for n in names}, dropout=dropout, init=init,
                use_rslora=use_rslora)
    return freeze_all_but_adapters(model, save_names)


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter wrapper and put its plain layer back (PEFT's ``merge_and_unload``).

    Works for any wrapper with ``merged_module()`` (LoRA here; QLoRA, DoRA, AdaLoRA
    later). Clears the ``modules_to_save`` flags: the result is a plain model. Returns
    ``model`` (or the plain layer if ``model`` itself is a wrapper).

    All or nothing: if a layer cannot be merged, the layers merged before it are restored
    exactly (a copy of the adapter layers' tensors is kept while merging) and the error
    names the layer.
    """
    if isinstance(model, MergeableAdapter):
        return model.merged_module()
    layers = adapter_layers(model)
    snapshot = ModuleSnapshot(layers.values())  # merging changes base weights in place
    merged = {}
    try:
        for name, layer in layers.items():
            with naming_layer(name):
                merged[name] = layer.merged_module()
    except BaseException:
        snapshot.restore()  # the layers merged so far are put back exactly
        raise
    swap_modules(model, merged)
    clear_modules_to_save(model)
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, equal to PEFT's ``get_nb_trainable_parameters()``.

    Shared (tied) parameters count once. PEFT trains a *copy* of each ``modules_to_save``
    module and keeps the frozen original, so its total holds those parameters twice; we
    train in place and add the copy PEFT would hold to ``total``.
    """
    params = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    total = sum(p.numel() for p in params.values())
    saved = [model.get_submodule(name) for name in modules_to_save_names(model)]
    copies = {id(p): p for module in saved for p in module.parameters()}
    return trainable, total + sum(p.numel() for p in copies.values())
