"""Tests for lora_course.data and the shipped stdlib_docstrings set."""

from __future__ import annotations

import csv
import platform
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch

import lora_course.data as data
from lora_course.data import load_text_classification, make_low_rank_task
from lora_course.experiments import baseline

BUILD_SCRIPT = data.DATA_DIR / "build_stdlib_docstrings.py"
SHIPPED = data.DATA_DIR / data.DATASET_NAME


@pytest.fixture(scope="module")
def shipped():
    return load_text_classification()


# ----- the shipped set -----------------------------------------------------------------


def test_sizes_columns_and_classes(shipped):
    assert list(shipped) == ["train", "val", "test"]
    sizes = {split: len(shipped[split]) for split in shipped}
    assert sum(sizes.values()) >= 2000
    assert sizes["train"] > 4 * sizes["val"] and sizes["val"] >= 200 and sizes["test"] >= 200
    for split in shipped.values():
        assert split.column_names == ["text", "label", "label_name", "source"]
    labels = set(shipped["train"]["label"])
    assert len(labels) >= 4 and labels == set(range(len(labels)))
    assert set(shipped["val"]["label"]) == labels == set(shipped["test"]["label"])


def test_label_names_match_the_data(shipped):
    names = data.LABEL_NAMES
    assert len(names) == len(set(shipped["train"]["label"]))
    for split in shipped.values():
        for label, name in zip(split["label"], split["label_name"]):
            assert names[label] == name


def test_texts_are_unique_across_splits(shipped):
    texts = [t.lower() for split in shipped.values() for t in split["text"]]
    assert len(texts) == len(set(texts))


def test_classes_are_balanced_and_texts_in_range(shipped):
    counts = Counter(shipped["train"]["label"])
    assert max(counts.values()) / min(counts.values()) < 1.5
    lengths = [len(t.split()) for t in shipped["train"]["text"]]
    assert 6 <= min(lengths) and max(lengths) <= 60


def test_datasheet_balance_table_matches_files(shipped):
    sheet = (SHIPPED / "DATASHEET.md").read_text(encoding="utf-8")
    for label, name in enumerate(data.LABEL_NAMES):
        row = re.search(rf"^\| {label} \| {re.escape(name)} \| (\d+) \| (\d+) \| (\d+) \|", sheet, re.M)
        assert row, f"no balance row for {name}"
        expected = [Counter(shipped[s]["label"])[label] for s in ("train", "val", "test")]
        assert [int(g) for g in row.groups()] == expected


def _datasheet_python() -> str:
    sheet = (SHIPPED / "DATASHEET.md").read_text(encoding="utf-8")
    return re.search(r"\*\*Python ([0-9.]+)\*\*", sheet).group(1)


def test_rebuild_is_byte_identical(tmp_path):
    built_with = _datasheet_python()
    if built_with != platform.python_version():
        pytest.skip(f"shipped data was built with Python {built_with}; this is {platform.python_version()}")
    subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out-dir", str(tmp_path)], check=True, capture_output=True)
    for name in ("train.csv", "val.csv", "test.csv", "DATASHEET.md"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


# ----- loading errors ------------------------------------------------------------------


def test_missing_file_names_the_rebuild_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_DIR", tmp_path / "data")
    with pytest.raises(FileNotFoundError) as info:
        load_text_classification()
    message = str(info.value)
    assert "python data/build_stdlib_docstrings.py" in message
    assert "stdlib_docstrings/train.csv" in message and str(tmp_path) not in message


def test_bad_split_lists_allowed_values():
    with pytest.raises(ValueError, match=r"split='validation'.*train, val, test"):
        load_text_classification(split="validation")


def test_one_split_is_a_dataset(shipped):
    val = load_text_classification(split="val")
    assert len(val) == len(shipped["val"]) and val["text"][:5] == shipped["val"]["text"][:5]


# ----- the named (hub-profile) path, exercised with local files -------------------------


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def glue_like(tmp_path):
    """An SST-2-shaped local dataset: `sentence` column, hidden test labels (-1)."""
    root = tmp_path / "glue_like"
    root.mkdir()
    _write_csv(root / "train.csv", ["idx", "sentence", "label"], [(i, f"train sentence {i}", i % 2) for i in range(100)])
    _write_csv(root / "validation.csv", ["idx", "sentence", "label"], [(i, f"dev sentence {i}", i % 2) for i in range(12)])
    _write_csv(root / "test.csv", ["idx", "sentence", "label"], [(i, f"test sentence {i}", -1) for i in range(12)])
    return root


def test_named_dataset_gets_standard_columns_and_splits(glue_like):
    ds = load_text_classification(str(glue_like))
    assert list(ds) == ["train", "val", "test"]
    assert all(split.column_names == ["text", "label"] for split in ds.values())
    # hidden-label test split dropped; the original validation split is the test split
    assert sorted(ds["test"]["text"]) == sorted(f"dev sentence {i}" for i in range(12))
    # val carved out of train, same size as test, disjoint, and the same on every load
    assert len(ds["val"]) == 12 and len(ds["train"]) == 88
    assert not set(ds["val"]["text"]) & set(ds["train"]["text"])
    assert load_text_classification(str(glue_like), split="val")["text"] == ds["val"]["text"]


def test_hub_profile_loads_by_name_through_the_same_function(glue_like, monkeypatch):
    monkeypatch.setenv("LORA_COURSE_PROFILE", "hub")
    monkeypatch.setattr(data, "DEFAULT_HUB_DATASET", str(glue_like))
    assert load_text_classification(split="test").column_names == ["text", "label"]


def test_label_names_of_a_dataset(glue_like, shipped):
    from datasets import ClassLabel, Dataset, Features, Value

    assert data.label_names(shipped) == data.LABEL_NAMES  # from the label_name column
    assert data.label_names(load_text_classification(str(glue_like))) == ("0", "1")  # ids only
    features = Features({"text": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    sst2_like = Dataset.from_dict({"text": ["bad", "good"], "label": [0, 1]}, features=features)
    assert data.label_names(sst2_like) == ("negative", "positive")


def test_unloadable_name_raises_one_clear_error(tmp_path):
    empty = tmp_path / "no_data_here"
    empty.mkdir()
    with pytest.raises(ConnectionError, match="could not load the dataset .*no_data_here"):
        load_text_classification(str(empty))


def test_named_dataset_without_text_column(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    _write_csv(root / "train.csv", ["words", "label"], [("a b", 0), ("c d", 1)])
    with pytest.raises(ValueError, match="expected a text column"):
        load_text_classification(str(root))


# ----- the low-rank teacher ------------------------------------------------------------


@pytest.mark.parametrize("d_in, d_out, rank", [(64, 64, 1), (64, 64, 4), (32, 48, 16), (20, 12, 12)])
def test_low_rank_task_has_exactly_the_rank_asked(d_in, d_out, rank):
    task = make_low_rank_task(d_in=d_in, d_out=d_out, rank=rank, n_train=16, n_test=8)
    assert task.delta.shape == task.W0.shape == (d_out, d_in)
    assert int(torch.linalg.matrix_rank(task.delta)) == rank == task.rank
    s = task.singular_values
    assert int((s > 1e-4 * s[0]).sum()) == rank
    assert int(torch.linalg.matrix_rank(task.W0)) == min(d_in, d_out)  # the base is full rank


def test_low_rank_targets_and_seeding():
    task = make_low_rank_task(n_train=32, n_test=8)
    assert task.x_train.shape == (32, 64) and task.y_test.shape == (8, 64)
    torch.testing.assert_close(task.y_train, task.x_train @ (task.W0 + task.delta).T)
    same, other = make_low_rank_task(n_train=32, n_test=8), make_low_rank_task(n_train=32, n_test=8, seed=1)
    assert torch.equal(same.delta, task.delta) and torch.equal(same.x_train, task.x_train)
    assert not torch.equal(other.delta, task.delta)
    noisy = make_low_rank_task(n_train=32, n_test=8, noise=0.5)
    residual = noisy.y_train - noisy.x_train @ (noisy.W0 + noisy.delta).T
    assert 0.3 < float(residual.std()) < 0.7


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(rank=0), "rank"),
        (dict(rank=65), "rank"),
        (dict(rank=True), "rank"),
        (dict(d_in=0), "d_in"),
        (dict(d_out=2.0), "d_out"),
        (dict(n_train=0), "n_train"),
        (dict(n_test=-3), "n_test"),
        (dict(noise=-0.1), "noise"),
        (dict(noise=float("nan")), "noise"),
        (dict(seed=-1), "seed"),
    ],
)
def test_low_rank_task_validates_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"{argument} must be .*got ({argument}=)?{re.escape(repr(next(iter(kwargs.values()))))}"):
        make_low_rank_task(**kwargs)


# ----- the frozen-MiniLM baseline ------------------------------------------------------


def test_embed_texts_ignores_padding():
    from lora_course.models import minilm

    model, tokenizer = minilm()
    short, long = "Return the socket's address.", "Read a configuration file and return a dictionary of its sections and options."
    alone = baseline.embed_texts(model, tokenizer, [short])
    padded = baseline.embed_texts(model, tokenizer, [short, long])  # `short` gets pad tokens here
    assert alone.shape == (1, model.config.hidden_size)
    torch.testing.assert_close(padded[:1], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded[0], padded[1], atol=1e-2)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got batch_size=0"):
        baseline.embed_texts(model, tokenizer, [short], batch_size=0)


def test_fit_linear_probe_selects_on_val_and_separates_classes():
    gen = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(4, 8, generator=gen)
    y = torch.arange(400) % 4
    x = centers[y] + torch.randn(400, 8, generator=gen)
    decays = (1000.0, 0.0, 1.0)  # the first shrinks the head to its bias: chance level
    single = {wd: baseline.fit_linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=(wd,), steps=50).val_accuracy for wd in decays}
    probe = baseline.fit_linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decays=decays, steps=50)
    assert probe.val_accuracy == probe.accuracy(x[300:], y[300:]) == max(single.values()) > 0.95
    assert single[probe.weight_decay] == probe.val_accuracy and min(single.values()) < probe.val_accuracy
    assert baseline.majority_accuracy(y[:300], y[300:]) == pytest.approx(0.25)


def test_baseline_results_file_leaves_room_above_it():
    import json

    result = json.loads((data.DATA_DIR / "results" / "baseline.json").read_text(encoding="utf-8"))
    assert result["command"] == "python -m lora_course.experiments.baseline"
    assert result["majority_test_accuracy"] + 0.3 < result["test_accuracy"] < 0.9
    assert result["n"] == {split: len(load_text_classification(split=split)) for split in data.SPLITS}


def test_hub_dataset_unreachable_fails_fast(tmp_path):
    """Hub profile, Hub unreachable (a closed local port): one clear ConnectionError, no ~45 s of retries."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    offline = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {k: v for k, v in os.environ.items() if k not in offline}
    env.update(LORA_COURSE_PROFILE="hub", HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HOME=str(tmp_path))
    script = (
        "from lora_course.data import load_text_classification\n"
        "try:\n    load_text_classification('lora-course-tests/no-such-dataset')\n"
        "except ConnectionError as e:\n    print('ERROR', e)\n"
    )
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert "ERROR could not load the dataset 'lora-course-tests/no-such-dataset'" in out.stdout, out.stderr[-2000:]
    assert "Hub cannot be reached" in out.stdout
    assert elapsed < 30, f"took {elapsed:.1f} s: the fail-fast probe did not work"
