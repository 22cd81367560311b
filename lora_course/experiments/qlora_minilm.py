"""QLoRA fine-tuning of the pretrained MiniLM on the shipped data: the runs behind notebook 05.

Three models train on the same batches, from the same LoRA factors and the same new head:

* ``lora``: LoRA in float32 (``add_lora``), the base weights in float32;
* ``qlora_ours``: every linear layer of the encoder in NF4 with double quantization
  (``add_qlora`` on the targets, ``quantize_linear_layers`` on the rest), head in float32;
* ``qlora_bnb``: the real way, ``from_pretrained(..., quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True))``, then
  ``prepare_model_for_kbit_training`` and PEFT's ``get_peft_model`` (head in ``modules_to_save``).

LoRA r=8 (alpha 16) on ``query`` and ``value``; compute dtype float32 (on a CPU bfloat16
matmuls are emulated and slower; on a GPU QLoRA uses bfloat16). ``quick`` is what notebook 05
re-runs (it must agree with this file); ``long`` is the budget a minute does not allow.

Run (about 5 minutes on an idle 2-core CPU)::

    python -m lora_course.experiments.qlora_minilm    # writes data/results/qlora_minilm_fixed_budget.json
    python -m lora_course.experiments.qlora_minilm --quick-only   # re-runs and updates the quick budget
"""

from __future__ import annotations

import datetime
import json
import warnings

import torch

from . import provenance, write_results
from ..data import DATA_DIR, label_names, load_text_classification
from ..lora import add_lora, count_parameters
from ..models import load_pretrained, minilm_classifier, minilm_path
from ..qlora import add_qlora, qlora_layers, quantize_linear_layers
from ..train import evaluate_accuracy, train_classifier

RESULTS_FILE = DATA_DIR / "results" / "qlora_minilm_fixed_budget.json"
COMMAND = "python -m lora_course.experiments.qlora_minilm"
BUDGETS = {"quick": 10, "long": 120}
METHODS = ("lora", "qlora_ours", "qlora_bnb")
SETTINGS = dict(lr=2e-3, r=8, alpha=16.0, targets=("query", "value"), batch_size=32, max_length=32, seed=0,
                blocksize=64, double_quant=True, compute_dtype="float32")
QUICK_VAL_SIZE = 320  # notebook 05 evaluates the quick runs on the first 320 validation rows


def build_bnb(num_labels: int, seed: int = 0):
    """MiniLM loaded in 4 bits by transformers + bitsandbytes, prepared and wrapped by PEFT, with
    the LoRA factors and head of :func:`build` ``("qlora_ours")`` copied in (same start)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    ours, tokenizer = build("qlora_ours", num_labels, seed)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=["classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_pretrained(minilm_path(), task="sequence-classification", num_labels=num_labels,
                                quantization_config=config, device_map="cpu")
        model.classifier.load_state_dict(ours.classifier.state_dict())
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"],
                                                 target_modules=list(SETTINGS["targets"]),
                                                 modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, layer in qlora_layers(ours).items():
            peft_layer = model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    return model, tokenizer


def build(method: str, num_labels: int, seed: int = 0):
    """The MiniLM classifier prepared for ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed values: {', '.join(METHODS)}")
    if method == "qlora_bnb":
        return build_bnb(num_labels, seed)
    model, tokenizer = minilm_classifier(num_labels, seed=seed)
    torch.manual_seed(seed)  # LoRA's A is drawn from the global generator: fix it
    if method == "lora":
        add_lora(model, list(SETTINGS["targets"]), r=SETTINGS["r"], alpha=SETTINGS["alpha"],
                 modules_to_save=["classifier"])
    else:
        add_qlora(model, list(SETTINGS["targets"]), r=SETTINGS["r"], alpha=SETTINGS["alpha"],
                  blocksize=SETTINGS["blocksize"], double_quant=SETTINGS["double_quant"],
                  modules_to_save=["classifier"])  # the new head trains whole, in float32
        quantize_linear_layers(model, skip_modules=["classifier"], blocksize=SETTINGS["blocksize"],
                               double_quant=SETTINGS["double_quant"])
    return model, tokenizer


def trainable_and_total(model) -> tuple[int, int]:
    """Our count, or PEFT's for its model (the two agree on the same configuration)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return count_parameters(model)


def run_one(method: str, steps: int, splits=None, progress: bool = True, val_rows: int | None = None) -> dict:
    """Train one method for ``steps`` steps; losses, accuracy and time per step."""
    splits = splits or load_text_classification()
    model, tokenizer = build(method, len(label_names()), seed=SETTINGS["seed"])
    history = train_classifier(
        model, tokenizer, splits["train"], steps=steps, lr=SETTINGS["lr"], batch_size=SETTINGS["batch_size"],
        max_length=SETTINGS["max_length"], seed=SETTINGS["seed"], progress=progress,
    )
    acc = lambda split: round(evaluate_accuracy(model, tokenizer, split, max_length=SETTINGS["max_length"]), 4)  # noqa: E731
    trainable, total = trainable_and_total(model)
    result = {
        "steps": steps,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "losses": [round(x, 4) for x in history.losses],
        "quick_val_accuracy": acc(splits["val"].select(range(QUICK_VAL_SIZE))),
        "seconds_per_step": round(history.seconds / steps, 3),
    }
    if val_rows is None:
        result.update(val_accuracy=acc(splits["val"]), test_accuracy=acc(splits["test"]))
    return result


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick-only", action="store_true",
                        help="re-run only the quick budget and update it in the existing results file")
    args = parser.parse_args(argv)
    splits = load_text_classification()
    if args.quick_only:
        record = json.loads(RESULTS_FILE.read_text(encoding="utf-8"))
        record["runs"]["quick"] = {m: run_one(m, BUDGETS["quick"], splits) for m in METHODS}
        record["quick_rerun"] = {"date": datetime.date.today().isoformat(), "command": f"{COMMAND} --quick-only"}
        write_results(RESULTS_FILE, record)
        print("-> data/results/qlora_minilm_fixed_budget.json (quick runs updated)")
        return
    runs = {budget: {m: run_one(m, steps, splits) for m in METHODS} for budget, steps in BUDGETS.items()}
    record = {
        "task": "stdlib_docstrings, pretrained MiniLM-L6 + new linear head",
        "settings": {**SETTINGS, "targets": list(SETTINGS["targets"]), "quick_val_size": QUICK_VAL_SIZE},
        "runs": runs,
        **provenance(COMMAND, "transformers", "peft", "bitsandbytes"),
    }
    write_results(RESULTS_FILE, record)
    for budget, by_method in runs.items():
        for method, r in by_method.items():
            print(f"{budget:>5} {method:<10} {r['steps']:>4} steps: val {r['val_accuracy']:.4f} "
                  f"test {r['test_accuracy']:.4f}, last loss {r['losses'][-1]:.4f}, {r['seconds_per_step']} s/step")
    print("-> data/results/qlora_minilm_fixed_budget.json")


if __name__ == "__main__":
    main()
