"""Exercises: the check mechanism, solution stripping, and the notebooks' exercise cells.

For every notebooks/[0-9]*.ipynb: its learner copy in notebooks/exercises/ is up to date,
and each exercise's solution passes its check while the stub fails it with a hint.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from torch import nn

from lora_course import exercises
from lora_course.exercises import (
    CHECKS,
    EXERCISE_PRELUDE,
    Case,
    check_linear_param_count,
    compare_values,
    exercise_check,
    fmt,
    run_check,
)
from lora_course.notebook_tools.cli import main
from lora_course.notebook_tools.strip import (
    STUB_RAISE,
    exercise_pairs,
    strip_solutions,
    strip_source,
    write_learner_copies,
)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
LEARNER_DIR = ROOT / "notebooks" / "exercises"
FIXTURE = Path(__file__).parent / "fixtures" / "sample_exercises.ipynb"
NO_NOTEBOOKS = pytest.mark.skip(reason="no notebooks/[0-9]*.ipynb yet: nothing to check")


def _notebook_params() -> list:
    return [pytest.param(p, id=p.name) for p in NOTEBOOKS] or [pytest.param(None, marks=NO_NOTEBOOKS)]


# ---------------------------------------------------------------- helpers shared with the notebook tests


def run_cell_pair(exercise_source: str, check_source: str) -> str:
    """Exec an exercise cell then its check cell in a fresh prelude namespace; return what was printed."""
    namespace: dict = {"__name__": "__exercise__"}
    exec(EXERCISE_PRELUDE, namespace)
    exec(compile(exercise_source, "<exercise cell>", "exec"), namespace)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(check_source, "<check cell>", "exec"), namespace)
    return printed.getvalue()


def exercise_problems(nb: nbformat.NotebookNode, name: str) -> list[str]:
    """Exercise cells without a check cell, solutions that do not pass, stubs that do not fail clearly."""
    problems = []
    for ex, chk in exercise_pairs(nb):
        where = f"{name}, cell index {ex}"
        if chk is None:
            problems.append(f"{where}: the next code cell does not call a check_* function")
            continue
        solution = nb.cells[ex].source
        for version, source, want in [("solution", solution, "PASS"), ("stub", strip_source(solution, where), "NOT YET")]:
            try:
                printed = run_cell_pair(source, nb.cells[chk].source)
            except Exception as exc:
                problems.append(
                    f"{where} ({version}): exec raised {type(exc).__name__}: {exc}; exercise cells must be "
                    "self-contained apart from EXERCISE_PRELUDE and must not call the function they define"
                )
                continue
            lines = printed.strip().splitlines()
            if not lines:
                problems.append(f"{where} ({version}): the check cell printed nothing")
            for line in lines:
                head, _, hint = line.partition(": ")
                if not (head.startswith(f"{want} check_") and hint.strip()):
                    problems.append(f"{where} ({version}): expected '{want} check_...: <message>', got {line!r}")
    return problems


def learner_copy_difference(expected: nbformat.NotebookNode, path: Path) -> str | None:
    """None if the file at ``path`` holds ``expected``, else where they first differ."""
    if not path.exists():
        return f"{path.name} is missing from {path.parent.name}/"
    want = json.loads(nbformat.writes(expected))
    have = json.loads(path.read_text(encoding="utf-8"))
    if want == have:
        return None
    for i, (w, h) in enumerate(zip(want.get("cells", []), have.get("cells", []))):
        if w != h:
            return f"{path.name}: cell index {i} differs"
    if len(want.get("cells", [])) != len(have.get("cells", [])):
        return f"{path.name}: {len(have.get('cells', []))} cells, expected {len(want['cells'])}"
    return f"{path.name}: notebook metadata differs"


def _fixture_with_outputs() -> nbformat.NotebookNode:
    """The fixture notebook with outputs and execution counts, as after a run."""
    nb = nbformat.read(FIXTURE, as_version=4)
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            cell.outputs = [new_output("stream", name="stdout", text=f"output {count}\n")]
    return nb


# ---------------------------------------------------------------- the course notebooks


@pytest.mark.parametrize("path", _notebook_params())
def test_learner_copy_in_sync(path: Path) -> None:
    expected = strip_solutions(nbformat.read(path, as_version=4), path.name)
    difference = learner_copy_difference(expected, LEARNER_DIR / path.name)
    assert difference is None, f"{difference}: the learner copy is out of date; run `make exercises`"


def test_no_stale_learner_copies() -> None:
    copies = sorted(LEARNER_DIR.glob("[0-9]*.ipynb"))
    if not copies and not NOTEBOOKS:
        pytest.skip("no notebooks and no learner copies yet")
    stale = [p.name for p in copies if not (ROOT / "notebooks" / p.name).exists()]
    assert stale == [], f"learner copies without a notebook: {stale}; delete them from notebooks/exercises/"


@pytest.mark.parametrize("path", _notebook_params())
def test_exercises_pass_and_stubs_fail(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert exercise_pairs(nb), f"{path.name} has no cell tagged 'exercise'"
    problems = exercise_problems(nb, path.name)
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------- stripping, on the fixture


def test_strip_fixture_leaves_stubs_and_clears_outputs() -> None:
    nb = _fixture_with_outputs()
    before = copy.deepcopy(nb)
    learner = strip_solutions(nb, FIXTURE.name)
    assert nb == before, "strip_solutions must not modify its input"
    assert len(learner.cells) == len(nb.cells)
    for original, stripped in zip(nb.cells, learner.cells):
        assert stripped.metadata == original.metadata and stripped.get("id") == original.get("id")
        if stripped.cell_type == "code":
            assert stripped.outputs == [] and stripped.execution_count is None
            assert "BEGIN SOLUTION" not in stripped.source and "END SOLUTION" not in stripped.source
        if "exercise" not in original.metadata.get("tags", []):
            assert stripped.source == original.source
    function_stub = learner.cells[3].source
    assert f"\n    {STUB_RAISE}" in function_stub
    assert "in_features * out_features" not in function_stub
    assert function_stub.startswith("def linear_param_count(in_features: int, out_features: int, bias: bool = True) -> int:")
    assert '"""Number of parameters' in function_stub, "text outside the markers must stay"
    assert learner.cells[6].source == "count_fn = ..."
    assert learner.metadata == nb.metadata


def test_fixture_solutions_pass_and_stubs_fail_with_hints() -> None:
    nb = nbformat.read(FIXTURE, as_version=4)
    assert exercise_pairs(nb) == [(3, 4), (6, 7)]
    assert exercise_problems(nb, FIXTURE.name) == []
    learner = strip_solutions(nb, FIXTURE.name)
    assert run_cell_pair(nb.cells[3].source, nb.cells[4].source) == "PASS check_linear_param_count: 7 hidden cases\n"
    assert run_cell_pair(learner.cells[3].source, learner.cells[4].source) == (
        "NOT YET check_linear_param_count: the function still raises NotImplementedError: "
        "write your solution in the exercise cell above\n"
    )
    assert run_cell_pair(learner.cells[6].source, learner.cells[7].source).startswith(
        "NOT YET check_linear_param_count: still the placeholder `...`"
    )


def test_exercise_problems_catches_wrong_solution_and_missing_check() -> None:
    wrong = new_code_cell(
        "def f(i, o, bias=True):\n    # BEGIN SOLUTION\n    return i * o\n    # END SOLUTION", metadata={"tags": ["exercise"]}
    )
    nb = new_notebook(cells=[wrong, new_code_cell("check_linear_param_count(f)")])
    problems = exercise_problems(nb, "x.ipynb")
    assert len(problems) == 1 and "(solution)" in problems[0] and "NOT YET" in problems[0]
    calling = new_code_cell(
        "def f(i, o, bias=True):\n    # BEGIN SOLUTION\n    return i * o + (o if bias else 0)\n    # END SOLUTION\nf(1, 1)",
        metadata={"tags": ["exercise"]},
    )
    nb = new_notebook(cells=[calling, new_code_cell("check_linear_param_count(f)")])
    problems = exercise_problems(nb, "x.ipynb")
    assert len(problems) == 1 and "(stub)" in problems[0] and "NotImplementedError" in problems[0]
    nb = new_notebook(cells=[wrong, new_markdown_cell("text"), new_code_cell("print(1)")])
    assert exercise_pairs(nb) == [(0, None)]
    assert "does not call a check_* function" in exercise_problems(nb, "x.ipynb")[0]


def test_learner_copies_written_match_and_drift_is_caught(tmp_path: Path) -> None:
    source = tmp_path / "01_lora_from_scratch.ipynb"
    source.write_bytes(FIXTURE.read_bytes())
    out = tmp_path / "exercises"
    assert main(["strip", str(source), "--out", str(out)]) == 0
    expected = strip_solutions(nbformat.read(source, as_version=4), source.name)
    assert learner_copy_difference(expected, out / source.name) is None
    assert write_learner_copies([source], out) == [out / source.name]
    edited = nbformat.read(out / source.name, as_version=4)
    edited.cells[3].source += "\n# hand edit"
    nbformat.write(edited, out / source.name)
    assert learner_copy_difference(expected, out / source.name) == f"{source.name}: cell index 3 differs"
    assert "missing" in learner_copy_difference(expected, tmp_path / "none.ipynb")


def test_cli_with_unmatched_glob_does_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strip", str(tmp_path / "[0-9]*.ipynb"), "--out", str(tmp_path / "out")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert main(["strip", str(tmp_path / "missing.ipynb"), "--out", str(tmp_path / "out")]) == 2


@pytest.mark.parametrize(
    "source, expected",
    [
        (  # a method body: the stub keeps the method's indentation
            "class A:\n    def f(self):\n        x = 1\n        # BEGIN SOLUTION\n        return x + 1\n        # END SOLUTION",
            f"class A:\n    def f(self):\n        x = 1\n        {STUB_RAISE}",
        ),
        (  # markers at column 0 inside a function: indentation comes from the removed code
            "def f():\n# BEGIN SOLUTION\n    return 1\n# END SOLUTION",
            f"def f():\n    {STUB_RAISE}",
        ),
        (  # module level: every assigned name becomes `name = ...` (not the loop variable)
            "total = 0\n# BEGIN SOLUTION\nfor p in range(3):\n    total += p\na, (b, c) = 1, (2, 3)\n# END SOLUTION\nprint(total)",
            "total = 0\ntotal = ...\na = ...\nb = ...\nc = ...\nprint(total)",
        ),
        (  # module level with no assignment: a bare `...`, indented inside a with block
            "import torch\nwith torch.no_grad():\n    # BEGIN SOLUTION\n    print(1)\n    # END SOLUTION",
            "import torch\nwith torch.no_grad():\n    ...",
        ),
        (  # two blocks in one cell
            "def f():\n    # BEGIN SOLUTION\n    return 1\n    # END SOLUTION\n\n# BEGIN SOLUTION\ny: int = f()\n# END SOLUTION",
            f"def f():\n    {STUB_RAISE}\n\ny = ...",
        ),
    ],
)
def test_strip_source_stub_rule(source: str, expected: str) -> None:
    assert strip_source(source) == expected


@pytest.mark.parametrize(
    "source, tagged, message",
    [
        ("x = 1", True, "has no '# BEGIN SOLUTION'"),
        ("# BEGIN SOLUTION\nx = 1", True, "has no '# END SOLUTION'"),
        ("x = 1\n# END SOLUTION", True, "has no '# BEGIN SOLUTION' before it"),
        ("# BEGIN SOLUTION\n# BEGIN SOLUTION\nx = 1\n# END SOLUTION\n# END SOLUTION", True, "nested"),
        ("# BEGIN SOLUTION\n# just a comment\n# END SOLUTION", True, "no code between the markers"),
        ("# BEGIN SOLUTION\ndef f():\n    return 1\n# END SOLUTION", True, "whole def/class"),
        ("%time x = 1\n# BEGIN SOLUTION\nx = 1\n# END SOLUTION", True, "not plain Python"),
        ("if True:\n    # BEGIN SOLUTION\n    x = 1\n    # END SOLUTION\nelse:\n    y = 2", False, "not tagged 'exercise'"),
    ],
)
def test_strip_errors_name_notebook_and_cell(source: str, tagged: bool, message: str) -> None:
    cell = new_code_cell(source, metadata={"tags": ["exercise"]} if tagged else {})
    nb = new_notebook(cells=[new_markdown_cell("# t"), cell])
    with pytest.raises(ValueError) as info:
        strip_solutions(nb, "05_qlora.ipynb")
    assert "05_qlora.ipynb, cell index 1" in str(info.value)
    assert message in str(info.value)


def test_markers_in_markdown_are_left_alone() -> None:
    text = "Write your answer between `# BEGIN SOLUTION` and\n# END SOLUTION\nlines."
    nb = new_notebook(cells=[new_markdown_cell(text)])
    assert strip_solutions(nb, "00_setup_and_tour.ipynb").cells[0].source == text


# ---------------------------------------------------------------- the check mechanism


def _linear_count(in_features: int, out_features: int, bias: bool = True) -> int:
    return in_features * out_features + (out_features if bias else 0)


def test_linear_param_count_matches_real_layers() -> None:
    cases = list(exercises.chapter(0)._linear_param_count_cases())
    assert any(c.kwargs.get("bias") is False for c in cases) and any("bias" not in c.kwargs for c in cases)
    for case in cases:  # real CPU layers (skip_init: allocated, not initialised)
        layer = nn.utils.skip_init(nn.Linear, *case.args, **case.kwargs)
        assert case.expected == sum(p.numel() for p in layer.parameters())
    assert run_check("linear_param_count", _linear_count) == (True, f"{len(cases)} hidden cases")


def test_check_prints_exactly_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def noisy(in_features: int, out_features: int, bias: bool = True) -> int:
        print("debugging", in_features)
        return _linear_count(in_features, out_features, bias)

    check_linear_param_count(noisy)
    assert capsys.readouterr().out == "PASS check_linear_param_count: 7 hidden cases\n"
    check_linear_param_count(lambda i, o, bias=True: i * o + o)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.startswith("NOT YET check_linear_param_count: ")


@pytest.mark.parametrize(
    "candidate, pieces",
    [
        (lambda i, o, bias=True: i * o + o, ["fn(3, 2, bias=False): got 8, expected 6", "Hint: with bias=False"]),
        (lambda i, o, bias=True: i * o, ["fn(3, 2, bias=True): got 6, expected 8", "Hint: count the entries"]),
        (lambda i, o: i * o + o, ["fn(3, 2, bias=True) raised TypeError", "unexpected keyword argument 'bias'"]),
        (lambda i, o, bias=True: (i * o + o) / 3 if bias else i * o, ["got 2.667, expected 8"]),
        (lambda i, o, bias=True: "8", ["got '8', expected the number 8"]),
        (lambda i, o, bias=True: True, ["got True, expected the number 8"]),
        (..., ["still the placeholder `...`"]),
        (8, ["expected a function, got 8", "pass the function itself"]),
    ],
)
def test_wrong_answers_give_a_hint(candidate: object, pieces: list[str]) -> None:
    passed, message = run_check("linear_param_count", candidate)
    assert passed is False
    for piece in pieces:
        assert piece in message
    assert "\n" not in message


def test_stub_and_errors_are_reported_not_raised() -> None:
    def stub(in_features: int, out_features: int, bias: bool = True) -> int:
        raise NotImplementedError("your code here")

    assert run_check("linear_param_count", stub) == (
        False,
        "the function still raises NotImplementedError: write your solution in the exercise cell above",
    )

    def broken(in_features: int, out_features: int, bias: bool = True) -> int:
        raise RuntimeError(f"bad object {object()}\nsecond line")

    passed, message = run_check("linear_param_count", broken)
    assert not passed and "broken(3, 2, bias=True) raised RuntimeError: bad object <object object at 0x...> second line" in message
    assert run_check("linear_param_count", broken) == (passed, message), "the text must be deterministic"
    with pytest.raises(ValueError, match="'nope'.*allowed values: .*linear_param_count"):
        run_check("nope", stub)


def test_checks_do_not_move_the_global_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_check("linear_param_count", lambda i, o, bias=True: torch.rand(1).item())
    run_check("linear_param_count", _linear_count)
    assert torch.equal(torch.rand(3), expected)


def test_compare_values_rounds_and_locates() -> None:
    assert compare_values(6, 6.0) is None and compare_values(6, torch.tensor(6)) is None
    assert compare_values(0.1 + 0.2, 0.3) is None
    assert compare_values(1 / 3, 0.3334) == "got 0.3334, expected 0.3333"
    expected = torch.zeros(2, 3)
    got = expected.clone()
    got[1, 2] = 0.5
    assert compare_values(expected, got) == "values differ: at index (1, 2) got 0.5, expected 0 (max |difference| 0.5)"
    assert compare_values(expected, torch.zeros(3, 2)) == "got a tensor of shape (3, 2), expected shape (2, 3)"
    assert compare_values((1, expected), (1, torch.zeros(2, 3))) is None
    assert compare_values((1, 2), (1, 3)) == "value 1: got 3, expected 2"
    assert fmt(2 / 3) == "0.6667" and fmt(torch.ones(2, 2)) == "tensor of shape (2, 2) (float32)"


def test_registry_lists_every_check_and_exports_it() -> None:
    assert "linear_param_count" in CHECKS
    for name in CHECKS:
        func = getattr(exercises, f"check_{name}")
        assert callable(func) and func.__doc__, f"check_{name} needs a docstring"
        assert f"check_{name}" in exercises.__all__
    namespace: dict = {}
    exec(EXERCISE_PRELUDE, namespace)
    assert all(f"check_{name}" in namespace for name in CHECKS)


def test_each_chapter_module_holds_its_notebooks_checks() -> None:
    """chapter(NN) defines exactly the registered checks that notebooks/NN_*.ipynb calls."""
    calls = re.compile(r"\bcheck_([a-z0-9_]+)\s*\(")
    for path in NOTEBOOKS:
        number = int(path.name[:2])
        called = {f"check_{n}" for n in calls.findall(path.read_text(encoding="utf-8")) if n in CHECKS}
        module = exercises.chapter(number)
        defined = {name for name, obj in vars(module).items()
                   if name.startswith("check_") and getattr(obj, "__module__", None) == module.__name__}
        assert defined == called, f"{path.name}: lora_course/exercises/ch{number:02d}.py defines {sorted(defined)}"
    assert sum(len([n for n in vars(m) if n.startswith("check_")]) for m in exercises.CHAPTERS.values()) == len(CHECKS)
    for bad in (16, -1, "5", 5.0, True):
        with pytest.raises(ValueError, match=f"number={bad!r} has no chapter"):
            exercises.chapter(bad)


def test_adding_a_check_takes_a_few_lines(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(exercises.framework, "CHECKS", dict(exercises.CHECKS))  # the registry the runner uses

    def cases():
        for x in (2, -3):
            yield Case(args=(x,), expected=x * x)

    @exercise_check("square", cases=cases, idea="multiply the number by itself")
    def check_square(fn) -> None:
        """Check ``fn(x) -> x * x``."""

    check_square(lambda x: x * x)
    check_square(lambda x: 2 * x)
    assert capsys.readouterr().out.splitlines() == [
        "PASS check_square: 2 hidden cases",
        "NOT YET check_square: fn(-3): got -6, expected 9. Hint: multiply the number by itself",
    ]
    assert check_square.__doc__ == "Check ``fn(x) -> x * x``."
    with pytest.raises(ValueError, match="already registered"):
        exercise_check("square", cases=cases, idea="x")(check_square)
    with pytest.raises(ValueError, match="allowed value: 'check_cube'"):
        exercise_check("cube", cases=cases, idea="x")(check_square)
    with pytest.raises(ValueError, match="expects='module'.*allowed values: callable, value"):
        exercise_check("cube", cases=cases, idea="x", expects="module")
    with pytest.raises(ValueError, match="name='Bad Name'"):
        exercise_check("Bad Name", cases=cases, idea="x")

    @exercise_check("rank", cases=lambda: [Case(expected=4, label="rank")], idea="r is the inner size", expects="value")
    def check_rank(value) -> None:
        """Check a value."""

    assert exercises.run_check("rank", 4) == (True, "1 hidden case")
    assert exercises.run_check("rank", 5) == (False, "rank: got 5, expected 4. Hint: r is the inner size")


def test_hints_come_in_two_levels(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """First wrong answer: the nudge; second and later: the nudge plus the formula; stubs are not tries."""
    monkeypatch.setattr(exercises.framework, "CHECKS", dict(exercises.CHECKS))
    monkeypatch.setattr(exercises.framework, "FAILED_TRIES", {})

    @exercise_check("double", cases=lambda: [Case(args=(3,), expected=6)], idea="think of adding x to itself",
                    formula="f(x) = 2 * x")
    def check_double(fn) -> None:
        """Check ``fn(x) -> 2 x``."""

    def stub(x):
        raise NotImplementedError("your code here")

    check_double(stub)      # not a try
    check_double(...)       # not a try
    check_double(lambda x: x + 1)
    check_double(lambda x: x * 3)
    check_double(lambda x: x * 4)
    check_double(lambda x: 2 * x)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["NOT YET check_double"] * 5 + ["PASS check_double"]
    assert not any("Formula" in line or "second miss" in line for line in lines[:2])
    assert lines[2].endswith("Hint: think of adding x to itself (fix it and check again; a second miss shows the formula)")
    assert "2 * x" not in lines[2]
    assert lines[3].endswith("Hint: think of adding x to itself Formula: f(x) = 2 * x")
    assert lines[4].endswith("Formula: f(x) = 2 * x")
    exercises.reset_tries("double")
    check_double(lambda x: x)
    assert "Formula" not in capsys.readouterr().out
    with pytest.raises(ValueError, match="formula=''"):
        exercise_check("triple", cases=lambda: [], idea="x", formula=" ")


def test_use_or_fallback_keeps_a_right_answer_and_replaces_stubs_and_wrong_ones(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(exercises.framework, "CHECKS", dict(exercises.CHECKS))
    monkeypatch.setattr(exercises.framework, "FAILED_TRIES", {})

    @exercise_check("halve", cases=lambda: [Case(args=(4,), expected=2.0)], idea="split in two", formula="x / 2")
    def check_halve(fn) -> None:
        """Check ``fn(x) -> x / 2``."""

    def reference(x):
        return x / 2

    def mine(x):
        return x * 0.5

    def stub(x):
        raise NotImplementedError("your code here")

    assert exercises.use_or_fallback(mine, reference, "halve") is mine
    assert exercises.use_or_fallback(stub, reference, "halve") is reference
    assert exercises.use_or_fallback(lambda x: x, reference, "halve", name="my_halve") is reference
    assert exercises.use_or_fallback(..., reference, "halve", name="halve") is reference
    assert capsys.readouterr().out.splitlines() == [
        "using your mine: it passes check_halve (1 hidden case)",
        "using lora_course's reference instead of your stub (not written yet); the cells below run with it",
        "using lora_course's reference instead of your my_halve (it does not pass check_halve yet); "
        "the cells below run with it",
        "using lora_course's reference instead of your halve (not written yet); the cells below run with it",
    ]
    assert exercises.framework.FAILED_TRIES == {}, "use_or_fallback is not a try: it must not unlock the formula"
    with pytest.raises(AssertionError, match="fallback for check_halve fails its own check"):
        exercises.use_or_fallback(stub, lambda x: x, "halve")
    with pytest.raises(ValueError, match="not a registered check"):
        exercises.use_or_fallback(mine, reference, "no_such_check")
    assert "use_or_fallback" in exercises.__all__
