"""Model surgery (lora_course/surgery.py): adding adapters is all or nothing, one function decides
what trains, and every method's add_* function goes through both."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_course import add_adalora, add_dora, add_int8, add_int8_lora, add_lora, add_qlora
from lora_course.surgery import (
    MODULES_TO_SAVE_FLAG,
    adapter_layers,
    freeze_all_but_adapters,
    replace_layers,
    swap_modules,
)
from lora_course.variants import add_lora_ga, add_vera

pytestmark = pytest.mark.usefixtures("one_thread")


def small_then_narrow() -> nn.Sequential:
    """Two linear layers; the second one is too narrow for r=4 (min(out, in) = 2)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2), nn.LayerNorm(2))


def snapshot(model: nn.Module) -> tuple[dict, dict, list]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, flags, [type(m).__name__ for m in model.modules()]


def assert_untouched(model: nn.Module, before: tuple[dict, dict, list]) -> None:
    state, flags, types = snapshot(model)
    assert types == before[2] and not adapter_layers(model)
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    assert all(torch.equal(state[k], before[0][k]) for k in state)


def test_pissa_error_on_a_later_layer_leaves_the_model_untouched():
    """PiSSA rewrites each base weight; a later layer that cannot take r fails before the first one."""
    model = small_then_narrow()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"init='pissa' needs r <= min\(in, out\) = 2, got r=4"):
        add_lora(model, ["0", "2"], r=4, init="pissa")
    assert_untouched(model, before)


def test_qlora_error_on_a_later_layer_leaves_the_model_untouched():
    model = small_then_narrow()
    model[2].double()  # NF4 quantizes float32/float16/bfloat16 weights only
    before = snapshot(model)
    with pytest.raises(ValueError, match="base weight must be float32/float16/bfloat16"):
        add_qlora(model, ["0", "2"], r=1)
    assert_untouched(model, before)


def test_lora_ga_error_on_a_later_layer_leaves_the_model_untouched():
    model = small_then_narrow()
    grads = {"0": torch.randn(16, 16), "2": torch.randn(2, 16)}
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"2r <= min\(out, in\) = 2"):
        add_lora_ga(model, grads, ["0", "2"], r=4)
    assert_untouched(model, before)


def test_a_failing_build_restores_the_requires_grad_flags():
    model = small_then_narrow()
    before = snapshot(model)

    def build(name: str, base: nn.Module) -> nn.Module:
        base.requires_grad_(False)  # what every adapter layer does to its base
        if name == "2":
            raise RuntimeError("boom")
        return nn.Identity()

    with pytest.raises(RuntimeError, match="boom"):
        replace_layers(model, ["0", "2"], build)
    assert_untouched(model, before)


def test_swap_modules_checks_everything_before_the_first_swap():
    model = small_then_narrow()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no submodule named \['nope'\]; nothing was replaced"):
        swap_modules(model, {"0": nn.Identity(), "nope": nn.Identity()})
    with pytest.raises(ValueError, match="must be nn.Module"):
        swap_modules(model, {"0": nn.Identity(), "2": "not a module"})
    assert_untouched(model, before)
    swap_modules(model, {"0": nn.Identity(), "2": nn.Identity()})
    assert isinstance(model[0], nn.Identity) and isinstance(model[2], nn.Identity)


@pytest.mark.parametrize("method, trainable", [
    (lambda m: add_lora(m, ["0", "2"], r=1, modules_to_save=["3"]), {"lora_A", "lora_B"}),
    (lambda m: add_dora(m, ["0", "2"], r=1, modules_to_save=["3"]), {"lora_A", "lora_B", "magnitude"}),
    (lambda m: add_qlora(m, ["0", "2"], r=1, modules_to_save=["3"]), {"lora_A", "lora_B"}),
    (lambda m: add_adalora(m, ["0", "2"], init_r=2, modules_to_save=["3"]), {"lora_A", "lora_E", "lora_B"}),
    (lambda m: add_vera(m, ["0", "2"], r=2, modules_to_save=["3"]), {"vera_lambda_d", "vera_lambda_b"}),
], ids=["lora", "dora", "qlora", "adalora", "vera"])
def test_every_method_trains_only_its_adapters_and_the_modules_to_save(method, trainable):
    model = method(small_then_narrow())
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in names if not n.startswith("3.")} == trainable
    assert {n for n in names if n.startswith("3.")} == {"3.weight", "3.bias"}
    assert getattr(model[3], MODULES_TO_SAVE_FLAG)


def test_int8_lora_trains_only_its_factors():
    model = add_int8_lora(add_int8(small_then_narrow()), r=1)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}


def test_freeze_all_but_adapters_unfreezes_what_an_adapter_lists():
    model = add_lora(small_then_narrow(), ["0"], r=1)
    model.requires_grad_(True)
    freeze_all_but_adapters(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"0.lora_A", "0.lora_B"}
