"""Counting the bytes a traced function keeps live on the device: :class:`LiveBytes` (fake CUDA and
real CPU tensors, a dispatch mode), :class:`CudaMemoryCounter` (the real CUDA caching allocator's
statistics behind the same interface) and :func:`storage_bytes` (the bytes behind given tensors).

The figures are what ``max_memory_allocated`` reports: live storages rounded to 512 B. Which counter
a run uses is the session's choice (:mod:`lowmcgm.memory.session`).
"""

from __future__ import annotations

import math
import weakref
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _round_up(n: int, granularity: int) -> int:
    return int(math.ceil(n / granularity) * granularity) if granularity > 1 else int(n)


def storage_bytes(tensors: Iterable[Any], granularity: int = 512) -> int:
    """Bytes of the distinct storages behind ``tensors`` (modules are expanded to their parameters
    and buffers; None entries are skipped), each rounded up to ``granularity``."""
    seen: set[int] = set()
    total = 0
    for t in _iter_tensors(tensors):
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            continue
        if id(st) in seen:
            continue
        seen.add(id(st))
        total += _round_up(st.nbytes(), granularity)
    return total


def _iter_tensors(items: Any) -> Iterator[torch.Tensor]:
    if isinstance(items, torch.Tensor):
        yield items
        return
    if isinstance(items, torch.nn.Module):
        yield from items.parameters()
        yield from items.buffers()
        return
    if isinstance(items, torch.optim.Optimizer):
        for state in items.state.values():
            yield from (v for v in tree_leaves(state) if isinstance(v, torch.Tensor))
        return
    if isinstance(items, Mapping):
        items = items.values()
    for x in items:
        if x is not None:
            yield from _iter_tensors(x)


class LiveBytes(TorchDispatchMode):
    """Live storage bytes on one device type and their peak: what ``max_memory_allocated`` reports.

    A dispatch mode: every tensor an aten op returns is looked at; a storage not seen before on
    ``device_type`` is added (its size rounded up to ``granularity``, 512 B like the CUDA caching
    allocator) and a weak reference subtracts it when it dies. Views and aliases share a storage and
    count once. Tensors that existed before the mode was entered are invisible unless given to
    :meth:`track`. Allocations inside kernels (workspaces) are not seen.

    Use as a context manager; read ``current``, ``peak``, ``snapshots``.
    """

    def __init__(self, device_type: str = "cuda", granularity: int = 512):
        super().__init__()
        self.device_type = device_type
        self.granularity = granularity
        self._live: dict[int, tuple[int, weakref.ref]] = {}
        self.current = 0
        self.peak = 0
        self._window_peak = 0
        self.snapshots: list[dict] = []

    # -- counting
    def track(self, *items: Any) -> int:
        """Count tensors made before the mode was entered (modules: parameters and buffers).
        Returns the bytes newly added."""
        before = self.current
        for t in _iter_tensors(items):
            self._add(t)
        return self.current - before

    def _add(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (sparse, nested, some subclasses)
            return
        key = id(st)
        if key in self._live:
            return
        size = _round_up(st.nbytes(), self.granularity)

        def release(_ref, key=key, self_ref=weakref.ref(self)):
            me = self_ref()
            if me is not None:
                entry = me._live.pop(key, None)
                if entry is not None:
                    me.current -= entry[0]

        self._live[key] = (size, weakref.ref(st, release))
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
        if self.current > self._window_peak:
            self._window_peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out

    # -- reading
    def reset_peak(self) -> None:
        """Start a new peak from the current bytes (``torch.cuda.reset_peak_memory_stats``)."""
        self.peak = self._window_peak = self.current

    def snapshot(self, label: str) -> dict:
        """Record the bytes now, the peak so far and the peak since the previous snapshot."""
        snap = {"label": label, "current_bytes": self.current, "peak_bytes": self.peak,
                "peak_since_last_bytes": self._window_peak}
        self.snapshots.append(snap)
        self._window_peak = self.current
        return snap

    def report(self) -> dict:
        return {"peak_bytes": self.peak, "current_bytes": self.current,
                "snapshots": list(self.snapshots)}


class CudaMemoryCounter:
    """The :class:`LiveBytes` interface over the real CUDA caching allocator's statistics.

    ``current``/``peak`` are ``memory_allocated``/``max_memory_allocated`` (also the reserved
    figures). Entering resets the peak statistics; snapshots reset them too, keeping the overall
    peak here. Untested where it was written (no GPU there).
    """

    def __init__(self, device: torch.device | str = "cuda"):
        self.device = torch.device(device)
        self.snapshots: list[dict] = []
        self._peak = 0
        self._peak_reserved = 0

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize(self.device)
        self._fold()
        return False

    def _fold(self) -> None:
        self._peak = max(self._peak, torch.cuda.max_memory_allocated(self.device))
        self._peak_reserved = max(self._peak_reserved, torch.cuda.max_memory_reserved(self.device))

    @property
    def current(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    @property
    def peak(self) -> int:
        self._fold()
        return self._peak

    def track(self, *items: Any) -> int:  # the allocator sees everything already
        return 0

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = self.current
        self._peak_reserved = torch.cuda.memory_reserved(self.device)

    def snapshot(self, label: str) -> dict:
        torch.cuda.synchronize(self.device)
        window = torch.cuda.max_memory_allocated(self.device)
        window_reserved = torch.cuda.max_memory_reserved(self.device)
        self._fold()
        snap = {"label": label, "current_bytes": self.current, "peak_bytes": self._peak,
                "peak_since_last_bytes": window,
                "reserved_bytes": torch.cuda.memory_reserved(self.device),
                "peak_reserved_bytes": self._peak_reserved,
                "peak_reserved_since_last_bytes": window_reserved}
        self.snapshots.append(snap)
        torch.cuda.reset_peak_memory_stats(self.device)
        return snap

    def report(self) -> dict:
        torch.cuda.synchronize(self.device)
        self._fold()
        return {"peak_bytes": self._peak, "current_bytes": self.current,
                "peak_reserved_bytes": self._peak_reserved, "snapshots": list(self.snapshots)}

