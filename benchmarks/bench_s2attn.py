"""S2-Attn against full causal attention: forward time and peak live memory on the CPU.

Both sides run the same code, ``lora_course.shift_short_attention``: full causal attention
is its ``group_size = seq_len, shift=False`` case (one group: the eager path of
transformers / LongLoRA's noflash forward: scores, causal mask, float32 softmax, weights @ v),
S2-Attn is ``group_size = seq_len // 4`` with the shift. So the ratio isolates what the
grouping saves: the (seq x seq) score matrix becomes seq/G blocks of (G x G).

Time: median of ``--repeats`` forward passes, alternating full / S2 so that a slow spell of
a shared machine hits both alike. Memory: the peak of live tensor bytes during one forward,
counted by ``lora_course.memory.LiveBytes`` above q, k, v (views of them count nothing).

Usage: python benchmarks/bench_s2attn.py [--seqs 2048 4096 8192] [--heads 8] [--head-dim 64]
       [--ratio 0.25] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_course import shift_short_attention
from lora_course.memory import LiveBytes


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int | None) -> torch.Tensor:
    n = q.shape[2]
    return shift_short_attention(q, k, v, n, shift=False) if group is None else shift_short_attention(q, k, v, group)


def peak_bytes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int | None) -> int:
    """Peak live tensor bytes created during one forward (the inputs, and views of them, not counted)."""
    with torch.no_grad(), LiveBytes([q, k, v]) as mode:
        _attend(q, k, v, group)
    return mode.peak - mode.baseline


def measure(seq: int, heads: int = 8, head_dim: int = 64, ratio: float = 0.25, repeats: int = 3,
            batch: int = 1, seed: int = 0) -> dict[str, float]:
    """Median forward seconds and peak bytes of full attention and S2-Attn at one length."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen) for _ in range(3))
    group = int(seq * ratio)
    times: dict[str, list[float]] = {"full": [], "s2": []}
    with torch.no_grad():
        for _ in range(repeats):
            for name, g in (("full", None), ("s2", group)):
                start = time.perf_counter()
                _attend(q, k, v, g)
                times[name].append(time.perf_counter() - start)
    res = {f"{name}_s": statistics.median(t) for name, t in times.items()}
    res.update(full_bytes=peak_bytes(q, k, v, None), s2_bytes=peak_bytes(q, k, v, group))
    res.update(time_ratio=res["s2_s"] / res["full_s"], mem_ratio=res["s2_bytes"] / res["full_bytes"])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch 1, {args.heads} heads, "
          f"head_dim {args.head_dim}, group = seq * {args.ratio}, forward only, float32")
    print(f"{'seq':>6} {'full s':>8} {'S2 s':>8} {'time S2/full':>13} {'full MiB':>9} {'S2 MiB':>8} {'mem S2/full':>12}")
    for n in args.seqs:
        r = measure(n, args.heads, args.head_dim, args.ratio, args.repeats)
        print(f"{n:>6} {r['full_s']:>8.3f} {r['s2_s']:>8.3f} {r['time_ratio']:>13.3f} "
              f"{r['full_bytes'] / 2**20:>9.1f} {r['s2_bytes'] / 2**20:>8.1f} {r['mem_ratio']:>12.3f}")


if __name__ == "__main__":
    main()
