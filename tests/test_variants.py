"""LoRA variants (lora_course.variants): each against PEFT or the paper's formula, by hand."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus
from torch import nn
from torch.nn import functional as F

from lora_course import add_lora
from lora_course.lora import lora_layers
from lora_course.models import tiny_gpt2, tiny_llama
from lora_course.variants import (
    DeltaLoRA, add_pissa, add_rslora, apply_lora_pro, create_loraplus_optimizer, equivalent_gradient,
    lora_output_importance, lora_pro_gradients, loraplus_param_groups, pissa_factors, rslora_scaling,
    select_lora_layers,
)
from lora_course.compare import max_abs_diff as maxdiff
from test_lora import build_pair, peft_key, randomize_b


def _tokens(vocab: int = 256, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(5))


# -- rsLoRA -------------------------------------------------------------------------------

def test_rslora_equals_peft_use_rslora():
    kw = dict(target_modules=["q_proj", "v_proj"], r=16, alpha=8.0, use_rslora=True)
    ours, ref = build_pair(tiny_llama, kw)
    fresh = tiny_llama()
    torch.manual_seed(0)
    add_rslora(fresh, ["q_proj", "v_proj"], r=16, alpha=8.0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ours.state_dict().values()))
    randomize_b(fresh, ref, [])
    x = _tokens()
    out, expected = fresh(x, labels=x), ref(x, labels=x)
    assert maxdiff(out.logits, expected.logits) == 0
    out.loss.backward()
    expected.loss.backward()
    params = dict(ref.named_parameters())
    for name, layer in lora_layers(fresh).items():
        assert layer.scaling == rslora_scaling(8.0, 16) == 8.0 / 4
        assert maxdiff(layer.lora_A.grad, params[peft_key(name + ".lora_A", [])].grad) == 0
        assert maxdiff(layer.lora_B.grad, params[peft_key(name + ".lora_B", [])].grad) == 0
    with pytest.raises(ValueError, match="r"):
        rslora_scaling(8.0, 0)


# -- PiSSA --------------------------------------------------------------------------------

def test_pissa_equals_peft_and_splits_the_weight_exactly():
    kw = dict(target_modules=["q_proj", "o_proj"], r=4, alpha=4.0, init="pissa")
    original = tiny_llama()
    _, ref = build_pair(tiny_llama, kw)
    ours = tiny_llama()
    torch.manual_seed(0)
    add_pissa(ours, ["q_proj", "o_proj"], r=4, alpha=4.0)
    params = dict(ref.named_parameters())
    worst_split = 0.0
    for name, layer in lora_layers(ours).items():
        assert torch.equal(layer.lora_A, params[peft_key(name + ".lora_A", [])])
        assert torch.equal(layer.lora_B, params[peft_key(name + ".lora_B", [])])
        assert torch.equal(layer.base.weight, params[f"base_model.model.{name}.base_layer.weight"])
        W = original.get_submodule(name).weight
        worst_split = max(worst_split, maxdiff(layer.base.weight + layer.delta_weight(), W))
    assert worst_split < 1e-6  # W_res + s B A == W to float32 rounding
    x = _tokens()
    assert maxdiff(ours(x).logits, ref(x).logits) == 0


def test_pissa_factors_take_the_top_singular_directions_and_check_arguments():
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(3))
    A, B, residual = pissa_factors(W, 3, scaling=2.0)
    S = torch.linalg.svdvals(W)
    assert torch.allclose(torch.linalg.svdvals(2.0 * B @ A), torch.cat([S[:3], torch.zeros(6)]), atol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(residual), torch.cat([S[3:], torch.zeros(3)]), atol=1e-5)
    with pytest.raises(ValueError, match="r must be"):
        pissa_factors(W, 10, 1.0)
    with pytest.raises(ValueError, match="2-D"):
        pissa_factors(W[0], 1, 1.0)


# -- LoRA+ --------------------------------------------------------------------------------

def _peft_name(name: str) -> str:
    """Our name -> PEFT's; ln_f is in modules_to_save (PEFT trains a copy of it)."""
    if ".ln_f." in name:
        return "base_model.model." + name.replace("ln_f.", "ln_f.modules_to_save.default.")
    return peft_key(name, [])


def test_loraplus_param_groups_equal_peft_and_one_step_matches():
    kw = dict(target_modules=["c_attn", "c_fc"], r=4, alpha=8.0, modules_to_save=["ln_f"])
    ours, ref = build_pair(tiny_gpt2, kw)
    randomize_b(ours, ref, ["ln_f"])
    groups = loraplus_param_groups(ours, lr=1e-3, lr_ratio=16.0, weight_decay=0.01)
    peft_opt = peft_loraplus(ref, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0, loraplus_weight_decay=0.01)
    ref_names = {id(p): n for n, p in ref.named_parameters()}
    assert len(groups) == len(peft_opt.param_groups) == 4
    for ours_group, peft_group in zip(groups, peft_opt.param_groups):
        assert ours_group["lr"] == peft_group["lr"] and ours_group["weight_decay"] == peft_group["weight_decay"]
        assert [_peft_name(n) for n in ours_group["names"]] == [ref_names[id(p)] for p in peft_group["params"]]
    assert {g["lr"] for g in groups if g["params"]} == {1e-3, 16e-3}
    assert any("ln_f" in n for n in groups[3]["names"]) and any("lora_B" in n for n in groups[2]["names"])

    opt = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, lr_ratio=16.0, weight_decay=0.01)
    x = _tokens()
    for model, optimizer in ((ours, opt), (ref, peft_opt)):
        model(x, labels=x).loss.backward()
        optimizer.step()
    params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            assert maxdiff(p, params[_peft_name(name)]) == 0, name


def test_loraplus_rejects_bad_arguments():
    model = add_lora(nn.Sequential(nn.Linear(4, 4)), ["0"], r=2)
    with pytest.raises(ValueError, match="lr_ratio"):
        loraplus_param_groups(model, 1e-3, lr_ratio=0)
    with pytest.raises(ValueError, match="lr must be"):
        loraplus_param_groups(model, -1.0)


# -- Delta-LoRA ---------------------------------------------------------------------------

@pytest.mark.parametrize("start_step", [0, 1])
def test_delta_lora_moves_w_by_the_change_of_the_product(start_step):
    torch.manual_seed(0)
    model = add_lora(nn.Sequential(nn.Linear(8, 6)), ["0"], r=2, alpha=4.0)
    plain = copy.deepcopy(model)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        plain[0].lora_B.copy_(layer.lora_B)
    W0 = layer.base.weight.detach().clone()
    helper = DeltaLoRA(model, update_ratio=2.0, start_step=start_step)
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    x, y = torch.randn(5, 8), torch.randn(5, 6)
    products = [layer.delta_weight().detach().clone()]
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        helper.step()
        products.append(layer.delta_weight().detach().clone())
    by_hand = W0.clone()
    for t in range(1, 4):
        if t > start_step:
            by_hand += 2.0 * (products[t] - products[t - 1])
    assert maxdiff(layer.base.weight, by_hand) < 1e-6
    assert maxdiff(layer.base.weight, W0) > 1e-3  # W really moved, in full rank
    assert torch.equal(plain[0].base.weight, W0)
    with pytest.raises(ValueError, match="update_ratio"):
        DeltaLoRA(model, update_ratio=-1)
    with pytest.raises(ValueError, match="no LoRA layers"):
        DeltaLoRA(nn.Linear(2, 2))


# -- LoRA-drop ----------------------------------------------------------------------------

def test_lora_drop_importance_is_the_normalised_mean_squared_lora_output():
    torch.manual_seed(0)
    model = add_lora(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), ["0", "2"], r=2, alpha=2.0)
    with torch.no_grad():
        model[0].lora_B.normal_()
        model[2].lora_B.normal_(std=0.1)
    batches = [torch.randn(3, 8), torch.randn(5, 8)]
    importance = lora_output_importance(model, batches)
    by_hand = {}
    for name, idx in (("0", 0), ("2", 2)):
        outs = []
        for x in batches:
            h = model[:idx](x) if idx else x  # the layer's input
            outs.append(F.linear(h, model[idx].delta_weight()))  # s B A h
        by_hand[name] = torch.cat(outs).square().sum().item() / 8
    total = sum(by_hand.values())
    assert max(abs(importance[n] - by_hand[n] / total) for n in by_hand) < 1e-9
    assert sum(importance.values()) == pytest.approx(1.0)


def test_select_lora_layers_keeps_the_most_important_until_the_threshold():
    importance = {"a": 0.05, "b": 0.5, "c": 0.3, "d": 0.15}
    assert select_lora_layers(importance, 0.9) == ["b", "c", "d"]
    assert select_lora_layers(importance, 0.5) == ["b"]
    assert select_lora_layers(importance, 1.0) == ["b", "c", "d", "a"]
    with pytest.raises(ValueError, match="threshold"):
        select_lora_layers(importance, 0)


# -- LoRA-Pro -----------------------------------------------------------------------------

def test_lora_pro_gives_the_least_squares_equivalent_gradient():
    g = torch.Generator().manual_seed(2)
    d, k, r, s = 7, 6, 2, 1.5
    A, B = torch.randn(r, k, generator=g, dtype=torch.float64), torch.randn(d, r, generator=g, dtype=torch.float64)
    full = torch.randn(d, k, generator=g, dtype=torch.float64)
    gA, gB = lora_pro_gradients(A, B, full, s)
    pro = equivalent_gradient(A, B, gA, gB, s)
    # the best any (gA, gB) can do: least squares over vec(B gA) + vec(gB A)
    M = s * torch.cat([torch.kron(torch.eye(k, dtype=torch.float64), B), torch.kron(A.T.contiguous(), torch.eye(d, dtype=torch.float64))], 1)
    sol = torch.linalg.lstsq(M, full.T.reshape(-1, 1), driver="gelsd").solution  # SVD-based: M is rank-deficient
    best = (M @ sol).reshape(k, d).T
    assert maxdiff(pro, best) < 1e-10
    plain = equivalent_gradient(A, B, s * B.T @ full, s * full @ A.T, s)
    assert (pro - full).norm() < (plain - full).norm()
    X = torch.randn(r, r, generator=g, dtype=torch.float64)  # the free matrix does not change the step
    assert maxdiff(equivalent_gradient(A, B, gA + X @ A, gB - B @ X, s), pro) < 1e-10
    with pytest.raises(ValueError, match="full_grad"):
        lora_pro_gradients(A, B, full.T, s)


def test_apply_lora_pro_reconstructs_from_the_lora_gradients_alone():
    torch.manual_seed(0)
    model = add_lora(nn.Sequential(nn.Linear(10, 8)), ["0"], r=3, alpha=6.0)
    layer = model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.base.weight.requires_grad_(True)  # only to read the full gradient dL/dW for the check
    x, y = torch.randn(16, 10), torch.randn(16, 8)
    F.mse_loss(model(x), y).backward()
    expected = lora_pro_gradients(layer.lora_A.detach(), layer.lora_B.detach(), layer.base.weight.grad, layer.scaling)
    apply_lora_pro(model)
    assert maxdiff(layer.lora_A.grad, expected[0]) < 1e-5 and maxdiff(layer.lora_B.grad, expected[1]) < 1e-5
    assert math.isfinite(layer.lora_B.grad.norm().item())


# -- VeRA ---------------------------------------------------------------------------------

def test_vera_equals_peft_forward_gradients_and_counts():
    from peft import VeraConfig, get_peft_model

    from lora_course import count_parameters
    from lora_course.variants import VeRALinear, add_vera

    targets = ["q_proj", "v_proj", "up_proj"]
    ours = add_vera(tiny_llama(), targets, r=16, d_initial=0.1, projection_prng_key=3)
    ref = get_peft_model(tiny_llama(), VeraConfig(r=16, target_modules=targets, d_initial=0.1, projection_prng_key=3))
    buffers = dict(ref.named_buffers())
    layer = next(m for m in ours.modules() if isinstance(m, VeRALinear))
    assert torch.equal(layer.vera_A, buffers["base_model.model.model.layers.0.self_attn.q_proj.vera_A.default"])
    assert torch.equal(layer.vera_B, buffers["base_model.model.model.layers.0.self_attn.q_proj.vera_B.default"])
    assert count_parameters(ours) == tuple(ref.get_nb_trainable_parameters())
    # non-zero lambda_b (0 at init would hide the branch), the same in both
    g = torch.Generator().manual_seed(4)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, VeRALinear):
                m.vera_lambda_b.copy_(torch.randn(m.out_features, generator=g))
                params[f"base_model.model.{name}.vera_lambda_b.default"].copy_(m.vera_lambda_b)
    x = _tokens()
    out, expected = ours(x, labels=x), ref(x, labels=x)
    assert maxdiff(out.logits, expected.logits) == 0
    out.loss.backward()
    expected.loss.backward()
    for name, m in ours.named_modules():
        if isinstance(m, VeRALinear):
            for p in ("vera_lambda_d", "vera_lambda_b"):
                assert maxdiff(getattr(m, p).grad, params[f"base_model.model.{name}.{p}.default"].grad) == 0
    merged_out = copy.deepcopy(ours)
    from lora_course import merge_lora
    assert maxdiff(merge_lora(merged_out)(x).logits, out.logits) < 1e-5
    with pytest.raises(ValueError, match="r must"):
        add_vera(tiny_llama(), targets, r=0)


# -- LoRA-FA ------------------------------------------------------------------------------

def _lorafa_pair(dropout_free_kw):
    ours, ref = build_pair(tiny_llama, dropout_free_kw)
    randomize_b(ours, ref, [])
    return ours, ref


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32])
def test_lorafa_matches_peft_over_three_steps(compute_dtype):
    import warnings

    from peft.optimizers import create_lorafa_optimizer as peft_lorafa

    from lora_course.variants import create_lorafa_optimizer

    kw = dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8.0)
    ours, ref = _lorafa_pair(kw)
    opt = create_lorafa_optimizer(ours, lr=1e-2, weight_decay=0.01, compute_dtype=compute_dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_opt = peft_lorafa(ref, r=4, lora_alpha=8, lr=1e-2, weight_decay=0.01)
    x = _tokens()
    for _ in range(3):
        for model, optimizer in ((ours, opt), (ref, peft_opt)):
            optimizer.zero_grad()
            model(x, labels=x).loss.backward()
            optimizer.step()
    params = dict(ref.named_parameters())
    worst = 0.0
    for name, layer in lora_layers(ours).items():
        assert not layer.lora_A.requires_grad
        assert torch.equal(layer.lora_A, params[peft_key(name + ".lora_A", [])])
        worst = max(worst, maxdiff(layer.lora_B, params[peft_key(name + ".lora_B", [])]))
    if compute_dtype == torch.bfloat16:
        assert worst == 0  # PEFT projects B's gradient under bfloat16 autocast (also on CPU)
    else:
        assert 0 < worst < 1e-3  # float32 projection: B differs from PEFT's by bfloat16 rounding of the step


# -- LoRA-GA ------------------------------------------------------------------------------

def test_lora_ga_equals_peft_init_and_keeps_the_function():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    from lora_course.lora import find_lora_targets
    from lora_course.variants import add_lora_ga, estimate_gradients

    qv = ["q_proj", "v_proj"]
    x = _tokens()
    original = tiny_llama()
    ours, ref = tiny_llama(), tiny_llama()

    def step(model):
        return lambda: [model(x[i:i + 1], labels=x[i:i + 1]).loss.backward() for i in range(2)]

    grads = estimate_gradients(ours, find_lora_targets(ours, qv), step(ours))
    torch.manual_seed(0)
    add_lora_ga(ours, grads, qv, r=4, alpha=8.0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=qv, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    preprocess_loraga(ref, config, step(ref))
    torch.manual_seed(0)
    ref = get_peft_model(ref, config)
    params = dict(ref.named_parameters())
    for name, layer in lora_layers(ours).items():
        assert torch.equal(layer.lora_A, params[peft_key(name + ".lora_A", [])])
        assert torch.equal(layer.lora_B, params[peft_key(name + ".lora_B", [])])
        assert torch.equal(layer.base.weight, params[f"base_model.model.{name}.base_layer.weight"])
    assert maxdiff(ours(x).logits, original(x).logits) < 1e-5  # W absorbed -s B A
    assert all(p.grad is None for p in ours.parameters())
