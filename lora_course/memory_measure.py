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

__all__ = ["LiveBytes", "PeakMemory", "storage_bytes", "track_peak_memory"]


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and tied weights count once)."""
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages created inside the mode while they are alive.

    Every tensor an operator returns is seen here; a storage is counted once (views and
    in-place results add nothing) and its bytes are subtracted when it is freed (a weak
    reference callback). ``alive``: tensors that exist before the block (weights, optimizer
    states, the batch); their storages are counted from the start (``baseline``), and a
    view of them created inside (a transpose, a ``detach``) adds nothing.
    """

    def __init__(self, alive: Iterable[torch.Tensor] = ()) -> None:
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
    for obj in objects:
        if isinstance(obj, torch.Tensor):
            tensors.append(obj)
        elif isinstance(obj, nn.Module):
            tensors += [*obj.parameters(), *obj.buffers()]
        elif isinstance(obj, torch.optim.Optimizer):
            tensors += [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
        else:
            raise ValueError(
                f"track_peak_memory counts tensors, modules and optimizers; got {type(obj).__name__!r}"
            )
    return tensors


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
    """
    dev = torch.device(device) if device is not None else _device_of(alive)
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
        raise ValueError(f"device={str(dev)!r} is not supported; allowed: cpu, cuda")
    tracker = LiveBytes(_tensors_of(alive))
    result = PeakMemory("cpu", baseline=tracker.baseline)
    with tracker:
        yield result
    result.peak, result.end = tracker.peak, tracker.live


def _device_of(objects: Sequence[Any]) -> torch.device:
    for t in _tensors_of(objects):
        return t.device
    return torch.device("cpu")
