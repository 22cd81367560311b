"""Rank versus accuracy, measured: the runs behind notebook 10.

Four studies on the pretrained MiniLM and the shipped text-classification data, every run
with the same step budget, batch order per seed and classification head (trained whole,
``modules_to_save``), plus one synthetic study:

* ``rank``: LoRA on ``query``/``value`` and on all linear layers, r in 1..64, alpha = 2r
  (so the scaling alpha/r is 2 at every rank), seeds 0-2.
* ``baselines``: full fine-tuning and the head alone on the frozen encoder (the horizontal
  lines of the plot).
* ``scaling``: how the update's scale couples rank and learning rate. LoRA's alpha/r with a
  fixed alpha (scaling 16/r), rsLoRA's alpha/sqrt(r) (arXiv 2312.03732) and alpha = 2r
  (constant scaling, from ``rank``); all three give scaling 2 at r = 8, so they differ only
  in how the scale moves with r.
* ``placement``: where to put the adapters at (nearly) equal parameter budget: q only,
  v only, q+v, q+k+v+o, all-linear.
* ``synthetic``: a linear teacher whose true update has rank k (:func:`make_low_rank_task`);
  the test error against r shows the knee at r = k, next to the best any rank-r matrix can
  do (Eckart-Young: the energy of the singular values beyond r).

Resumable: every finished run is written to the results file at once and skipped when the
script starts again with the same settings.

Run (about an hour on a 2-core CPU; the wall time of the last full run is in the file)::

    python -m lora_course.experiments.rank_sweep      # writes data/results/rank_sweep.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import provenance, write_results
from ..data import DATA_DIR, label_names, load_text_classification, make_low_rank_task
from ..lora import add_lora, count_parameters
from ..models import minilm_classifier
from ..train import evaluate_accuracy, train, train_classifier

RESULTS_FILE = DATA_DIR / "results" / "rank_sweep.json"
COMMAND = "python -m lora_course.experiments.rank_sweep"
RANKS = (1, 2, 4, 8, 16, 32, 64)
SEEDS = (0, 1, 2)
TARGETS = {
    "q": ["query"],
    "v": ["value"],
    "qv": ["query", "value"],
    "qkvo": ["query", "key", "value", "attention.output.dense"],
    "all_linear": "all-linear",
}
SCALING_MODES = ("alpha_2r", "alpha_fixed", "rslora")
SCALING_RANKS = (1, 64)  # r = 8 is shared by the three modes; alpha_2r has every rank
REFERENCE_RANK, REFERENCE_SCALING = 8, 2.0  # where the three scalings coincide
PLACEMENT = {"q": 16, "v": 16, "qv": 8, "qkvo": 4, "all_linear": 2}  # ~12k adapter params per layer
SETTINGS = dict(steps=40, lr=2e-3, full_lr=5e-5, batch_size=32, max_length=32)
SYNTHETIC = dict(d_in=64, d_out=64, task_rank=8, ranks=[1, 2, 4, 8, 16, 32], steps=400, lr=1e-2,
                 n_train=1024, n_test=1024)


def alpha_for(mode: str, r: int) -> tuple[float, bool]:
    """(alpha, use_rslora) for a scaling ``mode`` at rank ``r``; all give scaling 2 at r = 8."""
    if mode == "alpha_2r":
        return 2.0 * r, False
    if mode == "alpha_fixed":
        return REFERENCE_SCALING * REFERENCE_RANK, False
    if mode == "rslora":
        return REFERENCE_SCALING * math.sqrt(REFERENCE_RANK), True
    raise ValueError(f"mode={mode!r} is unknown; allowed values: {', '.join(SCALING_MODES)}")


def scaling_of(mode: str, r: int) -> float:
    """The factor LoRA multiplies B A x by, for ``mode`` at rank ``r``."""
    alpha, rs = alpha_for(mode, r)
    return alpha / (math.sqrt(r) if rs else r)


def run_key(method: str, targets: str | None = None, r: int | None = None, mode: str = "alpha_2r",
            seed: int = 0) -> str:
    """The name a run is stored under, e.g. ``lora/qv/r8/alpha_2r/seed0`` or ``full/seed1``."""
    if method in ("full", "head_only"):
        return f"{method}/seed{seed}"
    return f"lora/{targets}/r{r}/{mode}/seed{seed}"


def build(method: str, seed: int, targets: str = "qv", r: int = 8, mode: str = "alpha_2r"):
    """The MiniLM classifier prepared for one run: ``method`` in lora, full, head_only."""
    if method not in ("lora", "full", "head_only"):
        raise ValueError(f"method={method!r} is unknown; allowed values: lora, full, head_only")
    if method == "lora" and targets not in TARGETS:
        raise ValueError(f"targets={targets!r} is unknown; allowed values: {', '.join(TARGETS)}")
    model, tokenizer = minilm_classifier(len(label_names()), seed=seed)
    if method == "lora":
        alpha, use_rslora = alpha_for(mode, r)
        torch.manual_seed(seed)  # A is drawn from the global generator
        add_lora(model, TARGETS[targets], r=r, alpha=alpha, use_rslora=use_rslora, modules_to_save=["classifier"])
    elif method == "head_only":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("classifier"))
    return model, tokenizer


def run_one(method: str, seed: int, targets: str = "qv", r: int = 8, mode: str = "alpha_2r",
            splits: Any = None, steps: int | None = None, progress: bool = False) -> dict[str, Any]:
    """Train one configuration; trainable parameters, test accuracy, last loss and seconds."""
    splits = splits or load_text_classification()
    steps = steps or SETTINGS["steps"]
    model, tokenizer = build(method, seed, targets, r, mode)
    lr = SETTINGS["full_lr"] if method == "full" else SETTINGS["lr"]
    history = train_classifier(model, tokenizer, splits["train"], steps=steps, lr=lr,
                               batch_size=SETTINGS["batch_size"], max_length=SETTINGS["max_length"],
                               seed=seed, progress=progress)
    acc = lambda split: round(evaluate_accuracy(model, tokenizer, splits[split], max_length=SETTINGS["max_length"]), 4)  # noqa: E731
    trainable, _ = count_parameters(model)
    return {"trainable_parameters": trainable, "test_accuracy": acc("test"),
            "last_loss": round(history.losses[-1], 4), "seconds": round(history.seconds, 1)}


def planned_runs() -> list[dict[str, Any]]:
    """Every MiniLM run of the four studies, each once (shared points are not repeated)."""
    plan: list[dict[str, Any]] = []
    for seed in SEEDS:
        plan += [dict(method="full", seed=seed), dict(method="head_only", seed=seed)]
        plan += [dict(method="lora", seed=seed, targets=t, r=r) for t in ("qv", "all_linear") for r in RANKS]
        plan += [dict(method="lora", seed=seed, targets="qv", r=r, mode=m)
                 for m in SCALING_MODES[1:] for r in SCALING_RANKS]
        plan += [dict(method="lora", seed=seed, targets=t, r=r) for t, r in PLACEMENT.items()
                 if t not in ("qv", "all_linear")]
    return plan


def summarize(runs: dict[str, dict], key_without_seed: str, field: str = "test_accuracy") -> dict[str, float]:
    """Mean, sample std, min and max of ``field`` over the seeds stored for one configuration."""
    values = [runs[f"{key_without_seed}/seed{s}"][field] for s in SEEDS if f"{key_without_seed}/seed{s}" in runs]
    if not values:
        raise ValueError(f"no run stored for {key_without_seed!r}")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values), "n": len(values)}


def synthetic_run(r: int, seed: int, task_rank: int | None = None) -> dict[str, float]:
    """LoRA of rank ``r`` on one frozen linear layer fitting a rank-``task_rank`` update.

    Returns the test error as the fraction of the update's energy it leaves unexplained,
    ``E||(W0 + dW - W) x||^2 / E||delta x||^2``, and the Eckart-Young floor for rank r.
    """
    cfg = SYNTHETIC
    k = task_rank or cfg["task_rank"]
    task = make_low_rank_task(d_in=cfg["d_in"], d_out=cfg["d_out"], rank=k, n_train=cfg["n_train"],
                              n_test=cfg["n_test"], seed=seed)
    model = nn.Sequential(nn.Linear(cfg["d_in"], cfg["d_out"], bias=False))
    with torch.no_grad():
        model[0].weight.copy_(task.W0)
    torch.manual_seed(seed)
    add_lora(model, ["0"], r=r, alpha=float(r))  # scaling 1: the update is B A itself
    train(model, [(task.x_train, task.y_train)], lambda m, b: F.mse_loss(m(b[0]), b[1]),
          steps=cfg["steps"], lr=cfg["lr"], progress=False)
    with torch.no_grad():
        err = F.mse_loss(model(task.x_test), task.y_test) / F.mse_loss(task.x_test @ task.W0.T, task.y_test)
    s2 = task.singular_values.double() ** 2
    floor = float(s2[r:].sum() / s2.sum())
    return {"relative_error": float(err), "eckart_young_floor": floor}


def _load_existing(settings: dict[str, Any]) -> dict[str, dict]:
    if not RESULTS_FILE.exists():
        return {}
    old = json.loads(RESULTS_FILE.read_text(encoding="utf-8"))
    return old.get("runs", {}) if old.get("settings") == settings else {}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the results file")
    args = parser.parse_args(argv)
    settings = {**SETTINGS, "ranks": list(RANKS), "seeds": list(SEEDS),
                "targets": {k: v if isinstance(v, str) else list(v) for k, v in TARGETS.items()},
                "scaling_ranks": list(SCALING_RANKS), "placement": PLACEMENT, "synthetic": SYNTHETIC,
                "batch_order": "seeded per run", "head": "new linear head, trained whole (modules_to_save)"}
    runs = {} if args.fresh else _load_existing(settings)
    started = time.perf_counter()
    previous_seconds = (json.loads(RESULTS_FILE.read_text())["wall_seconds"]
                        if runs and RESULTS_FILE.exists() else 0.0)

    def save(done: bool) -> None:
        record = {"task": "stdlib_docstrings, pretrained MiniLM-L6 + new linear head", "settings": settings,
                  "complete": done, "runs": runs,
                  "wall_seconds": round(previous_seconds + time.perf_counter() - started, 1),
                  **provenance(COMMAND, "transformers", "peft")}
        write_results(RESULTS_FILE, record)

    splits = load_text_classification()
    plan = planned_runs()
    todo = [p for p in plan if run_key(**p) not in runs]
    for spec in tqdm(todo, desc="rank sweep runs", mininterval=10.0):
        runs[run_key(**spec)] = run_one(**spec, splits=splits)
        save(done=False)
    synthetic = {f"synthetic/r{r}/seed{s}": synthetic_run(r, s) for r in SYNTHETIC["ranks"] for s in SEEDS}
    runs.update({k: {key: round(v, 6) for key, v in rec.items()} for k, rec in synthetic.items()})
    save(done=True)
    for t in ("qv", "all_linear"):
        for r in RANKS:
            s = summarize(runs, f"lora/{t}/r{r}/alpha_2r")
            print(f"{t:>10} r={r:<3} test {s['mean']:.4f} +- {s['std']:.4f}")
    print(f"-> data/results/rank_sweep.json ({len(plan)} MiniLM runs)")


if __name__ == "__main__":
    main()
