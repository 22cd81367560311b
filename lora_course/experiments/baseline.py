"""The frozen-MiniLM + linear-head baseline on the shipped text-classification set.

Each text becomes one vector, the attention-masked mean of the frozen MiniLM's last
hidden states; only a linear head on top of those vectors is trained (a "linear probe").
Whatever LoRA or fine-tuning reaches later is compared with this number.

Notebook 00 re-runs the quick subset (``QUICK_SIZES``) with :func:`probe_experiment`
and compares it with ``quick_subset`` in the file.

Run (the file records how long the run took, under ``seconds``)::

    python -m lora_course.experiments.baseline      # writes data/results/baseline.json
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import provenance, write_results
from ..checks import check_int
from ..data import DATA_DIR, SPLITS, label_names, load_text_classification
from ..models import minilm

RESULTS_FILE = DATA_DIR / "results" / "baseline.json"
COMMAND = "python -m lora_course.experiments.baseline"
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
QUICK_SIZES = {"train": 600, "val": 200, "test": 300}  # notebook 00 re-runs this subset


@torch.no_grad()
def embed_texts(
    model: nn.Module, tokenizer, texts: list[str], max_length: int = 32, batch_size: int = 64
) -> torch.Tensor:
    """Attention-masked mean of ``model``'s last hidden states: one (hidden,) row per text."""
    check_int("max_length", max_length, low=2)
    check_int("batch_size", batch_size)
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    rows = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start : start + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state  # (batch, seq, hidden)
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
        rows.append(((hidden * mask).sum(1) / mask.sum(1)).cpu())  # (batch, hidden)
    model.train(was_training)
    return torch.cat(rows)


@dataclass
class LinearProbe:
    """A linear head on standardised features; ``weight_decay`` was chosen on validation."""

    head: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    weight_decay: float
    val_accuracy: float

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted class ids for the rows of ``x``."""
        return self.head((x - self.mean) / self.std).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Fraction of rows of ``x`` whose prediction equals ``y``."""
        return float((self.predict(x) == y).float().mean())


def _fit_head(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, steps: int, seed: int
) -> nn.Linear:
    """Full-batch L-BFGS on cross-entropy + ``weight_decay * ||W||^2``."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + weight_decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def fit_linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS, steps: int = 300, seed: int = 0,
) -> LinearProbe:
    """Fit one head per weight decay on the training features; keep the best on validation."""
    if len(x_train) != len(y_train) or len(x_val) != len(y_val) or len(x_train) == 0:
        shapes = {name: tuple(t.shape) for name, t in
                  (("x_train", x_train), ("y_train", y_train), ("x_val", x_val), ("y_val", y_val))}
        raise ValueError(f"features and labels must be non-empty and of equal length, got shapes {shapes}")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    z = (x_train - mean) / std
    num_classes = int(max(y_train.max(), y_val.max())) + 1
    best = None
    for wd in weight_decays:
        probe = LinearProbe(_fit_head(z, y_train, num_classes, wd, steps, seed), mean, std, wd, 0.0)
        probe.val_accuracy = probe.accuracy(x_val, y_val)
        if best is None or probe.val_accuracy > best.val_accuracy:
            best = probe
    return best


def majority_accuracy(y_train: torch.Tensor, y_eval: torch.Tensor) -> float:
    """Accuracy of always predicting the most frequent training label."""
    return float((y_eval == torch.bincount(y_train).argmax()).float().mean())


def probe_experiment(model: nn.Module, tokenizer, data, sizes: dict[str, int] | None = None,
                     max_length: int = 32, batch_size: int = 64, seed: int = 0) -> dict:
    """Embed each split (or its first ``sizes[split]`` rows), fit the probe, return the numbers.

    ``data`` is a ``DatasetDict`` with ``train`` / ``val`` / ``test``; the weight decay is
    chosen on ``val`` and ``test`` is scored once.
    """
    parts = {s: data[s] if sizes is None else data[s].select(range(min(sizes[s], len(data[s]))))
             for s in SPLITS}
    feats = {s: embed_texts(model, tokenizer, list(parts[s]["text"]), max_length, batch_size) for s in SPLITS}
    labels = {s: torch.tensor(list(parts[s]["label"])) for s in SPLITS}
    probe = fit_linear_probe(feats["train"], labels["train"], feats["val"], labels["val"], seed=seed)
    return {
        "val_accuracy": round(probe.val_accuracy, 4),
        "test_accuracy": round(probe.accuracy(feats["test"], labels["test"]), 4),
        "majority_test_accuracy": round(majority_accuracy(labels["train"], labels["test"]), 4),
        "weight_decay": probe.weight_decay,
        "n": {s: len(parts[s]) for s in SPLITS},
    }


def run(max_length: int = 32, batch_size: int = 64, seed: int = 0) -> dict:
    """The full-split baseline and the quick subset, as one results record."""
    start = time.perf_counter()
    model, tokenizer = minilm()
    data = load_text_classification()
    full = probe_experiment(model, tokenizer, data, None, max_length, batch_size, seed)
    quick = probe_experiment(model, tokenizer, data, QUICK_SIZES, max_length, batch_size, seed)
    return {
        "task": "stdlib_docstrings (data/stdlib_docstrings), frozen MiniLM-L6 mean-pooled + linear head",
        **full,
        "num_classes": len(label_names(data)),
        "max_length": max_length,
        "probe": {"optimizer": "L-BFGS, full batch, 300 iterations, standardised features",
                  "weight_decays_tried": list(WEIGHT_DECAYS), "selected_on": "val", "seed": seed},
        "quick_subset": {"rows": "the first rows of each split, sizes in n; same protocol", **quick},
        "seconds": round(time.perf_counter() - start, 1),
        **provenance(COMMAND, "transformers", device=str(next(model.parameters()).device)),
    }


def main() -> None:
    result = run()
    write_results(RESULTS_FILE, result)
    quick = result["quick_subset"]
    print(f"val {result['val_accuracy']:.4f}  test {result['test_accuracy']:.4f}  "
          f"majority {result['majority_test_accuracy']:.4f}  quick-subset test {quick['test_accuracy']:.4f}  "
          f"({result['seconds']} s) -> data/results/baseline.json")


if __name__ == "__main__":
    main()
