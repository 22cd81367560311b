"""Bad and edge inputs across the public API, as a careful user would try them (issue 24).

Each case asserts the error type (ValueError unless another is documented), that the message
names the argument (or the file, or the layer), and that nothing changed: the model's tensors,
dtypes, module types and requires_grad flags, the files on disk, the optimizer's parameters,
states and step counters. A retry with good input then works where the case says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lora_course import (
    LoRALinear,
    QLoRALinear,
    add_adalora,
    add_dora,
    add_int8,
    add_int8_lora,
    add_lora,
    add_qlora,
    load_adapter,
    merge_lora,
    save_adapter,
    shift_short_attention,
)
from lora_course.memory_estimate import estimate_training_memory
from lora_course.optim8bit import AdamW8bit
from lora_course.peft_io import CONFIG_NAME, WEIGHTS_NAME
from lora_course.qlora import NF4Linear, quantize_linear_layers
from lora_course.quant.int8 import Int8Linear
from lora_course.variants import add_lora_ga, add_pissa, add_vera

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")


class Net(nn.Module):
    """Three named linear layers; ``last`` is (16 -> 2), too narrow for PiSSA with r=4."""

    def __init__(self, last_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(64, 16)
        self.fc2 = nn.Linear(16, 16)
        self.last = nn.Linear(16, 2, dtype=last_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def snapshot(model: nn.Module) -> tuple:
    state = {k: (v.clone(), v.dtype) for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [(n, type(m).__name__) for n, m in model.named_modules()]
    return state, flags, types


def assert_unchanged(model: nn.Module, before: tuple) -> None:
    state, flags, types = snapshot(model)
    assert types == before[2]
    assert flags == before[1]
    assert state.keys() == before[0].keys()
    for key, (value, dtype) in state.items():
        old, old_dtype = before[0][key]
        assert dtype == old_dtype, key
        assert torch.equal(value, old), key


def expect_refusal(call, match: str, model: nn.Module | None = None, error: type = ValueError):
    before = snapshot(model) if model is not None else None
    with pytest.raises(error, match=match):
        call()
    if model is not None:
        assert_unchanged(model, before)


# ------------------------------------------------------------------ adding adapters (arguments)

ADD_CASES = [
    # add_lora
    (add_lora, dict(r=0), r"\br must be"),
    (add_lora, dict(r=-1), r"\br must be"),
    (add_lora, dict(r=2.5), r"\br must be"),
    (add_lora, dict(r="4"), r"\br must be"),
    (add_lora, dict(r=True), r"\br must be"),
    (add_lora, dict(r=None), r"\br must be"),
    (add_lora, dict(alpha=0), r"alpha must be"),
    (add_lora, dict(alpha=-1.0), r"alpha must be"),
    (add_lora, dict(alpha=INF), r"alpha must be a finite"),
    (add_lora, dict(alpha=NAN), r"alpha must be a finite"),
    (add_lora, dict(alpha="8"), r"alpha must be"),
    (add_lora, dict(alpha=True), r"alpha must be"),
    (add_lora, dict(dropout=1.0), r"dropout must be"),
    (add_lora, dict(dropout=-0.1), r"dropout must be"),
    (add_lora, dict(dropout=NAN), r"dropout must be"),
    (add_lora, dict(dropout="0.1"), r"dropout must be"),
    (add_lora, dict(init="xavier"), r"init='xavier'"),
    (add_lora, dict(init=None), r"init=None"),
    (add_lora, dict(use_rslora="false"), r"use_rslora must be True or False"),
    (add_lora, dict(use_rslora=1), r"use_rslora must be True or False"),
    (add_lora, dict(use_rslora=None), r"use_rslora must be True or False"),
    (add_lora, dict(target_modules=5), r"target_modules must be"),
    (add_lora, dict(target_modules=[1, 2]), r"target_modules must be"),
    (add_lora, dict(target_modules=["nope"]), r"target_modules=\['nope'\] matched no module"),
    (add_lora, dict(target_modules="fc.*x"), r"target_modules='fc.\*x' matched no module"),
    (add_lora, dict(modules_to_save="last"), r"modules_to_save must be"),
    (add_lora, dict(modules_to_save=["nope"]), r"modules_to_save=\['nope'\] matched no module"),
    (add_lora, dict(target_modules=["fc1"], modules_to_save=["fc1"]), r"matched only \['fc1'\], which lie in modules_to_save"),
    (add_pissa, dict(r=0), r"\br must be"),
    # add_qlora
    (add_qlora, dict(blocksize=63), r"blocksize=63"),
    (add_qlora, dict(blocksize=True), r"blocksize=True"),
    (add_qlora, dict(double_quant="false"), r"double_quant must be True or False"),
    (add_qlora, dict(double_quant=1), r"double_quant must be True or False"),
    (add_qlora, dict(compute_dtype=torch.int8), r"compute_dtype=torch.int8"),
    (add_qlora, dict(compute_dtype="float32"), r"compute_dtype='float32'"),
    (add_qlora, dict(r=0), r"\br must be"),
    (add_qlora, dict(alpha=INF), r"alpha must be a finite"),
    (add_qlora, dict(target_modules=["nope"]), r"matched no module"),
    # add_dora
    (add_dora, dict(r=0), r"\br must be"),
    (add_dora, dict(alpha=INF), r"alpha must be a finite"),
    (add_dora, dict(dropout=1), r"dropout must be"),
    (add_dora, dict(target_modules=["nope"]), r"matched no module"),
    # add_adalora
    (add_adalora, dict(init_r=0), r"init_r must be"),
    (add_adalora, dict(alpha=INF), r"alpha must be a finite"),
    (add_adalora, dict(dropout=2.0), r"dropout must be"),
    # add_vera
    (add_vera, dict(r=0), r"\br must be"),
    (add_vera, dict(d_initial=INF), r"d_initial must be a finite"),
    (add_vera, dict(d_initial="0.1"), r"d_initial must be"),
    (add_vera, dict(projection_prng_key=-1), r"projection_prng_key must be"),
    (add_vera, dict(dropout=1.5), r"dropout must be"),
    # add_int8
    (add_int8, dict(threshold=-1.0), r"threshold must be"),
    (add_int8, dict(threshold="6"), r"threshold must be"),
    (add_int8, dict(skip_modules="fc1"), r"skip_modules must be"),
    (add_int8, dict(target_modules=["nope"]), r"matched no module"),
    # quantize_linear_layers
    (quantize_linear_layers, dict(blocksize=7), r"blocksize=7"),
    (quantize_linear_layers, dict(double_quant="yes"), r"double_quant must be True or False"),
    (quantize_linear_layers, dict(skip_modules=["nope"]), r"skip_modules entry 'nope'"),
    (quantize_linear_layers, dict(skip_modules=5), r"skip_modules must be"),
    (quantize_linear_layers, dict(compute_dtype=torch.float64), r"compute_dtype=torch.float64"),
]


@pytest.mark.parametrize("add, kwargs, match", ADD_CASES,
                         ids=[f"{f.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}" for f, kw, _ in ADD_CASES])
def test_adding_adapters_refuses_bad_arguments_and_changes_nothing(add, kwargs, match):
    model = Net()
    expect_refusal(lambda: add(model, **kwargs), match, model)


LORA_GA_CASES = [
    (lambda g: {k: v for k, v in g.items() if k != "last"}, dict(), r"gradients has no entry for the targets \['last'\]"),
    (lambda g: {**g, "last": torch.zeros(3, 3)}, dict(), r"gradients\['last'\] must be a float tensor"),
    (lambda g: {**g, "last": torch.full((2, 16), NAN)}, dict(), r"gradients\['last'\] contains NaN"),
    (lambda g: {**g, "last": g["last"].long()}, dict(), r"gradients\['last'\] must be a float tensor"),
    (lambda g: g, dict(r=4), r"layer 'last'.*2r <= min"),
    (lambda g: g, dict(gamma=0.0), r"gamma must be"),
    (lambda g: None, dict(), r"gradients must be a dict"),
]


@pytest.mark.parametrize("edit, kwargs, match", LORA_GA_CASES)
def test_lora_ga_refuses_bad_gradients_naming_the_layer(edit, kwargs, match):
    model = Net()
    grads = {n: torch.randn(m.weight.shape) for n, m in model.named_children()}
    expect_refusal(lambda: add_lora_ga(model, edit(grads), **{"r": 1, **kwargs}), match, model)
    add_lora_ga(model, grads, r=1)  # a retry with good input works
    assert type(model.last).__name__ == "LoRALinear"


def conv1d_last(model: nn.Module) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(1)
    model.last = Conv1D(2, 16)
    return model


def weight_with_inf(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        model.last.weight[0, 0] = INF
    return model


LAST_LAYER_CASES = [  # the last layer fails: nothing changes, the error names it, a retry works
    ("pissa r too large", lambda m: add_lora(m, r=4, init="pissa"), r"init='pissa' needs r <= min",
     Net, lambda m: add_lora(m, r=2, init="pissa")),
    ("qlora float64 layer", lambda m: add_qlora(m), r"layer 'last'.*float32/float16/bfloat16",
     lambda: Net(torch.float64), lambda m: add_qlora(m, target_modules=["fc1", "fc2"])),
    ("int8 inf weight", lambda m: add_int8(m), r"layer 'last'.*NaN or inf",
     lambda: weight_with_inf(Net()), lambda m: add_int8(m, skip_modules=["last"])),
    ("nf4 float64 layer", lambda m: quantize_linear_layers(m), r"layer 'last'.*float32/float16/bfloat16",
     lambda: Net(torch.float64), lambda m: quantize_linear_layers(m, skip_modules=["last"])),
    ("vera Conv1D layer", lambda m: add_vera(m, r=4), r"layer 'last': VeRALinear wraps nn.Linear layers",
     lambda: conv1d_last(Net()), lambda m: add_vera(m, ["fc1", "fc2"], r=4)),
]


@pytest.mark.parametrize("label, bad, match, make, retry", LAST_LAYER_CASES, ids=[c[0] for c in LAST_LAYER_CASES])
def test_a_failure_on_the_last_layer_leaves_the_model_bit_identical(label, bad, match, make, retry):
    model = make()
    expect_refusal(lambda: bad(model), match, model)
    retry(model)
    assert type(model.fc1).__name__ != "Linear"


def test_all_linear_skips_the_attention_out_proj_and_an_explicit_target_is_refused():
    """nn.MultiheadAttention reads out_proj.weight itself: PEFT wraps it anyway and its factors
    never get a gradient; we leave it out of "all-linear" (with a warning) and refuse it by name."""
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    expect_refusal(lambda: add_lora(layer, ["out_proj"]), r"out_proj.*reads the weight directly", layer)
    with pytest.warns(UserWarning, match=r"leaves out \['self_attn.out_proj'\]"):
        add_lora(layer, r=4)
    assert type(layer.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with torch.no_grad():
        for m in (layer.linear1, layer.linear2):
            m.lora_B.normal_()
    layer(torch.randn(2, 3, 16)).sum().backward()  # the forward works; every adapter gets a gradient
    assert all(p.grad is not None for n, p in layer.named_parameters() if "lora_" in n)
    other = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    quantize_linear_layers(other)  # NF4 would break the attention's weight read the same way
    assert type(other.self_attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    other(torch.randn(2, 3, 16))


def test_numpy_integers_are_stored_as_python_values():
    model = add_lora(Net(), r=np.int64(4), alpha=np.int32(8))
    assert type(model.fc1.r) is int and type(model.fc1.alpha) is int
    model = add_qlora(Net(), r=np.int64(2))
    assert type(model.fc1.r) is int


# ------------------------------------------------------------------ merging

def lora_net():
    return add_lora(Net(), r=2)


def randomized(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_E" in name or "vera_lambda_b" in name:
                p.normal_()
    return model


MERGE_WRAPPERS = {
    "lora": lambda: randomized(add_lora(Net(), r=2)),
    "dora": lambda: randomized(add_dora(Net(), r=2)),
    "adalora": lambda: randomized(add_adalora(Net(), init_r=2)),
    "qlora": lambda: randomized(add_qlora(Net(), r=2)),
    "vera": lambda: randomized(add_vera(Net(), r=4)),
}


def break_last(model):
    """The last layer's B of the wrong shape (as if a user assigned another tensor)."""
    layer = model.last
    name = "vera_lambda_b" if hasattr(layer, "vera_lambda_b") else "lora_B"
    old = getattr(layer, name)
    setattr(layer, name, nn.Parameter(torch.ones(old.shape[0] + 1, *old.shape[1:])))
    return model


@pytest.mark.parametrize("kind", list(MERGE_WRAPPERS))
def test_merge_lora_is_all_or_nothing(kind):
    model = break_last(MERGE_WRAPPERS[kind]())
    expect_refusal(lambda: merge_lora(model), r"layer 'last'", model, error=(ValueError, RuntimeError))
    assert not model.fc1.merged if hasattr(model.fc1, "merged") else True
    good = MERGE_WRAPPERS[kind]()
    x = torch.randn(3, 64)
    expected = good.eval()(x)
    merged = merge_lora(good)
    assert type(merged.fc1) in (nn.Linear,) and torch.allclose(merged(x), expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["lora", "adalora", "vera"])
def test_a_layer_merge_with_a_broken_factor_changes_nothing(kind):
    model = break_last(MERGE_WRAPPERS[kind]())
    layer = model.last
    expect_refusal(layer.merge, r"shape|size", layer, error=(ValueError, RuntimeError))
    assert not layer.merged


# ------------------------------------------------------------------ saving and loading adapter files

@pytest.fixture
def saved(tmp_path):
    model = randomized(add_lora(Net(), r=2))
    path = save_adapter(model, tmp_path / "adapter")
    return model, path


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is KeyError:
            config.pop(key)
        else:
            config[key] = value
    (path / CONFIG_NAME).write_text(json.dumps(config))


def truncate(path: Path, name: str, keep: int) -> None:
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[:keep])


LOAD_CASES = [
    ("invalid JSON", lambda p: (p / CONFIG_NAME).write_text("{'r': 2,"), r"adapter_config.json' is not valid JSON"),
    ("JSON list", lambda p: (p / CONFIG_NAME).write_text("[1, 2]"), r"adapter_config.json' must hold a JSON object"),
    ("empty config", lambda p: (p / CONFIG_NAME).write_text(""), r"adapter_config.json' is not valid JSON"),
    ("truncated safetensors", lambda p: truncate(p, WEIGHTS_NAME, 40), r"adapter_model.safetensors' cannot be read"),
    ("empty safetensors", lambda p: truncate(p, WEIGHTS_NAME, 0), r"adapter_model.safetensors' cannot be read"),
    ("half safetensors", lambda p: truncate(p, WEIGHTS_NAME, (p / WEIGHTS_NAME).stat().st_size // 2),
     r"adapter_model.safetensors' cannot be read"),
    ("r string", lambda p: edit_config(p, r="2"), r"adapter_config.json: r='2' is not allowed"),
    ("r zero", lambda p: edit_config(p, r=0), r"adapter_config.json: r=0 is not allowed"),
    ("alpha inf", lambda p: edit_config(p, lora_alpha=1e999), r"lora_alpha=inf is not allowed"),
    ("alpha string", lambda p: edit_config(p, lora_alpha="8"), r"lora_alpha='8' is not allowed"),
    ("alpha negative", lambda p: edit_config(p, lora_alpha=-8), r"lora_alpha=-8 is not allowed"),
    ("dropout 1.5", lambda p: edit_config(p, lora_dropout=1.5), r"lora_dropout=1.5 is not allowed"),
    ("use_rslora string", lambda p: edit_config(p, use_rslora="false"), r"use_rslora='false' is not allowed"),
    ("rank_pattern zero on the last layer", lambda p: edit_config(p, rank_pattern={"last": 0}),
     r"rank_pattern gives layer 'last' r=0"),
    ("rank_pattern string", lambda p: edit_config(p, rank_pattern={"last": "2"}), r"rank_pattern gives layer 'last'"),
    ("alpha_pattern inf on the last layer", lambda p: edit_config(p, alpha_pattern={"last": 1e999}),
     r"alpha_pattern gives layer 'last' alpha=inf"),
    ("alpha_pattern string", lambda p: edit_config(p, alpha_pattern={"last": "x"}), r"alpha_pattern gives layer 'last'"),
    ("rank_pattern a list", lambda p: edit_config(p, rank_pattern=[1]), r"rank_pattern=\[1\] is not allowed"),
    ("target_modules a number", lambda p: edit_config(p, target_modules=5), r"target_modules=5 is not allowed"),
    ("target_modules missing", lambda p: edit_config(p, target_modules=KeyError), r"target_modules is missing"),
    ("target_modules no match", lambda p: edit_config(p, target_modules=["q_proj"]), r"adapter_config.json\): target_modules"),
    ("modules_to_save a string", lambda p: edit_config(p, modules_to_save="last"), r"modules_to_save='last' is not allowed"),
    ("peft_type", lambda p: edit_config(p, peft_type="IA3"), r"peft_type='IA3'"),
    ("init olora", lambda p: edit_config(p, init_lora_weights="olora"), r"init_lora_weights='olora'"),
    ("use_dora", lambda p: edit_config(p, use_dora=True), r"use_dora=True"),
    ("rank mismatch", lambda p: edit_config(p, r=3), r"adapter_model.safetensors does not match this model"),
]


@pytest.mark.parametrize("label, corrupt, match", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_adapter_refuses_a_bad_file_naming_it_and_changes_nothing(saved, label, corrupt, match):
    trained, path = saved
    corrupt(path)
    model = Net()
    expect_refusal(lambda: load_adapter(model, path), match, model)


def test_load_adapter_refuses_missing_files(tmp_path, saved):
    _, path = saved
    model = Net()
    expect_refusal(lambda: load_adapter(model, tmp_path / "nowhere"), "adapter directory not found", model,
                   error=FileNotFoundError)
    (path / WEIGHTS_NAME).unlink()
    expect_refusal(lambda: load_adapter(model, path), "adapter_model.safetensors is missing", model,
                   error=FileNotFoundError)


def test_load_adapter_refuses_integer_factors(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(str(path / WEIGHTS_NAME))
    key = next(k for k in tensors if ".last.lora_A" in k)
    tensors[key] = tensors[key].to(torch.int64)
    save_file(tensors, str(path / WEIGHTS_NAME))
    model = Net()
    expect_refusal(lambda: load_adapter(model, path), r"not floating point.*last\.lora_A", model)


def test_a_retry_after_a_refused_load_works(saved):
    trained, path = saved
    good = json.loads((path / CONFIG_NAME).read_text())
    edit_config(path, alpha_pattern={"last": 1e999})
    model = Net()
    with pytest.raises(ValueError, match="alpha_pattern"):
        load_adapter(model, path)
    (path / CONFIG_NAME).write_text(json.dumps(good))
    load_adapter(model, path)
    x = torch.randn(3, 64)
    assert torch.equal(model.eval()(x), trained.eval()(x))


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_a_failed_weights_write_leaves_the_previous_adapter_loadable(saved, monkeypatch):
    import safetensors.torch

    trained, path = saved
    before = folder_bytes(path)

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # a disk that fills up half-way
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    other = add_lora(Net(), r=4)  # a different adapter: its config would not fit the old weights
    with pytest.raises(OSError, match="No space left"):
        save_adapter(other, path)
    assert folder_bytes(path) == before  # no temporary file left behind either
    monkeypatch.undo()
    reloaded = load_adapter(Net(), path)
    x = torch.randn(3, 64)
    assert torch.equal(reloaded.eval()(x), trained.eval()(x))


def test_a_failed_first_save_leaves_no_folder(tmp_path, monkeypatch):
    model = add_lora(Net(), r=2)
    model.name_or_path = Path("somewhere")  # recorded as base_model_name_or_path: JSON cannot hold a Path
    with pytest.raises(ValueError, match="cannot be written as JSON"):
        save_adapter(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_save_adapter_refuses_a_file_path_and_a_model_without_lora(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        save_adapter(add_lora(Net(), r=2), tmp_path / "file")
    with pytest.raises(ValueError, match="no LoRALinear layers"):
        save_adapter(Net(), tmp_path / "plain")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_numpy_rank_saves_and_loads(tmp_path):
    model = randomized(add_lora(Net(), r=np.int64(4), alpha=np.float32(8.0)))
    save_adapter(model, tmp_path / "np")
    assert json.loads((tmp_path / "np" / CONFIG_NAME).read_text())["r"] == 4
    again = load_adapter(Net(), tmp_path / "np")
    x = torch.randn(2, 64)
    assert torch.equal(again.eval()(x), model.eval()(x))


def test_overwriting_an_adapter_keeps_other_files(saved):
    _, path = saved
    (path / "README.md").write_text("notes")
    save_adapter(add_lora(Net(), r=4), path)
    assert (path / "README.md").read_text() == "notes"
    assert json.loads((path / CONFIG_NAME).read_text())["r"] == 4
    assert sorted(p.name for p in path.iterdir()) == ["README.md", CONFIG_NAME, WEIGHTS_NAME]


# ------------------------------------------------------------------ integer inputs on the forward path

def int8_layer():
    return Int8Linear(nn.Linear(64, 16)).eval()


FORWARD_CASES = [
    ("Int8Linear int64", int8_layer, lambda: torch.ones(2, 64, dtype=torch.long)),
    ("Int8Linear int32 training", lambda: int8_layer().train(), lambda: torch.ones(2, 64, dtype=torch.int32)),
    ("Int8Linear bool", int8_layer, lambda: torch.ones(2, 64, dtype=torch.bool)),
    ("Int8Linear uint8", int8_layer, lambda: torch.ones(2, 64, dtype=torch.uint8)),
    ("NF4Linear int64", lambda: NF4Linear(nn.Linear(64, 16)), lambda: torch.ones(2, 64, dtype=torch.long)),
    ("QLoRALinear int64", lambda: QLoRALinear(nn.Linear(64, 16)), lambda: torch.ones(2, 64, dtype=torch.long)),
    ("QLoRALinear int16", lambda: QLoRALinear(nn.Linear(64, 16)), lambda: torch.ones(2, 64, dtype=torch.int16)),
    ("Int8LoRA int64", lambda: add_int8_lora(add_int8(Net()), r=2).fc1, lambda: torch.ones(2, 64, dtype=torch.long)),
]


@pytest.mark.parametrize("label, make, x", FORWARD_CASES, ids=[c[0] for c in FORWARD_CASES])
def test_quantized_layers_refuse_integer_inputs_and_keep_their_state(label, make, x):
    layer = make()
    expect_refusal(lambda: layer(x()), r"x has dtype torch\.\w+; a floating-point tensor is required", layer)


def qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, 2, 8, 4, generator=g).to(dtype) for _ in range(3)]


S2_CASES = [
    ("int q k v", lambda: (*qkv(torch.long), 4), {}, r"q has dtype torch.int64"),
    ("int k", lambda: (qkv()[0], qkv(torch.int32)[1], qkv()[2], 4), {}, r"k has dtype torch.int32"),
    ("mixed dtypes", lambda: (qkv()[0], qkv(torch.float64)[1], qkv()[2], 4), {}, r"one dtype"),
    ("shift string", lambda: (*qkv(), 4), dict(shift="false"), r"shift must be True or False"),
    ("scaling inf", lambda: (*qkv(), 4), dict(scaling=INF), r"scaling must be a finite"),
    ("scaling string", lambda: (*qkv(), 4), dict(scaling="0.5"), r"scaling must be"),
    ("group odd", lambda: (*qkv(), 3), {}, r"group_size=3"),
    ("group bool", lambda: (*qkv(), True), {}, r"group_size must be an int"),
    ("q not a tensor", lambda: (np.ones((1, 2, 8, 4)), *qkv()[1:], 4), {}, r"q must be a torch.Tensor"),
]


@pytest.mark.parametrize("label, args, kwargs, match", S2_CASES, ids=[c[0] for c in S2_CASES])
def test_shift_short_attention_refuses_bad_inputs(label, args, kwargs, match):
    a = args()
    copies = [t.clone() if torch.is_tensor(t) else t for t in a]
    with pytest.raises(ValueError, match=match):
        shift_short_attention(*a, **kwargs)
    assert all(torch.equal(t, c) for t, c in zip(a, copies) if torch.is_tensor(t))


S2_PATCH_CASES = [
    (dict(group_size_ratio=0), r"group_size_ratio must be"),
    (dict(group_size_ratio=1.5), r"group_size_ratio must be"),
    (dict(group_size_ratio="0.25"), r"group_size_ratio must be"),
    (dict(group_size_ratio=True), r"group_size_ratio must be"),
    (dict(shift="false"), r"shift must be True or False"),
]


@pytest.mark.parametrize("kwargs, match", S2_PATCH_CASES)
def test_patch_s2attn_refuses_bad_arguments_and_changes_nothing(kwargs, match):
    from lora_course.longlora import is_s2attn_patched, patch_s2attn
    from lora_course.models import tiny_llama

    model = tiny_llama()
    implementation = model.config._attn_implementation
    expect_refusal(lambda: patch_s2attn(model, **kwargs), match, model)
    assert model.config._attn_implementation == implementation and not is_s2attn_patched(model)
    assert not any(hasattr(m, "s2attn_shift") for m in model.modules())


# ------------------------------------------------------------------ the 8-bit optimizer: whole steps only

def optimizer_setup(large: bool = True):
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 80)), nn.Parameter(torch.randn(10)), nn.Parameter(torch.randn(80, 64))]
    opt = AdamW8bit(params, lr=1e-2, min_8bit_size=4096 if large else 10**9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # a first good step: states exist
    for p in params:
        p.grad = torch.randn_like(p)
    return params, opt


def optimizer_snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()} for p in params])


def assert_optimizer_unchanged(params, opt, before):
    values, states = before
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    for p, state in zip(params, states):
        now = opt.state[p]
        assert now.keys() == state.keys()
        for k, v in state.items():
            assert torch.equal(now[k], v) if torch.is_tensor(v) else now[k] == v, k


def set_value(index: int, value: float):
    def edit(params):
        params[index].grad.view(-1)[7] = value
    return edit


OPTIMIZER_CASES = [
    ("NaN in the last gradient", set_value(2, NAN), r"param_groups\[0\]\['params'\]\[2\].*NaN or inf"),
    ("inf in the first gradient", set_value(0, INF), r"param_groups\[0\]\['params'\]\[0\].*NaN or inf"),
    ("-inf in the small (32-bit) gradient", set_value(1, -INF), r"param_groups\[0\]\['params'\]\[1\].*NaN or inf"),
]


@pytest.mark.parametrize("large", [True, False], ids=["8-bit states", "32-bit states"])
@pytest.mark.parametrize("label, edit, match", OPTIMIZER_CASES, ids=[c[0] for c in OPTIMIZER_CASES])
def test_adamw8bit_refuses_a_non_finite_gradient_before_any_update(label, edit, match, large):
    params, opt = optimizer_setup(large)
    edit(params)
    before = optimizer_snapshot(params, opt)
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert_optimizer_unchanged(params, opt, before)
    for p in params:  # the caller skips the batch: the next good step works and counts as step 2
        p.grad = torch.randn_like(p)
    opt.step()
    assert [opt.state[p]["step"] for p in params] == [2, 2, 2]


ADAMW_ARG_CASES = [
    (dict(lr=-1.0), r"lr must be"), (dict(lr="1e-3"), r"lr must be"),
    (dict(betas=(1.0, 0.999)), r"betas must be"), (dict(betas=0.9), r"betas must be"),
    (dict(eps=-1e-8), r"eps must be"), (dict(weight_decay=-0.1), r"weight_decay must be"),
    (dict(blocksize=100), r"blocksize=100"), (dict(min_8bit_size=0), r"min_8bit_size must be"),
]


@pytest.mark.parametrize("kwargs, match", ADAMW_ARG_CASES)
def test_adamw8bit_refuses_bad_arguments(kwargs, match):
    p = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match=match):
        AdamW8bit([p], **kwargs)
    assert torch.equal(p, torch.ones(3))


# ------------------------------------------------------------------ the memory estimate

def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100)


MEMORY_CASES = [
    (dict(model="llama"), r"model must be a transformers config"),
    (dict(model=None), r"model must be a transformers config"),
    (dict(model=[1, 2]), r"model must be a transformers config"),
    (dict(model={"hidden_size": 64}), r"model as a dict must be a transformers config's dict"),
    (dict(model={"model_type": "no-such-model"}), r"not a config transformers knows"),
    (dict(model=1.5, method="full"), r"model as a parameter count must be a whole number"),
    (dict(model=INF, method="full"), r"model as a parameter count must be a whole number"),
    (dict(model=True, method="full"), r"model must be"),
    (dict(model=0, method="full"), r"model \(a parameter count\) must be"),
    (dict(model=1000), r"method='lora' needs the model's layers"),
    (dict(method="adapter"), r"method='adapter' is unknown"),
    (dict(optimizer="adam"), r"optimizer='adam' is unknown"),
    (dict(r=0), r"\br must be"),
    (dict(batch=0), r"batch must be"),
    (dict(seq_len=2.5), r"seq_len must be"),
    (dict(gradient_checkpointing="false"), r"gradient_checkpointing must be True or False"),
    (dict(master_weights=1), r"master_weights must be True or False"),
    (dict(double_quant="yes"), r"double_quant must be True or False"),
    (dict(dtype=torch.int8), r"dtype=torch.int8"),
    (dict(adapter_dtype="float32"), r"adapter_dtype='float32'"),
    (dict(method="qlora", blocksize=100), r"blocksize=100"),
]


@pytest.mark.parametrize("kwargs, match", MEMORY_CASES)
def test_estimate_training_memory_refuses_bad_arguments(kwargs, match):
    kwargs = {"model": tiny_config(), **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate_training_memory(**kwargs)


@pytest.mark.parametrize("model", [7e9, np.int64(1000), np.float64(2e3), 1000])
def test_estimate_training_memory_takes_a_count_as_any_whole_number(model):
    estimate = estimate_training_memory(model, method="full", dtype=torch.float32)
    assert estimate.total_params == int(model) and estimate.weights == 4 * int(model)


def test_estimate_training_memory_takes_a_plain_module_and_a_config_dict():
    plain = estimate_training_memory(Net(), method="lora", r=2)
    assert plain.activations == 0 and "no transformers config" in plain.notes[0]
    assert plain.trainable_params == 2 * (64 + 16) + 2 * (16 + 16) + 2 * (16 + 2)
    config = tiny_config()
    as_dict = estimate_training_memory(config.to_dict())
    assert as_dict.as_dict() == estimate_training_memory(config).as_dict()


def test_lora_linear_refuses_bad_arguments_before_touching_the_layer():
    base = nn.Linear(8, 4)
    for kwargs, match in [(dict(alpha=INF), "alpha"), (dict(use_rslora="no"), "use_rslora"),
                          (dict(r=np.float64(2)), r"\br must be"), (dict(init="pissa", r=8), "init='pissa'")]:
        expect_refusal(lambda: LoRALinear(base, **kwargs), match, base)
    assert base.weight.requires_grad


def embedding_last(model: nn.Module) -> nn.Module:
    model.last = nn.Embedding(16, 2)
    return model


EVERY_ADD = {
    "add_lora": lambda m, t: add_lora(m, t, r=2),
    "add_pissa": lambda m, t: add_pissa(m, t, r=2),
    "add_dora": lambda m, t: add_dora(m, t, r=2),
    "add_adalora": lambda m, t: add_adalora(m, t, init_r=2),
    "add_qlora": lambda m, t: add_qlora(m, t, r=2),
    "add_vera": lambda m, t: add_vera(m, t, r=2),
    "add_int8": lambda m, t: add_int8(m, t),
    "add_lora_ga": lambda m, t: add_lora_ga(m, {n: torch.randn(m.get_submodule(n).weight.shape) for n in t
                                                if n != "last"}, t, r=1),
}


@pytest.mark.parametrize("name", list(EVERY_ADD))
def test_every_add_function_refuses_a_last_target_it_cannot_wrap_and_a_retry_works(name):
    """The last target is an nn.Embedding: refused by name before any layer is built."""
    model = embedding_last(Net())
    expect_refusal(lambda: EVERY_ADD[name](model, ["fc1", "fc2", "last"]), r"last \(Embedding\)", model)
    EVERY_ADD[name](model, ["fc1", "fc2"])
    assert type(model.fc1) is not nn.Linear and type(model.fc2) is not nn.Linear


INT8_LORA_CASES = [
    (dict(r=0), r"\br must be"),
    (dict(alpha=INF), r"alpha must be a finite"),
    (dict(use_rslora="no"), r"use_rslora must be True or False"),
    (dict(init="olora"), r"init='olora'"),
    (dict(target_modules=["nope"]), r"matched no Int8Linear layer"),
]


@pytest.mark.parametrize("kwargs, match", INT8_LORA_CASES)
def test_add_int8_lora_refuses_bad_arguments_and_changes_nothing(kwargs, match):
    model = add_int8(Net())
    expect_refusal(lambda: add_int8_lora(model, **kwargs), match, model)
    add_int8_lora(model, r=2)
