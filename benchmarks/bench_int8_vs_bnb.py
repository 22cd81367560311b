"""LLM.int8() forward and 8-bit AdamW step time: our lora_course against bitsandbytes on the CPU.

1. ``Int8Linear`` vs bitsandbytes' ``Linear8bitLt(has_fp16_weights=False)`` forward in eval mode
   (int8 matmul + outlier decomposition), a 4096 -> 4096 layer on 256 tokens with a few outlier
   input columns (threshold 6.0), and once with threshold 0 (no decomposition).
2. ``AdamW8bit`` vs ``bitsandbytes.optim.AdamW8bit`` step on 4 parameters of 4M values
   (16.7M in all), same gradients.

Outputs are checked to be bit-identical first. Runs alternate between the two implementations
(ours, bitsandbytes, bitsandbytes, ours, ...) so a slow spell of the machine hits both alike;
the script prints the median time of each and the time ratio ours / bitsandbytes (< 1 = faster).

Usage: python benchmarks/bench_int8_vs_bnb.py [--reps 10] [--threads 1] [--tokens 256] [--size 4096]
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from torch import nn

logging.disable(logging.WARNING)  # bitsandbytes' optional-kernel and float16-cast warnings

import bitsandbytes  # noqa: E402

from lora_course.optim8bit import AdamW8bit  # noqa: E402
from lora_course.quant.int8 import Int8Linear  # noqa: E402


def alternate(fa, fb, reps: int) -> tuple[float, float]:
    """Median seconds of fa and fb, alternating the order each repetition."""
    ta, tb = [], []
    for i in range(reps):
        pair = [(fa, ta), (fb, tb)] if i % 2 == 0 else [(fb, tb), (fa, ta)]
        for fn, acc in pair:
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def bench_linear(size: int, tokens: int, threshold: float, reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    base = nn.Linear(size, size)
    with torch.no_grad():
        base.weight.normal_(0, 0.02, generator=gen)
    ref = bitsandbytes.nn.Linear8bitLt(size, size, has_fp16_weights=False, threshold=threshold)
    ref.load_state_dict(copy.deepcopy(base.state_dict()))
    ref = ref.to("cpu").eval()
    ours = Int8Linear(base, threshold).eval()
    x = torch.randn(tokens, size, generator=gen)
    x[:, :: size // 4] *= 10  # 4 outlier columns, like LLM.int8()'s emergent features
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x)), "outputs differ"
        mo, mb = alternate(lambda: ours(x), lambda: ref(x), reps)
    print(f"Int8Linear forward {size}x{size}, {tokens} tokens, threshold {threshold}: "
          f"ours {mo * 1e3:7.1f} ms, bitsandbytes {mb * 1e3:7.1f} ms, time ratio ours/bnb = {mo / mb:.2f} "
          f"(outputs bit-identical)")


def bench_adam(numel: int, n_params: int, reps: int) -> None:
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(numel, generator=gen) for _ in range(n_params)]
    grads = [torch.randn(numel, generator=gen) * 1e-2 for _ in range(n_params)]
    pa = [p.clone().requires_grad_(True) for p in init]
    pb = [p.clone().requires_grad_(True) for p in init]
    for a, b, g in zip(pa, pb, grads):
        a.grad, b.grad = g.clone(), g.clone()
    oa, ob = AdamW8bit(pa), bitsandbytes.optim.AdamW8bit(pb)
    oa.step(), ob.step()
    assert all(torch.equal(a, b) for a, b in zip(pa, pb)), "parameters differ"
    assert all(torch.equal(oa.state[a]["state1"], ob.state[b]["state1"]) for a, b in zip(pa, pb))
    mo, mb = alternate(oa.step, ob.step, reps)
    assert all(torch.equal(a, b) for a, b in zip(pa, pb)), "parameters differ"
    total = numel * n_params
    print(f"AdamW8bit step, {n_params} x {numel / 1e6:.1f}M values: ours {mo * 1e3:7.1f} ms, "
          f"bitsandbytes {mb * 1e3:7.1f} ms ({total / mb / 1e6:.0f} M values/s), "
          f"time ratio ours/bnb = {mo / mb:.2f} (parameters and states bit-identical)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--adam-numel", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--adam-params", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}, threads {args.threads}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.reps} reps each")
    bench_linear(args.size, args.tokens, 6.0, args.reps)
    bench_linear(args.size, args.tokens, 0.0, args.reps)
    bench_adam(args.adam_numel, args.adam_params, args.reps)


if __name__ == "__main__":
    main()
