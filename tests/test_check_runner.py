"""run_check survives a learner's worst answers (issue 24): an endless loop stops at the time
limit with a clear message (in the main thread, as Jupyter runs a cell, and in another thread),
exit() does not end the kernel, and torch's global settings come back as they were."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch

from lora_course.exercises import framework, run_check
from lora_course.exercises.framework import Case, exercise_check


@pytest.fixture(scope="module")
def quick_check():
    """A registered check with one cheap case and a 1 s limit."""
    name = "runner_probe_double"
    if name not in framework.CHECKS:
        @exercise_check(name, cases=lambda: [Case(args=(3,), expected=6)], idea="multiply by two", time_limit_s=1.0)
        def check_runner_probe_double(candidate):  # noqa: ANN001
            """registered for these tests only"""
    yield name
    framework.CHECKS.pop(name, None)


def endless(x):
    while True:
        x += 1


def endless_and_stubborn(x):
    while True:
        try:
            while True:
                x += 1
        except BaseException:  # a learner's bare except must not defeat the limit
            pass


def sleeps(x):
    time.sleep(60)


@pytest.mark.parametrize("answer", [endless, endless_and_stubborn, sleeps])
def test_an_endless_answer_stops_at_the_time_limit(quick_check, answer):
    start = time.monotonic()
    passed, message = run_check(quick_check, answer)
    assert not passed and "ran past the check's 1 s limit" in message and "loop forever" in message
    assert time.monotonic() - start < 10
    time.sleep(0.7)  # no late alarm fires after the check returned
    assert run_check(quick_check, lambda x: 2 * x) == (True, "1 hidden case")


def test_the_time_limit_works_outside_the_main_thread(quick_check):
    out = []
    worker = threading.Thread(target=lambda: out.append(run_check(quick_check, endless)))
    worker.start()
    worker.join(20)
    assert not worker.is_alive() and not out[0][0] and "1 s limit" in out[0][1]
    time.sleep(0.7)  # nothing pending for this thread either


def test_the_time_limit_leaves_other_alarm_handlers_alone(quick_check):
    import signal

    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGALRM, mine)
    try:
        run_check(quick_check, lambda x: 2 * x)
        assert signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("code", [0, 1, "bye"])
def test_exit_in_an_answer_does_not_end_the_kernel(quick_check, code):
    passed, message = run_check(quick_check, lambda x: sys.exit(code))
    assert not passed and "called exit() or sys.exit()" in message and repr(code) in message


def changes_torch_globals(x):
    torch.set_default_dtype(torch.float64)
    torch.set_grad_enabled(False)
    torch.set_default_device("meta")
    torch.set_anomaly_enabled(True)
    return 2 * x


def changes_then_raises(x):
    changes_torch_globals(x)
    raise RuntimeError("oops")


@pytest.mark.parametrize("answer", [changes_torch_globals, changes_then_raises, endless])
def test_torch_global_settings_are_restored(quick_check, answer):
    before = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_default_device(),
              torch.is_anomaly_enabled())
    run_check(quick_check, answer)
    after = (torch.get_default_dtype(), torch.is_grad_enabled(), torch.get_default_device(),
             torch.is_anomaly_enabled())
    assert after == before
    assert torch.ones(1).dtype == torch.float32 and torch.ones(1).device.type == "cpu"


def test_a_bad_time_limit_is_refused():
    with pytest.raises(ValueError, match="time_limit_s=0"):
        exercise_check("runner_probe_bad", cases=lambda: [], idea="x", time_limit_s=0)


def test_every_check_has_a_second_level_formula():
    """Hints come in two levels: the formula is kept for the second wrong answer, so every check has one."""
    import lora_course.exercises as exercises
    from lora_course.exercises.framework import CHECKS

    course = [name for name in CHECKS if hasattr(exercises, f"check_{name}")]  # not the checks tests register
    assert len(course) >= 45
    missing = sorted(name for name in course if not CHECKS[name].formula)
    assert not missing, f"checks without formula=: {missing}"
