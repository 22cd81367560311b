"""CUDA measurement records: what ``make test-gpu`` writes under ``data/measurements/`` and the
notebooks show next to their CPU checks.

One JSON file per reference check (``<check>.json``), rewritten by each GPU run::

    {"check": "lora_vs_peft", "gpu": "NVIDIA H100 80GB HBM3", "cuda_version": "12.8",
     "driver_version": "570.86", "versions": {"torch": ..., "peft": ..., "bitsandbytes": ...,
     "transformers": ...}, "date": "2026-11-24", "command": "make test-gpu",
     "results": [{"case": "float32", "max_abs_diff": 0.0, "tolerance": 0.0, "passed": true}, ...]}

The check names live in :data:`CHECKS`, so tests, records and notebooks agree on them.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .data import DATA_DIR
from .records import provenance, write_results

MEASUREMENTS_DIR = DATA_DIR / "measurements"
CHECKS: dict[str, str] = {
    "lora_vs_peft": "LoRALinear vs PEFT LoRA: logits and gradients (notebook 01)",
    "nf4_vs_bitsandbytes": "quantize_nf4 vs bitsandbytes quantize_4bit: codes and absmax (notebook 03)",
    "double_quant_vs_bitsandbytes": "double quantization vs bitsandbytes: absmax codes, absmax2, offset (notebook 04)",
    "dora_vs_peft": "DoRALinear vs PEFT use_dora=True: logits in 3 dtypes (notebook 08)",
    "s2attn_vs_longlora": "shift_short_attention vs LongLoRA's forward_noflashattn (notebook 09)",
    "int8_vs_linear8bitlt": "Int8Linear vs bitsandbytes Linear8bitLt in eval mode (notebook 14)",
    "adamw8bit_vs_bitsandbytes": "AdamW8bit vs bitsandbytes AdamW8bit and PagedAdamW8bit: parameters after 3 steps (notebook 14)",
    "qlora_vs_peft": "QLoRALinear vs PEFT LoRA on bitsandbytes Linear4bit: output and gradients (notebook 05)",
    "adalora_vs_peft": "SVDLinear (AdaLoRA) vs PEFT AdaLoRA: logits and gradients (notebook 07)",
    "variants_vs_peft": "rsLoRA, PiSSA and VeRA vs PEFT (use_rslora, init_lora_weights='pissa', VeraConfig): logits "
                        "(notebook 11)",
    "training_peak_vs_estimate": "measured peak memory of a training step vs estimate_training_memory, "
                                 "relative error (notebook 06)",
}
REQUIRED_FIELDS = ("check", "gpu", "cuda_version", "driver_version", "versions", "date", "command", "results")
REQUIRED_VERSIONS = ("torch", "peft", "bitsandbytes", "transformers")
RESULT_FIELDS = ("case", "max_abs_diff", "tolerance", "passed")


def _check_name(check: str) -> None:
    if check not in CHECKS:
        raise ValueError(f"check={check!r} is unknown; allowed values: {', '.join(CHECKS)}")


def validate_record(record: Any) -> None:
    """Raise a ValueError naming what is missing or wrong; return None for a valid record."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
        raise ValueError(f"record lacks the fields {missing} (required: {', '.join(REQUIRED_FIELDS)})")
    _check_name(record["check"])
    if not isinstance(record["gpu"], str) or not record["gpu"]:
        raise ValueError(f"record's gpu must name the GPU, got {record['gpu']!r}")
    versions = record["versions"]
    if not isinstance(versions, dict) or [v for v in REQUIRED_VERSIONS if not versions.get(v)]:
        raise ValueError(f"record's versions must give {', '.join(REQUIRED_VERSIONS)}, got {versions!r}")
    date = record["date"]
    if not (isinstance(date, str) and len(date) == 10 and date[4] == date[7] == "-"):
        raise ValueError(f"record's date must be YYYY-MM-DD, got {date!r}")
    if not isinstance(record["command"], str) or not record["command"]:
        raise ValueError(f"record's command must be the command that wrote it, got {record['command']!r}")
    results = record["results"]
    if not isinstance(results, list) or not results:
        raise ValueError("record's results must be a non-empty list")
    for item in results:
        lacking = [f for f in RESULT_FIELDS if not isinstance(item, dict) or f not in item]
        if lacking:
            raise ValueError(f"a result lacks {lacking}: {item!r}")


def load_records(directory: str | Path | None = None) -> list[dict[str, Any]]:
    """Every record file in ``directory`` (default ``data/measurements``), validated."""
    folder = Path(directory) if directory is not None else MEASUREMENTS_DIR
    records = []
    for path in sorted(folder.glob("*.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        try:
            validate_record(record)
        except ValueError as err:
            raise ValueError(f"{path.name}: {err}") from None
        records.append(record)
    return records


def latest_record(check: str, directory: str | Path | None = None) -> dict[str, Any] | None:
    """The newest record of ``check``, or None when none was made yet."""
    _check_name(check)
    found = [r for r in load_records(directory) if r["check"] == check]
    return max(found, key=lambda r: r["date"]) if found else None


def describe_record(check: str, directory: str | Path | None = None) -> str:
    """One line for a notebook: the latest CUDA record of ``check``, or that none exists yet."""
    record = latest_record(check, directory)
    if record is None:
        return (f"no CUDA record for {check} yet: run `make test-gpu` on a GPU machine "
                "(README, section GPU)")
    worst = max(r["max_abs_diff"] for r in record["results"])
    verdict = "pass" if all(r["passed"] for r in record["results"]) else "FAIL"
    v = record["versions"]
    return (f"CUDA record for {check}: {record['gpu']}, {record['date']}, torch {v['torch']}, "
            f"bitsandbytes {v['bitsandbytes']}: {len(record['results'])} cases, worst max |diff| {worst:.3g} -> {verdict}")


def show_record(check: str, directory: str | Path | None = None) -> None:
    """Print the latest CUDA record of ``check`` (:func:`describe_record`) if one exists; print
    nothing otherwise (the README's GPU status says which checks have a record)."""
    if latest_record(check, directory) is not None:
        print(describe_record(check, directory))


def gpu_description() -> dict[str, Any]:
    """GPU name, CUDA version and driver version of this machine (``nvidia-smi``; None where absent)."""
    import torch

    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"gpu": gpu, "cuda_version": torch.version.cuda, "driver_version": driver}


def write_record(check: str, results: list[dict[str, Any]], command: str,
                 directory: str | Path | None = None) -> Path:
    """Write (replace) the record of ``check`` with this machine's GPU, versions, date and ``results``."""
    _check_name(check)
    info = provenance(command, "peft", "bitsandbytes", "transformers", device="cuda")
    record = {"check": check, **gpu_description(), "versions": info["versions"], "date": info["date"],
              "command": command, "results": results}
    validate_record(record)
    folder = Path(directory) if directory is not None else MEASUREMENTS_DIR
    path = folder / f"{check}.json"
    write_results(path, record)
    return path
