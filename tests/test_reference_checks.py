"""The chapters' key reference checks, written once and run per device and dtype.

``make test`` runs the ``cpu`` cases; the ``cuda`` cases are marked ``gpu``, skip with one
line where CUDA is absent, and write their measured differences to ``data/measurements``
under ``make test-gpu``. Tolerances are those measured on CPU (exact); on CUDA they are the
claim to be tested: where bitsandbytes' or PyTorch's CUDA kernels differ, the failing case
and its record are the finding (README, section GPU).
"""

from __future__ import annotations

import gc

import pytest
import torch

from lora_course import AdamW8bit, quantize_nf4
from lora_course.models import tiny_llama
from lora_course.compare import max_abs_diff as maxdiff
from test_lora import build_pair, randomize_b

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(5))  # one fixed batch


def logits_diff(ours: torch.nn.Module, ref: torch.nn.Module, device: torch.device) -> float:
    """Both models moved to ``device``; max |diff| of their logits on ``TOKENS``."""
    ours, ref = ours.to(device), ref.to(device)
    x = TOKENS.to(device)
    return maxdiff(ours(x).logits, ref(x).logits)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_vs_peft(device, dtype, measure):
    ours, ref = build_pair(lambda: tiny_llama().to(dtype), dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8.0))
    randomize_b(ours, ref, [])
    diff = logits_diff(ours, ref, device)
    assert measure("lora_vs_peft", str(dtype).replace("torch.", ""), device, diff, 0.0), diff


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_vs_bitsandbytes(device, dtype, measure):
    bnbF = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(96, 200, generator=g) * 0.02).to(dtype).to(device)
    ours = quantize_nf4(w, blocksize=64)
    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    case = str(dtype).replace("torch.", "")
    parts = {f"{case} codes differing": (ours.packed.cpu() != packed.reshape(-1).cpu()).sum().item(),
             f"{case} absmax": maxdiff(ours.absmax.cpu(), state.absmax.cpu())}
    if device.type == "cuda":  # bitsandbytes' CUDA kernel against its own CPU path (a finding if they differ)
        cpu_packed, _ = bnbF.quantize_4bit(w.cpu(), blocksize=64, quant_type="nf4")
        parts[f"{case} bitsandbytes cuda vs its cpu path: codes differing"] = (
            cpu_packed.reshape(-1) != packed.reshape(-1).cpu()).sum().item()
    passed = [measure("nf4_vs_bitsandbytes", part, device, diff, 0) for part, diff in parts.items()]  # all recorded
    assert all(passed), parts


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
    parts = {f"{case} absmax codes differing": (ours.qabsmax.cpu() != state.absmax.reshape(-1).cpu()).sum().item(),
             f"{case} absmax2": maxdiff(ours.absmax2.cpu(), state.state2.absmax.cpu()),
             f"{case} offset": maxdiff(ours.offset.cpu(), torch.as_tensor(state.offset).cpu())}
    passed = [measure("double_quant_vs_bitsandbytes", part, device, diff, 0) for part, diff in parts.items()]
    assert all(passed), parts


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_vs_peft(device, dtype, measure):
    from test_dora import build_pair as dora_pair, perturb

    kw = dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8.0)
    ours, ref = dora_pair(tiny_llama().to(dtype), tiny_llama().to(dtype), kw)
    perturb(ours, ref, [])
    diff = logits_diff(ours, ref, device)
    assert measure("dora_vs_peft", str(dtype).replace("torch.", ""), device, diff, 0.0), diff


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("variant", ["rslora", "pissa", "vera"])
def test_variants_vs_peft(device, variant, measure):
    from peft import VeraConfig, get_peft_model

    from lora_course.variants import add_pissa, add_rslora, add_vera

    targets = ["q_proj", "v_proj"]
    if variant == "vera":
        ours = add_vera(tiny_llama(), targets, r=16, d_initial=0.1, projection_prng_key=3)
        ref = get_peft_model(tiny_llama(), VeraConfig(r=16, target_modules=targets, d_initial=0.1,
                                                      projection_prng_key=3))
    else:  # both built from seed 0 (PEFT draws A first in both), PiSSA's SVD on the CPU
        kw = dict(target_modules=targets, r=4, alpha=8.0, **({"use_rslora": True} if variant == "rslora" else
                                                             {"init": "pissa"}))
        _, ref = build_pair(tiny_llama, kw)
        ours = tiny_llama()
        torch.manual_seed(0)
        (add_rslora if variant == "rslora" else add_pissa)(ours, targets, r=4, alpha=8.0)
    mine, theirs = dict(ours.named_parameters()), dict(ref.named_parameters())
    with torch.no_grad():  # a non-zero trained factor (B or lambda_b is 0 at init), the same in both
        g = torch.Generator().manual_seed(4)
        for name, p in mine.items():
            if name.endswith(("lora_B", "vera_lambda_b")):
                p.copy_(torch.randn(p.shape, generator=g))
                key = (f"base_model.model.{name}.default.weight" if name.endswith("lora_B")
                       else f"base_model.model.{name}.default")
                theirs[key].copy_(p)
    diff = logits_diff(ours, ref, device)
    assert measure("variants_vs_peft", f"{variant}, float32 logits", device, diff, 0.0), diff


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


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("compute_dtype", DTYPES, ids=str)
def test_qlora_vs_peft_on_linear4bit(device, compute_dtype, measure):
    pytest.importorskip("bitsandbytes")
    from test_qlora import _reference

    from lora_course.qlora import QLoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(256, 48).to(device)
    q = QLoRALinear(base, r=4, alpha=8.0, blocksize=64, double_quant=True, compute_dtype=compute_dtype)
    with torch.no_grad():
        q.lora_B.normal_()  # B = 0 at init would hide the branch
    pm, layer = _reference(base, q, 64, True, compute_dtype, device)  # bitsandbytes quantizes on `device`
    x = torch.randn(3, 5, 256, generator=torch.Generator().manual_seed(2)).to(device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = q(x1), pm(x2)
    g = torch.randn(y1.shape, generator=torch.Generator().manual_seed(3)).to(device)
    y1.backward(g)
    y2.backward(g)
    case = str(compute_dtype).replace("torch.", "") + " compute"
    parts = {"output": maxdiff(y1, y2), "dL/dx": maxdiff(x1.grad, x2.grad),
             "dL/dA": maxdiff(q.lora_A.grad, layer.lora_A["default"].weight.grad),
             "dL/dB": maxdiff(q.lora_B.grad, layer.lora_B["default"].weight.grad)}
    passed = [measure("qlora_vs_peft", f"{case}, {part}", device, diff, 0.0) for part, diff in parts.items()]
    assert all(passed), parts


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_adalora_vs_peft(device, measure):
    from test_adalora import build_pair as adalora_pair, pairs, randomize_e

    ours, ref = adalora_pair(tiny_llama, dict(init_r=6, alpha=16.0), dict(total_step=10, target_r=3))
    randomize_e(ours, ref, [])  # lambda = 0 at init would hide the branch
    ours, ref = ours.to(device), ref.to(device)
    out, expected = ours(TOKENS.to(device)).logits, ref(TOKENS.to(device)).logits
    out.square().mean().backward()
    expected.square().mean().backward()
    logits = maxdiff(out, expected)
    grads = max(maxdiff(a, b) for _, a, b in pairs(ours, ref, [], grads=True))
    passed = [measure("adalora_vs_peft", "float32 logits", device, logits, 0.0),
              measure("adalora_vs_peft", "float32 gradients of P, lambda, Q", device, grads, 0.0)]
    assert all(passed), (logits, grads)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")  # CPU: same update, no paging
def test_paged_adamw8bit_vs_bitsandbytes(device, measure):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    init = torch.randn(128, 300)
    ours = init.clone().to(device).requires_grad_(True)
    theirs = init.clone().to(device).requires_grad_(True)
    oa, ob = AdamW8bit([ours], lr=1e-2), bnb.optim.PagedAdamW8bit([theirs], lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grad = torch.randn(init.shape, generator=gen).to(device)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    diff = maxdiff(ours, theirs)  # paging moves the states, it does not change the update
    assert measure("adamw8bit_vs_bitsandbytes", "paged, float32, 3 steps", device, diff, 0.0), diff


# A small Llama (SmolLM-135M's widths, 2 layers, 8,192-token vocabulary) trained one step in
# float32 with AdamW: measured peak (CPU live tensor bytes / CUDA max_memory_allocated) vs
# estimate_training_memory. The CPU tolerance is the measured agreement (< 2e-5 relative).
PEAK_CASES = ["full", "lora", "qlora"]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("method", PEAK_CASES)
def test_training_peak_vs_estimate(device, method, measure):
    from lora_course.experiments.memory_measured import QUICK_SETTINGS, measure_one
    from lora_course.models import reference_config

    s = QUICK_SETTINGS
    config = reference_config(s["config"], num_hidden_layers=s["layers"], vocab_size=s["vocab_size"])
    (batch, seq_len), = s["sizes"]
    if device.type == "cuda":
        gc.collect()  # models of earlier checks must not count in this step's peak
        torch.cuda.empty_cache()
    row = measure_one(config, method, batch, seq_len, False, torch.float32, s["r"], s["target_modules"], s["lr"],
                      timed_steps=0, device=device.type)
    error = abs(row["measured_peak"] / row["estimate"]["peak"] - 1)
    assert measure("training_peak_vs_estimate", f"{method}, float32, b{batch} x {seq_len}, AdamW", device, error,
                   2e-5, measured_peak_bytes=row["measured_peak"], estimated_peak_bytes=row["estimate"]["peak"],
                   config=f"{s['config']} widths, {s['layers']} layers, vocab {s['vocab_size']}, r={s['r']} "
                          f"{s['target_modules']}"), row
