"""AdamW8bit (optim8bit.py) against bitsandbytes 0.50's CPU AdamW8bit / PagedAdamW8bit.

Measured on bitsandbytes 0.50.2 / torch 2.13: after 10 steps, parameters, uint8 codes and absmax
values are bit-equal (``torch.equal``, max difference 0.0) for float32 parameters, for tensors
above and below ``min_8bit_size``, and for bfloat16 / float16 parameters.
"""

import logging
import warnings

import pytest
import torch

from lora_course.memory_estimate import adam8bit_state_bytes
from lora_course.optim8bit import (
    AdamW8bit,
    dequantize_blockwise_unsigned,
    quantize_blockwise_unsigned,
)
from lora_course.quant import dynamic_map

bnb = pytest.importorskip("bitsandbytes")
BF = pytest.importorskip("bitsandbytes.functional")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

SHAPES = [(64, 300), (1000,), (37, 129), (4096,), (5000, 3)]  # 8-bit, 32-bit (< 4096), odd sizes


def _grads(seed, shapes, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes from 1e-4 to 10 so blocks, tiny values and the map's small codes all occur
    return [(torch.randn(s, generator=gen) * 10.0 ** torch.randint(-4, 2, (1,), generator=gen).item()).to(dtype)
            for s in shapes]


def _run(make_ref, steps=10, dtype=torch.float32, shapes=SHAPES, **kw):
    torch.manual_seed(0)
    init = [torch.randn(s).to(dtype) for s in shapes]
    ours = [p.clone().requires_grad_(True) for p in init]
    theirs = [p.clone().requires_grad_(True) for p in init]
    oa, ob = AdamW8bit(ours, **kw), make_ref(theirs, **kw)
    for step in range(steps):
        for a, b, g in zip(ours, theirs, _grads(step, shapes, dtype)):
            a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    return ours, theirs, oa, ob


def _assert_equal(ours, theirs, oa, ob):
    for a, b in zip(ours, theirs):
        sa, sb = oa.state[a], ob.state[b]
        assert torch.equal(a, b), f"param {tuple(a.shape)}: max diff {(a - b).abs().max().item()}"
        assert sa["step"] == sb["step"]
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert (key in sa) == (key in sb)
            if key in sa:
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kw", [dict(), dict(lr=1e-2, weight_decay=0.0), dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6,
                                                                             weight_decay=0.1)])
def test_adamw8bit_equals_bnb_after_10_steps(kw):
    ours, theirs, oa, ob = _run(bnb.optim.AdamW8bit, **kw)
    _assert_equal(ours, theirs, oa, ob)
    assert oa.state[ours[0]]["state1"].dtype == torch.uint8  # 19,200 values: 8-bit
    assert oa.state[ours[1]]["state1"].dtype == torch.float32  # 1,000 values: kept in float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adamw8bit_low_precision_params(dtype):
    ours, theirs, oa, ob = _run(bnb.optim.AdamW8bit, steps=5, dtype=dtype, lr=1e-2)
    _assert_equal(ours, theirs, oa, ob)
    assert all(p.dtype == dtype for p in ours)


def test_min_8bit_size_and_param_groups():
    torch.manual_seed(0)
    shapes = [(300,), (50, 20)]
    ours, theirs, oa, ob = _run(bnb.optim.AdamW8bit, steps=4, shapes=shapes, min_8bit_size=256)
    _assert_equal(ours, theirs, oa, ob)
    assert all(oa.state[p]["state1"].dtype == torch.uint8 for p in ours)
    # groups with their own lr, and a parameter without a gradient (skipped, no state)
    w, u, idle = (torch.randn(80, 80, requires_grad=True) for _ in range(3))
    w2, u2 = w.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    oa = AdamW8bit([{"params": [w]}, {"params": [u, idle], "lr": 1e-2}], lr=1e-3)
    ob = bnb.optim.AdamW8bit([{"params": [w2]}, {"params": [u2], "lr": 1e-2}], lr=1e-3)
    for s in range(3):
        g1, g2 = _grads(10 + s, [(80, 80), (80, 80)])
        w.grad, u.grad, w2.grad, u2.grad = g1, g2, g1.clone(), g2.clone()
        oa.step()
        ob.step()
    assert torch.equal(w, w2) and torch.equal(u, u2) and len(oa.state[idle]) == 0


def test_paged_adamw8bit_on_cpu_is_the_same_computation():
    # bitsandbytes warns and falls back to ordinary buffers on CPU: paging needs CUDA unified memory
    def paged(params, **kw):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bnb.optim.PagedAdamW8bit(params, **kw)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, theirs, oa, ob = _run(paged, steps=5)
    _assert_equal(ours, theirs, oa, ob)


def test_state_bytes_match_memory_estimate():
    ours, _, oa, _ = _run(bnb.optim.AdamW8bit, steps=1)
    assert oa.state_bytes() == adam8bit_state_bytes(p.numel() for p in ours)
    n8 = sum(p.numel() for p in ours if p.numel() >= 4096)
    assert oa.state_bytes() < 2 * 4 * n8 * 0.3  # about a quarter of float32 moments


def test_unsigned_map_quantizer_equals_bnb():
    torch.manual_seed(0)
    x = torch.rand(10_000) ** 4 * 3  # non-negative, many small values (like v)
    x[300:556] = 0  # an all-zero block
    code = BF.create_dynamic_map(signed=False)
    assert torch.equal(code.sort().values, dynamic_map(False))
    q, a = quantize_blockwise_unsigned(x)
    rq, rstate = BF.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(q, rq) and torch.equal(a, rstate.absmax)
    assert torch.equal(dequantize_blockwise_unsigned(q, a), BF.dequantize_blockwise(rq, rstate))


@pytest.mark.parametrize("kw, arg", [
    (dict(lr=-1e-3), "lr"), (dict(betas=(0.9, 1.0)), "betas"), (dict(betas=(-0.1, 0.9)), "betas"),
    (dict(betas=(0.9,)), "betas"), (dict(eps=-1.0), "eps"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(blocksize=100), "blocksize"), (dict(min_8bit_size=0), "min_8bit_size"),
])
def test_errors_name_the_argument(kw, arg):
    with pytest.raises(ValueError, match=arg):
        AdamW8bit([torch.zeros(3, requires_grad=True)], **kw)


def test_non_contiguous_parameter():
    base = torch.randn(100, 80)
    a = torch.nn.Parameter(base.t())  # (80, 100) transposed view, not contiguous
    b = torch.nn.Parameter(base.t().clone())
    oa, ob = AdamW8bit([a]), bnb.optim.AdamW8bit([b])
    for s in range(3):
        (g,) = _grads(20 + s, [(80, 100)])
        a.grad, b.grad = g.clone(), g.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b) and torch.equal(oa.state[a]["state1"], ob.state[b]["state1"])


def test_experiment_run_ours_equals_bnb():
    from lora_course.experiments.adamw8bit_lora import run

    ours, theirs = run(0, "adamw8bit", steps=5), run(0, "bnb_adamw8bit", steps=5)
    assert ours == theirs and len(ours["losses"]) == 5
    with pytest.raises(ValueError, match="optimizer"):
        run(0, "sgd", steps=1)
