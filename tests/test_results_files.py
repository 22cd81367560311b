"""The converged-comparison results files, as committed: schema, convergence judged from the
curves, the chosen learning rate is the best on validation, 3 seeds at it.

Complete files live in data/results/<study>.json; a study still accumulating runs lives in
data/results/in_progress/<study>.json, where every run already in must pass the per-run checks.
"""

import json
from pathlib import Path

import pytest

from lora_course.experiments.converged import PROTOCOL, STUDIES
from lora_course.results import RUN_FIELDS, chosen_lr, configs, summarize
from lora_course.train import plateaued

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results"


def _files():
    found = []
    for study in STUDIES:
        for folder, complete in ((RESULTS / "in_progress", False), (RESULTS, True)):
            path = folder / f"{study}.json"
            if path.exists():
                data = json.loads(path.read_text())
                if "protocol" in data:  # files of the earlier, unconverged format have none
                    found.append(pytest.param(path, complete, id=f"{folder.name}/{study}"))
    return found or [pytest.param(None, False, id="none-yet")]


@pytest.mark.parametrize("path, complete", _files())
def test_every_run_follows_the_schema_and_converged(path, complete):
    if path is None:
        pytest.skip("no converged results file committed yet")
    data = json.loads(path.read_text())
    assert data["protocol"] == PROTOCOL.as_dict()
    patience = data["protocol"]["patience"]
    for run in data["runs"]:
        name = f"{run.get('config')} lr={run.get('lr')} seed={run.get('seed')}"
        assert set(RUN_FIELDS) <= set(run), name
        curve = run["val_curve"]
        assert len(curve) >= 6, name
        assert [s for s, _ in curve] == sorted(s for s, _ in curve), name
        assert run["best_val_accuracy"] == max(a for _, a in curve), name
        best_step = next(s for s, a in curve if a == run["best_val_accuracy"])  # the earliest maximum
        assert run["test_accuracy"] == dict(map(tuple, run["test_curve"]))[best_step], name
        assert plateaued(curve, patience), f"{name}: the validation curve has not plateaued"
        assert run["steps"] == curve[-1][0] < data["protocol"]["max_steps"], name
        if "r" in run:
            assert isinstance(run["r"], int) and run["r"] >= 1, name


@pytest.mark.parametrize("path, complete", _files())
def test_each_configuration_chose_its_rate_on_validation_and_has_three_seeds(path, complete):
    if path is None or not complete:
        pytest.skip("no complete converged results file yet")
    data = json.loads(path.read_text())
    assert data["complete"]
    for config in configs(data):
        runs = [r for r in data["runs"] if r["config"] == config]
        grid = [r for r in runs if r["seed"] == data["grid_seed"]]
        assert len({r["lr"] for r in grid}) >= 3, config
        best = max(r["best_val_accuracy"] for r in grid)
        lr = chosen_lr(runs, data["grid_seed"])
        assert next(r for r in grid if r["lr"] == lr)["best_val_accuracy"] == best, config
        assert {r["seed"] for r in runs if r["lr"] == lr} >= set(data["seeds"]) and len(data["seeds"]) >= 3, config
        summary = summarize(data, config)
        assert 0.0 <= summary.mean <= 1.0 and summary.n >= 3
