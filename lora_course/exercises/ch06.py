"""Chapter 06, training memory: the checks that notebooks/06_memory_full_vs_lora_vs_qlora.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .framework import Case, exercise_check


def _full_ft_bytes_cases() -> Iterator[Case]:
    from .. import estimate_training_memory

    n = 1_000_000
    for dtype, master in [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]:
        est = estimate_training_memory(n, "full", dtype=dtype, master_weights=master)
        d = torch.tensor([], dtype=dtype).element_size()
        yield Case(args=(d, master), expected=est.total // n, label=f"full_ft_bytes_per_param({d}, master_weights={master})",
                   hint="a float32 master copy adds 4 bytes when the weights are not float32" if master else None)


@exercise_check(
    "full_ft_bytes_per_param",
    cases=_full_ft_bytes_cases,
    idea="list what a trainable parameter keeps during a step (itself, its gradient, the optimizer's state, maybe a copy) and the bytes of each",
    formula="weights (d) + gradients (d) + AdamW's two float32 moments (8), plus 4 for a float32 master copy",
)
def check_full_ft_bytes_per_param(fn: Callable[..., int]) -> None:
    """Check ``fn(dtype_bytes, master_weights) -> bytes per parameter`` against ``estimate_training_memory``."""


def _peak_cases() -> Iterator[Case]:
    from ..memory import MemoryBreakdown

    g = torch.Generator().manual_seed(6)
    for k in range(6):
        parts = [int(v) for v in torch.randint(0, 10_000, (7,), generator=g)]
        if k % 2:
            parts[2] = 50_000  # gradients large: the optimizer step is the worst moment
        b = MemoryBreakdown("lora", *parts)
        names = ("weights", "quant_constants", "gradients", "optimizer_states", "activations",
                 "backward_workspace", "optimizer_workspace")
        yield Case(kwargs=dict(zip(names, parts)), expected=b.peak,
                   label="peak_bytes(" + ", ".join(f"{n}={v}" for n, v in zip(names, parts)) + ")")


@exercise_check(
    "peak_bytes",
    cases=_peak_cases,
    idea="some parts live through the whole step; the others peak at different moments (the backward, then the optimizer step): which ones add up at the same time?",
    formula="the static parts are always there; on top: max(activations + backward workspace, gradients + optimizer workspace)",
)
def check_peak_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(**parts) -> peak bytes`` against ``MemoryBreakdown.peak``."""


def reference_layer_activation_bytes(h: int, i: int, heads: int, kv_heads: int, head_dim: int, d: int) -> int:
    """Bytes one full-fine-tuned Llama decoder layer keeps per token: notebook 06's fallback.

    Read off ``activation_bytes`` as the difference between a 2-layer and a 1-layer model
    of these shapes (``d`` = 4: float32, 2: bfloat16), per token.
    """
    from transformers import LlamaConfig

    from ..memory_estimate import activation_bytes

    dtype = {4: torch.float32, 2: torch.bfloat16}[d]
    shape = dict(hidden_size=h, intermediate_size=i, num_attention_heads=heads, num_key_value_heads=kv_heads,
                 head_dim=head_dim, vocab_size=128)
    one, _ = activation_bytes(LlamaConfig(num_hidden_layers=1, **shape), 1, 8, dtype)
    two, _ = activation_bytes(LlamaConfig(num_hidden_layers=2, **shape), 1, 8, dtype)
    return (two - one) // 8


def _layer_activation_cases() -> Iterator[Case]:
    shapes = [(576, 1536, 9, 3, 64, 4), (576, 1536, 9, 3, 64, 2), (64, 176, 4, 2, 16, 4), (4096, 11008, 32, 32, 128, 2),
              (2048, 5632, 32, 4, 64, 2)]
    for h, i, heads, kv, hd, d in shapes:
        yield Case(args=(h, i, heads, kv, hd, d), expected=reference_layer_activation_bytes(h, i, heads, kv, hd, d),
                   label=f"layer_activation_bytes(h={h}, i={i}, heads={heads}, kv_heads={kv}, head_dim={hd}, d={d})",
                   hint="k and v have kv_heads heads, q and the output have heads" if kv != heads else None)


@exercise_check(
    "layer_activation_bytes",
    cases=_layer_activation_cases,
    idea="walk through the layer in order (norm, q/k/v, attention, norm, MLP) and add what each saves for backward; "
         "a tensor two operations share is kept once",
    formula="2 * (4h + 4 + d*h) [two norms] + d*h [q/k/v input] + 2*d*heads*hd + 2*d*kv_heads*hd + 4*heads [SDPA] "
            "+ d*h [gate/up input] + 4*d*i [gate, up, silu(gate), their product]",
)
def check_layer_activation_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(h, i, heads, kv_heads, head_dim, d)``: bytes per token one full-fine-tuned decoder layer keeps."""
