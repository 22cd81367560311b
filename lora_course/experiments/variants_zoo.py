"""The LoRA variants on one task with one budget: the table and plot of notebook 11.

Every variant adapts the pretrained MiniLM's ``query``/``value`` at rank 8 (VeRA: its shared
random matrices at rank 256, its usual setting), trains the new classification head whole
(``modules_to_save``), and takes the same 40 AdamW-family steps on the same batches (seeded
per run) as the rank sweep of notebook 10. Learning rate 2e-3 for every variant except
VeRA, which trains only scaling vectors and is run at 10x (its paper uses learning rates an
order of magnitude above LoRA's); LoRA+ uses 2e-3 for A and 16x for B.

Recorded per variant and seed: trainable parameters, test accuracy, seconds per step, and
the peak of live tensor bytes during one more training step (``track_peak_memory``: model,
optimizer states, activations, gradients).

Run (about 20 minutes on a 2-core CPU; resumable)::

    python -m lora_course.experiments.variants_zoo    # writes data/results/variants_zoo_fixed_budget.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import provenance, write_results
from ..data import DATA_DIR, label_names, load_text_classification
from ..dora import add_dora
from ..lora import add_lora, count_parameters
from ..memory_measure import track_peak_memory
from ..models import minilm_classifier
from ..train import classification_batches, evaluate_accuracy, train
from ..variants import (DeltaLoRA, add_pissa, add_rslora, add_vera, apply_lora_pro, create_lorafa_optimizer,
                        create_loraplus_optimizer, lora_output_importance, select_lora_layers)

RESULTS_FILE = DATA_DIR / "results" / "variants_zoo_fixed_budget.json"
COMMAND = "python -m lora_course.experiments.variants_zoo"
VARIANTS = ("lora", "rslora", "pissa", "loraplus", "lorafa", "vera", "delta_lora", "lora_pro", "dora", "lora_drop")
SEEDS = (0, 1, 2)
TARGETS = ["query", "value"]
SETTINGS = dict(steps=40, lr=2e-3, vera_lr=2e-2, r=8, alpha=16.0, vera_r=256, loraplus_ratio=16.0,
                delta_update_ratio=2.0, delta_start_step=10, lora_drop_threshold=0.9, batch_size=32, max_length=32)


class _Hooked:
    """An optimizer with a hook before or after its step (duck-typed for :func:`~lora_course.train.train`)."""

    def __init__(self, inner: torch.optim.Optimizer, before: Callable[[], None] | None = None,
                 after: Callable[[], None] | None = None) -> None:
        self.inner, self.before, self.after = inner, before, after
        self.state = inner.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self.before:
            self.before()
        self.inner.step()
        if self.after:
            self.after()


def prepare(variant: str, model: nn.Module, seed: int, splits: Any = None, tokenizer: Any = None) -> Callable:
    """Adapt ``model`` in place for ``variant``; returns its optimizer factory ``(params, lr=, weight_decay=)``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; allowed values: {', '.join(VARIANTS)}")
    r, alpha, save = SETTINGS["r"], SETTINGS["alpha"], ["classifier"]
    torch.manual_seed(seed)  # the adapters' random init draws from the global generator
    adamw = torch.optim.AdamW
    if variant == "rslora":
        add_rslora(model, TARGETS, r=r, alpha=alpha, modules_to_save=save)
    elif variant == "pissa":
        add_pissa(model, TARGETS, r=r, alpha=alpha, modules_to_save=save)
    elif variant == "vera":
        add_vera(model, TARGETS, r=SETTINGS["vera_r"], projection_prng_key=seed, modules_to_save=save)
    elif variant == "dora":
        add_dora(model, TARGETS, r=r, alpha=alpha, modules_to_save=save)
    elif variant == "lora_drop":
        kept = lora_drop_selection(seed, splits, tokenizer)
        torch.manual_seed(seed)
        add_lora(model, kept, r=r, alpha=alpha, modules_to_save=save)
    else:
        add_lora(model, TARGETS, r=r, alpha=alpha, modules_to_save=save)
    if variant == "loraplus":
        return lambda params, lr, weight_decay: create_loraplus_optimizer(
            model, adamw, lr=lr, lr_ratio=SETTINGS["loraplus_ratio"], weight_decay=weight_decay)
    if variant == "lorafa":
        return lambda params, lr, weight_decay: create_lorafa_optimizer(model, lr=lr, weight_decay=weight_decay)
    if variant == "lora_pro":
        return lambda params, lr, weight_decay: _Hooked(adamw(params, lr=lr, weight_decay=weight_decay),
                                                        before=lambda: apply_lora_pro(model))
    if variant == "delta_lora":
        def factory(params, lr, weight_decay):
            delta = DeltaLoRA(model, SETTINGS["delta_update_ratio"], SETTINGS["delta_start_step"])
            return _Hooked(adamw(params, lr=lr, weight_decay=weight_decay), after=delta.step)
        return factory
    return adamw


def lora_drop_selection(seed: int, splits: Any, tokenizer: Any) -> list[str]:
    """LoRA-drop's first phase: plain LoRA for the same steps, importance of each adapted layer's
    output on one fixed batch of 64 training texts, layers kept until 90% of the importance."""
    model, tok = minilm_classifier(len(label_names()), seed=seed)
    torch.manual_seed(seed)
    add_lora(model, TARGETS, r=SETTINGS["r"], alpha=SETTINGS["alpha"], modules_to_save=["classifier"])
    _fit(model, tok, splits, seed, torch.optim.AdamW, SETTINGS["lr"])
    batch = next(iter(classification_batches(tok, splits["train"].select(range(64)), 64, SETTINGS["max_length"],
                                             shuffle=False, epochs=1)))
    batch.pop("labels")
    importance = lora_output_importance(model, [batch])
    return select_lora_layers(importance, SETTINGS["lora_drop_threshold"])


def _fit(model, tokenizer, splits, seed, optimizer, lr):
    torch.manual_seed(seed)
    batches = classification_batches(tokenizer, splits["train"], SETTINGS["batch_size"], SETTINGS["max_length"],
                                     shuffle=True, seed=seed)
    return train(model, batches, lambda m, b: m(**b).loss, SETTINGS["steps"], lr=lr, optimizer=optimizer,
                 progress=False), batches


def run_one(variant: str, seed: int, splits: Any = None) -> dict[str, Any]:
    """Train one variant with one seed; accuracy, trainable parameters, time per step, peak bytes."""
    splits = splits or load_text_classification()
    model, tokenizer = minilm_classifier(len(label_names()), seed=seed)
    made: dict[str, Any] = {}

    def factory(params, lr, weight_decay):
        made["opt"] = prepare_factory(params, lr=lr, weight_decay=weight_decay)
        return made["opt"]

    prepare_factory = prepare(variant, model, seed, splits, tokenizer)
    lr = SETTINGS["vera_lr"] if variant == "vera" else SETTINGS["lr"]
    history, batches = _fit(model, tokenizer, splits, seed, factory, lr)
    batch = next(iter(batches))
    opt = made["opt"]
    with track_peak_memory(model, getattr(opt, "inner", opt), *batch.values()) as mem:  # one more step, states alive
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    trainable, _ = count_parameters(model)
    acc = evaluate_accuracy(model, tokenizer, splits["test"], max_length=SETTINGS["max_length"])
    return {"trainable_parameters": trainable, "test_accuracy": round(acc, 4),
            "seconds_per_step": round(history.seconds / history.steps, 4), "peak_bytes": int(mem.peak),
            "last_loss": round(history.losses[-1], 4)}


def summarize(runs: dict[str, dict], variant: str) -> dict[str, float]:
    """Mean and sample std of the test accuracy over seeds; medians of time and peak bytes."""
    got = [runs[f"{variant}/seed{s}"] for s in SEEDS if f"{variant}/seed{s}" in runs]
    if not got:
        raise ValueError(f"no run stored for variant {variant!r}")
    accs = [g["test_accuracy"] for g in got]
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {"mean": mean, "std": std, "n": len(accs), "trainable_parameters": got[0]["trainable_parameters"],
            "seconds_per_step": median([g["seconds_per_step"] for g in got]),
            "peak_bytes": median([g["peak_bytes"] for g in got])}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    args = parser.parse_args(argv)
    settings = {**SETTINGS, "targets": TARGETS, "seeds": list(SEEDS), "variants": list(VARIANTS)}
    old = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() and not args.fresh else {}
    runs = old.get("runs", {}) if old.get("settings") == settings else {}
    wall = old.get("wall_seconds", 0.0) if runs else 0.0
    splits = load_text_classification()
    todo = [(v, s) for s in SEEDS for v in VARIANTS if f"{v}/seed{s}" not in runs]
    for variant, seed in tqdm(todo, desc="variants zoo runs", mininterval=10.0):
        start = time.perf_counter()
        runs[f"{variant}/seed{seed}"] = run_one(variant, seed, splits)
        wall += time.perf_counter() - start
        record = {"task": "stdlib_docstrings, pretrained MiniLM-L6 + new linear head", "settings": settings,
                  "complete": len(runs) == len(VARIANTS) * len(SEEDS), "runs": runs, "wall_seconds": round(wall, 1),
                  **provenance(COMMAND, "transformers", "peft")}
        write_results(RESULTS_FILE, record)
    base = summarize(runs, "lora")
    for variant in VARIANTS:
        s = summarize(runs, variant)
        print(f"{variant:>10}: {s['trainable_parameters']:>8,} trainable, test {s['mean']:.4f} +- {s['std']:.4f}, "
              f"time x{s['seconds_per_step'] / base['seconds_per_step']:.2f}, peak x{s['peak_bytes'] / base['peak_bytes']:.2f}")
    print("-> data/results/variants_zoo_fixed_budget.json")


if __name__ == "__main__":
    main()
