"""Training-step time and peak live memory: our add_lora against PEFT's get_peft_model.

Both models are the same (a scaled-up tiny Llama from one seed), get LoRA with the same
config and the same A (same seed), and train on the same batches with AdamW. Steps
alternate between the two (ours, PEFT, PEFT, ours, ...) so that a slow spell of the
machine hits both alike; we report the median step time of each, their ratio, and the
median of the ratios of adjacent steps (the more robust of the two on a busy machine).

Memory: the peak of live tensor bytes during one training step (forward, backward, AdamW
step), counted by ``lora_course.memory.track_peak_memory`` (a TorchDispatchMode that sees
every tensor an operator returns and drops its bytes when its storage is freed), on top of
the bytes alive when the step starts (weights, LoRA factors, AdamW moments, the batch).

Usage: python benchmarks/bench_lora_vs_peft.py [--steps 60] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from lora_course import add_lora, count_parameters
from lora_course.memory import track_peak_memory
from lora_course.models import tiny_llama

MODEL = dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)
LORA = dict(target_modules="all-linear", r=8, alpha=16.0, dropout=0.05)


def build(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed, **MODEL).train()
    torch.manual_seed(seed)  # the same LoRA factors in both (PEFT's RNG stream is matched)
    if kind == "ours":
        add_lora(model, **LORA)
    else:
        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(target_modules=LORA["target_modules"], r=LORA["r"],
                                                     lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"]))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-3)


def step(model, opt, batch) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def peak_step_bytes(model, opt, batch) -> int:
    with track_peak_memory(model, opt, batch) as mem:
        step(model, opt, batch)
    return mem.peak


def layer_overhead(rounds: int = 15, calls: int = 200) -> dict[str, float]:
    """Median seconds per forward+backward of 8 tiny (32 x 32) LoRA layers: the arithmetic is
    negligible, so this isolates each library's per-layer Python overhead."""
    from peft import LoraConfig, get_peft_model

    def stack() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)])

    names = [str(i) for i in range(8)]
    models = {"ours": add_lora(stack(), target_modules=names, r=4),
              "peft": get_peft_model(stack(), LoraConfig(target_modules=names, r=4, lora_alpha=8))}
    x = torch.randn(4, 32)
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    for _ in range(rounds):
        for kind, model in models.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                model(x).sum().backward()
            times[kind].append((time.perf_counter() - t0) / calls)
    return {kind: statistics.median(t) for kind, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, MODEL["vocab_size"], (args.batch, args.seq), generator=gen) for _ in range(4)]

    runs = {kind: build(kind) for kind in ("ours", "peft")}
    counts = {kind: count_parameters(m) if kind == "ours" else m.get_nb_trainable_parameters()
              for kind, (m, _) in runs.items()}
    assert counts["ours"] == counts["peft"], counts
    times: dict[str, list[float]] = {"ours": [], "peft": []}
    losses: dict[str, list[float]] = {"ours": [], "peft": []}
    for i in range(args.steps + 3):  # 3 warm-up steps each (AdamW creates its moments)
        order = ("ours", "peft") if i % 2 == 0 else ("peft", "ours")
        for kind in order:
            model, opt = runs[kind]
            torch.manual_seed(1000 + i)  # the same dropout masks for both
            t0 = time.perf_counter()
            loss = step(model, opt, batches[i % len(batches)])
            elapsed = time.perf_counter() - t0
            losses[kind].append(loss)
            if i >= 3:
                times[kind].append(elapsed)
    peaks = {}
    for kind, (model, opt) in runs.items():
        torch.manual_seed(0)
        peaks[kind] = peak_step_bytes(model, opt, batches[0])

    med = {kind: statistics.median(t) for kind, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {MODEL}; LoRA {LORA}")
    print(f"batch {args.batch} x {args.seq} tokens; {args.steps} timed steps each, interleaved")
    print(f"trainable / total parameters: ours {counts['ours']}, PEFT {counts['peft']}")
    same = losses["ours"] == losses["peft"]
    print(f"losses identical at every step: {same} (last: ours {losses['ours'][-1]:.6f}, PEFT {losses['peft'][-1]:.6f})")
    for kind in ("ours", "peft"):
        print(f"{kind:>4}: median step {med[kind] * 1e3:7.2f} ms (min {min(times[kind]) * 1e3:.2f}, "
              f"max {max(times[kind]) * 1e3:.2f}); peak live {peaks[kind]:,} bytes ({peaks[kind] / 2**20:.2f} MiB)")
    paired = statistics.median(o / p for o, p in zip(times["ours"], times["peft"]))
    print(f"step-time ratio ours/PEFT: {med['ours'] / med['peft']:.3f} (ratio of medians), "
          f"{paired:.3f} (median of the ratios of adjacent steps)")
    print(f"peak-memory ratio ours/PEFT: {peaks['ours'] / peaks['peft']:.4f}")
    over = layer_overhead()
    print(f"per-layer overhead (8 tiny LoRA layers, forward+backward): ours {over['ours'] * 1e6:.0f} us, "
          f"PEFT {over['peft'] * 1e6:.0f} us, ratio {over['ours'] / over['peft']:.3f}")


if __name__ == "__main__":
    main()
