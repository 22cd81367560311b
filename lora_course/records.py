"""Provenance of every measured number: what a results file or a measurement record keeps
about the run that made it (versions, threads, device, date, command), and how it is written.

It sits below both :mod:`lora_course.experiments` (results files under ``data/results/``)
and :mod:`lora_course.measurements` (device records under ``data/measurements/``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def provenance(command: str, *packages: str, device: str = "cpu") -> dict[str, Any]:
    """What every results file records about its run: versions (python, torch and the named
    packages), torch's thread count, the device, the date and the command that wrote it."""
    import datetime
    import importlib
    import platform

    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    versions.update({name: importlib.import_module(name).__version__ for name in packages})
    return {"versions": versions, "threads": torch.get_num_threads(), "device": device,
            "date": datetime.date.today().isoformat(), "command": command}


def write_results(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` as indented JSON to ``path`` (creating its folder if needed).

    Atomic: the JSON is written to a temporary file beside ``path`` and then moved over it,
    so an interrupted run (or a record that is not JSON) leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2) + "\n"  # fails before anything is written
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
