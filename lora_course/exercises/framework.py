"""The check machinery shared by every chapter: hidden cases, the registry, the runner.

:func:`exercise_check` registers a ``check_<name>`` function in :data:`CHECKS`;
:func:`run_check` runs its hidden cases on a learner's answer and returns the one line
:func:`format_report` prints (``PASS ...`` or ``NOT YET ...`` with a hint). :func:`fmt`
and :func:`compare_values` keep that line deterministic; :func:`seeded_tensors` gives the
chapters reproducible inputs. The package docstring (:mod:`lora_course.exercises`) says
how an exercise works in a notebook and how to add a check.

Hints come in two levels: a wrong answer first gets the nudge (the case's ``hint`` or the
check's ``idea``); from the second wrong answer to the same check in the same kernel on,
the line also gives the check's ``formula``. A leftover stub or placeholder is not a try.
:func:`use_or_fallback` lets a notebook go on after an exercise in the reading flow: it
returns the learner's answer if it passes the check, else the library's implementation,
and prints which one the later cells use.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import math
import numbers
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# What the tests put in the namespace before exec-ing an exercise cell and its check cell.
EXERCISE_PRELUDE = (
    "import torch\n"
    "from torch import nn\n"
    "import lora_course\n"
    "from lora_course import *\n"
    "from lora_course.exercises import *\n"
)

STUB_MESSAGE = "your code here"  # the text of the stub's NotImplementedError
EXPECTS = ("callable", "value")  # what a check receives: a function/class, or a plain value

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{6,}")
_MAX_MESSAGE = 160
#: seconds a check's hidden cases may run in all, unless the check sets its own ``time_limit_s``
CHECK_TIME_LIMIT_S = 30.0


@dataclass(frozen=True)
class Case:
    """One hidden case of a check.

    Attributes:
        args, kwargs: what the learner's function is called with.
        expected: the reference answer (computed from a real component, never typed).
        hint: a nudge specific to this case (default: the check's ``idea``).
        label: how the input is described in a hint (default: the call, e.g. ``f(3, 2)``).
        apply: how to get the answer from the candidate, for candidates that are not
            called directly (a class to instantiate, a value to inspect); default
            ``candidate(*args, **kwargs)``.
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    expected: Any = None
    hint: str | None = None
    label: str | None = None
    apply: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class ExerciseCheck:
    """A registered check: its hidden cases, its default nudge and how answers compare."""

    name: str
    cases: Callable[[], Iterable[Case]]
    idea: str
    expects: str
    compare: Callable[[Any, Any], str | None]
    formula: str | None = None
    time_limit_s: float | None = None  # None: CHECK_TIME_LIMIT_S


CHECKS: dict[str, ExerciseCheck] = {}

# Wrong answers per check in this kernel (a stub or placeholder is not counted): the second
# one unlocks the check's formula. reset_tries() starts over.
FAILED_TRIES: dict[str, int] = {}
_NOT_A_TRY = ("the function still raises NotImplementedError", "still the placeholder")


# ---------------------------------------------------------------- formatting (deterministic)


def _clean(text: str, limit: int = _MAX_MESSAGE) -> str:
    """One line, no memory addresses, at most ``limit`` characters."""
    text = _ADDRESS_RE.sub("0x...", " ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fmt(value: Any) -> str:
    """A short, deterministic description of ``value`` (floats to 4 significant digits)."""
    if value is Ellipsis:
        return "..."
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return f"{float(value):.4g}"
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 and value.device.type != "meta":
            return f"tensor({fmt(value.item())})"
        return f"tensor of shape {tuple(value.shape)} ({str(value.dtype).replace('torch.', '')})"
    if isinstance(value, str):
        return _clean(repr(value), 60)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(fmt(v) for v in value[:6]) + (", ..." if len(value) > 6 else "")
        return f"({inner}{',' if len(value) == 1 else ''})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, type):
        return f"class {value.__name__}"
    if isinstance(value, nn.Module):
        return f"{type(value).__name__} module"
    if callable(value):
        return f"function {_callable_name(value)}"
    return f"a value of type {type(value).__name__}"


def _callable_name(candidate: Any) -> str:
    name = getattr(candidate, "__name__", "")
    return name if isinstance(name, str) and name.isidentifier() else "fn"


def _describe_call(candidate: Any, case: Case) -> str:
    if case.label is not None:
        return case.label
    parts = [fmt(a) for a in case.args] + [f"{k}={fmt(v)}" for k, v in case.kwargs.items()]
    return f"{_callable_name(candidate)}({', '.join(parts)})"


# ---------------------------------------------------------------- comparing answers


def _as_number(value: Any) -> float | None:
    """``value`` as a float if it is a plain number or a one-element tensor, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.device.type != "meta":
        return float(value.item())
    return None


def compare_values(expected: Any, got: Any, rtol: float = 1e-5, atol: float = 1e-6) -> str | None:
    """None if ``got`` matches ``expected``, else what differs (``"got 9, expected 6"``).

    Integers must match exactly (``6.0`` counts as ``6``), floats and tensors to
    ``rtol``/``atol``; tensors must also have the expected shape; tuples and lists
    compare element by element.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"got {fmt(got)}, expected {fmt(expected)}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"got a tensor of shape {tuple(got.shape)}, expected shape {tuple(expected.shape)}"
        g, e = got.detach().double().cpu(), expected.detach().double().cpu()
        if torch.allclose(g, e, rtol=rtol, atol=atol, equal_nan=True):
            return None
        diff = (g - e).abs().nan_to_num(nan=float("inf"))
        index = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        return (
            f"values differ: at index {index} got {fmt(g[index].item())}, expected "
            f"{fmt(e[index].item())} (max |difference| {fmt(diff.max().item())})"
        )
    if isinstance(expected, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            return f"got {fmt(got)}, expected {len(expected)} values like {fmt(expected)}"
        for i, (e, g) in enumerate(zip(expected, got)):
            problem = compare_values(e, g, rtol, atol)
            if problem is not None:
                return f"value {i}: {problem}"
        return None
    if isinstance(expected, bool) or expected is None:
        ok = got is expected or (isinstance(got, bool) and got == expected)
        return None if ok else f"got {fmt(got)}, expected {fmt(expected)}"
    if isinstance(expected, numbers.Real):
        number = _as_number(got)
        if number is None:
            return f"got {fmt(got)}, expected the number {fmt(expected)}"
        if isinstance(expected, numbers.Integral):
            ok = number == int(expected)
        else:
            ok = math.isclose(number, float(expected), rel_tol=rtol, abs_tol=atol)
        return None if ok else f"got {fmt(got)}, expected {fmt(expected)}"
    return None if got == expected else f"got {fmt(got)}, expected {fmt(expected)}"


# ---------------------------------------------------------------- registry and runner


def exercise_check(
    name: str,
    *,
    cases: Callable[[], Iterable[Case]],
    idea: str,
    expects: str = "callable",
    compare: Callable[[Any, Any], str | None] = compare_values,
    formula: str | None = None,
    time_limit_s: float | None = None,
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register check ``name`` and turn the decorated ``check_<name>`` into its runner.

    Args:
        name: the check's name; the decorated function must be called ``check_<name>``.
        cases: returns the hidden cases (called on every check, under a forked RNG).
        idea: the default nudge shown with a wrong answer (the idea, not the answer).
        expects: ``"callable"`` (a function or class) or ``"value"``.
        compare: ``compare(expected, got) -> None`` when right, else what differs.
        formula: the second-level hint, shown from the second wrong answer in a kernel on
            (the formula or the recipe itself; the ``idea`` and case hints stay nudges).
        time_limit_s: seconds the hidden cases may run in all (default
            :data:`CHECK_TIME_LIMIT_S`); past it the check stops and says so.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name={name!r} is not a valid check name; allowed values: lower_snake_case identifiers")
    if expects not in EXPECTS:
        raise ValueError(f"expects={expects!r} is not supported; allowed values: {', '.join(EXPECTS)}")
    if not idea.strip():
        raise ValueError("idea='' is empty; allowed values: a non-empty nudge toward the idea")
    if formula is not None and not formula.strip():
        raise ValueError("formula='' is empty; allowed values: None or the formula shown after a second wrong answer")
    if time_limit_s is not None and (isinstance(time_limit_s, bool) or not isinstance(time_limit_s, numbers.Real)
                                     or not 0 < time_limit_s < math.inf):
        raise ValueError(f"time_limit_s={time_limit_s!r} is not allowed; allowed values: None or a number of seconds > 0")

    def register(func: Callable[[Any], None]) -> Callable[[Any], None]:
        if func.__name__ != f"check_{name}":
            raise ValueError(
                f"the function for check {name!r} is called {func.__name__!r}; allowed value: 'check_{name}'"
            )
        if name in CHECKS:
            raise ValueError(f"name={name!r} is already registered; allowed values: a new name, not {sorted(CHECKS)}")
        CHECKS[name] = ExerciseCheck(name, cases, idea, expects, compare, formula, time_limit_s)

        @functools.wraps(func)
        def check(candidate: Any) -> None:
            passed, message = run_check(name, candidate)
            print(format_report(name, passed, with_hint_level(name, passed, message)))

        return check

    return register


def is_a_try(message: str) -> bool:
    """False for the messages of a leftover stub or placeholder (no answer yet), else True."""
    return not message.startswith(_NOT_A_TRY)


def with_hint_level(name: str, passed: bool, message: str) -> str:
    """``message`` after counting a wrong answer to check ``name``: the formula from the second on.

    The first wrong answer keeps the nudge and says that another try shows the formula;
    every later one appends ``Formula: ...`` (when the check has one).
    """
    spec = CHECKS[name]
    if passed or not is_a_try(message) or spec.formula is None:
        return message
    FAILED_TRIES[name] = FAILED_TRIES.get(name, 0) + 1
    if FAILED_TRIES[name] == 1:
        return f"{message} (fix it and check again; a second miss shows the formula)"
    return f"{message} Formula: {' '.join(spec.formula.split())}"


def reset_tries(name: str | None = None) -> None:
    """Forget the wrong answers counted for check ``name`` (all checks if None)."""
    if name is None:
        FAILED_TRIES.clear()
    else:
        FAILED_TRIES.pop(name, None)


def format_report(name: str, passed: bool, message: str) -> str:
    """The one line a check prints: ``PASS check_<name>: ...`` or ``NOT YET check_<name>: ...``."""
    return f"{'PASS' if passed else 'NOT YET'} check_{name}: {message}"


class CheckTimeout(BaseException):
    """Raised inside a check that ran past its time limit (a ``BaseException``, so that a
    learner's ``except Exception`` does not swallow it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`CheckTimeout` in this thread if the block runs longer than ``seconds``.

    In the main thread (where Jupyter runs a cell on Linux) a ``SIGALRM`` timer: it also
    interrupts ``time.sleep`` and blocking calls, and it fires again every 0.5 s should the
    code swallow the first one (a bare ``except:``); from the second alarm on, a trace
    function raises the exception on every line, so it also leaves the ``except`` block that
    swallowed it. Elsewhere a watchdog thread raises the exception in this thread between
    two bytecodes (``PyThreadState_SetAsyncExc``), again every 0.5 s (there a bare ``except:``
    inside the loop can still defeat it). Neither can stop a
    single long C call (one huge matmul); the exception comes when it returns. The previous
    ``SIGALRM`` handler, timer and trace function are put back afterwards.
    """
    state = {"active": True, "fired": False}
    old_trace = sys.gettrace()

    def raise_on_every_line(frame, event, arg):
        if not state["active"]:
            return None
        if event == "line":  # not on "exception": an error there only unsets the trace function
            raise CheckTimeout
        return raise_on_every_line

    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        def on_alarm(signum, frame):
            if not state["active"]:
                return
            if state["fired"]:  # the first one was swallowed: trace every line from here on
                sys.settrace(raise_on_every_line)
                while frame is not None:
                    frame.f_trace = raise_on_every_line
                    frame = frame.f_back
            state["fired"] = True
            raise CheckTimeout
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        old_timer = signal.setitimer(signal.ITIMER_REAL, seconds, 0.5)
        started = time.monotonic()
        try:
            yield
        finally:
            state["active"] = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            sys.settrace(old_trace)
            signal.signal(signal.SIGALRM, old_handler)
            if old_timer[0] > 0:  # someone else's timer: re-arm what is left of it
                left = max(old_timer[0] - (time.monotonic() - started), 1e-3)
                signal.setitimer(signal.ITIMER_REAL, left, old_timer[1])
        return
    lock, ident = threading.Lock(), threading.get_ident()
    set_async = ctypes.pythonapi.PyThreadState_SetAsyncExc

    def watchdog() -> None:
        deadline = time.monotonic() + seconds
        while True:
            time.sleep(max(min(deadline - time.monotonic(), 0.5), 0.01))
            with lock:
                if not state["active"]:
                    return
                if time.monotonic() >= deadline:
                    state["fired"] = True
                    set_async(ctypes.c_ulong(ident), ctypes.py_object(CheckTimeout))

    threading.Thread(target=watchdog, daemon=True, name="check-time-limit").start()
    try:
        yield
    finally:
        with lock:
            state["active"] = False
            if state["fired"]:  # drop an exception still pending for this thread
                set_async(ctypes.c_ulong(ident), None)


def _torch_globals() -> dict[str, Any]:
    """The global torch settings a learner's code may change: default dtype, grad mode,
    default device, anomaly detection."""
    return {"dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
            "device": torch.get_default_device(), "anomaly": torch.is_anomaly_enabled()}


def _restore_torch_globals(saved: dict[str, Any]) -> None:
    if torch.get_default_dtype() != saved["dtype"]:
        torch.set_default_dtype(saved["dtype"])
    torch.set_grad_enabled(saved["grad"])
    if torch.get_default_device() != saved["device"]:
        torch.set_default_device(None if saved["device"] == torch.device("cpu") else saved["device"])
    if torch.is_anomaly_enabled() != saved["anomaly"]:
        torch.set_anomaly_enabled(saved["anomaly"])


def run_check(name: str, candidate: Any) -> tuple[bool, str]:
    """Run the hidden cases of check ``name`` on ``candidate``: ``(passed, one-line message)``.

    Never raises for the learner's mistakes (exceptions, wrong answers, a leftover stub, a
    call to ``exit()``/``sys.exit()``, code that runs past the check's time limit: see
    :func:`time_limit`); the global RNG state and torch's global settings (default dtype,
    grad mode, default device, anomaly detection) are restored afterwards and whatever the
    candidate prints is swallowed, so the notebook's later outputs do not depend on the answer.

    Raises:
        ValueError: if ``name`` is not a registered check.
    """
    if name not in CHECKS:
        raise ValueError(f"name={name!r} is not a registered check; allowed values: {', '.join(sorted(CHECKS))}")
    spec = CHECKS[name]
    if candidate is Ellipsis:
        return False, "still the placeholder `...`: replace it with your solution in the exercise cell above"
    if spec.expects == "callable" and not callable(candidate):
        return False, (
            f"expected a function, got {fmt(candidate)}: pass the function itself, "
            f"e.g. check_{name}(my_function), not the result of calling it"
        )
    saved = _torch_globals()
    try:
        return _run_cases(spec, candidate)
    finally:
        _restore_torch_globals(saved)


def _run_cases(spec: ExerciseCheck, candidate: Any) -> tuple[bool, str]:
    """The hidden cases of ``spec`` on ``candidate`` (see :func:`run_check`). The time limit
    counts the candidate's calls only (building the cases may import slow libraries, and an
    import stopped half-way would break the kernel)."""
    budget = spec.time_limit_s or CHECK_TIME_LIMIT_S
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        cases = list(spec.cases())
        for case in cases:
            where = _describe_call(candidate, case) if spec.expects == "callable" else (case.label or "your value")
            hint = case.hint or spec.idea
            started = time.monotonic()
            try:
                with time_limit(max(budget, 1e-3)):
                    if case.apply is not None:
                        got = case.apply(candidate)
                    elif spec.expects == "value":
                        got = candidate
                    else:
                        got = candidate(*case.args, **case.kwargs)
            except CheckTimeout:
                limit = spec.time_limit_s or CHECK_TIME_LIMIT_S
                return False, (f"{where} was stopped: the hidden cases ran past the check's {limit:g} s limit; "
                               "does your code loop forever (a while loop whose condition never changes)?")
            except NotImplementedError as exc:
                if str(exc) == STUB_MESSAGE or not str(exc):
                    return False, (
                        "the function still raises NotImplementedError: "
                        "write your solution in the exercise cell above"
                    )
                return False, f"{where} raised NotImplementedError: {_clean(str(exc), 80)}. Hint: {hint}"
            except Exception as exc:  # the learner's code: any error becomes a hint
                return False, f"{where} raised {type(exc).__name__}: {_clean(str(exc), 80)}. Hint: {hint}"
            except SystemExit as exc:  # exit() / sys.exit() in an answer must not end the kernel
                return False, (f"{where} called exit() or sys.exit() (code {exc.code!r}); return a value "
                               f"instead. Hint: {hint}")
            budget -= time.monotonic() - started
            try:
                problem = spec.compare(case.expected, got)
            except Exception:  # an answer of a kind the comparison cannot handle
                problem = f"got {fmt(got)}, which cannot be compared with the expected {fmt(case.expected)}"
            if problem is not None:
                return False, _clean(f"{where}: {problem}. Hint: {hint}", 400)
    return True, f"{len(cases)} hidden case{'' if len(cases) == 1 else 's'}"


# ---------------------------------------------------------------- helpers for the chapters' cases


def seeded_tensors(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    """Standard-normal tensors of ``shapes`` from a generator seeded with ``seed`` (global RNG untouched)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


# ---------------------------------------------------------------- exercises in the reading flow


def use_or_fallback(candidate: Any, fallback: Any, check: str, name: str | None = None) -> Any:
    """The learner's ``candidate`` if it passes check ``check``, else the library's ``fallback``.

    The cell after an exercise's check cell calls it so that every later cell of the
    notebook runs, with the learner's code once it is right and with ``fallback`` (the
    library's implementation, or the measured value) while the exercise is a stub or
    wrong. Prints one line saying which one is in use (the hidden cases are run again, in
    silence: the check cell above already gave the hint, and this call is not a try).

    Args:
        candidate: the learner's function, class or value.
        fallback: what to use instead; it must pass the same check (a library bug otherwise).
        check: the registered check's name, e.g. ``"lora_forward"``.
        name: how to call ``candidate`` in the printed line (default: its ``__name__``,
            or ``"value"``).

    Raises:
        ValueError: if ``check`` is not registered.
        AssertionError: if ``fallback`` itself fails the check.
    """
    passed, message = run_check(check, candidate)
    label = name or (_callable_name(candidate) if callable(candidate) else "value")
    if passed:
        print(f"using your {label}: it passes check_{check} ({message})")
        return candidate
    fallback_passed, fallback_message = run_check(check, fallback)
    assert fallback_passed, f"the fallback for check_{check} fails its own check: {fallback_message}"
    what = f"lora_course's {_callable_name(fallback)}" if callable(fallback) else "the reference value"
    reason = "not written yet" if not is_a_try(message) else f"it does not pass check_{check} yet"
    print(f"using {what} instead of your {label} ({reason}); the cells below run with it")
    return fallback
