"""Asynchronous offload of saved activations to pinned host memory.

Forward: a saved-tensor hook copies each chosen tensor into a slice of a preallocated
`PinnedPool` on a side CUDA stream (after an event from the compute stream, so the copy reads
finished data); the device storage is let go at the end of the block's forward, or later, once
its copy's event has completed. Backward runs the
blocks in reverse order: unpacking the first tensor of a block starts the host-to-device copies of
the block before it (prefetch one block ahead), and every unpack makes the compute stream wait on
its own copy's event only. When the pool is full, the tensor is copied synchronously into fresh
pinned memory with a warning; nothing fails.

Only CUDA tensors move: a CPU tensor has no device memory to free, so offloading it is a no-op.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

ALIGNMENT = 512  # bytes; slices start on this boundary so copies stay fast
SAVED_MIN_BYTES = 1 << 20  # offload="saved" moves saved tensors of at least this size

_state = threading.local()


def _should_offload(t: torch.Tensor) -> bool:
    """Whether a tensor's device memory can be given back by offloading it (CUDA only)."""
    return t.is_cuda


def mark_not_offload(tensor: torch.Tensor) -> torch.Tensor:
    """Keep `tensor` on its device even when a block's policy would offload it (for tensors a
    kernel needs in place, e.g. a buffer written to later). Returns the tensor."""
    tensor._glm5v_no_offload = True
    return tensor


def _marked(t: torch.Tensor) -> bool:
    return getattr(t, "_glm5v_no_offload", False) or (t._base is not None and _marked(t._base))


def _parameter_data(t: torch.Tensor) -> bool:
    """A parameter or a view of one (matrix products save weight.t()): it stays alive anyway, so
    offloading it would free nothing."""
    return isinstance(t, torch.nn.Parameter) or (t._base is not None and _parameter_data(t._base))


@contextlib.contextmanager
def no_offload() -> Iterator[None]:
    """Nothing saved inside this context is offloaded."""
    previous = getattr(_state, "disabled", False)
    _state.disabled = True
    try:
        yield
    finally:
        _state.disabled = previous


@dataclass
class OffloadStats:
    """bytes_offloaded: sent to host memory; bytes_kept: saved tensors left on the device by the
    policy (too small, marked, or inside `no_offload`); sync_fallbacks: copies made synchronously
    because the pool was full; exposed_copy_seconds: host time spent waiting for copies that were
    not hidden (fallbacks and tensors unpacked before their prefetch was issued)."""

    bytes_offloaded: int = 0
    bytes_kept: int = 0
    sync_fallbacks: int = 0
    prefetched: int = 0
    exposed_copy_seconds: float = 0.0


class PinnedPool:
    """One pinned host buffer of `capacity_bytes`, handed out as aligned slices.

    Slices are taken in forward order and given back in backward (reverse) order, so the pool is a
    stack: a released slice is reclaimed once every slice above it is released too.
    """

    def __init__(self, capacity_bytes: int, *, pin_memory: bool | None = None):
        if not isinstance(capacity_bytes, int) or capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be a positive int, got {capacity_bytes!r}")
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.buffer = torch.empty(capacity_bytes, dtype=torch.uint8, pin_memory=pin)
        self.capacity = capacity_bytes
        self._slices: list[list] = []  # [offset, nbytes, released]
        self._top = 0
        self._lock = threading.Lock()

    @property
    def used(self) -> int:
        return self._top

    def allocate(self, nbytes: int) -> tuple[torch.Tensor, int] | None:
        """(uint8 view of nbytes, slice id) or None when the pool cannot hold it."""
        with self._lock:
            offset = -(-self._top // ALIGNMENT) * ALIGNMENT
            if offset + nbytes > self.capacity:
                return None
            self._slices.append([offset, nbytes, False])
            self._top = offset + nbytes
            return self.buffer[offset: offset + nbytes], len(self._slices) - 1

    def release(self, slice_id: int) -> None:
        with self._lock:
            self._slices[slice_id][2] = True
            while self._slices and self._slices[-1][2]:
                self._slices.pop()
            self._top = self._slices[-1][0] + self._slices[-1][1] if self._slices else 0


def _pinned_like(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())


class _Copier:
    """The side stream and events on CUDA; plain synchronous copies elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor):
        """dst.copy_(src) after the current stream's work; returns an event marking its end (None
        when synchronous)."""
        if not self.cuda:
            dst.copy_(src)
            return None
        current = torch.cuda.current_stream(src.device if src.is_cuda else dst.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        (src if src.is_cuda else dst).record_stream(self.stream)
        return event


@dataclass
class _HostCopy:
    """The bytes of one device storage on the host, and their way back."""

    host: torch.Tensor
    device: torch.device
    pool: PinnedPool | None = None
    slice_id: int | None = None
    # The device bytes, held until the block's forward ends and the copy to the host is done: while
    # held, no other storage can take its address, which is what identifies it within the block.
    source: torch.Tensor | None = None
    event: object = None  # device-to-host copy done
    back: torch.Tensor | None = None  # the device bytes again, once restored
    back_event: object = None  # host-to-device copy done

    def restore(self, copier: _Copier) -> None:
        """Start the copy back to the device (a prefetch when called ahead of use)."""
        if self.back is None:
            self.back = torch.empty(self.host.numel(), dtype=torch.uint8, device=self.device)
            self.back_event = copier.copy(self.back, self.host)
            self.source = None  # the copy back is queued behind the copy out, on the same stream


@dataclass
class _Saved:
    """One saved tensor: a view (shape, stride, offset, dtype) into an offloaded storage."""

    copy: _HostCopy
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int
    dtype: torch.dtype
    group: _Group


@dataclass
class _Group:
    """What one wrapped block offloaded: its storages (each once) and how many saved tensors
    still wait to be unpacked."""

    copies: dict[int, _HostCopy] = field(default_factory=dict)
    pending: int = 0


class Offloader:
    """Saved-tensor hooks that offload one block's tensors; shared by the blocks of one model.

    mode: "inputs" offloads the tensors that share storage with the block's inputs, "saved" every
    saved tensor of at least SAVED_MIN_BYTES (parameters are never offloaded: they stay alive).
    """

    def __init__(self):
        self.stats = OffloadStats()
        # Blocks in forward order whose backward has not started; weak, so that a graph dropped
        # without a backward (evaluation with grad enabled) gives its pool slices back.
        self.groups: list[weakref.ref] = []
        self._copiers: dict[torch.device, _Copier] = {}

    def copier(self, device: torch.device) -> _Copier:
        if device not in self._copiers:
            self._copiers[device] = _Copier(device)
        return self._copiers[device]

    @contextlib.contextmanager
    def block(self, mode: str, inputs: list[torch.Tensor], pool: PinnedPool | None) -> Iterator[None]:
        """Offload what the block saves inside this context, per `mode`, into `pool` (None: fresh
        pinned memory per tensor, from torch's caching host allocator)."""
        group = _Group()
        input_storages = {t.untyped_storage().data_ptr() for t in inputs}

        def chosen(t: torch.Tensor) -> bool:
            if getattr(_state, "disabled", False) or _marked(t) or _parameter_data(t):
                return False
            if mode == "inputs":
                return t.untyped_storage().data_ptr() in input_storages
            return t.untyped_storage().nbytes() >= SAVED_MIN_BYTES

        def pack(t: torch.Tensor):
            if not _should_offload(t):
                return t
            if not chosen(t):
                self.stats.bytes_kept += t.untyped_storage().nbytes()
                return t
            return self._offload(t, group, pool)

        previous = getattr(_state, "pack", None)
        _state.pack = pack
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, self.unpack):
                yield
        finally:
            _state.pack = previous
        if group.copies:
            self.groups.append(weakref.ref(group))
            weakref.finalize(group, self._release, list(group.copies.values()))
        self._collect_finished()

    def pack(self, t: torch.Tensor):
        """What the innermost offloading block does with a tensor it saves (outside a block: keep
        it). For tensors kept outside autograd's saved-tensor hooks (selective recompute's kept
        outputs); `unpack` gives the tensor back."""
        pack = getattr(_state, "pack", None)
        return t if pack is None else pack(t)

    def _offload(self, t: torch.Tensor, group: _Group, pool: PinnedPool | None) -> _Saved:
        storage = t.untyped_storage()
        copy = group.copies.get(storage.data_ptr())
        if copy is None:
            copy = self._copy_to_host(storage, t.device, pool)
            group.copies[storage.data_ptr()] = copy
        group.pending += 1
        return _Saved(copy, t.shape, t.stride(), t.storage_offset(), t.dtype, group)

    def _copy_to_host(self, storage, device: torch.device, pool: PinnedPool | None) -> _HostCopy:
        whole = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)  # the storage, as bytes
        nbytes = storage.nbytes()
        self.stats.bytes_offloaded += nbytes
        if pool is None:
            host = _pinned_like(nbytes)
            event = self.copier(device).copy(host, whole)
            return _HostCopy(host, device, source=whole, event=event)
        taken = pool.allocate(nbytes)
        if taken is None:
            warnings.warn(f"PinnedPool is full ({pool.used} of {pool.capacity} bytes used): copying {nbytes} bytes "
                          "synchronously", RuntimeWarning, stacklevel=5)
            self.stats.sync_fallbacks += 1
            start = time.perf_counter()
            host = _pinned_like(nbytes)
            host.copy_(whole)
            self.stats.exposed_copy_seconds += time.perf_counter() - start
            return _HostCopy(host, device, source=whole)
        host, slice_id = taken
        event = self.copier(device).copy(host, whole)
        return _HostCopy(host, device, pool, slice_id, source=whole, event=event)

    def _collect_finished(self) -> None:
        """Let go of device storages whose copy to the host has finished."""
        for group in filter(None, (ref() for ref in self.groups)):
            for copy in group.copies.values():
                if copy.source is not None and (copy.event is None or copy.event.query()):
                    copy.source = copy.event = None

    def unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        copy, group = saved.copy, saved.group
        copier = self.copier(copy.device)
        index = next((i for i, ref in enumerate(self.groups) if ref() is group), None)
        if index is not None:  # the first unpack of this block in this backward
            for earlier in filter(None, (ref() for ref in self.groups[:index][-1:])):
                for other in earlier.copies.values():  # prefetch the block backward reaches next
                    other.restore(copier)
            del self.groups[index]
        if copy.back is None:
            start = time.perf_counter()
            copy.restore(copier)
            if copy.back_event is not None:
                copy.back_event.synchronize()
            self.stats.exposed_copy_seconds += time.perf_counter() - start
        else:
            self.stats.prefetched += 1
        if copy.back_event is not None:
            torch.cuda.current_stream(copy.device).wait_event(copy.back_event)
        out = torch.empty(0, dtype=saved.dtype, device=copy.device).set_(
            copy.back.untyped_storage(), saved.offset, saved.shape, saved.stride)
        group.pending -= 1
        if group.pending == 0:
            self._release(group.copies.values())
        return out

    def _release(self, copies) -> None:
        """Give pool slices back once their bytes are on the device again (or will never be)."""
        for copy in copies:
            if copy.slice_id is not None:
                if copy.back_event is not None:
                    copy.back_event.synchronize()
                copy.pool.release(copy.slice_id)
                copy.slice_id = None


OFFLOADER = Offloader()


def stats() -> OffloadStats:
    """What the offloading blocks did since the last `reset_stats()` (this process)."""
    return OFFLOADER.stats


def reset_stats() -> None:
    OFFLOADER.stats = OffloadStats()
