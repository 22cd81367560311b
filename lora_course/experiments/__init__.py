"""Longer experiments that write results files under ``data/results/``.

Each module runs as ``python -m lora_course.experiments.<name>`` and exposes the
functions it uses, so a notebook can re-run a quick subset and compare with the file.
"""

from __future__ import annotations

from ..records import provenance, write_results

__all__ = ["provenance", "write_results"]
