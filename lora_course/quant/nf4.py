"""NF4 (4-bit NormalFloat, QLoRA arXiv 2305.14314): code table, blockwise quantization, packing.

A weight tensor is flattened and cut into blocks of ``blocksize`` values (the last block may
be shorter). Each block is divided by its absolute maximum (absmax), each value goes to the
nearest of the 16 NF4 levels, and two 4-bit codes are packed per byte, the first value in
the high nibble. Dequantization is a table lookup times the block's absmax.

Bit-exact with bitsandbytes 0.50 on CPU (``quantize_4bit(..., quant_type="nf4")``), including
its small conventions: full blocks are scaled by ``x * (1 / absmax)`` but the short last block
by ``x / absmax``; the short last block's absmax is clamped to 1e-38 (a full all-zero block
keeps absmax 0); an odd element count pads the last byte's low nibble with the code of 0.0 (7).
"""

from __future__ import annotations

import math
import numbers
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..checks import check_blocksize, check_bool, check_device, check_float_dtype, check_float_tensor, check_int
from .double_quant import dequantize_blockwise_8bit, quantize_blockwise_8bit

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
ABSMAX_BLOCKSIZE = 256  # double quantization: blocks of 256 absmax values (QLoRA)
NF4_OFFSET = 0.9677083  # QLoRA's offset: the outermost quantile probability


def nf4_code(offset: float = NF4_OFFSET) -> torch.Tensor:
    """The 16 NF4 levels from normal quantiles (QLoRA appendix E, ``create_normal_map``).

    8 positive levels: quantiles of N(0,1) at 8 probabilities evenly spaced on [0.5, offset)
    (``linspace(offset, 0.5, 9)[:-1]``); 7 negative levels: minus the quantiles at
    ``linspace(offset, 0.5, 8)[:-1]``; plus an exact 0. Normalised by the largest, so the
    levels span [-1, 1]. Asymmetric (8 positive, 7 negative) so that 0 is representable.
    """
    if not 0.5 < offset < 1.0:
        raise ValueError(f"offset={offset!r} must lie in (0.5, 1)")
    p_pos = torch.linspace(offset, 0.5, 9)[:-1]  # (8,) float32 probabilities
    p_neg = torch.linspace(offset, 0.5, 8)[:-1]  # (7,)
    pos = torch.special.ndtri(p_pos.double())  # (8,) N(0,1) quantiles
    neg = -torch.special.ndtri(p_neg.double())  # (7,)
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).float().sort().values  # (16,)
    return v / v.max()


NF4_CODE: torch.Tensor = nf4_code()  # (16,) float32, equal to bitsandbytes' NF4 table
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) decision thresholds: code = #{bounds < x}
# byte -> (code of high nibble, code of low nibble): one gather decodes two values
_NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)  # (256, 2)
_NF4_PAIRS64 = _NF4_PAIRS.contiguous().view(torch.int64).view(-1)  # (256,) the same pairs as 8-byte words
_pair_tables: dict[torch.device, torch.Tensor] = {}


def _pair_table(device: torch.device) -> torch.Tensor:
    """The (256,) int64 table of code pairs on ``device`` (copied there once)."""
    if device.type == "cpu":
        return _NF4_PAIRS64
    if device not in _pair_tables:
        _pair_tables[device] = _NF4_PAIRS64.to(device)
    return _pair_tables[device]


#: bytes from which a CPU output is asked for in 2 MiB pages: from 32 MiB on, glibc maps every
#: allocation afresh (smaller ones it recycles, already paged in, which is faster still)
HUGE_PAGE_MIN_BYTES = 1 << 25


def _described(x: Any) -> str:
    """A short description of a bad argument for a message: a tensor's dtype, shape and device
    (not its values), anything else by its repr."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r:.80}"


def _as_shape(name: str, shape: Any) -> torch.Size:
    """``shape`` (a tuple, list or ``torch.Size`` of integers >= 1; ``()`` is one value) as a ``torch.Size``."""
    if isinstance(shape, (tuple, list)) and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1 for d in shape):
        return shape if type(shape) is torch.Size else torch.Size(int(d) for d in shape)
    raise ValueError(f"{name} must be a tuple of integers >= 1 (the shape of the quantized tensor), "
                     f"got {name}={shape!r}")


def _check_finite(name: str, x: torch.Tensor) -> None:
    """``x`` holds no NaN or inf, checked on the CPU only: one ``aminmax`` pass (about 0.2% of the
    decode of a 4096 x 4096 weight at one thread); on an accelerator reading the result back would
    wait for the device on every call, so there the values are not checked."""
    if x.device.type == "cpu":
        lo, hi = torch.aminmax(x.detach().reshape(-1))  # NaN propagates into both
        if not (math.isfinite(lo.item()) and math.isfinite(hi.item())):
            raise ValueError(f"{name} contains NaN or inf; the block scales must be finite")


def empty_output(numel: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """An uninitialised (numel,) tensor, for an output that is about to be written in full.

    A fresh tensor of many MiB is new memory: the first write to each 4 KiB page traps into
    the kernel, which finds and zeroes the page (16,384 traps for 64 MiB, about as long as the
    copy itself on this course's CPU). On a CPU, from :data:`HUGE_PAGE_MIN_BYTES` on, the
    memory comes from numpy, which asks Linux for transparent huge pages
    (``madvise(MADV_HUGEPAGE)``): one trap per 2 MiB. Elsewhere (other devices, small sizes,
    no numpy, huge pages off) it is ``torch.empty``; the values are the same either way.

    ``numel``: an integer >= 0; ``dtype``: a ``torch.dtype``; ``device``: a ``torch.device`` or a
    device string (``"cuda"`` only where CUDA is available); otherwise a ``ValueError``.
    """
    numel = check_int("numel", numel, low=0)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype such as torch.float32, got dtype={dtype!r}")
    device = check_device("device", device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r} needs CUDA, which is not available here "
                         "(torch.cuda.is_available() is False)")
    nbytes = numel * dtype.itemsize
    if device.type == "cpu" and nbytes >= HUGE_PAGE_MIN_BYTES and _numpy_huge_pages():
        import numpy

        return torch.from_numpy(numpy.empty(nbytes, dtype=numpy.uint8)).view(dtype)
    return torch.empty(numel, dtype=dtype, device=device)


def _numpy_huge_pages() -> bool:
    """numpy is there and asks for huge pages (its switch, on by default on Linux >= 4.6)."""
    try:
        from numpy._core.multiarray import _get_madvise_hugepage  # numpy >= 2
    except ImportError:
        try:
            from numpy.core.multiarray import _get_madvise_hugepage  # numpy 1.x
        except ImportError:  # no numpy: plain torch.empty
            return False
    return bool(_get_madvise_hugepage())

# Fast exact bucketing (torch.bucketize is a scalar binary search): cut [-1, 1] into 256 bins;
# bin j starts at e_j = -1 + j/128. _BIN_FIRST[j] counts the bounds below e_j - 1/64, and
# _BIN_THRESH[j] is the next bound (inf if none). The window [e_j - 1/64, e_(j+1)] is narrower
# than the smallest gap between bounds, so it holds at most one bound, and
# code = _BIN_FIRST[j] + (x > _BIN_THRESH[j]) exactly (tests compare with bucketize at every bound).
_BINS = 256
_edges = -1.0 + 2.0 * torch.arange(_BINS, dtype=torch.float64) / _BINS  # (256,)
_first = torch.searchsorted(_NF4_BOUNDS.double(), _edges - 4.0 / _BINS, side="left")  # (256,)
assert float((_NF4_BOUNDS[1:] - _NF4_BOUNDS[:-1]).min()) > 6.0 / _BINS  # window: 3 bins
_BIN_FIRST = _first.to(torch.int32)
_BIN_THRESH = torch.cat([_NF4_BOUNDS, torch.tensor([float("inf")])])[_first]  # (256,) float32
#: values dequantized (or quantized) per step on one thread: the temporaries of one chunk stay in
#: cache, and :func:`~lora_course.memory_estimate.estimate_training_memory` counts one such chunk
DEQUANT_CHUNK = 1 << 18
#: values per step when several threads decode (:func:`decode_workers` > 1): with smaller chunks
#: the threads wait on Python's lock between operators (2^18 was 1.1-1.5x slower at 2 threads,
#: ``benchmarks/README.md``); a chunk's 4 MiB of float32 and 2 MiB of indices stay in the L3 cache
THREAD_DEQUANT_CHUNK = 1 << 20


def _codes(s: torch.Tensor) -> torch.Tensor:
    """NF4 code (0..15, int32) of each scaled value, equal to ``bucketize(s, _NF4_BOUNDS)``."""
    j = s.mul(_BINS / 2).add_(_BINS / 2).to(torch.int32).clamp_(0, _BINS - 1).view(-1)  # bin index
    first, thresh = _BIN_FIRST.to(s.device), _BIN_THRESH.to(s.device)  # no-ops on the CPU
    return torch.index_select(first, 0, j).add_(s.view(-1) > torch.index_select(thresh, 0, j))


@dataclass
class NF4Weight:
    """A tensor quantized to NF4: packed 4-bit codes plus per-block constants.

    Without double quantization ``absmax`` holds one float32 per block; with it, ``absmax``
    is None and the constants are ``qabsmax`` (uint8 per block), ``absmax2`` (float32 per
    256 blocks) and ``offset`` (0-d float32, the mean of the absmax values).

    Construction checks what costs O(1) (a ``ValueError`` naming the field): ``shape`` (integers
    >= 1, stored as a ``torch.Size``), ``dtype``, ``blocksize``, ``packed`` (a uint8 tensor), and
    either ``absmax`` alone (a floating tensor) or all three double-quantization constants (their
    dtypes, element counts and device). The length of ``packed`` and of ``absmax`` is checked by
    :func:`dequantize_nf4`; finite constants on the CPU by :meth:`block_absmax` / :func:`dequantize_nf4`
    (:func:`quantize_nf4` only makes finite ones).
    """

    packed: torch.Tensor  # ((n+1)//2,) uint8, first value in the high nibble
    absmax: Optional[torch.Tensor]  # (blocks,) float32, or None with double quantization
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    qabsmax: Optional[torch.Tensor] = None  # (blocks,) uint8 codes of the dynamic map
    absmax2: Optional[torch.Tensor] = None  # (ceil(blocks/256),) float32
    offset: Optional[torch.Tensor] = None  # () float32

    def __post_init__(self) -> None:
        self.shape = _as_shape("shape", self.shape)
        check_float_dtype("dtype", self.dtype)
        self.blocksize = check_blocksize(self.blocksize, BLOCKSIZES_4BIT)
        if not isinstance(self.packed, torch.Tensor) or self.packed.dtype != torch.uint8:
            raise ValueError(f"packed must be a uint8 tensor (two 4-bit codes per byte), got {_described(self.packed)}")
        device, blocks = self.packed.device, -(-self.numel // self.blocksize)
        dq = {"qabsmax": self.qabsmax, "absmax2": self.absmax2, "offset": self.offset}
        if self.absmax is not None:
            given = [name for name, t in dq.items() if t is not None]
            if given:
                raise ValueError(f"absmax and {', '.join(given)} are both given; give absmax alone (no double "
                                 "quantization) or absmax=None with qabsmax, absmax2 and offset")
            wanted = {"absmax": (self.absmax, True, None)}
        else:
            missing = [name for name, t in dq.items() if t is None]
            if missing:
                raise ValueError(f"absmax is None, so the double-quantization constants qabsmax, absmax2 and offset "
                                 f"are needed; missing (None): {', '.join(missing)}")
            wanted = {"qabsmax": (self.qabsmax, False, blocks),
                      "absmax2": (self.absmax2, True, -(-blocks // ABSMAX_BLOCKSIZE)),
                      "offset": (self.offset, True, 1)}
        for name, (t, floating, count) in wanted.items():
            ok = isinstance(t, torch.Tensor) and (t.is_floating_point() if floating else t.dtype == torch.uint8)
            if not ok:
                kind = "a floating-point (float32) tensor" if floating else "a uint8 tensor"
                raise ValueError(f"{name} must be {kind}, got {_described(t)}")
            if count is not None and t.numel() != count:
                raise ValueError(f"{name} must have {count} elements for shape {tuple(self.shape)} in blocks of "
                                 f"{self.blocksize}, got {_described(t)}")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but packed is on {device}; keep them on one device")

    @property
    def double_quant(self) -> bool:
        """True if the absmax values are themselves quantized."""
        return self.qabsmax is not None

    @property
    def numel(self) -> int:
        """Number of quantized values."""
        return int(torch.Size(self.shape).numel())

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of every block (dequantized first with double quantization)."""
        if not self.double_quant:
            return self.absmax
        _check_finite("absmax2", self.absmax2)
        _check_finite("offset", self.offset)
        am = dequantize_blockwise_8bit(self.qabsmax, self.absmax2, ABSMAX_BLOCKSIZE)  # (blocks,) fresh
        return am.add_(self.offset)

    def dequantize(self) -> torch.Tensor:
        """Back to a tensor of the original shape and dtype (computed in float32, rounded once)."""
        return dequantize_nf4(self.packed, self.block_absmax(), self.shape, self.blocksize, self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes plus all quantization constants."""
        parts = [self.packed, self.absmax, self.qabsmax, self.absmax2, self.offset]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    @property
    def bits_per_param(self) -> float:
        """``8 * nbytes / numel``: 4 for the codes plus the constants' share."""
        return 8.0 * self.nbytes / self.numel


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize ``w`` (float32/float16/bfloat16, finite, any shape, not on the meta device) to NF4
    in blocks of ``blocksize``; ``double_quant`` (True or False) quantizes the block absmax too."""
    if isinstance(w, torch.Tensor) and w.is_meta:
        raise ValueError(f"w is on the meta device (a shape without values), got {_described(w)}; "
                         "quantize_nf4 needs a tensor with values")
    check_float_tensor("w", w)
    check_blocksize(blocksize, BLOCKSIZES_4BIT)
    check_bool("double_quant", double_quant)
    x = w.detach().reshape(-1).float()  # (n,)
    n = x.numel()
    full = n - n % blocksize
    nb = full // blocksize
    blocks = x[:full].view(nb, blocksize)  # (nb, bs)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    inv = 1.0 / absmax.clamp(min=1e-38)  # (nb,) bitsandbytes scales full blocks by the reciprocal
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    rows = packed[: full // 2].view(nb, blocksize // 2)  # (nb, bs/2) bytes of the full blocks
    step = max(1, DEQUANT_CHUNK // blocksize)  # blocks per chunk (vectorised inside a chunk)
    for c in range(0, nb, step):
        q = _codes(blocks[c : c + step] * inv[c : c + step, None]).view(-1, 2)  # (chunk*bs/2, 2)
        rows[c : c + step] = (q[:, 0] * 16 + q[:, 1]).view(-1, blocksize // 2)  # high nibble first
    if full < n:  # short last block: absmax clamped, values divided (not multiplied by the reciprocal)
        am = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am[None]])
        tail = torch.nn.functional.pad(x[full:] / am, (0, (n - full) % 2))  # pad nibble encodes 0.0
        q = torch.bucketize(tail.clamp(-1, 1), _NF4_BOUNDS.to(x.device), out_int32=True).view(-1, 2)
        packed[full // 2 :] = (q[:, 0] * 16 + q[:, 1]).to(torch.uint8)
    if not double_quant:
        return NF4Weight(packed=packed, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    offset = absmax.mean()  # () float32
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, ABSMAX_BLOCKSIZE)
    return NF4Weight(packed=packed, absmax=None, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
                     qabsmax=qabsmax, absmax2=absmax2, offset=offset)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``NF4_CODE[code] * absmax[block]`` in float32, rounded once to ``dtype``, reshaped to ``shape``.

    ``packed`` is ((n+1)//2,) uint8 (bitsandbytes' ((n+1)//2, 1) is accepted too). ``absmax``:
    one scale per block, a floating-point tensor (float32 as :func:`quantize_nf4` makes it; other
    float dtypes are computed in float32) on ``packed``'s device; a negative scale is allowed (with
    double quantization the absmax of an all-zero block can come back below 0). ``shape``: a
    tuple of integers >= 1 (``()``: one value); ``dtype``: float32, float16 or bfloat16.

    Every check costs O(1) except one: on the CPU ``absmax`` must be finite (one ``aminmax`` pass
    over the scales, 1/blocksize of the values: about 0.2% of the decode of a 4096 x 4096 weight at
    one thread). On an accelerator that check is skipped (reading its result would wait for the
    device on every call); :func:`quantize_nf4` only makes finite scales. A ``ValueError`` names
    the bad argument.
    """
    check_blocksize(blocksize, BLOCKSIZES_4BIT)
    check_float_dtype("dtype", dtype)
    shape = _as_shape("shape", shape)
    n = shape.numel()
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
    if packed.is_meta:
        raise ValueError(f"packed is on the meta device (a shape without values), got {_described(packed)}")
    if packed.dim() not in (1, 2) or (packed.dim() == 2 and packed.shape[1] != 1) or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}; for shape {tuple(shape)} ({n} values) it must be "
            f"({(n + 1) // 2},) or ({(n + 1) // 2}, 1)"
        )
    nb = -(-n // blocksize)
    if not isinstance(absmax, torch.Tensor):
        raise ValueError(f"absmax must be a floating-point tensor of ceil({n}/{blocksize}) = {nb} block scales, "
                         f"got {_described(absmax)}")
    if absmax.numel() != nb:
        raise ValueError(f"absmax must have ceil({n}/{blocksize}) = {nb} elements, got {absmax.numel()}")
    if not absmax.is_floating_point():
        raise ValueError(f"absmax has dtype {absmax.dtype}; it must be a floating-point tensor (float32, as "
                         "quantize_nf4 makes it; float16/bfloat16 are read as float32). With double "
                         "quantization pass NF4Weight.block_absmax(), not the uint8 qabsmax")
    if absmax.device != packed.device:
        raise ValueError(f"absmax is on {absmax.device} but packed is on {packed.device}; "
                         "both must be on one device")
    flat = packed.reshape(-1)  # ((n+1)//2,)
    am = absmax.reshape(-1).float()  # (nb,); no copy when already float32
    _check_finite("absmax", am)
    full = n - n % blocksize
    out = empty_output(n, dtype, packed.device)  # (n,) written once, below
    if full:
        _decode_full_blocks(flat[: full // 2], am[: full // blocksize], out[:full], blocksize)
    if full < n:  # the short last block
        vals = _NF4_PAIRS.to(packed.device)[flat[full // 2 :].long()].view(-1)[: n - full]  # (tail,)
        out[full:] = vals * am[-1]
    return out.view(shape)


def decode_workers(numel: int, device: torch.device | str = "cpu") -> int:
    """How many threads dequantize ``numel`` values on ``device``: one per chunk of
    :data:`THREAD_DEQUANT_CHUNK` values, at most ``torch.get_num_threads()``; 1 off the CPU (a GPU
    kernel is parallel already) and 1 under a ``TorchDispatchMode`` (a mode is active in its own
    thread only: decoded in the calling thread, every operator passes through it). Each thread
    holds its own chunk of indices (and of float32 for a half-precision output);
    :func:`~lora_course.memory_estimate.estimate_training_memory` counts one thread's.
    ``numel``: an integer >= 1; ``device``: a ``torch.device`` or a device string (a ValueError otherwise)."""
    numel = check_int("numel", numel)
    if check_device("device", device).type != "cpu" or torch._C._len_torch_dispatch_stack() > 0:
        return 1
    return max(1, min(torch.get_num_threads(), -(-numel // THREAD_DEQUANT_CHUNK)))


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads, made once per size (a forked child makes its own)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="nf4-decode")
    return _POOLS[workers]


os.register_at_fork(after_in_child=_POOLS.clear)  # a child has no threads behind a parent's pool


def _decode_full_blocks(codes: torch.Tensor, am: torch.Tensor, out: torch.Tensor, blocksize: int) -> None:
    """Write ``NF4_CODE[code] * am[block]`` for the full blocks into ``out`` (flat), chunk by chunk.

    Per chunk of :data:`DEQUANT_CHUNK` values (small enough to stay in cache): the packed bytes
    become int32 indices (index_select's index type), one gather from the 256-entry table of
    code *pairs* (each int64 entry holds the two float32 values of one byte) decodes two values
    per byte, and one in-place multiply scales each block by its absmax. A float32 output is
    decoded straight into its own memory (gather into it, scale in place: the output is written
    once from main memory's point of view); other dtypes go through one float32 chunk buffer
    (product in float32, rounded once by the copy).

    PyTorch's gather over a 1-D table runs on one thread whatever ``torch.get_num_threads()``
    says, so on the CPU the chunks are shared out between :func:`decode_workers` threads, each
    a contiguous run of chunks with its own buffers (PyTorch releases Python's lock inside an
    operator, so the threads decode at the same time). Every value is computed by the same
    operations as on one thread: the output does not depend on the thread count.
    """
    nb = am.numel()
    half = blocksize // 2  # bytes per block
    workers = decode_workers(nb * blocksize, codes.device)
    step = max(1, (DEQUANT_CHUNK if workers == 1 else THREAD_DEQUANT_CHUNK) // blocksize)  # blocks per chunk
    starts = list(range(0, nb, step))  # first block of each chunk
    table = _pair_table(codes.device)  # (256,) int64
    direct = out.dtype == torch.float32
    rows = out.view(nb, blocksize)  # (nb, bs)
    # buffers are made here, in the calling thread, so that memory trackers (dispatch modes are
    # per thread) see them; the workers only write into existing tensors
    idxs = [torch.empty(min(step, nb) * half, dtype=torch.int32, device=codes.device) for _ in range(workers)]
    bufs = [out if direct else torch.empty(min(step, nb) * blocksize, dtype=torch.float32, device=out.device)
            for _ in range(workers)]

    def decode(w: int) -> None:
        idx, buf = idxs[w], bufs[w]
        for c in starts[w * len(starts) // workers : (w + 1) * len(starts) // workers]:
            e = min(c + step, nb)
            k = (e - c) * half  # bytes in this chunk
            ix = idx[:k]
            ix.copy_(codes[c * half : e * half])  # uint8 -> int32
            dst = buf[c * blocksize : e * blocksize] if direct else buf[: (e - c) * blocksize]
            torch.index_select(table, 0, ix, out=dst.view(torch.int64))  # two float32 values per byte
            vals = dst.view(e - c, blocksize).mul_(am[c:e, None])  # (chunk, bs) scaled in place, float32
            if not direct:
                rows[c:e].copy_(vals)  # rounded once to the output dtype

    if workers == 1:
        decode(0)
    else:
        list(_pool(workers).map(decode, range(workers)))  # re-raises a worker's exception here
