"""AdaLoRA on the pretrained MiniLM with the shipped data: the runs behind notebook 07.

What it measures (all on the stdlib_docstrings task, MiniLM-L6 + a new linear head that is
trained whole, lr 2e-3, batch 32, max_length 32):

* ``full_ft``: a short full fine-tune; the singular values of W_t - W_0 for every adapted
  module (does every module need the same rank?).
* ``adalora`` vs ``lora`` over 3 seeds: AdaLoRA on the attention's query/key/value and
  attention-output dense layers (24 modules), init_r 12 -> target_r 4, against LoRA on the
  same modules at the *same final* number of adapter parameters (the LoRA rank is computed
  from parameter counts, not typed). Both have scaling 2 (AdaLoRA alpha = 2 * init_r,
  since PEFT divides by the initial rank; LoRA alpha = 2 * r). The final rank pattern of
  each AdaLoRA run is recorded per layer and module.
* ``magnitude``: misconception 1. At the first allocation step of the seed-0 AdaLoRA run,
  the magnitude-only score lambda^2 ||P_i||^2 ||Q_i||^2 against AdaLoRA's sensitivity x
  uncertainty (Spearman rank correlation, overlap of the kept sets); then one run (seed 0
  only) that masks by the magnitude score.
* ``orthogonality``: misconception 2. Mean ||P^T P - I||_F and ||Q Q^T - I||_F during the
  seed-0 run with orth_reg_weight 0.5 (PEFT's default) and a run with 0.
* ``quick``: a 12-step AdaLoRA run that notebook 07 re-runs and must agree with.

Run (about 7 minutes on a 2-core CPU)::

    python -m lora_course.experiments.adalora_minilm    # writes data/results/adalora_minilm_fixed_budget.json
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from . import provenance, write_results
from ..adalora import RankAllocator, add_adalora, magnitude_scores, orth_regularization, svd_layers
from ..data import DATA_DIR, label_names, load_text_classification
from ..lora import add_lora, count_parameters
from ..models import minilm_classifier
from ..train import classification_batches, evaluate_accuracy

RESULTS_FILE = DATA_DIR / "results" / "adalora_minilm_fixed_budget.json"
COMMAND = "python -m lora_course.experiments.adalora_minilm"
MODULES = ("query", "key", "value", "attention.output.dense")
SETTINGS = dict(lr=2e-3, batch_size=32, max_length=32, init_r=12, target_r=4, scaling=2.0, steps=80, tinit=8,
                tfinal=16, deltaT=4, orth_reg_weight=0.5, seeds=[0, 1, 2], record_every=8)
QUICK = dict(steps=12, tinit=2, tfinal=4, deltaT=2, seed=0)
FULL_FT = dict(steps=60, lr=5e-5, seed=0)


class MagnitudeAllocator(RankAllocator):
    """AdaLoRA's allocator, but ranking triplets by lambda^2 ||P_i||^2 ||Q_i||^2 (misconception 1)."""

    def triplet_scores(self, model):
        return magnitude_scores(model)


def build(method: str, seed: int, r: int | None = None):
    """MiniLM classifier with AdaLoRA (``r`` = init_r) or LoRA (rank ``r``) on :data:`MODULES`."""
    model, tokenizer = minilm_classifier(len(label_names()), seed=seed)
    torch.manual_seed(seed)  # the adapters' factors come from the global generator
    if method == "adalora":
        r = r or SETTINGS["init_r"]
        add_adalora(model, list(MODULES), init_r=r, alpha=SETTINGS["scaling"] * SETTINGS["init_r"],
                    modules_to_save=["classifier"])
    elif method == "lora":
        add_lora(model, list(MODULES), r=r, alpha=SETTINGS["scaling"] * r, modules_to_save=["classifier"])
    else:
        raise ValueError(f"method={method!r} is unknown; allowed values: adalora, lora")
    return model, tokenizer


def equal_budget() -> dict:
    """The LoRA rank whose adapter parameters equal AdaLoRA's final ones, from parameter counts."""
    head = sum(p.numel() for p in minilm_classifier(len(label_names()))[0].classifier.parameters())
    per_triplet = count_parameters(build("adalora", 0, r=1)[0])[0] - head  # sum of (in + out + 1)
    per_rank = count_parameters(build("lora", 0, r=1)[0])[0] - head  # sum of (in + out)
    final = SETTINGS["target_r"] * per_triplet  # target_r triplets per module on average
    return {"head_parameters": head, "adalora_params_per_triplet_row": per_triplet,
            "lora_params_per_rank": per_rank, "adalora_final_adapter_parameters": final,
            "lora_rank": round(final / per_rank), "lora_adapter_parameters": round(final / per_rank) * per_rank}


def orth_distances(model) -> dict[str, float]:
    """Mean over modules of ||P^T P - I||_F and ||Q Q^T - I||_F."""
    P, Q = [], []
    with torch.no_grad():
        for layer in svd_layers(model).values():
            r = layer.r
            P.append(torch.linalg.matrix_norm(layer.lora_B.T @ layer.lora_B - torch.eye(r)).item())
            Q.append(torch.linalg.matrix_norm(layer.lora_A @ layer.lora_A.T - torch.eye(r)).item())
    return {"P": statistics.fmean(P), "Q": statistics.fmean(Q)}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return torch.corrcoef(torch.stack([ra, rb]))[0, 1].item()


def rank_table(ranks: dict[str, int]) -> list[list[int]]:
    """``ranks[layer][module]`` for the 6 encoder layers x :data:`MODULES`."""
    table = {}
    for name, r in ranks.items():
        layer = int(name.split("encoder.layer.")[1].split(".")[0])
        module = next(m for m in MODULES if name.endswith("." + m))
        table.setdefault(layer, [0] * len(MODULES))[MODULES.index(module)] = r
    return [table[i] for i in sorted(table)]


def train_adalora(seed: int, splits, steps: int, tinit: int, tfinal: int, deltaT: int,
                  orth_w: float = SETTINGS["orth_reg_weight"], allocator=RankAllocator,
                  probe: bool = False, evaluate: bool = True, progress: bool = False) -> dict:
    """One AdaLoRA run, PEFT's order per step: backward, optimizer step, update_and_allocate, zero_grad."""
    model, tok = build("adalora", seed)
    alloc = allocator(model, init_r=SETTINGS["init_r"], target_r=SETTINGS["target_r"], tinit=tinit,
                      tfinal=tfinal, deltaT=deltaT, total_step=steps)
    torch.manual_seed(seed)  # dropout
    batches = classification_batches(tok, splits["train"], SETTINGS["batch_size"], SETTINGS["max_length"], seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SETTINGS["lr"])
    losses, orth_log, probe_out, start = [], [], None, time.perf_counter()
    model.train()
    for step, batch in zip(range(1, steps + 1), batches):
        loss = model(**batch).loss + orth_w * orth_regularization(model)
        loss.backward()
        opt.step()
        budget, mask_now = alloc.budget_schedule(step)
        first_alloc = probe and probe_out is None and mask_now and step < steps - tfinal
        mags = magnitude_scores(model) if first_alloc else None  # the weights the mask acts on
        alloc.update_and_allocate(model, step)
        if first_alloc:
            probe_out = compare_scores(alloc.triplet_scores(model), mags, budget, step)
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % SETTINGS["record_every"] == 0 or step == steps:
            orth_log.append({"step": step, **{k: round(v, 4) for k, v in orth_distances(model).items()}})
        if progress and step % 20 == 0:
            print(f"  step {step}: loss {losses[-1]:.4f}", flush=True)
    ranks = alloc.ranks()
    out = {"steps": steps, "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
           "losses": [round(x, 4) for x in losses], "trainable_parameters": count_parameters(model)[0],
           "final_triplets": sum(ranks.values()), "ranks": rank_table(ranks), "orthogonality": orth_log,
           "train_seconds": round(time.perf_counter() - start, 1)}
    if probe_out is not None:
        out["score_probe"] = probe_out
    if evaluate:
        out.update(accuracies(model, tok, splits))
    return out


def compare_scores(sens: dict, mags: dict, budget: int, step: int) -> dict:
    """Sensitivity x uncertainty against the magnitude-only score, over all triplets."""
    a, b = torch.cat(list(sens.values())), torch.cat(list(mags.values()))
    keep_a, keep_b = set(a.topk(budget).indices.tolist()), set(b.topk(budget).indices.tolist())
    return {"step": step, "triplets": a.numel(), "budget": budget, "spearman": round(spearman(a, b), 4),
            "kept_overlap": len(keep_a & keep_b), "kept_overlap_fraction": round(len(keep_a & keep_b) / budget, 4)}


def accuracies(model, tok, splits) -> dict:
    ml = SETTINGS["max_length"]
    return {"val_accuracy": round(evaluate_accuracy(model, tok, splits["val"], max_length=ml), 4),
            "test_accuracy": round(evaluate_accuracy(model, tok, splits["test"], max_length=ml), 4)}


def train_lora(seed: int, r: int, splits, steps: int) -> dict:
    model, tok = build("lora", seed, r=r)
    torch.manual_seed(seed)
    batches = classification_batches(tok, splits["train"], SETTINGS["batch_size"], SETTINGS["max_length"], seed=seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=SETTINGS["lr"])
    losses, start = [], time.perf_counter()
    model.train()
    for _, batch in zip(range(steps), batches):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"steps": steps, "rank": r, "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
            "trainable_parameters": count_parameters(model)[0], "train_seconds": round(time.perf_counter() - start, 1),
            **accuracies(model, tok, splits)}


def full_ft_spectra(splits) -> dict:
    """Short full fine-tune; singular values of W_t - W_0 for each module AdaLoRA adapts."""
    seed = FULL_FT["seed"]
    model, tok = minilm_classifier(len(label_names()), seed=seed)
    names = [n for n, m in model.named_modules() if any(n.endswith("." + t) for t in MODULES)]
    w0 = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    torch.manual_seed(seed)
    batches = classification_batches(tok, splits["train"], SETTINGS["batch_size"], SETTINGS["max_length"], seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=FULL_FT["lr"])
    model.train()
    start = time.perf_counter()
    for _, batch in zip(range(FULL_FT["steps"]), batches):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    modules = {}
    for n in names:
        s = torch.linalg.svdvals((model.get_submodule(n).weight.detach() - w0[n]).double())  # (384,)
        energy = (s**2).cumsum(0) / (s**2).sum()
        p = s / s.sum()
        modules[n] = {"singular_values_top48": [float(f"{v:.4g}") for v in s[:48].tolist()],
                      "rank_for_90pct_energy": int((energy < 0.9).sum()) + 1,
                      "entropy_effective_rank": round(math.exp(-(p * p.clamp_min(1e-300).log()).sum().item()), 2),
                      "frobenius": float(f"{s.square().sum().sqrt().item():.4g}")}
    return {"steps": FULL_FT["steps"], "lr": FULL_FT["lr"], "seed": seed, "train_seconds": round(seconds, 1),
            "accuracy": accuracies(model, tok, splits), "modules": modules}


def run_quick(splits=None) -> dict:
    """The 12-step run notebook 07 repeats (no evaluation: losses and the final rank pattern)."""
    splits = splits or load_text_classification()
    out = train_adalora(QUICK["seed"], splits, QUICK["steps"], QUICK["tinit"], QUICK["tfinal"], QUICK["deltaT"],
                        evaluate=False)
    return {k: out[k] for k in ("losses", "ranks", "final_triplets", "orthogonality")}


def summary(runs: dict, key: str = "test_accuracy") -> dict:
    values = [r[key] for r in runs.values()]
    return {"mean": round(statistics.fmean(values), 4), "std": round(statistics.stdev(values), 4),
            "min": min(values), "max": max(values)}


def main() -> None:

    t0 = time.perf_counter()
    splits = load_text_classification()
    budget = equal_budget()
    print(f"equal budget: AdaLoRA final {budget['adalora_final_adapter_parameters']} adapter parameters "
          f"-> LoRA r = {budget['lora_rank']}", flush=True)
    full_ft = full_ft_spectra(splits)
    print(f"full FT spectra done ({full_ft['train_seconds']} s)", flush=True)
    sched = {k: SETTINGS[k] for k in ("steps", "tinit", "tfinal", "deltaT")}
    adalora, lora = {}, {}
    for seed in SETTINGS["seeds"]:
        adalora[str(seed)] = train_adalora(seed, splits, probe=seed == 0, **sched)
        lora[str(seed)] = train_lora(seed, budget["lora_rank"], splits, SETTINGS["steps"])
        print(f"seed {seed}: AdaLoRA test {adalora[str(seed)]['test_accuracy']:.4f}  "
              f"LoRA r={budget['lora_rank']} test {lora[str(seed)]['test_accuracy']:.4f}", flush=True)
    magnitude_run = train_adalora(0, splits, allocator=MagnitudeAllocator, **sched)
    no_orth = train_adalora(0, splits, orth_w=0.0, **sched)
    quick = run_quick(splits)
    record = {
        "task": "stdlib_docstrings, pretrained MiniLM-L6 + new linear head (trained whole)",
        "settings": {**SETTINGS, "modules": list(MODULES), "adalora_alpha": SETTINGS["scaling"] * SETTINGS["init_r"],
                     "lora_alpha": SETTINGS["scaling"] * budget["lora_rank"], "quick": QUICK, "full_ft": FULL_FT},
        "equal_budget": budget,
        "full_ft": full_ft,
        "adalora": adalora,
        "lora": lora,
        "summary": {"adalora": summary(adalora), "lora": summary(lora),
                    "adalora_val": summary(adalora, "val_accuracy"), "lora_val": summary(lora, "val_accuracy")},
        "magnitude": {"probe_seed0": adalora["0"]["score_probe"], "run_seed0": magnitude_run},
        "no_orth_seed0": no_orth,
        "quick": quick,
        **provenance(COMMAND, "transformers", "peft"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_results(RESULTS_FILE, record)
    s = record["summary"]
    print(f"AdaLoRA test {s['adalora']['mean']:.4f} +- {s['adalora']['std']:.4f} | LoRA test "
          f"{s['lora']['mean']:.4f} +- {s['lora']['std']:.4f} | magnitude-masked {magnitude_run['test_accuracy']:.4f} "
          f"| no orth {no_orth['test_accuracy']:.4f} | {record['seconds']} s")
    print("-> data/results/adalora_minilm_fixed_budget.json")


if __name__ == "__main__":
    main()
