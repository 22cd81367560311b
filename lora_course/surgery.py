"""Model surgery shared by every adapter method: which layers to adapt, swapping them in, freezing.

PEFT separates a tuner's layer (``tuners/lora/layer.py``: the math of one adapted layer) from
the injection into a model (``tuners/lora/model.py``, ``tuners/tuners_utils.py``: matching
module names, replacing submodules, marking what trains). This module is the second half, for
every method of the course (LoRA, QLoRA, DoRA, AdaLoRA, the variants, LoRA on int8); it knows
module names and types, never an adapter's arithmetic, and imports nothing from the package.

Name matching follows PEFT's ``check_target_module_exists``:

* ``target_modules`` as a ``str`` is a regular expression that must match the whole name
  (``re.fullmatch``), except the shorthand ``"all-linear"`` (every ``nn.Linear`` / GPT-2
  ``Conv1D`` but the output head ``lm_head``);
* as a list it matches a name equal to an entry or ending with ``"." + entry``.
* ``modules_to_save`` are matched as PEFT does (the name ends with the entry) and trained in
  place. PEFT instead keeps a frozen original and trains a copy (``ModulesToSaveWrapper``);
  ``count_parameters`` counts that copy so that its totals equal PEFT's.

Adding adapters is all-or-nothing: :func:`replace_layers` checks every target, then builds
every new layer, and only then :func:`swap_modules` puts them all in place, so an error on a
later layer leaves the model as it was. :func:`freeze_all_but_adapters` is the one place that
decides what trains afterwards.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

from torch import nn

ALL_LINEAR = "all-linear"
# Set on each module listed in ``modules_to_save`` (trained in place, saved whole).
MODULES_TO_SAVE_FLAG = "_lora_course_module_to_save"

__all__ = [
    "ALL_LINEAR", "MODULES_TO_SAVE_FLAG", "MergeableAdapter", "ModuleSnapshot", "UnsupportedLayerError", "adapter_layers",
    "check_base_layer", "check_names_arg", "clear_modules_to_save", "conv1d_type",
    "excluded_by_modules_to_save", "find_lora_targets", "find_modules_to_save", "freeze_all_but_adapters",
    "is_lora_target_type", "linear_layer_names", "linear_names_hint", "modules_to_save_names", "naming_layer",
    "name_matches", "output_head_name", "plan_adapter_targets", "raw_weight_layers", "replace_layers", "set_submodule",
    "swap_modules",
]


# -- the layer types an adapter wraps ---------------------------------------------------------


class UnsupportedLayerError(TypeError, ValueError):
    """A layer LoRA cannot wrap. Both a ``TypeError`` (wrong type) and a ``ValueError``
    (the course's error for bad input), so either ``except`` catches it."""


def conv1d_type() -> type:
    """transformers' GPT-2 ``Conv1D`` (imported lazily: transformers is slow to import)."""
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_lora_target_type(module: nn.Module) -> bool:
    """True for the layer types LoRALinear wraps: ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, conv1d_type()))


def check_base_layer(base: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless ``base`` is an ``nn.Linear`` or a ``Conv1D``."""
    if not is_lora_target_type(base):
        raise UnsupportedLayerError(
            f"base must be an nn.Linear or a transformers Conv1D, got {type(base).__name__}"
        )


@runtime_checkable
class MergeableAdapter(Protocol):
    """What ``merge_lora`` needs from a wrapper (LoRA, QLoRA, DoRA, AdaLoRA's SVDLinear, ...):
    a method returning a plain layer that holds the merged weight."""

    def merged_module(self) -> nn.Module: ...


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every adapter wrapper in ``model`` (any module with ``merged_module()``), by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MergeableAdapter)}


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` / ``Conv1D`` in ``model`` (in ``named_modules`` order)."""
    return [name for name, m in model.named_modules() if name and is_lora_target_type(m)]


def raw_weight_layers(model: nn.Module) -> list[str]:
    """Names of linear layers whose parent reads ``.weight`` instead of calling them: the
    ``out_proj`` of every ``nn.MultiheadAttention`` (a ``NonDynamicallyQuantizableLinear``).
    A wrapper put there breaks the attention's forward or is never used."""
    return [f"{name}.out_proj" if name else "out_proj" for name, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and isinstance(getattr(m, "out_proj", None), nn.Linear)]


def modules_to_save_names(model: nn.Module) -> list[str]:
    """Names of the modules an ``add_*`` function made trainable through ``modules_to_save``."""
    return [name for name, m in model.named_modules() if getattr(m, MODULES_TO_SAVE_FLAG, False)]


# -- name matching (PEFT's rules) -------------------------------------------------------------


def output_head_name(model: nn.Module) -> str | None:
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


def excluded_by_modules_to_save(name: str, modules_to_save: Sequence[str] | None) -> bool:
    """True if ``name`` lies in a module saved whole (PEFT never puts an adapter inside one)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save or ())


def name_matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """PEFT's match: a ``str`` is a regex over the whole name; a list matches a name equal to
    an entry or ending with ``"." + entry``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None  # a regex over the whole name
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def linear_names_hint(model: nn.Module) -> str:
    """A sentence naming the model's linear layers, for error messages."""
    names = linear_layer_names(model)
    if not names:
        return "the model has no nn.Linear or Conv1D layer"
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    full = ", ".join(names) if len(names) <= 40 else f"{', '.join(names[:40])}, ..."
    return f"its linear layers are named {short} ({len(names)} in all: {full})"


def check_names_arg(value: object, arg: str, allow_str: bool) -> None:
    """Raise a ``ValueError`` naming ``arg`` unless ``value`` is a list of names (or, with
    ``allow_str``, a str: a regex or ``"all-linear"``)."""
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
    check_names_arg(target_modules, "target_modules", allow_str=True)
    named = [(n, m) for n, m in model.named_modules() if n]
    read_raw = set(raw_weight_layers(model))
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        head = output_head_name(model)
        names = [n for n, m in named if is_lora_target_type(m) and n != head]
        skipped = [n for n in names if n in read_raw]
        if skipped:
            warnings.warn(f"'all-linear' leaves out {skipped}: nn.MultiheadAttention reads its out_proj's "
                          "weight directly, so an adapter there would never be used (PEFT wraps it anyway "
                          "and its factors get no gradient)", UserWarning, stacklevel=3)
            names = [n for n in names if n not in read_raw]
    else:
        names = [n for n, _ in named if name_matches(n, target_modules)]
    inside_saved = [n for n in names if excluded_by_modules_to_save(n, modules_to_save)]
    names = [n for n in names if n not in inside_saved]
    if exclude_modules:
        names = [n for n in names if not name_matches(n, exclude_modules)]
    if not names and inside_saved:
        raise ValueError(
            f"target_modules={target_modules!r} matched only {inside_saved}, which lie in modules_to_save="
            f"{list(modules_to_save or ())!r} (trained whole, so no adapter goes inside them, as in PEFT); "
            "target other layers or drop them from modules_to_save"
        )
    if not names:
        raise ValueError(
            f"target_modules={target_modules!r} matched no module; {linear_names_hint(model)}"
        )
    modules = dict(named)
    raw = [n for n in names if n in read_raw]
    if raw:
        raise ValueError(
            f"target_modules={target_modules!r} matched {raw}, the out_proj of an nn.MultiheadAttention, "
            "which reads the weight directly (F.multi_head_attention_forward), so an adapter there would "
            "never run; leave it out (e.g. exclude_modules) or adapt the layers around the attention"
        )
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_lora_target_type(modules[n])]
    if wrong:
        raise ValueError(
            f"target_modules={target_modules!r} matched modules LoRALinear cannot wrap: "
            f"{', '.join(wrong)}; only nn.Linear and Conv1D are supported; {linear_names_hint(model)}"
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
    check_names_arg(modules_to_save, "modules_to_save", allow_str=False)
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


def plan_adapter_targets(
    model: nn.Module,
    target_modules: str | Sequence[str],
    modules_to_save: Sequence[str] | None,
    kind: str = "LoRA",
) -> tuple[list[str], list[str]]:
    """The layers an ``add_*`` function wraps and the modules it trains whole, checked.

    Shared by every ``add_*`` function: refuses a model that already has adapter layers,
    matches targets and ``modules_to_save`` by PEFT's rules, and refuses a module that is
    both. Returns ``(target names, modules_to_save names)``.
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


# -- swapping layers in, all or nothing ---------------------------------------------------------


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule called ``name`` (one swap, unchecked)."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def swap_modules(model: nn.Module, new_modules: Mapping[str, nn.Module]) -> nn.Module:
    """Put every ``new_modules[name]`` in place of ``model``'s submodule ``name``; returns ``model``.

    All or nothing: every name and module is checked before the first swap (each name an
    existing submodule, no name inside another, each value an ``nn.Module``).
    """
    existing = {n for n, _ in model.named_modules(remove_duplicate=False) if n}
    missing = [n for n in new_modules if n not in existing]
    if missing:
        raise ValueError(f"model has no submodule named {missing}; nothing was replaced")
    not_modules = [f"{n} ({type(m).__name__})" for n, m in new_modules.items() if not isinstance(m, nn.Module)]
    if not_modules:
        raise ValueError(f"replacements must be nn.Module instances, got {not_modules}; nothing was replaced")
    nested = [n for n in new_modules if any(n.startswith(o + ".") for o in new_modules)]
    if nested:
        raise ValueError(f"cannot replace {nested} and a module that holds them at once; nothing was replaced")
    for name, module in new_modules.items():
        set_submodule(model, name, module)
    return model


def replace_layers(
    model: nn.Module,
    names: Sequence[str],
    build: Callable[[str, nn.Module], nn.Module],
    check: Callable[[str, nn.Module], None] | None = None,
) -> dict[str, nn.Module]:
    """Replace each named layer by ``build(name, layer)``, all or nothing; returns the new layers.

    First ``check(name, layer)`` for every layer (it must raise for any layer ``build`` would
    refuse, so that a bad later layer fails before the first one is built: PiSSA's ``build``
    rewrites the base weight), then ``build`` for every layer in the order of ``names`` (PEFT's
    ``named_modules`` order, which keeps the random-number stream the same), then one
    :func:`swap_modules`. If a ``build`` still fails, the ``requires_grad`` flags the earlier
    builds changed (adapter layers freeze their base) are restored.
    """
    layers = {name: model.get_submodule(name) for name in names}
    if check is not None:
        for name, layer in layers.items():
            with naming_layer(name):
                check(name, layer)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    new = {}
    try:
        for name, layer in layers.items():
            with naming_layer(name):
                new[name] = build(name, layer)
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise
    swap_modules(model, new)
    return new


class naming_layer:  # noqa: N801 (used as a statement: ``with naming_layer(name):``)
    """Context manager: a ``ValueError``/``TypeError``/``RuntimeError`` raised inside is raised
    again, same type, with ``layer '<name>': `` in front of its message (unless it names the
    layer already) and "nothing was changed" after it; other errors get the layer as a note."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        message = str(exc)
        if f"'{self.name}'" in message:
            return False
        if kind in (ValueError, TypeError, RuntimeError, UnsupportedLayerError):
            raise kind(f"layer {self.name!r}: {message}; the model was not changed") from exc
        exc.add_note(f"(while changing layer {self.name!r}; the model was not changed)")
        return False


class ModuleSnapshot:
    """A copy of some modules' state that :meth:`restore` puts back exactly: every tensor's
    values, dtype and device (``.data``, cloned), each module's attributes (flags such as
    ``merged``, the submodule objects) and its ``requires_grad`` flags. Used to undo a
    model-wide change that failed on a later layer (:func:`~lora_course.merge_lora`). Costs
    one copy of the modules' tensors while it lives."""

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        self.modules = [m for top in modules for m in top.modules()]
        self.attrs = [(m, {k: (copy.copy(v) if isinstance(v, dict) else v) for k, v in vars(m).items()})
                      for m in self.modules]
        tensors = {id(t): t for m in self.modules for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]
                   if t is not None}
        self.tensors = [(t, t.data.clone(), t.requires_grad) for t in tensors.values()]

    def restore(self) -> None:
        for t, data, flag in self.tensors:
            t.data = data
            if t.is_leaf:
                t.requires_grad_(flag)
        for m, attrs in self.attrs:
            vars(m).clear()
            vars(m).update(attrs)


# -- what trains --------------------------------------------------------------------------------


def freeze_all_but_adapters(model: nn.Module, modules_to_save: Iterable[str] = ()) -> nn.Module:
    """Freeze every parameter except the adapters' own and the ``modules_to_save``; returns ``model``.

    An adapter layer lists its trainable tensors in ``adapter_parameter_names`` (LoRA's A and B,
    DoRA adds its magnitude, AdaLoRA's Q, lambda, P, VeRA's two vectors); each module named in
    ``modules_to_save`` is trained whole, in place, and flagged (:data:`MODULES_TO_SAVE_FLAG`).
    """
    model.requires_grad_(False)
    for module in model.modules():
        for name in getattr(module, "adapter_parameter_names", ()):
            getattr(module, name).requires_grad_(True)
    for name in modules_to_save:
        module = model.get_submodule(name)
        module.requires_grad_(True)
        setattr(module, MODULES_TO_SAVE_FLAG, True)
    return model


def clear_modules_to_save(model: nn.Module) -> None:
    """Remove every ``modules_to_save`` flag (the model is a plain model again)."""
    for module in model.modules():
        if hasattr(module, MODULES_TO_SAVE_FLAG):
            delattr(module, MODULES_TO_SAVE_FLAG)
