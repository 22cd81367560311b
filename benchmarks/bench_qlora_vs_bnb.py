"""QLoRA training step: our QLoRA MiniLM against bitsandbytes' Linear4bit + PEFT, time and live bytes.

Both models come from ``lora_course.experiments.qlora_minilm.build``: the pretrained MiniLM-L6
classifier with every encoder linear layer in NF4 (double quantization, blocksize 64, float32
compute), LoRA r=8 on query/value from the same factors, the new head trained whole. Ours is
``add_qlora`` + ``quantize_linear_layers``; the reference is transformers'
``BitsAndBytesConfig(load_in_4bit=True, ...)`` loading + ``prepare_model_for_kbit_training`` +
PEFT's ``get_peft_model``. One step = forward, backward, AdamW step on a fixed batch. Steps
alternate between the two (ours, bnb, bnb, ours, ...) so that a slow spell of a shared
machine hits both alike; the losses must agree at every step.

Memory: the peak of live tensor bytes during one step (``lora_course.memory.track_peak_memory``)
on top of what is alive before it (the model, AdamW's moments, the batch, and for bitsandbytes
the constants it keeps outside parameters and buffers, in each weight's ``quant_state``).

Usage: python benchmarks/bench_qlora_vs_bnb.py [--steps 20] [--threads 1] [--batch 32] [--seq 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lora_course.data import label_names, load_text_classification
from lora_course.experiments.qlora_minilm import build, trainable_and_total
from lora_course.memory import track_peak_memory
from lora_course.quant import NF4Weight


def quant_state_tensors(model) -> list[torch.Tensor]:
    """bitsandbytes keeps each Linear4bit's constants in ``weight.quant_state`` (not a parameter or
    buffer): its absmax codes, the nested absmax and code books, the offset."""
    tensors = []
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        for holder in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code", "offset"):
                value = getattr(holder, name, None)
                if isinstance(value, torch.Tensor):
                    tensors.append(value)
    return tensors


def step(model, opt, batch) -> float:
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {}
    for kind in ("ours", "bnb"):
        model, tokenizer = build("qlora_ours" if kind == "ours" else "qlora_bnb", len(label_names()))
        model.train()
        runs[kind] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3))
    texts = load_text_classification()["train"].select(range(args.batch))
    batch = tokenizer(list(texts["text"]), padding="max_length", truncation=True, max_length=args.seq, return_tensors="pt")
    batch["labels"] = torch.tensor(list(texts["label"]))
    counts = {kind: trainable_and_total(m) for kind, (m, _) in runs.items()}
    assert counts["ours"] == counts["bnb"], counts

    times: dict[str, list[float]] = {"ours": [], "bnb": []}
    losses: dict[str, list[float]] = {"ours": [], "bnb": []}
    for i in range(args.steps + 2):  # 2 warm-up steps each (AdamW creates its moments)
        for kind in (("ours", "bnb") if i % 2 == 0 else ("bnb", "ours")):
            model, opt = runs[kind]
            torch.manual_seed(1000 + i)  # the same dropout masks for both
            start = time.perf_counter()
            losses[kind].append(step(model, opt, batch))
            if i >= 2:
                times[kind].append(time.perf_counter() - start)
    peaks = {}
    for kind, (model, opt) in runs.items():
        torch.manual_seed(0)
        with track_peak_memory(model, opt, *batch.values(), *quant_state_tensors(model)) as mem:
            step(model, opt, batch)
        peaks[kind] = mem

    # the one part of the step where the two differ in code: dequantizing every NF4 weight
    # (each is dequantized twice per step, forward and backward)
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    ours_w = [m.nf4 for m in runs["ours"][0].modules() if isinstance(getattr(m, "nf4", None), NF4Weight)]
    bnb_w = [m.weight for m in runs["bnb"][0].modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(ours_w) == len(bnb_w), (len(ours_w), len(bnb_w))
    assert all(torch.equal(a.dequantize(), bnbF.dequantize_4bit(b.data, b.quant_state).to(a.dtype))
               for a, b in zip(ours_w, bnb_w))
    deq: dict[str, list[float]] = {"ours": [], "bnb": []}
    fns = {"ours": lambda: [w.dequantize() for w in ours_w],
           "bnb": lambda: [bnbF.dequantize_4bit(w.data, w.quant_state) for w in bnb_w]}
    for i in range(2 * args.steps):
        for kind in (("ours", "bnb") if i % 2 == 0 else ("bnb", "ours")):
            start = time.perf_counter()
            fns[kind]()
            deq[kind].append(time.perf_counter() - start)
    deq_med = {kind: statistics.median(t) for kind, t in deq.items()}

    med = {kind: statistics.median(t) for kind, t in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch} x {args.seq} tokens; "
          f"{args.steps} timed steps each, interleaved")
    print(f"trainable / total parameters: ours {counts['ours']}, bitsandbytes + PEFT {counts['bnb']}")
    print(f"losses identical at every step: {losses['ours'] == losses['bnb']} "
          f"(last: ours {losses['ours'][-1]:.6f}, bnb {losses['bnb'][-1]:.6f})")
    for kind in ("ours", "bnb"):
        p = peaks[kind]
        print(f"{kind:>4}: median step {med[kind] * 1e3:7.1f} ms; alive before the step {p.baseline / 2**20:6.2f} MiB, "
              f"peak {p.peak / 2**20:6.2f} MiB")
    paired = statistics.median(o / b for o, b in zip(times["ours"], times["bnb"]))
    print(f"step-time ratio ours/bnb: {med['ours'] / med['bnb']:.3f} (ratio of medians), {paired:.3f} (median of adjacent ratios)")
    print(f"dequantize all {len(ours_w)} NF4 weights once ({sum(w.numel for w in ours_w):,} values): ours {deq_med['ours'] * 1e3:.2f} ms, bnb {deq_med['bnb'] * 1e3:.2f} ms, "
          f"ours/bnb {deq_med['ours'] / deq_med['bnb']:.2f} (bit-identical; a step dequantizes each twice)")
    print(f"peak-memory ratio ours/bnb: {peaks['ours'].peak / peaks['bnb'].peak:.4f}; "
          f"stored bytes ratio: {peaks['ours'].baseline / peaks['bnb'].baseline:.4f}")


if __name__ == "__main__":
    main()
