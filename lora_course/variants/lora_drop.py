"""LoRA-drop (arXiv 2402.07721): keep LoRA only where its output matters.

What it changes: which layers get their own adapter. After a short LoRA run, each layer's
importance is the average squared norm of its adapter's output on a sample of the data,
``g_i = mean_x ||s B_i A_i x||^2``, normalised to sum to 1; layers are kept in decreasing
order of importance until the kept share reaches a threshold (0.9 in the paper), and the
others share one adapter in the final run. What it costs: the extra short run and a pass
over the sample; the final run has fewer trainable parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..lora import lora_layers


@torch.no_grad()
def lora_output_importance(model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
    """Normalised importance of every LoRA layer: mean ||s B A x||^2 over the rows (tokens) seen.

    ``batches`` are passed to ``model`` as ``model(**batch)`` (dicts) or ``model(batch)``.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers: add_lora first")
    total = {name: 0.0 for name in layers}
    rows = {name: 0 for name in layers}

    def hook(name):
        def record(module, inputs, _output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])  # (rows, in)
            out = x.to(module.lora_A.dtype) @ module.delta_weight().T  # (rows, out) = s B A x
            total[name] += float(out.double().square().sum())
            rows[name] += x.shape[0]
        return record

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not any(rows.values()):
        raise ValueError("batches was empty: no input reached the LoRA layers")
    mean = {name: total[name] / max(rows[name], 1) for name in layers}
    norm = sum(mean.values())
    if norm == 0:
        raise ValueError("every LoRA output is zero (B = 0 at initialisation): train a few steps first")
    return {name: value / norm for name, value in mean.items()}


def select_lora_layers(importance: dict[str, float], threshold: float = 0.9) -> list[str]:
    """Layers in decreasing importance until their cumulative share reaches ``threshold``."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if not importance:
        raise ValueError("importance is empty")
    kept, share = [], 0.0
    for name in sorted(importance, key=importance.get, reverse=True):
        kept.append(name)
        share += importance[name]
        if share >= threshold * (1 - 1e-12):  # tolerate the normalisation's rounding
            break
    return kept
