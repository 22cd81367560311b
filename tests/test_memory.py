"""memory.py: the analytic estimate against measured live bytes, and the tracker itself."""

from __future__ import annotations

import warnings

import pytest
import torch

import lora_course
from lora_course import count_parameters
from lora_course.memory import (
    LiveBytes,
    activation_bytes,
    estimate_training_memory,
    model_on_meta,
    storage_bytes,
    track_peak_memory,
)

CONFIG = dict(vocab_size=2000, hidden_size=128, intermediate_size=344, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**CONFIG, **overrides})


def build(method: str, dtype=torch.float32, targets="all-linear", checkpointing=False, **overrides):
    from transformers import LlamaForCausalLM

    config = llama_config(**overrides)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype).train()
    if method == "lora":
        lora_course.add_lora(model, targets, r=8)
    elif method == "qlora":
        lora_course.add_qlora(model, targets, r=8, compute_dtype=dtype)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    return config, model


def batch_of(config, b, s):
    return torch.randint(0, config.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- tracker


def test_tracker_counts_new_storages_and_frees_them():
    kept = torch.zeros(1000)  # 4,000 bytes alive before the block
    with track_peak_memory(kept) as mem:
        a = torch.ones(250_000)  # 1,000,000 bytes
        view = a.view(500, 500).t()  # a view adds nothing
        del a, view
        b = torch.ones(125_000)  # 500,000 bytes, after the first was freed
    assert mem.baseline == 4000
    assert mem.peak == 4000 + 1_000_000
    assert mem.end == 4000 + 500_000
    assert mem.added_peak == 1_000_000
    del b


def test_tracker_does_not_count_views_of_existing_tensors():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    with track_peak_memory(weight) as mem:
        weight.t()
        weight.detach()
    assert mem.peak == mem.baseline == 64 * 64 * 4


def test_tracker_counts_module_and_optimizer_baseline():
    layer = torch.nn.Linear(32, 16)
    opt = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(2, 32)).sum().backward()
    opt.step()
    with track_peak_memory(layer, opt) as mem:
        pass
    assert mem.baseline == 3 * (32 * 16 + 16) * 4 + 2 * 4  # weights + two moments + 2 step counters


def test_tracker_rejects_unknown_objects():
    with pytest.raises(ValueError, match="tensors, modules and optimizers"):
        with track_peak_memory("model"):
            pass


def test_storage_bytes_counts_shared_storage_once():
    t = torch.zeros(100)
    assert storage_bytes([t, t[:10], t.view(10, 10)]) == 400


# ----------------------------------------------------------------------------- parameters


def test_meta_model_counts_the_7b_config_exactly():
    from transformers import LlamaConfig

    cfg = LlamaConfig()  # transformers' defaults are Llama-2-7B's sizes
    h, i, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    closed_form = 2 * V * h + L * (4 * h * h + 3 * h * i + 2 * h) + h  # untied embeddings
    est = estimate_training_memory(cfg, "full", dtype=torch.bfloat16)
    assert est.total_params == closed_form == sum(p.numel() for p in model_on_meta(cfg).parameters())
    assert est.weights == 2 * closed_form and est.gradients == 2 * closed_form
    assert est.optimizer_states == 8 * closed_form  # AdamW, float32 moments


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]])
def test_counts_equal_the_built_model(method, targets):
    config, model = build(method, targets=targets)
    est = estimate_training_memory(config, method, r=8, target_modules=targets, dtype=torch.float32)
    assert (est.trainable_params, est.total_params) == count_parameters(model)
    assert est.weights == storage_bytes(model.parameters())  # base (or 4-bit codes) + adapters
    if method == "qlora":  # block constants = the quantized layers' buffers
        from lora_course.qlora import qlora_layers

        constants = storage_bytes(b for layer in qlora_layers(model).values() for b in layer.buffers())
        assert est.quant_constants == constants


def test_adamw8bit_states_equal_bitsandbytes():
    import bitsandbytes as bnb

    from lora_course.memory_estimate import optimizer_state_bytes

    params = [torch.nn.Parameter(torch.randn(*s)) for s in [(300, 100), (10,), (64, 64), (128, 257)]]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    opt.step()
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert optimizer_state_bytes("adamw8bit", [p.numel() for p in params], torch.float32, False) == storage_bytes(states)


def test_parameter_count_input():
    est = estimate_training_memory(1_000_000, "full", dtype=torch.float32)
    assert (est.weights, est.gradients, est.optimizer_states, est.activations) == (4e6, 4e6, 8e6, 0)
    assert est.total == 16_000_000 and "activations not estimated" in est.notes[0]
    assert estimate_training_memory(1_000_000, "full", dtype=torch.bfloat16, optimizer="sgd").total == 4_000_000
    mixed = estimate_training_memory(1_000_000, "full", dtype=torch.bfloat16, master_weights=True)
    assert mixed.optimizer_states == 12_000_000  # two float32 moments + float32 master copy


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activations_equal_the_bytes_saved_by_forward(one_thread, method, dtype, checkpointing):
    config, model = build(method, dtype, checkpointing=checkpointing)
    ids = batch_of(config, 2, 48)
    est = estimate_training_memory(config, method, dtype=dtype, batch=2, seq_len=48,
                                   gradient_checkpointing=checkpointing)
    with LiveBytes([*model.parameters(), *model.buffers(), ids]) as mem:
        loss = model(input_ids=ids, labels=ids).loss
        saved = mem.live - mem.baseline
    # left out of the model: the loss and nll's total weight (2 scalars, 16 bytes) and, with
    # checkpointing, torch.utils.checkpoint's small per-layer bookkeeping (< 1 KiB per layer)
    slack = 16 + (1024 * config.num_hidden_layers if checkpointing else 0)
    assert 0 <= saved - est.activations <= slack, (saved, est.activations)
    del loss


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["o_proj", "down_proj"], ["gate_proj"]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_follow_the_targets(one_thread, targets, dtype):
    config, model = build("lora", dtype, targets=targets)
    ids = batch_of(config, 1, 40)
    est = estimate_training_memory(config, "lora", target_modules=targets, dtype=dtype, batch=1, seq_len=40)
    with LiveBytes([*model.parameters(), *model.buffers(), ids]) as mem:
        loss = model(input_ids=ids, labels=ids).loss
        saved = mem.live - mem.baseline
    assert 0 <= saved - est.activations <= 16, (targets, saved, est.activations)
    del loss


@pytest.mark.parametrize("method,b,s,checkpointing", [
    ("full", 1, 32, False),  # the optimizer step is the worst moment
    ("full", 4, 64, False),  # the start of backward is
    ("lora", 4, 64, False),
    ("lora", 2, 64, True),
    ("qlora", 4, 64, False),
])
def test_peak_of_a_training_step(one_thread, method, b, s, checkpointing):
    config, model = build(method, checkpointing=checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = batch_of(config, b, s)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW creates its moments in the first step
    with track_peak_memory(model, opt, ids) as mem:
        step()
    est = estimate_training_memory(config, method, dtype=torch.float32, batch=b, seq_len=s,
                                   gradient_checkpointing=checkpointing)
    static = est.weights + est.quant_constants + est.optimizer_states
    # besides the static parts the baseline holds the batch, AdamW's step counters and RoPE's
    # inverse frequencies (buffers that are not quantization constants)
    others = storage_bytes(model.buffers()) - est.quant_constants
    assert mem.baseline - static == ids.numel() * 8 + 4 * len(opt.state) + others  # float32 counters
    # the peak above the baseline: exact up to a few scalars (loss, counters) and checkpoint bookkeeping
    assert abs(mem.peak - mem.baseline - (est.peak - static)) <= 2048 + (1024 * 3 if checkpointing else 0)


def test_activation_model_needs_a_llama_config():
    from transformers import GPT2Config

    est = estimate_training_memory(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100), "full")
    assert est.activations == 0 and "activations not estimated" in est.notes[0]
    with pytest.raises(ValueError, match="Llama-family config"):
        activation_bytes(GPT2Config(), batch=1, seq_len=8)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="prefix"), "method='prefix' is unknown; allowed values: full, lora, qlora"),
    (dict(optimizer="adam"), "optimizer='adam' is unknown; allowed values: adamw, adamw8bit, sgd"),
    (dict(r=0), "r must be an integer >= 1, got r=0"),
    (dict(batch=-1), "batch must be an integer >= 1, got batch=-1"),
    (dict(seq_len=0), "seq_len must be an integer >= 1"),
    (dict(dtype=torch.int8), "dtype=torch.int8 is not allowed"),
    (dict(blocksize=100), "blocksize=100 is not allowed"),
])
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace("[", r"\[")):
        estimate_training_memory(llama_config(), **kwargs)


def test_bad_parameter_counts():
    with pytest.raises(ValueError, match="needs the model's layers"):
        estimate_training_memory(1000, "lora")
    with pytest.raises(ValueError, match="must be an integer >= 1"):
        estimate_training_memory(-5, "full")


# ----------------------------------------------------------------------------- QLoRA + checkpointing


def test_qlora_with_gradient_checkpointing_gives_the_same_gradients(one_thread):
    grads = []
    for checkpointing in (False, True):
        config, model = build("qlora", checkpointing=checkpointing)
        ids = batch_of(config, 2, 16)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_committed_gpu_records_reads_the_measurement_files(tmp_path):
    import json

    from lora_course.experiments.memory_measured import committed_gpu_records

    assert committed_gpu_records(tmp_path) == []
    (tmp_path / "memory_cuda.json").write_text(json.dumps({"gpu": "X", "rows": []}))
    (tmp_path / "other.json").write_text("{}")
    assert committed_gpu_records(tmp_path) == [{"gpu": "X", "rows": []}]


def test_measure_one_agrees_with_the_estimate(one_thread):
    from lora_course.experiments.memory_measured import measure_one

    config = llama_config(num_hidden_layers=2)
    row = measure_one(config, "qlora", 1, 32, False, torch.float32, 4, ["q_proj", "down_proj"], 1e-4, timed_steps=1)
    assert abs(row["peak_error"]) < 0.001 and row["seconds_per_step"] > 0
    assert row["estimate"]["trainable_params"] == 2 * 4 * ((128 + 128) + (344 + 128))
