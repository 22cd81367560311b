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
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import check_real

RESULTS_DIR = Path(__file__).resolve().parents[1] / "data" / "results"
#: the converged studies, one results file each (``lora_course.experiments.converged`` runs them)
STUDY_NAMES = ("rank_sweep", "dora_minilm", "adalora_minilm", "qlora_minilm", "variants_zoo")
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
    """A results file as a dict; a ValueError naming the file if it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                         "re-run the experiment that writes it") from exc


def _results_folder(results_dir: str | Path | None) -> Path:
    """``results_dir`` as a Path (default :data:`RESULTS_DIR`); a ValueError if it is not a folder."""
    if results_dir is None:
        return RESULTS_DIR
    if not isinstance(results_dir, (str, Path)) or not Path(results_dir).is_dir():
        raise ValueError(f"results_dir={results_dir!r} is not an existing folder; allowed: a folder holding the "
                         f"results files, or None for {RESULTS_DIR}")
    return Path(results_dir)


def _check_grid_seed(grid_seed: Any) -> None:
    if isinstance(grid_seed, bool) or not isinstance(grid_seed, int) or grid_seed < 0:
        raise ValueError(f"grid_seed={grid_seed!r} is not allowed; allowed values: an integer >= 0 (the files use 0)")


def study_file(study: str, results_dir: str | Path | None = None) -> Path | None:
    """The converged file of ``study`` (one of :data:`STUDY_NAMES`): ``<study>.json`` once
    complete, else the one in ``in_progress/``; ``None`` before the first run (a file without
    ``"protocol"``, written by an older experiment, does not count).

    Raises:
        ValueError: ``study`` is not one of :data:`STUDY_NAMES`, or ``results_dir`` is not a folder.
    """
    if study not in STUDY_NAMES:
        raise ValueError(f"study={study!r} is unknown; allowed values: {', '.join(STUDY_NAMES)}")
    folder = _results_folder(results_dir)
    for path in (folder / f"{study}.json", folder / "in_progress" / f"{study}.json"):
        if path.exists() and "protocol" in load(path):
            return path
    return None


def runs_of(results: dict[str, Any], config: str) -> list[dict[str, Any]]:
    """Every run of ``config`` (all learning rates and seeds)."""
    runs = [r for r in results["runs"] if r["config"] == config]
    if not runs:
        names = sorted({r["config"] for r in results["runs"]})
        raise ValueError(f"config={config!r} has no run in this file; configs present: {', '.join(names)}")
    return runs


def chosen_lr(runs: list[dict[str, Any]], grid_seed: int = 0) -> float:
    """The learning rate with the best validation accuracy among the grid seed's runs.

    Validation accuracy moves in steps of one text (1/384 here), so two rates can tie; the
    tie goes to the rate that reached that accuracy in fewer steps (``best_step``), then to
    the smaller rate. The test split plays no part.
    """
    grid = [r for r in runs if r["seed"] == grid_seed]
    if not grid:
        raise ValueError(f"no run with the grid seed {grid_seed}")
    return max(grid, key=lambda r: (r["best_val_accuracy"], -r.get("best_step", 0), -r["lr"]))["lr"]


def summarize(results: dict[str, Any], config: str, grid_seed: int = 0) -> Summary:
    """Test accuracy (mean and standard error over seeds) of ``config`` at its chosen rate."""
    _check_grid_seed(grid_seed)
    runs = runs_of(results, config)
    lr = chosen_lr(runs, grid_seed)
    at = [r for r in runs if r["lr"] == lr]
    tests = [r["test_accuracy"] for r in at]
    se = statistics.stdev(tests) / math.sqrt(len(tests)) if len(tests) > 1 else float("nan")
    return Summary(config=config, lr=lr, n=len(at), mean=statistics.fmean(tests), se=se,
                   val_mean=statistics.fmean(r["best_val_accuracy"] for r in at),
                   steps_mean=statistics.fmean(r["steps"] for r in at))


def configs(results: dict[str, Any]) -> list[str]:
    """The configuration names in the file, in the order of their first run."""
    return list(dict.fromkeys(r["config"] for r in results["runs"]))


def config_complete(results: dict[str, Any], config: str, grid_seed: int = 0) -> bool:
    """Whether ``config`` has at least 3 rates on the grid seed and every seed of the file
    (``results["seeds"]``) at its chosen rate."""
    runs = [r for r in results["runs"] if r["config"] == config]
    grid = {r["lr"] for r in runs if r["seed"] == grid_seed}
    if len(grid) < 3:
        return False
    lr = chosen_lr(runs, grid_seed)
    return {r["seed"] for r in runs if r["lr"] == lr} >= set(results.get("seeds", (0, 1, 2)))


def complete_summaries(results: dict[str, Any], grid_seed: int = 0) -> dict[str, Summary]:
    """:func:`summarize` of every complete configuration of the file (see :func:`config_complete`),
    in file order; configurations still missing runs are left out."""
    return {c: summarize(results, c, grid_seed) for c in configs(results) if config_complete(results, c, grid_seed)}


def chosen_run(results: dict[str, Any], config: str, seed: int = 0, grid_seed: int = 0) -> dict[str, Any]:
    """The run of ``config`` at its chosen learning rate with ``seed``.

    Raises:
        ValueError: if that run is not in the file yet.
    """
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
    _check_grid_seed(grid_seed)
    runs = [r for r in results["runs"] if r["config"] == config]
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
    if isinstance(configs_shown, str) or not all(isinstance(c, str) for c in configs_shown):
        raise ValueError(f"configs_shown={configs_shown!r} is not allowed; allowed: a list or tuple of configuration "
                         "names, e.g. ['lora_qv_r8']")
    path = study_file(study, results_dir)
    if path is None:
        data: dict[str, Any] = {"runs": [], "seeds": [0, 1, 2]}
        lines = [f"{study}: not run yet"]
    else:
        data = load(path)
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
    trained linear head (``baseline.json``, ``python -m lora_course.experiments.baseline``)."""
    if split not in ("val", "test"):
        raise ValueError(f"split={split!r} is not allowed; allowed values: 'val', 'test'")
    folder = _results_folder(results_dir)
    return float(load(folder / "baseline.json")[f"{split}_accuracy"])


def compare(a: Summary, b: Summary, z: float = 2.0) -> tuple[float, float, str]:
    """``(a.mean - b.mean, standard error of that difference, verdict)``.

    The verdict is ``"distinguishable"`` when the difference exceeds ``z`` standard errors
    of the difference (sqrt(se_a^2 + se_b^2)), otherwise ``"not distinguishable"``.

    Raises:
        ValueError: if ``z`` is not a finite number > 0.
    """
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
        ValueError: if ``summaries`` is empty or a standard error is not a finite number >= 0
            (one seed gives no standard error: run at least 2, the protocol runs 3).
    """
    if not summaries:
        raise ValueError("summaries is empty; allowed values: a mapping rank -> Summary with at least one entry")
    bad = {k: s.se for k, s in summaries.items() if not (isinstance(s.se, (int, float)) and math.isfinite(s.se) and s.se >= 0)}
    if bad:
        raise ValueError(f"standard errors must be finite numbers >= 0, got {bad} (run at least 2 seeds)")
    best = max(summaries.values(), key=lambda s: s.mean)
    return min(k for k, s in summaries.items() if s.mean >= best.mean - best.se)
