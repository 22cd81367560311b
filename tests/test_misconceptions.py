"""The misconception register points at asserting cells; the quiz is deterministic; the README table is current."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from lora_course import misconceptions, notebook_tools
from lora_course.misconceptions import REGISTER, Misconception, quiz, register_markdown

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def test_keys_unique_and_fields_filled():
    keys = [m.key for m in REGISTER]
    assert len(keys) == len(set(keys)), "duplicate keys"
    assert len(REGISTER) >= 8
    for m in REGISTER:
        assert isinstance(m, Misconception)
        assert m.claim.strip() and m.correction.strip(), m.key
        assert re.fullmatch(r"\d{4}\.\d{5}", m.arxiv), f"{m.key}: arXiv id {m.arxiv!r}"
        assert re.fullmatch(r"cell-\d+", m.cell_id), f"{m.key}: cell id {m.cell_id!r}"


@pytest.mark.parametrize("entry", REGISTER, ids=lambda m: m.key)
def test_entry_points_at_an_asserting_code_cell(entry):
    path = NOTEBOOKS / f"{entry.notebook}.ipynb"
    assert path.exists(), f"{entry.key}: notebook {entry.notebook} does not exist"
    assert entry.notebook in notebook_tools.NOTEBOOK_MAP
    cells = {c.get("id"): c for c in nbformat.read(path, as_version=4).cells}
    assert entry.cell_id in cells, f"{entry.key}: no cell {entry.cell_id} in {entry.notebook}"
    cell = cells[entry.cell_id]
    assert cell.cell_type == "code", f"{entry.key}: {entry.cell_id} is a {cell.cell_type} cell"
    assert "assert" in cell.source or "verdict(" in cell.source, f"{entry.key}: {entry.cell_id} asserts nothing"


def test_register_markdown_has_one_row_per_entry():
    table = register_markdown()
    assert len(table.splitlines()) == 2 + len(REGISTER)
    assert all(m.cell_id in table for m in REGISTER)
    for row in table.splitlines()[2:]:
        assert len(row.replace("\\|", "").split("|")) == 6, f"a pipe breaks this row: {row}"


def test_quiz_is_deterministic_and_draws_from_the_bank(capsys):
    bank = misconceptions.load_bank()
    assert len(bank) >= 60
    assert all(q.answer and q.group for q in bank)
    first = quiz(5, seed=0)
    out1 = capsys.readouterr().out
    assert quiz(5, seed=0) == first and capsys.readouterr().out == out1
    assert len(set(first)) == 5 and all(q in bank for q in first)
    with pytest.raises(ValueError, match="allowed values"):
        quiz(0)


def test_readme_notebook_table_is_current():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = notebook_tools.TABLE_START, notebook_tools.TABLE_END
    assert readme.count(start) == 1 and readme.count(end) == 1
    current = readme.split(start)[1].split(end)[0].strip("\n")
    paths = sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))
    times_file = notebook_tools.DEFAULT_TIMES
    expected = notebook_tools.render_table(
        paths, notebook_tools.load_times(ROOT / times_file), ROOT, times_file
    )
    assert current == expected, "README's notebook table is stale: run `make readme-table`"


def test_bank_section_references_point_at_existing_sections():
    """Every "notebook NN section K" an answer of the bank cites exists (a "## K." heading)."""
    import json
    import re
    from pathlib import Path

    from lora_course.misconceptions import load_bank

    notebooks = Path(__file__).resolve().parent.parent / "notebooks"
    cited = {(nn, int(k)) for q in load_bank() for nn, k in re.findall(r"notebook (\d\d),? sections? (\d+)", q.answer)}
    assert cited, "the bank cites no notebook section"
    for nn, k in sorted(cited):
        paths = sorted(notebooks.glob(f"{nn}_*.ipynb"))
        assert paths, f"the bank cites notebook {nn} section {k}, but notebook {nn} does not exist"
        cells = json.loads(paths[0].read_text(encoding="utf-8"))["cells"]
        headings = ["".join(c["source"]) for c in cells if c["cell_type"] == "markdown"]
        assert any(re.search(rf"^## {k}\.", h, re.M) for h in headings), f"{paths[0].name} has no section {k}"
