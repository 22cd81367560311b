"""Maintainer tools for the notebooks, one module per job.

* :mod:`.strip`: learner copies with the exercise solutions stubbed (``make exercises``);
* :mod:`.execute`: re-run notebooks in place and record their run times (``make notebooks``);
* :mod:`.readme_table`: the README's notebook table from those run times (``make readme-table``);
* :mod:`.bank`: notebook 12's Interview Q&A generated from the chapters' (``make notebooks``);
* :mod:`.structure`: the conventions every course notebook must follow (the tests);
* :mod:`.conventions`: what they share (the notebook map, the kernel, the exercise tag);
* :mod:`.cli`: the command line, ``python -m lora_course.notebook_tools execute|strip|readme-table|bank``.

This package re-exports their public names.
"""

from .cli import main
from .conventions import DEFAULT_TIMES, EXERCISE_TAG, KERNEL_NAME, NOTEBOOK_MAP, cell_label, is_exercise
from .execute import (
    INLINE_BACKEND,
    KERNEL_ENV,
    KERNELSPEC,
    NotebookExecutionError,
    execute_notebook,
    load_times,
    machine_info,
    record_time,
)
from .readme_table import TABLE_END, TABLE_START, format_seconds, notebook_summary, render_table, replace_table
from .strip import (
    BEGIN_MARKER,
    END_MARKER,
    STUB_RAISE,
    exercise_pairs,
    strip_solutions,
    strip_source,
    write_learner_copies,
)
from .structure import MAX_NOTEBOOK_BYTES, default_forbidden_paths, notebook_problems

__all__ = [
    "BEGIN_MARKER", "DEFAULT_TIMES", "END_MARKER", "EXERCISE_TAG", "INLINE_BACKEND", "KERNELSPEC", "KERNEL_ENV",
    "KERNEL_NAME", "MAX_NOTEBOOK_BYTES", "NOTEBOOK_MAP", "NotebookExecutionError", "STUB_RAISE", "TABLE_END",
    "TABLE_START", "cell_label", "default_forbidden_paths", "execute_notebook", "exercise_pairs", "format_seconds",
    "is_exercise", "load_times", "machine_info", "main", "notebook_problems", "notebook_summary", "record_time",
    "render_table", "replace_table", "strip_solutions", "strip_source", "write_learner_copies",
]
