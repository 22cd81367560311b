"""NF4 quantization (lora_course.quant.nf4) against real bitsandbytes, bit for bit (torch.equal).

bitsandbytes 0.50's CPU ``dequantize_4bit`` has one quirk we do not copy: on AVX-512 machines,
for a tensor with >= 2 dimensions whose last dimension is a multiple of 16 but not of the
blocksize, its kernel restarts the block count at every row (it reads
``absmax[row * (cols // blocksize) + col // blocksize]``), so rows get another block's absmax.
Blocks run over the flattened tensor (that is how ``quantize_4bit`` made them), so there we
compare against bitsandbytes' dequantization of the same bytes with the flat shape, and a test
below shows the quirk. Also, its CPU kernel hands back a 1-D tensor of even length as (1, n);
we return the original shape.
"""

from __future__ import annotations

import pytest
import torch

import bitsandbytes.functional as bnbF
from bitsandbytes.backends.cpu.ops import _has_avx512

from lora_course.quant import NF4_CODE, NF4Weight, dequantize_nf4, nf4_code, quantize_nf4
from lora_course.quant.nf4 import BLOCKSIZES_4BIT

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1,), (7,), (64,), (65,), (127,), (1000,), (3, 96), (5, 33), (17, 64), (2, 3, 50), (33, 77), (128, 256)]


def bnb_quant(w: torch.Tensor, blocksize: int, dq: bool):
    packed, st = bnbF.quantize_4bit(w, blocksize=blocksize, compress_statistics=dq, quant_type="nf4")
    return packed, st


def bnb_dequant(packed: torch.Tensor, st, shape) -> torch.Tensor:
    """bitsandbytes' dequantization, on the flat shape where its 2-D CPU kernel misreads absmax."""
    quirk = _has_avx512 and len(shape) >= 2 and shape[-1] % 16 == 0 and shape[-1] % st.blocksize != 0
    if quirk:
        st = bnbF.QuantState(absmax=st.absmax, shape=torch.Size([st.shape.numel()]), dtype=st.dtype,
                             blocksize=st.blocksize, quant_type="nf4", offset=st.offset, state2=st.state2)
        return bnbF.dequantize_4bit(packed, st).reshape(shape)
    out = bnbF.dequantize_4bit(packed, st)
    if len(shape) == 1 and shape[0] % 2 == 0 and out.shape == (1, shape[0]):
        out = out.reshape(shape)  # its CPU kernel returns 1-D tensors of even length as (1, n)
    return out


def sample(shape, dtype, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 40  # outliers in some blocks
    return w.to(dtype)


def test_code_table_equals_bitsandbytes():
    ref = bnbF.get_4bit_type("nf4", device="cpu")
    assert NF4_CODE.dtype == torch.float32 and NF4_CODE.shape == (16,)
    assert torch.equal(NF4_CODE, ref)
    assert torch.equal(nf4_code(), ref)  # derived from normal quantiles, equal to float32 precision
    assert NF4_CODE[7] == 0 and NF4_CODE[0] == -1 and NF4_CODE[-1] == 1
    assert not torch.equal(nf4_code(0.99), ref)  # the offset matters


@pytest.mark.parametrize("dq", [False, True], ids=["plain", "dq"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [64, 128, 256])
def test_bit_exact_many_shapes(blocksize, dtype, dq):
    for i, shape in enumerate(SHAPES):
        w = sample(shape, dtype, seed=i)
        packed, st = bnb_quant(w, blocksize, dq)
        ours = quantize_nf4(w, blocksize=blocksize, double_quant=dq)
        n = w.numel()
        assert ours.packed.shape == ((n + 1) // 2,) and ours.packed.dtype == torch.uint8
        assert torch.equal(ours.packed, packed.view(-1)), shape
        if dq:
            assert ours.absmax is None
            assert torch.equal(ours.qabsmax, st.absmax), shape
            assert torch.equal(ours.absmax2, st.state2.absmax), shape
            assert torch.equal(ours.offset, st.offset), shape
        else:
            assert torch.equal(ours.absmax, st.absmax), shape
        deq = ours.dequantize()
        assert deq.shape == w.shape and deq.dtype == dtype
        assert torch.equal(deq, bnb_dequant(packed, st, shape)), shape


@pytest.mark.parametrize("blocksize", [b for b in BLOCKSIZES_4BIT if b not in (64, 128, 256)])
def test_bit_exact_other_blocksizes(blocksize):
    for dq in (False, True):
        for shape in [(5000,), (9, 333), (64, 128)]:
            w = sample(shape, torch.float32, seed=blocksize)
            packed, st = bnb_quant(w, blocksize, dq)
            ours = quantize_nf4(w, blocksize=blocksize, double_quant=dq)
            assert torch.equal(ours.packed, packed.view(-1))
            assert torch.equal(ours.qabsmax if dq else ours.absmax, st.absmax)
            assert torch.equal(ours.dequantize(), bnb_dequant(packed, st, shape))


def test_large_double_quant_multiple_absmax2_blocks():
    w = sample((1024, 1100), torch.bfloat16, seed=3)  # 17,600 blocks -> 69 absmax2 blocks, 5 chunks
    packed, st = bnb_quant(w, 64, True)
    ours = quantize_nf4(w, double_quant=True)
    assert ours.absmax2.numel() == 69
    assert torch.equal(ours.qabsmax, st.absmax) and torch.equal(ours.absmax2, st.state2.absmax)
    assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, st))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_several_chunks_with_a_short_last_block(dtype):
    from lora_course.quant.nf4 import DEQUANT_CHUNK

    w = sample((2 * DEQUANT_CHUNK // 1001 + 1, 1001), dtype, seed=4)  # 3 chunks (the last short) and a short block
    for dq in (False, True):
        packed, st = bnb_quant(w, 64, dq)
        ours = quantize_nf4(w, double_quant=dq)
        assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, st))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decoding_threads_give_the_same_bits(threads, dtype):
    """5 chunks and a short block shared out between 1, 2 or 3 threads (uneven runs of chunks):
    every value equal to bitsandbytes', whatever the thread count."""
    from lora_course.quant.nf4 import THREAD_DEQUANT_CHUNK, decode_workers

    w = sample((5 * THREAD_DEQUANT_CHUNK // 512 + 1, 512), dtype, seed=5)  # 5 full chunks + a short one
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert decode_workers(w.numel()) == threads and decode_workers(w.numel(), "meta") == 1
        assert decode_workers(THREAD_DEQUANT_CHUNK) == 1  # one chunk: nothing to share out
        for dq in (False, True):
            packed, st = bnb_quant(w, 64, dq)
            ours = quantize_nf4(w, double_quant=dq)
            assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, st))
    finally:
        torch.set_num_threads(old)


def test_a_dispatch_mode_sees_every_chunk():
    """Modes are per thread: under one, the chunks are decoded in the calling thread, so the mode
    sees every gather (memory trackers and notebook 03's byte counter rely on it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lora_course.quant.nf4 import DEQUANT_CHUNK

    class Gathers(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += func is torch.ops.aten.index_select.out
            return func(*args, **(kwargs or {}))

    q = quantize_nf4(sample((3 * DEQUANT_CHUNK // 256, 256), torch.float32, seed=6))  # 3 chunks
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Gathers() as mode:
            out = q.dequantize()
    finally:
        torch.set_num_threads(old)
    assert mode.calls == 3 and torch.equal(out, q.dequantize())


def test_packing_high_nibble_first_and_odd_padding():
    w = torch.tensor([1.0, -1.0, 0.0])  # codes 15, 0, 7; pad nibble = code of 0.0 = 7
    q = quantize_nf4(w)
    assert q.packed.tolist() == [15 * 16 + 0, 7 * 16 + 7]
    assert torch.equal(q.dequantize(), torch.tensor([1.0, -1.0, 0.0]))


def test_zero_blocks_match_bitsandbytes_convention():
    w = torch.zeros(64 + 10)
    w[:64] = 0  # full all-zero block keeps absmax 0; short all-zero block gets 1e-38
    packed, st = bnb_quant(w, 64, False)
    ours = quantize_nf4(w)
    assert torch.equal(ours.absmax, st.absmax) and ours.absmax[0] == 0 and ours.absmax[1] > 0
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.dequantize(), w)


def test_bitsandbytes_2d_dequant_quirk_is_real():
    w = sample((3, 96), torch.float32)
    packed, st = bnb_quant(w, 64, False)
    ours = quantize_nf4(w).dequantize()
    native = bnbF.dequantize_4bit(packed, st)
    flat = bnb_dequant(packed, st, (3, 96))
    assert torch.equal(ours, flat)
    if _has_avx512:  # the row-restarting kernel gives row 1 the wrong absmax
        assert not torch.equal(native, flat)


def test_nbytes_and_bits_per_param():
    w = torch.randn(4096, 4096)
    plain, dq = quantize_nf4(w), quantize_nf4(w, double_quant=True)
    n = w.numel()
    assert plain.nbytes == n // 2 + 4 * (n // 64)
    assert dq.nbytes == n // 2 + (n // 64) + 4 * (n // 64 // 256) + 4
    assert round(plain.bits_per_param - 4, 3) == 0.5
    assert round(dq.bits_per_param - 4, 3) == 0.127
    assert round(plain.bits_per_param - dq.bits_per_param, 3) == 0.373


def test_roundtrip_error_is_bounded():
    w = torch.randn(257, 129)
    q = quantize_nf4(w)
    err = (q.dequantize() - w).abs().view(-1)
    am = q.absmax.repeat_interleave(64)[: w.numel()]
    gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2  # half the widest gap between levels
    assert bool((err <= gap * am + 1e-7).all())


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.empty(0), "w is empty"),
        (torch.arange(10), "w has dtype torch.int64; allowed dtypes: torch.float32"),
        (torch.randn(10, dtype=torch.float64), "w has dtype torch.float64"),
        (torch.tensor([1.0, float("nan")]), "w contains NaN or inf"),
        (torch.tensor([1.0, float("inf")]), "w contains NaN or inf"),
    ],
)
def test_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_nf4(bad)


@pytest.mark.parametrize("bs", [0, 16, 63, 8192, 64.0])
def test_bad_blocksize(bs):
    with pytest.raises(ValueError, match=r"blocksize=.* allowed values: 32, 64, 128, 256, 512, 1024, 2048, 4096"):
        quantize_nf4(torch.randn(100), blocksize=bs)


def test_dequantize_rejects_wrong_packed_length():
    q = quantize_nf4(torch.randn(101))
    with pytest.raises(ValueError, match=r"packed has shape \(50,\); .* it must be \(51,\)"):
        dequantize_nf4(q.packed[:-1], q.absmax, (101,))
    broken = NF4Weight(packed=q.packed[:-1], absmax=q.absmax, shape=q.shape, dtype=q.dtype)
    with pytest.raises(ValueError, match="packed has shape"):
        broken.dequantize()
    with pytest.raises(ValueError, match=r"absmax must have ceil\(101/64\) = 2 elements, got 1"):
        dequantize_nf4(q.packed, q.absmax[:1], (101,))
    assert torch.equal(dequantize_nf4(q.packed[:, None], q.absmax, (101,)), q.dequantize())  # bnb layout


def test_values_at_every_decision_bound():
    """Scaled values exactly at, just below and just above each midpoint between two levels."""
    from lora_course.quant.nf4 import _NF4_BOUNDS

    b = _NF4_BOUNDS
    vals = torch.cat([b, torch.nextafter(b, torch.tensor(2.0)), torch.nextafter(b, torch.tensor(-2.0)),
                      NF4_CODE, torch.linspace(-1, 1, 2001)])
    vals = vals[torch.randperm(vals.numel(), generator=torch.Generator().manual_seed(0))]
    n_blocks = vals.numel() // 63
    w = torch.cat([torch.ones(n_blocks, 1), vals[: n_blocks * 63].view(n_blocks, 63)], 1)  # absmax 1 per block
    packed, st = bnb_quant(w, 64, False)
    ours = quantize_nf4(w)
    assert torch.equal(ours.packed, packed.view(-1)) and torch.equal(ours.dequantize(), bnb_dequant(packed, st, w.shape))
