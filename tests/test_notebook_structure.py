"""The course's notebook conventions (lora_course.notebook_tools.structure) for every
notebooks/[0-9]*.ipynb, and the tools that execute notebooks, record their run time and
write the README table.

The tool tests run the small fixture notebook with the real ``lora-course`` kernel.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output
from nbval.plugin import get_sanitize_patterns

from lora_course.notebook_tools.cli import main
from lora_course.notebook_tools.conventions import KERNEL_NAME, NOTEBOOK_MAP
from lora_course.notebook_tools.execute import (
    NotebookExecutionError,
    execute_notebook,
    load_times,
    machine_info,
    record_time,
)
from lora_course.notebook_tools.readme_table import TABLE_END, TABLE_START, format_seconds, render_table, replace_table
from lora_course.notebook_tools.structure import default_forbidden_paths, notebook_problems

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
FIXTURE = Path(__file__).parent / "fixtures" / "sample_exercises.ipynb"
SANITIZE = Path(__file__).parent / "nbval_sanitize.cfg"
FORBIDDEN = default_forbidden_paths(ROOT)


def _notebook_params() -> list:
    skip = pytest.mark.skip(reason="no notebooks/[0-9]*.ipynb yet: nothing to check")
    return [pytest.param(p, id=p.name) for p in NOTEBOOKS] or [pytest.param(None, marks=skip)]


@pytest.mark.parametrize("path", _notebook_params())
def test_notebook_structure(path: Path) -> None:
    problems = notebook_problems(path, FORBIDDEN)
    assert problems == [], f"{path.name}:\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------- executing the fixture with the real kernel


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The fixture notebook, saved under a map name and executed in place through the CLI."""
    folder = tmp_path_factory.mktemp("run")
    path = folder / "01_lora_from_scratch.ipynb"
    shutil.copy(FIXTURE, path)
    times = folder / "results" / "notebook_times.json"
    status = main(["execute", str(path), "--times", str(times)])
    return {"status": status, "path": path, "times": times}


def test_execute_runs_every_cell_in_place(executed: dict) -> None:
    assert executed["status"] == 0
    nb = nbformat.read(executed["path"], as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    assert nb.metadata.kernelspec.name == KERNEL_NAME
    setup = code[0].outputs[0].text
    assert "profile: offline" in setup and "PYTHONHASHSEED=0" in setup
    assert "matplotlib backend: module://matplotlib_inline.backend_inline" in setup
    assert "notebooks in the working folder: ['01_lora_from_scratch.ipynb']" in setup, "cwd must be the notebook's folder"
    assert code[2].outputs[0].text == "PASS check_linear_param_count: 7 hidden cases\n"
    assert all("execution" not in c.metadata for c in code), "no timestamps in committed notebooks"


def test_execute_records_wall_time_with_machine(executed: dict) -> None:
    times = load_times(executed["times"])
    entry = times["01_lora_from_scratch.ipynb"]
    assert 0 < entry["seconds"] < 600
    assert entry["cpu_cores"] == machine_info()["cpu_cores"] >= 1
    assert entry["torch"] == importlib.metadata.version("torch")
    assert entry["date"] == dt.date.today().isoformat()
    record_time(executed["times"], "00_setup_and_tour.ipynb", 12.34, {"date": "2020-01-01", "cpu_cores": 8, "torch": "x"})
    both = load_times(executed["times"])
    assert both["01_lora_from_scratch.ipynb"] == entry and both["00_setup_and_tour.ipynb"]["seconds"] == 12.3


def test_executed_fixture_meets_the_conventions(executed: dict) -> None:
    assert notebook_problems(executed["path"], FORBIDDEN) == []


def _variant(executed: dict, tmp_path: Path, edit, name: str = "01_lora_from_scratch.ipynb") -> list[str]:
    nb = nbformat.read(executed["path"], as_version=4)
    edit(nb)
    path = tmp_path / name
    nbformat.write(nb, path)
    return notebook_problems(path, FORBIDDEN)


def _set(obj, key, value):
    obj[key] = value


@pytest.mark.parametrize(
    "edit, name, expected",
    [
        (lambda nb: None, "01_lora.ipynb", "not in the notebook map"),
        (lambda nb: None, "02_lora_from_scratch.ipynb", "not in the notebook map"),
        (lambda nb: _set(nb.cells[0], "source", nb.cells[0].source.replace("**You will build:**", "You build")), None, "'**You will build:**'"),
        (lambda nb: _set(nb.cells[0], "source", nb.cells[0].source.replace("**Run time:**", "Time")), None, "'**Run time:**'"),
        (lambda nb: _set(nb.cells[0], "source", nb.cells[0].source.replace("# Sample", "Sample")), None, "'# ' title"),
        (lambda nb: _set(nb.cells[1], "source", nb.cells[1].source.replace("seed_everything(0)\n", "")), None, "seed_everything(0)"),
        (lambda nb: _set(nb.cells[1], "outputs", []), None, "does not show the profile"),
        (lambda nb: _set(nb.cells[9], "source", "## Questions\n<details>x</details>"), None, "Interview Q&A"),
        (lambda nb: _set(nb.cells[9], "source", "## Interview Q&A\nno answers"), None, "<details>"),
        (lambda nb: [_set(c.metadata, "tags", []) for c in nb.cells if c.cell_type == "code"], None, "no code cell tagged 'exercise'"),
        (lambda nb: _set(nb.cells[8], "execution_count", None), None, "not all executed in order"),
        (lambda nb: nb.cells.insert(2, new_code_cell("")), None, "empty code cell"),
        (lambda nb: nb.cells[8].outputs.append(new_output("error", ename="ValueError", evalue="x", traceback=[])), None, "error output"),
        (lambda nb: nb.cells[8].outputs.append(new_output("stream", name="stderr", text=f"warning in {ROOT}/x.py")), None, "machine path"),
        (lambda nb: nb.cells[8].outputs.append(new_output("stream", name="stdout", text="/usr/lib/python3/site-packages/a.py")), None, "'site-packages'"),
        (lambda nb: nb.cells[8].outputs.append(new_output("stream", name="stdout", text="x" * 2_200_000)), None, "limit is 2 MB"),
        (lambda nb: _set(nb.metadata.kernelspec, "name", "python3"), None, "kernelspec name is 'python3'"),
    ],
)
def test_structure_problems_are_caught(executed: dict, tmp_path: Path, edit, name: str | None, expected: str) -> None:
    problems = _variant(executed, tmp_path, edit, name or "01_lora_from_scratch.ipynb")
    assert any(expected in p for p in problems), problems


def test_notebook_map_numbers_and_slugs_are_fixed() -> None:
    assert len(NOTEBOOK_MAP) == 16
    assert [int(s[:2]) for s in NOTEBOOK_MAP] == list(range(16))
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+", s) for s in NOTEBOOK_MAP)


def test_execute_error_names_notebook_and_cell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "05_qlora.ipynb"
    nb = new_notebook(cells=[new_code_cell("x = 1"), new_code_cell("y = x / 0")])
    nbformat.write(nb, path)
    before = path.read_bytes()
    times = tmp_path / "times.json"
    assert main(["execute", str(path), "--times", str(times)]) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "05_qlora.ipynb, cell index 1" in last and "ZeroDivisionError" in last
    assert path.read_bytes() == before, "a failed run must leave the notebook untouched"
    assert not times.exists(), "a failed run records no time"
    with pytest.raises(ValueError, match="timeout=0"):
        execute_notebook(path, timeout=0)
    with pytest.raises(ValueError, match="kernel_name='no-such-kernel'.*allowed values: .*lora-course"):
        execute_notebook(path, kernel_name="no-such-kernel")
    with pytest.raises(NotebookExecutionError):
        execute_notebook(path, progress=False)


# ---------------------------------------------------------------- README table


def test_render_table_reads_numbers_only_from_times(executed: dict) -> None:
    times = {"01_lora_from_scratch.ipynb": {"seconds": 41.4, "date": "2025-01-02", "cpu_cores": 2, "torch": "2.9.0"}}
    table = render_table([executed["path"]], times, executed["path"].parent, "data/results/notebook_times.json")
    lines = table.splitlines()
    assert lines[0] == "| # | Notebook | What you build | Run time (2-core CPU) |"
    assert lines[2] == (
        "| 01 | [Sample: exercise plumbing](01_lora_from_scratch.ipynb) | "
        "a parameter counter for `nn.Linear` \\| checked two ways. | 41 s |"
    )
    assert lines[3] == "| | **Total** | | 41 s |"
    assert "2025-01-02" in table and "torch 2.9.0" in table and "data/results/notebook_times.json" in table
    assert "not measured yet" in render_table([executed["path"]], {}, executed["path"].parent)
    times["01_lora_from_scratch.ipynb"]["seconds"] = 0.2
    assert "| <1 s |" in render_table([executed["path"]], times)


def test_mixed_core_counts_are_shown_per_row(executed: dict, tmp_path: Path) -> None:
    other = tmp_path / "00_setup_and_tour.ipynb"
    shutil.copy(executed["path"], other)
    times = {
        "00_setup_and_tour.ipynb": {"seconds": 9.6, "date": "2025-01-01", "cpu_cores": 4, "torch": "2.9.0"},
        "01_lora_from_scratch.ipynb": {"seconds": 20.0, "date": "2025-01-03", "cpu_cores": 2, "torch": "2.9.0"},
    }
    table = render_table([other, executed["path"]], times, tmp_path)
    assert "| Run time |" in table and "| 10 s (4 cores) |" in table and "| 20 s (2 cores) |" in table
    assert "| | **Total** | | 30 s |" in table and "2025-01-01 to 2025-01-03" in table


def test_readme_table_cli_rewrites_only_the_block(executed: dict, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Course\n\nintro\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nafter\n", encoding="utf-8")
    args = ["readme-table", str(executed["path"]), "--readme", str(readme), "--times", str(executed["times"])]
    assert main(args) == 0
    text = readme.read_text(encoding="utf-8")
    seconds = load_times(executed["times"])["01_lora_from_scratch.ipynb"]["seconds"]
    assert text.startswith("# Course\n\nintro\n\n" + TABLE_START + "\n| # |") and text.endswith(TABLE_END + "\n\nafter\n")
    assert "old table" not in text and f"| {format_seconds(seconds)} |" in text
    assert main(args) == 0 and readme.read_text(encoding="utf-8") == text, "rewriting must be idempotent"
    readme.write_text("no markers\n", encoding="utf-8")
    assert main(args) == 1
    with pytest.raises(ValueError, match="exactly one"):
        replace_table(f"{TABLE_END}\n{TABLE_START}", "x")


# ---------------------------------------------------------------- nbval sanitize patterns


def _sanitize(text: str) -> str:
    for regex, replace in get_sanitize_patterns(SANITIZE.read_text(encoding="utf-8")):
        text = re.sub(regex, replace, text)
    return text


@pytest.mark.parametrize(
    "a, b",
    [
        ("100%|##########| 10/10 [00:03<00:00,  3.21it/s]", "100%|##########| 10/10 [00:01<00:00, 14.20it/s]"),
        ("100%|##| 4/4 [1:02:03<00:00,  6.20s/it]", "100%|##| 4/4 [00:10<00:00,  2.50s/it]"),
        ("  0%|  | 0/4 [00:00<?, ?it/s]", "  0%|  | 0/4 [00:02<?, ?it/s]"),
        ("12it [00:03, 1.2kit/s]", "12it [00:01, 3.50it/s]"),
        ("epoch 1: 100%|##| 5/5 [00:03<00:00,  1.6it/s, loss=0.1234]", "epoch 1: 100%|##| 5/5 [00:09<00:00,  0.55it/s, loss=0.1234]"),
        ("<function f at 0x7f3a2c1d4e50>", "<function f at 0x10a2b3c4d>"),
    ],
)
def test_sanitize_hides_machine_variation(a: str, b: str) -> None:
    assert a != b and _sanitize(a) == _sanitize(b)


@pytest.mark.parametrize(
    "a, b",
    [
        ("5/5 [00:03<00:00,  1.6it/s, loss=0.1234]", "5/5 [00:03<00:00,  1.6it/s, loss=0.1235]"),
        ("100%|##| 5/5 [00:03<00:00,  1.6it/s]", "100%|##| 4/5 [00:03<00:00,  1.6it/s]"),
        ("packed byte 0xa7", "packed byte 0xa8"),
        ("max |diff| 1.234e-06", "max |diff| 2.000e-06"),
        ("trained in 12.3 s", "trained in 45.6 s"),
    ],
)
def test_sanitize_keeps_computed_numbers(a: str, b: str) -> None:
    assert _sanitize(a) != _sanitize(b)


def test_times_file_is_plain_json(executed: dict) -> None:
    payload = json.loads(executed["times"].read_text(encoding="utf-8"))
    assert set(payload) == {"about", "notebooks"} and "make notebooks" in payload["about"]
