"""GPU memory time-sharing between the rollout engine and the trainer, and per-phase accounting.

One device holds both. The order of one step (DESIGN.md, data flow):

    to_rollout:  trainer state off the device (optimizer state + grads → pinned host, asynchronous
                 copies; or the allocator region holding them is paused) → engine.wake(["weights"])
                 → engine.sync_weights(trainer parameters) → engine.wake(["kv_cache"])
    ... rollout ...
    to_train:    engine.sleep(level) (level 1: KV cache; level 2: KV cache and weights)
                 → trainer state back on the device
    ... update ...

`DeviceMemoryManager` owns that order (calling `to_rollout` twice, or `to_train` before a rollout,
raises), times every stage on the step's timer (the sync is the `update_weights` phase, the other
stages are spans), and takes a `snapshot` after each: torch allocated / reserved / peak
(CUDA), device-level used memory from NVML (nvidia-ml-py; where there is no NVML the snapshot
says `nvml: unavailable (<reason>)`), and the process RSS. An out-of-memory error inside any
phase is re-raised as `PhaseOutOfMemoryError` naming the phase, the bytes the rollout engine and
the trainer held, and the knob to turn.

Offloading keeps tensor identity: a state tensor's storage is swapped (`t.data = ...`) between
the device and a pinned host buffer that is allocated once and reused, so the optimizer keeps
its references and needs no re-binding. `RegionOffloader` does the same without any copy of
tensor objects, by pausing a tagged region of the VMM allocator (`engine.allocator`).

`PhaseMemory` is the timer hook that gives every step phase its own snapshot (on CUDA the peak
counter is reset when a phase starts, so each phase reports its own peak).

Simplification: one device, one trainer, one engine.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from agentflow.timing import NO_TIMER, Timer
from engine.timer import PHASES

GiB = 1 << 30

KNOBS: dict[str, str] = {
    "rollout": (
        "lower the rollout engine's KV-cache size (gpu_memory_utilization / kv_cache_bytes), its token budget "
        "(max_num_batched_tokens, max_num_seqs, max_new_tokens) or the group size G"
    ),
    "wake": (
        "the trainer did not give back enough memory: offload its optimizer state and grads (DeviceMemoryManager "
        "offloader) or lower the rollout engine's KV-cache size (gpu_memory_utilization / kv_cache_bytes)"
    ),
    "sync": "lower the weight-sync bucket size (bucket_bytes) or wake the KV cache only after the sync",
    "train": (
        "lower the micro-batch token budget (token_budget) or the group size G, and make sure the rollout "
        "engine slept at level 2 (weights released)"
    ),
    "offload": "host memory for the pinned copies ran out: release the optimizer state instead, or add host memory",
}


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / (1 << 20):.1f} MiB"


def _knob_for(phase: str) -> str:
    for key, text in KNOBS.items():
        if phase.startswith(key) or key in phase:
            return text
    return "lower the group size G or the token budget"


def is_oom(exc: BaseException) -> bool:
    """torch's OutOfMemoryError, a driver/runtime error that says it ran out of memory, the CPU allocator's
    refusal (torch 2.13: "DefaultCPUAllocator: can't allocate memory: ... Error code 12"), or MemoryError."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text
        or "cuda_error_out_of_memory" in text
        or ("defaultcpuallocator" in text and ("can't allocate memory" in text or "not enough memory" in text))
    )


class PhaseOutOfMemoryError(RuntimeError):
    """Out of memory inside a named phase; the message says what was held and what to turn."""

    def __init__(self, phase: str, engine_bytes: int | None, trainer_bytes: int | None, knob: str, cause: str):
        self.phase = phase
        self.engine_bytes = engine_bytes
        self.trainer_bytes = trainer_bytes
        self.knob = knob
        super().__init__(
            f"out of memory during phase {phase!r}: the rollout engine held {fmt_bytes(engine_bytes)}, "
            f"the trainer (torch allocator) held {fmt_bytes(trainer_bytes)}. To fix: {knob}. (cause: {cause})"
        )


def engine_held_bytes(engine: Any) -> int | None:
    """Bytes the rollout engine reports holding (`stats()["held_bytes"]`), None if it does not say."""
    if engine is None:
        return None
    try:
        held = engine.stats().get("held_bytes")
    except Exception:
        return None
    return None if held is None else int(held)


def explain_oom(phase: str, exc: BaseException, *, engine: Any = None, engine_bytes: int | None = None):
    """Build the `PhaseOutOfMemoryError` for `exc` raised in `phase` (raise it `from exc`)."""
    if engine_bytes is None:
        engine_bytes = engine_held_bytes(engine)
    trainer = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return PhaseOutOfMemoryError(phase, engine_bytes, trainer, _knob_for(phase), first_line[:300])


class _NVML:
    """Device-level used memory through NVML, or the reason it is unavailable."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._pynvml: Any = None
        self._handles: dict[int, Any] = {}
        try:
            import pynvml

            pynvml.nvmlInit()
            self._pynvml = pynvml
        except ImportError:
            self.reason = "nvidia-ml-py is not installed"
        except Exception as e:  # pynvml.NVMLError_LibraryNotFound / DriverNotLoaded on machines without a GPU
            self.reason = f"{type(e).__name__}: {e}"

    def _handle(self, device_index: int) -> Any:
        if device_index not in self._handles:
            nv = self._pynvml
            handle = None
            if torch.cuda.is_available():
                # CUDA and NVML number devices differently under CUDA_VISIBLE_DEVICES; the UUID is common.
                uuid = str(torch.cuda.get_device_properties(device_index).uuid)
                with contextlib.suppress(Exception):
                    handle = nv.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
            if handle is None:
                handle = nv.nvmlDeviceGetHandleByIndex(device_index)
            self._handles[device_index] = handle
        return self._handles[device_index]

    def used(self, device_index: int) -> tuple[int, int] | None:
        """(used, total) bytes on the device, or None (see `reason`)."""
        if self._pynvml is None:
            return None
        try:
            info = self._pynvml.nvmlDeviceGetMemoryInfo(self._handle(device_index))
        except Exception as e:
            self.reason = f"{type(e).__name__}: {e}"
            return None
        return int(info.used), int(info.total)


_nvml: _NVML | None = None


def nvml() -> _NVML:
    global _nvml
    if _nvml is None:
        _nvml = _NVML()
    return _nvml


def process_rss() -> int | None:
    """Resident set size of this process in bytes (Linux /proc), None where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def snapshot(phase: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """Memory figures now: torch allocated/reserved/peak (CUDA), NVML device used, process RSS."""
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    snap: dict[str, Any] = {
        "phase": phase,
        "device": str(dev),
        "torch_allocated": None,
        "torch_reserved": None,
        "torch_peak_allocated": None,
        "nvml_used": None,
        "nvml_total": None,
        "nvml": None,
        "rss": process_rss(),
    }
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        snap["torch_allocated"] = torch.cuda.memory_allocated(index)
        snap["torch_reserved"] = torch.cuda.memory_reserved(index)
        snap["torch_peak_allocated"] = torch.cuda.max_memory_allocated(index)
        used = nvml().used(index)
        if used is not None:
            snap["nvml_used"], snap["nvml_total"] = used
            snap["nvml"] = "ok"
        else:
            snap["nvml"] = f"unavailable ({nvml().reason})"
    else:
        snap["nvml"] = f"unavailable (device is {dev.type}, not an NVIDIA GPU)"
    return snap


@dataclass
class MoveReport:
    """What an offloader moved or released in one direction."""

    tensors: int = 0
    bytes: int = 0
    released_bytes: int = 0
    seconds: float = 0.0
    note: str = ""


class Offloader(Protocol):
    """Moves the trainer's resident state off the device for rollout and back for training."""

    def offload(self) -> MoveReport: ...

    def reload(self) -> MoveReport: ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Slot:
    tensor: torch.Tensor  # the live tensor object the optimizer / parameter holds
    device: torch.device
    host: torch.Tensor | None = None


class HostOffloader:
    """Optimizer state (and grads) ↔ pinned host memory, asynchronous copies, tensor identity kept.

    `grads`: "offload" (copy to host and back), "release" (set `p.grad = None` before rollout; use
    when the step zeroes grads anyway) or "keep" (leave them on the device).
    Host buffers are allocated once (pinned where CUDA exists) and reused every step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer | None,
        *,
        params: Iterable[torch.Tensor] = (),
        grads: str = "offload",
        device: torch.device | str | None = None,
    ):
        if grads not in ("offload", "release", "keep"):
            raise ValueError(f"grads must be 'offload', 'release' or 'keep', got {grads!r}")
        self.optimizer = optimizer
        self.params = list(params)
        if optimizer is not None and not self.params:
            self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grads = grads
        # Only tensors on this device move (AdamW's CPU step counters stay where they are).
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._slots: dict[int, _Slot] = {}
        self._live: list[_Slot] = []
        self._offloaded = False
        self._pin = torch.cuda.is_available()

    def _state_tensors(self) -> Iterator[torch.Tensor]:
        if self.optimizer is None:
            return
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.numel() > 0:
                    yield value

    def _tensors(self) -> list[torch.Tensor]:
        out = list(self._state_tensors())
        if self.grads == "offload":
            out += [p.grad for p in self.params if p.grad is not None]
        return [t for t in out if t.device.type == self.device.type]

    @property
    def offloaded(self) -> bool:
        return self._offloaded

    @torch.no_grad()
    def offload(self) -> MoveReport:
        if self._offloaded:
            raise RuntimeError("HostOffloader.offload called twice without reload; the state is already on the host")
        t0 = time.perf_counter()
        report = MoveReport()
        devices: set[torch.device] = set()
        moved: list[_Slot] = []
        for t in self._tensors():
            slot = self._slots.get(id(t))
            if slot is None or slot.tensor is not t:
                slot = _Slot(tensor=t, device=t.device)
                self._slots[id(t)] = slot
            slot.device = t.device
            if slot.host is None or slot.host.shape != t.shape or slot.host.dtype != t.dtype:
                slot.host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=self._pin)
            slot.host.copy_(t, non_blocking=self._pin)
            devices.add(t.device)
            moved.append(slot)
            report.tensors += 1
            report.bytes += t.numel() * t.element_size()
        for d in devices:
            _sync(d)  # the asynchronous copies must land before the device storage goes
        for slot in moved:
            report.released_bytes += slot.tensor.numel() * slot.tensor.element_size()
            slot.tensor.data = torch.empty(0, dtype=slot.tensor.dtype, device=slot.device)
        if self.grads == "release":
            for p in self.params:
                if p.grad is not None:
                    report.released_bytes += p.grad.numel() * p.grad.element_size()
                    p.grad = None
        self._live = moved
        self._offloaded = True
        report.seconds = time.perf_counter() - t0
        report.note = f"{'pinned' if self._pin else 'pageable'} host copies; grads {self.grads}"
        return report

    @torch.no_grad()
    def reload(self) -> MoveReport:
        if not self._offloaded:
            raise RuntimeError("HostOffloader.reload called without a preceding offload")
        t0 = time.perf_counter()
        report = MoveReport()
        devices: set[torch.device] = set()
        for slot in self._live:
            assert slot.host is not None
            dev_copy = torch.empty(slot.host.shape, dtype=slot.host.dtype, device=slot.device)
            dev_copy.copy_(slot.host, non_blocking=self._pin)
            slot.tensor.data = dev_copy
            devices.add(slot.device)
            report.tensors += 1
            report.bytes += dev_copy.numel() * dev_copy.element_size()
        for d in devices:
            _sync(d)
        self._live = []
        self._offloaded = False
        report.seconds = time.perf_counter() - t0
        return report


class RegionOffloader:
    """Pause / resume a tagged VMM allocator region (e.g. the one holding the optimizer state)."""

    def __init__(self, vmm: Any, tag: str, *, backup: bool = True):
        self.vmm = vmm
        self.tag = tag
        self.backup = backup

    def offload(self) -> MoveReport:
        t0 = time.perf_counter()
        released = self.vmm.pause(self.tag, backup=self.backup)
        stats = self.vmm.stats(self.tag)
        return MoveReport(
            tensors=stats.allocations,
            bytes=stats.host_backup_bytes if self.backup else 0,
            released_bytes=released,
            seconds=time.perf_counter() - t0,
            note=f"region {self.tag!r} paused ({'backed up' if self.backup else 'contents dropped'})",
        )

    def reload(self) -> MoveReport:
        t0 = time.perf_counter()
        mapped = self.vmm.resume(self.tag)
        return MoveReport(
            tensors=self.vmm.stats(self.tag).allocations,
            bytes=mapped,
            seconds=time.perf_counter() - t0,
            note=f"region {self.tag!r} resumed at the same addresses",
        )


class PhaseOrderError(RuntimeError):
    pass


@dataclass
class DeviceMemoryManager:
    """Owns the rollout ↔ train order on one device and records memory per phase.

    `engine`: a `RolloutEngine` (None: trainer only). `offloader`: a `HostOffloader` or
    `RegionOffloader` (None: trainer state stays resident). `sleep_level`: what `to_train` releases
    (2 = KV cache and weights; the next `to_rollout` writes fresh weights anyway).
    """

    engine: Any = None
    offloader: Offloader | None = None
    sleep_level: int = 2
    device: torch.device | str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    current: str | None = None
    _trainer_offloaded: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 (KV cache) or 2 (KV cache and weights), got {self.sleep_level}")
        if self.device is None:
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(self.device)

    def snapshot(self, phase: str) -> dict[str, Any]:
        snap = snapshot(phase, self.device)
        snap["engine_held_bytes"] = engine_held_bytes(self.engine)
        return snap

    @contextlib.contextmanager
    def phase(self, name: str, timer: Timer = NO_TIMER, **info: Any) -> Iterator[dict[str, Any]]:
        """Time a stage on `timer`, record a snapshot after it, and turn OOM into `PhaseOutOfMemoryError`."""
        record: dict[str, Any] = {"phase": name, **info}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # so the snapshot's peak is this stage's
        bracket = timer.phase("update_weights") if name == "sync" else timer.span(name)
        try:
            with bracket:
                yield record
        except Exception as e:
            if is_oom(e) and not isinstance(e, PhaseOutOfMemoryError):
                raise explain_oom(name, e, engine=self.engine) from e
            raise
        record["memory"] = self.snapshot(name)
        self.history.append(record)

    def to_rollout(
        self, weights: Callable[[], Iterable[tuple[str, torch.Tensor]]] | None = None, timer: Timer = NO_TIMER
    ) -> list[dict]:
        """Trainer state off the device, engine weights in, new weights synced, KV cache in."""
        if self.current == "rollout":
            raise PhaseOrderError("to_rollout called while already in rollout; call to_train first")
        start = len(self.history)
        if self.offloader is not None:
            with self.phase("offload-trainer", timer) as rec:
                rec["move"] = self.offloader.offload()
            self._trainer_offloaded = True
        if self.engine is not None:
            with self.phase("wake-weights", timer):
                self.engine.wake(["weights"])
            if weights is not None:
                with self.phase("sync", timer) as rec:
                    rec["sync"] = self.engine.sync_weights(weights())
            with self.phase("wake-kv_cache", timer):
                self.engine.wake(["kv_cache"])
        self.current = "rollout"
        return self.history[start:]

    def to_train(self, timer: Timer = NO_TIMER) -> list[dict]:
        """Engine memory released (sleep), trainer state back on the device (from the start state too)."""
        if self.current == "train":
            raise PhaseOrderError("to_train called while already in train; call to_rollout first")
        start = len(self.history)
        if self.engine is not None:
            with self.phase("sleep-rollout", timer) as rec:
                rec["sleep"] = self.engine.sleep(self.sleep_level)
        if self.offloader is not None and self._trainer_offloaded:
            with self.phase("reload-trainer", timer) as rec:
                rec["move"] = self.offloader.reload()
            self._trainer_offloaded = False
        self.current = "train"
        return self.history[start:]


class PhaseMemory:
    """Timer hook: resets the CUDA peak when a step phase starts, snapshots memory when it ends."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.snapshots: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, event: str) -> None:
        if name == "step" or name not in PHASES:
            return
        if event == "enter":
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.snapshots[name] = snapshot(name, self.device)
