"""The helpers notebooks use to read converged results: completeness, the chosen run, the probe, the reference lines."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lora_course.figures import draw_references  # noqa: E402
from lora_course.results import (chosen_lr, chosen_run, complete_summaries, config_complete, probe_accuracy,  # noqa: E402
                                 summarize)


def _run(config, lr, seed, val, test):
    return {"config": config, "lr": lr, "seed": seed, "best_val_accuracy": val, "test_accuracy": test, "steps": 100}


def _file():
    runs = [_run("a", lr, 0, val, 0.7) for lr, val in ((1e-4, 0.6), (1e-3, 0.8), (1e-2, 0.7))]
    runs += [_run("a", 1e-3, 1, 0.79, 0.72), _run("a", 1e-3, 2, 0.81, 0.74)]
    runs += [_run("b", lr, 0, 0.5, 0.5) for lr in (1e-4, 1e-3, 1e-2)] + [_run("b", 1e-4, 1, 0.5, 0.5)]
    return {"seeds": [0, 1, 2], "runs": runs}


def test_complete_means_three_rates_and_every_seed_at_the_chosen_one():
    data = _file()
    assert config_complete(data, "a") and not config_complete(data, "b")  # b lacks seed 2
    assert list(complete_summaries(data)) == ["a"]
    assert summarize(data, "a").n == 3 and summarize(data, "a").lr == 1e-3
    assert chosen_run(data, "a", seed=2)["test_accuracy"] == 0.74
    with pytest.raises(ValueError, match="seed=2"):
        chosen_run(data, "b", seed=2)


def test_probe_and_reference_lines():
    probe = probe_accuracy()
    assert probe_accuracy("val") != probe and 0.5 < probe_accuracy("val") < 1.0
    with pytest.raises(ValueError, match="split=.train."):
        probe_accuracy("train")
    assert 0.5 < probe < 1.0
    fig, ax = plt.subplots()
    draw_references(ax, probe, summarize(_file(), "a"))
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[0].startswith("frozen encoder") and labels[1].startswith("full fine-tuning: 0.7200")
    plt.close(fig)


def test_a_validation_tie_goes_to_the_rate_that_got_there_first():
    runs = [{**_run("c", lr, 0, 0.8, 0.7), "best_step": step} for lr, step in ((2.5e-4, 1500), (1e-3, 300), (4e-3, 150))]
    runs[2]["best_val_accuracy"] = 0.78
    assert chosen_lr(runs) == 1e-3  # same validation accuracy as 2.5e-4, reached 1200 steps earlier
    runs[1]["best_step"] = 1500
    assert chosen_lr(runs) == 2.5e-4  # a full tie: the smaller rate
