"""The synthetic rank study behind notebook 10 section 2: the knee at the true rank, and its file."""

import json

import pytest

from lora_course.experiments import rank_synthetic as rs


def test_synthetic_task_shows_the_knee_at_its_rank():
    k = 4
    runs = {r: rs.synthetic_run(r, seed=1, task_rank=k) for r in (2, 4, 8)}
    assert runs[4]["relative_error"] < 1e-5 and runs[8]["relative_error"] < 1e-5
    # below the knee the error is what the best rank-2 matrix leaves (up to test-sample noise)
    below = runs[2]
    assert below["relative_error"] > 0.1
    assert below["relative_error"] == pytest.approx(below["eckart_young_floor"], rel=0.1)


def test_the_results_file_holds_every_run_and_reproduces_one():
    record = json.loads(rs.RESULTS_FILE.read_text(encoding="utf-8"))
    assert record["complete"] is True and record["command"] == rs.COMMAND
    assert record["settings"] == {**rs.SYNTHETIC, "seeds": list(rs.SEEDS)}
    runs = record["runs"]
    assert set(runs) == {f"synthetic/r{r}/seed{s}" for r in rs.SYNTHETIC["ranks"] for s in rs.SEEDS}
    again = rs.synthetic_run(2, seed=0)
    assert again["relative_error"] == pytest.approx(runs["synthetic/r2/seed0"]["relative_error"], abs=2e-6)
