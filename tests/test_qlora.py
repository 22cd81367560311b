"""QLoRALinear / add_qlora against PEFT LoRA on a bitsandbytes nf4 Linear4bit (CPU)."""

import logging
import warnings

import pytest
import torch
from torch import nn

from lora_course import count_parameters, merge_lora
from lora_course.compare import max_abs_diff
from lora_course.qlora import QLoRALinear, add_qlora
from lora_course.references import peft_lora_on_linear4bit

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


def _reference(base, q, blocksize, double_quant, compute_dtype, device="cpu"):
    """PEFT LoRA on bitsandbytes' Linear4bit holding base's weight, with q's A and B."""
    return peft_lora_on_linear4bit(base, q.r, q.alpha, q.lora_A, q.lora_B, blocksize, double_quant, compute_dtype, device)


# in_features a multiple of blocksize: bitsandbytes' AVX512 CPU dequantizer indexes the
# blocks per row and is wrong otherwise (for even in_features); see the module report.
CASES = [
    (48, 128, 64, True, torch.float32, True),
    (40, 64, 64, False, torch.float32, False),
    (24, 256, 128, True, torch.float32, True),
    (40, 128, 128, True, torch.bfloat16, True),
    (32, 96, 32, False, torch.bfloat16, False),
]


@pytest.mark.parametrize("out_f,in_f,blocksize,double_quant,compute_dtype,bias", CASES)
def test_matches_peft_on_bnb_linear4bit(out_f, in_f, blocksize, double_quant, compute_dtype, bias):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias)
    q = QLoRALinear(base, r=4, alpha=8.0, blocksize=blocksize, double_quant=double_quant,
                    compute_dtype=compute_dtype)
    with torch.no_grad():
        q.lora_B.normal_()  # B = 0 at init would hide the branch
    pm, layer = _reference(base, q, blocksize, double_quant, compute_dtype)
    x = torch.randn(3, 5, in_f)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = q(x1), pm(x2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert y1.dtype == y2.dtype == torch.float32
    assert max_abs_diff(y1, y2) == 0.0
    assert max_abs_diff(x1.grad, x2.grad) == 0.0
    assert max_abs_diff(q.lora_A.grad, layer.lora_A["default"].weight.grad) == 0.0
    assert max_abs_diff(q.lora_B.grad, layer.lora_B["default"].weight.grad) == 0.0
    assert count_parameters(nn.Sequential(q)) == pm.get_nb_trainable_parameters()


def test_init_and_attributes():
    torch.manual_seed(0)
    q = QLoRALinear(nn.Linear(64, 32), r=4, alpha=16.0)
    assert q.lora_A.shape == (4, 64) and q.lora_B.shape == (32, 4)
    assert q.scaling == 4.0 and torch.all(q.lora_B == 0)
    assert q.nf4.dequantize().shape == (32, 64)
    trainable = {n for n, p in q.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}


def _float_out_in(t, shape):
    return isinstance(t, torch.Tensor) and t.is_floating_point() and tuple(t.shape) in (shape, shape[::-1])


@pytest.mark.parametrize("double_quant", [True, False])
def test_no_full_precision_weight_kept(double_quant):
    q = QLoRALinear(nn.Linear(128, 64), double_quant=double_quant)
    shape = (64, 128)
    tensors = [*q.parameters(), *q.buffers(), *vars(q).values()]
    for m in q.modules():
        tensors += list(vars(m).values())
    assert not any(_float_out_in(t, shape) for t in tensors)
    assert q.packed.dtype == torch.uint8 and q.packed.detach().numel() == 64 * 128 // 2


def test_saved_tensors_hold_no_dequantized_weight():
    q = QLoRALinear(nn.Linear(128, 64), r=4)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    x = torch.randn(4, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    y.sum().backward()
    assert saved, "the hook saw nothing"
    assert not any(s in ((64, 128), (128, 64)) and d.is_floating_point for s, d in saved)
    assert x.grad is not None and q.lora_A.grad is not None


def test_merge_lora_gives_plain_linear():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    add_qlora(model, r=4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.1)
    x = torch.randn(6, 64)
    y = model(x)
    merge_lora(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    assert torch.allclose(model(x), y, atol=1e-5, rtol=1e-5)


def test_add_qlora_trains_tiny_llama():
    from lora_course.models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama()
    add_qlora(model, r=4, alpha=8.0)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable, total = count_parameters(model)
    assert 0 < trainable < total
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in names), n


@pytest.mark.parametrize("kwargs", [
    {"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"blocksize": 48},
    {"compute_dtype": torch.int8}, {"double_quant": "yes"},
])
def test_bad_args(kwargs):
    with pytest.raises(ValueError):
        QLoRALinear(nn.Linear(64, 32), **kwargs)
    with pytest.raises(ValueError):
        add_qlora(nn.Sequential(nn.Linear(64, 32)), **kwargs)


def test_add_qlora_errors():
    with pytest.raises(ValueError, match="matched no module"):
        add_qlora(nn.Sequential(nn.Linear(8, 8)), target_modules=["nope"])
    with pytest.raises(ValueError):
        QLoRALinear(nn.Conv2d(3, 3, 1))
    model = add_qlora(nn.Sequential(nn.Linear(64, 64)))
    with pytest.raises(ValueError, match="adapter"):
        add_qlora(model)


logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def test_quantize_linear_layers_equals_bitsandbytes_4bit_loading(minilm):
    """Our whole-model NF4 quantization = transformers' BitsAndBytesConfig(load_in_4bit) loading."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    from lora_course.models import minilm_classifier, minilm_path
    from lora_course.qlora import NF4Linear, quantize_linear_layers

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=6,
                                                                 quantization_config=config, device_map="cpu")
    ours, tokenizer = minilm_classifier(6)
    ours.classifier.load_state_dict(ref.classifier.state_dict())
    quantize_linear_layers(ours, skip_modules=["classifier"])
    n_bnb = sum(isinstance(m, bnb.nn.Linear4bit) for m in ref.modules())
    assert sum(isinstance(m, NF4Linear) for m in ours.modules()) == n_bnb == 37  # 6 x 6 + pooler
    assert isinstance(ours.classifier, nn.Linear)
    for model in (ref, ours):  # training mode (bitsandbytes' CPU inference shortcut is not ours), no dropout
        model.train()
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    batch = tokenizer(["read a file from disk", "open a socket"], return_tensors="pt", padding=True)
    assert max_abs_diff(ref(**batch).logits, ours(**batch).logits) == 0.0
    # PEFT counts a Params4bit's packed bytes twice (two 4-bit values per byte), as we do
    assert count_parameters(ours)[1] == sum(p.numel() * (2 if isinstance(p, bnb.nn.Params4bit) else 1)
                                            for p in ref.parameters())


def test_quantize_linear_layers_skips_adapters_and_head():
    from lora_course.models import tiny_llama
    from lora_course.qlora import NF4Linear, quantize_linear_layers

    model = add_qlora(tiny_llama(), ["q_proj"], r=4)
    quantize_linear_layers(model)
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["lm_head"] == "Linear" and kinds["model.layers.0.self_attn.q_proj"] == "QLoRALinear"
    assert kinds["model.layers.0.mlp.down_proj"] == "NF4Linear"
    assert not any(p.requires_grad for m in model.modules() if type(m) is NF4Linear for p in m.parameters())
    with pytest.raises(ValueError, match="'nope' matches no module"):
        quantize_linear_layers(model, skip_modules=["nope"])


def test_qlora_minilm_equals_bitsandbytes_peft_model(minilm):
    """The notebook-05 pair: our QLoRA MiniLM and the real BitsAndBytesConfig + PEFT one."""
    from lora_course.data import label_names
    from lora_course.experiments.qlora_minilm import build
    from lora_course.qlora import qlora_layers

    ours, tokenizer = build("qlora_ours", len(label_names()))
    ref, _ = build("qlora_bnb", len(label_names()))
    assert count_parameters(ours) == ref.get_nb_trainable_parameters()
    batch = tokenizer(["read a file from disk", "open a socket", "parse a date"], return_tensors="pt", padding=True)
    labels = torch.tensor([0, 1, 4])
    with torch.no_grad():  # B = 0 at init would hide the adapter: give both the same B
        for name, layer in qlora_layers(ours).items():
            layer.lora_B.normal_(std=0.05)
            ref.base_model.model.get_submodule(name).lora_B["default"].weight.copy_(layer.lora_B)
    losses = []
    for model in (ours, ref):
        model.train()
        torch.manual_seed(3)  # the same dropout masks
        loss = model(**batch, labels=labels).loss
        loss.backward()
        losses.append(loss)
    assert losses[0].item() == losses[1].item()
    for name, layer in qlora_layers(ours).items():
        peft_layer = ref.base_model.model.get_submodule(name)
        assert max_abs_diff(layer.lora_A.grad, peft_layer.lora_A["default"].weight.grad) == 0.0
        assert max_abs_diff(layer.lora_B.grad, peft_layer.lora_B["default"].weight.grad) == 0.0
    head = ref.base_model.model.classifier.modules_to_save["default"]
    assert max_abs_diff(ours.classifier.weight.grad, head.weight.grad) == 0.0
