"""Stripping solutions: the learner copies in notebooks/exercises/ (``make exercises``).

An exercise is a code cell tagged ``exercise`` whose solution sits between a line
``# BEGIN SOLUTION`` and a line ``# END SOLUTION`` (comment lines, same indentation;
a cell may hold several such blocks). The learner copy removes both markers and the code
between them and leaves a stub at the indentation of the removed code:

* inside a function or method body: ``raise NotImplementedError("your code here")``;
* elsewhere (module level, a class body, a ``with`` block at module level), where a raise
  would stop the cell before the check runs: ``name = ...`` for every name the removed
  code assigns (so the check receives ``...`` and says it is still a placeholder), or a
  bare ``...`` if it assigns none. A whole ``def``/``class`` between markers at module
  level is refused: put the markers inside the body, so the learner keeps the signature.

The learner copy clears every output and execution count and keeps everything else
(sources of other cells, metadata, tags, ids) identical. It is an error (``ValueError``
naming the notebook and cell index) to tag a cell ``exercise`` without markers, to leave
markers unbalanced or nested, to put markers in a cell not tagged ``exercise`` (the
solution would leak into the learner copy), to leave no code between markers, or to use
IPython syntax (``%magic``, ``!cmd``) in an exercise cell: the tests ``exec`` exercise
cells as plain Python.

nbgrader's ``ClearSolutions`` preprocessor does the same job, but installing nbgrader
pulls in its database, server extensions and web stack for what is ~30 lines on top of
nbformat, so this module uses nbformat directly.
"""

from __future__ import annotations

import ast
import builtins
import copy
import io
import keyword
import re
import textwrap
import tokenize
from collections.abc import Sequence
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from .conventions import EXERCISE_TAG, cell_label, is_exercise

BEGIN_MARKER = "# BEGIN SOLUTION"
END_MARKER = "# END SOLUTION"
STUB_RAISE = 'raise NotImplementedError("your code here")'

_BEGIN_RE = re.compile(r"^(\s*)#\s*BEGIN SOLUTION\s*$")
_END_RE = re.compile(r"^(\s*)#\s*END SOLUTION\s*$")
_CHECK_CALL_RE = re.compile(r"\bcheck_\w+\s*\(")


def _solution_blocks(lines: list[str], where: str) -> list[tuple[int, int]]:
    """(begin, end) line indices of each marker pair; ValueError if unbalanced or nested."""
    blocks, begin = [], None
    for i, line in enumerate(lines):
        if _BEGIN_RE.match(line):
            if begin is not None:
                raise ValueError(
                    f"{where}: nested '{BEGIN_MARKER}' on line {i + 1} (the one on line {begin + 1} is not closed)"
                )
            begin = i
        elif _END_RE.match(line):
            if begin is None:
                raise ValueError(f"{where}: '{END_MARKER}' on line {i + 1} has no '{BEGIN_MARKER}' before it")
            blocks.append((begin, i))
            begin = None
    if begin is not None:
        raise ValueError(f"{where}: '{BEGIN_MARKER}' on line {begin + 1} has no '{END_MARKER}'")
    return blocks


def _assigned_names(statements: list[ast.stmt]) -> list[str]:
    """Names assigned by ``statements`` (not loop variables, not inside nested scopes)."""
    names: list[str] = []

    def add_target(target: ast.expr) -> None:
        if isinstance(target, ast.Name):
            if target.id not in names:
                names.append(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                add_target(elt)
        elif isinstance(target, ast.Starred):
            add_target(target.value)

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    add_target(target)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                add_target(node.target)
            for attr in ("body", "orelse", "finalbody"):
                visit(getattr(node, attr, []) or [])
            for handler in getattr(node, "handlers", []) or []:
                visit(handler.body)

    visit(statements)
    return names


def _inside_function(tree: ast.Module, line: int) -> bool:
    """True if 1-based ``line`` lies in the body of a function (def or async def)."""
    return any(
        isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.lineno < line <= (node.end_lineno or 0)
        for node in ast.walk(tree)
    )


def strip_source(source: str, where: str = "cell") -> str:
    """The learner version of one exercise cell's source (see the module docstring for the rule).

    Raises:
        ValueError: (message starting with ``where``) for missing, unbalanced or nested
            markers, an empty block, a whole def/class at module level, or non-Python code.
    """
    lines = source.split("\n")
    blocks = _solution_blocks(lines, where)
    if not blocks:
        raise ValueError(f"{where}: tagged '{EXERCISE_TAG}' but has no '{BEGIN_MARKER}' / '{END_MARKER}' block")
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ValueError(
            f"{where}: not plain Python ({exc.msg}, line {exc.lineno}); exercise cells may not use "
            "%magics or !commands because the tests exec them"
        ) from None
    out: list[str] = []
    previous = 0
    for begin, end in blocks:
        body = lines[begin + 1 : end]
        code_lines = [  # 1-based line numbers of the removed code (not blank, not comments)
            i for i, text in enumerate(body, start=begin + 2) if text.strip() and not text.strip().startswith("#")
        ]
        if not code_lines:
            raise ValueError(f"{where}: no code between the markers on lines {begin + 1}-{end + 1}")
        first_code = lines[code_lines[0] - 1]
        indent = first_code[: len(first_code) - len(first_code.lstrip())]  # like the removed code
        if _inside_function(tree, code_lines[0]):
            stub = [indent + STUB_RAISE]
        else:
            try:
                statements = ast.parse(textwrap.dedent("\n".join(body))).body
            except SyntaxError:
                raise ValueError(
                    f"{where}: the code between the markers on lines {begin + 1}-{end + 1} is not whole statements"
                ) from None
            if any(isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) for s in statements):
                raise ValueError(
                    f"{where}: a whole def/class between the markers on lines {begin + 1}-{end + 1}; "
                    "put the markers inside its body so the learner keeps the signature"
                )
            stub = [f"{indent}{name} = ..." for name in _assigned_names(statements)] or [indent + "..."]
        out += lines[previous:begin] + stub
        previous = end + 1
    stripped = "\n".join(out + lines[previous:])
    try:
        ast.parse(stripped)
    except SyntaxError as exc:
        raise ValueError(f"{where}: the learner version does not parse ({exc.msg}, line {exc.lineno})") from None
    return stripped


def strip_solutions(nb: NotebookNode, name: str = "notebook") -> NotebookNode:
    """A learner copy of ``nb``: solutions replaced by stubs, all outputs and counts cleared.

    ``nb`` is not modified. ``name`` is used in error messages.

    Raises:
        ValueError: naming the notebook and cell index, for a badly marked exercise cell
            or markers in a cell not tagged ``exercise``.
    """
    learner = copy.deepcopy(nb)
    for index, cell in enumerate(learner.cells):
        if cell.cell_type != "code":
            continue
        where = cell_label(name, index)
        if is_exercise(cell):
            cell.source = strip_source(cell.source, where)
        elif any(_BEGIN_RE.match(line) or _END_RE.match(line) for line in cell.source.split("\n")):
            raise ValueError(
                f"{where}: solution markers in a cell not tagged '{EXERCISE_TAG}' (the solution would leak)"
            )
        cell.outputs = []
        cell.execution_count = None
    return learner


def write_learner_copies(paths: Sequence[Path], out_dir: Path) -> list[Path]:
    """Write the learner copy of each notebook to ``out_dir`` (same file name)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths:
        learner = strip_solutions(nbformat.read(path, as_version=4), path.name)
        target = out_dir / path.name
        nbformat.write(learner, target)
        written.append(target)
    return written


def exercise_pairs(nb: NotebookNode) -> list[tuple[int, int | None]]:
    """(exercise cell index, index of the next code cell if it calls a ``check_*`` function, else None)."""
    pairs: list[tuple[int, int | None]] = []
    for index, cell in enumerate(nb.cells):
        if not is_exercise(cell):
            continue
        following = next((j for j in range(index + 1, len(nb.cells)) if nb.cells[j].cell_type == "code"), None)
        ok = following is not None and _CHECK_CALL_RE.search(nb.cells[following].source)
        pairs.append((index, following if ok else None))
    return pairs


# ---------------------------------------------------------------- solutions visible elsewhere

_KEPT_NAMES = frozenset(dir(builtins)) | {"torch", "nn", "F", "self"}
_ASSIGN_OPS = frozenset({"=", "+=", "-=", "*=", "/=", "@=", "//="})


def code_shape(line: str) -> list[str]:
    """The tokens of one line of code with its spelling normalised away.

    Comments and strings are dropped, numbers become ``#``, and local names become ``_``
    (attributes, called functions, keyword-argument names, builtins, ``torch``, ``nn``,
    ``F`` and ``self`` are kept), and a local name indexed by a name or a string is one
    local name, so ``m.mul_(b1).add_(g, alpha=1 - b1)`` and
    ``m.mul_(beta1).add_(grad, alpha=1.0 - beta1)`` have the same shape, and so have
    ``s["lora_E"].view(-1)`` and ``s_E.view(-1)``.
    """
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER, tokenize.INDENT,
            tokenize.DEDENT, tokenize.STRING}
    out: list[str] = []
    previous = ""
    for i, token in enumerate(tokens):
        if token.type in skip:
            continue
        text = token.string
        if token.type == tokenize.NUMBER:
            text = "#"
        elif token.type == tokenize.NAME and not keyword.iskeyword(text) and text not in _KEPT_NAMES and previous != ".":
            following = tokens[i + 1].string if i + 1 < len(tokens) else ""
            is_kwarg = following == "=" and out and out[-1] in ("(", ",")
            text = text if following == "(" or is_kwarg else "_"
        out.append(text)
        previous = token.string
    collapsed: list[str] = []  # a local name indexed by a name or a string (d[k], d["key"]) is one local name
    for text in out:
        collapsed.append(text)
        while collapsed[-4:] == ["_", "[", "_", "]"] or collapsed[-3:] == ["_", "[", "]"]:
            del collapsed[-3 if collapsed[-2] == "_" else -2:]
    return collapsed


def solution_key(line: str) -> str | None:
    """The distinctive part of one solution line (its right-hand side), or None if too generic.

    Distinctive: at least 8 tokens and 2 named operations (attributes, calls, keywords)
    once the assignment target or ``return`` is dropped.
    """
    tokens = code_shape(line)
    if tokens[:1] == ["return"]:
        tokens = tokens[1:]
    depth = 0
    for n, token in enumerate(tokens):
        depth += (token in "([{") - (token in ")]}")
        if depth == 0 and token in _ASSIGN_OPS:
            tokens = tokens[n + 1 :]
            break
    names = [t for t in tokens if t != "_" and (t.isidentifier() or t.endswith("_"))]
    return " ".join(tokens) if len(tokens) >= 8 and len(names) >= 2 else None


def solution_leaks(nb: NotebookNode, learner: NotebookNode | None = None) -> list[str]:
    """Where a solution's distinctive line shows in another cell of the learner copy.

    Each line between the markers of an exercise cell of ``nb`` is reduced to
    :func:`solution_key`; the learner copy (``learner``, default: ``strip_solutions(nb)``)
    must not hold that key in any code cell's source (the stubbed exercise cell included), nor in its text
    outputs (for an executed learner copy). Returns one line per leak.
    """
    learner = strip_solutions(nb) if learner is None else learner
    keys: dict[str, int] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not is_exercise(cell):
            continue
        lines = cell.source.split("\n")
        for begin, end in _solution_blocks(lines, cell_label("notebook", index)):
            for line in lines[begin + 1 : end]:
                key = solution_key(line)
                if key is not None:
                    keys.setdefault(key, index)
    leaks = []
    for j, cell in enumerate(learner.cells):
        if cell.cell_type != "code":
            continue
        texts = [cell.source] + [o.get("text", "") for o in cell.get("outputs", []) if isinstance(o.get("text", ""), str)]
        texts += [o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])]
        shaped = "\n".join(" ".join(code_shape(line)) for text in texts for line in str(text).split("\n"))
        for key, index in keys.items():
            if key in shaped:
                leaks.append(f"cell index {j} shows the solution of the exercise in cell index {index}: {key!r}")
    return leaks
