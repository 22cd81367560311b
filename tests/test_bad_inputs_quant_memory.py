"""Bad inputs to NF4 quantization (quant/nf4.py) and to the memory estimate and tracker
(memory_estimate.py, memory_measure.py): a ValueError that names the argument, shows the bad
value and says what is allowed, and nothing changed. Valid edge inputs keep their results."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lora_course.memory_estimate import (LAYER_PROJECTIONS, MemoryBreakdown, activation_bytes, adam8bit_state_bytes,
                                         estimate_training_memory, optimizer_state_bytes)
from lora_course.memory_measure import LiveBytes, storage_bytes, track_peak_memory
from lora_course.quant.nf4 import NF4Weight, decode_workers, dequantize_nf4, empty_output, quantize_nf4

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
W = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
Q = quantize_nf4(W)  # 128 values: 2 blocks of 64
QD = quantize_nf4(W, 64, True)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where CUDA is missing")


# ------------------------------------------------------------------ quantize_nf4


@pytest.mark.parametrize("value", ["no", "yes", None, 1, 0, [True], NAN])
def test_quantize_nf4_double_quant_must_be_a_bool(value):
    with pytest.raises(ValueError, match=r"double_quant must be True or False, got double_quant="):
        quantize_nf4(W, 64, value)


def test_quantize_nf4_refuses_a_meta_tensor():
    with pytest.raises(ValueError, match=r"\bw is on the meta device"):
        quantize_nf4(torch.empty(4, 4, device="meta"))


# ------------------------------------------------------------------ dequantize_nf4

ABSMAX_CASES = [
    (None, r"absmax must be a floating-point tensor of ceil\(128/64\) = 2 block scales, got NoneType"),
    ([1.0, 2.0], r"absmax must be a floating-point tensor"),
    (torch.tensor([200, 100], dtype=torch.uint8), r"absmax has dtype torch.uint8; it must be a floating-point"),
    (torch.tensor([2, 3]), r"absmax has dtype torch.int64"),
    (torch.tensor([True, True]), r"absmax has dtype torch.bool"),
    (Q.absmax.to(torch.complex64), r"absmax has dtype torch.complex64"),
    (torch.tensor([NAN, 1.0]), r"absmax contains NaN or inf"),
    (torch.tensor([INF, 1.0]), r"absmax contains NaN or inf"),
    (torch.tensor([1.0, -INF], dtype=torch.bfloat16), r"absmax contains NaN or inf"),
    (torch.empty(2, device="meta"), r"absmax is on meta but packed is on cpu"),
    (Q.absmax[:1], r"absmax must have ceil\(128/64\) = 2 elements, got 1"),
]


@pytest.mark.parametrize("absmax, match", ABSMAX_CASES)
def test_dequantize_nf4_checks_absmax(absmax, match):
    with pytest.raises(ValueError, match=match):
        dequantize_nf4(Q.packed, absmax, (8, 16))


@pytest.mark.parametrize("shape", [None, 128, (8.0, 16.0), "ab", (True, 128), (-8, -16), (-1, 16), (8, 16, 0),
                                   (0,), [8, None]])
def test_dequantize_nf4_checks_shape(shape):
    with pytest.raises(ValueError, match=r"^shape must be a tuple of integers >= 1 .* got shape="):
        dequantize_nf4(Q.packed, Q.absmax, shape)


@pytest.mark.parametrize("dtype", ["float32", None, torch.float64, torch.int32, float, [torch.float32]])
def test_dequantize_nf4_checks_dtype_with_its_repr(dtype):
    match = rf"^dtype={repr(dtype).replace('[', '.').replace(']', '.')} is not allowed; allowed values: torch.float32"
    with pytest.raises(ValueError, match=match):
        dequantize_nf4(Q.packed, Q.absmax, (8, 16), 64, dtype)


def test_dequantize_nf4_refuses_meta_packed():
    with pytest.raises(ValueError, match=r"packed is on the meta device"):
        dequantize_nf4(torch.empty(64, dtype=torch.uint8, device="meta"), Q.absmax, (8, 16))


@pytest.mark.parametrize("shape", [(8, 16), [8, 16], torch.Size([8, 16]), (np.int64(8), np.int64(16)), (128,)])
def test_dequantize_nf4_takes_any_sequence_of_integers_as_shape(shape):
    out = dequantize_nf4(Q.packed, Q.absmax, shape)
    assert out.shape == tuple(int(d) for d in shape) and torch.equal(out.reshape(-1), Q.dequantize().reshape(-1))


def test_dequantize_nf4_valid_edges():
    one = quantize_nf4(torch.tensor(2.5))  # a 0-d tensor: shape ()
    assert dequantize_nf4(one.packed, one.absmax, ()).shape == ()
    # a negative scale is allowed: double quantization can bring an all-zero block's absmax below 0
    assert torch.equal(dequantize_nf4(Q.packed, -Q.absmax, (8, 16)), -Q.dequantize())
    half = dequantize_nf4(Q.packed, Q.absmax.half(), (8, 16))  # float16 scales are read as float32
    assert torch.equal(half, dequantize_nf4(Q.packed, Q.absmax.half().float(), (8, 16)))


# ------------------------------------------------------------------ decode_workers, empty_output


@pytest.mark.parametrize("numel", [-5, 0, 1.5, NAN, INF, "10", None, True, [10]])
def test_decode_workers_checks_numel(numel):
    with pytest.raises(ValueError, match=r"^numel must be an integer >= 1, got numel="):
        decode_workers(numel)


@pytest.mark.parametrize("device", ["gpu", "", "CPU", None, 5, ["cpu"]])
def test_decode_workers_checks_device(device):
    with pytest.raises(ValueError, match=r"^device must be a torch.device or a device string"):
        decode_workers(1000, device)


def test_decode_workers_valid_devices():
    assert decode_workers(1000, "meta") == 1 and decode_workers(1000, torch.device("cpu")) == 1


@pytest.mark.parametrize("numel", [-1, 1.5, "4", None, True, NAN, [4]])
def test_empty_output_checks_numel(numel):
    with pytest.raises(ValueError, match=r"^numel must be an integer >= 0, got numel="):
        empty_output(numel, torch.float32)


@pytest.mark.parametrize("dtype", ["float32", None, float, 4, np.float32])
def test_empty_output_checks_dtype(dtype):
    with pytest.raises(ValueError, match=r"^dtype must be a torch.dtype"):
        empty_output(4, dtype)


@pytest.mark.parametrize("device", ["gpu", "", None, 5])
def test_empty_output_checks_device(device):
    with pytest.raises(ValueError, match=r"^device must be a torch.device"):
        empty_output(4, torch.float32, device)


@NO_CUDA
def test_empty_output_refuses_cuda_without_cuda():
    with pytest.raises(ValueError, match=r"device='cuda' needs CUDA"):
        empty_output(4, torch.float32, "cuda")


def test_empty_output_valid_edges():
    assert empty_output(0, torch.float32).shape == (0,)
    assert empty_output(2**24, torch.float32, "meta").shape == (2**24,)


# ------------------------------------------------------------------ NF4Weight


def nf4(**fields):
    base = dict(packed=Q.packed, absmax=Q.absmax, shape=Q.shape, dtype=Q.dtype, blocksize=64)
    return NF4Weight(**{**base, **fields})


def dq_fields(**fields):
    base = dict(absmax=None, qabsmax=QD.qabsmax, absmax2=QD.absmax2, offset=QD.offset)
    return {**base, **fields}


NF4WEIGHT_CASES = [
    (dict(shape=(0,)), r"^shape must be a tuple of integers >= 1"),
    (dict(shape=None), r"^shape must be a tuple of integers >= 1"),
    (dict(shape=(8, -16)), r"^shape must be a tuple of integers >= 1"),
    (dict(dtype="float32"), r"^dtype='float32' is not allowed"),
    (dict(dtype=torch.int32), r"^dtype=torch.int32 is not allowed"),
    (dict(blocksize=3), r"^blocksize=3 is not allowed"),
    (dict(packed=None), r"^packed must be a uint8 tensor"),
    (dict(packed=[1, 2]), r"^packed must be a uint8 tensor"),
    (dict(packed=Q.packed.long()), r"^packed must be a uint8 tensor"),
    (dict(absmax=None), r"absmax is None, so .* missing \(None\): qabsmax, absmax2, offset"),
    (dict(absmax=torch.tensor([1, 2])), r"^absmax must be a floating-point"),
    (dict(absmax=torch.empty(2, device="meta")), r"^absmax is on meta but packed is on cpu"),
    (dict(qabsmax=QD.qabsmax), r"absmax and qabsmax are both given"),
    (dq_fields(absmax2=None, offset=None), r"missing \(None\): absmax2, offset"),
    (dq_fields(offset=None), r"missing \(None\): offset"),
    (dq_fields(qabsmax=QD.qabsmax.float()), r"^qabsmax must be a uint8 tensor"),
    (dq_fields(qabsmax=torch.tensor([300, 5])), r"^qabsmax must be a uint8 tensor"),
    (dq_fields(qabsmax=torch.zeros(3, dtype=torch.uint8)), r"^qabsmax must have 2 elements"),
    (dq_fields(absmax2=torch.ones(0)), r"^absmax2 must have 1 elements"),
    (dq_fields(absmax2=torch.ones(1, dtype=torch.int32)), r"^absmax2 must be a floating-point"),
    (dq_fields(offset=torch.zeros(2)), r"^offset must have 1 elements"),
]


@pytest.mark.parametrize("fields, match", NF4WEIGHT_CASES)
def test_nf4weight_checks_its_fields_at_construction(fields, match):
    with pytest.raises(ValueError, match=match):
        nf4(**fields)


@pytest.mark.parametrize("field", ["absmax2", "offset"])
def test_nf4weight_dequantize_names_a_non_finite_double_quant_field(field):
    bad = nf4(**dq_fields(**{field: torch.full_like(getattr(QD, field), NAN)}))
    with pytest.raises(ValueError, match=rf"^{field} contains NaN or inf"):
        bad.dequantize()


def test_nf4weight_valid_results_are_unchanged():
    assert nf4(shape=(16, 8)).dequantize().shape == (16, 8)  # same count, other shape
    assert nf4(shape=[8, 16]).shape == torch.Size([8, 16])
    assert Q.bits_per_param == 4.5 and QD.double_quant and QD.absmax is None
    assert torch.equal(nf4(**dq_fields()).dequantize(), QD.dequantize())


# ------------------------------------------------------------------ activation_bytes


def llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=100), **overrides})


ACTIVATION_CASES = [
    (dict(batch=0), r"^batch must be an integer >= 1, got batch=0"),
    (dict(batch=-1), r"^batch must be"),
    (dict(batch=1.5), r"^batch must be"),
    (dict(batch=None), r"^batch must be"),
    (dict(batch=True), r"^batch must be"),
    (dict(seq_len=0), r"^seq_len must be"),
    (dict(seq_len=2.5), r"^seq_len must be"),
    (dict(dtype="float32"), r"^dtype='float32' is not allowed"),
    (dict(dtype=None), r"^dtype=None is not allowed"),
    (dict(dtype=torch.int64), r"^dtype=torch.int64 is not allowed"),
    (dict(adapter_dtype=torch.int8), r"^adapter_dtype=torch.int8 is not allowed"),
    (dict(trained="q_proj", lora_r=8), r"^trained must be None \(full fine-tuning\) or a collection"),
    (dict(trained=5, lora_r=8), r"^trained must be None"),
    (dict(trained=["bogus"], lora_r=8), r"^trained=\['bogus'\] names .* allowed values: q_proj"),
    (dict(trained=[5], lora_r=8), r"^trained=\[5\] names"),
    (dict(trained=["q_proj"]), r"^lora_r must be an integer >= 1 \(the LoRA rank\) when trained is given"),
    (dict(trained=["q_proj"], lora_r=0), r"^lora_r must be"),
    (dict(trained=["q_proj"], lora_r=-4), r"^lora_r must be"),
    (dict(trained=["q_proj"], lora_r=2.5), r"^lora_r must be"),
    (dict(trained=["q_proj"], lora_r="8"), r"^lora_r must be"),
    (dict(gradient_checkpointing="no"), r"^gradient_checkpointing must be True or False"),
    (dict(gradient_checkpointing=None), r"^gradient_checkpointing must be True or False"),
    (dict(dequantize_bytes=-1), r"^dequantize_bytes must be an integer >= 0"),
    (dict(dequantize_bytes=1.5), r"^dequantize_bytes must be"),
    (dict(dequantize_bytes=NAN), r"^dequantize_bytes must be"),
]


@pytest.mark.parametrize("kwargs, match", ACTIVATION_CASES)
def test_activation_bytes_checks_its_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        activation_bytes(llama_config(), **{"batch": 1, "seq_len": 8, **kwargs})


def test_activation_bytes_checks_the_config():
    with pytest.raises(ValueError, match=r"gradient_checkpointing needs config.num_hidden_layers >= 1"):
        activation_bytes(llama_config(num_hidden_layers=0), 1, 8, gradient_checkpointing=True)
    assert activation_bytes(llama_config(num_hidden_layers=0), 1, 8)[0] > 0  # no layers, no checkpointing: fine
    for config in (None, llama_config().to_dict()):
        with pytest.raises(ValueError, match=r"Llama-family config .* config is"):
            activation_bytes(config, 1, 8)
    broken = llama_config()
    broken.intermediate_size = -128
    with pytest.raises(ValueError, match=r"^config.intermediate_size must be an integer >= 1"):
        activation_bytes(broken, 1, 8)


def test_activation_bytes_valid_trained_collections_agree():
    cfg = llama_config()
    want = activation_bytes(cfg, 2, 8, trained=["q_proj", "v_proj"], lora_r=4)
    assert activation_bytes(cfg, 2, 8, trained=("v_proj", "q_proj"), lora_r=np.int64(4)) == want
    assert activation_bytes(cfg, 2, 8, trained=iter({"q_proj", "v_proj"}), lora_r=4) == want
    assert activation_bytes(cfg, 2, 8, trained=LAYER_PROJECTIONS, lora_r=4)[0] > want[0]


# ------------------------------------------------------------------ optimizer states


@pytest.mark.parametrize("numels, match", [
    ([-5], r"^numels\[0\] must be an integer >= 0, got numels\[0\]=-5"),
    ([1.5], r"^numels\[0\] must be"),
    ([NAN], r"^numels\[0\] must be"),
    ([True], r"^numels\[0\] must be"),
    (["a"], r"^numels\[0\] must be"),
    ([10_000, -10_000], r"^numels\[1\] must be"),
    (None, r"^numels must be an iterable of element counts"),
    (5, r"^numels must be an iterable"),
    ("12", r"^numels must be an iterable"),
])
def test_state_bytes_check_numels(numels, match):
    with pytest.raises(ValueError, match=match):
        adam8bit_state_bytes(numels)
    with pytest.raises(ValueError, match=match):
        optimizer_state_bytes("adamw", numels, torch.float32, False)


@pytest.mark.parametrize("args, match", [
    (("bogus", [100], torch.float32, False), r"^optimizer='bogus' is unknown; allowed values: adamw, adamw8bit, sgd"),
    (("ADAMW", [100], torch.float32, False), r"^optimizer='ADAMW' is unknown"),
    ((None, [100], torch.float32, False), r"^optimizer=None is unknown"),
    (("adamw", [100], None, False), r"^state_dtype=None is not allowed"),
    (("adamw", [100], torch.int8, False), r"^state_dtype=torch.int8 is not allowed"),
    (("adamw", [100], "float32", False), r"^state_dtype='float32' is not allowed"),
    (("sgd", [100], torch.float32, "no"), r"^master must be True or False"),
])
def test_optimizer_state_bytes_checks_its_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        optimizer_state_bytes(*args)


def test_state_bytes_take_any_iterable_of_counts():
    counts = [300 * 100, 10, 64 * 64, 128 * 257]
    assert adam8bit_state_bytes(iter(counts)) == adam8bit_state_bytes(counts) == adam8bit_state_bytes(np.array(counts))
    assert optimizer_state_bytes("adamw8bit", iter(counts), torch.float32, False) == adam8bit_state_bytes(counts)
    assert optimizer_state_bytes("adamw", [100, 0], torch.bfloat16, True) == 2 * 100 * 2 + 4 * 100


# ------------------------------------------------------------------ estimate_training_memory


@pytest.mark.parametrize("model, match", [
    ({"model_type": "llama", "hidden_size": "a"}, r"^model=\{'model_type': 'llama', \.\.\.\} has fields transformers refuses"),
    ({"model_type": "llama", "hidden_size": 66, "num_attention_heads": 4}, r"^model=\{'model_type': 'llama'.*refuses"),
    ({"model_type": "llama", "hidden_size": -64, "num_hidden_layers": 1, "vocab_size": 10},
     r"^model.hidden_size must be an integer >= 1, got model.hidden_size=-64"),
    ({"model_type": "llama", "vocab_size": 0}, r"^model.vocab_size must be an integer >= 1"),
    (nn.Identity(), r"^model has no parameters"),
])
def test_estimate_training_memory_checks_the_config(model, match):
    with pytest.raises(ValueError, match=match):
        estimate_training_memory(model, method="full")


@pytest.mark.parametrize("as_dict", [False, True])
def test_estimate_training_memory_gives_no_llama_activations_to_other_models(as_dict):
    from transformers import BertConfig

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    est = estimate_training_memory(config.to_dict() if as_dict else config, method="full")
    assert est.activations == 0 and est.backward_workspace == 0 and est.weights > 0
    assert est.notes and "activations not estimated" in est.notes[0] and "model_type 'bert'" in est.notes[0]


@pytest.mark.parametrize("name", ["MistralConfig", "Qwen2Config"])
def test_estimate_training_memory_keeps_activations_for_llama_relatives(name):
    import transformers

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)
    est = estimate_training_memory(getattr(transformers, name)(**sizes), method="lora", batch=1, seq_len=8)
    assert est.activations > 0 and est.notes == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="bogus"), r"^method='bogus' is unknown"),
    (dict(weights="1"), r"^weights must be an integer >= 0, got weights='1'"),
    (dict(weights=-1), r"^weights must be an integer >= 0"),
    (dict(activations=NAN), r"^activations must be an integer >= 0"),
    (dict(total_params=1.5), r"^total_params must be"),
    (dict(notes="x"), r"^notes must be a list of str"),
])
def test_memory_breakdown_checks_its_fields(kwargs, match):
    fields = dict(method="lora", weights=1, quant_constants=0, gradients=1, optimizer_states=1, activations=1)
    with pytest.raises(ValueError, match=match):
        MemoryBreakdown(**{**fields, **kwargs})


# ------------------------------------------------------------------ memory_measure


def sparse():
    return torch.randn(4).to_sparse()


@pytest.mark.parametrize("tensors, match", [
    (None, r"^tensors must be an iterable of tensors"),
    (5, r"^tensors must be an iterable of tensors"),
    ("ab", r"^tensors must be an iterable of tensors"),
    (nn.Linear(2, 2), r"^tensors must be an iterable .* pass \[\*module.parameters\(\)"),
    ([1, 2], r"^tensors must hold only tensors; item 0 is int"),
    ([torch.ones(2), None], r"^tensors must hold only tensors; item 1 is NoneType"),
    ([sparse()], r"^tensors: item 0 is a torch.sparse_coo tensor; sparse tensors are not supported"),
])
def test_storage_bytes_checks_tensors(tensors, match):
    with pytest.raises(ValueError, match=match):
        storage_bytes(tensors)


@pytest.mark.parametrize("alive, match", [
    (None, r"^alive must be an iterable of tensors"),
    (5, r"^alive must be an iterable of tensors"),
    (nn.Linear(2, 2), r"^alive must be an iterable"),
    ([1], r"^alive must hold only tensors"),
    ([sparse()], r"^alive: item 0 is a torch.sparse_coo tensor; sparse tensors are not supported"),
])
def test_live_bytes_checks_alive(alive, match):
    with pytest.raises(ValueError, match=match):
        LiveBytes(alive)


def test_storage_bytes_valid_inputs():
    t = torch.zeros(3, 4)
    assert storage_bytes(t) == storage_bytes([t]) == storage_bytes(iter([t, t[0]])) == 48
    assert storage_bytes(torch.tensor(1.0)) == 4 and storage_bytes([]) == 0
    assert LiveBytes(torch.tensor(1.0)).baseline == 4 and LiveBytes().baseline == 0


@pytest.mark.parametrize("device", ["gpu", "", "CPU", "meta", 5, ["cpu"], torch.device("meta")])
def test_track_peak_memory_checks_device(device):
    with pytest.raises(ValueError, match=r"^device=.* is not supported; allowed: None"):
        with track_peak_memory(device=device):
            pass


@NO_CUDA
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_track_peak_memory_refuses_cuda_without_cuda(device):
    with pytest.raises(ValueError, match=rf"^device='{device}' needs CUDA, which is not available"):
        with track_peak_memory(torch.ones(2), device=device):
            pass


@pytest.mark.parametrize("alive, match", [
    ((None,), r"^alive: .*tensors, modules and optimizers; alive\[0\] is 'NoneType'"),
    (([torch.ones(2)],), r"^alive: .*alive\[0\] is 'list'"),
    ((nn.Linear(2, 2), {"x": 1}), r"^alive: .*alive\[1\] is 'dict'"),
    ((sparse(),), r"^alive holds a torch.sparse_coo tensor; sparse tensors are not supported"),
    ((torch.empty(3, device="meta"),), r"^alive holds tensors on 'meta'"),
])
def test_track_peak_memory_checks_alive(alive, match):
    with pytest.raises(ValueError, match=match):
        with track_peak_memory(*alive):
            pass


def test_track_peak_memory_valid_devices():
    kept = torch.zeros(10)
    for device in (None, "cpu", torch.device("cpu")):
        with track_peak_memory(kept, device=device) as mem:
            x = torch.ones(100)
        assert (mem.device, mem.baseline, mem.peak) == ("cpu", 40, 440)
        del x
    assert math.isclose(mem.added_peak, 400)
