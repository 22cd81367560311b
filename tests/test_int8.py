"""LLM.int8() (quant/int8.py, int8_lora.py) against bitsandbytes 0.50's CPU Linear8bitLt, and LoRA on top vs PEFT.

Measured on bitsandbytes 0.50.2 / torch 2.13 (AVX-512 CPU): every comparison below is bit-equal
(max abs difference 0.0) - quantized codes, scales, layer outputs in eval (int8 + outlier
decomposition) and training (dequantize + float matmul) mode, input gradients, and a LoRA step.
"""

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

from lora_course import count_parameters
from lora_course.compare import max_abs_diff
from lora_course.int8_lora import Int8LoRALinear, add_int8, add_int8_lora
from lora_course.quant.int8 import (
    INT8_MM_DEQUANT_SCALE,
    Int8Linear,
    dequantize_int8_vectorwise,
    int8_layers,
    outlier_columns,
    quantize_int8_vectorwise,
)

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16"


def _bnb_linear(base: nn.Linear, threshold: float) -> nn.Module:
    """bitsandbytes' Linear8bitLt holding base's weights; ``.to("cpu")`` quantizes them."""
    layer = bnb.nn.Linear8bitLt(base.in_features, base.out_features, bias=base.bias is not None,
                                has_fp16_weights=False, threshold=threshold)
    layer.load_state_dict(copy.deepcopy(base.state_dict()))
    return layer.to("cpu")


# -- vector-wise quantization ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
def test_quantize_equals_bnb(dtype, threshold):
    torch.manual_seed(0)
    x = torch.randn(37, 129)
    x[:, 5] *= 8  # an outlier column
    x[3, 77] = -7.5  # a lone outlier
    x[11] = 0  # an all-zero row (codes from nan -> 0, as bitsandbytes)
    x = x.to(dtype)
    q, s = quantize_int8_vectorwise(x, threshold)
    rq, rs, rcols = BF.int8_vectorwise_quant(x.clone(), threshold)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    cols = outlier_columns(x, threshold)
    assert torch.equal(cols, rcols if rcols is not None else torch.empty(0, dtype=torch.long))
    assert torch.equal(dequantize_int8_vectorwise(q, s), BF.int8_vectorwise_dequant(rq, rs))


def test_single_row_keeps_outlier_column_codes():
    # bitsandbytes zeroes whole outlier columns only when there is more than one row
    x = torch.tensor([[0.5, 9.0, -1.0, 2.0]], dtype=torch.float16)
    q, s = quantize_int8_vectorwise(x, 6.0)
    rq, rs, _ = BF.int8_vectorwise_quant(x.clone(), 6.0)
    assert torch.equal(q, rq) and torch.equal(s, rs)
    assert q.tolist() == [[32, 0, -64, 127]]  # 0.5*127/2 = 31.75 -> 32; the outlier entry alone is 0


def test_rounding_is_half_to_even_and_scale_127():
    x = torch.tensor([[127.0, 2.5, 3.5, -2.5, 0.5]])  # absmax 127: codes = values
    q, s = quantize_int8_vectorwise(x)
    assert q.tolist() == [[127, 2, 4, -2, 0]]  # round half to even, not half away from zero
    assert s.tolist() == [127.0]


def test_outlier_test_is_greater_or_equal():
    x = torch.tensor([[6.0, 1.0], [0.0, 5.999]])
    assert outlier_columns(x, 6.0).tolist() == [0]
    assert outlier_columns(x, 0.0).numel() == 0


def test_quantize_errors():
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_vectorwise(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="threshold"):
        quantize_int8_vectorwise(torch.randn(2, 3), threshold=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        quantize_int8_vectorwise(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="row_absmax"):
        dequantize_int8_vectorwise(torch.ones(2, 3, dtype=torch.int8), torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        Int8Linear(nn.Linear(4, 4), threshold=-0.5)
    with pytest.raises(ValueError, match="nn.Linear"):
        Int8Linear(nn.Conv1d(4, 4, 1))


# -- Int8Linear vs Linear8bitLt ---------------------------------------------------------------


def _inputs(outliers: bool) -> torch.Tensor:
    torch.manual_seed(1)
    x = torch.randn(3, 7, 96)
    if outliers:
        x[..., 4] *= 15  # an emergent-feature-like column
        x[1, 2, 50] = 6.0  # exactly at the threshold: counts as an outlier
    return x


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("outliers", [True, False])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_int8_linear_equals_linear8bitlt(threshold, bias, outliers, mode):
    torch.manual_seed(0)
    base = nn.Linear(96, 80, bias=bias)
    ours, ref = Int8Linear(base, threshold), _bnb_linear(base, threshold)
    getattr(ours, mode)(), getattr(ref, mode)()
    assert torch.equal(ours.weight, ref.weight.data) and ours.weight.dtype == torch.int8
    x = _inputs(outliers)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = ours(xa), ref(xb)
    assert torch.equal(ours.weight_absmax, ref.state.SCB)
    assert ya.shape == yb.shape == (3, 7, 80) and ya.dtype == yb.dtype == torch.float32
    assert max_abs_diff(ya, yb) == 0.0  # measured: bit-equal (the issue asks for <= 1e-4)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    assert max_abs_diff(xa.grad, xb.grad) == 0.0
    if outliers and threshold > 0 and mode == "eval":
        # the decomposition matters: without it the output is much further from float
        plain = Int8Linear(base, 0.0).eval()(x)
        exact = base(x)
        err = lambda y: (y - exact).abs().mean().item()  # noqa: E731
        assert err(plain) > 2 * err(ya)  # measured 2.9x here; the int8 weights set the floor


def test_int8_linear_float16_input_and_bias_conversion():
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    ours, ref = Int8Linear(base, 6.0).eval(), _bnb_linear(base, 6.0).eval()
    x = (_inputs(True)[..., :64]).half()
    ya, yb = ours(x), ref(x)
    assert ya.dtype == yb.dtype == torch.float16 and max_abs_diff(ya, yb) == 0.0
    # both converted the stored bias to float16 in place; a float32 call now uses the rounded bias
    assert ours.bias.dtype == ref.bias.dtype == torch.float16
    x32 = _inputs(True)[..., :64]
    assert max_abs_diff(ours(x32), ref(x32)) == 0.0


def test_int8_linear_is_frozen_and_small():
    ours = Int8Linear(nn.Linear(256, 128), 6.0)
    assert not any(p.requires_grad for p in ours.parameters())
    assert ours.nbytes == 256 * 128 + 4 * 128  # 1 byte per weight + one float32 per row
    w = ours.dequantized_weight()
    assert max_abs_diff(w, nn.Linear(256, 128).weight) < 1  # shape/dtype sanity
    assert w.shape == (128, 256) and w.dtype == torch.float32


def test_mm_dequant_constant_quirk():
    # bitsandbytes rescales the int32 product by 6.200124e-05, not 1/127**2 = 6.2000124e-05
    assert abs(INT8_MM_DEQUANT_SCALE * 127**2 - 1) > 1e-5
    torch.manual_seed(0)
    base = nn.Linear(32, 16, bias=False)
    x = torch.randn(4, 32)
    ours = Int8Linear(base, 0.0).eval()
    xq, xs = quantize_int8_vectorwise(x.half())
    exact_scale = (xq.double() @ ours.weight.double().T) * xs.double()[:, None] * ours.weight_absmax.double() / 127**2
    ratio = (ours(x).double() / exact_scale)[exact_scale.abs() > 1e-3]
    assert torch.allclose(ratio, torch.full_like(ratio, INT8_MM_DEQUANT_SCALE * 127**2), rtol=1e-6)


# -- whole-model replacement, LoRA on top -----------------------------------------------------


def test_add_int8_tiny_llama():
    from lora_course.models import tiny_llama

    model = tiny_llama(seed=0)
    n_linear = sum(type(m) is nn.Linear for m in model.modules())
    add_int8(model, threshold=6.0)
    layers = int8_layers(model)
    assert len(layers) == n_linear - 1 and type(model.lm_head) is nn.Linear  # head left out
    model2 = add_int8(tiny_llama(seed=0), skip_modules=["mlp"])
    assert all(".mlp." not in n for n in int8_layers(model2))
    with pytest.raises(ValueError, match="skip_modules"):
        add_int8(tiny_llama(seed=0), skip_modules="mlp")
    with pytest.raises(ValueError, match="matched no module"):
        add_int8(tiny_llama(seed=0), target_modules=["nope"])
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    assert torch.isfinite(model(ids).logits).all()


def _minilm_pair(threshold: float = 6.0):
    from lora_course.models import minilm_classifier

    base, tok = minilm_classifier(2, seed=0)
    for m in base.modules():  # no dropout: the two models must see the same numbers in train mode
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    ref = copy.deepcopy(base)
    for name, m in list(ref.named_modules()):
        if type(m) is nn.Linear and name != "classifier":
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, _bnb_linear(m, threshold))
    ours = add_int8(copy.deepcopy(base), threshold=threshold, skip_modules=["classifier"])
    return ours, ref, tok


def test_minilm_int8_lora_equals_peft_one_step():
    peft = pytest.importorskip("peft")
    ours, ref, tok = _minilm_pair()
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    torch.manual_seed(3)
    add_int8_lora(ours, ["query", "value"], r=4, alpha=8)
    pairs = [(n, m) for n, m in ours.named_modules() if isinstance(m, Int8LoRALinear)]
    assert len(pairs) == 12
    for n, m in pairs:  # same random A (same RNG stream as PEFT); give B a random start too
        layer = pm.base_model.model.get_submodule(n)
        assert torch.equal(m.lora_A, layer.lora_A["default"].weight)
        with torch.no_grad():
            m.lora_B.normal_(0, 0.02)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    assert count_parameters(ours) == tuple(pm.get_nb_trainable_parameters())
    batch = tok(["a short sentence", "an int8 model with LoRA on top of it"], padding=True, return_tensors="pt")
    labels = torch.tensor([0, 1])
    for model in (ours, pm):
        model.eval()
    assert max_abs_diff(ours(**batch).logits, pm(**batch).logits) == 0.0  # LLM.int8() path
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, pm)]
    for model, opt in zip((ours, pm), opts):
        model.train()  # bitsandbytes' CPU training path: dequantize + float matmul
        loss = nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        opt.step()
    for n, m in pairs:
        layer = pm.base_model.model.get_submodule(n)
        assert max_abs_diff(m.lora_A, layer.lora_A["default"].weight) == 0.0
        assert max_abs_diff(m.lora_B, layer.lora_B["default"].weight) == 0.0
        assert m.lora_A.grad.abs().sum() > 0
    for model in (ours, pm):
        model.eval()
    assert max_abs_diff(ours(**batch).logits, pm(**batch).logits) == 0.0


def test_int8_lora_merge_and_errors():
    torch.manual_seed(0)
    layer = Int8LoRALinear(Int8Linear(nn.Linear(64, 32), 6.0), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(5, 64)
    layer.eval()
    before = layer(x)
    merged = layer.merged_module()
    assert isinstance(merged, Int8Linear) and merged.weight.dtype == torch.int8
    assert max_abs_diff(merged(x), before) < 0.05  # one more int8 round trip: close, not equal
    with pytest.raises(ValueError, match="Int8Linear"):
        Int8LoRALinear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="pissa"):
        Int8LoRALinear(Int8Linear(nn.Linear(4, 4)), r=2, init="pissa")
    with pytest.raises(ValueError, match="add_int8 first"):
        add_int8_lora(nn.Sequential(nn.Linear(4, 4)))
