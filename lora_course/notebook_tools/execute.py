"""Executing notebooks in place and recording their run times (``make notebooks``).

``execute`` re-runs each notebook in place with the ``lora-course`` kernel, in the
notebook's folder, with ``LORA_COURSE_PROFILE=offline``, ``PYTHONHASHSEED=0`` and
matplotlib's inline backend, and records its wall time (with the date, CPU cores and
torch version) in ``data/results/notebook_times.json``, which the README table reads.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

from .conventions import DEFAULT_TIMES, KERNEL_NAME, cell_label

KERNELSPEC = {"name": KERNEL_NAME, "display_name": "Python (lora-course)", "language": "python"}
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
KERNEL_ENV = {"LORA_COURSE_PROFILE": "offline", "PYTHONHASHSEED": "0", "MPLBACKEND": INLINE_BACKEND}

_ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookExecutionError(RuntimeError):
    """A cell failed (or timed out) while executing a notebook; ``details`` holds the traceback."""

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


def execute_notebook(
    path: str | Path, timeout: int = 600, kernel_name: str = KERNEL_NAME, progress: bool = True
) -> float:
    """Re-execute ``path`` in place with the course kernel; return its wall time in seconds.

    The kernel runs in the notebook's folder with :data:`KERNEL_ENV` added to the
    environment. On error the file is left untouched.

    Raises:
        ValueError: if ``timeout`` is not a positive number or the kernel is not installed.
        NotebookExecutionError: naming the notebook and cell that failed.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
    from tqdm import tqdm  # plain tqdm: this runs in a terminal

    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
        raise ValueError(f"timeout={timeout!r} is not allowed; allowed values: a positive number of seconds")
    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise ValueError(
            f"kernel_name={kernel_name!r} is not an installed Jupyter kernel; allowed values: "
            f"{', '.join(sorted(KernelSpecManager().find_kernel_specs()))} (`make setup` installs {KERNEL_NAME!r})"
        ) from None
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    total = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())
    state = {"index": None}
    bar = tqdm(total=total, desc=path.name, unit="cell", file=sys.stderr, disable=not progress, leave=True)

    def on_start(cell: NotebookNode, cell_index: int) -> None:
        state["index"] = cell_index

    def on_done(cell: NotebookNode, cell_index: int, execute_reply: Any) -> None:
        bar.update(1)

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent.resolve())}},
        record_timing=False,  # no timestamps in the committed notebooks
        coalesce_streams=True,  # one stream output per name, \r progress updates collapsed
        on_cell_start=on_start,
        on_cell_executed=on_done,
    )
    env = {**os.environ, **KERNEL_ENV}
    start = time.perf_counter()
    try:
        client.execute(env=env)
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        index = state["index"]
        where = cell_label(str(path), index) if index is not None else str(path)
        first = nb.cells[index].source.strip().split("\n")[0][:60] if index is not None else ""
        if isinstance(exc, CellExecutionError):
            reason = f"{exc.ename}: {_ANSI_RE.sub('', str(exc.evalue))}"
        elif isinstance(exc, CellTimeoutError):
            reason = f"timed out after {timeout} s"
        else:
            reason = "the kernel died (out of memory?)"
        raise NotebookExecutionError(f"{where} ({first!r}) failed: {reason}", _ANSI_RE.sub("", str(exc))) from None
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    for cell in nb.cells:
        cell.get("metadata", {}).pop("execution", None)
    nbformat.write(nb, path)
    return seconds


def machine_info() -> dict[str, Any]:
    """What a timing is measured on: date, CPU cores, torch and Python versions, platform."""
    try:
        cores = len(os.sched_getaffinity(0))  # the cores this process may use (containers)
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return {
        "date": _dt.date.today().isoformat(),
        "cpu_cores": cores,
        "torch": torch_version,
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
    }


def load_times(path: str | Path = DEFAULT_TIMES) -> dict[str, dict[str, Any]]:
    """The recorded timings: notebook file name -> {seconds, date, cpu_cores, torch, ...}."""
    path = Path(path)
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")).get("notebooks", {}))


def record_time(
    path: str | Path, notebook: str, seconds: float, info: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Store the wall time of ``notebook`` (a file name) in the json at ``path``; return the entry."""
    path = Path(path)
    times = load_times(path)
    entry = {"seconds": round(float(seconds), 1), **(info if info is not None else machine_info())}
    times[notebook] = entry
    payload = {
        "about": "Wall time of each notebook, measured by `make notebooks` "
        "(python -m lora_course.notebook_tools execute); `make readme-table` shows it in README.md.",
        "notebooks": dict(sorted(times.items())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return entry
