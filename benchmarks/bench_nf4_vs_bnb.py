"""NF4 on the CPU, our lora_course against bitsandbytes: quantize, dequantize, one QLoRA layer step.

In one run, at each thread count of ``--threads``:

1. quantize: ``quantize_nf4`` against ``bnbF.quantize_4bit`` on one ``--size`` x ``--size`` float32
   weight (blocksize 64), without and with double quantization;
2. dequantize: ``NF4Weight.dequantize`` against ``bnbF.dequantize_4bit``, to float32, bfloat16
   and float16, without and with double quantization, beside two plain copies of the output's
   size and dtype: ``clone`` (reads n values, writes n values into a fresh tensor: the least a
   function returning a new tensor does) and ``copy_`` into a tensor that already exists (the
   memory bandwidth alone, no fresh pages). The bandwidth fraction of an implementation is
   ``time(copy) / time(implementation)``: 1.0 moves data as fast as the copy;
3. one QLoRA layer training step: ``QLoRALinear`` (NF4 with double quantization, float32
   compute, LoRA r = ``--rank``) against PEFT's LoRA on bitsandbytes' ``Linear4bit`` holding the
   same weight and factors, forward and backward of ``--tokens`` tokens (gradients for x, A, B).

Whether a fresh output lands on memory the process already touched is up to glibc's allocator,
whose mmap threshold moves with the sizes freed before: in one run a 32 MiB float16 output of
bitsandbytes came back on recycled pages (no page faults, 39 GB/s) while ours took fresh ones, a
4.68x "ratio" that measured the allocator. ``--malloc`` fixes that state for every implementation
alike (the script re-executes itself with glibc's environment variables, read at start-up):
``fresh``: ``MALLOC_MMAP_THRESHOLD_=131072`` (every large output is new, zero-filled memory from the
kernel, as in a training step's first touch); ``reuse``: ``MALLOC_MMAP_MAX_=0`` and a trim
threshold of 4 GiB (every large output reuses pages freed before: no page faults);
``default`` leaves glibc as it is.

Outputs are checked bit-identical first. The implementations run interleaved, the order rotating
every repetition, so a slow spell of a shared machine hits all alike; the script prints medians
and time ratios ours / bitsandbytes (< 1 = ours faster). Timings are never asserted.

Usage: python benchmarks/bench_nf4_vs_bnb.py [--reps 15] [--quant-reps 5] [--threads 1 2] [--size 4096] [--tokens 256] [--rank 16]
       [--malloc default|fresh|reuse] [--skip-layer]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

logging.disable(logging.WARNING)  # bitsandbytes' optional-kernel warning on import

import bitsandbytes  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402
import peft  # noqa: E402

from lora_course.qlora import QLoRALinear  # noqa: E402
from lora_course.references import peft_lora_on_linear4bit  # noqa: E402
from lora_course.quant import quantize_nf4  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: glibc settings per --malloc regime (environment variables read when the process starts)
MALLOC_ENV = {
    "default": {},
    "fresh": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "reuse": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(4 << 30)},
}


def apply_malloc_regime(regime: str) -> None:
    """Re-execute this script with the regime's glibc variables unless they are already set."""
    env = MALLOC_ENV[regime]
    if all(os.environ.get(k) == v for k, v in env.items()):
        return
    os.environ.update(env)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function; each repetition runs all of them, the order rotating."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    for name in names:  # one untimed warm-up call each
        fns[name]()
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_quantize(w: torch.Tensor, reps: int) -> list[tuple[str, float]]:
    rows = []
    for dq in (False, True):
        ours = lambda: quantize_nf4(w, blocksize=64, double_quant=dq)  # noqa: E731
        bnb = lambda: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")  # noqa: E731
        q, (packed, st) = ours(), bnb()
        assert torch.equal(q.packed, packed.view(-1)), "packed codes differ"
        m = interleaved({"ours": ours, "bnb": bnb}, reps)
        label = f"quantize   float32  dq={dq!s:5}"
        print(f"{label}: ours {m['ours'] * 1e3:7.1f} ms, bnb {m['bnb'] * 1e3:7.1f} ms, ours/bnb {m['ours'] / m['bnb']:.2f}")
        rows.append((label, m["ours"] / m["bnb"]))
    return rows


def bench_dequantize(w: torch.Tensor, reps: int) -> list[tuple[str, float, float, float]]:
    rows = []
    for dtype in DTYPES:
        wd = w.to(dtype)
        src, dst = torch.ones(wd.numel(), dtype=dtype), torch.empty(wd.numel(), dtype=dtype)
        gb = 2 * wd.numel() * dtype.itemsize / 1e9  # bytes a copy reads and writes
        for dq in (False, True):
            q = quantize_nf4(wd, blocksize=64, double_quant=dq)
            packed, st = bnbF.quantize_4bit(wd, blocksize=64, compress_statistics=dq, quant_type="nf4")
            assert torch.equal(q.dequantize(), bnbF.dequantize_4bit(packed, st)), "outputs differ"
            m = interleaved({"ours": q.dequantize, "bnb": lambda: bnbF.dequantize_4bit(packed, st),
                             "clone": src.clone, "copy_": lambda: dst.copy_(src)}, reps)
            label = f"dequantize {str(dtype)[6:]:8} dq={dq!s:5}"
            print(f"{label}: ours {m['ours'] * 1e3:6.1f} ms, bnb {m['bnb'] * 1e3:6.1f} ms, ours/bnb "
                  f"{m['ours'] / m['bnb']:.2f}; clone {m['clone'] * 1e3:5.1f} ms ({gb / m['clone']:4.1f} GB/s), "
                  f"bandwidth fraction ours {m['clone'] / m['ours']:.2f} bnb {m['clone'] / m['bnb']:.2f}; "
                  f"copy_ {m['copy_'] * 1e3:5.1f} ms ({gb / m['copy_']:4.1f} GB/s), "
                  f"fraction ours {m['copy_'] / m['ours']:.2f} bnb {m['copy_'] / m['bnb']:.2f}")
            rows.append((label, m["ours"] / m["bnb"], m["clone"] / m["ours"], m["clone"] / m["bnb"]))
    return rows


def reference_layer(base: nn.Linear, q: QLoRALinear) -> nn.Module:
    """PEFT LoRA on bitsandbytes' Linear4bit holding base's weight (NF4, double quantization), q's factors."""
    return peft_lora_on_linear4bit(base, q.r, q.alpha, q.lora_A, q.lora_B, blocksize=64, double_quant=True)[0]


def bench_qlora_layer(size: int, tokens: int, rank: int, reps: int) -> float:
    torch.manual_seed(0)
    base = nn.Linear(size, size)
    with torch.no_grad():
        base.weight.normal_(0, 0.02)
    ours = QLoRALinear(base, r=rank, alpha=2.0 * rank, double_quant=True)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.02)  # B = 0 at init would hide the branch's gradient for A
    ref = reference_layer(base, ours)
    x = torch.randn(tokens, size)
    g = torch.randn(tokens, size)

    def step(layer: nn.Module, x_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y = layer(x_in)
        y.backward(g)
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = (x_in.grad, *(p.grad for p in params))
        x_in.grad = None
        for p in params:
            p.grad = None
        return (y.detach(), *grads)

    xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = step(ours, xo), step(ref, xr)
    assert all(torch.equal(a, b) for a, b in zip(got, want)), "QLoRA layer outputs or gradients differ"
    m = interleaved({"ours": lambda: step(ours, xo), "bnb": lambda: step(ref, xr)}, reps)
    print(f"QLoRA layer step {size}x{size} NF4+dq, r={rank}, {tokens} tokens, forward+backward: "
          f"ours {m['ours'] * 1e3:6.1f} ms, bnb+PEFT {m['bnb'] * 1e3:6.1f} ms, ours/bnb {m['ours'] / m['bnb']:.2f} "
          f"(output and gradients bit-identical)")
    return m["ours"] / m["bnb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--quant-reps", type=int, default=5, help="reps of the (slow) quantize timings; 0 skips them")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--malloc", choices=sorted(MALLOC_ENV), default="default",
                    help="glibc allocator state for every implementation alike (see the module docstring)")
    ap.add_argument("--skip-layer", action="store_true", help="skip the QLoRA layer step")
    args = ap.parse_args()
    apply_malloc_regime(args.malloc)
    w = torch.randn(args.size, args.size, generator=torch.Generator().manual_seed(0)) * 0.02
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, peft {peft.__version__}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}; weight {args.size}x{args.size}, blocksize 64, "
          f"{args.reps} interleaved reps each ({args.quant_reps} for quantize), medians; malloc regime {args.malloc} "
          f"{MALLOC_ENV[args.malloc] or '(glibc as it is)'}")
    summary = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n== {threads} thread(s)")
        quant = bench_quantize(w, args.quant_reps) if args.quant_reps else []
        deq = bench_dequantize(w, args.reps)
        layer = None if args.skip_layer else bench_qlora_layer(args.size, args.tokens, args.rank, args.reps)
        summary.append((threads, quant, deq, layer))
    print("\nsummary (time ratio ours/bnb, < 1 = ours faster; bandwidth fraction = clone time / time)")
    for threads, quant, deq, layer in summary:
        for label, r in quant:
            print(f"  {threads} thr  {label}  ours/bnb {r:.2f}")
        for label, r, fo, fb in deq:
            print(f"  {threads} thr  {label}  ours/bnb {r:.2f}  fraction ours {fo:.2f} bnb {fb:.2f}")
        if layer is not None:
            print(f"  {threads} thr  QLoRA layer step            ours/bnb {layer:.2f}")


if __name__ == "__main__":
    main()
