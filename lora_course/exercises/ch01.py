"""Chapter 01, LoRA from scratch: the checks that notebooks/01_lora_from_scratch.ipynb calls."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check, seeded_tensors


def _output_with_factors(cls: Any, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, x: torch.Tensor, r: int,
                         alpha: float) -> torch.Tensor:
    """``cls(copy of base, r, alpha)`` with its factors set to ``A`` and ``B``, applied to ``x``."""
    layer = cls(copy.deepcopy(base), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        return layer(x)


def _lora_forward_cases() -> Iterator[Case]:
    from .. import LoRALinear

    for seed, (d_in, d_out, r, alpha, bias, lead) in enumerate(
        [(16, 8, 4, 8.0, True, (3,)), (32, 32, 8, 16.0, False, (2, 5)), (10, 20, 1, 1.0, True, (4,))]
    ):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out, bias=bias)
        A, B, x = seeded_tensors(seed, (r, d_in), (d_out, r), lead + (d_in,))
        reference = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
        with torch.no_grad():
            reference.lora_A.copy_(A)
            reference.lora_B.copy_(B)
            expected = reference(x)

        apply = functools.partial(_output_with_factors, base=base, A=A, B=B, x=x, r=r, alpha=alpha)

        yield Case(
            expected=expected,
            apply=apply,
            label=f"layer(nn.Linear({d_in}, {d_out}, bias={bias}), r={r}, alpha={alpha}) on x of shape {lead + (d_in,)}",
            hint=None if r > 1 else "with r=1 the scale in front of the branch is alpha itself: is yours?",
        )


@exercise_check(
    "lora_forward",
    cases=_lora_forward_cases,
    idea="two paths add up: the frozen layer's own output, and a narrow branch through the two factors, scaled",
    formula="forward(x) = self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling",
)
def check_lora_forward(layer_class: type) -> None:
    """Check a LoRA layer class whose ``forward`` must equal ``lora_course.LoRALinear``'s."""


def _lora_trainable_params_cases() -> Iterator[Case]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .. import add_lora, count_parameters

    all_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = [
        ("tiny Llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), 8, ["q_proj", "v_proj"]),
        ("tiny Llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), 4, all_targets),
        ("7B-shaped Llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32), 8, ["q_proj", "v_proj"]),
        ("8B-shaped Llama with GQA", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8), 16, ["k_proj", "v_proj", "o_proj"]),
        ("MLP only", dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8), 2, ["gate_proj", "up_proj", "down_proj"]),
    ]
    for label, fields, r, targets in configs:
        config = LlamaConfig(vocab_size=1000, **fields)
        with torch.device("meta"):
            model = add_lora(LlamaForCausalLM(config), targets, r=r)
        gqa = fields["num_key_value_heads"] < fields["num_attention_heads"]
        yield Case(
            args=(config, r, targets),
            expected=count_parameters(model)[0],
            label=f"{label}, r={r}, targets={targets}",
            hint="k_proj and v_proj output num_key_value_heads * head_dim features, not hidden_size" if gqa and {"k_proj", "v_proj"} & set(targets) else None,
        )


@exercise_check(
    "lora_trainable_params",
    cases=_lora_trainable_params_cases,
    idea="each adapted layer adds two factors, one per side of the layer; every decoder layer has one of each target",
    formula="num_hidden_layers * sum over targets of r * (in_features + out_features), with k/v out = num_key_value_heads * head_dim",
)
def check_lora_trainable_params(fn: Callable[..., int]) -> None:
    """Check ``fn(config, r, targets)`` against ``count_parameters(add_lora(...))`` on meta models."""


def _merge_weight_cases() -> Iterator[Case]:

    from transformers.pytorch_utils import Conv1D

    from .. import LoRALinear

    for seed, (kind, d_in, d_out, r, alpha) in enumerate(
        [("linear", 16, 8, 4, 8.0), ("linear", 6, 6, 2, 1.0), ("conv1d", 6, 12, 3, 6.0)]
    ):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
        layer = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
        A, B = seeded_tensors(seed, (r, d_in), (d_out, r))
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.merge()
        fan_in_fan_out = kind == "conv1d"
        yield Case(
            args=(base.weight.detach().clone(), A, B, alpha / r),
            kwargs={"fan_in_fan_out": fan_in_fan_out},
            expected=layer.base.weight.detach().clone(),
            label=f"merge_weight({'Conv1D' if fan_in_fan_out else 'nn.Linear'} weight {tuple(base.weight.shape)}, r={r}, scaling={alpha / r:g}, fan_in_fan_out={fan_in_fan_out})",
            hint="a Conv1D weight is stored (in x out): which layout is your update in?" if fan_in_fan_out else None,
        )


@exercise_check(
    "merge_weight",
    cases=_merge_weight_cases,
    idea="the update is an (out x in) matrix; the weight may be stored the other way round",
    formula="W + scaling * (B @ A), transposed to (in x out) first when fan_in_fan_out=True",
)
def check_merge_weight(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, scaling, fan_in_fan_out=False)`` against ``LoRALinear.merge``."""


def reference_merge_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The library's merge of one weight: ``LoRALinear.merge()`` on a layer that holds ``weight``.

    Notebook 01's fallback for ``merge_weight`` while the exercise is a stub (a
    ``Conv1D`` base when ``fan_in_fan_out``, an ``nn.Linear`` otherwise). The global RNG is
    left as it was.
    """
    from transformers.pytorch_utils import Conv1D

    from .. import LoRALinear

    out_features, in_features = lora_B.shape[0], lora_A.shape[1]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        base = Conv1D(out_features, in_features) if fan_in_fan_out else nn.Linear(in_features, out_features, bias=False)
        base.weight.copy_(weight)
        layer = LoRALinear(base, r=lora_A.shape[0], alpha=1.0)
        layer.scaling = scaling
        layer.lora_A.copy_(lora_A)
        layer.lora_B.copy_(lora_B)
        layer.merge()
    return layer.base.weight.detach().clone()


def _alpha_bug_ratio_cases() -> Iterator[Case]:
    from .. import LoRALinear

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64), r=16, alpha=32.0)
    with torch.no_grad():
        layer.lora_B.normal_()  # a trained-looking B
        right = layer.delta_weight().norm()
        layer.scaling = 32.0  # the bug: alpha instead of alpha / r
        wrong = layer.delta_weight().norm()
    yield Case(expected=float(wrong / right), label="your predicted ratio |dW_bug| / |dW| for r=16, alpha=32")


@exercise_check(
    "alpha_bug_ratio",
    cases=_alpha_bug_ratio_cases,
    idea="only the number in front of B @ A changes; compare that number in the two layers",
    formula="ratio = alpha / (alpha / r) = r",
    expects="value",
)
def check_alpha_bug_ratio(predicted_ratio: float) -> None:
    """Check a prediction: how many times larger the update of a layer scaled by alpha (not alpha / r) is."""


def _lora_scaling_fix_cases() -> Iterator[Case]:

    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    # r = 1 last: there alpha and alpha / r agree, so a layer that scales by alpha passes it
    for seed, (d_in, d_out, r, alpha, lead) in enumerate(
        [(16, 8, 4, 8.0, (3,)), (32, 24, 16, 16.0, (2, 5)), (12, 12, 2, 32.0, (4,)), (20, 10, 8, 8.0, (6,)),
         (10, 20, 1, 4.0, (3,))]
    ):
        torch.manual_seed(100 + seed)
        base = nn.Linear(d_in, d_out)
        A, B, x = seeded_tensors(100 + seed, (r, d_in), (d_out, r), lead + (d_in,))  # B != 0: trained-looking
        peft_layer = PeftLoraLinear(copy.deepcopy(base), "default", config=LoraConfig(r=r, lora_alpha=alpha),
                                    r=r, lora_alpha=alpha)
        with torch.no_grad():
            peft_layer.lora_A["default"].weight.copy_(A)
            peft_layer.lora_B["default"].weight.copy_(B)
            expected = peft_layer(x)

        apply = functools.partial(_output_with_factors, base=base, A=A, B=B, x=x, r=r, alpha=alpha)

        yield Case(
            expected=expected,
            apply=apply,
            label=f"your layer vs PEFT's lora.Linear(nn.Linear({d_in}, {d_out}), r={r}, lora_alpha={alpha:g}), B != 0",
            hint=None if r == 1 else f"compare the size of your branch with PEFT's at r=1 and at r={r}",
        )


@exercise_check(
    "lora_scaling_fix",
    cases=_lora_scaling_fix_cases,
    idea="the bug hides at r=1 and grows with r: which number in the forward pass depends on r in PEFT's layer?",
    formula="h = base(x) + (alpha / r) * (x @ lora_A.T @ lora_B.T)",
)
def check_lora_scaling_fix(layer_class: type) -> None:
    """Check a fixed LoRA layer class against PEFT's ``lora.Linear`` on the same weights (B != 0), for several ranks."""
