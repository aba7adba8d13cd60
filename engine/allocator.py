"""Python side of the CUDA virtual-memory allocator (`engine/csrc/vmm_allocator.cpp`).

`VMMAllocator` loads `engine/_lib/libflowgrpo_vmm.so` (built by CMakeLists.txt: `make build`),
plugs its `flowgrpo_malloc` / `flowgrpo_free` into torch as a `CUDAPluggableAllocator`, and keeps
one `torch.cuda.MemPool` per tag. Tensors created inside `with vmm.region("optimizer"):` are
carved by torch's caching allocator out of segments that the library mapped for that tag.

`vmm.pause("optimizer", backup=True)` copies those segments to pinned host memory, unmaps and
releases their physical memory (NVML shows it freed) and keeps the virtual addresses;
`vmm.resume("optimizer")` maps new physical memory at the same addresses and copies the contents
back. The tensors (and the optimizer holding them) never notice: same objects, same data_ptr.

Rules: do not touch a paused region's tensors (the access faults); allocate into a region from
one thread at a time (the current tag is process-wide, torch's pool routing is per thread);
`move_optimizer_state_to_region` moves an existing optimizer's state into a region once, after
its first step, so that only the state (not the step's temporaries) lives there.

torch >= 2.11: `torch.cuda.memory.CUDAPluggableAllocator`, `torch.cuda.MemPool(allocator)`,
`torch.cuda.use_mem_pool(pool)`. Expandable segments must be off inside regions (torch's pools
with a pluggable allocator do not support them).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

LIB_NAME = "libflowgrpo_vmm.so"
DEFAULT_LIB = Path(__file__).resolve().parent / "_lib" / LIB_NAME
ABI_VERSION = 1
EXPORTED = (
    "flowgrpo_malloc",
    "flowgrpo_free",
    "flowgrpo_vmm_abi_version",
    "flowgrpo_vmm_init",
    "flowgrpo_vmm_last_error",
    "flowgrpo_vmm_set_tag",
    "flowgrpo_vmm_get_tag",
    "flowgrpo_vmm_pause",
    "flowgrpo_vmm_resume",
    "flowgrpo_vmm_release_host",
    "flowgrpo_vmm_stats",
    "flowgrpo_vmm_allocations",
)
BUILD_HINT = (
    "build it with `make build` (or `cmake -S . -B build && cmake --build build`) on a machine with the CUDA toolkit"
)


class AllocatorUnavailable(RuntimeError):
    """The VMM allocator cannot run here; the message says why and what to do."""


class _Stats(ctypes.Structure):
    _fields_ = [
        ("allocations", ctypes.c_int64),
        ("reserved_bytes", ctypes.c_int64),
        ("mapped_bytes", ctypes.c_int64),
        ("paused_bytes", ctypes.c_int64),
        ("host_backup_bytes", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class RegionStats:
    """Bytes a tag holds: reserved virtual space, mapped (physical) and paused parts, pinned backups."""

    allocations: int
    reserved_bytes: int
    mapped_bytes: int
    paused_bytes: int
    host_backup_bytes: int


def load_library(path: str | Path | None = None) -> ctypes.CDLL:
    """Load the allocator library and declare its C signatures. Works without a GPU (no CUDA call)."""
    lib_path = Path(path) if path is not None else DEFAULT_LIB
    if not lib_path.is_file():
        raise AllocatorUnavailable(f"the VMM allocator library {lib_path} is not built; {BUILD_HINT}")
    lib = ctypes.CDLL(str(lib_path))
    missing = [name for name in EXPORTED if not hasattr(lib, name)]
    if missing:
        raise AllocatorUnavailable(f"{lib_path} lacks {missing}; it is stale: {BUILD_HINT}")
    c_str, c_int, c_i64 = ctypes.c_char_p, ctypes.c_int, ctypes.c_int64
    lib.flowgrpo_vmm_abi_version.restype = c_int
    lib.flowgrpo_vmm_abi_version.argtypes = []
    lib.flowgrpo_vmm_init.restype = c_int
    lib.flowgrpo_vmm_init.argtypes = []
    lib.flowgrpo_vmm_last_error.restype = c_str
    lib.flowgrpo_vmm_last_error.argtypes = []
    lib.flowgrpo_vmm_set_tag.restype = c_int
    lib.flowgrpo_vmm_set_tag.argtypes = [c_str]
    lib.flowgrpo_vmm_get_tag.restype = c_int
    lib.flowgrpo_vmm_get_tag.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.flowgrpo_vmm_pause.restype = c_int
    lib.flowgrpo_vmm_pause.argtypes = [c_str, c_int]
    lib.flowgrpo_vmm_resume.restype = c_int
    lib.flowgrpo_vmm_resume.argtypes = [c_str, c_int]
    lib.flowgrpo_vmm_release_host.restype = c_int
    lib.flowgrpo_vmm_release_host.argtypes = [c_str]
    lib.flowgrpo_vmm_stats.restype = c_int
    lib.flowgrpo_vmm_stats.argtypes = [c_str, ctypes.POINTER(_Stats)]
    lib.flowgrpo_vmm_allocations.restype = c_i64
    lib.flowgrpo_vmm_allocations.argtypes = [c_str, ctypes.POINTER(ctypes.c_uint64), c_i64]
    version = lib.flowgrpo_vmm_abi_version()
    if version != ABI_VERSION:
        raise AllocatorUnavailable(
            f"{lib_path} has ABI version {version}, this code expects {ABI_VERSION}; {BUILD_HINT}"
        )
    return lib


def _last_error(lib: ctypes.CDLL) -> str:
    return (lib.flowgrpo_vmm_last_error() or b"").decode(errors="replace")


def _tag_arg(tag: str | None) -> bytes | None:
    if tag is None:
        return None
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"a region tag must be a non-empty string, got {tag!r}")
    return tag.encode()


class VMMAllocator:
    """Tagged, pausable CUDA memory regions. One per process: use `VMMAllocator.get()`."""

    _instance: VMMAllocator | None = None

    @classmethod
    def get(cls, path: str | Path | None = None) -> VMMAllocator:
        if cls._instance is None:
            cls._instance = cls(path)
        return cls._instance

    def __init__(self, path: str | Path | None = None) -> None:
        if not torch.cuda.is_available():
            raise AllocatorUnavailable("the VMM allocator needs a CUDA device; torch.cuda.is_available() is False")
        conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
        if "expandable_segments:true" in conf.replace(" ", "").lower():
            raise AllocatorUnavailable(
                "expandable_segments is on (PYTORCH_CUDA_ALLOC_CONF); torch's memory pools with a pluggable "
                "allocator do not support it: turn it off to use VMM regions"
            )
        self.path = Path(path) if path is not None else DEFAULT_LIB
        self.lib = load_library(self.path)
        if self.lib.flowgrpo_vmm_init() != 0:
            raise AllocatorUnavailable(_last_error(self.lib))
        torch.cuda.init()
        self._pluggable = torch.cuda.memory.CUDAPluggableAllocator(str(self.path), "flowgrpo_malloc", "flowgrpo_free")
        self._pools: dict[str, torch.cuda.MemPool] = {}
        self._paused: set[str] = set()
        atexit.register(self.close)

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"VMM allocator: {what} failed: {_last_error(self.lib)}")

    def current_tag(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self.lib.flowgrpo_vmm_get_tag(buf, 256)
        return buf.value.decode()

    def pool(self, tag: str) -> torch.cuda.MemPool:
        if tag not in self._pools:
            self._pools[tag] = torch.cuda.MemPool(self._pluggable.allocator())
        return self._pools[tag]

    @contextlib.contextmanager
    def region(self, tag: str) -> Iterator[torch.cuda.MemPool]:
        """CUDA tensors created inside live in the tagged region (this thread's allocations only)."""
        raw = _tag_arg(tag)
        if tag in self._paused:
            raise RuntimeError(f"region {tag!r} is paused: resume it before allocating into it")
        pool = self.pool(tag)
        previous = self.current_tag().encode()
        self._check(self.lib.flowgrpo_vmm_set_tag(raw), "set_tag")
        try:
            with torch.cuda.use_mem_pool(pool):
                yield pool
        finally:
            self.lib.flowgrpo_vmm_set_tag(previous)

    def stats(self, tag: str | None = None) -> RegionStats:
        out = _Stats()
        self._check(self.lib.flowgrpo_vmm_stats(_tag_arg(tag), ctypes.byref(out)), "stats")
        return RegionStats(
            out.allocations, out.reserved_bytes, out.mapped_bytes, out.paused_bytes, out.host_backup_bytes
        )

    def allocations(self, tag: str | None = None) -> list[int]:
        """Base addresses of the tag's allocations (segments), for tests and debugging."""
        n = self.lib.flowgrpo_vmm_allocations(_tag_arg(tag), None, 0)
        buf = (ctypes.c_uint64 * max(n, 1))()
        self.lib.flowgrpo_vmm_allocations(_tag_arg(tag), buf, n)
        return [int(buf[i]) for i in range(n)]

    def is_paused(self, tag: str) -> bool:
        return tag in self._paused

    def pause(self, tag: str, *, backup: bool = True) -> int:
        """Release the tag's physical memory (backing contents up to pinned host memory if `backup`).

        Returns the bytes of device memory released. Do not touch the region's tensors until `resume`.
        """
        raw = _tag_arg(tag)
        torch.cuda.synchronize()
        before = self.stats(tag).mapped_bytes
        rc = self.lib.flowgrpo_vmm_pause(raw, int(backup))
        self._paused.add(tag)  # also on failure: some segments may be unmapped; `resume` maps whatever is not
        self._check(rc, f"pause({tag!r})")
        return before - self.stats(tag).mapped_bytes

    def resume(self, tag: str, *, keep_host_backup: bool = False) -> int:
        """Map the tag's memory again at the same addresses, restoring backed-up contents; returns bytes mapped.

        `keep_host_backup` keeps the pinned buffers for the next pause (pinning is slow; host memory stays held).
        """
        raw = _tag_arg(tag)
        before = self.stats(tag).mapped_bytes
        self._check(self.lib.flowgrpo_vmm_resume(raw, int(keep_host_backup)), f"resume({tag!r})")
        self._paused.discard(tag)
        return self.stats(tag).mapped_bytes - before

    def release_host_backup(self, tag: str | None = None) -> None:
        self._check(self.lib.flowgrpo_vmm_release_host(_tag_arg(tag)), "release_host")

    def close(self) -> None:
        """Drop the pools before the pluggable allocator (the reverse order crashes at exit)."""
        self._pools.clear()
        gc.collect()


@torch.no_grad()
def move_optimizer_state_to_region(optimizer: torch.optim.Optimizer, vmm: VMMAllocator, tag: str) -> int:
    """Re-create every CUDA state tensor of `optimizer` inside region `tag` (values copied); returns bytes.

    Call once, after the first `optimizer.step()` created the state. The state dict entries are
    replaced by the region's tensors; after that, pausing and resuming the region needs no re-binding.
    """
    moved = 0
    with vmm.region(tag):
        for state in optimizer.state.values():
            for key, value in list(state.items()):
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    copy = torch.empty_like(value)
                    copy.copy_(value)
                    state[key] = copy
                    moved += copy.numel() * copy.element_size()
    torch.cuda.synchronize()
    return moved
