"""Longer experiments that write results files under ``data/results/``.

Each module runs as ``python -m lora_course.experiments.<name>`` and exposes the
functions it uses, so a notebook can re-run a quick subset and compare with the file.
"""

from __future__ import annotations

import json
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
    """Write ``record`` as indented JSON to ``path`` (creating ``data/results/`` if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
