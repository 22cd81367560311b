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
import functools
import io
import math
import numbers
import re
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
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name={name!r} is not a valid check name; allowed values: lower_snake_case identifiers")
    if expects not in EXPECTS:
        raise ValueError(f"expects={expects!r} is not supported; allowed values: {', '.join(EXPECTS)}")
    if not idea.strip():
        raise ValueError("idea='' is empty; allowed values: a non-empty nudge toward the idea")
    if formula is not None and not formula.strip():
        raise ValueError("formula='' is empty; allowed values: None or the formula shown after a second wrong answer")

    def register(func: Callable[[Any], None]) -> Callable[[Any], None]:
        if func.__name__ != f"check_{name}":
            raise ValueError(
                f"the function for check {name!r} is called {func.__name__!r}; allowed value: 'check_{name}'"
            )
        if name in CHECKS:
            raise ValueError(f"name={name!r} is already registered; allowed values: a new name, not {sorted(CHECKS)}")
        CHECKS[name] = ExerciseCheck(name, cases, idea, expects, compare, formula)

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


def run_check(name: str, candidate: Any) -> tuple[bool, str]:
    """Run the hidden cases of check ``name`` on ``candidate``: ``(passed, one-line message)``.

    Never raises for the learner's mistakes (exceptions, wrong answers, a leftover stub);
    the global RNG state is restored afterwards and whatever the candidate prints is
    swallowed, so the notebook's later outputs do not depend on the answer.

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
    with torch.random.fork_rng(devices=[]), contextlib.redirect_stdout(io.StringIO()):
        cases = list(spec.cases())
        for case in cases:
            where = _describe_call(candidate, case) if spec.expects == "callable" else (case.label or "your value")
            hint = case.hint or spec.idea
            try:
                if case.apply is not None:
                    got = case.apply(candidate)
                elif spec.expects == "value":
                    got = candidate
                else:
                    got = candidate(*case.args, **case.kwargs)
            except NotImplementedError as exc:
                if str(exc) == STUB_MESSAGE or not str(exc):
                    return False, (
                        "the function still raises NotImplementedError: "
                        "write your solution in the exercise cell above"
                    )
                return False, f"{where} raised NotImplementedError: {_clean(str(exc), 80)}. Hint: {hint}"
            except Exception as exc:  # the learner's code: any error becomes a hint
                return False, f"{where} raised {type(exc).__name__}: {_clean(str(exc), 80)}. Hint: {hint}"
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
