"""Shared pytest set-up for the course's tests."""

import pytest
import torch

# tests/fixtures/ holds sample notebooks that the tool tests execute and strip themselves;
# `make test` passes --nbval, which would otherwise collect them as notebooks to compare.
collect_ignore = ["fixtures"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is faster, and a busy machine cannot oversubscribe it
    (an SVD can take 100x longer when two MKL threads fight other processes for 2 cores).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def minilm():
    """The pretrained MiniLM classifier (2 labels) and a tokenized batch; tests deep-copy it."""
    from lora_course.models import minilm_classifier

    model, tok = minilm_classifier(2)
    batch = dict(tok(["LoRA adapts a frozen model.", "a second, longer test sentence here"],
                     return_tensors="pt", padding=True))
    return model, batch


# -- CUDA reference checks (make test-gpu) ------------------------------------------------

NEEDS_CUDA = "needs CUDA: run make test-gpu on a GPU machine"


def pytest_addoption(parser):
    parser.addoption("--record-measurements", metavar="DIR", default=None,
                     help="write one CUDA record per reference check into DIR (make test-gpu: data/measurements)")


def pytest_configure(config):
    config.addinivalue_line("markers", f"gpu: runs on CUDA; {NEEDS_CUDA} (skipped with that line elsewhere)")


@pytest.fixture
def device(request):
    """A device parameter: ``cpu``, or ``cuda`` (marked ``gpu``, skipped where CUDA is absent)."""
    name = getattr(request, "param", "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip(NEEDS_CUDA)
    return torch.device(name)


@pytest.fixture(scope="session")
def measure(request):
    """``measure(check, case, device, max_abs_diff, tolerance, **extra)`` -> passed; CUDA results
    (with ``extra`` fields such as peak bytes and the config) become records in the
    ``--record-measurements`` folder when the session ends."""
    collected: dict[str, list[dict]] = {}

    def record(check, case, device, max_abs_diff, tolerance, **extra):
        passed = bool(max_abs_diff <= tolerance)
        if torch.device(device).type == "cuda":
            collected.setdefault(check, []).append({"case": case, "max_abs_diff": float(max_abs_diff),
                                                    "tolerance": float(tolerance), "passed": passed, **extra})
        return passed

    yield record
    folder = request.config.getoption("--record-measurements")
    if folder and collected:
        from lora_course.measurements import write_record

        for check, results in collected.items():
            write_record(check, results, command="make test-gpu", directory=folder)
