"""lora.py against real PEFT, on tiny Llama (GQA), tiny GPT-2 (Conv1D) and the MiniLM classifier.

Where our arithmetic runs in the same order as PEFT's, results are compared with
``torch.equal`` (max |diff| = 0); the measured differences are printed (``pytest -s``).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_course import LoRALinear, add_lora, count_parameters, merge_lora
from lora_course.compare import max_abs_diff
from lora_course.lora import UnsupportedLayerError, lora_layers, modules_to_save_names
from lora_course.models import tiny_gpt2, tiny_llama

PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "pissa": "pissa"}
pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def peft_config(kw: dict, task_type: str | None = None) -> LoraConfig:
    """The LoraConfig that means the same as our add_lora keyword arguments."""
    return LoraConfig(
        target_modules=kw.get("target_modules", "all-linear"), r=kw.get("r", 8),
        lora_alpha=kw.get("alpha", 8.0), lora_dropout=kw.get("dropout", 0.0),
        init_lora_weights=PEFT_INIT[kw.get("init", "kaiming")], use_rslora=kw.get("use_rslora", False),
        modules_to_save=kw.get("modules_to_save"), task_type=task_type,
    )


def build_pair(make, kw: dict, task_type: str | None = None, seed: int = 0):
    """The same base twice: ours via add_lora, PEFT's via get_peft_model, from one seed."""
    ours, ref = make(), make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        torch.manual_seed(seed)
        add_lora(ours, **kw)
        after_ours = torch.rand(4)
        torch.manual_seed(seed)
        peft_model = get_peft_model(ref, peft_config(kw, task_type))
        after_peft = torch.rand(4)
    # both leave the global RNG in the same place (PEFT's nn.Linear constructors draw too)
    assert torch.equal(after_ours, after_peft)
    return ours, peft_model


def peft_key(name: str, save: list[str]) -> str:
    """Our parameter name -> PEFT's (lora_A.default.weight; modules_to_save copies)."""
    for factor in ("lora_A", "lora_B"):
        if name.endswith("." + factor):
            return f"base_model.model.{name}.default.weight"
    for module in save:
        if name.startswith(module + "."):
            return f"base_model.model.{module}.modules_to_save.default.{name[len(module) + 1:]}"
    return f"base_model.model.{name}".replace(".base.", ".base_layer.")


def randomize_b(ours: nn.Module, peft_model: nn.Module, save: list[str]) -> None:
    """Give both models the same non-zero B (a fresh B = 0 would hide any error in the branch)."""
    g = torch.Generator().manual_seed(1)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
            params[peft_key(name + ".lora_B", save)].copy_(layer.lora_B)


LLAMA_BF16 = lambda: tiny_llama().to(torch.bfloat16)  # noqa: E731
LLAMA_FP16 = lambda: tiny_llama().to(torch.float16)  # noqa: E731
GPT2_FP16 = lambda: tiny_gpt2().to(torch.float16)  # noqa: E731
CASES = {
    "llama all-linear": (tiny_llama, dict(r=4, alpha=8.0)),
    "llama list gaussian rslora": (tiny_llama, dict(target_modules=["q_proj", "v_proj"], r=8, alpha=16.0,
                                                    init="gaussian", use_rslora=True)),
    "llama regex pissa + norms saved": (tiny_llama, dict(target_modules=r".*\.(q|k|down)_proj", r=4, alpha=4.0,
                                                         init="pissa", modules_to_save=["norm"])),
    "llama dropout": (tiny_llama, dict(target_modules=["q_proj", "up_proj"], r=4, dropout=0.3)),
    "gpt2 all-linear": (tiny_gpt2, dict(r=4, alpha=8.0, modules_to_save=["ln_f"])),
    "gpt2 pissa": (tiny_gpt2, dict(target_modules=["c_attn", "c_fc"], r=4, alpha=2.0, init="pissa")),
    "llama bf16": (LLAMA_BF16, dict(r=4, alpha=8.0)),
    "llama fp16 pissa": (LLAMA_FP16, dict(target_modules=["q_proj", "o_proj"], r=4, init="pissa")),
    "gpt2 fp16": (GPT2_FP16, dict(r=4, alpha=16.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_peft(case):
    make, kw = CASES[case]
    ours, peft_model = build_pair(make, kw)
    save = modules_to_save_names(ours)
    pparams = dict(peft_model.named_parameters())

    # same trainable parameters, same counts
    ours_trainable = {peft_key(n, save) for n, p in ours.named_parameters() if p.requires_grad}
    assert ours_trainable == {n for n, p in pparams.items() if p.requires_grad}
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()

    # same initial A, B and base weight (PiSSA rewrites the base), same dtypes
    for name, layer in lora_layers(ours).items():
        for ours_p, key in [(layer.lora_A, name + ".lora_A"), (layer.lora_B, name + ".lora_B"),
                            (layer.base.weight, name + ".base.weight")]:
            ref = pparams[peft_key(key, save)]
            assert ours_p.dtype == ref.dtype and torch.equal(ours_p, ref), key

    # forward and gradients: bit-identical (same ops in the same order)
    randomize_b(ours, peft_model, save)
    if kw.get("dropout"):
        ours.train(), peft_model.train()
    torch.manual_seed(5)
    out = ours(IDS).logits
    torch.manual_seed(5)  # the same dropout masks
    ref_out = peft_model(IDS).logits
    assert out.dtype == ref_out.dtype == next(make().parameters()).dtype
    assert torch.equal(out, ref_out)
    out.float().square().mean().backward()
    ref_out.float().square().mean().backward()
    grad_diff = max(max_abs_diff(p.grad, pparams[peft_key(n, save)].grad)
                    for n, p in ours.named_parameters() if p.requires_grad)
    assert grad_diff == 0.0
    print(f"\n[{case}] forward max|diff| = {max_abs_diff(out, ref_out)}, grads max|diff| = {grad_diff}")

    # merge_lora == merge_and_unload, weight for weight
    ours.eval(), peft_model.eval()
    with torch.no_grad():
        unmerged = ours(IDS).logits
    merged, ref_merged = merge_lora(ours), peft_model.merge_and_unload()
    assert not lora_layers(merged)
    assert [type(m) for m in merged.modules()] == [type(m) for m in ref_merged.modules()]
    sd, ref_sd = merged.state_dict(), ref_merged.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    with torch.no_grad():
        merged_out = merged(IDS).logits
        assert torch.equal(merged_out, ref_merged(IDS).logits)
    # merged vs unmerged: the merged weight is rounded once to the base dtype, so the two
    # agree to a few units of that dtype's rounding, relative to the size of the logits
    eps = torch.finfo(out.dtype).eps
    assert max_abs_diff(merged_out, unmerged) <= 16 * eps * unmerged.abs().max().item()


@pytest.mark.parametrize("kw, task_type", [
    (dict(r=4, modules_to_save=["classifier"]), "SEQ_CLS"),
    (dict(target_modules=["query", "value"], r=8, alpha=16.0, init="gaussian"), None),
])
def test_matches_peft_minilm(minilm, kw, task_type):
    model, batch = minilm
    ours, peft_model = build_pair(lambda: copy.deepcopy(model), kw, task_type)
    save = modules_to_save_names(ours)
    pparams = dict(peft_model.named_parameters())
    assert {peft_key(n, save) for n, p in ours.named_parameters() if p.requires_grad} == \
        {n for n, p in pparams.items() if p.requires_grad}
    assert count_parameters(ours) == peft_model.get_nb_trainable_parameters()
    assert all(torch.equal(layer.lora_A, pparams[peft_key(n + ".lora_A", save)]) for n, layer in lora_layers(ours).items())
    randomize_b(ours, peft_model, save)
    out, ref = ours(**batch).logits, peft_model(**batch).logits
    assert torch.equal(out, ref)
    out.sum().backward(), ref.sum().backward()
    assert all(torch.equal(p.grad, pparams[peft_key(n, save)].grad) for n, p in ours.named_parameters() if p.requires_grad)
    merged, ref_merged = merge_lora(ours), peft_model.merge_and_unload()
    assert torch.equal(merged(**batch).logits, ref_merged(**batch).logits)
    assert count_parameters(merged) == count_parameters(ref_merged)  # plain models again


def test_all_linear_leaves_out_the_output_head(minilm):
    llama, gpt2 = add_lora(tiny_llama()), add_lora(tiny_gpt2())
    assert "lm_head" not in lora_layers(llama) and len(lora_layers(llama)) == 14
    assert "lm_head" not in lora_layers(gpt2) and len(lora_layers(gpt2)) == 8
    assert all(isinstance(layer.base, Conv1D) and layer.fan_in_fan_out for layer in lora_layers(gpt2).values())
    # classifier head: with no task type PEFT cannot tell it is the head and adapts it, and so
    # do we; PEFT's task_type="SEQ_CLS" puts it in modules_to_save instead, and so does passing
    # modules_to_save=["classifier"] to ours (issue 2027 in PEFT)
    for task_type, save in [(None, None), ("SEQ_CLS", ["classifier"])]:
        ours = add_lora(copy.deepcopy(minilm[0]), modules_to_save=save)
        ref = get_peft_model(copy.deepcopy(minilm[0]), LoraConfig(target_modules="all-linear", task_type=task_type))
        names = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if hasattr(m, "lora_A")}
        assert names == set(lora_layers(ours)) and "bert.pooler.dense" in names
        assert ("classifier" in names) == (task_type is None)
        assert count_parameters(ours) == ref.get_nb_trainable_parameters()


def test_layer_basics_linear_and_conv1d():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    for base in (nn.Linear(16, 24), Conv1D(24, 16)):  # Conv1D(nf=out, nx=in), weight (in, out)
        layer = LoRALinear(base, r=4, alpha=6.0)
        assert layer.base is base and layer.r == 4 and layer.scaling == 6.0 / 4
        assert layer.lora_A.shape == (4, 16) and layer.lora_B.shape == (24, 4)
        assert isinstance(layer.lora_A, nn.Parameter) and "lora_A" in dict(layer.named_parameters())
        assert not any(p.requires_grad for p in base.parameters())
        assert torch.equal(layer(x), base(x))  # B = 0: the adapted layer starts as the base
        with torch.no_grad():
            layer.lora_B.normal_()
        dense = base.weight.T if isinstance(base, Conv1D) else base.weight  # (out, in)
        assert torch.equal(layer.delta_weight(), (layer.lora_B @ layer.lora_A) * layer.scaling)
        expected = x @ (dense + layer.delta_weight()).T + base.bias
        assert max_abs_diff(layer(x), expected) < 1e-5


def test_init_statistics():
    torch.manual_seed(0)
    n_in, r = 1024, 16
    gauss = LoRALinear(nn.Linear(n_in, 512), r=r, init="gaussian")
    A = gauss.lora_A.detach()
    n = A.numel()  # 16384 draws: the std estimate has a relative error of about 1/sqrt(2n) = 0.55%
    assert abs(A.std().item() * r - 1) < 0.03 and abs(A.mean().item()) < 4 / (r * math.sqrt(n))
    assert torch.count_nonzero(gauss.lora_B) == 0
    kaiming = LoRALinear(nn.Linear(n_in, 512), r=r)  # kaiming-uniform, a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    bound = 1 / math.sqrt(n_in)
    assert kaiming.lora_A.abs().max().item() <= bound and kaiming.lora_A.abs().max().item() > 0.99 * bound
    assert torch.count_nonzero(kaiming.lora_B) == 0


def test_pissa_layer_reconstructs_the_weight():
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    W = base.weight.detach().clone()
    layer = LoRALinear(base, r=6, alpha=3.0, init="pissa")
    # residual + scaling * B A gives back W, and the residual holds no energy in the top-r directions
    assert max_abs_diff(layer.base.weight + layer.delta_weight(), W) < 1e-6
    S = torch.linalg.svdvals(W)
    assert torch.allclose(torch.linalg.svdvals(layer.base.weight.detach())[:4], S[6:10], atol=1e-5)


def test_rslora_scaling():
    torch.manual_seed(0)
    base = nn.Linear(16, 16)
    plain, rs = LoRALinear(base, r=16, alpha=8.0), LoRALinear(base, r=16, alpha=8.0, use_rslora=True)
    assert plain.scaling == 8.0 / 16 and rs.scaling == 8.0 / math.sqrt(16)
    with torch.no_grad():
        rs.lora_A.copy_(plain.lora_A), plain.lora_B.normal_(), rs.lora_B.copy_(plain.lora_B)
    x = torch.randn(3, 16)
    ratio = (rs(x) - base(x)) / (plain(x) - base(x))
    assert torch.allclose(ratio, torch.full_like(ratio, 4.0), rtol=1e-4)  # sqrt(16) = 4 times larger


def test_dropout_only_on_the_branch():
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    layer = LoRALinear(base, r=4, dropout=0.5)
    x = torch.randn(4, 32)
    assert torch.equal(layer.train()(x), base(x))  # B = 0: dropout never reaches the frozen path
    with torch.no_grad():
        layer.lora_B.normal_()
    torch.manual_seed(1)
    out = layer(x)
    torch.manual_seed(1)
    branch = F.linear(F.linear(F.dropout(x, 0.5, training=True), layer.lora_A), layer.lora_B)
    assert torch.equal(out, base(x) + branch * layer.scaling)
    no_drop = base(x) + F.linear(F.linear(x, layer.lora_A), layer.lora_B) * layer.scaling
    assert not torch.equal(out, no_drop)
    assert torch.equal(layer.eval()(x), no_drop)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(dtype)
    layer = LoRALinear(base, r=4)
    # as PEFT (autocast_adapter_dtype=True): fp32 factors that went through the base dtype once
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert torch.equal(layer.lora_A, layer.lora_A.to(dtype).float())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    assert torch.equal(out, (base(x) + F.linear(F.linear(x.float(), layer.lora_A), layer.lora_B) * layer.scaling).to(dtype))


def test_merge_unmerge_and_warnings():
    torch.manual_seed(0)
    for base in (nn.Linear(16, 8), Conv1D(8, 16)):
        W = base.weight.detach().clone()
        layer = LoRALinear(base, r=4)
        with torch.no_grad():
            layer.lora_B.normal_()
        x = torch.randn(2, 16)
        before = layer(x)
        layer.merge()
        assert layer.merged and max_abs_diff(layer(x), before) < 1e-5
        merged_W = base.weight.detach().clone()
        with pytest.warns(UserWarning, match="already merged"):
            layer.merge()
        assert torch.equal(base.weight, merged_W)  # the second merge changed nothing
        layer.unmerge()
        assert not layer.merged and max_abs_diff(base.weight, W) < 1e-6
        with pytest.warns(UserWarning, match="not merged"):
            layer.unmerge()
        assert max_abs_diff(base.weight, W) < 1e-6


def test_merge_lora_on_a_layer_and_on_any_wrapper():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = layer(x)
    plain = merge_lora(layer)
    assert type(plain) is nn.Linear and max_abs_diff(plain(x), expected) < 1e-6

    class Doubler(nn.Module):
        """A different adapter wrapper: merge_lora only needs merged_module()."""

        def __init__(self, base: nn.Linear) -> None:
            super().__init__()
            self.base = base

        def forward(self, x):
            return 2 * self.base(x)

        def merged_module(self) -> nn.Module:
            merged = nn.Linear(self.base.in_features, self.base.out_features)
            merged.load_state_dict({k: 2 * v for k, v in self.base.state_dict().items()})
            return merged

    model = nn.Sequential(Doubler(nn.Linear(8, 8)), nn.ReLU(), LoRALinear(nn.Linear(8, 4), r=2))
    expected = model(x)
    merge_lora(model)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]
    assert max_abs_diff(model(x), expected) < 1e-6


def test_count_parameters_small_model():
    model = nn.Sequential(nn.Linear(10, 20), nn.LayerNorm(20), nn.Linear(20, 5))
    add_lora(model, target_modules=["0"], r=2, modules_to_save=["1"])
    lora = 2 * 10 + 20 * 2
    norm = 2 * 20
    base = 10 * 20 + 20 + 20 * 2 + 20 * 5 + 5
    # trainable: A, B and the norm; total: PEFT also holds a frozen original of the norm
    assert count_parameters(model) == (lora + norm, base + lora + norm)


BAD_LAYER_ARGS = [
    (dict(r=0), "r=0"), (dict(r=-2), "r=-2"), (dict(r=2.0), "r=2.0"), (dict(r=True), "r=True"),
    (dict(alpha=0), "alpha=0"), (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(dropout=1.0), "dropout=1.0"), (dict(dropout=-0.1), "dropout=-0.1"),
    (dict(init="xavier"), "init='xavier'"),
]


@pytest.mark.parametrize("kwargs, shown", BAD_LAYER_ARGS)
def test_bad_arguments_raise_value_errors(kwargs, shown):
    with pytest.raises(ValueError, match=shown.replace("(", r"\(").replace(".", r"\.")):
        LoRALinear(nn.Linear(4, 4), **kwargs)
    model = tiny_llama()
    with pytest.raises(ValueError, match=shown.split("=")[0]):
        add_lora(model, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_unsupported_base_layer():
    for exc in (TypeError, ValueError):
        with pytest.raises(exc, match="Conv2d"):
            LoRALinear(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="init='pissa' needs a float32/float16/bfloat16 base weight, got torch.float64"):
        LoRALinear(nn.Linear(4, 4).double(), r=2, init="pissa")
    with pytest.raises(ValueError, match=r"r <= min\(in, out\) = 4, got r=8"):
        LoRALinear(nn.Linear(16, 4), r=8, init="pissa")
    assert issubclass(UnsupportedLayerError, TypeError) and issubclass(UnsupportedLayerError, ValueError)


def test_add_lora_errors_name_the_problem():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"matched no module.*q_proj.*15 in all"):
        add_lora(model, target_modules=["query"])
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp \(LlamaMLP\)"):
        add_lora(model, target_modules=["mlp"])
    with pytest.raises(ValueError, match="target_modules must be"):
        add_lora(model, target_modules=5)
    with pytest.raises(ValueError, match="modules_to_save must be a list"):
        add_lora(model, modules_to_save="norm")
    with pytest.raises(ValueError, match="modules_to_save=.*matched no module"):
        add_lora(model, modules_to_save=["no_such_module"])
    assert not lora_layers(model)  # none of the failures touched the model
    add_lora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="already has adapter layers"):
        add_lora(model, target_modules=["v_proj"])
    assert set(lora_layers(model)) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
