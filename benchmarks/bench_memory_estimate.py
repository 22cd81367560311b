"""estimate_training_memory against measured bytes, part by part, for full / LoRA / QLoRA.

A Llama model from SmolLM-135M's published configuration (``data/configs/``), cut to
``--layers`` decoder layers, random weights, float32, AdamW, trains one warm-up step; then:

* weights: bytes of the parameters' storages; quantization constants: the NF4 layers' buffers;
* gradients: bytes of the ``.grad`` tensors after a backward;
* optimizer states: bytes of AdamW's moments;
* activations: live bytes that survive the forward (what autograd saved), counted by
  ``lora_course.memory.LiveBytes``;
* peak: ``track_peak_memory`` over a whole step (forward, backward, AdamW step), minus what
  the estimate does not model (the batch, AdamW's step counters, RoPE's buffers).

It prints, per method, each part measured and estimated with the percent error.

Usage: python benchmarks/bench_memory_estimate.py [--layers 6] [--batch 2] [--seq 128] [--checkpointing]
"""

from __future__ import annotations

import argparse

import torch

from lora_course.experiments.memory_measured import build_model
from lora_course.memory import LiveBytes, estimate_training_memory, storage_bytes, track_peak_memory
from lora_course.models import reference_config
from lora_course.qlora import qlora_layers


def measure_parts(config, method: str, batch: int, seq: int, checkpointing: bool) -> dict[str, int]:
    model = build_model(config, method, torch.float32, 8, "all-linear", checkpointing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradient tensors to count them

    step()
    constants = storage_bytes(b for layer in qlora_layers(model).values() for b in layer.buffers())
    with LiveBytes([*model.parameters(), *model.buffers(), ids]) as live:
        loss = model(input_ids=ids, labels=ids).loss
        activations = live.live - live.baseline - 8  # the loss scalar and nll's total weight (2 x 4 bytes)
    loss.backward()
    gradients = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    states = [v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    opt.zero_grad(set_to_none=True)
    untracked = ids.numel() * 8 + 4 * len(opt.state) + storage_bytes(model.buffers()) - constants
    with track_peak_memory(model, opt, ids) as mem:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {"weights": storage_bytes(model.parameters()), "quant_constants": constants, "gradients": gradients,
            "optimizer_states": storage_bytes(states), "activations": activations, "peak": mem.peak - untracked}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = reference_config("smollm-135m", num_hidden_layers=args.layers)
    print(f"SmolLM-135M config with {args.layers} layers, float32, AdamW, batch {args.batch} x {args.seq}, "
          f"checkpointing {args.checkpointing}")
    for method in ("full", "lora", "qlora"):
        measured = measure_parts(config, method, args.batch, args.seq, args.checkpointing)
        est = estimate_training_memory(config, method, dtype=torch.float32, batch=args.batch, seq_len=args.seq,
                                       gradient_checkpointing=args.checkpointing).as_dict()
        cells = []
        for part, value in measured.items():
            error = (value / est[part] - 1) * 100 if est[part] else 0.0
            cells.append(f"{part} {value / 2**20:.2f}/{est[part] / 2**20:.2f} MiB ({error:+.4f}%, {value - est[part]:+d} B)")
        print(f"{method:>5}: " + "; ".join(cells))
    print("(measured/estimated, percent error of the measurement against the estimate)")


if __name__ == "__main__":
    main()
