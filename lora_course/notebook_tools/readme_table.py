"""The README's notebook table, rewritten from the recorded run times (``make readme-table``).

The table sits between ``<!-- notebook-table:start -->`` and ``<!-- notebook-table:end -->``
in the README; its run times come only from the timings file that ``execute`` writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

from .conventions import DEFAULT_TIMES

TABLE_START = "<!-- notebook-table:start -->"
TABLE_END = "<!-- notebook-table:end -->"


def notebook_summary(nb: NotebookNode, name: str) -> dict[str, str]:
    """Number, title (first ``# `` heading) and "You will build" text of a notebook.

    Raises:
        ValueError: naming the notebook if the title or the ``**You will build:**`` line is missing.
    """
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    title = next((line[2:].strip() for c in markdown for line in c.source.split("\n") if line.startswith("# ")), None)
    if title is None:
        raise ValueError(f"{name}: no markdown '# ' title line")
    first = nb.cells[0].source.split("\n") if nb.cells else []
    label = "**You will build:**"
    build = next((line.strip()[len(label) :].strip() for line in first if line.strip().startswith(label)), None)
    if not build:
        raise ValueError(f"{name}: cell index 0 has no '**You will build:** ...' line")
    return {"number": name[:2] if name[:2].isdigit() else "", "title": title, "build": build}


def format_seconds(seconds: float) -> str:
    """``41.3 -> '41 s'``; under half a second: ``'<1 s'``."""
    return "<1 s" if seconds < 0.5 else f"{int(seconds + 0.5)} s"


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|")


def render_table(
    notebooks: Sequence[str | Path],
    times: Mapping[str, Mapping[str, Any]],
    readme_dir: str | Path = ".",
    times_file: str | Path = DEFAULT_TIMES,
) -> str:
    """The README's markdown table of notebooks, run times read only from ``times``.

    Args:
        notebooks: notebook paths, in order.
        times: :func:`load_times` output (file name -> entry with ``seconds``, ``cpu_cores``, ...).
        readme_dir: the README's folder, for the relative links.
        times_file: where ``times`` came from, named under the table.
    """
    rows, measured = [], []
    for item in notebooks:
        path = Path(item)
        info = notebook_summary(nbformat.read(path, as_version=4), path.name)
        entry = times.get(path.name)
        link = Path(os.path.relpath(path, readme_dir)).as_posix()
        rows.append((info, link, entry))
        if entry is not None:
            measured.append(entry)
    cores = sorted({e["cpu_cores"] for e in measured})
    header = f"Run time ({cores[0]}-core CPU)" if len(cores) == 1 else "Run time"
    lines = [f"| # | Notebook | What you build | {header} |", "|---|---|---|---|"]
    for info, link, entry in rows:
        if entry is None:
            when = "not measured yet"
        else:
            when = format_seconds(entry["seconds"]) + ("" if len(cores) == 1 else f" ({entry['cpu_cores']} cores)")
        title, build = _cell_text(info["title"]), _cell_text(info["build"])
        lines.append(f"| {info['number']} | [{title}]({link}) | {build} | {when} |")
    if measured and len(measured) == len(rows):
        lines.append(f"| | **Total** | | {format_seconds(sum(e['seconds'] for e in measured))} |")
    if measured:
        dates = sorted({e["date"] for e in measured})
        torches = ", ".join(sorted({e["torch"] for e in measured}))
        span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        lines += ["", f"Run times: wall time of one execution of each notebook on {span} (torch {torches}), "
                  f"recorded in `{Path(times_file).as_posix()}`, not typed by hand."]
    return "\n".join(lines)


def replace_table(text: str, table: str) -> str:
    """``text`` with the block between :data:`TABLE_START` and :data:`TABLE_END` replaced by ``table``.

    Raises:
        ValueError: if the markers are missing, repeated or out of order.
    """
    if text.count(TABLE_START) != 1 or text.count(TABLE_END) != 1 or text.index(TABLE_START) > text.index(TABLE_END):
        raise ValueError(f"the README needs exactly one '{TABLE_START}' followed by one '{TABLE_END}' line")
    head, rest = text.split(TABLE_START)
    _, tail = rest.split(TABLE_END)
    return f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}"
