"""LLM.int8() in a model, and LoRA on top of it (PEFT's ``lora.Linear8bitLt``).

:mod:`lora_course.quant.int8` holds the int8 format and the frozen :class:`Int8Linear`; this
module is the model level, as ``qlora.py`` is for NF4: :func:`add_int8` swaps a model's
linear layers for ``Int8Linear`` (what transformers' ``load_in_8bit`` does when it loads a
model), :class:`Int8LoRALinear` is LoRA on a frozen 8-bit base and :func:`add_int8_lora` wraps
the ``Int8Linear`` layers of a model in it. Matching and swapping go through
:mod:`lora_course.surgery`, so the names mean what they mean for ``add_lora``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .lora import check_lora_args, draw_factors
from .quant.int8 import Int8Linear, check_threshold, int8_layers
from .surgery import ALL_LINEAR, check_names_arg, find_lora_targets, freeze_all_but_adapters, name_matches, \
    replace_layers

__all__ = ["Int8LoRALinear", "add_int8", "add_int8_lora"]


def add_int8(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR, threshold: float = 6.0,
             skip_modules: Sequence[str] | None = None) -> nn.Module:
    """Replace the matched ``nn.Linear`` layers of ``model`` by :class:`Int8Linear`, in place.

    Names are matched as :func:`~lora_course.add_lora` (PEFT's rules; ``"all-linear"`` leaves
    out the output head ``lm_head``, as transformers' 8-bit loading does). ``skip_modules``
    (like ``BitsAndBytesConfig(llm_int8_skip_modules=...)``) keeps layers whose name equals an
    entry, ends with ``"." + entry`` or lies inside such a module, in full precision.
    Returns ``model``; its quantized layers are frozen.
    """
    threshold = check_threshold(threshold)
    if skip_modules is not None and (isinstance(skip_modules, str)
                                     or not all(isinstance(s, str) for s in skip_modules)):
        raise ValueError(f"skip_modules must be a list of module names, got skip_modules={skip_modules!r}")
    names = find_lora_targets(model, target_modules)
    skip = list(skip_modules or ())

    def skipped(name: str) -> bool:
        return any(name == s or name.endswith("." + s) or name.startswith(s + ".") or f".{s}." in name
                   for s in skip)

    names = [n for n in names if not skipped(n)]
    wrong = [n for n in names if type(model.get_submodule(n)) is not nn.Linear]
    if wrong:
        raise ValueError(f"add_int8 quantizes nn.Linear layers only; these matched layers are not: {wrong}")
    if not names:
        raise ValueError(f"no layer left to quantize after skip_modules={skip!r}")
    replace_layers(model, names, build=lambda name, base: Int8Linear(base, threshold=threshold))
    return model


class Int8LoRALinear(nn.Module):
    """LoRA on a frozen :class:`Int8Linear`: ``base(x) + (dropout(x) @ A.T @ B.T) * scaling``.

    PEFT's ``lora.Linear8bitLt`` does the same on bitsandbytes' ``Linear8bitLt``: A and B are
    drawn exactly as for an ``nn.Linear`` base (same random-number stream), stored in float32,
    and the branch runs in float32. ``merge()`` dequantizes the weight, adds ``scaling * B @ A``
    and quantizes again (PEFT does the same, so the merged layer is again int8 and a bit lossy).
    ``init="pissa"`` is not supported (it would need to rewrite the int8 weight).
    """

    adapter_parameter_names: tuple[str, ...] = ("lora_A", "lora_B")

    def __init__(self, base: Int8Linear, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 init: str = "kaiming", use_rslora: bool = False) -> None:
        super().__init__()
        r, alpha, dropout = check_lora_args(r, alpha, dropout, init, use_rslora)
        if not isinstance(base, Int8Linear):
            raise ValueError(f"base must be an Int8Linear, got {type(base).__name__}")
        if init == "pissa":
            raise ValueError("init='pissa' is not supported on an 8-bit base; allowed: kaiming, gaussian")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.init, self.use_rslora = r, alpha, init, use_rslora
        self.scaling = alpha / r**0.5 if use_rslora else alpha / r
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        A, B = draw_factors(r, self.in_features, self.out_features, init)
        device = base.weight.device
        self.lora_A = nn.Parameter(A.to(device))  # (r, in) float32
        self.lora_B = nn.Parameter(B.to(device))  # (out, r) float32

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` as an (out, in) tensor."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def _requantize(self, sign: float) -> None:
        w = self.base.dequantized_weight(torch.float32) + sign * self.delta_weight()  # (out, in)
        new = Int8Linear.from_float_weight(w, self.base.bias, threshold=self.base.threshold)
        self.base = new.to(self.base.weight.device).train(self.base.training)

    def merge(self) -> None:
        """Fold the update into the int8 weight (dequantize, add, quantize again)."""
        if not self.merged:
            self._requantize(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Take the update out again (another quantization round trip: not exact)."""
        if self.merged:
            self._requantize(-1.0)
            self.merged = False

    def merged_module(self) -> nn.Module:
        """The re-quantized :class:`Int8Linear` holding the merged weight (for ``merge_lora``)."""
        self.merge()
        return self.base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)  # (..., out) frozen 8-bit path
        if self.merged:
            return result
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)  # (..., r)
        delta = (F.linear(h, self.lora_B) * self.scaling).to(result.dtype)  # (..., out); PEFT's order
        return result + delta

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"scaling={self.scaling:.4g}, merged={self.merged}")


def add_int8_lora(model: nn.Module, target_modules: str | Sequence[str] = ALL_LINEAR, r: int = 8,
                  alpha: float = 8.0, dropout: float = 0.0, init: str = "kaiming",
                  use_rslora: bool = False) -> nn.Module:
    """Wrap the model's :class:`Int8Linear` layers (after :func:`add_int8`) in :class:`Int8LoRALinear`.

    ``target_modules`` as PEFT (a regex over the whole name, ``"all-linear"``, or a list of
    names / name suffixes); only ``Int8Linear`` layers are wrapped. Everything else is frozen,
    only the LoRA factors train. Same A for the same seed as PEFT's ``get_peft_model`` on a
    model whose linear layers are bitsandbytes' ``Linear8bitLt`` (layers in ``named_modules`` order).
    """
    r, alpha, dropout = check_lora_args(r, alpha, dropout, init, use_rslora)
    layers = int8_layers(model)
    if isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR:
        names = list(layers)
    else:
        check_names_arg(target_modules, "target_modules", allow_str=True)
        names = [n for n in layers if name_matches(n, target_modules)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no Int8Linear layer; "
                         f"the model's Int8Linear layers: {sorted(layers)[:40]} (call add_int8 first)")
    replace_layers(model, names, build=lambda name, base: Int8LoRALinear(
        base, r=r, alpha=alpha, dropout=dropout, init=init, use_rslora=use_rslora))
    return freeze_all_but_adapters(model)
