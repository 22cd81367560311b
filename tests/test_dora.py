"""dora.py against real PEFT (``LoraConfig(use_dora=True)``): tiny Llama, tiny GPT-2 (Conv1D),
the pretrained MiniLM classifier and a bare ``nn.Linear`` with bias.

Our DoRA runs the same operations in the same order as PEFT's ``DoraLinearLayer`` /
``DoraLinearVariant``, so forward outputs, gradients of A, B and the magnitude, and merged
weights are compared with ``torch.equal`` (max |diff| = 0 measured in every case here, in
float32 and bfloat16, with and without dropout). The measured differences are printed
(``pytest -s``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_course import DoRALinear, add_dora, count_parameters, merge_lora, save_adapter, load_adapter
from lora_course.compare import max_abs_diff
from lora_course.dora import dora_layers
from lora_course.lora import UnsupportedLayerError, adapter_layers, modules_to_save_names
from lora_course.models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def peft_config(kw: dict) -> LoraConfig:
    return LoraConfig(target_modules=kw.get("target_modules", "all-linear"), r=kw.get("r", 8),
                      lora_alpha=kw.get("alpha", 8.0), lora_dropout=kw.get("dropout", 0.0),
                      modules_to_save=kw.get("modules_to_save"), use_dora=True)


def build_pair(ours: nn.Module, ref: nn.Module, kw: dict, seed: int = 0):
    """The same base twice: ours via add_dora, PEFT's via get_peft_model, from one seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        torch.manual_seed(seed)
        add_dora(ours, **kw)
        after_ours = torch.rand(4)
        torch.manual_seed(seed)
        peft_model = get_peft_model(ref, peft_config(kw))
        after_peft = torch.rand(4)
    assert torch.equal(after_ours, after_peft)  # both leave the global RNG in the same place
    return ours, peft_model


def peft_key(name: str, save: list[str]) -> str:
    """Our parameter name -> PEFT's."""
    for factor in ("lora_A", "lora_B"):
        if name.endswith("." + factor):
            return f"base_model.model.{name}.default.weight"
    if name.endswith(".magnitude"):
        return f"base_model.model.{name[: -len('magnitude')]}lora_magnitude_vector.default.weight"
    for module in save:
        if name.startswith(module + "."):
            return f"base_model.model.{module}.modules_to_save.default.{name[len(module) + 1:]}"
    return f"base_model.model.{name}".replace(".base.", ".base_layer.")


def perturb(ours: nn.Module, peft_model: nn.Module, save: list[str]) -> None:
    """The same non-zero B and a magnitude away from ||W|| in both models (B = 0 and m = ||W||
    would make every DoRA term vanish and hide errors)."""
    g = torch.Generator().manual_seed(1)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in dora_layers(ours).items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            layer.magnitude.mul_(0.5 + torch.rand(layer.magnitude.shape, generator=g))
            params[peft_key(name + ".lora_B", save)].copy_(layer.lora_B)
            params[peft_key(name + ".magnitude", save)].copy_(layer.magnitude)


class Bare(nn.Module):
    """A single nn.Linear with bias (PEFT needs a parent module to inject into)."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(24, 16, bias=True).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


X_BARE = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2))
LLAMA_BF16 = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
CASES = {
    "llama all-linear": (tiny_llama, dict(r=4, alpha=8.0)),
    "llama q,v dropout + norm saved": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=8, alpha=16.0,
                                                        dropout=0.3, modules_to_save=["norm"])),
    "llama bf16": (LLAMA_BF16, dict(r=4, alpha=8.0)),
    "llama bf16 dropout": (LLAMA_BF16, dict(target_modules=["q_proj", "up_proj"], r=4, dropout=0.2)),
    "gpt2 Conv1D": (tiny_gpt2, dict(r=4, alpha=8.0)),
    "bare linear": (Bare, dict(target_modules=["proj"], r=4, alpha=8.0)),
    "bare linear dropout": (Bare, dict(target_modules=["proj"], r=4, alpha=4.0, dropout=0.5)),
    "bare linear bf16 dropout": (lambda: Bare(torch.bfloat16), dict(target_modules=["proj"], r=4, dropout=0.3)),
}


def forward(model: nn.Module, inputs) -> torch.Tensor:
    if isinstance(inputs, dict):
        return model(**inputs).logits
    if inputs is None:
        return model(IDS).logits
    return model(inputs)


def check_against_peft(ours: nn.Module, peft_model: nn.Module, kw: dict, inputs, label: str) -> None:
    save = modules_to_save_names(ours)
    pparams = dict(peft_model.named_parameters())

    # same trainable parameters (A, B, magnitude, modules to save), same counts
    ours_trainable = {peft_key(n, save) for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_trainable == {n for n, p in pparams.items() if p.requires_grad}
    assert any(k.endswith("lora_magnitude_vector.default.weight") for k in ours_trainable)
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()

    # same initial A, B and magnitude (= ||W|| row norms), same dtypes
    for name, layer in dora_layers(ours).items():
        for attr in ("lora_A", "lora_B", "magnitude"):
            ref = pparams[peft_key(f"{name}.{attr}", save)]
            mine = getattr(layer, attr)
            assert mine.dtype == ref.dtype and torch.equal(mine, ref), f"{name}.{attr}"

    # forward and gradients of A, B, magnitude: bit-identical (same ops in the same order)
    perturb(ours, peft_model, save)
    if kw.get("dropout"):
        ours.train(), peft_model.train()
    else:
        ours.eval(), peft_model.eval()
    torch.manual_seed(5)
    out = forward(ours, inputs)
    torch.manual_seed(5)  # the same dropout masks
    ref_out = forward(peft_model, inputs)
    fwd_diff = max_abs_diff(out, ref_out)
    assert out.dtype == ref_out.dtype and torch.equal(out, ref_out)
    out.float().square().mean().backward()
    ref_out.float().square().mean().backward()
    grads = {n: max_abs_diff(p.grad, pparams[peft_key(n, save)].grad)
             for n, p in ours.named_parameters() if p.requires_grad}
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in ours.named_parameters() if n.endswith(("magnitude", "lora_A", "lora_B")))
    grad_diff = max(grads.values())
    assert grad_diff == 0.0

    # merge_lora == merge_and_unload, weight for weight and output for output
    ours.eval(), peft_model.eval()
    with torch.no_grad():
        unmerged = forward(ours, inputs)
    merged, ref_merged = merge_lora(ours), peft_model.merge_and_unload()
    assert not adapter_layers(merged)
    assert [type(m) for m in merged.modules()] == [type(m) for m in ref_merged.modules()]
    sd, ref_sd = merged.state_dict(), ref_merged.state_dict()
    merge_diff = max(max_abs_diff(sd[k], ref_sd[k]) for k in sd)
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad():
        merged_out = forward(merged, inputs)
        assert torch.equal(merged_out, forward(ref_merged, inputs))
    # merged vs unmerged: the same function computed two ways (one weight rounded once to the
    # base dtype vs a correction added to the frozen output), so they agree to a few units of
    # that dtype's rounding relative to the size of the outputs; not bit for bit
    eps = torch.finfo(out.dtype).eps
    merged_vs_unmerged = max_abs_diff(merged_out, unmerged)
    assert merged_vs_unmerged <= 32 * eps * unmerged.abs().max().item()
    print(f"\n[{label}] forward max|diff| = {fwd_diff}, grads (A, B, m) max|diff| = {grad_diff}, "
          f"merged weights max|diff| = {merge_diff}; merged vs unmerged = {merged_vs_unmerged:.3g}")


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(case):
    make, kw = CASES[case]
    ours, peft_model = build_pair(make(), make(), kw)
    dtype = ours.proj.base.weight.dtype if case.startswith("bare") else None
    check_against_peft(ours, peft_model, kw, X_BARE.to(dtype) if dtype else None, case)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_matches_peft_minilm(minilm, dropout):
    model, batch = minilm
    kw = dict(target_modules=["query", "value"], r=8, alpha=16.0, dropout=dropout, modules_to_save=["classifier"])
    ours, peft_model = build_pair(copy.deepcopy(model), copy.deepcopy(model), kw)
    check_against_peft(ours, peft_model, kw, batch, f"minilm dropout={dropout}")


def test_starts_equal_to_base_and_magnitude_is_row_norm():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    layer = DoRALinear(copy.deepcopy(base), r=4, alpha=8.0)
    assert layer.magnitude.shape == (16,) and layer.magnitude.requires_grad
    assert torch.equal(layer.magnitude, torch.linalg.norm(base.weight, dim=1))
    # B = 0 and m = ||W|| bit for bit, so m/||W|| - 1 is exactly 0 and so is the correction
    assert torch.equal(layer(X_BARE), base(X_BARE))
    torch.testing.assert_close(layer.effective_weight(), base.weight)


def test_norm_is_detached():
    """No gradient flows through ||W + sBA||: the detached and the full-gradient variants give
    the same output and the same magnitude gradient (the norm does not depend on m, so
    dL/dm = (dL/dy) * (x V^T) / n either way) but different A and B gradients. The full variant
    equals plain autograd through the textbook formula m * V / ||V||."""
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    det = DoRALinear(copy.deepcopy(base), r=4, alpha=8.0)
    full = copy.deepcopy(det)
    full.detach_norm = False
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        B = torch.randn(det.lora_B.shape, generator=g) * 0.3
        det.lora_B.copy_(B), full.lora_B.copy_(B)
    out_det, out_full = det(X_BARE), full(X_BARE)
    assert torch.equal(out_det, out_full)
    out_det.square().mean().backward()
    out_full.square().mean().backward()
    torch.testing.assert_close(det.magnitude.grad, full.magnitude.grad, rtol=1e-6, atol=1e-7)
    diff_A = max_abs_diff(det.lora_A.grad, full.lora_A.grad)
    diff_B = max_abs_diff(det.lora_B.grad, full.lora_B.grad)
    assert diff_A > 1e-4 * full.lora_A.grad.abs().max().item()
    assert diff_B > 1e-4 * full.lora_B.grad.abs().max().item()

    # the textbook formula with full autograd gives the non-detached gradients
    A = det.lora_A.detach().clone().requires_grad_(True)
    Bp = det.lora_B.detach().clone().requires_grad_(True)
    m = det.magnitude.detach().clone().requires_grad_(True)
    V = base.weight + det.scaling * Bp @ A  # (out, in)
    W_prime = m[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)
    (X_BARE @ W_prime.T + base.bias).square().mean().backward()
    # different operation order (one fused weight vs PEFT's correction form): float32 rounding
    torch.testing.assert_close(full.lora_A.grad, A.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full.lora_B.grad, Bp.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(full.magnitude.grad, m.grad, rtol=1e-4, atol=1e-6)
    print(f"\n[detach] A grad changes by {diff_A:.3g}, B grad by {diff_B:.3g}; magnitude grad unchanged")


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    layer = DoRALinear(nn.Linear(24, 16), r=4, alpha=8.0)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B.normal_(std=0.3)
        layer.magnitude.mul_(1.5)
    before, expected = layer(X_BARE), layer.effective_weight()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(X_BARE), before, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=1e-5, atol=1e-6)  # a division: float rounding
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    plain = merge_lora(layer)
    assert type(plain) is nn.Linear


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r must be"),
    (dict(r=2.5), "r must be"),
    (dict(alpha=0.0), "alpha must be"),
    (dict(dropout=1.0), "dropout must be"),
    (dict(dropout=-0.1), "dropout must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DoRALinear(nn.Linear(4, 4), **kwargs)
    with pytest.raises(ValueError, match=match):
        add_dora(tiny_llama(), **kwargs)


def test_bad_targets_and_layers():
    with pytest.raises(ValueError, match="nn.Linear or a transformers Conv1D"):
        DoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(UnsupportedLayerError):
        DoRALinear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="matched no module.*q_proj"):
        add_dora(tiny_llama(), target_modules=["nope"])
    model = add_dora(tiny_llama(), target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has adapter layers"):
        add_dora(model)
    with pytest.raises(ValueError, match="target_modules must be"):
        add_dora(tiny_llama(), target_modules=3)


def test_mark_trainable_keeps_magnitude():
    model = add_dora(tiny_llama(), target_modules=["q_proj", "v_proj"], r=4)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "magnitude"}


def test_peft_files_refuse_dora(tmp_path):
    """Our PEFT-format writer and reader handle plain LoRA only: a DoRA model is refused with a
    clear ValueError rather than written as a LoRA adapter that would lose the magnitudes."""
    model = add_dora(tiny_llama(), target_modules=["q_proj"], r=4)
    with pytest.raises(ValueError, match="plain LoRA adapters only.*DoRALinear"):
        save_adapter(model, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=4, use_dora=True))
        peft_model.save_pretrained(tmp_path / "peft")
    plain = tiny_llama()
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(plain, tmp_path / "peft")
    assert not adapter_layers(plain)
