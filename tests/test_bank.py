"""Notebook 12's Interview Q&A is generated from the chapters' (lora_course.notebook_tools.bank),
and the course's Markdown cites only what exists: every "notebook NN section M" resolves to a
``## M.`` heading of notebook NN, no Markdown cites an nbformat cell id, and no Markdown promises
that a notebook "will measure" something.

A check over notebooks that other people are editing is marked ``xfail(strict=False)`` while
it fails there, with the failures listed in the reason; it turns green by itself once fixed.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from lora_course import misconceptions
from lora_course.notebook_tools import bank
from lora_course.notebook_tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
BANK = NOTEBOOK_DIR / f"{bank.BANK_STEM}.ipynb"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_ID_RE = re.compile(r"\bcell-\d+\b")
PROMISE_RE = re.compile(r"\bwill (?:measure|show|compute)\b", re.I)


def _markdown(path: Path) -> list[tuple[int, str]]:
    nb = nbformat.read(path, as_version=4)
    return [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"]


def _sections(path: Path) -> set[int]:
    return {int(n) for _, text in _markdown(path) for n, _ in bank.SECTION_HEADING_RE.findall(text)}


def _by_notebook(problems: list[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name, problem in problems:
        grouped.setdefault(name, []).append(problem)
    return grouped


# ---------------------------------------------------------------- the generator


def test_bank_is_generated_from_the_chapters() -> None:
    expected = bank.generated_sources(bank.render_bank(BANK))
    current = bank.generated_sources(nbformat.read(BANK, as_version=4))
    stale = [cid for (cid, src), (_, old) in zip(expected, current) if src != old]
    assert current == expected, (
        f"notebook 12's Interview Q&A is stale (cells {stale or 'added or removed'}): a chapter's title, section headings or Interview Q&A, or "
        f"{bank.EXTRA_SOURCE} changed; run `{bank.COMMAND}` (it re-executes notebook 12), then `make exercises`"
    )


def test_bank_holds_every_chapter_question_and_the_extras() -> None:
    chapters = bank.read_chapters(NOTEBOOK_DIR)
    _, extra = bank.read_extra(ROOT / bank.EXTRA_SOURCE)
    loaded = misconceptions.load_bank()
    assert len(loaded) == sum(len(c.questions) for c in chapters) + len(extra)
    groups = list(dict.fromkeys(q.group for q in loaded))
    assert groups[:-1] == [f"From notebook {c.number} · {c.title}" for c in chapters]
    numbers = [int(re.match(r"Q(\d+)\.", q.question).group(1)) for q in loaded]
    assert numbers == list(range(1, len(loaded) + 1)), "the bank numbers its questions 1..N"
    assert loaded[-1].question == f"Q{len(loaded)}. {extra[-1].question}"


def test_extra_questions_are_not_chapter_questions() -> None:
    norm = lambda s: re.sub(r"\W+", " ", s.lower()).strip()  # noqa: E731
    chapter_questions = {norm(qa.question) for c in bank.read_chapters(NOTEBOOK_DIR) for qa in c.questions}
    _, extra = bank.read_extra(ROOT / bank.EXTRA_SOURCE)
    assert not [qa.question for qa in extra if norm(qa.question) in chapter_questions]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("section 3 measured it", "notebook 08 section 3 measured it"),
        ("Section 3 measures it", "Notebook 08 section 3 measures it"),
        ("(sections 2 and 5)", "(notebook 08 sections 2 and 5)"),
        ("sections 3-4", "notebook 08 sections 3-4"),
        ("notebook 07 section 6 and notebook 07's section 2", "notebook 07 section 6 and notebook 07's section 2"),
        ("The paper (section 4.3) says", "The paper (section 4.3) says"),
        ("exercise 2 computes it; notebook 01's exercise 2 too", "notebook 08 exercise 2 computes it; notebook 01's exercise 2 too"),
        ("This notebook trains in this notebook", "Notebook 08 trains in notebook 08"),
    ],
)
def test_qualify_references(text: str, expected: str) -> None:
    assert bank.qualify_references(text, "08") == expected


def test_section_references_parse_lists_and_ranges() -> None:
    refs = bank.section_references("notebook 08 sections 2 and 5, Notebook 03 sections 1 to 3, notebook 14's section 9")
    assert [(nn, k) for nn, k, _ in refs] == [("08", 2), ("08", 5), ("03", 1), ("03", 2), ("03", 3), ("14", 9)]


def test_generator_reads_a_chapter_and_rejects_one_without_questions(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# 05 · Sample\n\n## 1. First\n\ntext"),
        nbformat.v4.new_markdown_cell("## 2. Second"),
        nbformat.v4.new_markdown_cell(
            "## Interview Q&A\n\n**Q1. Why?**\n<details><summary>Answer</summary>\n\nSee section 2.\n</details>\n\n"
            "**How?**\n\n<details><summary>Answer</summary>\n\nThis notebook, sections 1 and 2.\n</details>\n\n"
            "## Further reading\n\n**Not a question**\n<details><summary>Answer</summary>\nx\n</details>"
        ),
    ])
    path = tmp_path / "05_sample.ipynb"
    nbformat.write(nb, path)
    chapter = bank.read_chapter(path)
    assert (chapter.number, chapter.title, chapter.sections) == ("05", "Sample", ((1, "First"), (2, "Second")))
    assert chapter.questions == (bank.QA("Why?", "See section 2."), bank.QA("How?", "This notebook, sections 1 and 2."))
    cells = bank.bank_cells([chapter], "Beyond the chapters", [bank.QA("Extra?", "Yes.")])
    text = "\n".join(c.source for c in cells)
    assert "**Q1. Why?**" in text and "See notebook 05 section 2." in text and "Notebook 05, notebook 05 sections 1 and 2." in text
    assert "### From notebook 05 · Sample" in text and "1. First; 2. Second" in text and "**Q3. Extra?**" in text
    nb.cells[2].source = "## Interview Q&A\n\nnothing yet"
    nbformat.write(nb, path)
    with pytest.raises(ValueError, match="05_sample.ipynb: no question under 'Interview Q&A'"):
        bank.read_chapter(path)


def test_cli_check_reports_a_stale_bank(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / BANK.name
    nb = nbformat.read(BANK, as_version=4)
    start, _ = bank.generated_span(nb)
    args = ["bank", "--notebook", str(copy), "--extra", str(ROOT / bank.EXTRA_SOURCE), "--no-execute"]
    # the chapters are read from the copy's folder: give it the real chapters
    for path in bank.chapter_paths(NOTEBOOK_DIR):
        (tmp_path / path.name).symlink_to(path)
    nb.cells[start + 1].source += "\n\nedited by hand"
    nbformat.write(nb, copy)
    assert main([*args, "--check"]) == 1 and bank.COMMAND in capsys.readouterr().out
    assert main(args) == 0 and "regenerated" in capsys.readouterr().out
    assert main([*args, "--check"]) == 0 and "up to date" in capsys.readouterr().out
    regenerated = nbformat.read(copy, as_version=4)
    assert "edited by hand" not in "".join(c.source for c in regenerated.cells)
    assert regenerated.cells[:start] == nb.cells[:start], "the cells above the Q&A are kept"


# ---------------------------------------------------------------- what the Markdown cites


def _broken_section_references() -> list[tuple[str, str]]:
    sections = {p.name[:2]: _sections(p) for p in NOTEBOOKS}
    problems = []
    for path in NOTEBOOKS:
        for index, text in _markdown(path):
            for nn, k, words in bank.section_references(text):
                if k not in sections.get(nn, set()):
                    why = "no such notebook" if nn not in sections else f"it has sections {sorted(sections[nn])}"
                    problems.append((path.name, f"cell index {index}: {words!r} cites section {k} of notebook {nn} ({why})"))
    return problems


def _cell_id_citations() -> list[tuple[str, str]]:
    problems = []
    for path in NOTEBOOKS:
        for index, text in _markdown(path):
            problems += [(path.name, f"cell index {index} cites {m.group(0)}") for m in CELL_ID_RE.finditer(text)]
    return problems


def _promises() -> list[tuple[str, str]]:
    problems = []
    for path in NOTEBOOKS:
        for index, text in _markdown(path):
            for m in PROMISE_RE.finditer(text):
                context = text[max(0, m.start() - 40) : m.end() + 20].replace("\n", " ")
                problems.append((path.name, f"cell index {index}: ...{context}..."))
    return problems


def _check(problems: list[tuple[str, str]], what: str) -> None:
    assert not problems, f"{what}:\n  " + "\n  ".join(f"{n}: {p}" for n, p in problems)


def test_section_references_resolve() -> None:
    _check(_broken_section_references(), "'notebook NN section M' without a '## M.' heading in notebook NN")


def test_no_markdown_cites_a_cell_id() -> None:
    _check(_cell_id_citations(), "Markdown cites an nbformat cell id (a learner cannot see cell ids)")


def test_no_markdown_promises_a_measurement() -> None:
    _check(_promises(), "Markdown promises that a notebook 'will measure/show/compute' (say what it measured)")


def test_misconception_register_cites_no_cell_id() -> None:
    """The register's table (shown in notebook 12 section 1) names no cell by its nbformat id."""
    cited = sorted(set(CELL_ID_RE.findall(misconceptions.register_markdown())))
    assert not cited, f"register_markdown() cites cell ids {cited}"


def test_bank_only_answers_name_the_notebook_of_every_section() -> None:
    """In the bank-only source a bare "section 4" would read as notebook 12's own section 4."""
    _, extra = bank.read_extra(ROOT / bank.EXTRA_SOURCE)
    bare = [qa.question for qa in extra if bank.qualify_references(qa.answer + qa.question, "NN") != qa.answer + qa.question]
    assert not bare, f"{bank.EXTRA_SOURCE}: write 'notebook NN section M', not a bare 'section M', in: {bare}"


# ---------------------------------------------------------------- numbers in the answers

# A number in an answer: a decimal, a thousands-separated integer, or an integer before "x" or "%".
ANSWER_NUMBER_RE = re.compile(r"(?<![\w.])(?<!section )(\d+\.\d+|\d{1,3}(?:,\d{3})+|\d+(?=[x×]\B|x\b)|\d+(?=%))")
PAPER_RE = re.compile(r"\b\d{4}\.\d{5}\b|\bpaper'?s? (?:\w+ )?(?:section|table|figure) \d+(?:\.\d+)?", re.I)
# Facts about a named model or format, not measurements (each with where it comes from).
FACTS = {
    "6.74": "Llama-2-7B's parameter count in billions (its config: 32 layers, d_model 4096, 11008 MLP)",
}


def _measured_text(path: Path) -> str:
    """What a notebook's code printed (and its code, where a number is a setting)."""
    nb = nbformat.read(path, as_version=4)
    parts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        parts.append(cell.source)
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/markdown", "text/html"):
                parts.append("".join(out.get("data", {}).get(kind, "")))
    return "\n".join(parts)


def _results_values() -> set[str]:
    """Every float of every results file, rounded to 1-5 decimals, as text."""
    import json

    values: set[str] = set()

    def walk(x: object) -> None:
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            values.update(f"{x:.{d}f}" for d in range(1, 6))

    for path in (ROOT / "data" / "results").rglob("*.json"):
        walk(json.loads(path.read_text(encoding="utf-8")))
    return values


def _untraced_answer_numbers() -> list[tuple[str, str]]:
    measured = {p.name[:2]: _measured_text(p) for p in NOTEBOOKS}
    everywhere = "\n".join(measured.values())
    results = _results_values()
    problems = []
    answers = [(c.stem, qa.answer, measured.get(c.stem[:2], "")) for c in bank.read_chapters(NOTEBOOK_DIR)
               for qa in c.questions]
    answers += [("bank-only", qa.answer, everywhere) for qa in bank.read_extra(ROOT / bank.EXTRA_SOURCE)[1]]
    for name, answer, source in answers:
        for sentence in re.split(r"(?<=[.;:])\s+", answer):
            if PAPER_RE.search(sentence):
                continue  # a paper's figure, labelled with its arXiv id or section
            for number in ANSWER_NUMBER_RE.findall(sentence):
                plain = number.replace(",", "")
                if number in FACTS or number in source or plain in source or number in results:
                    continue
                problems.append((name, f"{number} in: {sentence[:160]}"))
    return problems


def test_numbers_in_answers_are_measured() -> None:
    """Every number a Q&A answer quotes was printed by its notebook (or computed in its code), sits
    in a results file, or belongs to a sentence that cites the paper it comes from."""
    problems = _untraced_answer_numbers()
    assert not problems, "numbers typed into answers without a measurement behind them:\n  " + "\n  ".join(
        f"{n}: {p}" for n, p in problems)
