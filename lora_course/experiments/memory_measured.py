"""Measured training memory of full fine-tuning, LoRA and QLoRA against the estimate (notebook 06).

CPU (default): SmolLM-135M's published configuration (``data/configs/smollm-135m.json``,
random weights: memory does not depend on the values), float32, AdamW; for each method,
batch/sequence size and gradient checkpointing on/off, the peak of live tensor bytes of a
training step (the second one: AdamW's moments exist) measured by ``track_peak_memory``,
next to ``estimate_training_memory`` part by part, and the median step time.

CUDA (``--device cuda``, on a GPU machine): TinyLlama-1.1B's configuration in bfloat16,
batch 1..4 x sequence 512..2048, ``torch.cuda.max_memory_allocated`` for full fine-tuning,
LoRA (ours) and QLoRA through bitsandbytes' CUDA kernels (``BitsAndBytesConfig`` loading +
PEFT), written to ``data/measurements/vram/`` with the GPU name, versions, date and command
(``make test-gpu`` runs it).

Run::

    python -m lora_course.experiments.memory_measured                # writes data/results/memory_cpu.json
    python -m lora_course.experiments.memory_measured --device cuda  # writes data/measurements/vram/memory_cuda.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..data import DATA_DIR
from . import provenance, write_results
from ..lora import add_lora
from ..measurements import gpu_description
from ..memory_estimate import estimate_training_memory
from ..memory_measure import track_peak_memory
from ..models import reference_config
from ..qlora import add_qlora

RESULTS_FILE = DATA_DIR / "results" / "memory_cpu.json"
VRAM_DIR = DATA_DIR / "measurements" / "vram"  # beside the per-check records of make test-gpu
COMMAND = "python -m lora_course.experiments.memory_measured"
METHODS = ("full", "lora", "qlora")
CPU_SETTINGS = dict(config="smollm-135m", dtype="float32", r=8, target_modules="all-linear", lr=1e-4,
                    sizes=[(1, 128), (2, 256)], timed_steps=1)
# notebook 06 re-runs this smaller case (2 of the 30 layers, an 8,192-token vocabulary) and checks it the same way
QUICK_SETTINGS = dict(CPU_SETTINGS, layers=2, vocab_size=8192, sizes=[(1, 64)], timed_steps=1)
CUDA_SETTINGS = dict(config="tinyllama-1.1b", dtype="bfloat16", r=16, target_modules="all-linear", lr=1e-4,
                     sizes=[(1, 512), (1, 2048), (4, 512), (4, 2048)], timed_steps=3)


def build_model(config: Any, method: str, dtype: torch.dtype, r: int, target_modules: Any,
                checkpointing: bool, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
    """A Llama model from ``config`` (random weights) prepared for ``method``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.config.use_cache = False
    if method == "lora":
        add_lora(model, target_modules, r=r, alpha=2.0 * r)
    elif method == "qlora":
        add_qlora(model, target_modules, r=r, alpha=2.0 * r, compute_dtype=dtype)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    return model.train()


def _training_step(model, optimizer, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_one(config: Any, method: str, batch: int, seq_len: int, checkpointing: bool, dtype: torch.dtype,
                r: int, target_modules: Any, lr: float, timed_steps: int, device: str = "cpu",
                model: torch.nn.Module | None = None, resident_bytes: int | None = None) -> dict:
    """Peak memory of one training step (after a warm-up step) and the estimate, part by part.

    On CUDA the allocator's peak counts everything on the device; ``resident_bytes`` (what was
    allocated before the model existed; measured here when the model is built here) is
    subtracted, so the peak is this training step's own.
    """
    if resident_bytes is None:
        resident_bytes = torch.cuda.memory_allocated(device) if device == "cuda" and model is None else 0
    model = model if model is not None else build_model(config, method, dtype, r, target_modules, checkpointing, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    _training_step(model, optimizer, ids)  # AdamW creates its moments
    with track_peak_memory(model, optimizer, ids, device=device) as mem:
        _training_step(model, optimizer, ids)
    times = []
    for _ in range(timed_steps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _training_step(model, optimizer, ids)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    state_dtype = dtype if method == "full" else torch.float32  # AdamW keeps moments in the parameter's dtype
    est = estimate_training_memory(config, method, r=r, target_modules=target_modules, dtype=dtype, batch=batch,
                                   seq_len=seq_len, gradient_checkpointing=checkpointing,
                                   optimizer_state_dtype=state_dtype)
    peak = mem.peak - resident_bytes
    return {
        "method": method, "batch": batch, "seq_len": seq_len, "gradient_checkpointing": checkpointing,
        "measured_peak": peak, "measured_baseline": mem.baseline - resident_bytes,
        "estimate": est.as_dict(),
        "peak_error": round(peak / est.peak - 1, 5),
        "sum_error": round(peak / est.total - 1, 5),
        "seconds_per_step": round(statistics.median(times), 3) if times else None,
    }


def run_cpu(settings: dict, progress: bool = True) -> list[dict]:
    """Every (size, method, checkpointing) case of ``settings`` on the CPU."""
    from tqdm.auto import tqdm

    overrides = {field: settings[key] for key, field in (("layers", "num_hidden_layers"), ("vocab_size", "vocab_size"))
                 if key in settings}
    config = reference_config(settings["config"], **overrides)
    dtype = getattr(torch, settings["dtype"])
    cases = [(b, s, m, c) for b, s in settings["sizes"] for m in METHODS for c in (False, True)]
    rows = []
    for b, s, m, c in tqdm(cases, desc="memory", disable=not progress):
        rows.append(measure_one(config, m, b, s, c, dtype, settings["r"], settings["target_modules"],
                                settings["lr"], settings["timed_steps"]))
    return rows


def _bnb_qlora_model(config: Any, r: int, dtype: torch.dtype, checkpointing: bool) -> torch.nn.Module:
    """QLoRA through bitsandbytes' CUDA kernels: save random weights, load them in 4 bits, add PEFT LoRA."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(dtype).save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        model = LlamaForCausalLM.from_pretrained(tmp, quantization_config=quant, dtype=dtype, device_map="cuda")
    model.config.use_cache = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")).train()


def run_cuda(settings: dict) -> dict:
    """The GPU measurement: full / LoRA (ours) / QLoRA (bitsandbytes CUDA) at every size."""
    config = reference_config(settings["config"])
    dtype = getattr(torch, settings["dtype"])
    rows = []
    for b, s in settings["sizes"]:
        for method in METHODS:
            for ckpt in (False, True):
                gc.collect()
                torch.cuda.empty_cache()
                resident = torch.cuda.memory_allocated()
                try:
                    model = _bnb_qlora_model(config, settings["r"], dtype, ckpt) if method == "qlora" else None
                    row = measure_one(config, method, b, s, ckpt, dtype, settings["r"], settings["target_modules"],
                                      settings["lr"], settings["timed_steps"], device="cuda", model=model,
                                      resident_bytes=resident)
                except torch.cuda.OutOfMemoryError as exc:
                    row = {"method": method, "batch": b, "seq_len": s, "gradient_checkpointing": ckpt,
                           "error": f"out of memory: {str(exc).splitlines()[0]}"}
                if method == "qlora":
                    row["implementation"] = "bitsandbytes Linear4bit (CUDA) + PEFT"
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "estimate"}))
                model = None
    return {**gpu_description(), "settings": settings, "rows": rows,
            **provenance(f"{COMMAND} --device cuda", "transformers", "peft", "bitsandbytes", device="cuda")}


def committed_gpu_records(directory: Path = VRAM_DIR) -> list[dict]:
    """Every GPU memory record committed under ``data/measurements/vram/`` (``memory_cuda*.json``)."""
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("memory_cuda*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available here")
        record = run_cuda(CUDA_SETTINGS)
        VRAM_DIR.mkdir(parents=True, exist_ok=True)
        out = VRAM_DIR / "memory_cuda.json"
        write_results(out, record)
        print(f"-> {out.relative_to(DATA_DIR.parent)}")
        return
    rows = run_cpu(CPU_SETTINGS)
    record = {"settings": CPU_SETTINGS, "rows": rows, "quick_settings": QUICK_SETTINGS,
              "quick_rows": run_cpu(QUICK_SETTINGS),
              **provenance(COMMAND, "transformers")}
    write_results(RESULTS_FILE, record)
    for row in rows:
        print(f"{row['method']:<5} b{row['batch']} s{row['seq_len']:<4} ckpt={row['gradient_checkpointing']!s:<5} "
              f"measured {row['measured_peak'] / 2**20:8.1f} MiB, estimate {row['estimate']['peak'] / 2**20:8.1f} MiB "
              f"({row['peak_error']:+.2%}); sum of parts {row['estimate']['total'] / 2**20:8.1f} MiB; "
              f"{row['seconds_per_step']} s/step")
    print("-> data/results/memory_cpu.json")


if __name__ == "__main__":
    main()
