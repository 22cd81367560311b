"""The checks of notebooks 02 (PEFT in practice) and 08 (DoRA): right answers pass, the typical wrong
ones fail with the hint that names their mistake, and each fallback passes its own check."""

from __future__ import annotations

import torch
from torch import nn

from lora_course import LoRALinear
from lora_course.exercises import run_check
from lora_course.exercises.ch02 import (reference_fix_checkpointing, reference_lora_config_trainable,
                                        reference_peft_scaling)
from lora_course.exercises.ch08 import reference_dora_forward, reference_dora_magnitude_init


class _Conv1DLoRA(nn.Module):
    """Notebook 02's wrapper; ``in_first`` / ``transpose_merge`` switch its two layout fixes on."""

    in_first, transpose_merge = True, True

    def __init__(self, base: nn.Module, r: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base, self.scaling, self.merged = base.requires_grad_(False), alpha / r, False
        d0, d1 = base.weight.shape
        in_features, out_features = (d0, d1) if self.in_first else (d1, d0)
        self.lora_A = nn.Parameter(torch.randn(r, in_features) / r)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out if self.merged else out + self.scaling * (x @ self.lora_A.T @ self.lora_B.T)

    @torch.no_grad()
    def merge(self) -> None:
        delta = self.scaling * (self.lora_B @ self.lora_A)
        self.base.weight += delta.T if self.transpose_merge else delta
        self.merged = True


class _LinearLayout(_Conv1DLoRA):
    in_first, transpose_merge = False, False  # notebook 02's buggy version


class _MergeNotTransposed(_Conv1DLoRA):
    transpose_merge = False


def test_conv1d_lora_passes_the_fix_and_the_library_and_catches_each_bug() -> None:
    assert run_check("conv1d_lora", _Conv1DLoRA) == (True, "13 hidden cases")
    assert run_check("conv1d_lora", LoRALinear) == (True, "13 hidden cases")
    passed, message = run_check("conv1d_lora", _LinearLayout)
    assert not passed and "factor shapes" in message and "(in, out)" in message
    passed, message = run_check("conv1d_lora", _MergeNotTransposed)
    assert not passed and "after merge()" in message


def test_fix_checkpointing_needs_gradients_checkpointing_and_a_frozen_embedding() -> None:
    assert run_check("fix_checkpointing", reference_fix_checkpointing) == (True, "6 hidden cases")

    def non_reentrant(model) -> None:
        model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})

    assert run_check("fix_checkpointing", non_reentrant)[0]
    passed, message = run_check("fix_checkpointing", lambda model: None)
    assert not passed and "does not require grad" in message
    passed, message = run_check("fix_checkpointing", lambda model: model.base_model.model.activation_checkpointing_disable())
    assert not passed and "still on" in message
    passed, message = run_check(
        "fix_checkpointing", lambda model: model.base_model.model.get_input_embeddings().weight.requires_grad_(True))
    assert not passed and "trainable parameters" in message


def test_chapter_02_fallbacks_pass_and_wrong_scalings_fail() -> None:
    assert run_check("peft_scaling", reference_peft_scaling)[0]
    assert run_check("lora_config_trainable", reference_lora_config_trainable)[0]
    assert not run_check("peft_scaling", lambda lora_alpha, r, use_rslora=False: lora_alpha / r)[0]


def _dora_forward(x, weight, bias, lora_A, lora_B, magnitude, scaling, detach=True):
    V = weight + scaling * lora_B @ lora_A
    norm = torch.linalg.norm(V, dim=1, keepdim=True)
    y = x @ (magnitude[:, None] * V / (norm.detach() if detach else norm)).T
    return y if bias is None else y + bias


def test_dora_forward_checks_outputs_and_the_detached_norm() -> None:
    assert run_check("dora_forward", _dora_forward) == (True, "5 hidden cases")
    assert run_check("dora_forward", reference_dora_forward) == (True, "5 hidden cases")
    passed, message = run_check("dora_forward", lambda *args: _dora_forward(*args, detach=False))
    assert not passed and "gradients" in message and "constant in backward" in message


def test_dora_magnitude_init_against_the_library_and_peft() -> None:
    def right(weight, lora_A, lora_B, scaling):
        return torch.linalg.norm(weight + scaling * lora_B @ lora_A, dim=1)

    assert run_check("dora_magnitude_init", right) == (True, "4 hidden cases")
    assert run_check("dora_magnitude_init", reference_dora_magnitude_init)[0]
    assert not run_check("dora_magnitude_init", lambda weight, lora_A, lora_B, scaling: weight.norm(dim=1))[0]
    assert not run_check("dora_magnitude_init", lambda weight, lora_A, lora_B, scaling: right(weight, lora_A, lora_B, scaling).unsqueeze(1))[0]
