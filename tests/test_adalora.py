"""adalora.py against PEFT's AdaLoRA (``get_peft_model(model, AdaLoraConfig(...))``).

Ours and PEFT's are built from one seed on the same base, then trained side by side on the
same batches; at every step the losses (with the orthogonal penalty), gradients, factors,
sensitivity/uncertainty EMAs, budgets and masks are compared. Our arithmetic runs in
PEFT's order, so the comparisons are exact (``torch.equal``); the measured maxima are
printed with ``pytest -s``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from torch import nn

from lora_course import (
    RankAllocator,
    SVDLinear,
    add_adalora,
    count_parameters,
    merge_lora,
    orth_regularization,
    save_adapter,
)
from lora_course.adalora import magnitude_scores, svd_layers
from lora_course.compare import max_abs_diff
from lora_course.lora import adapter_layers
from lora_course.models import tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def peft_config(kw: dict, sched: dict, task_type: str | None = None, orth: float = 0.5) -> AdaLoraConfig:
    return AdaLoraConfig(
        target_modules=kw.get("target_modules", "all-linear"), init_r=kw.get("init_r", 12),
        lora_alpha=kw.get("alpha", 8.0), lora_dropout=kw.get("dropout", 0.0),
        modules_to_save=kw.get("modules_to_save"), task_type=task_type, orth_reg_weight=orth, **sched,
    )


def build_pair(make, kw: dict, sched: dict, task_type: str | None = None, orth: float = 0.5, seed: int = 0):
    ours, ref = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        torch.manual_seed(seed)
        add_adalora(ours, **kw)
        after_ours = torch.rand(4)
        torch.manual_seed(seed)
        peft_model = get_peft_model(ref, peft_config(kw, sched, task_type, orth))
        after_peft = torch.rand(4)
    assert torch.equal(after_ours, after_peft)  # the same random-number stream
    return ours, peft_model


def peft_key(name: str, save: list[str]) -> str:
    """Our parameter name -> PEFT's (x.lora_A -> base_model.model.x.lora_A.default, ...)."""
    for factor in ("lora_A", "lora_B", "lora_E", "ranknum"):
        if name.endswith("." + factor):
            return f"base_model.model.{name}.default"
    for module in save:
        if name.startswith(module + "."):
            return f"base_model.model.{module}.modules_to_save.default.{name[len(module) + 1:]}"
    return f"base_model.model.{name}".replace(".base.", ".base_layer.")


def pairs(ours: nn.Module, peft_model: nn.Module, save: list[str], grads: bool = False):
    ref = dict(peft_model.named_parameters())
    for name, p in ours.named_parameters():
        q = ref[peft_key(name, save)]
        if grads:
            if p.requires_grad:
                yield name, p.grad, q.grad
        else:
            yield name, p, q


def assert_equal_pairs(items, what: str) -> None:
    worst = 0.0
    for name, a, b in items:
        assert a.shape == b.shape, name
        worst = max(worst, max_abs_diff(a, b))
        assert torch.equal(a, b), f"{what} {name}: max |diff| {max_abs_diff(a, b):.3g}"
    return worst


def randomize_e(ours: nn.Module, peft_model: nn.Module, save: list[str]) -> None:
    """A non-zero lambda in both (the fresh lambda = 0 hides any error in the branch)."""
    g = torch.Generator().manual_seed(1)
    ref = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in svd_layers(ours).items():
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=g))
            ref[peft_key(name + ".lora_E", save)].copy_(layer.lora_E)


# ------------------------------------------------------------------------------------ layer


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_init_forward_grad_and_merge_match_peft(make):
    kw = dict(init_r=6, alpha=16.0)
    ours, peft_model = build_pair(make, kw, dict(total_step=10, target_r=3))
    assert len(svd_layers(ours)) == len([n for n, _ in peft_model.named_parameters() if "lora_E" in n])
    assert_equal_pairs(pairs(ours, peft_model, []), "init")  # the same factors, bit for bit
    assert all(not layer.lora_E.any() for layer in svd_layers(ours).values())
    randomize_e(ours, peft_model, [])
    out, ref = ours(IDS).logits, peft_model(IDS).logits
    assert torch.equal(out, ref), max_abs_diff(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    assert_equal_pairs(pairs(ours, peft_model, [], grads=True), "grad")
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()
    merged, ref_merged = merge_lora(copy.deepcopy(ours)), peft_model.merge_and_unload()
    assert not adapter_layers(merged)
    for (n, p), (m, q) in zip(merged.named_parameters(), ref_merged.named_parameters()):
        assert n == m and torch.equal(p, q), n  # the same merged weights
    diff = max_abs_diff(merged(IDS).logits, ref_merged(IDS).logits)
    assert diff == 0
    print(f"\n{make.__name__}: init, forward, grads, merged weights and logits bit-identical")


def test_layer_basics_scaling_and_dropout():
    torch.manual_seed(0)
    base = nn.Linear(10, 7)
    layer = SVDLinear(base, r=4, alpha=8.0)
    assert layer.lora_A.shape == (4, 10) and layer.lora_E.shape == (4, 1) and layer.lora_B.shape == (7, 4)
    assert layer.scaling == pytest.approx(8.0 / (4 + 1e-5))
    assert not layer.ranknum.requires_grad and float(layer.ranknum) == 4.0
    x = torch.randn(3, 10)
    assert torch.equal(layer(x), base(x))  # lambda = 0 at init
    with torch.no_grad():
        layer.lora_E.fill_(1.0)
    expected = base(x) + x @ (layer.lora_A.T @ layer.lora_B.T) * 8.0 / (4 + 1e-5)
    assert max_abs_diff(layer(x), expected) < 1e-6  # the formula (another summation order)
    d = SVDLinear(nn.Linear(10, 7), r=4, dropout=0.5)
    with torch.no_grad():
        d.lora_E.fill_(1.0)
    d.eval()
    y = d(x)
    d.train()
    torch.manual_seed(3)
    assert not torch.equal(d(x), y)  # dropout on the branch in training mode


def test_dropout_matches_peft_in_training():
    kw = dict(init_r=4, dropout=0.3)
    ours, peft_model = build_pair(tiny_llama, kw, dict(total_step=10, target_r=2))
    randomize_e(ours, peft_model, [])
    ours.train(), peft_model.train()
    torch.manual_seed(5)
    a = ours(IDS).logits
    torch.manual_seed(5)
    b = peft_model(IDS).logits
    assert torch.equal(a, b), max_abs_diff(a, b)


# ---------------------------------------------------------------------- training side by side


def compare_allocators(ours_alloc: RankAllocator, peft_alloc, save) -> float:
    """Every ipt / exp_avg_ipt / exp_avg_unc tensor equal (keys: ours x.lora_A, PEFT x.lora_A.default)."""
    for mine, theirs in ((ours_alloc.ipt, peft_alloc.ipt), (ours_alloc.exp_avg_ipt, peft_alloc.exp_avg_ipt),
                         (ours_alloc.exp_avg_unc, peft_alloc.exp_avg_unc)):
        assert set(f"{k}.default" for k in mine) == set(theirs)
        for k, v in mine.items():
            assert torch.equal(v, theirs[f"{k}.default"]), (k, max_abs_diff(v, theirs[f"{k}.default"]))
    return 0.0


def run_side_by_side(ours, peft_model, sched, save, batches, orth_w, lr=5e-3):
    """Train both; compare everything at every step. Returns the number of masking steps seen."""
    alloc = RankAllocator(ours, init_r=sched["init_r"], target_r=sched["target_r"], tinit=sched["tinit"],
                          tfinal=sched["tfinal"], deltaT=sched["deltaT"], total_step=sched["total_step"])
    ref_alloc = peft_model.base_model.rankallocator
    assert (alloc.init_bgt, alloc.target_bgt) == (ref_alloc.init_bgt, ref_alloc.target_bgt)
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=lr)
    ref_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    ours.train(), peft_model.train()
    masks = 0
    for step in range(1, sched["total_step"] + 1):
        batch = batches(step)
        torch.manual_seed(100 + step)  # same dropout masks in both
        out = ours(**batch)
        orth = orth_regularization(ours)
        loss = out.loss + orth_w * orth  # what PEFT's forward adds to outputs.loss
        torch.manual_seed(100 + step)
        ref_loss = peft_model(**batch).loss
        assert torch.equal(loss, ref_loss), (step, max_abs_diff(loss, ref_loss))
        loss.backward(), ref_loss.backward()
        assert_equal_pairs(pairs(ours, peft_model, save, grads=True), f"step {step} grad")
        opt.step(), ref_opt.step()
        assert alloc.budget_schedule(step) == ref_alloc.budget_schedule(step)  # (budget, mask_now)
        budget, pattern = alloc.update_and_allocate(ours, step)
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(), ref_opt.zero_grad()
        compare_allocators(alloc, ref_alloc, save)
        assert_equal_pairs(pairs(ours, peft_model, save), f"step {step} params")  # lambda masked alike
        ref_pattern = peft_model.peft_config["default"].rank_pattern
        if pattern is not None:
            masks += 1
            assert {f"{n}.lora_E.default": v for n, v in pattern.items()} == ref_pattern, step
            assert sum(map(sum, pattern.values())) <= budget
    final = {f"{n}.lora_E.default": v for n, v in alloc.rank_pattern.items()}
    assert final == peft_model.peft_config["default"].rank_pattern
    assert sum(alloc.ranks().values()) <= alloc.target_bgt
    assert all(layer.rank() == alloc.ranks()[n] for n, layer in svd_layers(ours).items())
    return masks


SCHED = dict(init_r=6, target_r=3, tinit=2, tfinal=4, deltaT=3, total_step=16)


def test_training_matches_peft_every_step_tiny_llama():
    kw = dict(init_r=SCHED["init_r"], alpha=8.0, dropout=0.1)
    sched = {k: SCHED[k] for k in ("target_r", "tinit", "tfinal", "deltaT", "total_step")}
    # task_type matters: a PeftModel without one calls the base model directly and skips
    # AdaLoraModel.forward, so PEFT would silently add no orthogonal penalty
    ours, peft_model = build_pair(tiny_llama, kw, sched, task_type="CAUSAL_LM", orth=0.5)
    g = torch.Generator().manual_seed(7)
    data = [torch.randint(0, 512, (4, 16), generator=g) for _ in range(4)]
    batches = lambda step: {"input_ids": data[step % 4], "labels": data[step % 4]}  # noqa: E731
    masks = run_side_by_side(ours, peft_model, SCHED, [], batches, orth_w=0.5)
    assert masks >= 4  # steps 3, 6, 9 (deltaT), the forced final mask at 12, and 13-16
    print("\ntiny Llama, 16 steps: losses, grads, factors, scores, budgets, masks bit-identical")


def test_training_matches_peft_every_step_minilm(minilm):
    model, batch = minilm
    kw = dict(target_modules=["query", "key", "value", "dense"], init_r=SCHED["init_r"], alpha=8.0,
              modules_to_save=["classifier"])
    sched = {k: SCHED[k] for k in ("target_r", "tinit", "tfinal", "deltaT", "total_step")}
    ours, peft_model = build_pair(lambda: copy.deepcopy(model), kw, sched, task_type="SEQ_CLS", orth=0.3)
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()
    batches = lambda step: {**batch, "labels": torch.tensor([step % 2, 1 - step % 2])}  # noqa: E731
    masks = run_side_by_side(ours, peft_model, SCHED, ["classifier"], batches, orth_w=0.3)
    assert masks >= 4
    print("\nMiniLM, 16 steps: losses, grads, factors, scores, budgets, masks bit-identical")


# ---------------------------------------------------------------------- schedule and penalty


def test_budget_schedule_is_cubic_and_matches_peft():
    ours, peft_model = build_pair(tiny_llama, dict(init_r=12), dict(total_step=100, target_r=4, tinit=10,
                                                                   tfinal=20, deltaT=5))
    alloc = RankAllocator(ours, init_r=12, target_r=4, tinit=10, tfinal=20, deltaT=5, total_step=100)
    ref = peft_model.base_model.rankallocator
    for step in range(0, 105):
        assert alloc.budget_schedule(step) == ref.budget_schedule(step), step
    n = len(svd_layers(ours))
    assert alloc.budget_schedule(10) == (12 * n, False)
    assert alloc.budget_schedule(80)[0] == 4 * n and alloc.budget_schedule(95) == (4 * n, True)
    mid = alloc.budget_schedule(45)[0]  # halfway: (init - target) / 8 + target
    assert mid == int((12 * n - 4 * n) * 0.5**3 + 4 * n)


def test_orth_regularization_is_pefts_penalty():
    ours, peft_model = build_pair(tiny_llama, dict(init_r=5), dict(total_step=10, target_r=2),
                                  task_type="CAUSAL_LM", orth=0.7)
    value = orth_regularization(ours)
    layers = svd_layers(ours).values()
    norms = [torch.linalg.matrix_norm(m.lora_A @ m.lora_A.T - torch.eye(5)) for m in layers]
    norms += [torch.linalg.matrix_norm(m.lora_B.T @ m.lora_B - torch.eye(5)) for m in layers]
    assert max_abs_diff(value, torch.stack(norms).mean()) < 1e-6  # the mean of the (unsquared) norms
    out = ours(IDS, labels=IDS)
    ref = peft_model(IDS, labels=IDS).loss
    assert torch.equal(out.loss + 0.7 * value, ref)  # PEFT: loss + orth_reg_weight * penalty
    # the penalty PEFT added, read back from its loss, is ours (to the rounding of one subtraction)
    assert max_abs_diff((ref - out.loss) / 0.7, value) < 1e-5
    peft_model.peft_config["default"].orth_reg_weight = 0.0
    assert torch.equal(peft_model(IDS, labels=IDS).loss, out.loss)
    # PEFT pitfall: without a task_type, PeftModel.forward bypasses AdaLoraModel.forward
    _, no_task = build_pair(tiny_llama, dict(init_r=5), dict(total_step=10, target_r=2), orth=0.7)
    assert torch.equal(no_task(IDS, labels=IDS).loss, out.loss)  # no penalty added at all


def test_mask_to_budget_keeps_the_top_triplets_and_ties_are_masked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    add_adalora(model, ["0", "1"], init_r=3)
    alloc = RankAllocator(model, init_r=3, target_r=1, total_step=10)
    model(torch.randn(2, 6)).sum().backward()
    with torch.no_grad():
        for layer in svd_layers(model).values():
            layer.lora_E.fill_(1.0)
    model(torch.randn(2, 6)).sum().backward()
    alloc.update_ipt(model)
    scores = alloc.triplet_scores(model)
    flat = torch.cat(list(scores.values()))
    pattern = alloc.mask_to_budget(model, 4)
    kept = torch.tensor([k for v in pattern.values() for k in v])
    assert kept.sum() == 4 and torch.equal(kept, flat > flat.sort().values[1])
    assert all((layer.lora_E.view(-1) == 0).tolist() == [not k for k in pattern[n]]
               for n, layer in svd_layers(model).items())
    assert set(magnitude_scores(model)) == set(scores)


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs, shown", [
    (dict(target_r=13), "target_r"), (dict(target_r=0), "target_r"),
    (dict(tinit=5, tfinal=5, total_step=10), "tinit + tfinal"), (dict(tinit=-1), "tinit"),
    (dict(beta1=1.0), "beta1"), (dict(beta2=0.0), "beta2"), (dict(beta1=True), "beta1"),
    (dict(total_step=None), "total_step"), (dict(total_step=0), "total_step"),
    (dict(deltaT=0), "deltaT"), (dict(init_r=8), "init_r=8"),
])
def test_rank_allocator_bad_arguments(kwargs, shown):
    model = tiny_llama()
    add_adalora(model, init_r=12)
    args = dict(init_r=12, target_r=8, total_step=20) | kwargs
    with pytest.raises(ValueError, match=shown.replace("+", r"\+")):
        RankAllocator(model, **args)


@pytest.mark.parametrize("kwargs, shown", [
    (dict(init_r=0), "init_r"), (dict(init_r=2.5), "init_r"), (dict(alpha=0), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(target_modules=["nope"]), "matched no module"),
])
def test_add_adalora_bad_arguments(kwargs, shown):
    with pytest.raises(ValueError, match=shown):
        add_adalora(tiny_llama(), **kwargs)


def test_layer_and_model_errors():
    with pytest.raises(ValueError, match="r must be"):
        SVDLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError):
        SVDLinear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="no SVDLinear"):
        RankAllocator(tiny_llama(), total_step=10)
    with pytest.raises(ValueError, match="no SVDLinear"):
        orth_regularization(tiny_llama())
    model = add_adalora(tiny_llama(), init_r=4)
    with pytest.raises(ValueError, match="already has adapter"):
        add_adalora(model)
    alloc = RankAllocator(model, init_r=4, target_r=2, total_step=10)
    with pytest.raises(ValueError, match="backward"):
        alloc.update_ipt(model)
    with pytest.raises(ValueError, match="budget"):
        alloc.mask_to_budget(model, 10**6)
    with pytest.raises(ValueError, match="LoRALinear"):  # save_adapter writes plain LoRA only
        save_adapter(model, "/nonexistent/never-written")
