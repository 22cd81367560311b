"""Self-checking exercises: ``check_*`` functions that run hidden cases and give hints.

How an exercise works in a notebook
-----------------------------------
* The exercise cell is a code cell tagged ``exercise`` (cell metadata ``tags``). Its
  solution sits between a ``# BEGIN SOLUTION`` and a ``# END SOLUTION`` comment line;
  ``make exercises`` replaces that block with a stub in the learner copy
  (see :mod:`lora_course.notebook_tools.strip` for the stub rule).
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

Hints in two levels
-------------------
A wrong answer first gets a nudge (the case's ``hint`` or the check's ``idea``: the idea,
never the answer). From the second wrong answer to the same check in the same kernel on,
the line also gives the check's ``formula`` (``exercise_check(..., formula=...)``). A
leftover stub or placeholder is not counted as a try.

Exercises in the reading flow (the fallback pattern)
----------------------------------------------------
An exercise that builds a piece the notebook goes on to use sits where the piece is
taught, before the Summary, as three code cells::

    # exercise cell (tagged ``exercise``)
    class MyLoRALinear(nn.Module):
        def forward(self, x):
            # BEGIN SOLUTION
            ...
            # END SOLUTION

    check_lora_forward(MyLoRALinear)                      # the check cell

    MyLoRALinear = use_or_fallback(MyLoRALinear, LoRALinear, "lora_forward")

In the learner copy the body is a stub that raises ``NotImplementedError``;
:func:`~.framework.use_or_fallback` runs the check's hidden cases again (silently), keeps
the learner's object if it passes and otherwise returns the library's implementation, and
prints which one the later cells use. So the learner copy runs top to bottom unsolved (a
test executes every learner copy), and once the learner's code is right the notebook runs
on it. For a value (a prediction, a chosen rank) the fallback is the measured value.

The text a check prints is deterministic (no memory addresses, no timings, floats rounded
to 4 significant digits), so notebooks that show it pass nbval on any machine. A check
never raises because of the learner's code: an exception, a wrong answer or a leftover
stub becomes a ``NOT YET`` line that names the failing input, the expected and the
obtained value, and a nudge toward the idea.

Where the checks live
---------------------
:mod:`.framework` holds the machinery (hidden cases, the registry, the runner, the
deterministic formatting); ``chNN.py`` holds the checks that ``notebooks/NN_*.ipynb``
calls, and :func:`chapter` finds that module by its number (``chapter(5)``). This package
re-exports every public name, so ``from lora_course.exercises import check_xyz`` works
for any check.

Adding a check
--------------
In the chapter's module, write a generator of :class:`Case` objects (the expected values
computed from a real reference, e.g. ``torch.nn.Linear`` or PEFT) and register a public
function whose body is only its docstring::

    def _my_cases() -> Iterator[Case]:
        yield Case(args=(3,), expected=9)

    @exercise_check("square", cases=_my_cases, idea="multiply the number by itself")
    def check_square(fn: Callable[[int], int]) -> None:
        \"\"\"Check ``fn(x) -> x * x``.\"\"\"

The decorator supplies the behaviour (run the cases, print one line) and registers the
check in :data:`CHECKS`, which the tests use to list every check; import the new check
here too.
"""

from __future__ import annotations

from types import ModuleType

from . import ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10, ch11, ch12, ch13, ch14, ch15
from .ch00 import check_linear_param_count
from .ch01 import (check_alpha_bug_ratio, check_lora_forward, check_lora_scaling_fix, check_lora_trainable_params,
                   check_merge_weight)
from .ch02 import (check_adapter_file_bytes, check_conv1d_lora, check_fix_checkpointing, check_lora_config_trainable,
                   check_peft_scaling)
from .ch03 import check_dequantize_blocks, check_nf4_levels, check_pack_nibbles
from .ch04 import check_dequantize_absmax, check_dq_bits_prediction, check_lut_code_index, check_nf4_bits_per_param
from .ch05 import check_nf4_input_grad, check_qlora_forward, check_qlora_layer_bytes
from .ch06 import check_full_ft_bytes_per_param, check_layer_activation_bytes, check_peak_bytes
from .ch07 import check_budget_schedule, check_sensitivity_ema, check_triplet_score
from .ch08 import check_dora_forward, check_dora_magnitude_init, check_dora_merge
from .ch09 import check_group_causal_mask, check_group_pairs, check_roll_second_half, check_to_groups
from .ch10 import check_early_stop_step, check_eckart_young_floor, check_equal_budget_rank
from .ch11 import check_lora_pro_grads, check_loraplus_param_groups, check_pissa_init, check_vera_forward
from .ch12 import check_lora_ga_init
from .ch13 import check_ddp_allreduce_bytes, check_ddp_bytes_ratio, check_zero_stage_bytes
from .ch14 import check_int8_vectorwise, check_moment_update, check_outlier_split
from .ch15 import check_dq_overhead_bits, check_same_update_lr, check_smallest_good_rank
from .framework import (
    CHECKS,
    EXERCISE_PRELUDE,
    EXPECTS,
    STUB_MESSAGE,
    Case,
    ExerciseCheck,
    compare_values,
    FAILED_TRIES,
    exercise_check,
    fmt,
    format_report,
    is_a_try,
    reset_tries,
    run_check,
    seeded_tensors,
    use_or_fallback,
    with_hint_level,
)

# Chapter number -> the module with that notebook's checks (notebooks/NN_*.ipynb).
CHAPTERS: dict[int, ModuleType] = {
    int(module.__name__.rpartition(".ch")[2]): module
    for module in (ch00, ch01, ch02, ch03, ch04, ch05, ch06, ch07, ch08, ch09, ch10, ch11, ch12, ch13, ch14, ch15)
}


def chapter(number: int) -> ModuleType:
    """The module holding the checks of notebook ``number`` (``chapter(5)``: those of ``05_qlora``).

    Raises:
        ValueError: if no notebook with that number has checks.
    """
    if isinstance(number, bool) or not isinstance(number, int) or number not in CHAPTERS:
        raise ValueError(
            f"number={number!r} has no chapter of checks; allowed values: {', '.join(map(str, CHAPTERS))}"
        )
    return CHAPTERS[number]


# Star-imported into notebooks: only the runner, the fallback and the checks, so no short generic names
# shadow a learner's variables. Everything else is importable by name.
__all__ = ["run_check", "use_or_fallback"] + [f"check_{name}" for name in CHECKS]
