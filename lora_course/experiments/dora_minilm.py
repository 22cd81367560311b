"""DoRA vs LoRA on the pretrained MiniLM, and the paper's weight-decomposition analysis: the runs behind notebook 08.

Part 1, accuracy and cost: LoRA and DoRA at the same rank (r = 8, alpha = 16, on the
attention's ``query``/``value``, the new classification head trained whole), the same
learning rate, the same step budget and the same batches, for three seeds; validation and
test accuracy per seed, their mean and spread, and the time per training step.

Part 2, weight decomposition (DoRA paper, arXiv:2402.09353, section 2.2): how far training
moves each ``query`` weight in *magnitude* and in *direction*, for full fine-tuning (FT),
LoRA and DoRA, at checkpoints every ``CHECKPOINT_EVERY`` steps. The paper writes a weight as
``W = m V / ||V||_c`` with ``W`` (d x k), ``m`` (1 x k) and ``||.||_c`` the norm of each
column: one column holds the weights of one output feature. ``nn.Linear`` stores the
transpose, (out, in), so the paper's column n is our row n. With ``W_0`` the pretrained
weight and ``W_t`` the weight the layer applies after t steps (for LoRA ``W_0 + s B A``, for
DoRA ``m * (W_0 + s B A) / ||W_0 + s B A||``), per layer::

    Delta M_t = mean over output rows n of | ||W_t[n]|| - ||W_0[n]|| |
    Delta D_t = mean over output rows n of (1 - cos(W_t[n], W_0[n]))

(for DoRA ``||W_t[n]||`` is its magnitude ``m[n]``). Each (layer, checkpoint) gives one
point; the paper plots Delta D against Delta M and reads the sign of the slope (negative
for FT and DoRA, positive for LoRA in its figure 2). We record the points and the Pearson
correlation per method, whichever sign it has.

``quick`` is the subset notebook 08 re-runs (DoRA, seed 0, ``QUICK_STEPS`` steps, one
thread); it must agree with this file. ``--quick-only`` recomputes just that entry.

Run (the file's ``total_seconds`` records how long it took: about 18 minutes for the committed
run, on a 2-core CPU shared with two other training jobs; the per-step times are from that
machine state too)::

    python -m lora_course.experiments.dora_minilm    # writes data/results/dora_minilm_fixed_budget.json
"""

from __future__ import annotations

import datetime
import json
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from . import provenance, write_results
from ..data import DATA_DIR, label_names, load_text_classification
from ..dora import DoRALinear, add_dora
from ..lora import LoRALinear, add_lora, count_parameters
from ..models import minilm_classifier
from ..train import classification_batches, evaluate_accuracy, train

RESULTS_FILE = DATA_DIR / "results" / "dora_minilm_fixed_budget.json"
COMMAND = "python -m lora_course.experiments.dora_minilm"
METHODS = ("lora", "dora", "full")
SEEDS = (0, 1, 2)
STEPS = 100
CHECKPOINT_EVERY = 20
QUICK_STEPS = 10
QUICK_VAL_SIZE = 128
SETTINGS = dict(lr=2e-3, full_lr=5e-5, r=8, alpha=16.0, targets=("query", "value"), batch_size=32, max_length=32)


def build(method: str, num_labels: int, seed: int = 0) -> tuple[nn.Module, Any]:
    """The MiniLM classifier prepared for ``method``: ``"lora"``, ``"dora"`` or ``"full"``."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed values: {', '.join(METHODS)}")
    model, tokenizer = minilm_classifier(num_labels, seed=seed)
    torch.manual_seed(seed)  # the adapters' A is drawn from the global generator: fix it
    kw = dict(r=SETTINGS["r"], alpha=SETTINGS["alpha"], modules_to_save=["classifier"])
    if method == "lora":
        add_lora(model, list(SETTINGS["targets"]), **kw)
    elif method == "dora":
        add_dora(model, list(SETTINGS["targets"]), **kw)
    return model, tokenizer


def query_layers(model: nn.Module) -> list[nn.Module]:
    """The ``query`` projection of each encoder layer (a Linear or our adapter wrapper)."""
    return [layer.attention.self.query for layer in model.bert.encoder.layer]


@torch.no_grad()
def applied_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a layer applies: W, W + s B A (LoRA) or m (W + s B A)/||.|| (DoRA)."""
    if isinstance(module, DoRALinear):
        return module.effective_weight().float()
    if isinstance(module, LoRALinear):
        return (module._weight() + module.delta_weight()).float()
    return module.weight.detach().float().clone()  # a copy: training updates the weight in place


@torch.no_grad()
def decomposition_change(w0: torch.Tensor, wt: torch.Tensor) -> tuple[float, float]:
    """``(Delta M, Delta D)`` between two (out, in) weights, per output row (see module doc)."""
    delta_m = (wt.norm(dim=1) - w0.norm(dim=1)).abs().mean()
    delta_d = (1 - torch.nn.functional.cosine_similarity(wt, w0, dim=1)).mean()
    return delta_m.item(), delta_d.item()


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson correlation coefficient of two equal-length lists."""
    return statistics.correlation(xs, ys)


def run_one(method: str, seed: int, steps: int, splits: dict, val_size: int | None = None,
            progress: bool = True) -> dict:
    """Train one method for ``steps`` steps from ``seed``; accuracies, timing and checkpoints."""
    model, tokenizer = build(method, len(label_names()), seed=seed)
    w0 = [applied_weight(q) for q in query_layers(model)]
    points: list[dict] = []

    def checkpoint(m: nn.Module) -> float:  # train() calls it every CHECKPOINT_EVERY steps
        step = (len(points) // len(w0) + 1) * CHECKPOINT_EVERY
        for i, (q, ref) in enumerate(zip(query_layers(m), w0)):
            dm, dd = decomposition_change(ref, applied_weight(q))
            points.append({"step": min(step, steps), "layer": i, "delta_m": dm, "delta_d": dd})
        return 0.0

    torch.manual_seed(seed)  # dropout and batch order as train_classifier
    batches = classification_batches(tokenizer, splits["train"], SETTINGS["batch_size"], SETTINGS["max_length"],
                                     shuffle=True, seed=seed)
    lr = SETTINGS["full_lr"] if method == "full" else SETTINGS["lr"]
    history = train(model, batches, lambda m, b: m(**b).loss, steps, lr=lr, eval_fn=checkpoint,
                    eval_every=CHECKPOINT_EVERY, progress=progress, desc=f"{method} seed {seed}")
    acc = lambda ds: round(evaluate_accuracy(model, tokenizer, ds, max_length=SETTINGS["max_length"]), 4)  # noqa: E731
    trainable, total = count_parameters(model)
    result = {
        "method": method, "seed": seed, "steps": steps, "lr": lr,
        "trainable_parameters": trainable, "total_parameters": total,
        "first_loss": round(history.losses[0], 4), "last_loss": round(history.losses[-1], 4),
        "losses": [round(x, 4) for x in history.losses],
        "seconds_per_step": round(history.seconds / steps, 4),
        "checkpoints": [{**p, "delta_m": round(p["delta_m"], 6), "delta_d": round(p["delta_d"], 8)} for p in points],
    }
    if val_size is not None:
        result["quick_val_accuracy"] = acc(splits["val"].select(range(val_size)))
    else:
        result["val_accuracy"], result["test_accuracy"] = acc(splits["val"]), acc(splits["test"])
    return result


def summarize(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"mean": round(statistics.mean(values), 4), "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def correlation(run: dict) -> float:
    """Pearson r of (Delta D, Delta M) over the (layer, checkpoint) points of one run."""
    pts = run["checkpoints"]
    return round(pearson([p["delta_d"] for p in pts], [p["delta_m"] for p in pts]), 4)


def quick_entry(splits: dict) -> dict:
    """The short DoRA run notebook 08 repeats (one thread, as the notebook runs it)."""
    run = run_one("dora", 0, QUICK_STEPS, splits, val_size=QUICK_VAL_SIZE, progress=False)
    return {"method": "dora", "seed": 0, "steps": QUICK_STEPS, "quick_val_size": QUICK_VAL_SIZE,
            "losses": run["losses"], "quick_val_accuracy": run["quick_val_accuracy"],
            "checkpoints": run["checkpoints"]}


def main(argv: list[str] | None = None) -> None:
    """Run everything and write the results file; ``--quick-only`` recomputes only its ``quick`` entry."""
    args = sys.argv[1:] if argv is None else argv
    if args not in ([], ["--quick-only"]):
        raise ValueError(f"arguments {args!r} are not understood; allowed: none, or --quick-only")
    torch.set_num_threads(1)  # steady per-step timings; the runs are small
    start = time.perf_counter()
    splits = load_text_classification()
    if args == ["--quick-only"]:
        record = json.loads(RESULTS_FILE.read_text(encoding="utf-8"))
        record["quick"] = quick_entry(splits)
        record["quick_command"] = COMMAND + " --quick-only"
        record["quick_date"] = datetime.date.today().isoformat()
        write_results(RESULTS_FILE, record)
        print(f"quick entry rewritten ({time.perf_counter() - start:.1f} s) -> data/results/dora_minilm_fixed_budget.json")
        return
    runs: dict[str, list[dict]] = {"lora": [], "dora": []}
    for seed in SEEDS:  # interleaved, so a busy machine slows both methods alike
        for m in ("lora", "dora"):
            runs[m].append(run_one(m, seed, STEPS, splits))
    runs["full"] = [run_one("full", 0, STEPS, splits)]  # the decomposition reference, one seed
    quick = quick_entry(splits)
    sec = {m: statistics.mean(r["seconds_per_step"] for r in runs[m]) for m in runs}
    record = {
        "task": "stdlib_docstrings, pretrained MiniLM-L6 + new linear head",
        "settings": {**SETTINGS, "targets": list(SETTINGS["targets"]), "steps": STEPS, "seeds": list(SEEDS),
                     "checkpoint_every": CHECKPOINT_EVERY, "full_seeds": [0]},
        "runs": runs,
        "accuracy": {m: {"val": summarize(runs[m], "val_accuracy"), "test": summarize(runs[m], "test_accuracy")}
                     for m in ("lora", "dora")},
        "seconds_per_step": {m: round(v, 4) for m, v in sec.items()},
        "step_time_ratio_dora_over_lora": round(sec["dora"] / sec["lora"], 3),
        "correlation_delta_d_delta_m": {m: [correlation(r) for r in runs[m]] for m in runs},
        "quick": quick,
        **provenance(COMMAND, "transformers", "peft"),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    write_results(RESULTS_FILE, record)
    for m in ("lora", "dora"):
        accs = ", ".join(f"{r['val_accuracy']:.4f}/{r['test_accuracy']:.4f}" for r in runs[m])
        a = record["accuracy"][m]
        print(f"{m}: val/test per seed {accs}; test {a['test']['mean']:.4f} +- {a['test']['std']:.4f}; "
              f"{sec[m]:.3f} s/step")
    print(f"step time DoRA/LoRA = {record['step_time_ratio_dora_over_lora']}")
    print(f"corr(Delta D, Delta M): {record['correlation_delta_d_delta_m']}")
    print(f"-> data/results/dora_minilm_fixed_budget.json ({record['total_seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
