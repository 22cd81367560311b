"""The provenance every results file carries, and how it is written."""

import json

import torch

from lora_course.experiments import provenance, write_results


def test_provenance_names_versions_threads_device_date_and_command():
    import transformers

    record = provenance("python -m x", "transformers", device="cuda")
    assert record["versions"]["torch"] == torch.__version__
    assert record["versions"]["transformers"] == transformers.__version__
    assert set(record["versions"]) == {"python", "torch", "transformers"}
    assert (record["threads"], record["device"], record["command"]) == (torch.get_num_threads(), "cuda", "python -m x")
    assert len(record["date"]) == 10 and record["date"][4] == "-"


def test_write_results_creates_the_folder_and_round_trips(tmp_path):
    path = tmp_path / "results" / "x.json"
    write_results(path, {"a": [1, 2.5], "b": "c"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"a": [1, 2.5], "b": "c"}
    assert path.read_text(encoding="utf-8").endswith("}\n")
