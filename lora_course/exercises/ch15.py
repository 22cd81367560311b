"""Chapter 15, what people ask: the checks that notebooks/15_what_people_ask.ipynb calls.

Every expected value is measured on a real component: first optimizer steps of
``LoRALinear`` (:func:`measure_same_update_lr`, also the notebook's fallback), the bytes of a
double-quantized ``NF4Weight``, and :func:`lora_course.results.smallest_within_one_se`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from .framework import Case, compare_values, exercise_check

OPTIMIZERS = ("sgd", "adam")


def _first_update(scale: float, lr: float, optimizer: str) -> torch.Tensor:
    """``Delta W`` of a rank-4 ``LoRALinear`` (16 x 12) after one step at ``scale`` and ``lr``."""
    from ..lora import LoRALinear

    gen = torch.Generator().manual_seed(15)
    base = nn.Linear(12, 16, bias=False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(16, 12, generator=gen))
    layer = LoRALinear(base, r=4, alpha=4.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(4, 12, generator=gen) / 4)
    layer.scaling = float(scale)
    x, y = torch.randn(32, 12, generator=gen), torch.randn(32, 16, generator=gen)
    opt_class = torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam
    opt = opt_class([layer.lora_A, layer.lora_B], lr=lr)
    loss = ((layer(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
    return layer.delta_weight().detach().double()


def measure_same_update_lr(lr: float, scale_from: float, scale_to: float, optimizer: str) -> float:
    """The learning rate for ``scale_to`` whose first LoRA update equals that of ``lr`` at ``scale_from``.

    Measured, not derived: one real step of ``torch.optim.SGD`` or ``torch.optim.Adam`` on a
    ``LoRALinear`` (B = 0 at the start) at each scale; the first update is linear in the
    learning rate, so the ratio of the two update norms gives the rate.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r} is not supported; allowed values: {', '.join(OPTIMIZERS)}")
    target = _first_update(scale_from, lr, optimizer).norm()
    probe = _first_update(scale_to, lr, optimizer).norm()
    return float(lr * target / probe)


def _same_update_lr_cases() -> Iterator[Case]:
    for lr, s_from, s_to, opt in [(1e-3, 2.0, 0.5, "sgd"), (1e-3, 2.0, 0.5, "adam"), (3e-4, 1.0, 4.0, "sgd"),
                                  (3e-4, 1.0, 4.0, "adam"), (5e-2, 0.25, 0.125, "sgd")]:
        yield Case(args=(lr, s_from, s_to, opt), expected=measure_same_update_lr(lr, s_from, s_to, opt),
                   hint=None if opt == "adam" else "SGD's first B step carries the scale once, Delta W = s B A once more")


@exercise_check(
    "same_update_lr",
    cases=_same_update_lr_cases,
    idea="Delta W = s * B * A; count how many factors of s reach Delta W after one step of each optimizer",
    formula="sgd: lr * (scale_from / scale_to) ** 2; adam: lr * (scale_from / scale_to)",
    compare=functools.partial(compare_values, rtol=1e-4, atol=0.0),
)
def check_same_update_lr(fn: Callable[[float, float, float, str], float]) -> None:
    """Check ``fn(lr, scale_from, scale_to, optimizer) -> lr`` against measured first steps of ``LoRALinear``."""


def _dq_overhead_cases() -> Iterator[Case]:
    from ..quant import quantize_nf4

    for blocksize in (64, 128, 256, 512):
        w = torch.randn(blocksize * 256 * 2, generator=torch.Generator().manual_seed(blocksize))
        q = quantize_nf4(w, blocksize=blocksize, double_quant=True)
        constants = q.qabsmax.numel() * q.qabsmax.element_size() + q.absmax2.numel() * q.absmax2.element_size()
        yield Case(args=(blocksize,), expected=8.0 * constants / q.numel)


@exercise_check(
    "dq_overhead_bits",
    cases=_dq_overhead_cases,
    idea="per block of `blocksize` weights one 8-bit absmax; per 256 such blocks one float32 constant",
    formula="8 / blocksize + 32 / (blocksize * 256)",
)
def check_dq_overhead_bits(fn: Callable[[int], float]) -> None:
    """Check ``fn(blocksize) -> bits per parameter of the double-quantized NF4 constants`` against ``quantize_nf4``."""


def _smallest_rank_cases() -> Iterator[Case]:
    from ..results import Summary, smallest_within_one_se

    g = torch.Generator().manual_seed(1415)
    for k in range(6):
        ranks = [1, 2, 4, 8, 16, 32][: 4 + k % 3]
        means = [round(float(v), 4) for v in 0.6 + 0.3 * torch.rand(len(ranks), generator=g)]
        ses = [round(float(v), 4) for v in 0.005 + 0.04 * torch.rand(len(ranks), generator=g)]
        summaries = {rk: Summary(f"r={rk}", 1e-3, 3, m, s, m, 100.0) for rk, m, s in zip(ranks, means, ses)}
        yield Case(args=(ranks, means, ses), expected=smallest_within_one_se(summaries),
                   label=f"smallest_good_rank({ranks}, means {means}, ses {ses})")


@exercise_check(
    "smallest_good_rank",
    cases=_smallest_rank_cases,
    idea="find the best mean first; the threshold is that mean minus the best configuration's own standard error",
    formula="min(r for r, m in zip(ranks, means) if m >= means[best] - ses[best]), best = argmax(means)",
)
def check_smallest_good_rank(fn: Callable[[Sequence[int], Sequence[float], Sequence[float]], int]) -> None:
    """Check ``fn(ranks, means, ses) -> rank`` (the one-standard-error rule) against ``results.smallest_within_one_se``."""
