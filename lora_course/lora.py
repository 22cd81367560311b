"""LoRA from scratch: the layer, injecting it into a model, merging it back, counting.

LoRA (Hu et al., 2021, arXiv:2106.09685) freezes a pretrained weight W (out x in) and
learns a low-rank update instead:

    h = W x + (alpha / r) * B A x        A: (r x in), B: (out x r), r << min(in, out)

B starts at zero, so the adapted model starts out equal to the pretrained one.

Everything here follows PEFT's ``LoraConfig`` / ``lora.Linear`` semantics number for
number (same initialisation, same random-number stream, same dtype rules, same order of
floating-point operations), so results can be compared with ``torch.equal``. This file
knows only about layers and module names; reading and writing adapters lives in
``peft_io.py``.

Model-level plumbing mirrors PEFT:

* ``add_lora`` matches names as PEFT's ``check_target_module_exists``: a ``str`` is a
  regular expression that must match the whole name (``re.fullmatch``), except the
  shorthand ``"all-linear"``; a list matches a name equal to an entry or ending with
  ``"." + entry``.
* ``modules_to_save`` are matched as PEFT does (the name ends with the entry) and trained
  in place. PEFT instead keeps a frozen original and trains a copy
  (``ModulesToSaveWrapper``); :func:`count_parameters` counts that copy so that its
  totals equal PEFT's ``get_nb_trainable_parameters()``.
"""

from __future__ import annotations

import math
import numbers
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

INITS = ("kaiming", "gaussian", "pissa")
ALL_LINEAR = "all-linear"
# Names PEFT checks for a classification head when the model has no output embedding
# (PEFT's SEQ_CLS_HEAD_NAMES).
# Set on each module listed in ``modules_to_save`` (trained in place, saved whole).
MODULES_TO_SAVE_FLAG = "_lora_course_module_to_save"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class UnsupportedLayerError(TypeError, ValueError):
    """A layer LoRA cannot wrap. Both a ``TypeError`` (wrong type) and a ``ValueError``
    (the course's error for bad input), so either ``except`` catches it."""


def _conv1d_type() -> type:
    """transformers' GPT-2 ``Conv1D`` (imported lazily: transformers is slow to import)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_lora_target_type(module: nn.Module) -> bool:
    """True for the layer types LoRALinear wraps: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, _conv1d_type()))


def check_lora_args(r: int, alpha: float, dropout: float, init: str) -> None:
    """Raise a ``ValueError`` naming the argument for a bad r, alpha, dropout or init."""
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r must be an int >= 1 (the rank of the update), got r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0:
        raise ValueError(f"alpha must be a number > 0 (scaling = alpha / r), got alpha={alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got dropout={dropout!r}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is unknown; allowed values: {', '.join(INITS)}")


def _kaiming_uniform(rows: int, cols: int) -> torch.Tensor:
    """A (rows x cols) float32 tensor drawn like ``nn.Linear``'s default weight init."""
    w = torch.empty(rows, cols)  # default device and dtype, as nn.Linear(cols, rows)
    return nn.init.kaiming_uniform_(w, a=math.sqrt(5))


def check_base_layer(base: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``base`` is an ``nn.Linear`` or a ``Conv1D``."""
    if not is_lora_target_type(base):
        raise UnsupportedLayerError(
            f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}"
        )


@torch.no_grad()
def draw_factors(r: int, in_features: int, out_features: int, init: str = "kaiming") -> tuple[torch.Tensor, torch.Tensor]:
    """A (r x in) and B (out x r) in float32 on the default device, drawn as PEFT draws them.

    PEFT builds A and B as nn.Linear layers, whose constructors draw kaiming-uniform weights
    from the global RNG before PEFT's own init overwrites them. We draw the same numbers, so
    one seed gives PEFT's A exactly and leaves the RNG where PEFT does. ``init`` is
    ``"kaiming"`` (A kaiming-uniform, B zeros) or ``"gaussian"`` (A normal, std 1/r, B zeros).
    """
    A = _kaiming_uniform(r, in_features)  # (r, in)
    B = _kaiming_uniform(out_features, r)  # (out, r)
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
        delta = self.delta_weight()
        self.base.weight.data += delta.T if self.fan_in_fan_out else delta  # in W's dtype, as PEFT
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of the base weight; warns if not merged."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge(): not merged; nothing done", UserWarning, stacklevel=2)
            return
        delta = self.delta_weight()
        if self.cast_delta_on_unmerge:
            delta = delta.to(self.base.weight.dtype)
        self.base.weight.data -= delta.T if self.fan_in_fan_out else delta
        self.merged = False

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

    # the trainable tensors :func:`mark_trainable` unfreezes (subclasses such as DoRA add theirs)
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
        check_lora_args(r, alpha, dropout, init)
        check_base_layer(base)
        self.base = base.requires_grad_(False)
        self.fan_in_fan_out = isinstance(base, _conv1d_type())  # Conv1D stores W as (in, out)
        out_features, in_features = self._weight().shape
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.init, self.use_rslora = r, alpha, init, bool(use_rslora)
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
            _kaiming_uniform(self.r, self.in_features), _kaiming_uniform(self.out_features, self.r)
            A, B = self._pissa_factors()
        else:
            A, B = draw_factors(self.r, self.in_features, self.out_features, self.init)
        # PEFT moves the factors to the base's device and dtype, then upcasts fp16/bf16 to
        # float32 (autocast_adapter_dtype=True): the values keep the base dtype's rounding.
        w = self.base.weight
        A, B = A.to(w.device, w.dtype), B.to(w.device, w.dtype)
        if w.dtype in _LOW_PRECISION:
            A, B = A.float(), B.float()
        return A, B

    def _pissa_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA's factors (:func:`lora_course.variants.pissa.pissa_factors`); the base weight
        becomes the residual W - scaling B A."""
        from .variants.pissa import pissa_factors  # the variant owns the math

        dtype, r = self.base.weight.dtype, self.r
        if dtype not in (torch.float32, *_LOW_PRECISION):
            raise ValueError(f"init='pissa' needs a float32/float16/bfloat16 base weight, got {dtype}")
        if r > min(self.in_features, self.out_features):
            raise ValueError(f"init='pissa' needs r <= min(in, out) = "
                             f"{min(self.in_features, self.out_features)}, got r={r}")
        A, B, residual = pissa_factors(self._weight(), r, self.scaling)
        self.base.weight.data = residual.T if self.fan_in_fan_out else residual
        return A, B

    def delta_weight(self) -> torch.Tensor:
        """The update scaling * B @ A as an (out x in) tensor (a Linear weight's layout)."""
        A, B = self.lora_A, self.lora_B
        if A.device.type == "cpu" and A.dtype in _LOW_PRECISION:
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


@runtime_checkable
class MergeableAdapter(Protocol):
    """What :func:`merge_lora` needs from a wrapper (LoRA, QLoRA, DoRA, AdaLoRA's SVDLinear):
    a method returning a plain layer that holds the merged weight."""

    def merged_module(self) -> nn.Module: ...


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter wrapper in ``model`` (any module with ``merged_module()``), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MergeableAdapter)}


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / ``Conv1D`` in ``model`` (in ``named_modules`` order)."""
    return [name for name, m in model.named_modules() if name and is_lora_target_type(m)]


def modules_to_save_names(model: nn.Module) -> list[str]:
    """Names of the modules that :func:`add_lora` made trainable through ``modules_to_save``."""
    return [name for name, m in model.named_modules() if getattr(m, MODULES_TO_SAVE_FLAG, False)]


# -- name matching (PEFT's rules) -------------------------------------------------------


def _output_head_name(model: nn.Module) -> str | None:
    """The output head PEFT's "all-linear" leaves out: the output embedding (``lm_head``).

    A model without one (a sequence classifier) keeps its ``classifier``/``score`` head among
    the targets, as PEFT does with no ``task_type``; listing the head in ``modules_to_save``
    (what PEFT's ``task_type="SEQ_CLS"`` does for you) trains it whole instead.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    head = model.get_output_embeddings()
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if m is head), None)


def _excluded_by_modules_to_save(name: str, modules_to_save: Sequence[str] | None) -> bool:
    # PEFT never puts an adapter inside a module that is saved whole
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None  # a regex over the whole name
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def _linear_names_hint(model: nn.Module) -> str:
    names = linear_layer_names(model)
    if not names:
        return "the model has no nn.Linear or Conv1D layer"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    full = ", ".join(names) if len(names) <= 40 else f"{', '.join(names[:40])}, ..."
    return f"its linear layers are named {short} ({len(names)} in all: {full})"


def _check_names_arg(value: object, arg: str, allow_str: bool) -> None:
    is_list = isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)
    if not (is_list or (allow_str and isinstance(value, str))):
        kinds = "a list of module names"
        if allow_str:
            kinds = "a str (a regex, or 'all-linear') or " + kinds
        raise ValueError(f"{arg} must be {kinds}, got {arg}={value!r}")


def find_lora_targets(
    model: nn.Module,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    modules_to_save: Sequence[str] | None = None,
    exclude_modules: str | Sequence[str] | None = None,
) -> list[str]:
    """Names of the modules PEFT would adapt for this ``target_modules`` (see module doc).

    Raises:
        ValueError: nothing matches (the message lists the model's linear layers), or a
            matched module is not an ``nn.Linear`` / ``Conv1D``.
    """
    _check_names_arg(target_modules, "target_modules", allow_str=True)
    named = [(n, m) for n, m in model.named_modules() if n]
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = _output_head_name(model)
        names = [n for n, m in named if is_lora_target_type(m) and n != head]
    else:
        names = [n for n, _ in named if _matches(n, target_modules)]
    names = [n for n in names if not _excluded_by_modules_to_save(n, modules_to_save)]
    if exclude_modules:
        names = [n for n in names if not _matches(n, exclude_modules)]
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module; {_linear_names_hint(model)}"
        )
    modules = dict(named)
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_lora_target_type(modules[n])]
    if wrong:
        raise ValueError(
            f"target_modules={target_modules!r} matched modules LoRALinear cannot wrap: "
            f"{', '.join(wrong)}; only nn.Linear and Conv1D are supported; {_linear_names_hint(model)}"
        )
    return names


def find_modules_to_save(
    model: nn.Module, modules_to_save: Sequence[str] | None, strict: bool = True
) -> list[str]:
    """Names of the modules matched by ``modules_to_save`` (PEFT: the name ends with an entry).

    With ``strict``, a ``ValueError`` if no entry matches and a warning for each entry that
    matches nothing.
    """
    if modules_to_save is None:
        return []
    _check_names_arg(modules_to_save, "modules_to_save", allow_str=False)
    every = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    names = [n for n in every if any(n.endswith(t) for t in modules_to_save)]
    if strict:
        if modules_to_save and not names:
            raise ValueError(f"modules_to_save={list(modules_to_save)!r} matched no module of the model")
        unmatched = [t for t in modules_to_save if not any(n.endswith(t) for n in names)]
        if unmatched:
            warnings.warn(f"modules_to_save entries matched no module: {unmatched}", UserWarning,
                          stacklevel=3)
    return list(dict.fromkeys(names))


# -- model-level operations ----------------------------------------------------------------


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def wrap_layers(model: nn.Module, settings: dict[str, dict], dropout: float = 0.0,
                init: str = "kaiming", use_rslora: bool = False) -> None:
    """Replace each named layer by a LoRALinear, in ``named_modules`` order (PEFT's order,
    which keeps the random-number stream the same). ``settings[name] = {"r": .., "alpha": ..}``."""
    for name in settings:  # callers pass names in named_modules order
        layer = LoRALinear(model.get_submodule(name), dropout=dropout, init=init,
                           use_rslora=use_rslora, **settings[name])
        _set_submodule(model, name, layer)


def mark_trainable(model: nn.Module, modules_to_save: Iterable[str] = ()) -> None:
    """Freeze everything except the LoRA factors and the ``modules_to_save`` (flagged)."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        for name in layer.adapter_parameter_names:  # DoRA adds its magnitude
            getattr(layer, name).requires_grad_(True)
    for name in modules_to_save:
        module = model.get_submodule(name)
        module.requires_grad_(True)
        setattr(module, MODULES_TO_SAVE_FLAG, True)


def plan_adapter_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    modules_to_save: Sequence[str] | None,
    kind: str = "LoRA",
) -> tuple[list[str], list[str]]:
    """The layers an ``add_*`` function wraps and the modules it trains whole, checked.

    Shared by :func:`add_lora`, ``add_qlora``, ``add_dora`` and ``add_adalora``: refuses a model
    that already has adapter layers, matches targets and ``modules_to_save`` by PEFT's rules,
    and refuses a module that is both. Returns ``(target names, modules_to_save names)``.
    """
    if adapter_layers(model):
        raise ValueError(
            "model already has adapter layers (e.g. "
            f"{next(iter(adapter_layers(model)))!r}); call merge_lora(model) first"
        )
    save_names = find_modules_to_save(model, modules_to_save)
    names = find_lora_targets(model, target_modules, modules_to_save)
    clash = [n for n in names
             if any(n == s or n.startswith(s + ".") or s.startswith(n + ".") for s in save_names)]
    if clash:
        raise ValueError(f"modules {clash} are both {kind} targets and modules_to_save; pick one")
    return names, save_names


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
    check_lora_args(r, alpha, dropout, init)
    names, save_names = plan_adapter_targets(model, target_modules, modules_to_save, "LoRA")
    wrap_layers(model, {n: {"r": r, "alpha": alpha} for n in names}, dropout=dropout, init=init,
                use_rslora=use_rslora)
    mark_trainable(model, save_names)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every adapter wrapper and put its plain layer back (PEFT's ``merge_and_unload``).

    Works for any wrapper with ``merged_module()`` (LoRA here; QLoRA, DoRA, AdaLoRA
    later). Clears the ``modules_to_save`` flags: the result is a plain model. Returns
    ``model`` (or the plain layer if ``model`` itself is a wrapper).
    """
    if isinstance(model, MergeableAdapter):
        return model.merged_module()
    for name in list(adapter_layers(model)):  # outer names come first; none are nested
        _set_submodule(model, name, model.get_submodule(name).merged_module())
    for module in model.modules():
        if hasattr(module, MODULES_TO_SAVE_FLAG):
            delattr(module, MODULES_TO_SAVE_FLAG)
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
