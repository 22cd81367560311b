"""The pins agree everywhere (requirements.in, environment.yml, requirements.lock, the venv),
and ``python -m lora_course.check_env`` reports them, and failures, correctly."""

from __future__ import annotations

import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from lora_course import check_env
from lora_course.check_env import FAIL, INFO, OK, Check, read_pins, run_checks, version_matches

REPO = Path(__file__).resolve().parent.parent
LOCAL_LABEL_ALLOWED = {"torch"}  # the CPU wheel is 2.13.0+cpu; the lock says 2.13.0


def _requires_python() -> str:
    """``requires-python`` from pyproject.toml (a regex: tomllib is 3.11+, the course supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    return re.search(r'^requires-python\s*=\s*"([^"]+)"', text, re.MULTILINE).group(1)


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


@pytest.fixture(scope="module")
def env_yml() -> dict:
    return yaml.safe_load((REPO / "environment.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lock() -> dict[str, str]:
    return {canonicalize_name(k): v for k, v in read_pins(REPO / "requirements.lock").items()}


# --- environment.yml --------------------------------------------------------------------

def test_environment_yml_pip_section_equals_requirements_in(env_yml):
    deps = env_yml["dependencies"]
    pip_sections = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1
    assert pip_sections[0] == _requirement_lines(REPO / "requirements.in")


def test_environment_yml_python_and_pip(env_yml):
    deps = env_yml["dependencies"]
    assert "pip" in deps
    pythons = [d for d in deps if isinstance(d, str) and re.match(r"python\b", d)]
    assert pythons == ["python=3.11"]
    assert SpecifierSet(_requires_python()).contains("3.11")
    assert env_yml["name"] == "lora-course"


def test_check_env_minimum_python_matches_pyproject():
    assert _requires_python() == ">=" + ".".join(map(str, check_env.MIN_PYTHON))


# --- requirements.in, requirements.lock, the venv ---------------------------------------

def test_every_top_level_pin_is_in_the_lock_at_the_same_version(lock):
    pins = read_pins(REPO / "requirements.in")
    assert len(pins) >= 15
    for name, version in pins.items():
        assert canonicalize_name(name) in lock, f"{name} is pinned but missing from requirements.lock"
        assert lock[canonicalize_name(name)] == version, f"{name}: requirements.in {version}, lock {lock[canonicalize_name(name)]}"


def test_lock_has_no_duplicates_and_only_exact_pins():
    lines = _requirement_lines(REPO / "requirements.lock")
    names = [canonicalize_name(Requirement(line).name) for line in lines]
    assert len(names) == len(set(names))
    assert len(read_pins(REPO / "requirements.lock")) == len(lines)  # read_pins rejects non-== lines


def test_installed_versions_equal_the_lock(lock):
    wrong = []
    for name, version in lock.items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            wrong.append(f"{name}: missing (lock {version})")
            continue
        if installed.public != str(Version(version)):
            wrong.append(f"{name}: installed {installed} (lock {version})")
        elif installed.local and name not in LOCAL_LABEL_ALLOWED:
            wrong.append(f"{name}: unexpected local label {installed} (lock {version})")
    assert not wrong, "; ".join(wrong)


# --- check_env helpers ------------------------------------------------------------------

@pytest.mark.parametrize("installed, pinned, expected", [
    ("2.13.0+cpu", "2.13.0", True),
    ("2.13.0", "2.13.0", True),
    ("2.13.0+cu126", "2.13.0", True),
    ("2.12.0", "2.13.0", False),
    ("2.13.1", "2.13.0", False),
    ("2.13.0rc1", "2.13.0", False),
])
def test_version_matches(installed, pinned, expected):
    assert version_matches(installed, pinned) is expected


def test_read_pins_parses_and_rejects(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("# comment\n\ntorch==2.13.0  # trailing\nPyYAML==6.0.3\n")
    assert read_pins(good) == {"torch": "2.13.0", "PyYAML": "6.0.3"}
    loose = tmp_path / "loose.txt"
    loose.write_text("torch>=2.4\n")
    with pytest.raises(ValueError, match=r"line 1 of loose.txt: 'torch>=2.4' is not an exact pin.*name==version"):
        read_pins(loose)
    broken = tmp_path / "broken.txt"
    broken.write_text("ok==1.0\n==what\n")
    with pytest.raises(ValueError, match="line 2 of broken.txt"):
        read_pins(broken)


def test_check_rejects_unknown_status():
    with pytest.raises(ValueError, match=r"status='WARN'.*OK, FAIL, INFO"):
        Check("x", "WARN", "y")
    assert Check("Python", OK, "3.11.7").line() == "[OK]   Python: 3.11.7"
    assert Check("CUDA", INFO, "no").line() == "[INFO] CUDA: no"


# --- run_checks -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checks() -> list[Check]:
    return run_checks()


def test_run_checks_all_pass_in_the_course_venv(checks):
    failed = [c.line() for c in checks if c.status == FAIL]
    assert not failed, failed
    names = [c.name for c in checks]
    for expected in ("Python", "profile", "requirements.lock", "imports", "kernel lora-course",
                     "MiniLM-L6 files", "data stdlib_docstrings", "device", "CUDA", "MPS"):
        assert expected in names
    pins = read_pins(REPO / "requirements.in")
    assert all(f"{name}=={version}" in names for name, version in pins.items())  # one line per pin
    assert {c.name: c.status for c in checks}["CUDA"] == INFO


def test_run_checks_show_no_absolute_paths(checks):
    for path in {str(REPO), sys.prefix, str(Path.home()), sys.executable}:
        assert not any(path in c.detail or path in c.name for c in checks), path


def test_check_data_missing_files_fail_with_the_rebuild_command(tmp_path, monkeypatch):
    shutil.copy(REPO / "requirements.in", tmp_path / "requirements.in")
    monkeypatch.setattr(check_env, "repo_root", lambda: tmp_path)
    result = check_env.check_data()
    assert result.status == FAIL and "train.csv, val.csv, test.csv" in result.detail
    assert "python data/build_stdlib_docstrings.py" in result.detail
    folder = tmp_path / "data" / "stdlib_docstrings"
    folder.mkdir(parents=True)
    for split in ("train", "val", "test"):
        shutil.copy(REPO / "data" / "stdlib_docstrings" / f"{split}.csv", folder / f"{split}.csv")
    assert check_env.check_data().status == OK
    (folder / "val.csv").write_text("text,label\n")
    empty = check_env.check_data()
    assert empty.status == FAIL and "val.csv has no rows" in empty.detail


def test_check_pins_without_the_repository_checks_declared_ranges(monkeypatch):
    monkeypatch.setattr(check_env, "repo_root", lambda: None)
    results = check_env.check_pins()
    assert results[0].status == INFO and "requirements.in not found" in results[0].detail
    names = [c.name for c in results[1:]]
    assert "torch>=2.4" in names and all(c.status == OK for c in results[1:])
    assert not any(n.startswith(("pytest", "jupyterlab")) for n in names)  # extras are skipped
    assert check_env.check_lock().status == INFO and check_env.check_data().status == INFO


def test_check_kernel_reports_missing_and_foreign_kernels(tmp_path, monkeypatch):
    assert check_env.check_kernel().status == OK
    missing = check_env.check_kernel("lora-course-no-such-kernel")
    assert missing.status == FAIL and "not registered" in missing.detail and "ipykernel install" in missing.detail
    spec_dir = tmp_path / "kernels" / "lora-course-elsewhere"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        '{"argv": ["/opt/other-env/bin/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"],'
        ' "display_name": "elsewhere", "language": "python"}'
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    foreign = check_env.check_kernel("lora-course-elsewhere")
    assert foreign.status == FAIL and "another Python environment" in foreign.detail


def test_check_imports_names_the_module_that_fails():
    result = check_env.check_imports(iter(["json", "lora_course_no_such_module"]))
    assert result.status == FAIL
    assert "lora_course_no_such_module (ModuleNotFoundError" in result.detail and "json" not in result.detail
    assert check_env.check_imports(["json"]) == Check("imports", OK, "json")


def test_a_crashing_check_becomes_a_fail_line(monkeypatch):
    def broken() -> Check:
        raise RuntimeError(f"boom in {REPO}")

    monkeypatch.setattr(check_env, "CHECKS", (check_env.check_python, broken))
    results = run_checks()
    assert [c.status for c in results] == [OK, FAIL]
    assert "RuntimeError: boom in <repo>" in results[1].detail and str(REPO) not in results[1].detail


# --- the command line -------------------------------------------------------------------

def _cli(**env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "lora_course.check_env"], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_passes_here_and_prints_one_line_per_check(checks):
    proc = _cli(LORA_COURSE_PROFILE="offline")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    report = [line for line in lines if line.startswith("[")]
    assert len(report) == len(checks)
    assert all(re.match(r"\[(OK|INFO)\] ", line) for line in report)
    assert lines[-1] == f"{len(checks)} checks, 0 failed"
    assert any(line.startswith("[OK]   torch==") for line in report)


def test_cli_bad_profile_and_device_are_fail_lines_and_exit_1():
    proc = _cli(LORA_COURSE_PROFILE="hbu", LORA_COURSE_DEVICE="gpu")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "[FAIL] profile: LORA_COURSE_PROFILE='hbu' is not a known profile; allowed values: offline, hub" in out
    assert "[FAIL] device: LORA_COURSE_DEVICE='gpu' is not a known device; allowed values: cpu, cuda, mps" in out
    assert out.splitlines()[-1] == f"{len([l for l in out.splitlines() if l.startswith('[')])} checks, 2 failed: profile, device"
    assert "Traceback" not in proc.stderr


def test_minilm_weights_match_the_recorded_checksum(monkeypatch):
    from lora_course import check_env

    ok = check_env.check_minilm()
    assert ok.status == OK and "SHA-256" in ok.detail
    monkeypatch.setattr(check_env, "MINILM_SHA256", "0" * 64)
    bad = check_env.check_minilm()
    assert bad.status == FAIL and "expected 0000000000000000" in bad.detail
