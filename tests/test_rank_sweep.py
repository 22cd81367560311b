"""The rank-sweep experiment behind notebook 10: scalings, the run plan, the synthetic knee, the file."""

import json
import math

import pytest
from torch import nn

from lora_course import LoRALinear, count_parameters
from lora_course.experiments import rank_sweep as rs


@pytest.mark.parametrize("mode", rs.SCALING_MODES)
def test_scaling_modes_meet_at_the_reference_rank_and_match_lora_linear(mode):
    assert rs.scaling_of(mode, rs.REFERENCE_RANK) == pytest.approx(rs.REFERENCE_SCALING, rel=1e-12)
    for r in (1, 4, 64):
        alpha, use_rslora = rs.alpha_for(mode, r)
        layer = LoRALinear(nn.Linear(16, 16), r=min(r, 16), alpha=alpha, use_rslora=use_rslora)
        expected = alpha / (math.sqrt(layer.r) if use_rslora else layer.r)
        assert layer.scaling == pytest.approx(expected, rel=1e-12)
    if mode == "alpha_2r":
        assert rs.scaling_of(mode, 1) == rs.scaling_of(mode, 64)
    elif mode == "alpha_fixed":
        assert rs.scaling_of(mode, 1) / rs.scaling_of(mode, 64) == pytest.approx(64)
    else:
        assert rs.scaling_of(mode, 1) / rs.scaling_of(mode, 64) == pytest.approx(8)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="mode='alpha'"):
        rs.alpha_for("alpha", 8)
    with pytest.raises(ValueError, match="method='adapter'"):
        rs.build("adapter", 0)
    with pytest.raises(ValueError, match="targets='mlp'"):
        rs.build("lora", 0, targets="mlp")
    with pytest.raises(ValueError, match="no run stored"):
        rs.summarize({}, "lora/qv/r8/alpha_2r")


def test_plan_covers_every_study_once():
    keys = [rs.run_key(**spec) for spec in rs.planned_runs()]
    assert len(keys) == len(set(keys))
    for seed in rs.SEEDS:
        for r in rs.RANKS:
            for targets in ("qv", "all_linear"):
                assert f"lora/{targets}/r{r}/alpha_2r/seed{seed}" in keys
        for mode in rs.SCALING_MODES[1:]:
            assert all(f"lora/qv/r{r}/{mode}/seed{seed}" in keys for r in rs.SCALING_RANKS)
        for targets, r in rs.PLACEMENT.items():
            assert f"lora/{targets}/r{r}/alpha_2r/seed{seed}" in keys
        assert {f"full/seed{seed}", f"head_only/seed{seed}"} <= set(keys)


def test_placement_budgets_are_nearly_equal_on_minilm_shapes():
    """q/v: 384 -> 384; the MLP: 384 -> 1536 -> 384. Budgets within 15% of q+v at r=8."""
    per_rank = {"q": 768, "v": 768, "qv": 1536, "qkvo": 3072, "all_linear": 4 * 768 + 2 * (384 + 1536)}
    budgets = {t: per_rank[t] * r for t, r in rs.PLACEMENT.items()}
    reference = budgets["qv"]
    assert all(abs(b / reference - 1) <= 0.15 for b in budgets.values()), budgets


def test_synthetic_task_shows_the_knee_at_its_rank():
    k = 4
    runs = {r: rs.synthetic_run(r, seed=1, task_rank=k) for r in (2, 4, 8)}
    assert runs[4]["relative_error"] < 1e-5 and runs[8]["relative_error"] < 1e-5
    # below the knee the error is what the best rank-2 matrix leaves (up to test-sample noise)
    below = runs[2]
    assert below["relative_error"] > 0.1
    assert below["relative_error"] == pytest.approx(below["eckart_young_floor"], rel=0.1)


def test_the_results_file_holds_every_planned_run_with_consistent_counts():
    if not rs.RESULTS_FILE.exists():
        pytest.skip("data/results/rank_sweep.json not written yet: python -m lora_course.experiments.rank_sweep")
    record = json.loads(rs.RESULTS_FILE.read_text(encoding="utf-8"))
    assert record["complete"] is True and record["command"] == rs.COMMAND
    assert record["settings"]["steps"] == rs.SETTINGS["steps"]
    runs = record["runs"]
    assert {rs.run_key(**spec) for spec in rs.planned_runs()} <= set(runs)
    assert all(0.0 <= runs[rs.run_key(**spec)]["test_accuracy"] <= 1.0 for spec in rs.planned_runs())
    # trainable parameters: LoRA's r (in + out) per adapted layer, plus the whole head
    model, _ = rs.build("lora", 0, "qv", 4)
    assert runs["lora/qv/r4/alpha_2r/seed0"]["trainable_parameters"] == count_parameters(model)[0]
    head = runs["head_only/seed0"]["trainable_parameters"]
    for r in rs.RANKS:
        assert runs[f"lora/qv/r{r}/alpha_2r/seed0"]["trainable_parameters"] == head + 6 * 2 * r * (384 + 384)
    for r in rs.SYNTHETIC["ranks"]:
        assert all(f"synthetic/r{r}/seed{s}" in runs for s in rs.SEEDS)


def test_summarize_reports_mean_and_sample_spread():
    runs = {f"x/seed{s}": {"test_accuracy": v} for s, v in zip(rs.SEEDS, (0.5, 0.6, 0.7))}
    s = rs.summarize(runs, "x")
    assert s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.5, 0.7, 3)
