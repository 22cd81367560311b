"""Learning rate chosen on validation, then seeds at the chosen rate: how every converged
comparison runs its configurations, resumably.

For each configuration: every rate of its grid is trained once (the grid seed) under the one
protocol (:func:`lora_course.train.fit`); if the best validation accuracy sits at an end of
the grid, the grid is extended one step beyond that end (up to ``max_extensions`` times), so
the chosen rate is never a guess at the edge; then the other seeds run at the chosen rate.
Every finished run is written to the results file at once, and a run already in the file is
never run again, so a suite can be stopped and resumed over several sittings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..checks import check_bool, check_int, check_real
from ..records import provenance, write_results
from ..results import check_results, chosen_lr, config_complete, load
from ..train import Protocol, ProtocolRun

SEEDS = (0, 1, 2)
GRID_SEED = 0


@dataclass(frozen=True)
class Config:
    """One configuration of a comparison.

    ``run(lr, seed, protocol)`` trains it once and returns the :class:`ProtocolRun` plus any
    extra fields to record (trainable parameters, seconds per step...). ``fields`` name the
    configuration in every record (``method``, ``r``, ``targets``, ``alpha``...).
    """

    name: str
    lrs: tuple[float, ...]
    run: Callable[[float, int, Protocol], tuple[ProtocolRun, dict[str, Any]]]
    fields: dict[str, Any] = field(default_factory=dict)
    lr_step: float = 2.0  # ratio between neighbouring rates when the grid is extended

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty str (the configuration's name), got name={self.name!r}")
        if not isinstance(self.lrs, (tuple, list)):
            raise ValueError(f"lrs must be a tuple of at least 3 increasing learning rates, got lrs={self.lrs!r} "
                             f"for config {self.name!r}")
        for i, lr in enumerate(self.lrs):
            check_real(f"lrs[{i}]", lr, low=0, low_open=True, what=f"a learning rate of config {self.name!r}")
        if len(self.lrs) < 3 or sorted(self.lrs) != list(self.lrs) or len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"lrs must hold at least 3 increasing learning rates, got lrs={self.lrs!r} "
                             f"for config {self.name!r}")
        if not callable(self.run):
            raise ValueError(f"run must be callable as run(lr, seed, protocol), got run={self.run!r} "
                             f"for config {self.name!r}")
        if not isinstance(self.fields, Mapping):
            raise ValueError(f"fields must be a dict naming the configuration (with fields['method']), got "
                             f"fields={self.fields!r} for config {self.name!r}")
        if "method" not in self.fields:
            raise ValueError(f"fields must name the method (fields['method']) for config {self.name!r}")
        if not isinstance(self.fields["method"], str) or not self.fields["method"]:
            raise ValueError("fields['method'] must be a non-empty str, got "
                             f"fields['method']={self.fields['method']!r} for config {self.name!r}")
        check_real("lr_step", self.lr_step, low=1, low_open=True,
                   what=f"the ratio between neighbouring rates of config {self.name!r}")


def _key(record: dict[str, Any]) -> tuple[str, float, int]:
    return record["config"], float(record["lr"]), int(record["seed"])


@dataclass
class Suite:
    """A results file being filled: ``run_config`` adds what is missing of one configuration."""

    path: Path
    protocol: Protocol
    command: str
    packages: tuple[str, ...] = ("transformers", "peft")
    seeds: tuple[int, ...] = SEEDS
    max_extensions: int = 2
    description: str = ""
    shared: tuple[Path, ...] = ()  # other studies' files whose identical runs are copied, not re-run
    names: tuple[str, ...] = ()  # every configuration of the study: the file is complete when all are
    runs: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        """Every setting is checked here, before anything runs (not at :meth:`save`, after a run
        has trained)."""
        if not isinstance(self.path, (str, os.PathLike)) or Path(self.path).is_dir():
            raise ValueError("path must be the path of a results file (a str or Path, not a folder), "
                             f"got path={self.path!r}")
        self.path = Path(self.path)
        if not isinstance(self.protocol, Protocol):
            raise ValueError(f"protocol must be a lora_course.train.Protocol, got protocol={self.protocol!r}")
        if not isinstance(self.command, str) or not self.command:
            raise ValueError("command must be a non-empty str (the command that writes the file), "
                             f"got command={self.command!r}")
        _check_names("packages", self.packages)
        missing = [name for name in self.packages if importlib.util.find_spec(name) is None]
        if missing:
            raise ValueError(f"packages={self.packages!r} names packages that are not installed: {', '.join(missing)}; "
                             "allowed: installed packages whose versions the file records")
        if isinstance(self.seeds, (str, bytes)) or not isinstance(self.seeds, (tuple, list)) or not self.seeds:
            raise ValueError(f"seeds must be a non-empty tuple of seeds (integers >= 0), got seeds={self.seeds!r}")
        self.seeds = tuple(check_int(f"seeds[{i}]", seed, low=0) for i, seed in enumerate(self.seeds))
        self.max_extensions = check_int("max_extensions", self.max_extensions, low=0)
        if not isinstance(self.description, str):
            raise ValueError(f"description must be a str, got description={self.description!r}")
        if isinstance(self.shared, (str, bytes)) or not isinstance(self.shared, (tuple, list)) or \
                not all(isinstance(p, (str, os.PathLike)) for p in self.shared):
            raise ValueError(f"shared must be a tuple of results-file paths, got shared={self.shared!r}")
        _check_names("names", self.names)
        check_results({"runs": self.runs}, "Suite")
        check_real("seconds", self.seconds, low=0)

    @classmethod
    def open(cls, path: Path, protocol: Protocol, command: str, fresh: bool = False, **kwargs: Any) -> "Suite":
        """Resume ``path`` if it was written under the same protocol; otherwise start empty
        (``fresh`` always starts empty). A file under another protocol is refused, not mixed.

        Raises:
            ValueError: a bad setting (see the fields), ``fresh`` not True or False, or a file at
                ``path`` that is not a results file under ``protocol``.
        """
        check_bool("fresh", fresh)
        suite = cls(path=path, protocol=protocol, command=command, **kwargs)
        if suite.path.exists() and not fresh:
            old = load(suite.path)
            if old.get("protocol") != protocol.as_dict():
                raise ValueError(f"{suite.path.name} was written under another protocol; "
                                 "pass fresh=True (--fresh) to start it again")
            check_results(old, suite.path.name)
            suite.runs, suite.seconds = old["runs"], old.get("wall_seconds", old.get("cpu_seconds", 0.0))
        return suite

    def done(self) -> set[tuple[str, float, int]]:
        return {_key(r) for r in self.runs}

    def _shared_run(self, config: Config, lr: float, seed: int) -> dict[str, Any] | None:
        """The same run (same configuration fields, rate, seed and protocol) in a shared file."""
        for path in self.shared:
            if not Path(path).exists():
                continue
            other = load(path)
            if other.get("protocol") != self.protocol.as_dict():
                continue
            for record in other["runs"]:
                same = all(record.get(k) == v for k, v in config.fields.items())
                if same and _key(record) == (config.name, float(lr), seed) and "copied_from" not in record:
                    return {**record, "copied_from": Path(path).name}
        return None

    def _run(self, config: Config, lr: float, seed: int) -> dict[str, Any]:
        if (config.name, float(lr), seed) in self.done():
            return next(r for r in self.runs if _key(r) == (config.name, float(lr), seed))
        copied = self._shared_run(config, lr, seed)
        if copied is not None:
            self.runs.append(copied)
            self.save()
            return copied
        start, cpu = time.perf_counter(), time.process_time()
        result = config.run(lr, seed, self.protocol)
        seconds = time.perf_counter() - start
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], ProtocolRun)
                and isinstance(result[1], dict)):
            raise ValueError(f"config {config.name!r}: run(lr={lr!r}, seed={seed!r}, protocol) returned "
                             f"{type(result).__name__}; allowed: (ProtocolRun, dict of extra fields)")
        run, extra = result
        record = {"config": config.name, **config.fields, "seed": seed, "lr": lr, **run.record(), **extra,
                  "cpu_seconds": round(time.process_time() - cpu, 1), "threads": torch.get_num_threads()}
        for key in ("best_val_accuracy", "test_accuracy"):  # checked before the run joins the file
            try:
                check_real(key, record[key], 0, 1, what="an accuracy")
            except ValueError as exc:
                raise ValueError(f"config {config.name!r}: run(lr={lr!r}, seed={seed!r}, protocol) returned a run "
                                 f"that cannot be recorded: {exc}") from None
        try:
            json.dumps(record)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config {config.name!r}: the record of lr={lr!r}, seed={seed!r} cannot be written as "
                             f"JSON ({exc}); allowed: plain Python values in run's extra fields") from None
        self.seconds += seconds
        self.runs.append(record)
        self.save()
        return record

    def grid(self, config: Config) -> list[float]:
        """The rates tried on the grid seed: the configured ones, extended one step past an end
        that won, at most ``max_extensions`` times (counting extensions made in earlier sittings)."""
        lrs = list(config.lrs)
        while True:
            for lr in lrs:
                self._run(config, lr, GRID_SEED)
            runs = [r for r in self.runs if r["config"] == config.name and r["seed"] == GRID_SEED]
            best = chosen_lr(runs, GRID_SEED)
            tried = sorted({float(r["lr"]) for r in runs})
            extensions = len([lr for lr in tried if lr not in config.lrs])
            if extensions >= self.max_extensions or tried[0] < best < tried[-1]:
                return tried
            new = _round_lr(best / config.lr_step if best == tried[0] else best * config.lr_step)
            if not (math.isfinite(new) and new > 0) or new in tried:  # else the same rate again: no end
                raise ValueError(f"lr_step={config.lr_step!r} of config {config.name!r} extends the grid edge "
                                 f"{best!r} to {new!r} (3 significant digits), which is not a new positive rate; "
                                 "allowed: a ratio that gives a new rate, e.g. 2.0")
            lrs = [new]

    def run_config(self, config: Config) -> float:
        """Run what is missing of ``config``; returns its chosen learning rate."""
        _check_config(config)
        self.grid(config)
        runs = [r for r in self.runs if r["config"] == config.name]
        lr = chosen_lr(runs, GRID_SEED)
        for seed in self.seeds:
            self._run(config, lr, seed)
        return lr

    def run_all(self, configs: Sequence[Config], desc: str = "configurations") -> None:
        if isinstance(configs, (str, bytes)) or not isinstance(configs, Sequence):
            raise ValueError(f"configs must be a list of Config, got configs={configs!r}")
        for config in configs:
            _check_config(config)
        self.names = tuple(dict.fromkeys((*self.names, *(c.name for c in configs))))
        for config in tqdm(configs, desc=desc, mininterval=10.0):
            self.run_config(config)

    def complete(self, names: Sequence[str]) -> bool:
        """Whether every named configuration has its grid and all seeds at its chosen rate."""
        _check_names("names", names)
        results = {"runs": self.runs, "seeds": list(self.seeds)}
        return all(config_complete(results, name, GRID_SEED) for name in names)

    def save(self, names: Sequence[str] | None = None) -> None:
        """Write the file; ``complete`` is judged over ``names`` (default: the study's configurations
        given to :meth:`run_all`, else those with runs)."""
        if names is not None:
            _check_names("names", names)
        names = names if names is not None else (self.names or list(dict.fromkeys(r["config"] for r in self.runs)))
        record = {"task": self.description, "protocol": self.protocol.as_dict(), "seeds": list(self.seeds),
                  "grid_seed": GRID_SEED, "complete": self.complete(names), "wall_seconds": round(self.seconds, 1),
                  "cpu_seconds": round(sum(r.get("cpu_seconds", r["seconds"]) for r in self.runs), 1),
                  "runs": self.runs, **provenance(self.command, *self.packages, device=_device())}
        write_results(self.path, record)


def _check_names(name: str, value: Any) -> None:
    """``value`` must be a tuple or list of str (one string would be read letter by letter)."""
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a tuple or list of str, got {name}={value!r}")


def _check_config(config: Any) -> None:
    if not isinstance(config, Config):
        raise ValueError(f"config must be a tuning.Config, got config={config!r}")


def _round_lr(lr: float) -> float:
    """A rate rounded to 3 significant digits (the grid's keys stay readable and exact)."""
    return float(f"{lr:.3g}")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def log_grid(start: float, stop: float, n: int) -> tuple[float, ...]:
    """``n`` rates spaced evenly in log scale from ``start`` to ``stop``, 3 significant digits.

    Raises:
        ValueError: ``start`` or ``stop`` is not a finite number > 0, ``start >= stop``, ``n`` is
            not an integer >= 2, or the ``n`` rates are not distinct at 3 significant digits.
    """
    check_real("start", start, low=0, low_open=True, what="the smallest learning rate")
    check_real("stop", stop, low=0, low_open=True, what="the largest learning rate")
    n = check_int("n", n, low=2)
    if not start < stop:
        raise ValueError(f"need 0 < start < stop, got start={start!r}, stop={stop!r}, n={n!r}")
    ratio = (stop / start) ** (1 / (n - 1))
    rates = tuple(_round_lr(start * ratio**i) for i in range(n))
    if not all(math.isfinite(r) for r in rates):  # stop / start overflows: the same spacing in logs
        step = (math.log(stop) - math.log(start)) / (n - 1)
        rates = tuple(_round_lr(math.exp(math.log(start) + i * step)) for i in range(n))
    if any(b <= a for a, b in zip(rates, rates[1:])) or not all(0 < r < math.inf for r in rates):
        raise ValueError(f"start={start!r} and stop={stop!r} are too close for n={n!r} distinct rates at 3 "
                         f"significant digits (got {rates}); allowed: a wider range or a smaller n")
    return rates

