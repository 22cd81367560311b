"""Self-checking exercises: ``check_*`` functions that run hidden cases and give hints.

How an exercise works in a notebook
-----------------------------------
* The exercise cell is a code cell tagged ``exercise`` (cell metadata ``tags``). Its
  solution sits between a ``# BEGIN SOLUTION`` and a ``# END SOLUTION`` comment line;
  ``make exercises`` replaces that block with a stub in the learner copy
  (see :mod:`lora_course.notebook_tools` for the stub rule).
* The next code cell calls one check with the learner's object, e.g.
  ``check_linear_param_count(linear_param_count)``. It prints exactly one line:
  ``PASS check_<name>: <k> hidden cases`` or ``NOT YET check_<name>: <hint>``.
* Exercise cells must be self-contained apart from :data:`EXERCISE_PRELUDE`
  (``import torch``, ``from torch import nn``, ``import lora_course``,
  ``from lora_course import *``, ``from lora_course.exercises import *``): the tests exec
  each exercise cell (solution, then stub) and its check cell in a fresh namespace holding
  only those names. A notebook may define things earlier, but the exercise cell must
  re-import or re-define what it needs, or receive it as an argument. The exercise cell
  must also run without error in its stub form: define the function, do not call it there.

The text a check prints is deterministic (no memory addresses, no timings, floats rounded
to 4 significant digits), so notebooks that show it pass nbval on any machine. A check
never raises because of the learner's code: an exception, a wrong answer or a leftover
stub becomes a ``NOT YET`` line that names the failing input, the expected and the
obtained value, and a nudge toward the idea.

Adding a check (later chapters)
-------------------------------
Write a generator of :class:`Case` objects (the expected values computed from a real
reference, e.g. ``torch.nn.Linear`` or PEFT) and register a public function whose body
is only its docstring::

    def _my_cases() -> Iterator[Case]:
        yield Case(args=(3,), expected=9)

    @exercise_check("square", cases=_my_cases, idea="multiply the number by itself")
    def check_square(fn: Callable[[int], int]) -> None:
        \"\"\"Check ``fn(x) -> x * x``.\"\"\"

The decorator supplies the behaviour (run the cases, print one line) and registers the
check in :data:`CHECKS`, which the tests use to list every check.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import numbers
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
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


CHECKS: dict[str, ExerciseCheck] = {}


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
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register check ``name`` and turn the decorated ``check_<name>`` into its runner.

    Args:
        name: the check's name; the decorated function must be called ``check_<name>``.
        cases: returns the hidden cases (called on every check, under a forked RNG).
        idea: the default nudge shown with a wrong answer (the idea, not the answer).
        expects: ``"callable"`` (a function or class) or ``"value"``.
        compare: ``compare(expected, got) -> None`` when right, else what differs.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name={name!r} is not a valid check name; allowed values: lower_snake_case identifiers")
    if expects not in EXPECTS:
        raise ValueError(f"expects={expects!r} is not supported; allowed values: {', '.join(EXPECTS)}")
    if not idea.strip():
        raise ValueError("idea='' is empty; allowed values: a non-empty nudge toward the idea")

    def register(func: Callable[[Any], None]) -> Callable[[Any], None]:
        if func.__name__ != f"check_{name}":
            raise ValueError(
                f"the function for check {name!r} is called {func.__name__!r}; allowed value: 'check_{name}'"
            )
        if name in CHECKS:
            raise ValueError(f"name={name!r} is already registered; allowed values: a new name, not {sorted(CHECKS)}")
        CHECKS[name] = ExerciseCheck(name, cases, idea, expects, compare)

        @functools.wraps(func)
        def check(candidate: Any) -> None:
            passed, message = run_check(name, candidate)
            print(format_report(name, passed, message))

        return check

    return register


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


# ---------------------------------------------------------------- the checks


def _linear_param_count_cases() -> Iterator[Case]:
    # Expected values come from real nn.Linear layers; the meta device gives the shapes
    # without allocating memory or drawing random numbers.
    for args, kwargs, hint in [
        ((3, 2), {"bias": True}, None),
        ((1, 1), {}, "bias defaults to True, as in nn.Linear"),
        ((3, 2), {"bias": False}, "with bias=False the layer has no bias vector"),
        ((768, 768), {}, None),
        ((768, 3072), {"bias": True}, "in_features and out_features play different roles when they differ"),
        ((4096, 11008), {"bias": False}, "with bias=False the layer has no bias vector"),
        ((5, 1), {"bias": False}, None),
    ]:
        layer = nn.Linear(*args, **kwargs, device="meta")
        yield Case(args=args, kwargs=kwargs, expected=sum(p.numel() for p in layer.parameters()), hint=hint)


@exercise_check(
    "linear_param_count",
    cases=_linear_param_count_cases,
    idea=(
        "count the entries of every tensor the layer stores; "
        "list them with [p.shape for p in nn.Linear(3, 2).parameters()]"
    ),
)
def check_linear_param_count(fn: Callable[..., int]) -> None:
    """Check ``fn(in_features, out_features, bias=True)`` -> the parameter count of ``nn.Linear``."""


# ---------------------------------------------------------------- chapter 01: LoRA


def _seeded_tensors(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen) for shape in shapes]


def _lora_forward_cases() -> Iterator[Case]:
    import copy

    from .lora import LoRALinear

    for seed, (d_in, d_out, r, alpha, bias, lead) in enumerate(
        [(16, 8, 4, 8.0, True, (3,)), (32, 32, 8, 16.0, False, (2, 5)), (10, 20, 1, 1.0, True, (4,))]
    ):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out, bias=bias)
        A, B, x = _seeded_tensors(seed, (r, d_in), (d_out, r), lead + (d_in,))
        reference = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
        with torch.no_grad():
            reference.lora_A.copy_(A)
            reference.lora_B.copy_(B)
            expected = reference(x)

        def apply(cls: Any, base=base, A=A, B=B, x=x, r=r, alpha=alpha) -> torch.Tensor:
            layer = cls(copy.deepcopy(base), r=r, alpha=alpha)
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
                return layer(x)

        yield Case(
            expected=expected,
            apply=apply,
            label=f"layer(nn.Linear({d_in}, {d_out}, bias={bias}), r={r}, alpha={alpha}) on x of shape {lead + (d_in,)}",
            hint=None if r > 1 else "the scaling is alpha / r; with r=1 it is alpha itself",
        )


@exercise_check(
    "lora_forward",
    cases=_lora_forward_cases,
    idea="the output is the frozen layer's output plus the low-rank branch x -> A -> B, times self.scaling",
)
def check_lora_forward(layer_class: type) -> None:
    """Check a LoRA layer class whose ``forward`` must equal ``lora_course.LoRALinear``'s."""


def _lora_trainable_params_cases() -> Iterator[Case]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .lora import add_lora, count_parameters

    all_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    configs = [
        ("tiny Llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), 8, ["q_proj", "v_proj"]),
        ("tiny Llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2), 4, all_targets),
        ("7B-shaped Llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32), 8, ["q_proj", "v_proj"]),
        ("8B-shaped Llama with GQA", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8), 16, ["k_proj", "v_proj", "o_proj"]),
        ("MLP only", dict(hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8), 2, ["gate_proj", "up_proj", "down_proj"]),
    ]
    for label, fields, r, targets in configs:
        config = LlamaConfig(vocab_size=1000, **fields)
        with torch.device("meta"):
            model = add_lora(LlamaForCausalLM(config), targets, r=r)
        gqa = fields["num_key_value_heads"] < fields["num_attention_heads"]
        yield Case(
            args=(config, r, targets),
            expected=count_parameters(model)[0],
            label=f"{label}, r={r}, targets={targets}",
            hint="k_proj and v_proj output num_key_value_heads * head_dim features, not hidden_size" if gqa and {"k_proj", "v_proj"} & set(targets) else None,
        )


@exercise_check(
    "lora_trainable_params",
    cases=_lora_trainable_params_cases,
    idea="each adapted (in x out) layer adds r * (in + out); every decoder layer has one of each target",
)
def check_lora_trainable_params(fn: Callable[..., int]) -> None:
    """Check ``fn(config, r, targets)`` against ``count_parameters(add_lora(...))`` on meta models."""


def _merge_weight_cases() -> Iterator[Case]:
    import copy

    from transformers.pytorch_utils import Conv1D

    from .lora import LoRALinear

    for seed, (kind, d_in, d_out, r, alpha) in enumerate(
        [("linear", 16, 8, 4, 8.0), ("linear", 6, 6, 2, 1.0), ("conv1d", 6, 12, 3, 6.0)]
    ):
        torch.manual_seed(seed)
        base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
        layer = LoRALinear(copy.deepcopy(base), r=r, alpha=alpha)
        A, B = _seeded_tensors(seed, (r, d_in), (d_out, r))
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        layer.merge()
        fan_in_fan_out = kind == "conv1d"
        yield Case(
            args=(base.weight.detach().clone(), A, B, alpha / r),
            kwargs={"fan_in_fan_out": fan_in_fan_out},
            expected=layer.base.weight.detach().clone(),
            label=f"merge_weight({'Conv1D' if fan_in_fan_out else 'nn.Linear'} weight {tuple(base.weight.shape)}, r={r}, scaling={alpha / r:g}, fan_in_fan_out={fan_in_fan_out})",
            hint="a Conv1D weight is (in x out): transpose the (out x in) update before adding it" if fan_in_fan_out else None,
        )


@exercise_check(
    "merge_weight",
    cases=_merge_weight_cases,
    idea="the merged weight is W + scaling * (B @ A), in the layout the weight is stored in",
)
def check_merge_weight(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, scaling, fan_in_fan_out=False)`` against ``LoRALinear.merge``."""


# ---------------------------------------------------------------- chapter 03: NF4 from scratch


def _nf4_cases_weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(n, generator=g) * 0.05 for n in (64, 130, 333)]


def _nf4_levels_cases() -> Iterator[Case]:
    from .quant import nf4_code

    for offset in (0.9677083, 0.99, 0.95):
        yield Case(args=(offset,), expected=nf4_code(offset),
                   hint=None if offset == 0.9677083 else "the offset is the probability of the outermost level")


@exercise_check(
    "nf4_levels",
    cases=_nf4_levels_cases,
    idea="8 positive quantiles at linspace(offset, 0.5, 9)[:-1], 7 negative at linspace(offset, 0.5, 8)[:-1], a 0, sorted, divided by the max",
)
def check_nf4_levels(fn: Callable[[float], torch.Tensor]) -> None:
    """Check ``fn(offset) -> (16,) float32`` against ``lora_course.nf4_code`` (equal to bitsandbytes' table)."""


def _pack_nibbles_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    for w in _nf4_cases_weights() + [torch.randn(7, generator=torch.Generator().manual_seed(1))]:
        packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
        packed = packed.view(-1)
        codes = torch.stack([packed >> 4, packed & 15], 1).view(-1)[: w.numel()]  # (n,) 0..15
        yield Case(args=(codes.clone(),), expected=packed.clone(), label=f"pack_nibbles({w.numel()} codes)",
                   hint="odd count: pad the last byte's low nibble with 7, the code of 0.0" if w.numel() % 2 else None)


def _exact_uint8(expected: Any, got: Any) -> str | None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.uint8:
        return f"got {fmt(got)}, expected a uint8 tensor"
    if got.shape != expected.shape:
        return f"got shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    if not torch.equal(got, expected):
        i = int((got != expected).nonzero()[0, 0])
        return f"byte {i}: got {int(got[i])}, expected {int(expected[i])}"
    return None


@exercise_check(
    "pack_nibbles",
    cases=_pack_nibbles_cases,
    idea="byte i holds code 2i in the high nibble (times 16) and code 2i+1 in the low nibble",
    compare=_exact_uint8,
)
def check_pack_nibbles(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(codes) -> packed`` (1-D uint8, length (n+1)//2) against bitsandbytes' packing."""


def _dequantize_blocks_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    for w in _nf4_cases_weights():
        for bs in (64, 128):
            packed, st = bnbF.quantize_4bit(w, blocksize=bs, quant_type="nf4")
            ref = bnbF.dequantize_4bit(packed, st).reshape(-1)
            yield Case(args=(packed.view(-1).clone(), st.absmax.clone(), w.numel(), bs), expected=ref,
                       label=f"dequantize_blocks(packed, absmax, n={w.numel()}, blocksize={bs})",
                       hint="the last block can be shorter than blocksize" if w.numel() % bs else None)


@exercise_check(
    "dequantize_blocks",
    cases=_dequantize_blocks_cases,
    idea="unpack high then low nibble, look each code up in NF4_CODE, multiply by the absmax of its block (index // blocksize)",
)
def check_dequantize_blocks(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(packed, absmax, n, blocksize) -> (n,) float32`` against bitsandbytes' ``dequantize_4bit``."""


# ---------------------------------------------------------------- chapter 04: double quantization


def _dq_bits_cases() -> Iterator[Case]:
    from .quant import quantize_nf4

    for n, bs, dq in [(4096, 64, False), (4096, 64, True), (100_003, 64, True), (65_536, 128, True), (999, 32, False)]:
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        yield Case(args=(n, bs, dq), expected=quantize_nf4(w, blocksize=bs, double_quant=dq).bits_per_param,
                   hint="with double quantization: 1 byte per block, 4 bytes per 256 blocks, and 4 bytes of offset" if dq else None)


@exercise_check(
    "nf4_bits_per_param",
    cases=_dq_bits_cases,
    idea="count bytes: (n+1)//2 packed, plus 4 per block (or 1 per block + 4 per 256 blocks + 4), times 8, over n",
)
def check_nf4_bits_per_param(fn: Callable[..., float]) -> None:
    """Check ``fn(n, blocksize, double_quant) -> bits per parameter`` against ``NF4Weight.bits_per_param``."""


def _dequantize_absmax_cases() -> Iterator[Case]:
    from .quant import quantize_nf4

    for n in (64 * 300, 64 * 700 + 5):
        q = quantize_nf4(torch.randn(n, generator=torch.Generator().manual_seed(n)), double_quant=True)
        yield Case(args=(q.qabsmax.clone(), q.absmax2.clone(), q.offset.clone()), expected=q.block_absmax(),
                   label=f"dequantize_absmax({q.qabsmax.numel()} codes)")


@exercise_check(
    "dequantize_absmax",
    cases=_dequantize_absmax_cases,
    idea="dynamic_map()[code] times absmax2 of its group of 256, then add the offset back",
)
def check_dequantize_absmax(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(qabsmax, absmax2, offset) -> float32 absmax`` against bitsandbytes' nested dequantization."""


def _lut_index_cases() -> Iterator[Case]:
    import bitsandbytes.functional as bnbF

    g = torch.Generator().manual_seed(0)
    for k in (255, 1020):
        v = torch.rand(k, generator=g) * 2 - 1  # normalised values in [-1, 1)
        blocks = torch.cat([torch.ones(k // 255, 1), v.view(-1, 255)], 1).reshape(-1)  # absmax 1 per block
        q, _ = bnbF.quantize_blockwise(blocks, blocksize=256)
        expected = q.view(-1, 256)[:, 1:].reshape(-1).long()
        yield Case(args=(v.clone(),), expected=expected, label=f"lut_code_index({k} values)")


@exercise_check(
    "lut_code_index",
    cases=_lut_index_cases,
    idea="slot = int(((v + 1) * 0.5) * 65535 + 0.5) in float32; the table maps slot i to the code nearest -1 + 2*i/65535",
)
def check_lut_code_index(fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Check ``fn(v) -> code indices`` against bitsandbytes' CPU 8-bit quantizer (absmax 1)."""


# ---------------------------------------------------------------- chapter 09: LongLoRA's S2-Attn


def _to_groups_cases() -> Iterator[Case]:
    for seed, (b, h, n, d, g) in enumerate([(1, 2, 8, 3, 4), (2, 4, 12, 2, 6), (3, 2, 16, 5, 2), (1, 6, 8, 4, 8)]):
        (x,) = _seeded_tensors(seed, (b, h, n, d))
        # reference: the groups cut out one by one (batch-major, then group order)
        expected = torch.stack([x[i, :, j * g:(j + 1) * g] for i in range(b) for j in range(n // g)])
        yield Case(args=(x, g), expected=expected, label=f"to_groups(x of shape {(b, h, n, d)}, group_size={g})",
                   hint="move seq next to batch (transpose(1, 2)), reshape, then move heads back" if b > 1 else None)


@exercise_check(
    "to_groups",
    cases=_to_groups_cases,
    idea="group j of sequence i holds tokens j*G .. (j+1)*G - 1 of every head; the batch index varies slowest",
)
def check_to_groups(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, group_size)``: (b, h, n, d) -> (b * n // G, h, G, d)."""


def _roll_second_half_cases() -> Iterator[Case]:
    from .longlora import roll_half_heads

    for seed, (shape, shifts) in enumerate([((1, 2, 8, 3), -2), ((2, 4, 12, 2), 3), ((1, 6, 10, 1), -5), ((2, 2, 4, 2), 0)]):
        (x,) = _seeded_tensors(seed, shape)
        yield Case(args=(x, shifts), expected=roll_half_heads(x, shifts),
                   label=f"roll_second_half(x of shape {shape}, shifts={shifts})")


@exercise_check(
    "roll_second_half",
    cases=_roll_second_half_cases,
    idea="leave heads[:h//2] alone; torch.roll the rest along the sequence dimension (dim 2); glue them back",
)
def check_roll_second_half(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, shifts)`` against ``lora_course.longlora.roll_half_heads``."""


def _group_causal_mask_cases() -> Iterator[Case]:
    from .longlora import s2attn_mask

    for n, g in [(8, 4), (16, 4), (12, 6), (6, 2), (8, 8)]:
        yield Case(args=(n, g), expected=s2attn_mask(n, g, shifted=False),
                   label=f"group_causal_mask({n}, {g})",
                   hint="a causal mask (key <= query) AND the same group (position // group_size)" if g < n else None)


def _compare_masks(expected: Any, got: Any) -> str | None:
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
        return f"got {fmt(got)}, expected a bool tensor of shape {tuple(expected.shape)}"
    return compare_values(expected, got)


@exercise_check(
    "group_causal_mask",
    cases=_group_causal_mask_cases,
    idea="query i may see key j when j <= i and both lie in the same group of group_size consecutive tokens",
    compare=_compare_masks,
)
def check_group_causal_mask(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(seq_len, group_size)`` against ``s2attn_mask(seq_len, group_size, shifted=False)``."""


# ---------------------------------------------------------------- chapter 05: QLoRA


def _qlora_layers_for_checks() -> Iterator[tuple[Any, str]]:
    from .qlora import QLoRALinear

    for seed, (out_f, in_f, r, dq, bias) in enumerate([(24, 64, 4, True, True), (40, 128, 8, False, False),
                                                        (16, 192, 2, True, False)]):
        torch.manual_seed(seed)
        layer = QLoRALinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=2.0 * r, double_quant=dq)
        with torch.no_grad():
            layer.lora_B.normal_()  # B = 0 would hide the branch
        yield layer, f"({out_f} x {in_f}, r={r}, double_quant={dq}, bias={bias})"


def _qlora_forward_cases() -> Iterator[Case]:
    for seed, (layer, desc) in enumerate(_qlora_layers_for_checks()):
        (x,) = _seeded_tensors(10 + seed, (3, layer.in_features))
        with torch.no_grad():
            expected = layer(x)
        bias = None if layer.bias is None else layer.bias.detach().clone()
        yield Case(args=(x, layer.nf4, bias, layer.lora_A.detach().clone(), layer.lora_B.detach().clone(), layer.scaling),
                   expected=expected, label=f"qlora_forward on a layer {desc}",
                   hint="remember the bias when there is one" if bias is not None else None)


@exercise_check(
    "qlora_forward",
    cases=_qlora_forward_cases,
    idea="dequantize W (nf4.dequantize()), then x @ W.T + bias + (x @ A.T @ B.T) * scaling",
)
def check_qlora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, nf4, bias, lora_A, lora_B, scaling)`` against ``QLoRALinear.forward``."""


def _nf4_input_grad_cases() -> Iterator[Case]:
    for seed, (layer, desc) in enumerate(_qlora_layers_for_checks()):
        x, grad_out = _seeded_tensors(20 + seed, (2, 5, layer.in_features), (2, 5, layer.out_features))
        x.requires_grad_(True)
        layer.base_forward(x).backward(grad_out)  # our autograd Function's backward
        yield Case(args=(grad_out, layer.nf4), expected=x.grad.clone(), label=f"nf4_input_grad on a layer {desc}")


@exercise_check(
    "nf4_input_grad",
    cases=_nf4_input_grad_cases,
    idea="y = x @ W.T gives dL/dx = dL/dy @ W: dequantize W again (nothing was saved) and multiply",
)
def check_nf4_input_grad(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(grad_out, nf4) -> grad_x`` against the backward of ``QLoRALinear``'s NF4 matmul."""


def _qlora_layer_bytes_cases() -> Iterator[Case]:
    from .memory import storage_bytes
    from .qlora import QLoRALinear

    for out_f, in_f, r, blocksize, dq in [(64, 64, 8, 64, True), (1024, 1024, 16, 64, True),
                                          (1000, 300, 4, 64, False), (512, 1408, 8, 128, True)]:
        base = nn.Linear(in_f, out_f, bias=False)
        layer = QLoRALinear(base, r=r, blocksize=blocksize, double_quant=dq)
        expected = storage_bytes([*layer.parameters(), *layer.buffers()])
        yield Case(args=(out_f, in_f, r), kwargs=dict(blocksize=blocksize, double_quant=dq), expected=expected,
                   label=f"qlora_layer_bytes({out_f}, {in_f}, {r}, blocksize={blocksize}, double_quant={dq})")


@exercise_check(
    "qlora_layer_bytes",
    cases=_qlora_layer_bytes_cases,
    idea="(out*in+1)//2 packed bytes, the block constants (4 per block, or 1 per block + 4 per 256 blocks + 4), "
         "and r*(in+out) float32 LoRA values",
)
def check_qlora_layer_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(out_features, in_features, r, blocksize=64, double_quant=True) -> bytes`` against a real QLoRALinear."""


# ---------------------------------------------------------------- chapter 07: AdaLoRA


def _allocator_for_checks(out_f: int, in_f: int, r: int, **schedule: Any) -> tuple[Any, nn.Module, str]:
    """A one-layer AdaLoRA model and its RankAllocator (our library is the reference)."""
    from .adalora import RankAllocator, add_adalora

    model = add_adalora(nn.Sequential(nn.Linear(in_f, out_f)), ["0"], init_r=r)
    alloc = RankAllocator(model, init_r=r, target_r=1, **({"total_step": 10} | schedule))
    return alloc, model, "0"


def _sensitivity_ema_cases() -> Iterator[Case]:
    for seed, (out_f, in_f, r, b1, b2) in enumerate([(5, 4, 3, 0.85, 0.85), (7, 6, 2, 0.9, 0.5), (3, 8, 4, 0.5, 0.99)]):
        alloc, model, name = _allocator_for_checks(out_f, in_f, r, beta1=b1, beta2=b2)
        p = model[0].lora_A
        w, grad, avg_ipt, avg_unc = _seeded_tensors(seed, p.shape, p.shape, p.shape, p.shape)
        avg_ipt, avg_unc = avg_ipt.abs(), avg_unc.abs()  # EMAs of absolute values are >= 0
        with torch.no_grad():
            p.copy_(w)
        p.grad = grad.clone()
        for layer_p in (model[0].lora_E, model[0].lora_B):
            layer_p.grad = torch.zeros_like(layer_p)
        alloc.update_ipt(model)  # creates the state; now restart it from the given EMAs
        key = f"{name}.lora_A"
        alloc.exp_avg_ipt[key], alloc.exp_avg_unc[key] = avg_ipt.clone(), avg_unc.clone()
        alloc.update_ipt(model)
        expected = (alloc.ipt[key], alloc.exp_avg_ipt[key], alloc.exp_avg_unc[key])
        yield Case(args=(w, grad, avg_ipt, avg_unc, b1, b2), expected=expected,
                   label=f"sensitivity_ema(w, grad, exp_avg_ipt, exp_avg_unc, beta1={b1}, beta2={b2}) on {tuple(w.shape)}",
                   hint="the uncertainty uses |I - Ibar| with the Ibar you just updated, not the old one"
                   if seed == 1 else None)


@exercise_check(
    "sensitivity_ema",
    cases=_sensitivity_ema_cases,
    idea="I = |w * grad|; Ibar = beta1 * Ibar + (1 - beta1) * I; U = beta2 * U + (1 - beta2) * |I - Ibar| (new Ibar)",
)
def check_sensitivity_ema(fn: Callable[..., tuple]) -> None:
    """Check ``fn(w, grad, exp_avg_ipt, exp_avg_unc, beta1, beta2) -> (ipt, exp_avg_ipt, exp_avg_unc)``
    against ``RankAllocator.update_ipt``."""


def _triplet_score_cases() -> Iterator[Case]:
    for seed, (out_f, in_f, r) in enumerate([(5, 4, 3), (7, 9, 2), (3, 8, 6)]):
        alloc, model, name = _allocator_for_checks(out_f, in_f, r)
        s_A, s_E, s_B = (t.abs() for t in _seeded_tensors(seed, (r, in_f), (r, 1), (out_f, r)))
        for factor, s in (("lora_A", s_A), ("lora_E", s_E), ("lora_B", s_B)):
            alloc.exp_avg_ipt[f"{name}.{factor}"] = s.clone()
            alloc.exp_avg_unc[f"{name}.{factor}"] = torch.ones_like(s)  # so the entry score is s itself
        expected = alloc.triplet_scores(model)[name]
        yield Case(args=(s_A, s_E, s_B), expected=expected,
                   label=f"triplet_score(s_A {tuple(s_A.shape)}, s_E {tuple(s_E.shape)}, s_B {tuple(s_B.shape)})",
                   hint="Q = A is (r x in): average each row; P = B is (out x r): average each column"
                   if out_f != in_f else None)


@exercise_check(
    "triplet_score",
    cases=_triplet_score_cases,
    idea="score_i = s_E[i] + mean of row i of s_A + mean of column i of s_B, a vector of length r",
)
def check_triplet_score(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(s_A, s_E, s_B) -> (r,)`` against ``RankAllocator.triplet_scores``."""


def _budget_schedule_cases() -> Iterator[Case]:
    settings = [(12, 4, 3, 10, 20, 100, 5), (8, 2, 5, 0, 0, 50, 1), (6, 3, 2, 4, 6, 30, 3)]
    for init_r, target_r, layers, tinit, tfinal, total, delta in settings:
        from .adalora import RankAllocator, add_adalora

        model = add_adalora(nn.Sequential(*[nn.Linear(4, 4) for _ in range(layers)]), init_r=init_r)
        alloc = RankAllocator(model, init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta,
                              total_step=total)
        for step in sorted({0, tinit, tinit + 1, (tinit + total - tfinal) // 2, total - tfinal - 1,
                            total - tfinal, total - tfinal + 1, total}):
            kw = dict(init_bgt=init_r * layers, target_bgt=target_r * layers, tinit=tinit, tfinal=tfinal,
                      total_step=total, deltaT=delta)
            yield Case(args=(step,), kwargs=kw, expected=alloc.budget_schedule(step),
                       hint="past total_step - tfinal the budget is the target and mask_now is True"
                       if step > total - tfinal else None)


@exercise_check(
    "budget_schedule",
    cases=_budget_schedule_cases,
    idea="warm-up (step <= tinit): (init, False); then int((init - target) * (1 - progress)**3 + target), "
         "masking when step % deltaT == 0",
)
def check_budget_schedule(fn: Callable[..., tuple]) -> None:
    """Check ``fn(step, init_bgt, target_bgt, tinit, tfinal, total_step, deltaT) -> (budget, mask_now)``
    against ``RankAllocator.budget_schedule``."""


# ---------------------------------------------------------------- chapter 08: DoRA


def _dora_layers_for_checks() -> Iterator[tuple[Any, str]]:
    from .dora import DoRALinear

    for seed, (out_f, in_f, r, bias) in enumerate([(12, 20, 4, True), (24, 16, 2, False), (8, 40, 8, True)]):
        torch.manual_seed(seed)
        layer = DoRALinear(nn.Linear(in_f, out_f, bias=bias), r=r, alpha=2.0 * r).eval()
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():  # B = 0 and m = ||W|| would hide every DoRA term
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            layer.magnitude.mul_(0.5 + torch.rand(layer.magnitude.shape, generator=g))
        yield layer, f"({out_f} x {in_f}, r={r}, bias={bias})"


def _dora_parts(layer: Any) -> tuple[torch.Tensor, ...]:
    return tuple(t.detach().clone() for t in (layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude))


def _dora_magnitude_init_cases() -> Iterator[Case]:
    for layer, desc in _dora_layers_for_checks():
        W, A, B, _ = _dora_parts(layer)
        yield Case(args=(W, A, B, layer.scaling), expected=layer.weight_norm(),
                   label=f"dora_magnitude_init on a layer {desc}",
                   hint="one norm per output row: torch.linalg.norm(W + scaling * B @ A, dim=1), shape (out,)")


@exercise_check(
    "dora_magnitude_init",
    cases=_dora_magnitude_init_cases,
    idea="m starts as the row norms (one per output feature) of the direction W + scaling * B @ A",
)
def check_dora_magnitude_init(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, scaling) -> magnitude`` against ``DoRALinear``'s norm."""


def _dora_forward_cases() -> Iterator[Case]:
    for seed, (layer, desc) in enumerate(_dora_layers_for_checks()):
        (x,) = _seeded_tensors(30 + seed, (3, 5, layer.in_features))
        W, A, B, m = _dora_parts(layer)
        bias = None if layer.base.bias is None else layer.base.bias.detach().clone()
        with torch.no_grad():
            expected = layer(x)
        yield Case(args=(x, W, bias, A, B, m, layer.scaling), expected=expected,
                   label=f"dora_forward on a layer {desc}",
                   hint="the bias is added once, after the rescaled weight" if bias is not None else None)


@exercise_check(
    "dora_forward",
    cases=_dora_forward_cases,
    idea="V = W + scaling * B @ A; W' = magnitude[:, None] * V / ||V|| (row norms, detached); "
         "return x @ W'.T + bias",
)
def check_dora_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, weight, bias, lora_A, lora_B, magnitude, scaling)`` against ``DoRALinear.forward``."""


def _dora_merge_cases() -> Iterator[Case]:
    import copy

    for layer, desc in _dora_layers_for_checks():
        W, A, B, m = _dora_parts(layer)
        expected = copy.deepcopy(layer).merged_module().weight.detach()
        yield Case(args=(W, A, B, m, layer.scaling), expected=expected, label=f"dora_merge on a layer {desc}")


@exercise_check(
    "dora_merge",
    cases=_dora_merge_cases,
    idea="merged weight = (magnitude / ||W + dW||)[:, None] * (W + dW) with dW = scaling * B @ A, "
         "norms per output row",
)
def check_dora_merge(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(weight, lora_A, lora_B, magnitude, scaling) -> merged weight`` against ``DoRALinear.merge``."""


# ---------------------------------------------------------------- chapter 06: training memory


def _full_ft_bytes_cases() -> Iterator[Case]:
    from .memory import estimate_training_memory

    n = 1_000_000
    for dtype, master in [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True)]:
        est = estimate_training_memory(n, "full", dtype=dtype, master_weights=master)
        d = torch.tensor([], dtype=dtype).element_size()
        yield Case(args=(d, master), expected=est.total // n, label=f"full_ft_bytes_per_param({d}, master_weights={master})",
                   hint="a float32 master copy adds 4 bytes when the weights are not float32" if master else None)


@exercise_check(
    "full_ft_bytes_per_param",
    cases=_full_ft_bytes_cases,
    idea="weights (d) + gradients (d) + AdamW's two float32 moments (8), plus 4 for a float32 master copy",
)
def check_full_ft_bytes_per_param(fn: Callable[..., int]) -> None:
    """Check ``fn(dtype_bytes, master_weights) -> bytes per parameter`` against ``estimate_training_memory``."""


def _peak_cases() -> Iterator[Case]:
    from .memory import MemoryBreakdown

    g = torch.Generator().manual_seed(6)
    for k in range(6):
        parts = [int(v) for v in torch.randint(0, 10_000, (7,), generator=g)]
        if k % 2:
            parts[2] = 50_000  # gradients large: the optimizer step is the worst moment
        b = MemoryBreakdown("lora", *parts)
        names = ("weights", "quant_constants", "gradients", "optimizer_states", "activations",
                 "backward_workspace", "optimizer_workspace")
        yield Case(kwargs=dict(zip(names, parts)), expected=b.peak,
                   label="peak_bytes(" + ", ".join(f"{n}={v}" for n, v in zip(names, parts)) + ")")


@exercise_check(
    "peak_bytes",
    cases=_peak_cases,
    idea="the static parts are always there; on top: max(activations + backward workspace, gradients + optimizer workspace)",
)
def check_peak_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(**parts) -> peak bytes`` against ``MemoryBreakdown.peak``."""


# ---------------------------------------------------------------- chapter 14: int8 and 8-bit optimizers


def _int8_vectorwise_cases() -> Iterator[Case]:
    from .quant.int8 import quantize_int8_vectorwise

    g = torch.Generator().manual_seed(14)
    shapes = [(1, 8), (4, 16), (7, 33), (16, 64)]
    for k, shape in enumerate(shapes):
        x = (torch.randn(shape, generator=g) * (1 + 3 * k)).half()
        if k == 2:
            x[0, :4] = torch.tensor([127.0, 2.5, -2.5, 0.5]).half()  # ties: round half to even
        yield Case(args=(x,), expected=quantize_int8_vectorwise(x),
                   label=f"int8_vectorwise(x of shape {shape}, float16)",
                   hint="per row: absmax = max |x|; q = round(x * 127 / absmax) with torch.round "
                        "(half to even), as int8; absmax as float32" if k == 2 else None)


@exercise_check(
    "int8_vectorwise",
    cases=_int8_vectorwise_cases,
    idea="one scale per row: absmax = max |x| over the row (float32), q = torch.round(x * (127 / absmax)) as int8",
)
def check_int8_vectorwise(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(x) -> (q int8, row_absmax float32)`` against bitsandbytes' ``int8_vectorwise_quant`` (via ours)."""


def _outlier_split_cases() -> Iterator[Case]:
    from .quant.int8 import Int8Linear

    g = torch.Generator().manual_seed(15)
    for k, (tokens, d_in, d_out, thr) in enumerate([(4, 16, 8, 6.0), (6, 32, 12, 6.0), (5, 24, 10, 0.0),
                                                     (3, 40, 16, 3.0)]):
        x = torch.randn(tokens, d_in, generator=g)
        x[:, k + 1] *= 12  # an outlier feature (a whole column)
        w = torch.randn(d_out, d_in, generator=g) * 0.1
        layer = nn.Linear(d_in, d_out, bias=False)
        layer.weight.data = w.clone()
        expected = Int8Linear(layer, threshold=thr).eval()(x).detach()
        yield Case(args=(x, w, thr), expected=expected,
                   label=f"int8_matmul_with_outliers(x {tokens}x{d_in}, w {d_out}x{d_in}, threshold={thr})",
                   hint="threshold 0 means no decomposition: every column goes through int8" if thr == 0 else None)


@exercise_check(
    "outlier_split",
    cases=_outlier_split_cases,
    idea="W and X to float16, row-wise int8 (X's outlier columns, any |x| >= threshold, zeroed first); "
         "int32 product rescaled by absmax_x * absmax_w / 127**2; plus X[:, cols] @ dequant(W)[:, cols].T in float",
    compare=functools.partial(compare_values, rtol=1e-4, atol=1e-4),
)
def check_outlier_split(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, w, threshold) -> y`` (LLM.int8() with the decomposition) against ``Int8Linear`` (= bitsandbytes)."""


def _moment_cases() -> Iterator[Case]:
    from .quant.double_quant import dequantize_blockwise_8bit, quantize_blockwise_8bit

    g = torch.Generator().manual_seed(16)
    for k, (n, beta1) in enumerate([(256, 0.9), (1000, 0.9), (700, 0.5), (2048, 0.99)]):
        m0 = torch.randn(n, generator=g) * 10.0 ** (-k)
        q, absmax = quantize_blockwise_8bit(m0)
        grad = torch.randn(n, generator=g) * 10.0 ** (-k)
        m = dequantize_blockwise_8bit(q, absmax)
        m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # bitsandbytes' order of operations
        yield Case(args=(q, absmax, grad, beta1), expected=quantize_blockwise_8bit(m),
                   label=f"moment_update(codes of {n} values, beta1={beta1})")


@exercise_check(
    "moment_update",
    cases=_moment_cases,
    idea="dequantize (dequantize_blockwise_8bit), m = beta1 * m + (1 - beta1) * grad in float32, "
         "quantize again (quantize_blockwise_8bit): new codes and new block absmax",
)
def check_moment_update(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(q, absmax, grad, beta1) -> (q_new, absmax_new)``: one 8-bit first-moment update (AdamW8bit)."""


# ---------------------------------------------------------------- chapter 02: PEFT in practice


def _peft_lora_model(shapes: list[tuple[int, int]], **config: Any):
    """PEFT's LoRA on an ``nn.Sequential`` of ``nn.Linear(in, out)`` layers (all targeted)."""
    import warnings

    from peft import LoraConfig, get_peft_model

    model = nn.Sequential(*(nn.Linear(d_in, d_out) for d_in, d_out in shapes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, LoraConfig(target_modules=[str(i) for i in range(len(shapes))], **config))


def _peft_scaling_cases() -> Iterator[Case]:
    for alpha, r, rs in [(8, 8, False), (16, 8, False), (16, 4, True), (32, 64, True), (1, 3, False), (8.0, 16, True)]:
        layer = _peft_lora_model([(8, 8)], r=r, lora_alpha=alpha, use_rslora=rs).base_model.model[0]
        yield Case(args=(alpha, r, rs), expected=float(layer.scaling["default"]),
                   label=f"peft_scaling(lora_alpha={alpha}, r={r}, use_rslora={rs})",
                   hint="rsLoRA divides by sqrt(r) instead of r" if rs else None)


@exercise_check("peft_scaling", cases=_peft_scaling_cases,
                idea="lora_alpha / r, or lora_alpha / sqrt(r) when use_rslora=True")
def check_peft_scaling(fn: Callable[..., float]) -> None:
    """Check ``fn(lora_alpha, r, use_rslora) -> scaling`` against PEFT's ``LoraLayer.scaling``."""


_PEFT_SHAPES = [[(8, 8)], [(16, 4), (4, 16)], [(12, 20), (20, 20), (20, 6)], [(32, 8)]]


def _lora_config_trainable_cases() -> Iterator[Case]:
    for k, (shapes, r, bias) in enumerate(zip(_PEFT_SHAPES, (2, 4, 3, 8), ("none", "lora_only", "lora_only", "none"))):
        model = _peft_lora_model(shapes, r=r, bias=bias)
        yield Case(args=(shapes, r, bias), expected=model.get_nb_trainable_parameters()[0],
                   label=f"lora_config_trainable({shapes}, r={r}, bias={bias!r})",
                   hint="bias='lora_only' also trains each adapted layer's bias (out_features numbers)"
                   if bias == "lora_only" else None)


@exercise_check("lora_config_trainable", cases=_lora_config_trainable_cases,
                idea="r * (in + out) per adapted layer, plus out per layer when bias='lora_only'")
def check_lora_config_trainable(fn: Callable[..., int]) -> None:
    """Check ``fn(shapes, r, bias) -> trainable`` against PEFT's ``get_nb_trainable_parameters``."""


def _adapter_file_bytes_cases() -> Iterator[Case]:
    from peft import get_peft_model_state_dict

    for shapes, r, dtype in zip(_PEFT_SHAPES, (2, 4, 3, 8), (torch.float32, torch.float16, torch.bfloat16, torch.float32)):
        model = _peft_lora_model(shapes, r=r).to(dtype)
        tensors = get_peft_model_state_dict(model)  # what save_pretrained writes
        size = dtype.itemsize
        yield Case(args=(shapes, r, size), expected=sum(t.numel() * t.element_size() for t in tensors.values()),
                   label=f"adapter_file_bytes({shapes}, r={r}, dtype_bytes={size})")


@exercise_check("adapter_file_bytes", cases=_adapter_file_bytes_cases,
                idea="each layer stores A (r x in) and B (out x r): r * (in + out) numbers, times the bytes per number")
def check_adapter_file_bytes(fn: Callable[..., int]) -> None:
    """Check ``fn(shapes, r, dtype_bytes) -> bytes`` against the tensors PEFT's ``save_pretrained`` writes."""


def _lora_ga_init_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(12)
    for out_f, in_f, r in [(32, 48, 4), (20, 16, 2), (64, 40, 8)]:
        grad = torch.randn(out_f, in_f, generator=g, dtype=torch.float64) * torch.logspace(0, -2, in_f, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(grad, full_matrices=False)

        def first_step(fn, grad=grad, r=r):
            A, B = fn(grad.clone(), r)
            return B @ B.T @ grad + grad @ A.T @ A

        yield Case(args=(grad, r), expected=(U[:, :2 * r] * S[:2 * r]) @ Vh[:2 * r], apply=first_step,
                   label=f"lora_ga_init(grad {out_f}x{in_f}, r={r}), compared as B B^T G + G A^T A")


@exercise_check(
    "lora_ga_init",
    cases=_lora_ga_init_cases,
    idea="SVD of the gradient, G = U S Vh: A = the first r rows of Vh (r x in), B = columns r..2r-1 of U (out x r)",
    compare=functools.partial(compare_values, rtol=1e-6, atol=1e-9),
)
def check_lora_ga_init(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(grad, r) -> (A, B)``: LoRA-GA's init, so that B B^T G + G A^T A is G's best rank-2r approximation."""


def _eckart_young_cases() -> Iterator[Case]:
    g = torch.Generator().manual_seed(10)
    for out_f, in_f, true_rank, r in [(24, 16, 6, 2), (16, 32, 4, 4), (20, 20, 8, 5), (12, 30, 3, 7)]:
        delta = torch.randn(out_f, true_rank, generator=g, dtype=torch.float64) @ torch.randn(
            true_rank, in_f, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        best = (U[:, :r] * S[:r]) @ Vh[:r]  # the best rank-r matrix: truncated SVD
        left = float(torch.linalg.matrix_norm(delta - best) ** 2 / torch.linalg.matrix_norm(delta) ** 2)
        yield Case(args=(delta, r), expected=left, label=f"eckart_young_floor(delta {out_f}x{in_f} of rank {true_rank}, r={r})",
                   hint="0 when r >= rank(delta): a rank-r product can then represent delta exactly" if r >= true_rank else None)


@exercise_check("eckart_young_floor", cases=_eckart_young_cases,
                idea="singular values s_i of delta: the best rank-r matrix leaves sum_{i>r} s_i^2 out of sum_i s_i^2",
                compare=functools.partial(compare_values, rtol=1e-6, atol=1e-9))
def check_eckart_young_floor(fn: Callable[[torch.Tensor, int], float]) -> None:
    """Check ``fn(delta, r) -> fraction of ||delta||_F^2 that no rank-r matrix can capture``."""


def _equal_budget_rank_cases() -> Iterator[Case]:
    import copy

    from .lora import add_lora, count_parameters
    from .models import tiny_llama

    llama = tiny_llama()
    mlp = nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48), nn.Linear(48, 10))
    for model, targets, budget in [(llama, ["q_proj", "v_proj"], 5000), (llama, ["q_proj", "k_proj", "v_proj", "o_proj"], 5000),
                                   (mlp, ["0", "2"], 1000), (mlp, ["0"], 143)]:
        per_rank = count_parameters(add_lora(copy.deepcopy(model), targets, r=1))[0]  # adapters only: the rest is frozen
        yield Case(args=(model, targets, budget), expected=budget // per_rank,
                   label=f"equal_budget_rank({type(model).__name__}, {targets}, budget={budget})")


@exercise_check("equal_budget_rank", cases=_equal_budget_rank_cases,
                idea="each adapted Linear costs r * (in_features + out_features); find the largest r whose total fits the budget")
def check_equal_budget_rank(fn: Callable[..., int]) -> None:
    """Check ``fn(model, target_modules, budget) -> the largest LoRA rank whose adapters fit in budget``."""


def _ddp_allreduce_bytes_cases() -> Iterator[Case]:
    from .distributed import allreduce_bytes_per_step
    from .lora import add_lora

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    adapted = add_lora(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), ["0", "2"], r=4)
    half = add_lora(nn.Sequential(nn.Linear(24, 24), nn.Linear(24, 6)), ["0"], r=2).half()
    frozen_head = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 3))
    frozen_head[0].requires_grad_(False)
    for name, model in (("plain MLP", plain), ("MLP with LoRA r=4", adapted), ("float16 LoRA model", half),
                        ("first layer frozen", frozen_head)):
        yield Case(args=(model,), expected=allreduce_bytes_per_step(model), label=f"ddp_allreduce_bytes({name})",
                   hint="frozen parameters have no gradient, so DDP sends nothing for them" if name != "plain MLP" else None)


@exercise_check("ddp_allreduce_bytes", cases=_ddp_allreduce_bytes_cases,
                idea="DDP all-reduces each gradient once per step: sum numel * element_size over parameters with requires_grad")
def check_ddp_allreduce_bytes(fn: Callable[[nn.Module], int]) -> None:
    """Check ``fn(model) -> bytes of gradient DDP all-reduces per optimizer step``."""


def _zero_stage_bytes_cases() -> Iterator[Case]:
    from .distributed import zero_bytes_per_gpu

    for n_params, n_gpus, stage in [(7_500_000_000, 64, 0), (7_500_000_000, 64, 1), (7_500_000_000, 64, 2),
                                    (7_500_000_000, 64, 3), (1_000_000, 8, 2), (65_000_000_000, 8, 3)]:
        yield Case(args=(n_params, n_gpus, stage), expected=zero_bytes_per_gpu(n_params, n_gpus, stage),
                   label=f"zero_stage_bytes({n_params:,}, {n_gpus}, stage={stage})")


@exercise_check("zero_stage_bytes", cases=_zero_stage_bytes_cases,
                idea="per parameter: 2 B weights + 2 B gradients + 12 B Adam states; stage 1 divides the states by N, "
                     "stage 2 also the gradients, stage 3 everything (round to whole bytes)")
def check_zero_stage_bytes(fn: Callable[[int, int, int], int]) -> None:
    """Check ``fn(n_params, n_gpus, stage) -> model-state bytes per GPU`` (mixed-precision Adam, ZeRO stage 0-3)."""


def _loraplus_cases() -> Iterator[Case]:
    from .lora import add_lora
    from .models import tiny_llama
    from .variants import loraplus_param_groups

    torch.manual_seed(0)
    mlp = add_lora(nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.Linear(16, 4)), ["0"], r=2,
                   modules_to_save=["1", "2"])
    llama = add_lora(tiny_llama(), ["q_proj", "v_proj"], r=4)
    for model, name, lr, ratio in ((mlp, "MLP with LoRA, LayerNorm and head trained", 1e-3, 16.0),
                                   (llama, "tiny Llama, LoRA on q,v", 2e-4, 8.0)):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        lr_of = {n: g["lr"] for g in loraplus_param_groups(model, lr, ratio) for n in g["names"]}

        def lrs_in_order(fn, model=model, lr=lr, ratio=ratio, trainable=trainable):
            given = {id(p): g["lr"] for g in fn(model, lr, ratio) for p in g["params"]}
            params = dict(model.named_parameters())
            return [given.get(id(params[n])) for n in trainable]  # None: a trainable tensor left out

        yield Case(args=(model, lr, ratio), expected=[lr_of[n] for n in trainable], apply=lrs_in_order,
                   label=f"loraplus_param_groups({name}, lr={lr}, lr_ratio={ratio}), the lr of each trainable "
                         f"tensor in order ({', '.join(trainable[:3])}, ...)")


@exercise_check("loraplus_param_groups", cases=_loraplus_cases,
                idea="B factors (names with 'lora_B') and 1-D tensors (biases, norm weights) get lr * lr_ratio; "
                     "every other trainable tensor gets lr; frozen ones are left out")
def check_loraplus_param_groups(fn: Callable[..., list]) -> None:
    """Check ``fn(model, lr, lr_ratio) -> optimizer param groups`` (dicts with ``params`` and ``lr``) against LoRA+'s."""


def _vera_forward_cases() -> Iterator[Case]:
    from .variants import VeRALinear, vera_projections

    g = torch.Generator().manual_seed(6)
    for out_f, in_f, r, max_out, max_in in [(6, 5, 3, 6, 5), (4, 7, 8, 9, 10), (10, 3, 2, 12, 3)]:
        A, B = vera_projections(r, max_in, max_out, key=out_f)
        base = nn.Linear(in_f, out_f, bias=False)
        with torch.no_grad():
            base.weight.copy_(torch.randn(out_f, in_f, generator=g))
        layer = VeRALinear(base, A, B, r)
        with torch.no_grad():
            layer.vera_lambda_d.copy_(torch.randn(r, generator=g))
            layer.vera_lambda_b.copy_(torch.randn(out_f, generator=g))
        x = torch.randn(3, in_f, generator=g)
        yield Case(args=(x, base.weight.detach(), A, B, layer.vera_lambda_d.detach(), layer.vera_lambda_b.detach()),
                   expected=layer(x).detach(),
                   label=f"vera_forward(x {tuple(x.shape)}, W {out_f}x{in_f}, shared A {r}x{max_in}, B {max_out}x{r})",
                   hint="slice the shared matrices to the layer: A[:, :in_features], B[:out_features]"
                   if (max_out, max_in) != (out_f, in_f) else None)


@exercise_check("vera_forward", cases=_vera_forward_cases,
                idea="x W^T + lambda_b * ((lambda_d * (x A^T)) B^T), with A and B sliced to the layer's shape")
def check_vera_forward(fn: Callable[..., torch.Tensor]) -> None:
    """Check ``fn(x, base_weight, A, B, lambda_d, lambda_b) -> output`` against VeRA's layer (== PEFT's)."""


def _pissa_init_cases() -> Iterator[Case]:
    from .variants import pissa_factors

    g = torch.Generator().manual_seed(8)
    for out_f, in_f, r, scaling in [(10, 8, 2, 1.0), (6, 12, 3, 2.0), (16, 16, 4, 0.5)]:
        W = torch.randn(out_f, in_f, generator=g)
        A, B, residual = pissa_factors(W, r, scaling)

        def invariants(fn, W=W, r=r, scaling=scaling):
            a, b, res = fn(W.clone(), r, scaling)
            return (b @ a, res, a @ a.T)  # unchanged if a singular vector pair flips sign

        yield Case(args=(W, r, scaling), expected=(B @ A, residual, A @ A.T), apply=invariants,
                   label=f"pissa_init(W {out_f}x{in_f}, r={r}, scaling={scaling}), compared as (B A, residual, A A^T)")


@exercise_check("pissa_init", cases=_pissa_init_cases,
                idea="SVD W = U S Vh (float32): A = sqrt(S_r / scaling) * Vh_r (rows), B = U_r * sqrt(S_r / scaling) "
                     "(columns), residual = W - scaling * B @ A",
                compare=functools.partial(compare_values, rtol=1e-4, atol=1e-5))
def check_pissa_init(fn: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Check ``fn(weight, r, scaling) -> (A, B, residual)``: PiSSA's split (== PEFT's ``init_lora_weights="pissa"``)."""


# Star-imported into notebooks: only the runner and the checks, so no short generic names
# shadow a learner's variables. Everything else is importable by name.
__all__ = ["run_check"] + [f"check_{name}" for name in CHECKS]
