"""Rank against error where the answer is known: the synthetic study behind notebook 10 section 2.

A linear teacher whose true update has rank k (:func:`~lora_course.data.make_low_rank_task`);
LoRA of rank r is trained on one frozen linear layer, and its test error (the fraction of the
update's energy it leaves unexplained) is stored beside the Eckart-Young floor for rank r
(the energy of the singular values beyond r, the best any rank-r matrix can do). The error
sits on the floor below r = k and drops to float rounding from r = k on: a knee at the true
rank. The real-task rank sweep is a converged study of :mod:`.converged` (``rank_sweep``).

Run (seconds)::

    python -m lora_course.experiments.rank_synthetic      # writes data/results/rank_synthetic.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from . import provenance, write_results
from ..data import DATA_DIR, make_low_rank_task
from ..lora import add_lora
from ..train import train

RESULTS_FILE = DATA_DIR / "results" / "rank_synthetic.json"
COMMAND = "python -m lora_course.experiments.rank_synthetic"
SEEDS = (0, 1, 2)
SYNTHETIC = dict(d_in=64, d_out=64, task_rank=8, ranks=[1, 2, 4, 8, 16, 32], steps=400, lr=1e-2,
                 n_train=1024, n_test=1024)


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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    started = time.perf_counter()
    runs = {f"synthetic/r{r}/seed{s}": {k: round(v, 6) for k, v in synthetic_run(r, s).items()}
            for r in SYNTHETIC["ranks"] for s in SEEDS}
    write_results(RESULTS_FILE, {"task": "rank-k linear teacher, LoRA on one frozen linear layer",
                                 "settings": {**SYNTHETIC, "seeds": list(SEEDS)}, "complete": True, "runs": runs,
                                 "wall_seconds": round(time.perf_counter() - started, 1), **provenance(COMMAND)})
    print(f"-> data/results/rank_synthetic.json ({len(runs)} runs)")


if __name__ == "__main__":
    main()
