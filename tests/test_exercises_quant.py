"""The checks of chapters 03-05 (NF4, double quantization, QLoRA): each passes the library's
fallback that its notebook uses and fails a plausible wrong answer with a hint."""

from __future__ import annotations

import pytest
import torch

from lora_course import NF4_CODE, dynamic_map, nf4_code
from lora_course.exercises import run_check
from lora_course.exercises.ch03 import reference_dequantize_blocks, reference_pack_nibbles
from lora_course.exercises.ch04 import reference_dequantize_absmax, reference_lut_code_index
from lora_course.exercises.ch05 import reference_nf4_input_grad, reference_qlora_forward, reference_qlora_layer_bytes


def _low_nibble_first(codes: torch.Tensor) -> torch.Tensor:
    c = torch.nn.functional.pad(codes.to(torch.uint8), (0, codes.numel() % 2), value=7)
    return c[0::2] | (c[1::2] << 4)


def _absmax_of_wrong_block(packed, absmax, n, blocksize=64):
    codes = torch.stack([packed >> 4, packed & 15], 1).flatten()[:n].long()
    return NF4_CODE[codes] * absmax.repeat(blocksize)[:n]  # tiles the absmax values instead of repeating each


def _nearest_code(v: torch.Tensor) -> torch.Tensor:
    code = dynamic_map()
    return torch.bucketize(v, (code[:-1] + code[1:]) / 2)


CASES = [
    ("nf4_levels", nf4_code, lambda offset=0.9677083: torch.linspace(-1, 1, 16), "values differ"),
    ("pack_nibbles", reference_pack_nibbles, _low_nibble_first, "byte 0"),
    ("dequantize_blocks", reference_dequantize_blocks, _absmax_of_wrong_block, "values differ"),
    ("dequantize_absmax", reference_dequantize_absmax, lambda q, a2, off: reference_dequantize_absmax(q, a2, off) - off,
     "bitsandbytes' nested quant_state"),
    ("lut_code_index", reference_lut_code_index, _nearest_code, "values differ"),
    ("dq_bits_prediction", (4.5, 4.127), (4.5, 4.0), "with double quantization: got 4"),
    ("qlora_forward", reference_qlora_forward,
     lambda x, nf4, bias, A, B, s: reference_qlora_forward(x, nf4, bias, A, B, s) - (x @ A.T @ B.T) * s, "values differ"),
    ("nf4_input_grad", reference_nf4_input_grad, lambda g, nf4: reference_nf4_input_grad(g, nf4) * 2, "values differ"),
    ("qlora_layer_bytes", reference_qlora_layer_bytes,
     lambda o, i, r, blocksize=64, double_quant=True: reference_qlora_layer_bytes(o, i, r, blocksize, False), "got"),
]


@pytest.mark.parametrize("name, right, wrong, piece", CASES, ids=[c[0] for c in CASES])
def test_check_passes_the_fallback_and_fails_a_wrong_answer(name, right, wrong, piece) -> None:
    passed, message = run_check(name, right)
    assert passed, message
    passed, message = run_check(name, wrong)
    assert not passed and piece in message, message
    assert "Hint:" in message


def test_predicted_bits_take_the_paper_rounding_and_refuse_other_shapes() -> None:
    assert run_check("dq_bits_prediction", [4.5, 4.127])[0]
    assert run_check("dq_bits_prediction", (4.5, 4 + 8 / 64 + 32 / (64 * 256)))[0]
    passed, message = run_check("dq_bits_prediction", 4.127)
    assert not passed and "expected two numbers" in message
    passed, message = run_check("dq_bits_prediction", (4.5, "4.127"))
    assert not passed and "expected a number" in message
