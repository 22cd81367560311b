"""The variants zoo experiment behind notebook 11: its set-up and its results file."""

import json

import pytest
import torch

from lora_course.experiments import variants_zoo as vz
from lora_course.models import minilm_classifier


def test_unknown_variant_and_missing_runs_name_the_problem():
    with pytest.raises(ValueError, match="variant='qlora'"):
        vz.prepare("qlora", torch.nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match="no run stored"):
        vz.summarize({}, "lora")


@pytest.mark.parametrize("variant", ["lorafa", "vera"])
def test_prepare_trains_what_the_variant_trains(variant):
    model, _ = minilm_classifier(6, seed=0)
    factory = vz.prepare(variant, model, seed=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(n.startswith("classifier") for n in trainable)
    if variant == "vera":
        assert {n.rsplit(".", 1)[-1] for n in trainable if not n.startswith("classifier")} == {"vera_lambda_d", "vera_lambda_b"}
    else:
        factory([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
        assert not any("lora_A" in n for n in (n for n, p in model.named_parameters() if p.requires_grad))


def test_the_results_file_is_complete_and_consistent():
    record = json.loads(vz.RESULTS_FILE.read_text(encoding="utf-8"))
    assert record["complete"] and record["command"] == vz.COMMAND
    assert set(record["runs"]) == {f"{v}/seed{s}" for v in vz.VARIANTS for s in vz.SEEDS}
    counts = {v: {record["runs"][f"{v}/seed{s}"]["trainable_parameters"] for s in vz.SEEDS} for v in vz.VARIANTS}
    assert all(len(c) == 1 for v, c in counts.items() if v != "lora_drop")  # lora_drop keeps layers per seed
    lora, fa = counts["lora"].pop(), counts["lorafa"].pop()
    head = 384 * 6 + 6
    assert lora - head == 6 * 2 * 8 * (384 + 384) and fa - head == 6 * 2 * 8 * 384  # LoRA-FA: only B trains
    assert all(0 <= r["test_accuracy"] <= 1 and r["peak_bytes"] > 0 for r in record["runs"].values())
