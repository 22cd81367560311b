"""Chapter 02, PEFT in practice: the checks that notebooks/02_peft_in_practice.ipynb calls."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .framework import Case, exercise_check, seeded_tensors


def _peft_lora_model(shapes: list[tuple[int, int]], **config: Any):
    """PEFT's LoRA on an ``nn.Sequential`` of ``nn.Linear(in, out)`` layers (all targeted)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(*(nn.Linear(d_in, d_out) for d_in, d_out in shapes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(target_modules=[str(i) for i in range(len(shapes))], **config))


def _peft_scaling_cases() -> Iterator[Case]:
    for alpha, r, rs in [(8, 8, False), (16, 8, False), (16, 4, True), (32, 64, True), (1, 3, False), (8.0, 16, True)]:
        layer = _peft_lora_model([(8, 8)], r=r, lora_alpha=alpha, use_rslora=rs).base_model.model[0]
        yield Case(args=(alpha, r, rs), expected=float(layer.scaling["default"]),
                   label=f"peft_scaling(lora_alpha={alpha}, r={r}, use_rslora={rs})",
                   hint="rsLoRA divides by sqrt(r) instead of r" if rs else None)


@exercise_check("peft_scaling", cases=_peft_scaling_cases,
                idea="the factor is alpha divided by something that grows with the rank; which something depends on one flag",
                formula="lora_alpha / r, or lora_alpha / sqrt(r) when use_rslora=True")
def check_peft_scaling(fn: Callable[..., float]) -> None:
    """Check ``fn(lora_alpha, r, use_rslora) -> scaling`` against PEFT's ``LoraLayer.scaling``."""


_PEFT_SHAPES = [[(8, 8)], [(16, 4), (4, 16)], [(12, 20), (20, 20), (20, 6)], [(32, 8)]]


def _lora_config_trainable_cases() -> Iterator[Case]:
    for k, (shapes, r, bias) in enumerate(zip(_PEFT_SHAPES, (2, 4, 3, 8), ("none", "lora_only", "lora_only", "none"))):
        model = _peft_lora_model(shapes, r=r, bias=bias)
        yield Case(args=(shapes, r, bias), expected=model.get_nb_trainable_parameters()[0],
                   label=f"lora_config_trainable({shapes}, r={r}, bias={bias!r})",
                   hint="bias='lora_only' also trains each adapted layer's bias (out_features numbers)"
                   if bias == "lora_only" else None)


@exercise_check("lora_config_trainable", cases=_lora_config_trainable_cases,
                idea="count A and B of each adapted layer from its in and out features; then ask which biases bias='lora_only' unfreezes",
                formula="r * (in + out) per adapted layer, plus out per layer when bias='lora_only'")
def check_lora_config_trainable(fn: Callable[..., int]) -> None:
    """Check ``fn(shapes, r, bias) -> trainable`` against PEFT's ``get_nb_trainable_parameters``."""


def _adapter_file_bytes_cases() -> Iterator[Case]:
    from peft import get_peft_model_state_dict

    for shapes, r, dtype in zip(_PEFT_SHAPES, (2, 4, 3, 8), (torch.float32, torch.float16, torch.bfloat16, torch.float32)):
        model = _peft_lora_model(shapes, r=r).to(dtype)
        tensors = get_peft_model_state_dict(model)  # what save_pretrained writes
        size = dtype.itemsize
        yield Case(args=(shapes, r, size), expected=sum(t.numel() * t.element_size() for t in tensors.values()),
                   label=f"adapter_file_bytes({shapes}, r={r}, dtype_bytes={size})")


@exercise_check("adapter_file_bytes", cases=_adapter_file_bytes_cases,
                idea="the file holds only the adapter's tensors: count their numbers, then the bytes each number takes in the dtype",
                formula="each layer stores A (r x in) and B (out x r): r * (in + out) numbers, times the bytes per number")
def check_adapter_file_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(shapes, r, dtype_bytes) -> bytes`` against the tensors PEFT's ``save_pretrained`` writes."""


def reference_peft_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """The ``scaling`` PEFT stores for one adapter: read from a real ``LoraLayer`` (notebook 02's fallback)."""
    import contextlib
    import io

    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        layer = _peft_lora_model([(4, 4)], r=r, lora_alpha=lora_alpha, use_rslora=use_rslora).base_model.model[0]
    return float(layer.scaling["default"])


def reference_lora_config_trainable(shapes: list[tuple[int, int]], r: int, bias: str = "none") -> int:
    """PEFT's trainable count for these adapted ``nn.Linear`` layers, measured (notebook 02's fallback)."""
    with torch.random.fork_rng(devices=[]):
        return _peft_lora_model(shapes, r=r, bias=bias).get_nb_trainable_parameters()[0]


# ---------------------------------------------------------------- debugging: LoRA around GPT-2's Conv1D

_GPT2_TARGETS = ("h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc", "h.1.mlp.c_proj")


def _peft_gpt2(r: int = 4, alpha: float = 8.0):
    """A tiny GPT-2 with PEFT's LoRA (fan_in_fan_out=True) on every c_attn, c_proj and c_fc, B trained-looking."""
    import warnings

    from peft import LoraConfig, get_peft_model

    from ..models import tiny_gpt2

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(tiny_gpt2(), LoraConfig(r=r, lora_alpha=alpha, fan_in_fan_out=True,
                                                       target_modules=["c_attn", "c_proj", "c_fc"]))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would make every layout look right
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _wrapped_conv1d(cls: Any, peft_layer: Any, r: int, alpha: float) -> nn.Module:
    """The learner's wrapper around a copy of ``peft_layer``'s Conv1D, holding PEFT's A and B."""
    import copy

    layer = cls(copy.deepcopy(peft_layer.get_base_layer()), r=r, alpha=alpha)
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return layer


def _factor_shapes(layer: nn.Module) -> str:
    return f"lora_A {tuple(layer.lora_A.shape)}, lora_B {tuple(layer.lora_B.shape)}"


def _conv1d_lora_cases() -> Iterator[Case]:
    import copy

    r, alpha = 4, 8.0
    model = _peft_gpt2(r, alpha)
    gpt2 = model.base_model.model.transformer
    (x,) = seeded_tensors(7, (2, 5, 64))
    shape_hint = "a Conv1D stores its weight as (in, out), the transpose of nn.Linear's (out, in)"
    merge_hint = "B @ A is (out, in); the weight you add it to is stored as (in, out)"
    for name in _GPT2_TARGETS:
        peft_layer = gpt2.get_submodule(name)
        w = peft_layer.get_base_layer().weight
        what = f"Conv1DLoRA on GPT-2's {name} (weight {tuple(w.shape)}, in x out)"
        xin = x if w.shape[0] == 64 else seeded_tensors(8, (2, 5, w.shape[0]))[0]
        with torch.no_grad():
            before = peft_layer(xin)
            merged = copy.deepcopy(peft_layer)
            merged.merge()
            after = merged(xin)
        yield Case(expected=_factor_shapes(type("F", (), {"lora_A": peft_layer.lora_A["default"].weight,
                                                           "lora_B": peft_layer.lora_B["default"].weight})),
                   apply=lambda cls, p=peft_layer: _factor_shapes(cls(copy.deepcopy(p.get_base_layer()), r=r, alpha=alpha)),
                   label=f"{what}: factor shapes", hint=shape_hint)

        def forward(cls, p=peft_layer, xin=xin):
            with torch.no_grad():
                return _wrapped_conv1d(cls, p, r, alpha)(xin)

        yield Case(expected=before, apply=forward, label=f"{what}: output before merge() vs PEFT's", hint=shape_hint)

        def merge(cls, p=peft_layer, xin=xin):
            layer = _wrapped_conv1d(cls, p, r, alpha)
            layer.merge()
            with torch.no_grad():
                return layer.base.weight.detach().clone(), layer(xin)

        yield Case(expected=(merged.get_base_layer().weight.detach().clone(), after), apply=merge,
                   label=f"{what}: (base.weight, output) after merge() vs PEFT's merge()", hint=merge_hint)

    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids).logits
        merged_logits = copy.deepcopy(model).merge_and_unload()(ids).logits

    def whole_model(cls):
        from ..models import tiny_gpt2

        ours = tiny_gpt2()
        layers = []
        for name, module in list(ours.transformer.named_modules()):
            if name.rsplit(".", 1)[-1] in ("c_attn", "c_proj", "c_fc"):
                layer = _wrapped_conv1d(cls, gpt2.get_submodule(name), r, alpha)
                parent, child = name.rsplit(".", 1)
                setattr(ours.transformer.get_submodule(parent), child, layer)
                layers.append(layer)
        with torch.no_grad():
            unmerged = ours(ids).logits
            for layer in layers:
                layer.merge()
            return unmerged, ours(ids).logits

    yield Case(expected=(logits, merged_logits), apply=whole_model,
               label="a tiny GPT-2 with your wrapper on every c_attn, c_proj, c_fc: (logits, logits after merge()) vs PEFT",
               hint=merge_hint)


@exercise_check(
    "conv1d_lora",
    cases=_conv1d_lora_cases,
    idea="nn.Linear stores its weight as (out, in); GPT-2's Conv1D as (in, out): find every place that assumes the first",
    formula="in_features, out_features = base.weight.shape; merge adds (scaling * B @ A).T (PEFT's fan_in_fan_out=True)",
)
def check_conv1d_lora(cls: Callable[..., nn.Module]) -> None:
    """Check ``cls(base, r, alpha)`` (``lora_A``, ``lora_B``, ``forward``, ``merge()``) against PEFT's LoRA
    with ``fan_in_fan_out=True`` on the Conv1D layers of a tiny GPT-2."""


# ---------------------------------------------------------------- debugging: gradient checkpointing trap


def broken_checkpointed_lora(arch: str = "llama", checkpointing: bool = True, r: int = 4):
    """A PEFT LoRA model in training mode whose backward fails: reentrant gradient checkpointing on and no hook
    that makes the frozen embedding's output require grad.

    Recent transformers add that hook inside ``activation_checkpointing_enable``; older versions and
    trainers that switch checkpointing on by another path did not (huggingface/trl#3089), so this undoes it.

    Args:
        arch: ``"llama"`` (LoRA on q_proj, v_proj) or ``"gpt2"`` (LoRA on c_attn); B is trained-looking.
        checkpointing: False gives the same model (same A, B) without checkpointing, which trains.
        r: LoRA rank (lora_alpha = 2 r).
    """
    import warnings

    from peft import LoraConfig, get_peft_model

    from ..models import tiny_gpt2, tiny_llama

    if arch not in ("llama", "gpt2"):
        raise ValueError(f"arch={arch!r} is not supported; allowed values: llama, gpt2")
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(tiny_llama() if arch == "llama" else tiny_gpt2(),
                                   LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B = 0 would leave A without a gradient
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.train()
    model.config.use_cache = False
    if checkpointing:
        model.base_model.model.activation_checkpointing_enable({"use_reentrant": True})
        model.base_model.model.disable_input_require_grads()
    return model


def _lora_grads(model, ids: torch.Tensor) -> list[torch.Tensor | None]:
    import warnings

    from ..models import quiet_transformers  # GPT-2's "loss_type=None" notice, printed once per process

    torch.manual_seed(0)  # GPT-2 has dropout: the same masks in every run (checkpointing replays them)
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore")
        model(input_ids=ids, labels=ids).loss.backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


def _fix_checkpointing_cases() -> Iterator[Case]:
    hint = ("reentrant checkpointing only records a layer whose *inputs* require grad; the embedding is frozen, "
            "so what could make its output require grad?")
    for arch in ("llama", "gpt2"):
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(4))
        expected = _lora_grads(broken_checkpointed_lora(arch, checkpointing=False), ids)  # the gradients to reproduce
        reference = broken_checkpointed_lora(arch)
        what = f"fix_checkpointing(model) on a tiny {'Llama' if arch == 'llama' else 'GPT-2'} with LoRA"

        def grads(fn, arch=arch, ids=ids):
            model = broken_checkpointed_lora(arch)
            fn(model)
            return _lora_grads(model, ids)

        def still_on(fn, arch=arch):
            model = broken_checkpointed_lora(arch)
            fn(model)
            return model.base_model.model.is_activation_checkpointing

        def trainable(fn, arch=arch):
            model = broken_checkpointed_lora(arch)
            fn(model)
            return sum(p.numel() for p in model.parameters() if p.requires_grad)

        yield Case(expected=reference.base_model.model.is_activation_checkpointing, apply=still_on,
                   label=f"{what}: is checkpointing still on?",
                   hint="keep checkpointing on (it is what saves the memory): fix the graph, not the setting")
        yield Case(expected=reference.get_nb_trainable_parameters()[0], apply=trainable,
                   label=f"{what}: trainable parameters",
                   hint="the embedding weight stays frozen: the fix concerns the tensor it outputs, not its weight")
        yield Case(expected=expected, apply=grads, label=f"{what}: the LoRA gradients vs no checkpointing", hint=hint)


@exercise_check(
    "fix_checkpointing",
    cases=_fix_checkpointing_cases,
    idea="with use_reentrant=True, a checkpointed layer only gets a backward if one of its inputs requires grad",
    formula="model.enable_input_require_grads() (a forward hook: the embedding's output requires grad), or "
            "re-enable checkpointing with {'use_reentrant': False}",
)
def check_fix_checkpointing(fn: Callable[[Any], None]) -> None:
    """Check ``fn(model)``, applied to :func:`broken_checkpointed_lora` with reentrant checkpointing, against the
    gradients without checkpointing (checkpointing must stay on, the trainable count unchanged)."""


def reference_fix_checkpointing(model) -> None:
    """Notebook 02's fallback: hook the input embedding so that its output requires grad."""
    model.enable_input_require_grads()
