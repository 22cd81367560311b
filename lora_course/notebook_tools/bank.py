"""Notebook 12's Interview Q&A, generated from the chapters' own Interview Q&A.

``python -m lora_course.notebook_tools bank`` reads the ``## Interview Q&A`` of every chapter
notebook (00-15 except 12, those that exist) and rewrites the Q&A cells of notebook 12: one
group per chapter (``### From notebook NN · <title>``) with the chapter's questions and answers
copied, their section references rewritten so they resolve from notebook 12 ("section 3"
becomes "notebook 08 section 3"), then one group of bank-only questions read from
``data/interview_bank_extra.md`` (questions no chapter answers). The generated part is the run
of cells from notebook 12's ``## Interview Q&A`` heading up to its ``## Further reading`` cell;
everything above it (sections 1-4, the exercise) and the further reading are kept as they are.
``--check`` writes nothing and fails if notebook 12 is stale (the test runs the same comparison).

It also parses the references the tests check: ``section_references`` finds every
"notebook NN section M" (and "sections M and K", "sections M-K", "sections M to K").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode
from nbformat.v4 import new_markdown_cell

BANK_STEM = "12_interview_question_bank"
EXTRA_SOURCE = Path("data/interview_bank_extra.md")
COMMAND = "python -m lora_course.notebook_tools bank"
QA_HEADING_RE = re.compile(r"(?mi)^#{1,6} .*interview q&a")
FURTHER_RE = re.compile(r"(?m)^## Further reading")
SECTION_HEADING_RE = re.compile(r"(?m)^## (\d+)\. (.+?)\s*$")
_QA_RE = re.compile(
    r"(?ms)^\*\*(.+?)\*\*[ \t]*\n\s*<details><summary>Answer</summary>[ \t]*\n(.*?)</details>"
)
_QNUM_RE = re.compile(r"^Q\d+\.\s*")
_NUMS = r"\d+(?:(?:, | and | to | or |-|–)\d+)*"
_SECTION_RE = re.compile(rf"\b([Ss])(ections?) ({_NUMS})(?![.\d]\d)")
_EXERCISE_RE = re.compile(r"\b([Ee])(xercises?) (\d+(?:(?:, | and |-)\d+)*)\b")
_THIS_NOTEBOOK_RE = re.compile(r"\b([Tt])his notebook\b")
_QUALIFIED_BEFORE_RE = re.compile(r"[Nn]otebooks? \d\d(?:[-–]\d\d)?(?:'s|,)? $")
_REFERENCE_RE = re.compile(rf"\b[Nn]otebook (\d\d)(?:'s)?,? sections? ({_NUMS})(?![.\d]\d)")


@dataclass(frozen=True)
class QA:
    """One question and its answer (Markdown, without the ``<details>`` wrapper)."""

    question: str
    answer: str


@dataclass(frozen=True)
class Chapter:
    """A chapter notebook's number, file stem, title, numbered sections and Interview Q&A."""

    number: str
    stem: str
    title: str
    sections: tuple[tuple[int, str], ...]
    questions: tuple[QA, ...]


# ---------------------------------------------------------------- reading


def markdown_sources(nb: NotebookNode) -> list[str]:
    """The Markdown cells' sources, in order."""
    return [c.source for c in nb.cells if c.cell_type == "markdown"]


def parse_qa(text: str) -> list[QA]:
    """Every ``**question**`` followed by a ``<details><summary>Answer</summary>`` block in ``text``.

    A leading ``QN.`` is dropped from the question (the bank numbers its questions itself).
    """
    return [QA(_QNUM_RE.sub("", q.strip()), a.strip()) for q, a in _QA_RE.findall(text)]


def _qa_text(nb: NotebookNode, name: str) -> str:
    """The Markdown from the Interview Q&A heading up to ``## Further reading`` (or the end)."""
    cells = nb.cells
    start = next((i for i, c in enumerate(cells) if c.cell_type == "markdown" and QA_HEADING_RE.search(c.source)), None)
    if start is None:
        raise ValueError(f"{name}: no markdown heading 'Interview Q&A'")
    parts = []
    for cell in cells[start:]:
        if cell.cell_type != "markdown":
            continue
        text = cell.source
        match = FURTHER_RE.search(text)
        if match:
            parts.append(text[: match.start()])
            break
        parts.append(text)
    return QA_HEADING_RE.split("\n".join(parts), maxsplit=1)[-1]


def read_chapter(path: str | Path) -> Chapter:
    """The chapter at ``path``: title (cell 0's ``# NN · Title``), sections, Interview Q&A.

    Raises:
        ValueError: if the notebook has no title, no Interview Q&A heading or no question in it.
    """
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    number = path.name[:2]
    title_match = re.search(r"(?m)^# (?:\d\d\s*·\s*)?(.+?)\s*$", nb.cells[0].source) if nb.cells else None
    if title_match is None:
        raise ValueError(f"{path.name}: cell index 0 has no '# NN · Title' line")
    sections = tuple(
        (int(n), title) for text in markdown_sources(nb) for n, title in SECTION_HEADING_RE.findall(text)
    )
    questions = tuple(parse_qa(_qa_text(nb, path.name)))
    if not questions:
        raise ValueError(
            f"{path.name}: no question under 'Interview Q&A'; expected '**QN. question**' lines, "
            "each followed by '<details><summary>Answer</summary>' ... '</details>'"
        )
    return Chapter(number, path.stem, title_match.group(1), sections, questions)


def chapter_paths(notebook_dir: str | Path) -> list[Path]:
    """The chapter notebooks in ``notebook_dir``: ``NN_*.ipynb`` for 00-15, except the bank (12)."""
    paths = sorted(Path(notebook_dir).glob("[0-9][0-9]_*.ipynb"))
    return [p for p in paths if int(p.name[:2]) <= 15 and p.stem != BANK_STEM]


def read_chapters(notebook_dir: str | Path) -> list[Chapter]:
    """Every chapter's title, sections and Interview Q&A, in notebook order."""
    return [read_chapter(p) for p in chapter_paths(notebook_dir)]


def read_extra(path: str | Path) -> tuple[str, list[QA]]:
    """The bank-only source: its ``### `` heading text and its questions.

    Raises:
        ValueError: if the file has no ``### `` heading or no question.
    """
    text = Path(path).read_text(encoding="utf-8")
    heading = re.search(r"(?m)^### (.+?)\s*$", text)
    questions = parse_qa(text)
    if heading is None or not questions:
        raise ValueError(f"{path}: expected a '### ' heading and '**QN. question**' + <details> answer blocks")
    return heading.group(1), questions


# ---------------------------------------------------------------- rewriting references


def _qualified(text: str, start: int) -> bool:
    return bool(_QUALIFIED_BEFORE_RE.search(text[max(0, start - 20) : start]))


def qualify_references(text: str, number: str) -> str:
    """``text`` of chapter ``number`` with its own references made to resolve from another notebook.

    "section 3" -> "notebook 08 section 3", "Sections 2 and 5" -> "Notebook 08 sections 2 and 5",
    "exercise 2" -> "notebook 08 exercise 2", "this notebook" -> "notebook 08". References that
    already name a notebook ("notebook 07 section 6") and paper sections ("section 4.3") are kept.
    """

    def section(m: re.Match[str]) -> str:
        if _qualified(text, m.start()):
            return m.group(0)
        lead = "Notebook" if m.group(1) == "S" else "notebook"
        return f"{lead} {number} s{m.group(2)} {m.group(3)}"

    def exercise(m: re.Match[str]) -> str:
        if _qualified(text, m.start()):
            return m.group(0)
        lead = "Notebook" if m.group(1) == "E" else "notebook"
        return f"{lead} {number} e{m.group(2)} {m.group(3)}"

    text = _SECTION_RE.sub(section, text)
    text = _EXERCISE_RE.sub(exercise, text)
    return _THIS_NOTEBOOK_RE.sub(lambda m: f"{'N' if m.group(1) == 'T' else 'n'}otebook {number}", text)


def _numbers(spec: str) -> list[int]:
    """"2, 4 and 5" -> [2, 4, 5]; "1 to 3" and "3-4" -> the whole range."""
    out: list[int] = []
    for part in re.split(r", | and | or ", spec):
        bounds = [int(x) for x in re.split(r" to |-|–", part)]
        out += list(range(bounds[0], bounds[-1] + 1)) if len(bounds) == 2 else bounds
    return out


def section_references(text: str) -> list[tuple[str, int, str]]:
    """Every "notebook NN section M" in ``text``: (NN, M, the words cited), one per section number."""
    return [(m.group(1), k, m.group(0)) for m in _REFERENCE_RE.finditer(text) for k in _numbers(m.group(2))]


# ---------------------------------------------------------------- writing notebook 12


def _qa_markdown(index: int, qa: QA) -> str:
    return f"**Q{index}. {qa.question}**\n<details><summary>Answer</summary>\n\n{qa.answer}\n</details>"


def _group_intro(chapter: Chapter) -> str:
    link = f"[notebook {chapter.number}]({chapter.stem}.ipynb)"
    sections = "; ".join(f"{n}. {title}" for n, title in chapter.sections)
    return (
        f"Copied from {link}'s Interview Q&A ({len(chapter.questions)} questions); its references to its own "
        f"sections name the notebook. \"Here\" in these answers means notebook {chapter.number}. "
        f"Its sections: {sections}."
    )


def bank_cells(chapters: Sequence[Chapter], extra_heading: str, extra: Sequence[QA]) -> list[NotebookNode]:
    """Notebook 12's generated cells: the ``## Interview Q&A`` intro, one cell per chapter, the extras."""
    total = sum(len(c.questions) for c in chapters) + len(extra)
    intro = (
        "## Interview Q&A\n\n"
        f"<!-- Generated by `{COMMAND}` from the chapters' Interview Q&A and {EXTRA_SOURCE.as_posix()}: "
        "edit those, not these cells. -->\n\n"
        f"The bank: {total} questions in {len(chapters) + 1} groups. Each chapter's group is its own Interview Q&A, "
        f"copied by `{COMMAND}` (so the two cannot drift), with its section references rewritten to "
        "\"notebook NN section M\". The last group holds the questions no chapter answers; its source is "
        f"`{EXTRA_SOURCE.as_posix()}`. \"Notebook 12 section M\" is a section of this notebook."
    )
    cells = [new_markdown_cell(intro, id="bank-intro")]
    index = 0
    for chapter in chapters:
        blocks = [f"### From notebook {chapter.number} · {chapter.title}", _group_intro(chapter)]
        for qa in chapter.questions:
            index += 1
            rewritten = QA(qualify_references(qa.question, chapter.number), qualify_references(qa.answer, chapter.number))
            blocks.append(_qa_markdown(index, rewritten))
        cells.append(new_markdown_cell("\n\n".join(blocks), id=f"bank-{chapter.number}"))
    blocks = [
        f"### {extra_heading}",
        f"The questions no chapter's Interview Q&A answers ({len(extra)}), from `{EXTRA_SOURCE.as_posix()}`. Each number "
        "is quoted from a notebook section's output or a results file, named beside it; a paper's claim comes with its "
        "arXiv id, and where the course has measured nothing the answer says so.",
    ]
    for qa in extra:
        index += 1
        blocks.append(_qa_markdown(index, qa))
    cells.append(new_markdown_cell("\n\n".join(blocks), id="bank-extra"))
    return cells


def generated_span(nb: NotebookNode, name: str = f"{BANK_STEM}.ipynb") -> tuple[int, int]:
    """(first, end) cell indices of the generated part: the Interview Q&A heading up to Further reading.

    Raises:
        ValueError: if either heading is missing or they are in the wrong order.
    """
    md = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"]
    start = next((i for i, s in md if QA_HEADING_RE.search(s)), None)
    end = next((i for i, s in md if FURTHER_RE.search(s) and (start is None or i > start)), None)
    if start is None or end is None:
        raise ValueError(f"{name}: needs a '## Interview Q&A' cell and, after it, a '## Further reading' cell")
    return start, end


def render_bank(bank_path: str | Path, notebook_dir: str | Path | None = None, extra_path: str | Path | None = None) -> NotebookNode:
    """Notebook 12 at ``bank_path`` with its generated part rebuilt from the chapters and the extras."""
    bank_path = Path(bank_path)
    notebook_dir = Path(notebook_dir) if notebook_dir is not None else bank_path.parent
    extra_path = Path(extra_path) if extra_path is not None else bank_path.parent.parent / EXTRA_SOURCE
    nb = nbformat.read(bank_path, as_version=4)
    start, end = generated_span(nb, bank_path.name)
    heading, extra = read_extra(extra_path)
    nb.cells[start:end] = bank_cells(read_chapters(notebook_dir), heading, extra)
    return nb


def generated_sources(nb: NotebookNode) -> list[tuple[str, str]]:
    """(cell id, source) of the generated part, what the staleness check compares."""
    start, end = generated_span(nb)
    return [(c.get("id", ""), c.source) for c in nb.cells[start:end]]


def write_bank(bank_path: str | Path, notebook_dir: str | Path | None = None, extra_path: str | Path | None = None) -> bool:
    """Rewrite notebook 12's generated part in place; True if anything changed."""
    bank_path = Path(bank_path)
    new = render_bank(bank_path, notebook_dir, extra_path)
    if generated_sources(new) == generated_sources(nbformat.read(bank_path, as_version=4)):
        return False
    nbformat.write(new, bank_path)
    return True
