"""Argument checks shared by the whole library.

Every check raises a ``ValueError`` that names the argument, shows the bad value and says
what is allowed, and returns the value normalised to a plain Python type (a numpy integer
becomes an ``int``), so that what is stored (and later written to JSON) is a Python value.
This module sits below every other one: it imports nothing from the package.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPE_NAMES = "torch.float32, torch.float16, torch.bfloat16"


def check_int(name: str, value: Any, low: int = 1, allow_none: bool = False) -> int | None:
    """``value`` must be an integer >= ``low`` (a bool is not an integer); ``None`` where allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        allowed = f"{'None or ' if allow_none else ''}an integer >= {low}"
        raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")
    return int(value)


def check_real(name: str, value: Any, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, what: str = "") -> float:
    """``value`` must be a finite real number (not a bool) in the given range; ``what`` says
    what the number is, for the message."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        allowed = "a finite number" + (f" {bounds}" if bounds else "") + (f" ({what})" if what else "")
        raise ValueError(f"{name} must be {allowed}, got {name}={value!r}")
    return float(value)


def plain_number(checked: float, original: Any) -> int | float:
    """The Python number for a checked real: an integral ``original`` (``8``, ``np.int64(8)``)
    stays an ``int``, any other becomes a ``float`` (so ``alpha=8`` still prints as 8)."""
    if isinstance(original, numbers.Integral):
        return int(original)
    return checked


def check_prob(name: str, value: Any) -> float:
    """``value`` must be a number strictly between 0 and 1 (an EMA coefficient)."""
    return check_real(name, value, 0.0, 1.0, low_open=True, high_open=True, what="an EMA coefficient")


def check_bool(name: str, value: Any) -> bool:
    """``value`` must be ``True`` or ``False`` (a string such as "false" is refused, not truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {name}={value!r}")
    return value


def check_float_dtype(name: str, value: Any) -> torch.dtype:
    """``value`` must be torch.float32, torch.float16 or torch.bfloat16."""
    if value not in FLOAT_DTYPES:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {FLOAT_DTYPE_NAMES}")
    return value


def check_float_tensor(name: str, x: object) -> torch.Tensor:
    """``x`` must be a non-empty, finite float32/float16/bfloat16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; allowed dtypes: {FLOAT_DTYPE_NAMES}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); it must have at least 1 element")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf; only finite values can be quantized")
    return x


def check_float_input(name: str, x: object) -> torch.Tensor:
    """``x`` must be a floating-point tensor (an integer input would be silently truncated)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; a floating-point tensor is required "
                         f"(cast it first, e.g. {name}.float())")
    return x


def check_blocksize(blocksize: object, allowed: tuple[int, ...], name: str = "blocksize") -> int:
    """``blocksize`` must be one of ``allowed``."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize not in allowed:
        raise ValueError(f"{name}={blocksize!r} is not allowed; allowed values: {', '.join(map(str, allowed))}")
    return int(blocksize)


def check_device(name: str, value: Any) -> torch.device:
    """``value`` (a ``torch.device`` or a device string such as ``"cpu"``, ``"cuda:0"``) as a ``torch.device``."""
    if isinstance(value, torch.device):
        return value
    if isinstance(value, str):
        try:
            return torch.device(value)
        except (RuntimeError, ValueError, TypeError):
            pass
    raise ValueError(f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', "
                     f"got {name}={value!r}")
