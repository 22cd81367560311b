"""The helpers notebooks use to read converged results: completeness, the chosen run, the probe, the reference lines."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from lora_course import results  # noqa: E402
from lora_course.figures import draw_references, plot_converged  # noqa: E402
from lora_course.results import (chosen_lr, chosen_run, complete_summaries, config_complete, config_lines,  # noqa: E402
                                 full_reference, probe_accuracy, read_study, summarize)


def _run(config, lr, seed, val, test):
    return {"config": config, "lr": lr, "seed": seed, "best_val_accuracy": val, "test_accuracy": test, "steps": 100,
            "best_step": 50, "val_curve": [[50, val], [100, val - 0.01]]}


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
    assert labels[0] == f"frozen encoder + trained head (probe), test: {probe:.4f}"
    assert labels[1].startswith("full fine-tuning, test: 0.7200")
    draw_references(ax, probe_accuracy("val"), split="val")
    assert ax.get_lines()[-1].get_label().startswith("frozen encoder + trained head (probe), validation: ")
    with pytest.raises(ValueError, match="split='train'"):
        draw_references(ax, probe, split="train")
    with pytest.raises(ValueError, match="cannot be drawn on the 'val' split"):
        draw_references(ax, probe, summarize(_file(), "a"), split="val")
    plt.close(fig)


def test_a_validation_tie_goes_to_the_rate_that_got_there_first():
    runs = [{**_run("c", lr, 0, 0.8, 0.7), "best_step": step} for lr, step in ((2.5e-4, 1500), (1e-3, 300), (4e-3, 150))]
    runs[2]["best_val_accuracy"] = 0.78
    assert chosen_lr(runs) == 1e-3  # same validation accuracy as 2.5e-4, reached 1200 steps earlier
    runs[1]["best_step"] = 1500
    assert chosen_lr(runs) == 2.5e-4  # a full tie: the smaller rate


def test_config_lines_say_what_is_complete_and_print_no_mean_before():
    data = _file()
    a = config_lines(data, "a")
    assert a[0] == "a: best validation accuracy by learning rate (seed 0): 0.0001 -> 0.6000, 0.001 -> 0.8000, 0.01 -> 0.7000; chosen 0.001"
    assert [line.split(":")[1].split()[1] for line in a[1:4]] == ["0.7000", "0.7200", "0.7400"]
    assert a[4] == f"   mean test accuracy 0.7200 +- {summarize(data, 'a').se:.4f} (standard error over 3 seeds)"
    b = config_lines(data, "b")
    assert len(b) == 1 and b[0].startswith("b: in progress, 4 run(s) so far") and "mean" not in b[0]
    assert config_lines(data, "c") == ["c: not run yet"]


def test_plot_converged_draws_complete_configs_only():
    data = _file()
    fig = plot_converged(data, {"a": "A", "b": "B"})
    ax1, ax2 = fig.axes
    assert [t.get_text() for t in ax2.get_xticklabels()] == ["A"]  # b is not complete: not drawn
    assert ax1.get_ylabel() == "validation accuracy (fraction of 384)" and ax2.get_ylabel() == "test accuracy (fraction of 379)"
    assert sum(line.get_label().startswith("A, lr") for line in ax1.get_lines()) == 1  # one legend entry, 3 seeds drawn
    plt.close(fig)
    with pytest.raises(ValueError, match="none of \\['b'\\] is complete"):
        plot_converged(data, {"b": "B"})
    with pytest.raises(ValueError, match="curve_seeds='some' is not allowed"):
        plot_converged(data, {"a": "A"}, curve_seeds="some")


def test_read_study_names_the_file_and_its_state(tmp_path):
    import json
    import shutil

    from lora_course.results import RESULTS_DIR

    shutil.copy(RESULTS_DIR / "baseline.json", tmp_path / "baseline.json")
    data, done, lines = read_study("dora_minilm", ["a"], results_dir=tmp_path)
    assert data["runs"] == [] and done == {} and lines == ["dora_minilm: not run yet", "a: not run yet"]
    (tmp_path / "in_progress").mkdir()
    (tmp_path / "in_progress" / "dora_minilm.json").write_text(json.dumps({**_file(), "protocol": {}, "cpu_seconds": 7200}))
    data, done, lines = read_study("dora_minilm", ["a", "b"], results_dir=tmp_path)
    assert list(done) == ["a"] and lines[0].startswith("data/results/in_progress/dora_minilm.json: 9 runs, 2.0 CPU-hours so far")
    assert lines[1].startswith("a: best validation") and lines[-1].startswith("b: in progress")
    assert full_reference(results_dir=tmp_path) is None  # no rank sweep there


def test_study_names_and_folders_are_checked(tmp_path):
    from lora_course.experiments.converged import STUDIES

    assert tuple(STUDIES) == results.STUDY_NAMES  # one list of studies: the runner's and the reader's
    with pytest.raises(ValueError, match="study='nope' is unknown; allowed values: rank_sweep"):
        results.study_file("nope")
    with pytest.raises(ValueError, match="results_dir=.* is not an existing folder"):
        results.read_study("rank_sweep", ["lora_qv_r8"], results_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="configs_shown='lora_qv_r8' is not allowed"):
        results.read_study("rank_sweep", "lora_qv_r8")
    assert results.study_file("rank_sweep", tmp_path) is None  # an empty folder: no run yet
    with pytest.raises(ValueError, match="grid_seed='0' is not allowed"):
        results.config_lines({"runs": []}, "x", grid_seed="0")
    with pytest.raises(ValueError, match="z must be a finite number > 0"):
        results.compare(summarize(_file(), "a"), summarize(_file(), "a"), z=-1)
