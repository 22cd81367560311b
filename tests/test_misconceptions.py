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
        assert isinstance(m.section, int) and m.section >= 1, f"{m.key}: section {m.section!r}"
        assert m.notebook in notebook_tools.NOTEBOOK_MAP, f"{m.key}: notebook {m.notebook}"


@pytest.mark.parametrize("entry", REGISTER, ids=lambda m: m.key)
def test_entry_is_supported_by_what_its_section_measured(entry):
    """Code reads the committed output of the cited section (or the results file) and decides."""
    where = entry.where()  # raises if the notebook has no such numbered section
    finding = entry.evaluate()
    assert finding.holds, f"{entry.key}: {where} measured {finding.measured}, which does not support the correction"
    assert re.search(r"\d", finding.measured), f"{entry.key}: the finding quotes no number: {finding.measured}"


def test_an_entry_fails_when_the_output_contradicts_it(tmp_path):
    """The evidence can fail: a copy of notebook 15 whose section 9 printed a ratio of 1."""
    entry = next(m for m in REGISTER if m.key == "rslora-training-only")
    nb = nbformat.read(NOTEBOOKS / f"{entry.notebook}.ipynb", as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if "text" in out:
                out["text"] = re.sub(r"\(ratio [\d.]+\)", "(ratio 1.0)", out["text"])
    nbformat.write(nb, tmp_path / f"{entry.notebook}.ipynb")
    assert not entry.evaluate(tmp_path).holds
    with pytest.raises(LookupError, match="no section"):
        misconceptions.section_title(entry.notebook, 99)


def test_corrections_type_no_measured_number():
    """Measured numbers come from the evidence, not from the text (percentages and 'Nx' factors)."""
    typed = [m.key for m in REGISTER if re.search(r"\d+(?:\.\d+)?(?:x|%)", m.correction)]
    assert not typed, f"corrections with a typed measurement: {typed}"


def test_register_markdown_has_one_row_per_entry():
    table = register_markdown()
    assert len(table.splitlines()) == 2 + len(REGISTER)
    assert "cell-" not in table and "DOES NOT SUPPORT" not in table
    for m in REGISTER:
        assert f"notebook {m.notebook[:2]} section {m.section} (" in table, m.key
    for row in table.splitlines()[2:]:
        assert len(row.replace("\\|", "").split("|")) == 7, f"a pipe breaks this row: {row}"


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
