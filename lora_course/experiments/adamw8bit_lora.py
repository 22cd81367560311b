"""AdamW vs 8-bit AdamW on the same small LoRA run (3 seeds): do the 8-bit moments cost anything?

Task: :func:`lora_course.data.make_low_rank_task` (a frozen 256 x 256 weight ``W0``; the targets
come from ``W0 + delta`` with a rank-4 ``delta``), learned by LoRA (r=8, alpha=8) on a
``nn.Linear`` holding ``W0``: mean-squared error, batch 64, lr 1e-2, weight decay 0, 300 steps.
Three optimizers on the same batches, per seed:

* ``adamw``: ``torch.optim.AdamW`` (float32 moments),
* ``adamw8bit``: :class:`lora_course.optim8bit.AdamW8bit` with ``min_8bit_size=1``,
* ``bnb_adamw8bit``: ``bitsandbytes.optim.AdamW8bit`` with ``min_8bit_size=1``.

The LoRA factors here have 2,048 values each, under bitsandbytes' default ``min_8bit_size``
(4096), which would keep them in float32; ``min_8bit_size=1`` forces 8-bit moments on every
tensor, as they would be for a large model's factors. Ours and bitsandbytes' must give the same
losses bit for bit (the script asserts it).

Run (well under a minute on a 2-core CPU)::

    python -m lora_course.experiments.adamw8bit_lora   # writes data/results/adamw8bit_lora.json
"""

from __future__ import annotations

import datetime
import functools
import logging
import platform

import torch
import torch.nn.functional as F
from torch import nn

from . import write_results
from ..data import DATA_DIR, make_low_rank_task
from ..lora import add_lora
from ..optim8bit import AdamW8bit
from ..train import train

RESULTS_FILE = DATA_DIR / "results" / "adamw8bit_lora.json"
COMMAND = "python -m lora_course.experiments.adamw8bit_lora"
SEEDS = (0, 1, 2)
OPTIMIZERS = ("adamw", "adamw8bit", "bnb_adamw8bit")
DIM, TASK_RANK, R, ALPHA = 256, 4, 8, 8.0
STEPS, BATCH, LR = 300, 64, 1e-2


def make_optimizer(name: str):
    """The optimizer class/callable ``(params, lr=, weight_decay=)`` for ``name``."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "adamw8bit":
        return functools.partial(AdamW8bit, min_8bit_size=1)
    if name == "bnb_adamw8bit":
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        import bitsandbytes

        return functools.partial(bitsandbytes.optim.AdamW8bit, min_8bit_size=1)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")


def run(seed: int, optimizer: str, steps: int = STEPS) -> dict:
    """Train one LoRA run; returns its per-step training losses and final test MSE."""
    task = make_low_rank_task(d_in=DIM, d_out=DIM, rank=TASK_RANK, n_train=2048, n_test=512, seed=seed)
    model = nn.Sequential(nn.Linear(DIM, DIM, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(task.W0)
    torch.manual_seed(seed)  # the same LoRA A for every optimizer
    add_lora(model, ["0"], r=R, alpha=ALPHA)
    order = torch.randperm(task.x_train.shape[0], generator=torch.Generator().manual_seed(seed))
    batches = [(task.x_train[i], task.y_train[i]) for i in order.split(BATCH)]

    def loss_fn(m, batch):
        x, y = batch
        return F.mse_loss(m(x), y)

    hist = train(model, batches, loss_fn, steps=steps, lr=LR, optimizer=make_optimizer(optimizer),
                 weight_decay=0.0, progress=False)
    with torch.no_grad():
        test = F.mse_loss(model(task.x_test), task.y_test).item()
    return {"losses": hist.losses, "test_mse": test}


def main() -> dict:
    import bitsandbytes

    runs = {opt: {str(s): run(s, opt) for s in SEEDS} for opt in OPTIMIZERS}
    for s in SEEDS:  # ours equals bitsandbytes' bit for bit
        assert runs["adamw8bit"][str(s)] == runs["bnb_adamw8bit"][str(s)], f"seed {s}: ours != bitsandbytes"
    result = {
        "command": COMMAND,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
                     "python": platform.python_version()},
        "setup": {"dim": DIM, "task_rank": TASK_RANK, "r": R, "alpha": ALPHA, "steps": STEPS,
                  "batch": BATCH, "lr": LR, "weight_decay": 0.0, "min_8bit_size": 1, "seeds": list(SEEDS)},
        "runs": runs,
        "summary": {opt: {"final_test_mse": [runs[opt][str(s)]["test_mse"] for s in SEEDS]} for opt in OPTIMIZERS},
    }
    write_results(RESULTS_FILE, result)
    return result


if __name__ == "__main__":
    res = main()
    for opt, s in res["summary"].items():
        print(f"{opt:14s} final test MSE per seed: " + ", ".join(f"{v:.4g}" for v in s["final_test_mse"]))
    print(f"wrote {RESULTS_FILE.relative_to(DATA_DIR.parent)}")
