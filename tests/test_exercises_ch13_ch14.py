"""Chapters 13 and 14: each check passes the library's answer and fails a plausible wrong one."""

from __future__ import annotations

import torch

from lora_course import dequantize_blockwise_8bit, quantize_blockwise_8bit, quantize_int8_vectorwise
from lora_course.distributed import allreduce_bytes_per_step, zero_bytes_per_gpu
from lora_course.exercises import run_check
from lora_course.exercises.ch14 import reference_moment_update


def test_ddp_allreduce_bytes_counts_only_trainable_parameters() -> None:
    assert run_check("ddp_allreduce_bytes", allreduce_bytes_per_step)[0]
    passed, message = run_check("ddp_allreduce_bytes", lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))
    assert not passed and "frozen parameters" in message
    passed, _ = run_check("ddp_allreduce_bytes", lambda m: sum(p.numel() * 4 for p in m.parameters() if p.requires_grad))
    assert not passed  # float16 case: the element size is the parameter's own


def test_ddp_bytes_ratio_accepts_a_close_prediction_only() -> None:
    from lora_course.experiments import ddp_lora

    ratio = allreduce_bytes_per_step(ddp_lora.build("full")) / allreduce_bytes_per_step(ddp_lora.build("lora"))
    assert run_check("ddp_bytes_ratio", ratio)[0] and run_check("ddp_bytes_ratio", ratio * 1.04)[0]
    without_head = ratio - 512 * 64 / 3584  # forgetting the untied lm_head
    passed, message = run_check("ddp_bytes_ratio", without_head)
    assert not passed and "untied head" in message
    assert "placeholder" in run_check("ddp_bytes_ratio", ...)[1]


def test_zero_stage_bytes_fails_a_wrong_sharding_order() -> None:
    assert run_check("zero_stage_bytes", zero_bytes_per_gpu)[0]

    def stage_off_by_one(n: int, gpus: int, stage: int) -> int:  # gradients sharded from stage 3 only
        w, g, s = 2 * n, 2 * n, 12 * n
        s /= gpus if stage >= 1 else 1
        g /= gpus if stage >= 3 else 1
        w /= gpus if stage >= 3 else 1
        return round(w + g + s)

    passed, message = run_check("zero_stage_bytes", stage_off_by_one)
    assert not passed and "stage=2" in message


def test_int8_vectorwise_matches_bitsandbytes_and_catches_rounding_away_from_zero() -> None:
    assert run_check("int8_vectorwise", quantize_int8_vectorwise)[0]

    def away_from_zero(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        absmax = x.abs().amax(dim=1).float()
        y = x * (127.0 / absmax[:, None])
        return (torch.sign(y) * torch.floor(y.abs() + 0.5)).to(torch.int8), absmax

    passed, message = run_check("int8_vectorwise", away_from_zero)
    assert not passed and "half to even" in message


def test_moment_update_is_bit_exact_with_bitsandbytes() -> None:
    assert run_check("moment_update", reference_moment_update)[0]

    def other_order(q, absmax, grad, beta1):  # the same moment, another float order: last bits differ
        m = dequantize_blockwise_8bit(q, absmax)
        m = beta1 * m + (1 - beta1) * grad
        return (m, *quantize_blockwise_8bit(m))

    assert not run_check("moment_update", other_order)[0]

    def stale_codes(q, absmax, grad, beta1):  # updates m but stores the old codes
        m = dequantize_blockwise_8bit(q, absmax)
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        return m, q, absmax

    passed, message = run_check("moment_update", stale_codes)
    assert not passed and "value 1" in message


def test_ddp_ratio_check_uses_the_models_of_the_ddp_run():
    """ch13 builds its reference without importing the experiment; it must match experiments.ddp_lora."""
    from lora_course.distributed import allreduce_bytes_per_step
    from lora_course.exercises.ch13 import DDP_LORA
    from lora_course.experiments import ddp_lora

    assert DDP_LORA == {k: ddp_lora.SETTINGS[k] for k in DDP_LORA} and ddp_lora.SETTINGS["seed"] == 0
    full, lora = (allreduce_bytes_per_step(ddp_lora.build(m)) for m in ("full", "lora"))
    from lora_course.exercises import run_check
    assert run_check("ddp_bytes_ratio", full / lora)[0]
