"""Maintainer tools for the notebooks: execute, strip solutions, README table, structure.

Command line (the Makefile calls these)::

    python -m lora_course.notebook_tools execute notebooks/[0-9]*.ipynb
    python -m lora_course.notebook_tools strip notebooks/[0-9]*.ipynb --out notebooks/exercises
    python -m lora_course.notebook_tools readme-table notebooks/[0-9]*.ipynb --readme README.md
    python -m lora_course.notebook_tools bank            # notebook 12's Q&A from the chapters'

``execute`` lives in :mod:`.execute`, ``strip`` in :mod:`.strip`, ``readme-table`` in
:mod:`.readme_table`, ``bank`` in :mod:`.bank`; this module only parses the arguments and
reports errors.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat

from .bank import BANK_STEM, COMMAND, EXTRA_SOURCE, generated_sources, render_bank, write_bank
from .conventions import DEFAULT_TIMES, KERNEL_NAME
from .execute import NotebookExecutionError, execute_notebook, load_times, record_time
from .readme_table import format_seconds, render_table, replace_table
from .strip import write_learner_copies


def _expand(patterns: Sequence[str]) -> list[Path]:
    """The notebook paths; an unmatched shell glob (no notebooks yet) gives nothing."""
    paths = []
    for pattern in patterns:
        path = Path(pattern)
        if path.exists():
            paths.append(path)
        elif not any(ch in pattern for ch in "*?["):
            raise FileNotFoundError(f"no such notebook: {pattern}")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lora_course.notebook_tools", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("execute", help="re-execute notebooks in place and record their wall time")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell (default 600)")
    p.add_argument("--times", type=Path, default=DEFAULT_TIMES, help=f"timings file (default {DEFAULT_TIMES})")
    p.add_argument("--kernel", default=KERNEL_NAME, help=f"kernel name (default {KERNEL_NAME})")
    p = sub.add_parser("strip", help="write learner copies with the solutions stripped")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--out", type=Path, required=True, help="output folder, e.g. notebooks/exercises")
    p = sub.add_parser("readme-table", help="rewrite the README's notebook table from the timings file")
    p.add_argument("notebooks", nargs="+")
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--times", type=Path, default=DEFAULT_TIMES, help=f"timings file (default {DEFAULT_TIMES})")
    p = sub.add_parser("bank", help="regenerate notebook 12's Interview Q&A from the chapters' (and re-execute it)")
    p.add_argument("--notebook", type=Path, default=Path(f"notebooks/{BANK_STEM}.ipynb"), help="notebook 12's path")
    p.add_argument("--extra", type=Path, default=EXTRA_SOURCE, help=f"bank-only questions (default {EXTRA_SOURCE})")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if notebook 12 is stale")
    p.add_argument("--no-execute", action="store_true", help="do not re-execute notebook 12 after a change")
    p.add_argument("--times", type=Path, default=DEFAULT_TIMES, help=f"timings file (default {DEFAULT_TIMES})")
    args = parser.parse_args(argv)
    if args.command == "bank":
        return _bank(args)

    try:
        paths = _expand(args.notebooks)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print(f"no notebooks match {' '.join(args.notebooks)}; nothing to do")
        return 0
    try:
        if args.command == "execute":
            for path in paths:
                seconds = execute_notebook(path, timeout=args.timeout, kernel_name=args.kernel)
                entry = record_time(args.times, path.name, seconds)
                print(f"{path}: {format_seconds(seconds)} on {entry['cpu_cores']} CPU cores (recorded in {args.times})")
        elif args.command == "strip":
            for target in write_learner_copies(paths, args.out):
                print(f"wrote {target}")
        else:
            if not args.readme.exists():
                raise ValueError(f"--readme {args.readme} does not exist")
            table = render_table(paths, load_times(args.times), args.readme.parent, args.times)
            args.readme.write_text(replace_table(args.readme.read_text(encoding="utf-8"), table), encoding="utf-8")
            print(f"{args.readme}: notebook table rewritten ({len(paths)} notebook(s), times from {args.times})")
    except NotebookExecutionError as exc:
        print(exc.details, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _bank(args: argparse.Namespace) -> int:
    """The ``bank`` subcommand: regenerate (or, with --check, compare) notebook 12's Q&A."""
    path = args.notebook
    try:
        if args.check:
            current = generated_sources(nbformat.read(path, as_version=4))
            stale = generated_sources(render_bank(path, extra_path=args.extra)) != current
            print(f"{path}: {f'stale: run `{COMMAND}`' if stale else 'up to date'}")
            return int(stale)
        if not write_bank(path, extra_path=args.extra):
            print(f"{path}: Interview Q&A already up to date")
            return 0
        print(f"{path}: Interview Q&A regenerated from the chapters and {args.extra}")
        if not args.no_execute:  # section 4's quiz reads the bank from the file: its output changes too
            seconds = execute_notebook(path)
            record_time(args.times, path.name, seconds)
            print(f"{path}: re-executed in {format_seconds(seconds)}")
    except NotebookExecutionError as exc:
        print(exc.details, file=sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
