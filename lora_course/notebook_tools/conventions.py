"""The notebook conventions every notebook tool shares: the notebook map, the kernel, the
exercise tag, where run times are recorded, and how messages name a cell."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The course's notebooks, in order: their numbers and slugs are fixed, so that the links
# between notebooks, the misconceptions list and the README table all agree.
NOTEBOOK_MAP: tuple[str, ...] = (
    "00_setup_and_tour",
    "01_lora_from_scratch",
    "02_peft_in_practice",
    "03_nf4_from_scratch",
    "04_double_quantization",
    "05_qlora",
    "06_memory_full_vs_lora_vs_qlora",
    "07_adalora",
    "08_dora",
    "09_longlora_shift_short_attention",
    "10_rank_vs_accuracy",
    "11_lora_variants",
    "12_interview_question_bank",
    "13_lora_at_scale",
    "14_int8_and_8bit_optimizers",
    "15_what_people_ask",
)

KERNEL_NAME = "lora-course"
EXERCISE_TAG = "exercise"
DEFAULT_TIMES = Path("data/results/notebook_times.json")


def cell_label(name: str, index: int) -> str:
    """How messages name a cell: ``'01_x.ipynb, cell index 4'`` (``nb.cells[4]``)."""
    return f"{name}, cell index {index}"


def is_exercise(cell: Mapping[str, Any]) -> bool:
    """True for a code cell tagged ``exercise``."""
    return cell.get("cell_type") == "code" and EXERCISE_TAG in cell.get("metadata", {}).get("tags", [])
