"""Why S2-Attn shifts half the heads: a tiny Llama trained on passkey retrieval across groups.

Task (synthetic): a sequence of ``SEQ`` random filler tokens hides the pair (MARK, key)
somewhere in the third group (positions 40-47 of 64 with group size 16); the sequence ends
with MARK, and the model must predict the key (one of 16) after it. The pair always sits in
the group before the final query's: without the shift no training-time attention path
reaches it; with the shift, a shifted head (its groups straddle the border) carries it
across in layer 1 and an unshifted head reads it in layer 2. The same tiny Llama (same seed) is trained three ways:

* ``short``: grouped attention without the shift (the paper's "short attention" ablation),
* ``s2``: S2-Attn (half the heads shifted by G/2),
* ``full``: ordinary full causal attention,

and every model is evaluated with **full attention** (``model.eval()``), as LongLoRA is used.

Run (a few minutes on a 2-core CPU)::

    python -m lora_course.experiments.longlora_demo   # writes data/results/longlora_demo.json
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import provenance, write_results
from ..data import DATA_DIR
from ..longlora import patch_s2attn
from ..models import tiny_llama
from ..train import train

RESULTS_FILE = DATA_DIR / "results" / "longlora_demo.json"
COMMAND = "python -m lora_course.experiments.longlora_demo"
SEQ, RATIO, MARK, KEYS, FILLER = 64, 0.25, 1, (2, 18), (18, 500)
MODES = ("short", "s2", "full")
SEEDS = (0, 1, 2)
STEPS, QUICK_STEPS = 300, 150  # the notebook re-runs QUICK_STEPS for seed 0
BATCH, LR, EVAL_N = 32, 3e-3, 512


def passkey_batch(n: int, gen: torch.Generator, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (n, seq), keys (n,)): filler, (MARK, key) in the third group, MARK at the end."""
    ids = torch.randint(*FILLER, (n, seq), generator=gen)
    keys = torch.randint(*KEYS, (n,), generator=gen)  # 16 possible keys
    pos = torch.randint(seq * 5 // 8, seq * 3 // 4 - 1, (n,), generator=gen)  # third group
    rows = torch.arange(n)
    ids[rows, pos], ids[rows, pos + 1] = MARK, keys
    ids[:, -1] = MARK
    return ids, keys


def build(mode: str, seed: int) -> torch.nn.Module:
    """The same tiny Llama for every mode; ``short``/``s2`` train with grouped attention."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = tiny_llama(seed=seed, max_position_embeddings=SEQ)
    if mode != "full":
        patch_s2attn(model, RATIO, shift=mode == "s2")  # "short": no head shifted (the ablation)
    return model


def loss_fn(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    ids, keys = batch
    logits = model(ids, use_cache=False).logits[:, -1]  # (batch, vocab): the answer after the last MARK
    return F.cross_entropy(logits, keys)


@torch.no_grad()
def accuracy(model: torch.nn.Module, seed: int = 1234, n: int = EVAL_N) -> float:
    """Passkey accuracy with full attention (eval mode) on fresh sequences."""
    ids, keys = passkey_batch(n, torch.Generator().manual_seed(seed))
    model.eval()
    return (model(ids, use_cache=False).logits[:, -1].argmax(-1) == keys).float().mean().item()


def run_one(mode: str, seed: int, steps: int = STEPS) -> dict:
    """Train one model; return its loss curve ends and its full-attention accuracy."""
    torch.manual_seed(seed)
    model = build(mode, seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    batches = (passkey_batch(BATCH, gen) for _ in range(steps))
    hist = train(model, batches, loss_fn, steps=steps, lr=LR, progress=False)
    return {"mode": mode, "seed": seed, "steps": steps, "final_loss": round(sum(hist.losses[-20:]) / 20, 4),
            "accuracy_full_attention": round(accuracy(model), 4), "seconds": round(hist.seconds, 1)}


def run(seeds=SEEDS, steps: int = STEPS) -> dict:
    start = time.perf_counter()
    runs = [run_one(mode, seed, steps) for seed in seeds for mode in MODES]
    quick = [run_one(mode, 0, QUICK_STEPS) for mode in MODES]
    mean = {m: round(sum(r["accuracy_full_attention"] for r in runs if r["mode"] == m) / len(seeds), 4)
            for m in MODES}
    return {
        "task": f"passkey retrieval, seq {SEQ}, group {int(SEQ * RATIO)} (ratio {RATIO}), chance {1 / (KEYS[1] - KEYS[0]):.4f}",
        "model": "tiny_llama (hidden 64, 4 heads, 2 kv heads, 2 layers), all weights trained, AdamW",
        "steps": steps, "batch": BATCH, "lr": LR, "eval_sequences": EVAL_N,
        "runs": runs, "mean_accuracy": mean, "quick_subset": quick,
        **provenance(COMMAND, "transformers"), "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    result = run()
    write_results(RESULTS_FILE, result)
    for r in result["runs"]:
        print(f"{r['mode']:>5} seed {r['seed']}: loss {r['final_loss']:.3f}, "
              f"full-attention accuracy {r['accuracy_full_attention']:.3f}")
    print(f"mean accuracy {result['mean_accuracy']} ({result['seconds']} s) -> data/results/longlora_demo.json")


if __name__ == "__main__":
    main()
