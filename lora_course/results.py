"""Reading the converged-comparison results files and comparing configurations.

Every accuracy comparison of the course is a results file under ``data/results/`` with a
``"protocol"`` (the settings of :class:`~lora_course.train.Protocol`) and ``"runs"``: one
record per training run, each with ``config`` (the configuration's name), ``method``,
``seed``, ``lr``, ``steps``, ``val_curve`` (``[[step, val_accuracy], ...]``),
``best_val_accuracy``, ``test_accuracy`` (at the best-validation step) and the fields that
name the configuration (``r``, ``targets``, ``alpha``...). A configuration's learning rate
is chosen on validation from its grid (one seed); its accuracy is the mean over the seeds
run at that rate, with the standard error of that mean.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import reprlib
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import check_int, check_real

RESULTS_DIR = Path(__file__).resolve().parents[1] / "data" / "results"
#: the converged studies, one results file each (``lora_course.experiments.converged`` runs them)
STUDY_NAMES = ("rank_sweep", "dora_minilm", "adalora_minilm", "qlora_minilm", "variants_zoo")
_ACCURACY = "a recorded accuracy, never NaN"
RUN_FIELDS = ("config", "method", "seed", "lr", "steps", "val_curve", "best_val_accuracy", "test_accuracy")


@dataclass(frozen=True)
class Summary:
    """One configuration at its chosen learning rate: test accuracy over seeds."""

    config: str
    lr: float
    n: int
    mean: float
    se: float  # standard error of the mean (sample std / sqrt(n))
    val_mean: float
    steps_mean: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} +- {self.se:.4f} (n={self.n}, lr={self.lr:g})"


def load(path: str | Path) -> dict[str, Any]:
    """A results file as a dict.

    Raises:
        ValueError: ``path`` is not a path (a str or Path), is a folder, or the file is not valid
            JSON or holds JSON that is not an object.
        FileNotFoundError: no file at ``path``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be the path of a results file (a str or Path), got path={reprlib.repr(path)}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a folder; allowed: the path of a results file (a .json file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                         "re-run the experiment that writes it") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} holds a JSON {type(data).__name__} ({reprlib.repr(data)}), not an object; "
                         "allowed: a results file (a JSON object); re-run the experiment that writes it")
    return data


def _results_folder(results_dir: str | Path | None) -> Path:
    """``results_dir`` as a Path (default :data:`RESULTS_DIR`); a ValueError if it is not a folder."""
    if results_dir is None:
        return RESULTS_DIR
    if not isinstance(results_dir, (str, Path)) or not Path(results_dir).is_dir():
        raise ValueError(f"results_dir={results_dir!r} is not an existing folder; allowed: a folder holding the "
                         f"results files, or None for {RESULTS_DIR}")
    return Path(results_dir)


def _check_grid_seed(grid_seed: Any) -> int:
    if isinstance(grid_seed, bool) or not isinstance(grid_seed, numbers.Integral) or grid_seed < 0:
        raise ValueError(f"grid_seed={grid_seed!r} is not allowed; allowed values: an integer >= 0 (the files use 0)")
    return int(grid_seed)


def _check_config(config: Any) -> str:
    if not isinstance(config, str):
        raise ValueError(f"config must be a configuration name (a str, e.g. 'lora_qv_r8'), got config={config!r}")
    return config


def _which(run: Mapping[str, Any]) -> str:
    return f"the run of config={run.get('config')!r} at lr={run.get('lr')!r}, seed={run.get('seed')!r}"


def _run_number(run: Mapping[str, Any], key: str, low: float, high: float | None = None, low_open: bool = False,
                what: str = "", where: str = "") -> float:
    """``run[key]`` checked to be a finite number in range; the message names the run (and
    ``where`` it is, e.g. ``runs[2]``)."""
    which = f"{where} ({_which(run)})" if where else _which(run)
    if key not in run:
        raise ValueError(f"{which} has no {key!r}; a run record holds {', '.join(RUN_FIELDS)}")
    try:
        return check_real(key, run[key], low, high, low_open=low_open, what=what)
    except ValueError as exc:
        raise ValueError(f"{which}: {exc}") from None


def _check_run(run: Any, where: str) -> Mapping[str, Any]:
    """A run record: a dict naming its ``config`` (a str), with a ``seed`` (integer >= 0) and an
    ``lr`` (a finite number > 0)."""
    if not isinstance(run, Mapping):
        raise ValueError(f"{where} must be a run record (a dict with {', '.join(RUN_FIELDS)}), "
                         f"got {where}={reprlib.repr(run)}")
    if not isinstance(run.get("config"), str):
        got = f"config={run['config']!r}" if "config" in run else "no 'config'"
        raise ValueError(f"{where} has {got}; allowed: a run record naming its configuration (a str) in 'config'")
    if "seed" not in run:
        raise ValueError(f"{where} ({_which(run)}) has no 'seed'; a run record holds {', '.join(RUN_FIELDS)}")
    try:
        check_int("seed", run["seed"], low=0)
    except ValueError as exc:
        raise ValueError(f"{where} ({_which(run)}): {exc}") from None
    _run_number(run, "lr", 0.0, low_open=True, where=where)
    return run


def _check_runs(runs: Any, name: str) -> list[Mapping[str, Any]]:
    if isinstance(runs, (str, bytes)) or not isinstance(runs, (list, tuple)):
        raise ValueError(f"{name} must be a list of run records (dicts with {', '.join(RUN_FIELDS)}), "
                         f"got {name}={reprlib.repr(runs)}")
    return [_check_run(run, f"{name}[{i}]") for i, run in enumerate(runs)]


def check_results(results: Any, name: str = "results") -> list[Mapping[str, Any]]:
    """The runs of ``results`` (a results file as :func:`load` returns it), checked: a dict whose
    ``"runs"`` is a list of run records, each naming its ``config`` with a ``seed`` and an ``lr``.

    Raises:
        ValueError: naming ``name`` and what is missing or malformed.
    """
    if not isinstance(results, Mapping):
        raise ValueError(f"{name} must be a results dict (a file as results.load returns it, with a 'runs' list), "
                         f"got {name}={reprlib.repr(results)}")
    if "runs" not in results:
        raise ValueError(f"{name} has no 'runs' (keys: {', '.join(map(str, results)) or 'none'}); allowed: a results "
                         "dict with a 'runs' list of run records")
    return _check_runs(results["runs"], f"{name}['runs']")


def seeds_of(results: Mapping[str, Any]) -> list[int]:
    """The seeds every configuration of ``results`` runs at its chosen rate: ``results["seeds"]``
    (0, 1, 2 where the file names none).

    Raises:
        ValueError: ``results["seeds"]`` is not a non-empty list of integers >= 0.
    """
    seeds = results.get("seeds", (0, 1, 2))
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"results['seeds'] must be a non-empty list of seeds (integers >= 0), got "
                         f"results['seeds']={reprlib.repr(seeds)}")
    return [check_int(f"results['seeds'][{i}]", seed, low=0) for i, seed in enumerate(seeds)]


def check_summary(name: str, summary: Any) -> Summary:
    """``summary`` must be a :class:`Summary` with a finite mean and a standard error that is a
    finite number >= 0 (:func:`summarize` gives NaN for one seed: a comparison needs at least 2)."""
    if not isinstance(summary, Summary):
        raise ValueError(f"{name} must be a results.Summary (see results.summarize), "
                         f"got {name}={reprlib.repr(summary)}")
    check_real(f"{name}.mean", summary.mean, what="a mean accuracy")
    try:
        check_real(f"{name}.se", summary.se, low=0, what="the standard error of the mean")
    except ValueError as exc:
        nan = isinstance(summary.se, numbers.Real) and math.isnan(summary.se)
        raise ValueError(f"{exc}, for config {summary.config!r} (n={summary.n!r})"
                         + ("; a comparison needs at least 2 seeds (summarize gives NaN for one seed)" if nan else "")
                         ) from None
    return summary


def check_study(study: Any) -> str:
    """``study`` must be one of :data:`STUDY_NAMES`; a ``ValueError`` listing them otherwise."""
    if not isinstance(study, str) or study not in STUDY_NAMES:
        raise ValueError(f"study={study!r} is unknown; allowed values: {', '.join(STUDY_NAMES)}")
    return study


def study_file(study: str, results_dir: str | Path | None = None) -> Path | None:
    """The converged file of ``study`` (one of :data:`STUDY_NAMES`): ``<study>.json`` once
    complete, else the one in ``in_progress/``; ``None`` before the first run (a file without
    ``"protocol"``, written by an older experiment, does not count).

    Raises:
        ValueError: ``study`` is not one of :data:`STUDY_NAMES`, or ``results_dir`` is not a folder.
    """
    check_study(study)
    folder = _results_folder(results_dir)
    for path in (folder / f"{study}.json", folder / "in_progress" / f"{study}.json"):
        if path.exists() and "protocol" in load(path):
            return path
    return None


def runs_of(results: dict[str, Any], config: str) -> list[dict[str, Any]]:
    """Every run of ``config`` (all learning rates and seeds)."""
    _check_config(config)
    every = check_results(results)
    runs = [r for r in every if r["config"] == config]
    if not runs:
        names = sorted({r["config"] for r in every})
        raise ValueError(f"config={config!r} has no run in this file; configs present: {', '.join(names)}")
    return runs


def chosen_lr(runs: list[dict[str, Any]], grid_seed: int = 0) -> float:
    """The learning rate with the best validation accuracy among the grid seed's runs.

    Validation accuracy moves in steps of one text (1/384 here), so two rates can tie; the
    tie goes to the rate that reached that accuracy in fewer steps (``best_step``), then to
    the smaller rate. The test split plays no part.

    Raises:
        ValueError: ``runs`` is not a list of run records, ``grid_seed`` is not an integer >= 0,
            no run has the grid seed, or a grid run's ``best_val_accuracy`` is not a number in
            [0, 1] (NaN: the message names the run's config and lr).
    """
    grid_seed = _check_grid_seed(grid_seed)
    at = [i for i, r in enumerate(_check_runs(runs, "runs")) if r["seed"] == grid_seed]
    if not at:
        seeds = sorted({r["seed"] for r in runs})
        raise ValueError(f"runs has no run with grid_seed={grid_seed!r} (seeds present: {seeds or 'none'}); allowed: "
                         "the seed the grid of learning rates ran on (the files use 0)")
    for i in at:
        _run_number(runs[i], "best_val_accuracy", 0.0, 1.0, what=_ACCURACY, where=f"runs[{i}]")
        if "best_step" in runs[i]:
            try:
                check_int("best_step", runs[i]["best_step"], low=0)
            except ValueError as exc:
                raise ValueError(f"runs[{i}] ({_which(runs[i])}): {exc}") from None
    grid = [runs[i] for i in at]
    return max(grid, key=lambda r: (r["best_val_accuracy"], -r.get("best_step", 0), -r["lr"]))["lr"]


def summarize(results: dict[str, Any], config: str, grid_seed: int = 0) -> Summary:
    """Test accuracy (mean and standard error over seeds) of ``config`` at its chosen rate."""
    grid_seed = _check_grid_seed(grid_seed)
    runs = runs_of(results, config)
    lr = chosen_lr(runs, grid_seed)
    at = [r for r in runs if r["lr"] == lr]
    for r in at:
        _run_number(r, "test_accuracy", 0.0, 1.0, what=_ACCURACY)
        _run_number(r, "best_val_accuracy", 0.0, 1.0, what=_ACCURACY)
        _run_number(r, "steps", 0.0)
    tests = [r["test_accuracy"] for r in at]
    se = statistics.stdev(tests) / math.sqrt(len(tests)) if len(tests) > 1 else float("nan")
    return Summary(config=config, lr=lr, n=len(at), mean=statistics.fmean(tests), se=se,
                   val_mean=statistics.fmean(r["best_val_accuracy"] for r in at),
                   steps_mean=statistics.fmean(r["steps"] for r in at))


def configs(results: dict[str, Any]) -> list[str]:
    """The configuration names in the file, in the order of their first run."""
    return list(dict.fromkeys(r["config"] for r in check_results(results)))


def config_complete(results: dict[str, Any], config: str, grid_seed: int = 0) -> bool:
    """Whether ``config`` has at least 3 rates on the grid seed and every seed of the file
    (``results["seeds"]``) at its chosen rate."""
    grid_seed = _check_grid_seed(grid_seed)
    _check_config(config)
    runs = [r for r in check_results(results) if r["config"] == config]
    seeds = seeds_of(results)
    grid = {r["lr"] for r in runs if r["seed"] == grid_seed}
    if len(grid) < 3:
        return False
    lr = chosen_lr(runs, grid_seed)
    return {r["seed"] for r in runs if r["lr"] == lr} >= set(seeds)


def complete_summaries(results: dict[str, Any], grid_seed: int = 0) -> dict[str, Summary]:
    """:func:`summarize` of every complete configuration of the file (see :func:`config_complete`),
    in file order; configurations still missing runs are left out."""
    grid_seed = _check_grid_seed(grid_seed)
    check_results(results)
    seeds_of(results)
    return {c: summarize(results, c, grid_seed) for c in configs(results) if config_complete(results, c, grid_seed)}


def chosen_run(results: dict[str, Any], config: str, seed: int = 0, grid_seed: int = 0) -> dict[str, Any]:
    """The run of ``config`` at its chosen learning rate with ``seed``.

    Raises:
        ValueError: if that run is not in the file yet, or ``seed`` / ``grid_seed`` is not an
            integer >= 0.
    """
    seed = check_int("seed", seed, low=0)
    grid_seed = _check_grid_seed(grid_seed)
    runs = runs_of(results, config)
    lr = chosen_lr(runs, grid_seed)
    for r in runs:
        if r["lr"] == lr and r["seed"] == seed:
            return r
    raise ValueError(f"config={config!r} has no run with seed={seed} at its chosen lr {lr:g} yet")


def config_lines(results: dict[str, Any], config: str, grid_seed: int = 0) -> list[str]:
    """What a notebook prints about one configuration: the best validation accuracy at each rate
    of its grid (grid seed), the chosen rate, each seed's test accuracy at its best validation
    step, and the mean +- standard error; for a configuration still missing runs, what it has
    so far and that it is not complete (no mean is printed for it)."""
    grid_seed = _check_grid_seed(grid_seed)
    _check_config(config)
    runs = [r for r in check_results(results) if r["config"] == config]
    if not runs:
        return [f"{config}: not run yet"]
    grid = sorted((r for r in runs if r["seed"] == grid_seed), key=lambda r: r["lr"])
    rates = ", ".join(f"{r['lr']:g} -> {r['best_val_accuracy']:.4f}" for r in grid)
    if not config_complete(results, config, grid_seed):
        return [f"{config}: in progress, {len(runs)} run(s) so far; best validation accuracy by learning rate "
                f"(seed {grid_seed}): {rates or 'none yet'}"]
    s = summarize(results, config, grid_seed)
    lines = [f"{config}: best validation accuracy by learning rate (seed {grid_seed}): {rates}; chosen {s.lr:g}"]
    for r in sorted((r for r in runs if r["lr"] == s.lr), key=lambda r: r["seed"]):
        lines.append(f"   seed {r['seed']}: test {r['test_accuracy']:.4f} at step {r['best_step']} "
                     f"(stopped at {r['steps']})")
    lines.append(f"   mean test accuracy {s.mean:.4f} +- {s.se:.4f} (standard error over {s.n} seeds)")
    return lines


def read_study(study: str, configs_shown: list[str] | tuple[str, ...],
               results_dir: str | Path | None = None) -> tuple[dict[str, Any], dict[str, Summary], list[str]]:
    """A converged study as a notebook shows it: ``(file, complete summaries, lines to print)``.

    The lines name the file (complete, or still in ``in_progress/``), its runs and CPU-hours,
    then :func:`config_lines` for each of ``configs_shown``. Before the study's first run the
    file is an empty one (no runs) and the lines say so.
    """
    if not isinstance(configs_shown, (list, tuple)) or not all(isinstance(c, str) for c in configs_shown):
        raise ValueError(f"configs_shown={configs_shown!r} is not allowed; allowed: a list or tuple of configuration "
                         "names, e.g. ['lora_qv_r8']")
    path = study_file(study, results_dir)
    if path is None:
        data: dict[str, Any] = {"runs": [], "seeds": [0, 1, 2]}
        lines = [f"{study}: not run yet"]
    else:
        data = load(path)
        check_results(data, path.name)
        where = "data/results" if path.parent.name != "in_progress" else "data/results/in_progress"
        n = len(data["runs"])
        lines = [f"{where}/{path.name}: {n} run{'' if n == 1 else 's'}, {data.get('cpu_seconds', 0) / 3600:.1f} CPU-hours"
                 f"{'' if data.get('complete') else ' so far'} ({data.get('device', '?')}, "
                 f"{data.get('threads', '?')} thread per run)"]
    for name in configs_shown:
        lines += config_lines(data, name)
    return data, complete_summaries(data), lines


def full_reference(results_dir: str | Path | None = None) -> Summary | None:
    """Full fine-tuning at convergence (the rank sweep's ``full``), or None until it is complete."""
    path = study_file("rank_sweep", results_dir)
    return complete_summaries(load(path)).get("full") if path else None


def probe_accuracy(split: str = "test", results_dir: str | Path | None = None) -> float:
    """Accuracy on ``split`` ("val" or "test") of the frozen MiniLM's mean-pooled features with a
    trained linear head (``baseline.json``, ``python -m lora_course.experiments.baseline``).

    Raises:
        ValueError: ``split`` is not "val" or "test", ``results_dir`` is not a folder holding
            ``baseline.json``, or the file has no accuracy in [0, 1] for ``split``.
        FileNotFoundError: the shipped ``baseline.json`` is missing (``results_dir=None``).
    """
    if not isinstance(split, str) or split not in ("val", "test"):
        raise ValueError(f"split={split!r} is not allowed; allowed values: 'val', 'test'")
    folder = _results_folder(results_dir)
    path = folder / "baseline.json"
    if not path.is_file():
        if results_dir is None:
            raise FileNotFoundError(f"{path} is missing; python -m lora_course.experiments.baseline writes it")
        raise ValueError(f"results_dir={results_dir!r} holds no baseline.json; allowed: a folder holding baseline.json "
                         f"(python -m lora_course.experiments.baseline writes it), or None for {RESULTS_DIR}")
    data = load(path)
    key = f"{split}_accuracy"
    if key not in data:
        raise ValueError(f"{path.name} has no {key!r} (keys: {', '.join(data) or 'none'}); "
                         "re-run python -m lora_course.experiments.baseline")
    try:
        return check_real(key, data[key], 0.0, 1.0, what=f"an accuracy, in {path.name}")
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None


def compare(a: Summary, b: Summary, z: float = 2.0) -> tuple[float, float, str]:
    """``(a.mean - b.mean, standard error of that difference, verdict)``.

    The verdict is ``"distinguishable"`` when the difference exceeds ``z`` standard errors
    of the difference (sqrt(se_a^2 + se_b^2)), otherwise ``"not distinguishable"``.

    Raises:
        ValueError: if ``a`` or ``b`` is not a :class:`Summary` with a finite mean and a finite
            standard error >= 0 (one seed gives NaN: a comparison needs at least 2 seeds), or
            ``z`` is not a finite number > 0.
    """
    check_summary("a", a)
    check_summary("b", b)
    check_real("z", z, low=0, low_open=True, what="standard errors a difference must exceed")
    diff = a.mean - b.mean
    se = math.sqrt(a.se**2 + b.se**2)
    return diff, se, "distinguishable" if abs(diff) > z * se else "not distinguishable"


def verdict_line(a: Summary, b: Summary, z: float = 2.0) -> str:
    """One printed line: ``a vs b: +0.0123 +- 0.0100 -> not distinguishable``."""
    diff, se, verdict = compare(a, b, z)
    return f"{a.config} vs {b.config}: {diff:+.4f} +- {se:.4f} -> {verdict}"


def smallest_within_one_se(summaries: Mapping[int, Summary]) -> int:
    """The one-standard-error rule: the smallest key (a rank) whose mean accuracy is at least
    the best mean minus the best configuration's standard error.

    Args:
        summaries: rank -> :class:`Summary` (higher ``mean`` is better).

    Raises:
        ValueError: if ``summaries`` is not a non-empty mapping from integer ranks to
            :class:`Summary`, a mean is not finite, or a standard error is not a finite number
            >= 0 (one seed gives no standard error: run at least 2, the protocol runs 3).
    """
    if not isinstance(summaries, Mapping) or not summaries:
        raise ValueError("summaries must be a non-empty mapping rank -> Summary, "
                         f"got summaries={reprlib.repr(summaries)}")
    for k, s in summaries.items():
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise ValueError(f"summaries has the key {k!r}; allowed keys: ranks (integers), e.g. {{8: Summary(...)}}")
        check_summary(f"summaries[{k!r}]", s)
    best = max(summaries.values(), key=lambda s: s.mean)
    return min(k for k, s in summaries.items() if s.mean >= best.mean - best.se)
