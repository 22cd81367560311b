"""The real components the library is checked against, built to hold the same numbers.

A check compares one of our layers with the reference it reimplements; the reference must
hold the same weight and the same adapter factors, or the comparison measures the set-up.
The builders here are shared by the tests and the benchmarks (bitsandbytes and PEFT are
imported when called).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn


def peft_lora_on_linear4bit(base: nn.Linear, r: int, alpha: float, lora_A: torch.Tensor, lora_B: torch.Tensor,
                            blocksize: int = 64, double_quant: bool = True,
                            compute_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
                            ) -> tuple[Any, nn.Module]:
    """PEFT's LoRA on bitsandbytes' ``Linear4bit`` (NF4) holding ``base``'s weight and bias,
    with the factors ``lora_A`` (r, in) and ``lora_B`` (out, r) copied in.

    bitsandbytes quantizes the weight when the module moves to ``device`` (its CPU path on
    the CPU, its CUDA kernels on a GPU). Returns ``(peft_model, lora_layer)``; the PEFT model
    is an ``nn.Sequential`` of the one layer, so ``peft_model(x)`` is the layer's output.
    """
    import bitsandbytes as bnb
    import peft

    lin = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None,
                            compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=double_quant)
    lin.weight = bnb.nn.Params4bit(base.weight.detach().cpu().clone(), requires_grad=False, quant_type="nf4",
                                   blocksize=blocksize, compress_statistics=double_quant)
    if base.bias is not None:
        lin.bias = nn.Parameter(base.bias.detach().cpu().clone(), requires_grad=False)
    model = nn.Sequential(lin).to(device)  # moving a Params4bit quantizes it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about an untyped task and a non-transformers model
        pm = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]))
    layer = pm.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    return pm, layer
