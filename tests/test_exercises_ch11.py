"""The checks of notebook 11 (lora_course/exercises/ch11.py): the library's answer passes, typical wrong ones fail."""

from __future__ import annotations

import pytest
import torch

from lora_course import variants
from lora_course.exercises import reset_tries, run_check
from lora_course.exercises.ch11 import reference_lora_pro_grads, reference_vera_forward


@pytest.fixture(autouse=True)
def _fresh_tries():
    reset_tries()
    yield
    reset_tries()


def _pro_with_inv(A, B, grad_A, grad_B, s):
    inv_btb, inv_aat = torch.linalg.inv(B.T @ B), torch.linalg.inv(A @ A.T)
    return inv_btb @ grad_A / s**2, (grad_B - B @ inv_btb @ grad_A @ A.T) @ inv_aat / s**2


def _pro_once_s(A, B, grad_A, grad_B, s):  # divides by s instead of s^2
    inv_btb, inv_aat = torch.linalg.pinv(B.T @ B), torch.linalg.pinv(A @ A.T)
    return inv_btb @ grad_A / s, (grad_B - B @ inv_btb @ grad_A @ A.T) @ inv_aat / s


def _pro_no_correction(A, B, grad_A, grad_B, s):  # forgets to take B g_A's part out of g_B
    return torch.linalg.pinv(B.T @ B) @ grad_A / s**2, grad_B @ torch.linalg.pinv(A @ A.T) / s**2


def _vera_unsliced(x, W, A, B, d, b):
    return x @ W.T + b * ((d * (x @ A.T)) @ B.T)


def _vera_without_d(x, W, A, B, d, b):  # forgets the rank-side vector
    out_f, in_f = W.shape
    return x @ W.T + b * ((x @ A[:, :in_f].T) @ B[:out_f].T)


def _pissa_unscaled(W, r, s):  # ignores the scaling
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    A, B = S[:r].sqrt()[:, None] * Vh[:r], U[:, :r] * S[:r].sqrt()
    return A, B, W - B @ A


def _loraplus_only_b(model, lr, ratio):
    slow, fast = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (fast if "lora_B" in name else slow).append(p)
    return [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}]


@pytest.mark.parametrize("check, answer", [
    ("lora_pro_grads", reference_lora_pro_grads),
    ("vera_forward", reference_vera_forward),
    ("pissa_init", variants.pissa_factors),
    ("loraplus_param_groups", variants.loraplus_param_groups),
])
def test_the_library_answer_passes(check, answer):
    passed, message = run_check(check, answer)
    assert passed, message


@pytest.mark.parametrize("check, answer, pieces", [
    ("lora_pro_grads", _pro_with_inv, ["B 8x2 = 0", "raised", "which kind of inverse"]),
    ("lora_pro_grads", _pro_once_s, ["values differ", "count every factor s"]),
    ("lora_pro_grads", _pro_no_correction, ["value 1: values differ"]),
    ("vera_forward", _vera_unsliced, ["shared A 8x10", "only the part"]),
    ("vera_forward", _vera_without_d, ["values differ"]),
    ("pissa_init", _pissa_unscaled, ["scaling=2.0", "values differ", "s B A"]),
    ("loraplus_param_groups", _loraplus_only_b, ["LayerNorm", "got 0.001, expected 0.016"]),
])
def test_a_wrong_answer_fails_with_a_nudge(check, answer, pieces):
    passed, message = run_check(check, answer)
    assert not passed
    for piece in pieces:
        assert piece in message, message
