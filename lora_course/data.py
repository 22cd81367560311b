"""The course's data: a real text-classification set and a synthetic low-rank teacher.

* :func:`load_text_classification`: the shipped ``stdlib_docstrings`` set (Python standard
  library docstrings labelled by module family, see ``data/stdlib_docstrings/DATASHEET.md``)
  in the default profile, or a Hub dataset by name (default SST-2) in the ``hub`` profile,
  both through ``datasets.load_dataset`` and both with columns ``text`` and ``label`` and
  splits ``train`` / ``val`` / ``test``.
* :func:`make_low_rank_task`: a linear teacher ``y = x (W0 + Delta)^T`` whose update
  ``Delta`` has an exact, known rank, for the rank experiments.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checks import check_int
from .config import hub_unreachable_reason, profile

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATASET_NAME = "stdlib_docstrings"
SPLITS = ("train", "val", "test")
REBUILD_COMMAND = "python data/build_stdlib_docstrings.py"
DEFAULT_HUB_DATASET = "stanfordnlp/sst2"
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_CACHE_DIR = Path(tempfile.gettempdir()) / "lora_course_datasets"  # never inside the repo


@contextlib.contextmanager
def _quiet_datasets():
    """Silence ``datasets``' progress bars and logs (they print machine paths)."""
    import datasets
    from datasets.utils import logging as ds_logging

    verbosity, bars = ds_logging.get_verbosity(), datasets.is_progress_bar_enabled()
    ds_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def shipped_files() -> dict[str, Path]:
    """Paths of the shipped CSVs, one per split.

    Raises:
        FileNotFoundError: a file is missing; the message gives the command that rebuilds it.
    """
    files = {split: DATA_DIR / DATASET_NAME / f"{split}.csv" for split in SPLITS}
    for split, path in files.items():
        if not path.is_file():
            raise FileNotFoundError(
                f"the data file {DATA_DIR.name}/{DATASET_NAME}/{split}.csv is missing; "
                f"rebuild it from the repository root with: {REBUILD_COMMAND}"
            )
    return files


def label_names(dataset: Any = None) -> tuple[str, ...]:
    """Class names indexed by label id.

    ``None``: the shipped set's names, read from ``train.csv``. A ``Dataset`` or
    ``DatasetDict``: the names of its ``label`` feature (e.g. SST-2's), else of its
    ``label_name`` column, else the label ids as strings.
    """
    if dataset is None:
        return _shipped_label_names(shipped_files()["train"])
    part = next(iter(dataset.values())) if hasattr(dataset, "values") else dataset
    names = getattr(part.features["label"], "names", None)
    if names:
        return tuple(names)
    if "label_name" in part.column_names:
        pairs = dict(zip(part["label"], part["label_name"]))
        return tuple(pairs[i] for i in sorted(pairs))
    return tuple(str(i) for i in sorted(set(part["label"])))


@functools.lru_cache(maxsize=4)
def _shipped_label_names(train_csv: Path) -> tuple[str, ...]:
    with open(train_csv, newline="", encoding="utf-8") as f:
        names = {int(row["label"]): row["label_name"] for row in csv.DictReader(f)}
    return tuple(names[i] for i in range(len(names)))


def __getattr__(name: str) -> Any:
    # LABEL_NAMES is read from the data on first use, so importing this module never fails.
    if name == "LABEL_NAMES":
        return label_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_split(split: str | None) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"split={split!r} is not available; allowed values: None, {', '.join(SPLITS)}")


def load_text_classification(name: str | os.PathLike | None = None, split: str | None = None):
    """Load a text-classification set with columns ``text`` and ``label``.

    Args:
        name: ``None`` for the profile's default (the shipped ``stdlib_docstrings`` CSVs
            offline, ``DEFAULT_HUB_DATASET`` in the ``hub`` profile), or a name for
            ``datasets.load_dataset`` (a Hub id or a local directory of data files).
        split: ``None`` for a ``DatasetDict`` with ``train`` / ``val`` / ``test``, or one
            of those names for a single ``Dataset``.

    Raises:
        ValueError: unknown ``split``.
        FileNotFoundError: a shipped file is missing (the message says how to rebuild it).
        ConnectionError: a named dataset cannot be loaded (offline, unknown name, bad files).
    """
    _check_split(split)
    if name is None and profile() == "offline":
        data = _load_shipped()
    else:
        data = _load_named(str(name or DEFAULT_HUB_DATASET))
    return data if split is None else data[split]


def _load_shipped():
    from datasets import load_dataset

    files = {split: str(path) for split, path in shipped_files().items()}
    with _quiet_datasets():
        return load_dataset("csv", data_files=files, cache_dir=str(_CACHE_DIR), keep_in_memory=True)


def _load_named(name: str, seed: int = 0):
    """``load_dataset(name)``, then standard columns and a train / val / test split."""
    from datasets import load_dataset

    local = Path(name).expanduser().is_dir()  # local files cache in the temp dir, Hub data in HF's cache
    if not local and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        unreachable = hub_unreachable_reason()  # one request: datasets would retry for ~45 s
        if unreachable is not None:
            raise ConnectionError(
                f"could not load the dataset {name!r}: it is not a local directory and the Hub "
                f"cannot be reached ({unreachable}); connect to the network, or pass a local "
                "directory of data files"
            )
    try:
        with _quiet_datasets():
            raw = load_dataset(name, cache_dir=str(_CACHE_DIR) if local else None)
    except Exception as exc:  # datasets raises many types; give one clear message, no retries
        if local:
            hint = "the directory holds no readable data files"
        elif os.environ.get("HF_DATASETS_OFFLINE") == "1":
            hint = "not a local directory, and the offline profile forbids the network"
        else:
            hint = "unknown name, no network, or no access"
        raise ConnectionError(
            f"could not load the dataset {name!r} with datasets.load_dataset ({hint}). "
            f"Pass a Hub id or a local directory of data files. ({type(exc).__name__})"
        ) from None
    return _make_splits(_standard_columns(raw, name), seed)


def _standard_columns(raw, name: str):
    """Rename the text column to ``text`` and keep only ``text`` and ``label``."""
    columns = next(iter(raw.values())).column_names
    text = next((c for c in TEXT_COLUMNS if c in columns), None)
    if text is None or "label" not in columns:
        raise ValueError(
            f"dataset {name!r} has columns {columns}; expected a text column (one of "
            f"{', '.join(TEXT_COLUMNS)}) and a 'label' column"
        )
    raw = raw.select_columns([text, "label"])
    return raw.rename_column(text, "text") if text != "text" else raw


def _make_splits(raw, seed: int):
    """Map split names to train / val / test; build missing ones from ``train``, seeded.

    A test split without labels (GLUE's hidden test sets use -1) is dropped; then the
    original validation split becomes ``test`` and ``val`` is carved out of ``train``.
    """
    from datasets import DatasetDict

    parts = {_SPLIT_ALIASES.get(k, k): v for k, v in raw.items()}
    if "train" not in parts:
        raise ValueError(f"the dataset has no 'train' split (splits: {', '.join(raw)})")
    if "test" in parts and min(parts["test"]["label"]) < 0:
        del parts["test"]
    if "test" not in parts and "val" in parts:
        parts["test"] = parts.pop("val")
    train = parts["train"]
    for missing in [s for s in ("test", "val") if s not in parts]:
        size = len(parts["test"]) if "test" in parts else max(1, len(train) // 10)
        cut = train.train_test_split(test_size=size, seed=seed, shuffle=True)
        train, parts[missing] = cut["train"], cut["test"]
    return DatasetDict(train=train, val=parts["val"], test=parts["test"])


@dataclass
class LowRankTask:
    """A linear regression teacher ``y = x @ (W0 + delta).T (+ noise)`` with ``rank(delta) = rank``.

    ``W0`` is the frozen base weight (d_out x d_in); a LoRA adapter of rank r on top of
    it can recover ``delta`` exactly when r >= rank.
    """

    W0: torch.Tensor  # (d_out, d_in)
    delta: torch.Tensor  # (d_out, d_in), rank `rank`
    x_train: torch.Tensor  # (n_train, d_in)
    y_train: torch.Tensor  # (n_train, d_out)
    x_test: torch.Tensor  # (n_test, d_in)
    y_test: torch.Tensor  # (n_test, d_out)
    rank: int

    @property
    def singular_values(self) -> torch.Tensor:
        """Singular values of ``delta`` (descending); only the first ``rank`` are non-zero."""
        return torch.linalg.svdvals(self.delta)


def make_low_rank_task(
    d_in: int = 64,
    d_out: int = 64,
    rank: int = 4,
    n_train: int = 2048,
    n_test: int = 512,
    noise: float = 0.0,
    seed: int = 0,
) -> LowRankTask:
    """A synthetic task whose true weight update ``delta = U @ V`` has exactly ``rank``.

    ``W0``, ``delta`` and the inputs (``x ~ N(0, 1)``) are drawn from a generator seeded
    with ``seed`` (the global RNG is untouched); targets get Gaussian noise of std ``noise``.
    ``W0`` and ``delta`` have entries of variance ``1/d_in``, so both parts matter equally.
    """
    for arg, value in dict(d_in=d_in, d_out=d_out, rank=rank, n_train=n_train, n_test=n_test).items():
        check_int(arg, value, low=1)
    check_int("seed", seed, low=0)
    if rank > min(d_in, d_out):
        raise ValueError(f"rank must be between 1 and min(d_in, d_out) = {min(d_in, d_out)}, got {rank}")
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise < float("inf"):
        raise ValueError(f"noise must be a finite float >= 0, got {noise!r}")

    gen = torch.Generator().manual_seed(seed)
    W0 = torch.randn(d_out, d_in, generator=gen) / d_in**0.5
    U = torch.randn(d_out, rank, generator=gen)  # (d_out, rank)
    V = torch.randn(rank, d_in, generator=gen) / (rank * d_in) ** 0.5  # (rank, d_in)
    delta = U @ V
    found = int(torch.linalg.matrix_rank(delta))
    if found != rank:  # practically impossible for Gaussian factors; never return a wrong task
        raise RuntimeError(f"drew an update of rank {found} instead of {rank}; try another seed")

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d_in, generator=gen)
        y = x @ (W0 + delta).T + noise * torch.randn(n, d_out, generator=gen)
        return x, y

    (x_train, y_train), (x_test, y_test) = sample(n_train), sample(n_test)
    return LowRankTask(W0, delta, x_train, y_train, x_test, y_test, rank)
