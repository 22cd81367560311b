"""Bad inputs to the converged-results code (results.py, figures.py, experiments/tuning.py,
experiments/converged.py): a ValueError naming the argument, raised before anything changes.

No training: tiny in-memory results, files under tmp_path, and ``run`` callables that raise
if they are called. The committed results files are only read (never written).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lora_course import figures as F  # noqa: E402
from lora_course import results as R  # noqa: E402
from lora_course.experiments import converged as CV  # noqa: E402
from lora_course.experiments import tuning as TU  # noqa: E402
from lora_course.experiments.tuning import Config, Suite, log_grid  # noqa: E402
from lora_course.results import Summary  # noqa: E402
from lora_course.train import Protocol, ProtocolRun  # noqa: E402

NAN, INF = float("nan"), float("inf")
METHOD = {"method": "lora"}
LRS = (1e-3, 2e-3, 4e-3)


def _run(config, lr, seed, val, test=0.7):
    return {"config": config, "lr": lr, "seed": seed, "best_val_accuracy": val, "test_accuracy": test, "steps": 100,
            "best_step": 50, "val_curve": [[50, val], [100, val - 0.01]]}


def _file():
    runs = [_run("a", lr, 0, val) for lr, val in ((1e-4, 0.6), (1e-3, 0.8), (1e-2, 0.7))]
    runs += [_run("a", 1e-3, 1, 0.79, 0.72), _run("a", 1e-3, 2, 0.81, 0.74)]
    return {"seeds": [0, 1, 2], "runs": runs}


A = Summary("a", 1e-3, 3, 0.80, 0.01, 0.8, 100.0)
B = Summary("b", 1e-3, 3, 0.70, 0.01, 0.7, 100.0)
ONE_SEED = Summary("one", 1e-3, 1, 0.10, NAN, 0.1, 100.0)  # what summarize gives for one seed
NAN_MEAN = Summary("nm", 1e-3, 3, NAN, 0.01, 0.1, 100.0)
NEG_SE = Summary("neg", 1e-3, 3, 0.5, -0.5, 0.5, 100.0)
STR_MEAN = Summary("s", 1e-3, 3, "0.5", 0.01, 0.5, 100.0)


def _never(lr, seed, protocol):
    raise AssertionError("a bad input must be refused before anything trains")


def _fake(val_of_lr, test=None):
    """A Config.run returning a plateaued ProtocolRun whose validation accuracy is val_of_lr(lr)."""
    def run(lr, seed, protocol):
        val = val_of_lr(lr)
        curve = [[s, val] for s in range(50, 400, 50)]
        t = val - 0.02 if test is None else test
        return ProtocolRun(steps=350, val_curve=curve, test_curve=[[50, t]], loss_curve=[[50, 1.0]], best_step=50,
                           best_val_accuracy=val, test_accuracy=t, stopped="plateau", seconds=0.1), {}
    return run


PROTOCOL = Protocol(max_steps=400, warmup_steps=10)


# ----------------------------------------------------------------------------- results.py


@pytest.mark.parametrize("path, match", [
    (None, "path must be"), (123, "path must be"), (["a"], "path must be"), ("DIR", "is a folder"),
])
def test_load_refuses_what_is_not_a_file_path(tmp_path, path, match):
    with pytest.raises(ValueError, match=match):
        R.load(tmp_path if path == "DIR" else path)


@pytest.mark.parametrize("text", ["5", "null", '"has protocol inside"', "[1, 2]", "true"])
def test_a_results_file_must_hold_a_json_object(tmp_path, text):
    (tmp_path / "in_progress").mkdir()
    for study in ("rank_sweep", "dora_minilm"):
        (tmp_path / f"{study}.json").write_text(text)
    calls = [lambda: R.load(tmp_path / "rank_sweep.json"), lambda: R.study_file("rank_sweep", tmp_path),
             lambda: R.read_study("dora_minilm", [], tmp_path), lambda: R.full_reference(tmp_path)]
    for call in calls:
        with pytest.raises(ValueError, match="not an object"):
            call()


MALFORMED = [
    pytest.param({}, "results has no 'runs'", id="no runs"),
    pytest.param(None, "results must be a results dict", id="None"),
    pytest.param([], "results must be a results dict", id="list"),
    pytest.param("x", "results must be a results dict", id="str"),
    pytest.param({"runs": None}, r"results\['runs'\] must be a list", id="runs None"),
    pytest.param({"runs": "abc"}, r"results\['runs'\] must be a list", id="runs str"),
    pytest.param({"runs": ["a"]}, r"results\['runs'\]\[0\] must be a run record", id="run str"),
    pytest.param({"runs": [{}]}, r"results\['runs'\]\[0\] has no 'config'", id="run without config"),
    pytest.param({"runs": [{"config": 5, "seed": 0, "lr": 1e-3}]}, "config=5", id="config not str"),
    pytest.param({"runs": [{"config": "a", "lr": 1e-3}]}, "has no 'seed'", id="run without seed"),
    pytest.param({"runs": [{"config": "a", "seed": "0", "lr": 1e-3}]}, "seed", id="seed str"),
    pytest.param({"runs": [{"config": "a", "seed": 0}]}, "has no 'lr'", id="run without lr"),
    pytest.param({"runs": [{"config": "a", "seed": 0, "lr": NAN}]}, "lr must be a finite number > 0", id="lr nan"),
]
READERS = {
    "runs_of": lambda d: R.runs_of(d, "a"),
    "summarize": lambda d: R.summarize(d, "a"),
    "configs": R.configs,
    "config_complete": lambda d: R.config_complete(d, "a"),
    "config_lines": lambda d: R.config_lines(d, "a"),
    "complete_summaries": R.complete_summaries,
    "chosen_run": lambda d: R.chosen_run(d, "a"),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("data, match", MALFORMED)
def test_malformed_results_name_what_is_missing(reader, data, match):
    before = copy.deepcopy(data)
    with pytest.raises(ValueError, match=match):
        READERS[reader](data)
    assert data == before


@pytest.mark.parametrize("reader", ["config_complete", "complete_summaries"])
@pytest.mark.parametrize("seeds", [[], "012", None, [0, -1], [0, 1.5], [True]])
def test_the_files_seeds_are_checked(reader, seeds):
    with pytest.raises(ValueError, match=r"results\['seeds'\]"):
        READERS[reader]({**_file(), "seeds": seeds})


@pytest.mark.parametrize("config", [None, 5, ["a"]])
@pytest.mark.parametrize("reader", ["runs_of", "summarize", "config_complete", "config_lines", "chosen_run"])
def test_config_must_be_a_name(reader, config):
    call = {"runs_of": R.runs_of, "summarize": R.summarize, "config_complete": R.config_complete,
            "config_lines": R.config_lines, "chosen_run": R.chosen_run}[reader]
    with pytest.raises(ValueError, match="config must be a configuration name"):
        call(_file(), config)


@pytest.mark.parametrize("grid_seed", [-1, "0", True, False, None, 1.5, 0.0, [0], NAN])
@pytest.mark.parametrize("call", [
    lambda g: R.chosen_lr(_file()["runs"], g), lambda g: R.summarize(_file(), "a", g),
    lambda g: R.config_complete(_file(), "a", g), lambda g: R.complete_summaries(_file(), g),
    lambda g: R.chosen_run(_file(), "a", grid_seed=g), lambda g: R.config_lines(_file(), "a", g),
], ids=["chosen_lr", "summarize", "config_complete", "complete_summaries", "chosen_run", "config_lines"])
def test_grid_seed_must_be_an_integer_at_least_0(call, grid_seed):
    with pytest.raises(ValueError, match="grid_seed="):
        call(grid_seed)


def test_grid_seed_accepts_a_numpy_integer_and_names_a_missing_one():
    assert R.chosen_lr(_file()["runs"], np.int64(0)) == R.chosen_lr(_file()["runs"]) == 1e-3
    with pytest.raises(ValueError, match=r"runs has no run with grid_seed=5 \(seeds present: \[0, 1, 2\]\)"):
        R.chosen_lr(_file()["runs"], 5)


@pytest.mark.parametrize("runs, match", [
    (None, "runs must be a list"), ("abc", "runs must be a list"), ([{}], r"runs\[0\] has no 'config'"),
    ([{"config": "a", "seed": 0, "lr": 1e-3}], "has no 'best_val_accuracy'"), ([], "runs has no run with grid_seed=0"),
    ([{**_run("a", 1e-3, 0, 0.8), "best_step": "x"}], "best_step"),
])
def test_chosen_lr_refuses_malformed_runs(runs, match):
    with pytest.raises(ValueError, match=match):
        R.chosen_lr(runs)


@pytest.mark.parametrize("bad", [NAN, INF, -0.1, 1.5, "0.9", None])
def test_a_bad_validation_accuracy_never_wins_the_grid(bad):
    runs = _file()["runs"]
    runs[0]["best_val_accuracy"] = bad  # lr 1e-4; NaN used to win here (max() never moves past it)
    with pytest.raises(ValueError, match=r"runs\[0\] \(the run of config='a' at lr=0.0001, seed=0\): best_val_accuracy"):
        R.chosen_lr(runs)


@pytest.mark.parametrize("key, bad", [("test_accuracy", "x"), ("test_accuracy", NAN), ("steps", None)])
def test_summarize_refuses_a_bad_recorded_value(key, bad):
    data = _file()
    data["runs"][3][key] = bad  # seed 1 at the chosen rate
    with pytest.raises(ValueError, match=f"config='a' at lr=0.001, seed=1: {key}"):
        R.summarize(data, "a")


@pytest.mark.parametrize("seed", [-1, "0", True, None, 1.0, 0.5])
def test_chosen_run_seed_must_be_an_integer(seed):
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        R.chosen_run(_file(), "a", seed=seed)


@pytest.mark.parametrize("shown", [None, 5, "lora_qv_r8", b"ab", [1, 2], ["a", None], {"a": 1}])
def test_read_study_configs_shown(shown):
    with pytest.raises(ValueError, match="configs_shown="):
        R.read_study("dora_minilm", shown)


@pytest.mark.parametrize("study", [None, 5, ["rank_sweep"], "RANK_SWEEP"])
def test_study_names(study):
    with pytest.raises(ValueError, match="study=.* is unknown"):
        R.study_file(study)


def test_probe_accuracy_names_the_folder_and_the_key(tmp_path):
    with pytest.raises(ValueError, match="results_dir=.* holds no baseline.json"):
        R.probe_accuracy("test", results_dir=tmp_path)
    (tmp_path / "baseline.json").write_text(json.dumps({"val_accuracy": 0.5}))
    with pytest.raises(ValueError, match="baseline.json has no 'test_accuracy'"):
        R.probe_accuracy("test", results_dir=tmp_path)
    assert R.probe_accuracy("val", results_dir=tmp_path) == 0.5
    for split in (["val"], None, "VAL"):
        with pytest.raises(ValueError, match="split="):
            R.probe_accuracy(split, results_dir=tmp_path)


BAD_SUMMARIES = [
    pytest.param(None, " must be a results.Summary", id="None"),
    pytest.param("a", " must be a results.Summary", id="str"),
    pytest.param({"mean": 1, "se": 0}, " must be a results.Summary", id="dict"),
    pytest.param(ONE_SEED, r"\.se must be a finite number >= 0 .*got .\.se=nan.*at least 2 seeds", id="one seed"),
    pytest.param(NAN_MEAN, r"\.mean must be a finite number", id="mean nan"),
    pytest.param(NEG_SE, r"\.se must be a finite number >= 0.*-0.5", id="se negative"),
    pytest.param(STR_MEAN, r"\.mean must be a finite number", id="mean str"),
]


@pytest.mark.parametrize("bad, match", BAD_SUMMARIES)
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("fn", [R.compare, R.verdict_line])
def test_compare_needs_two_valid_summaries(fn, side, bad, match):
    args = (bad, B) if side == "a" else (A, bad)
    with pytest.raises(ValueError, match=f"^{side}{match}"):
        fn(*args)


def test_compare_still_accepts_a_deterministic_reference():
    probe = Summary("probe", 0.0, 1, 0.6, 0.0, 0.0, 0.0)  # notebooks 08 and 10: one fit, no seed spread
    assert R.compare(A, probe)[2] == "distinguishable"
    assert R.verdict_line(A, B, z=np.float64(2.0)).startswith("a vs b: +0.1000")


@pytest.mark.parametrize("summaries, match", [
    (None, "summaries must be a non-empty mapping"), ([A, B], "summaries must be a non-empty mapping"),
    ("abc", "summaries must be a non-empty mapping"), ({}, "summaries must be a non-empty mapping"),
    ({1: None}, r"summaries\[1\] must be a results.Summary"), ({"r8": A, "r4": B}, "summaries has the key 'r8'"),
    ({True: A}, "summaries has the key True"),
    ({1: NAN_MEAN, 2: A}, r"summaries\[1\]\.mean"), ({1: A, 2: NAN_MEAN}, r"summaries\[2\]\.mean"),
    ({1: A, 2: ONE_SEED}, r"summaries\[2\]\.se.*at least 2 seeds"), ({1: STR_MEAN}, r"summaries\[1\]\.mean"),
    ({1: Summary("x", 1e-3, 3, 0.5, True, 0.5, 1.0)}, r"summaries\[1\]\.se"),
    ({1: Summary("x", 1e-3, 3, 0.5, INF, 0.5, 1.0)}, r"summaries\[1\]\.se"),
])
def test_smallest_within_one_se_refuses(summaries, match):
    with pytest.raises(ValueError, match=match):
        R.smallest_within_one_se(summaries)


def test_smallest_within_one_se_valid_inputs_unchanged():
    b = Summary("b", 1e-3, 3, 0.795, np.float32(0.01), 0.8, 100.0)
    assert R.smallest_within_one_se({8: A, 4: b}) == 4
    assert R.smallest_within_one_se({np.int64(2): A}) == 2


# ----------------------------------------------------------------------------- figures.py


def _ax_state(ax):
    return len(ax.lines), len(ax.patches), len(ax.collections), len(ax.texts)


@pytest.mark.parametrize("kwargs, match", [
    *[(dict(probe=p), "probe must be") for p in (NAN, INF, -INF, "0.5", None, [0.5], 1.5, -0.2, True, complex(1, 0))],
    *[(dict(split=s), "split=") for s in (None, "TEST", "validation", 5, ["test"], ("test",), "")],
    *[(dict(full=f), "full") for f in ("x", {"mean": 0.5}, 5, ONE_SEED, NAN_MEAN, NEG_SE)],
    (dict(full=A, split="val"), "cannot be drawn on the 'val' split"),
])
def test_draw_references_checks_everything_before_drawing(kwargs, match):
    fig, ax = plt.subplots()
    before = _ax_state(ax)
    args = {"probe": 0.5, **kwargs}
    with pytest.raises(ValueError, match=match):
        F.draw_references(ax, **args)
    assert _ax_state(ax) == before  # the probe line is not drawn when full is bad
    plt.close(fig)


@pytest.mark.parametrize("ax", [None, "ax", 5])
def test_draw_references_needs_axes(ax):
    with pytest.raises(ValueError, match="ax must be a matplotlib Axes"):
        F.draw_references(ax, 0.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(labels=None), "labels must be a mapping"), (dict(labels=5), "labels must be a mapping"),
    (dict(labels=["a"]), "labels must be a mapping"), (dict(labels="a"), "labels must be a mapping"),
    (dict(labels={"a": None}), "labels must be a mapping"), (dict(labels={}), "labels: none of"),
    (dict(results={}), "results has no 'runs'"), (dict(results=None), "results must be"),
    (dict(results={**_file(), "seeds": None}), r"results\['seeds'\]"),
    (dict(full="x"), "full must be"), (dict(full=5), "full must be"), (dict(full=ONE_SEED), "at least 2 seeds"),
    (dict(curve_seeds=["all"]), "curve_seeds="), (dict(title=5), "title must be a str"),
])
def test_plot_converged_refuses_before_making_a_figure(kwargs, match):
    args = {"results": _file(), "labels": {"a": "A"}, **kwargs}
    figures = plt.get_fignums()
    with pytest.raises(ValueError, match=match):
        F.plot_converged(**args)
    assert plt.get_fignums() == figures


# ----------------------------------------------------------------------------- tuning.py


@pytest.mark.parametrize("kwargs, match", [
    *[(dict(lr_step=s), "lr_step must be a finite number > 1") for s in (0, 1, 1.0, 0.5, -2, NAN, INF, "2", None, True)],
    *[(dict(lrs=v), "lrs") for v in (None, 5, "abc", (1e-3, 2e-3, "x"), (NAN, 1e-3, 2e-3), (1e-3, 2e-3, NAN),
                                     (-3e-3, -2e-3, -1e-3), (0, 1e-3, 2e-3), (1e-3, 2e-3, INF), (True, 2, 3),
                                     {1e-3: 0, 2e-3: 0, 3e-3: 0})],
    *[(dict(fields=f), "fields") for f in (None, "method", ["method"], {"method": None}, {"method": 5}, {"Method": "x"})],
    *[(dict(name=n), "name must be") for n in (None, 5, "", ["a"])],
    *[(dict(run=r), "run must be callable") for r in (None, 5, "run")],
])
def test_config_refuses(kwargs, match):
    args = {"name": "c", "lrs": LRS, "run": _never, "fields": dict(METHOD), **kwargs}
    with pytest.raises(ValueError, match=match):
        Config(**args)


def test_config_valid_inputs_unchanged():
    c = Config("c", [1e-3, 2e-3, 3e-3], _never, dict(METHOD), lr_step=np.float64(1.5))
    assert c.lrs == [1e-3, 2e-3, 3e-3] and c.lr_step == 1.5


def test_an_lr_step_too_small_for_3_digits_stops_instead_of_looping(tmp_path):
    config = Config("c", LRS, _fake(lambda lr: 0.5 + 10 * lr), dict(METHOD), lr_step=1.001)  # the top rate wins
    suite = Suite.open(tmp_path / "r.json", PROTOCOL, "cmd", packages=())
    with pytest.raises(ValueError, match=r"lr_step=1.001 of config 'c' extends the grid edge 0.004 to 0.004"):
        suite.run_config(config)
    assert sorted(r["lr"] for r in suite.runs) == list(LRS)  # the grid runs are kept, nothing else ran


SUITE_BAD = [
    (dict(protocol=None), "protocol must be"), (dict(protocol="p"), "protocol must be"),
    (dict(protocol=PROTOCOL.as_dict()), "protocol must be"),
    (dict(command=None), "command must be"), (dict(command=""), "command must be"),
    (dict(packages=("nonexistent_pkg_xyz",)), "packages=.* not installed: nonexistent_pkg_xyz"),
    (dict(packages="peft"), "packages must be"),
    (dict(seeds=()), "seeds must be"), (dict(seeds=5), "seeds must be"), (dict(seeds=("a",)), r"seeds\[0\]"),
    (dict(seeds=(-1,)), r"seeds\[0\]"), (dict(seeds=(0.5,)), r"seeds\[0\]"), (dict(seeds=(True,)), r"seeds\[0\]"),
    (dict(max_extensions=-1), "max_extensions"), (dict(max_extensions=1.5), "max_extensions"),
    (dict(max_extensions="2"), "max_extensions"), (dict(names="abc"), "names must be"),
    (dict(names=["a", None]), "names must be"), (dict(shared="x.json"), "shared must be"),
    (dict(shared=(5,)), "shared must be"), (dict(description=None), "description must be"),
    (dict(runs=None), r"Suite\['runs'\] must be a list"), (dict(runs=[{}]), "has no 'config'"),
    (dict(path=None), "path must be"), (dict(path=5), "path must be"), (dict(path="DIR"), "path must be"),
    (dict(fresh="no"), "fresh must be True or False"), (dict(fresh=None), "fresh must be True or False"),
    (dict(fresh=1), "fresh must be True or False"),
]


@pytest.mark.parametrize("kwargs, match", SUITE_BAD)
@pytest.mark.parametrize("how", ["open", "init"])
def test_suite_settings_are_checked_at_open(tmp_path, how, kwargs, match):
    if how == "init" and "fresh" in kwargs:
        pytest.skip("fresh is an argument of Suite.open only")
    path = tmp_path / "r.json"
    args = {"path": path, "protocol": PROTOCOL, "command": "cmd", "packages": (), **kwargs}
    if args["path"] == "DIR":
        args["path"] = tmp_path
    with pytest.raises(ValueError, match=match):
        Suite.open(**args) if how == "open" else Suite(**args)
    assert not path.exists()


@pytest.mark.parametrize("content, match", [
    ("[1]", "r.json holds a JSON list"), ("5", "not an object"), ("{not json", "not valid JSON"),
    (json.dumps({"protocol": PROTOCOL.as_dict()}), "r.json has no 'runs'"),
    (json.dumps({"protocol": PROTOCOL.as_dict(), "runs": [{"lr": 1e-3}]}), r"r.json\['runs'\]\[0\] has no 'config'"),
    (json.dumps({"protocol": {"x": 1}, "runs": []}), "another protocol"),
])
def test_suite_open_refuses_a_file_it_cannot_resume_and_leaves_it(tmp_path, content, match):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        Suite.open(path, PROTOCOL, "cmd", packages=())
    assert path.read_text() == content


@pytest.mark.parametrize("call, match", [
    (lambda s: s.run_config(None), "config must be a tuning.Config"),
    (lambda s: s.run_config("c"), "config must be a tuning.Config"),
    (lambda s: s.run_all(["c"]), "config must be a tuning.Config"),
    (lambda s: s.run_all("c"), "configs must be a list"),
    (lambda s: s.complete(None), "names must be"), (lambda s: s.complete(5), "names must be"),
    (lambda s: s.complete("abc"), "names must be"),
    (lambda s: s.save(5), "names must be"), (lambda s: s.save("c"), "names must be"),
])
def test_suite_methods_refuse_before_running_or_writing(tmp_path, call, match):
    suite = Suite.open(tmp_path / "r.json", PROTOCOL, "cmd", packages=())
    with pytest.raises(ValueError, match=match):
        call(suite)
    assert suite.runs == [] and suite.names == () and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("run, match", [
    (_fake(lambda lr: NAN), "best_val_accuracy must be a finite number"),
    (_fake(lambda lr: 0.8, test=NAN), "test_accuracy must be a finite number"),
    (_fake(lambda lr: -1.0), "best_val_accuracy must be a finite number >= 0"),
    (lambda lr, seed, protocol: None, r"returned NoneType; allowed: \(ProtocolRun, dict"),
    (lambda lr, seed, protocol: (_fake(lambda lr: 0.8)(lr, seed, protocol)[0], {"x": np.int64(3)}),
     "cannot be written as JSON"),
])
def test_a_run_that_cannot_be_recorded_leaves_the_suite_and_file_unchanged(tmp_path, run, match):
    suite = Suite.open(tmp_path / "r.json", PROTOCOL, "cmd", packages=())
    with pytest.raises(ValueError, match=match):
        suite.run_config(Config("c", LRS, run, dict(METHOD)))
    assert suite.runs == [] and suite.seconds == 0.0 and not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("args, match", [
    ((0, 1, 3), "start must be"), ((-1, 1, 3), "start must be"), ((NAN, 1e-2, 3), "start must be"),
    (("1e-3", 1e-2, 3), "start must be"), ((None, 1e-2, 3), "start must be"), (([1e-3], 1e-2, 3), "start must be"),
    ((1e-3, INF, 3), "stop must be"), ((1e-3, NAN, 3), "stop must be"), ((1e-3, None, 3), "stop must be"),
    ((0.0, INF, 3), "start must be"),
    ((1, 1, 3), "0 < start < stop"), ((2, 1, 3), "0 < start < stop"),
    *[((1e-3, 1e-2, n), "n must be an integer >= 2") for n in (1, 0, -3, 2.5, 3.0, True, "3", None)],
    ((1e-3, 1.001e-3, 10), "too close for n=10 distinct rates"),
])
def test_log_grid_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        log_grid(*args)


def test_log_grid_valid_inputs():
    assert log_grid(2.5e-4, 4e-3, 3) == (2.5e-4, 1e-3, 4e-3)
    assert log_grid(1e-5, 1e-4, np.int64(3)) == log_grid(1e-5, 1e-4, 3)
    assert log_grid(1e-300, 1e300, 3) == (1e-300, 1.0, 1e300)  # stop / start overflows: no inf rates


# ----------------------------------------------------------------------------- converged.py


@pytest.fixture
def no_training(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a bad input must be refused before anything trains or writes")

    monkeypatch.setattr(CV, "fit", boom)
    monkeypatch.setattr(CV, "minilm_mean_pooled", boom)
    monkeypatch.setattr(TU, "write_results", boom)
    monkeypatch.setattr(Suite, "run_all", boom)


@pytest.mark.parametrize("fresh", ["no", "yes", None, 1, 0, [0]])
def test_fresh_must_be_a_bool(no_training, monkeypatch, fresh):
    with pytest.raises(ValueError, match="fresh must be True or False"):
        CV.suite_for("rank_sweep", fresh)
    monkeypatch.setattr(CV, "suite_for", lambda *a, **k: pytest.fail("run_study must check fresh first"))
    with pytest.raises(ValueError, match="fresh must be True or False"):
        CV.run_study("rank_sweep", fresh=fresh)


@pytest.mark.parametrize("study", [None, "", "nope", 5, ["rank_sweep"], ("rank_sweep",), {"rank_sweep"}, "RANK_SWEEP"])
@pytest.mark.parametrize("fn", [CV.suite_for, CV.run_study, CV.summary_lines,
                                lambda s: CV.replay(s, "lora_qv_r8", 1e-3)], ids=["suite_for", "run_study",
                                                                                    "summary_lines", "replay"])
def test_study_must_be_known(no_training, fn, study):
    with pytest.raises(ValueError, match="study=.* is unknown"):
        fn(study)


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=2050), "steps=2050 must be a positive multiple of eval_every=50 and <= max_steps=2000"),
    (dict(steps=100000), "steps=100000 must be"), (dict(steps=50.0), "steps=50.0 must be"),
    (dict(steps="50"), "steps='50' must be"), (dict(steps=None), "steps=None must be"),
    (dict(config=["lora_qv_r8"]), "config=.* is not in study"), (dict(config=None), "config=None is not in study"),
    (dict(seed=np.float64(0)), "seed must be an integer"), (dict(seed=True), "seed must be an integer"),
])
def test_replay_refuses(no_training, kwargs, match):
    args = {"study": "dora_minilm", "config": "lora_qv_r8", "lr": 1e-3, "seed": 0, "steps": 50, **kwargs}
    with pytest.raises(ValueError, match=match):
        CV.replay(**args)


# ----------------------------------------------------------------------------- the files being written


def _converged_files():
    found = []
    for root in (R.RESULTS_DIR, Path("/work/exp/data/results")):
        for folder in (root, root / "in_progress"):
            for study in R.STUDY_NAMES:
                path = folder / f"{study}.json"
                if path.is_file():
                    found.append(pytest.param(path, id=f"{root.parent.parent.name}/{folder.name}/{study}"))
    return found or [pytest.param(None, id="none")]


@pytest.mark.parametrize("path", _converged_files())
def test_existing_files_read_as_before_and_stay_untouched(no_training, path):
    """Suite.open and the readers accept every converged file as it is (runs written by the
    background suites with this schema), and write nothing."""
    if path is None:
        pytest.skip("no converged file")
    before = path.read_bytes()
    suite = Suite.open(path, CV.PROTOCOL, f"{CV.COMMAND} --study {path.stem}", description=CV.DESCRIPTION)
    after = path.read_bytes()  # a background suite may replace the file meanwhile: either version
    data = next(f for f in (json.loads(before), json.loads(after)) if f["runs"] == suite.runs)
    assert suite.seconds == data.get("wall_seconds", data.get("cpu_seconds", 0.0))
    names = R.configs(data)
    done = R.complete_summaries(data)
    assert set(done) <= set(names)
    for name in names:
        assert R.config_lines(data, name)[0].startswith(f"{name}: ")
        assert R.chosen_lr(R.runs_of(data, name), data.get("grid_seed", 0)) in {r["lr"] for r in R.runs_of(data, name)}
        assert R.config_complete(data, name) == (name in done)
    assert suite.complete(names) == all(R.config_complete(data, n) for n in names)
    for s in done.values():
        if s.n > 1:
            assert math.isfinite(R.compare(s, s)[1])
