"""CUDA records: every committed file parses and names its GPU, versions, date and command;
the reader, the notebook line and the writer work on an example (not a measurement)."""

import copy
import json
from pathlib import Path

import pytest

from lora_course import measurements as m

EXAMPLE = Path(__file__).parent / "fixtures" / "measurements" / "example_record.json"


def test_every_committed_record_is_valid():
    records = m.load_records()  # raises, naming the file, on the first invalid one
    for record in records:
        assert record["check"] in m.CHECKS and record["gpu"] and record["command"]
    from lora_course.experiments.memory_measured import VRAM_DIR

    for path in sorted(VRAM_DIR.glob("*.json")):  # the VRAM sweep's files (rows instead of results)
        vram = json.loads(path.read_text())
        assert vram["gpu"] and vram["command"] and vram["rows"], path.name
        assert all(vram["versions"].get(v) for v in m.REQUIRED_VERSIONS), path.name
        assert len(vram["date"]) == 10, path.name


def test_example_record_is_read_and_described(tmp_path):
    record = json.loads(EXAMPLE.read_text())
    m.validate_record(record)
    (tmp_path / "nf4.json").write_text(json.dumps(record))
    assert m.latest_record("nf4_vs_bitsandbytes", tmp_path)["gpu"] == record["gpu"]
    line = m.describe_record("nf4_vs_bitsandbytes", tmp_path)
    assert record["gpu"] in line and record["date"] in line and line.endswith("-> pass")
    assert m.latest_record("lora_vs_peft", tmp_path) is None
    assert m.describe_record("lora_vs_peft", tmp_path).startswith("no CUDA record for lora_vs_peft yet")


@pytest.mark.parametrize("field, value, match", [
    ("gpu", "", "gpu must name"), ("date", "24/11/2026", "YYYY-MM-DD"), ("command", None, "command"),
    ("results", [], "non-empty"), ("check", "svd", "check='svd' is unknown"),
])
def test_broken_records_are_refused_with_the_field_named(field, value, match):
    record = json.loads(EXAMPLE.read_text())
    record[field] = value
    with pytest.raises(ValueError, match=match):
        m.validate_record(record)


def test_missing_fields_and_versions_are_named(tmp_path):
    record = json.loads(EXAMPLE.read_text())
    broken = copy.deepcopy(record)
    del broken["driver_version"]
    with pytest.raises(ValueError, match="driver_version"):
        m.validate_record(broken)
    broken = copy.deepcopy(record)
    del broken["versions"]["bitsandbytes"]
    (tmp_path / "x.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="x.json: .*bitsandbytes"):
        m.load_records(tmp_path)


def test_write_record_round_trips_with_this_machines_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(m, "gpu_description", lambda: {"gpu": "test GPU", "cuda_version": "0.0", "driver_version": None})
    path = m.write_record("lora_vs_peft", [{"case": "float32", "max_abs_diff": 0.0, "tolerance": 0.0, "passed": True}],
                          "make test-gpu", tmp_path)
    record = json.loads(path.read_text())
    import peft
    assert record["versions"]["peft"] == peft.__version__ and record["gpu"] == "test GPU"
    assert m.describe_record("lora_vs_peft", tmp_path).endswith("-> pass")


def test_show_record_prints_only_an_existing_record(tmp_path, capsys, monkeypatch) -> None:
    m.show_record("lora_vs_peft", tmp_path)
    assert capsys.readouterr().out == ""  # no record: the notebook cell stays silent
    monkeypatch.setattr(m, "gpu_description", lambda: {"gpu": "test GPU", "cuda_version": "0.0", "driver_version": None})
    m.write_record("lora_vs_peft", [{"case": "float32", "max_abs_diff": 0.0, "tolerance": 0.0, "passed": True}],
                   "make test-gpu", tmp_path)
    m.show_record("lora_vs_peft", tmp_path)
    assert capsys.readouterr().out.strip() == m.describe_record("lora_vs_peft", tmp_path)
