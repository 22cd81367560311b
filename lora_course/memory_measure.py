"""Measuring training memory: bytes that are really alive.

:func:`track_peak_memory` measures a step: on CPU the peak of live tensor bytes (a
``TorchDispatchMode`` that sees every tensor an operator creates and drops its bytes when
its storage is freed), on CUDA ``torch.cuda.max_memory_allocated``. Estimating the same
memory from a model's shapes is :mod:`lora_course.memory_estimate`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checks import check_device

__all__ = ["LiveBytes", "PeakMemory", "storage_bytes", "track_peak_memory"]


def _dense_tensors(name: str, tensors: Any) -> list[torch.Tensor]:
    """``tensors`` (an iterable of dense tensors; one tensor stands for itself) as a list, or a
    ``ValueError`` naming ``name``: anything else, or a sparse tensor (its values are not one storage)."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    elif isinstance(tensors, (str, bytes, nn.Module)) or not isinstance(tensors, Iterable):
        hint = "; pass [*module.parameters(), *module.buffers()]" if isinstance(tensors, nn.Module) else ""
        raise ValueError(f"{name} must be an iterable of tensors (a list, a generator), got "
                         f"{type(tensors).__name__}: {tensors!r:.60}{hint}")
    out = list(tensors)
    for k, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must hold only tensors; item {k} is {type(t).__name__}: {t!r:.60}")
        if t.layout != torch.strided:
            raise ValueError(f"{name}: item {k} is a {t.layout} tensor; sparse tensors are not supported "
                             "(only dense, strided tensors have one storage to count)")
    return out


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once).

    ``tensors``: an iterable of dense tensors (a single tensor counts as ``[tensor]``); anything
    else, or a sparse tensor, is a ``ValueError``."""
    tensors = _dense_tensors("tensors", tensors)
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode while they are alive.

    Every tensor an operator returns is seen here; a storage is counted once (views and
    in-place results add nothing) and its bytes are subtracted when it is freed (a weak
    reference callback). ``alive``: tensors that exist before the block (weights, optimizer
    states, the batch); their storages are counted from the start (``baseline``), and a
    view of them created inside (a transpose, a ``detach``) adds nothing. ``alive`` must be an
    iterable of dense tensors (a ``ValueError`` otherwise; sparse tensors are not supported).
    """

    def __init__(self, alive: Iterable[torch.Tensor] = ()) -> None:
        alive = _dense_tensors("alive", alive)
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}
        for t in alive:
            self._track(t.untyped_storage())
        self.baseline = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        if key in self._alive:
            return
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)

        def freed(_, key=key, size=size):
            self.live -= size
            self._alive.pop(key, None)

        self._alive[key] = weakref.ref(storage, freed)


@dataclass
class PeakMemory:
    """What :func:`track_peak_memory` measured, in bytes.

    ``baseline``: bytes alive at entry (the objects passed in on CPU; everything allocated
    on CUDA); ``peak``: the highest total during the block; ``end``: the total at exit.
    """

    device: str
    baseline: int = 0
    peak: int = 0
    end: int = 0

    @property
    def added_peak(self) -> int:
        """Peak minus baseline: what the block itself needed at its worst moment."""
        return self.peak - self.baseline


def _tensors_of(objects: Sequence[Any]) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for k, obj in enumerate(objects):
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
        else:
            raise ValueError(
                f"alive: track_peak_memory counts tensors, modules and optimizers; alive[{k}] is "
                f"{type(obj).__name__!r}: {obj!r:.60} (pass them one by one: track_peak_memory(model, optimizer))"
            )
    for t in tensors:
        if t.layout != torch.strided:
            raise ValueError(f"alive holds a {t.layout} tensor; sparse tensors are not supported")
    return tensors


def _check_device(device: Any) -> torch.device:
    """``device`` of :func:`track_peak_memory`: "cpu", "cuda", "cuda:N" or a ``torch.device`` of
    those, with CUDA only where it is available; a ``ValueError`` otherwise."""
    try:
        dev = check_device("device", device)
    except ValueError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r} is not supported; allowed: None (from the alive objects), "
                         "'cpu', 'cuda', 'cuda:N' or a torch.device of those")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} needs CUDA, which is not available here "
                         "(torch.cuda.is_available() is False); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


@contextlib.contextmanager
def track_peak_memory(*alive: Any, device: str | torch.device | None = None) -> Iterator[PeakMemory]:
    """Measure the peak memory of the block inside ``with``.

    On CPU the peak of live tensor bytes: the storages of ``alive`` (tensors, modules,
    optimizers: what exists before the block, e.g. the model and its optimizer) plus every
    tensor created inside the block while it lives. On CUDA ``torch.cuda.max_memory_allocated``
    after a reset of the peak statistics (``alive`` is then not needed: the allocator knows).

    Example::

        with track_peak_memory(model, optimizer) as mem:
            loss = model(**batch).loss; loss.backward(); optimizer.step()
        print(mem.peak / 2**20, "MiB")

    ``alive``: tensors (dense), modules, optimizers; ``device``: None, "cpu", "cuda", "cuda:N" or
    a ``torch.device`` (CUDA only where available). Anything else is a ``ValueError`` on entry.
    """
    tensors = _tensors_of(alive)  # checked first, on every device
    if device is not None:
        dev = _check_device(device)
    else:
        dev = tensors[0].device if tensors else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        result = PeakMemory(str(dev), baseline=torch.cuda.memory_allocated(dev))
        yield result
        torch.cuda.synchronize(dev)
        result.peak = torch.cuda.max_memory_allocated(dev)
        result.end = torch.cuda.memory_allocated(dev)
        return
    if dev.type != "cpu":
        raise ValueError(f"alive holds tensors on {str(dev)!r}, which is not supported; allowed: cpu, cuda "
                         "(a meta tensor has no memory to measure)")
    tracker = LiveBytes(tensors)
    result = PeakMemory("cpu", baseline=tracker.baseline)
    with tracker:
        yield result
    result.peak, result.end = tracker.peak, tracker.live

