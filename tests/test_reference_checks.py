"""The chapters' key reference checks, written once and run per device and dtype.

``make test`` runs the ``cpu`` cases; the ``cuda`` cases are marked ``gpu``, skip with one
line where CUDA is absent, and write their measured differences to ``data/measurements``
under ``make test-gpu``. Tolerances are those measured on CPU (exact); on CUDA they are the
claim to be tested: where bitsandbytes' or PyTorch's CUDA kernels differ, the failing case
and its record are the finding (README, section GPU).
"""

from __future__ import annotations

import pytest
import torch

from lora_course import AdamW8bit, quantize_nf4
from lora_course.models import tiny_llama
from test_lora import build_pair, maxdiff, randomize_b

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_vs_peft(device, dtype, measure):
    ours, ref = build_pair(lambda: tiny_llama().to(dtype), dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8.0))
    randomize_b(ours, ref, [])
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    diff = maxdiff(ours(x).logits, ref(x).logits)
    assert measure("lora_vs_peft", str(dtype).replace("torch.", ""), device, diff, 0.0), diff


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_vs_bitsandbytes(device, dtype, measure):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 200, generator=g) * 0.02).to(dtype).to(device)
    ours = quantize_nf4(w, blocksize=64)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    codes = (ours.packed.cpu() != packed.reshape(-1).cpu()).sum().item()
    absmax = maxdiff(ours.absmax.cpu(), state.absmax.cpu())
    assert measure("nf4_vs_bitsandbytes", f"{str(dtype).replace('torch.', '')} codes differing", device, codes, 0)
    assert measure("nf4_vs_bitsandbytes", f"{str(dtype).replace('torch.', '')} absmax", device, absmax, 0.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_adamw8bit_vs_bitsandbytes(device, measure):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    init = [torch.randn(64, 300), torch.randn(1000)]
    ours = [p.clone().to(device).requires_grad_(True) for p in init]
    theirs = [p.clone().to(device).requires_grad_(True) for p in init]
    oa, ob = AdamW8bit(ours, lr=1e-2), bnb.optim.AdamW8bit(theirs, lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for a, b in zip(ours, theirs):
            grad = torch.randn(a.shape, generator=gen).to(device)
            a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    diff = max(maxdiff(a, b) for a, b in zip(ours, theirs))
    assert measure("adamw8bit_vs_bitsandbytes", "float32, 3 steps", device, diff, 0.0), diff


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_double_quant_vs_bitsandbytes(device, dtype, measure):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(300, 256, generator=g) * 0.02).to(dtype).to(device)  # 1200 blocks: several absmax2 blocks
    ours = quantize_nf4(w, blocksize=64, double_quant=True)
    _, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    case = str(dtype).replace("torch.", "")
    codes = (ours.qabsmax.cpu() != state.absmax.reshape(-1).cpu()).sum().item()
    second = maxdiff(ours.absmax2.cpu(), state.state2.absmax.cpu())
    offset = maxdiff(ours.offset.cpu(), torch.as_tensor(state.offset).cpu())
    assert measure("double_quant_vs_bitsandbytes", f"{case} absmax codes differing", device, codes, 0)
    assert measure("double_quant_vs_bitsandbytes", f"{case} absmax2", device, second, 0.0)
    assert measure("double_quant_vs_bitsandbytes", f"{case} offset", device, offset, 0.0)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_dora_vs_peft(device, measure):
    from test_dora import build_pair as dora_pair, perturb

    ours, ref = dora_pair(tiny_llama(), tiny_llama(), dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8.0))
    perturb(ours, ref, [])
    ours, ref = ours.to(device), ref.to(device)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5)).to(device)
    diff = maxdiff(ours(x).logits, ref(x).logits)
    assert measure("dora_vs_peft", "float32", device, diff, 0.0), diff


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_shift_short_attention_vs_longlora(device, measure):
    from test_longlora import longlora_noflash, qkv

    from lora_course import shift_short_attention

    q, k, v = (t.to(device) for t in qkv(2, 8, 2, 64, 16, torch.float32, seed=1))
    diff = maxdiff(shift_short_attention(q, k, v, 16), longlora_noflash(q, k, v, 16))
    assert measure("s2attn_vs_longlora", "float32", device, diff, 1e-6), diff  # CPU test's float32 bound


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_int8_vs_linear8bitlt(device, measure):
    pytest.importorskip("bitsandbytes")
    from test_int8 import _bnb_linear, _inputs

    from lora_course import Int8Linear

    torch.manual_seed(0)
    base = torch.nn.Linear(96, 80)
    ours, ref = Int8Linear(base, 6.0).to(device).eval(), _bnb_linear(base, 6.0).to(device).eval()
    x = _inputs(outliers=True).to(device)
    diff = maxdiff(ours(x), ref(x))
    assert measure("int8_vs_linear8bitlt", "float32 input, threshold 6, eval", device, diff, 0.0), diff
