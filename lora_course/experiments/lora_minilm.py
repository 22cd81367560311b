"""LoRA fine-tuning of the pretrained MiniLM on the shipped data: the runs behind notebook 01.

Two adapters are compared at the same step budget on the same batches: LoRA on the
attention's ``query``/``value`` (plus the new classification head, trained whole) and the
head alone on the frozen encoder. ``quick`` is the budget notebook 01 re-runs (it must
agree with this file); ``long`` is what a minute on a laptop does not allow.

Run (about 5 minutes on a 2-core CPU)::

    python -m lora_course.experiments.lora_minilm    # writes data/results/lora_minilm.json
"""

from __future__ import annotations


import torch

from . import provenance, write_results
from ..data import DATA_DIR, label_names, load_text_classification
from ..lora import add_lora, count_parameters
from ..models import minilm_classifier
from ..train import evaluate_accuracy, train_classifier

RESULTS_FILE = DATA_DIR / "results" / "lora_minilm.json"
COMMAND = "python -m lora_course.experiments.lora_minilm"
BUDGETS = {"quick": 40, "long": 400}
METHODS = ("lora", "head_only")
SETTINGS = dict(lr=2e-3, r=8, alpha=16.0, targets=("query", "value"), batch_size=32, max_length=32, seed=0)
QUICK_VAL_SIZE = 320  # notebook 01 evaluates the quick run on the first 320 validation rows


def build(method: str, num_labels: int, seed: int = 0):
    """The MiniLM classifier prepared for ``method`` (``"lora"`` or ``"head_only"``)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed values: {', '.join(METHODS)}")
    model, tokenizer = minilm_classifier(num_labels, seed=seed)
    if method == "lora":
        torch.manual_seed(seed)  # LoRA's A is drawn from the global generator: fix it
        add_lora(model, list(SETTINGS["targets"]), r=SETTINGS["r"], alpha=SETTINGS["alpha"], modules_to_save=["classifier"])
    else:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
    return model, tokenizer


def run_one(method: str, steps: int, splits=None, progress: bool = True) -> dict:
    """Train one method for ``steps`` steps; accuracy on the quick validation subset, val and test."""
    splits = splits or load_text_classification()
    model, tokenizer = build(method, len(label_names()), seed=SETTINGS["seed"])
    history = train_classifier(
        model, tokenizer, splits["train"], steps=steps, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"],
        max_length=SETTINGS["max_length"], seed=SETTINGS["seed"], progress=progress,
    )
    acc = lambda split: round(evaluate_accuracy(model, tokenizer, split, max_length=SETTINGS["max_length"]), 4)  # noqa: E731
    trainable, total = count_parameters(model)
    return {
        "steps": steps,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "first_loss": round(history.losses[0], 4),
        "last_loss": round(history.losses[-1], 4),
        "quick_val_accuracy": acc(splits["val"].select(range(QUICK_VAL_SIZE))),
        "val_accuracy": acc(splits["val"]),
        "test_accuracy": acc(splits["test"]),
        "train_seconds": round(history.seconds, 1),
    }


def main() -> None:

    splits = load_text_classification()
    runs = {budget: {m: run_one(m, steps, splits) for m in METHODS} for budget, steps in BUDGETS.items()}
    record = {
        "task": "stdlib_docstrings, pretrained MiniLM-L6 + new linear head",
        "settings": {**SETTINGS, "targets": list(SETTINGS["targets"]), "quick_val_size": QUICK_VAL_SIZE},
        "runs": runs,
        **provenance(COMMAND, "transformers"),
    }
    write_results(RESULTS_FILE, record)
    for budget, by_method in runs.items():
        for method, r in by_method.items():
            print(f"{budget:>5} {method:<9} {r['steps']:>4} steps: val {r['val_accuracy']:.4f} test {r['test_accuracy']:.4f} ({r['train_seconds']} s)")
    print("-> data/results/lora_minilm.json")


if __name__ == "__main__":
    main()
