"""Chapter 07, AdaLoRA: the checks that notebooks/07_adalora.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check, seeded_tensors


def _allocator_for_checks(out_f: int, in_f: int, r: int, **schedule: Any) -> tuple[Any, nn.Module, str]:
    """A one-layer AdaLoRA model and its RankAllocator (our library is the reference)."""
    from .. import RankAllocator, add_adalora

    model = add_adalora(nn.Sequential(nn.Linear(in_f, out_f)), ["0"], init_r=r)
    alloc = RankAllocator(model, init_r=r, target_r=1, **({"total_step": 10} | schedule))
    return alloc, model, "0"


def _sensitivity_ema_cases() -> Iterator[Case]:
    for seed, (out_f, in_f, r, b1, b2) in enumerate([(5, 4, 3, 0.85, 0.85), (7, 6, 2, 0.9, 0.5), (3, 8, 4, 0.5, 0.99)]):
        alloc, model, name = _allocator_for_checks(out_f, in_f, r, beta1=b1, beta2=b2)
        p = model[0].lora_A
        w, grad, avg_ipt, avg_unc = seeded_tensors(seed, p.shape, p.shape, p.shape, p.shape)
        avg_ipt, avg_unc = avg_ipt.abs(), avg_unc.abs()  # EMAs of absolute values are >= 0
        with torch.no_grad():
            p.copy_(w)
        p.grad = grad.clone()
        for layer_p in (model[0].lora_E, model[0].lora_B):
            layer_p.grad = torch.zeros_like(layer_p)
        alloc.update_ipt(model)  # creates the state; now restart it from the given EMAs
        key = f"{name}.lora_A"
        alloc.exp_avg_ipt[key], alloc.exp_avg_unc[key] = avg_ipt.clone(), avg_unc.clone()
        alloc.update_ipt(model)
        expected = (alloc.ipt[key], alloc.exp_avg_ipt[key], alloc.exp_avg_unc[key])
        yield Case(args=(w, grad, avg_ipt, avg_unc, b1, b2), expected=expected,
                   label=f"sensitivity_ema(w, grad, exp_avg_ipt, exp_avg_unc, beta1={b1}, beta2={b2}) on {tuple(w.shape)}",
                   hint="the uncertainty uses |I - Ibar| with the Ibar you just updated, not the old one"
                   if seed == 1 else None)


@exercise_check(
    "sensitivity_ema",
    cases=_sensitivity_ema_cases,
    idea="three quantities, in order: the sensitivity, its moving average, and the moving average of how far "
         "the sensitivity strays from that average",
    formula="I = |w * grad|; Ibar = beta1 * Ibar + (1 - beta1) * I; U = beta2 * U + (1 - beta2) * |I - Ibar| (the new Ibar)",
)
def check_sensitivity_ema(fn: Callable[..., tuple]) -> None:
    """Check ``fn(w, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2) -> (ipt, exp_avg_ipt, exp_avg_unc)``
    against ``RankAllocator.update_ipt``."""


def _triplet_score_cases() -> Iterator[Case]:
    for seed, (out_f, in_f, r) in enumerate([(5, 4, 3), (7, 9, 2), (3, 8, 6)]):
        alloc, model, name = _allocator_for_checks(out_f, in_f, r)
        s_A, s_E, s_B = (t.abs() for t in seeded_tensors(seed, (r, in_f), (r, 1), (out_f, r)))
        for factor, s in (("lora_A", s_A), ("lora_E", s_E), ("lora_B", s_B)):
            alloc.exp_avg_ipt[f"{name}.{factor}"] = s.clone()
            alloc.exp_avg_unc[f"{name}.{factor}"] = torch.ones_like(s)  # so the entry score is s itself
        expected = alloc.triplet_scores(model)[name]
        yield Case(args=(s_A, s_E, s_B), expected=expected,
                   label=f"triplet_score(s_A {tuple(s_A.shape)}, s_E {tuple(s_E.shape)}, s_B {tuple(s_B.shape)})",
                   hint="triplet i owns row i of Q = A (r x in) and column i of P = B (out x r): which dim is that?"
                   if out_f != in_f else None)


@exercise_check(
    "triplet_score",
    cases=_triplet_score_cases,
    idea="a triplet's score adds its lambda's score to the average score of its own entries of Q and of P",
    formula="score_i = s_E[i] + mean of row i of s_A + mean of column i of s_B, a vector of length r",
)
def check_triplet_score(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(s_A, s_E, s_B) -> (r,)`` against ``RankAllocator.triplet_scores``."""


def _budget_schedule_cases() -> Iterator[Case]:
    settings = [(12, 4, 3, 10, 20, 100, 5), (8, 2, 5, 0, 0, 50, 1), (6, 3, 2, 4, 6, 30, 3)]
    for init_r, target_r, layers, tinit, tfinal, total, delta in settings:
        from .. import RankAllocator, add_adalora

        model = add_adalora(nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]), init_r=init_r)
        alloc = RankAllocator(model, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta,
                              total_step=total)
        for step in sorted({0, tinit, tinit + 1, (tinit + total - tfinal) // 2, total - tfinal - 1,
                            total - tfinal, total - tfinal + 1, total}):
            kw = dict(init_bgt=init_r * layers, target_bgt=target_r * layers, tinit=tinit, tfinal=tfinal,
                      total_step=total, deltaT=delta)
            yield Case(args=(step,), kwargs=kw, expected=alloc.budget_schedule(step),
                       hint="past total_step - tfinal the budget is the target and mask_now is True"
                       if step > total - tfinal else None)


@exercise_check(
    "budget_schedule",
    cases=_budget_schedule_cases,
    idea="three phases: warm-up, the cubic decrease, the final phase; write each one's (budget, mask_now)",
    formula="step <= tinit: (init, False); step > total - tfinal: (target, True); else "
            "(int((init - target) * (1 - (step - tinit) / (total - tfinal - tinit))**3 + target), step % deltaT == 0)",
)
def check_budget_schedule(fn: Callable[..., tuple]) -> None:
    """Check ``fn(step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT) -> (budget, mask_now)``
    against ``RankAllocator.budget_schedule``."""


# ---------------------------------------------------------------- notebook 07's fallbacks (the library)


def reference_sensitivity_ema(w, grad, exp_avg_ipt, exp_avg_unc, beta1=0.85, beta2=0.85):
    """``RankAllocator.update_ipt`` on one tensor: notebook 07's fallback for ``sensitivity_ema``."""
    from .. import RankAllocator, add_adalora

    with torch.random.fork_rng(devices=[]):
        model = add_adalora(nn.Sequential(nn.Linear(w.shape[1], 1)), ["0"], init_r=w.shape[0])
    alloc = RankAllocator(model, init_r=w.shape[0], target_r=1, total_step=10, beta1=beta1, beta2=beta2)
    layer = model[0]
    with torch.no_grad():
        layer.lora_A.copy_(w)
    layer.lora_A.grad = grad.detach().clone()
    for p in (layer.lora_E, layer.lora_B):
        p.grad = torch.zeros_like(p)
    alloc.update_ipt(model)  # creates the state; restart it from the given averages
    alloc.exp_avg_ipt["0.lora_A"], alloc.exp_avg_unc["0.lora_A"] = exp_avg_ipt.clone(), exp_avg_unc.clone()
    alloc.update_ipt(model)
    return alloc.ipt["0.lora_A"], alloc.exp_avg_ipt["0.lora_A"], alloc.exp_avg_unc["0.lora_A"]


def reference_triplet_score(s_A, s_E, s_B):
    """``RankAllocator.triplet_scores`` on one matrix's entry scores: notebook 07's fallback."""
    with torch.random.fork_rng(devices=[]):
        alloc, model, name = _allocator_for_checks(s_B.shape[0], s_A.shape[1], s_A.shape[0])
    for factor, score in (("lora_A", s_A), ("lora_E", s_E), ("lora_B", s_B)):
        alloc.exp_avg_ipt[f"{name}.{factor}"] = score.detach().clone()
        alloc.exp_avg_unc[f"{name}.{factor}"] = torch.ones_like(score)
    return alloc.triplet_scores(model)[name]


def reference_budget_schedule(step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT):
    """``RankAllocator.budget_schedule``: notebook 07's fallback for ``budget_schedule``."""
    from .. import RankAllocator, add_adalora

    with torch.random.fork_rng(devices=[]):
        model = add_adalora(nn.Sequential(nn.Linear(2, 2)), ["0"], init_r=init_bgt)
    alloc = RankAllocator(model, init_r=init_bgt, target_r=target_bgt, tinit=tinit, tfinal=tfinal, deltaT=deltaT,
                          total_step=total_step)
    return alloc.budget_schedule(step)
