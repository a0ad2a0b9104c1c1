"""Live storages through a training step on fake tensors: what is allocated, when, and freed.

A ``TorchDispatchMode`` sees every op's outputs; an output whose storage it has not seen is an
allocation (its bytes are the storage's, so views cost nothing), and a weak reference to the
storage reports its free. FSDP2 frees and re-allocates its unsharded parameters by resizing their
storages in place, which no op reports; :func:`fsdp_storage_events` wraps the two helpers it uses.

The log is classified afterwards (which storages turned out to be parameters, gradients, optimizer
states, saved for backward) and replayed to find the peak and what was live at that moment: see
:func:`replay`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


def local(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``t``'s bytes (a DTensor's local shard)."""
    inner = getattr(t, "_local_tensor", None)
    return t if inner is None else inner


def storage_key(t: torch.Tensor) -> int:
    """Identity of ``t``'s storage (the C++ StorageImpl), alive or fake alike."""
    return local(t).untyped_storage()._cdata


@dataclass
class StorageLog:
    """Allocation events ``(id, +bytes)`` and frees ``(id, -bytes)``, in the order they happened.

    An id names one storage for its lifetime (a freed storage's address is reused by later ones,
    so addresses cannot classify anything after the fact); :meth:`id` gives a live tensor's.
    """

    events: list[tuple[int, int]] = field(default_factory=list)
    size: dict[int, int] = field(default_factory=dict)  # live address -> bytes
    ids: dict[int, int] = field(default_factory=dict)  # live address -> lifetime id
    _refs: dict[int, weakref.ref] = field(default_factory=dict, repr=False)
    enabled: bool = True

    def id(self, t: torch.Tensor) -> int:
        """The lifetime id of ``t``'s storage (registering it if it was never seen)."""
        self.seen(t)
        return self.ids[storage_key(t)]

    def seen(self, t: torch.Tensor) -> None:
        t = local(t)
        if t.layout != torch.strided:
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.size:
            return
        self.size[key] = n = st.nbytes()
        self.ids[key] = uid = len(self.events)
        self.events.append((uid, n))
        self._refs[key] = weakref.ref(st, lambda _r, k=key: self._freed(k))

    def seen_all(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self.seen(t)

    def resized(self, t: torch.Tensor) -> None:
        """``t``'s storage changed size in place (FSDP2's free / re-allocation)."""
        key = storage_key(t)
        if key not in self.size:
            self.seen(t)
            return
        n = local(t).untyped_storage().nbytes()
        self.events.append((self.ids[key], n - self.size[key]))
        self.size[key] = n

    def _freed(self, key: int) -> None:
        n = self.size.pop(key, None)
        uid = self.ids.pop(key, None)
        self._refs.pop(key, None)
        if n is not None and self.enabled:
            self.events.append((uid, -n))

    def close(self) -> None:
        """Stop recording (frees after the step are not part of it)."""
        self.enabled = False


class TrackAllocations(TorchDispatchMode):
    """Records every new storage an op returns into ``log``."""

    def __init__(self, log: StorageLog) -> None:
        super().__init__()
        self.log = log

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.log.seen(t)
        return out


@contextlib.contextmanager
def fsdp_storage_events(log: StorageLog) -> Iterator[None]:
    """Report FSDP2's in-place storage resizes (its unsharded parameters) to ``log``."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param, _fsdp_param_group

    alloc, free = _fsdp_param.alloc_storage, _fsdp_param.free_storage

    def alloc_and_log(tensor: torch.Tensor) -> None:
        alloc(tensor)
        log.resized(tensor)

    def free_and_log(tensor: torch.Tensor) -> None:
        free(tensor)
        log.resized(tensor)

    patched = [(_fsdp_param, "alloc_storage", alloc_and_log)]
    patched += [(_fsdp_param, "free_storage", free_and_log)]
    patched += [(_fsdp_param_group, "alloc_storage", alloc_and_log)]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patched]
    try:
        for m, name, fn in patched:
            setattr(m, name, fn)
        yield
    finally:
        for m, name, fn in saved:
            setattr(m, name, fn)


HOST = "host"  # offloaded activation checkpoints: host memory, apart from the device's


def replay(
    events: list[tuple[int, int]], category: dict[int, str], default: str = "transient"
) -> tuple[int, dict[str, int]]:
    """The peak of live device bytes over ``events`` and what each category held at that moment
    (storages of category :data:`HOST` are host memory: see :func:`host_peak`)."""
    live: dict[str, int] = {}
    total = peak = 0
    at_peak: dict[str, int] = {}
    for key, delta in events:
        cat = category.get(key, default)
        if cat == HOST:
            continue
        live[cat] = live.get(cat, 0) + delta
        total += delta
        if total > peak:
            peak, at_peak = total, dict(live)
    return peak, {k: v for k, v in at_peak.items() if v}


def host_peak(events: list[tuple[int, int]], category: dict[int, str]) -> int:
    """The peak of live :data:`HOST` bytes over ``events``."""
    total = peak = 0
    for key, delta in events:
        if category.get(key) == HOST:
            total += delta
            peak = max(peak, total)
    return peak


def live_peak(fn: Callable[[], object], persistent: Iterable[torch.Tensor] = ()) -> int:
    """The peak of live storage bytes while ``fn`` runs, ``persistent`` counted from the start.

    The planner's own accounting, for tensors of any kind: on real tensors it measures what the
    planner plans on fake ones (a storage counts from the op that returns it to its free; what
    an op allocates and frees inside itself is not seen), deterministically, on any CPU.
    """
    log = StorageLog()
    log.seen_all(persistent)
    with TrackAllocations(log):
        fn()
    log.close()
    return replay(log.events, {})[0]
