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

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..records import provenance, write_results
from ..results import chosen_lr, config_complete, load
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
        if len(self.lrs) < 3 or sorted(self.lrs) != list(self.lrs) or len(set(self.lrs)) != len(self.lrs):
            raise ValueError(f"lrs must hold at least 3 increasing learning rates, got lrs={self.lrs!r} "
                             f"for config {self.name!r}")
        if "method" not in self.fields:
            raise ValueError(f"fields must name the method (fields['method']) for config {self.name!r}")


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

    @classmethod
    def open(cls, path: Path, protocol: Protocol, command: str, fresh: bool = False, **kwargs: Any) -> "Suite":
        """Resume ``path`` if it was written under the same protocol; otherwise start empty
        (``fresh`` always starts empty). A file under another protocol is refused, not mixed."""
        suite = cls(path=Path(path), protocol=protocol, command=command, **kwargs)
        if suite.path.exists() and not fresh:
            old = load(suite.path)
            if old.get("protocol") != protocol.as_dict():
                raise ValueError(f"{suite.path.name} was written under another protocol; "
                                 "pass fresh=True (--fresh) to start it again")
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
        run, extra = config.run(lr, seed, self.protocol)
        self.seconds += time.perf_counter() - start
        record = {"config": config.name, **config.fields, "seed": seed, "lr": lr, **run.record(), **extra,
                  "cpu_seconds": round(time.process_time() - cpu, 1), "threads": torch.get_num_threads()}
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
            lrs = [_round_lr(best / config.lr_step if best == tried[0] else best * config.lr_step)]

    def run_config(self, config: Config) -> float:
        """Run what is missing of ``config``; returns its chosen learning rate."""
        self.grid(config)
        runs = [r for r in self.runs if r["config"] == config.name]
        lr = chosen_lr(runs, GRID_SEED)
        for seed in self.seeds:
            self._run(config, lr, seed)
        return lr

    def run_all(self, configs: Sequence[Config], desc: str = "configurations") -> None:
        self.names = tuple(dict.fromkeys((*self.names, *(c.name for c in configs))))
        for config in tqdm(configs, desc=desc, mininterval=10.0):
            self.run_config(config)

    def complete(self, names: Sequence[str]) -> bool:
        """Whether every named configuration has its grid and all seeds at its chosen rate."""
        results = {"runs": self.runs, "seeds": list(self.seeds)}
        return all(config_complete(results, name, GRID_SEED) for name in names)

    def save(self, names: Sequence[str] | None = None) -> None:
        """Write the file; ``complete`` is judged over ``names`` (default: the study's configurations
        given to :meth:`run_all`, else those with runs)."""
        names = names if names is not None else (self.names or list(dict.fromkeys(r["config"] for r in self.runs)))
        record = {"task": self.description, "protocol": self.protocol.as_dict(), "seeds": list(self.seeds),
                  "grid_seed": GRID_SEED, "complete": self.complete(names), "wall_seconds": round(self.seconds, 1),
                  "cpu_seconds": round(sum(r.get("cpu_seconds", r["seconds"]) for r in self.runs), 1),
                  "runs": self.runs, **provenance(self.command, *self.packages, device=_device())}
        write_results(self.path, record)


def _round_lr(lr: float) -> float:
    """A rate rounded to 3 significant digits (the grid's keys stay readable and exact)."""
    return float(f"{lr:.3g}")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def log_grid(start: float, stop: float, n: int) -> tuple[float, ...]:
    """``n`` rates spaced evenly in log scale from ``start`` to ``stop``, 3 significant digits."""
    if n < 2 or not 0 < start < stop:
        raise ValueError(f"need n >= 2 and 0 < start < stop, got start={start!r}, stop={stop!r}, n={n!r}")
    ratio = (stop / start) ** (1 / (n - 1))
    return tuple(_round_lr(start * ratio**i) for i in range(n))

