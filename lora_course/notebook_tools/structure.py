"""Structure checks: what every executed course notebook must look like (the tests run them)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nbformat

from .conventions import EXERCISE_TAG, KERNEL_NAME, NOTEBOOK_MAP, is_exercise

MAX_NOTEBOOK_BYTES = 2 * 1024 * 1024


def default_forbidden_paths(repo_root: str | Path) -> list[str]:
    """Absolute machine paths that must not appear in any output."""
    home = str(Path.home())
    paths = [str(Path(repo_root).resolve()), "/tmp/", "site-packages", "dist-packages"]
    return paths + ([home] if len(home) > 1 else [])


def _output_texts(output: Mapping[str, Any]) -> list[str]:
    texts = []
    if "text" in output:
        texts.append(output["text"])
    for mime, value in output.get("data", {}).items():
        if not mime.startswith("image/"):  # base64 may contain anything
            texts.append(value if isinstance(value, str) else json.dumps(value))
    texts += output.get("traceback", [])
    return texts


def notebook_problems(path: str | Path, forbidden_paths: Sequence[str] = ()) -> list[str]:
    """Everything in the executed notebook at ``path`` that breaks the course conventions."""
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    name, cells, problems = path.name, nb.cells, []
    stem = path.stem
    if stem not in NOTEBOOK_MAP:
        problems.append(
            f"file name {name!r} is not in the notebook map; allowed values: {', '.join(NOTEBOOK_MAP)} (+ .ipynb)"
        )
    if nb.metadata.get("kernelspec", {}).get("name") != KERNEL_NAME:
        kernel = nb.metadata.get("kernelspec", {}).get("name")
        problems.append(f"kernelspec name is {kernel!r}, expected {KERNEL_NAME!r}")
    size = path.stat().st_size
    if size >= MAX_NOTEBOOK_BYTES:
        problems.append(f"file is {size / 1e6:.2f} MB, the limit is 2 MB (smaller plots, fewer printed rows)")
    if len(cells) < 2:
        return problems + ["fewer than 2 cells"]
    first = cells[0].source
    if cells[0].cell_type != "markdown":
        problems.append("cell index 0 must be markdown (title, what you build, prerequisites, run time)")
    if not re.search(r"(?m)^# \S", first):
        problems.append("cell index 0 has no '# ' title line")
    for label in ("**You will build:**", "**Prerequisites:**", "**Run time:**"):
        if not re.search(r"(?m)^" + re.escape(label), first):
            problems.append(f"cell index 0 has no '{label}' line")
    setup = cells[1]
    if setup.cell_type != "code":
        problems.append("cell index 1 must be the code cell with seed_everything(0), pick_device() and the profile")
    else:
        for call in ("seed_everything(0)", "pick_device(", "profile()"):
            if call not in setup.source:
                problems.append(f"cell index 1 does not call {call}{'' if call.endswith(')') else ')'}")
        shown = "".join(t for o in setup.get("outputs", []) for t in _output_texts(o))
        if "offline" not in shown:
            problems.append("cell index 1 does not show the profile ('offline' is not in its output)")
    heading = next(
        (i for i, c in enumerate(cells) if c.cell_type == "markdown" and re.search(r"(?mi)^#{1,6} .*interview q&a", c.source)),
        None,
    )
    if heading is None:
        problems.append("no markdown heading 'Interview Q&A'")
    elif not any(c.cell_type == "markdown" and "<details>" in c.source for c in cells[heading:]):
        problems.append("no <details> answer block after the 'Interview Q&A' heading")
    if not any(is_exercise(c) for c in cells):
        problems.append(f"no code cell tagged {EXERCISE_TAG!r}")
    code = [(i, c) for i, c in enumerate(cells) if c.cell_type == "code"]
    for i, cell in code:
        if not cell.source.strip():
            problems.append(f"cell index {i} is an empty code cell (remove it)")
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                problems.append(f"cell index {i} has an error output ({output.get('ename')})")
            for text in _output_texts(output):
                for bad in forbidden_paths:
                    if bad and bad in text:
                        problems.append(f"cell index {i} shows a machine path containing {bad!r}")
    counts = [c.get("execution_count") for _, c in code]
    if counts != list(range(1, len(code) + 1)):
        problems.append(
            f"code cells are not all executed in order: execution counts {counts}, expected 1..{len(code)} "
            "(run `make notebooks`)"
        )
    return problems
