"""Bucketed weight transfer: named tensors packed into a few flat buffers, read back as views.

A weight sync moves the trainer's parameters into the rollout engine. One message (or one copy
kernel, or one IPC handle) per tensor costs a fixed overhead hundreds of times per sync, so the
tensors are packed into buckets: one flat uint8 buffer of about `bucket_bytes` per bucket plus
(name, dtype, shape, offset) metadata, each tensor converted to the engine's dtype on the way in
and starting at a 256-byte aligned offset. The consumer reads `(name, view)` pairs that alias the
buffer, so loading copies once, from the bucket into the engine's parameter.

Buckets are produced lazily, and each tensor is copied into its bucket as soon as it is drawn:
`pack_buckets` never holds a reference to a drawn tensor beyond drawing the next one, so its input
can be a stream of short-lived tensors (the FSDP groups of a sharded trainer, each freed when it
reshards). Bucket k+1 is packed only when the consumer has read bucket k, and a bucket's buffer is
freed once the consumer drops its views, so the staging memory in flight is about one bucket (plus
whatever the loader keeps while it assembles a fused layer) and the producer's one tensor. A
bucket's buffer is allocated at `bucket_bytes`, or at what `total_bytes` says is left when that is
less, and trimmed to its contents when it is handed over.

In-process (our vLLM engine runs in this process) the views are handed over directly. An
out-of-process engine would ship `Bucket.metadata()` with a CUDA IPC handle of `Bucket.buffer`
(`torch.multiprocessing.reductions.reduce_tensor`) and rebuild the same views on its side.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

ALIGN = 256


@dataclass(frozen=True)
class BucketEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class Bucket:
    """One flat buffer and the tensors packed into it."""

    buffer: torch.Tensor
    entries: list[BucketEntry] = field(default_factory=list)

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        for e in self.entries:
            yield e.name, self.buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)

    def metadata(self) -> list[dict]:
        return [
            {"name": e.name, "dtype": str(e.dtype).removeprefix("torch."), "shape": list(e.shape), "offset": e.offset}
            for e in self.entries
        ]


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _target_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def plan_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int, dtype: torch.dtype | None = None
) -> list[list[tuple[str, torch.Tensor, int]]]:
    """Group tensors into buckets of at most `bucket_bytes` (a larger tensor gets a bucket of its own).

    Returns, per bucket, (name, tensor, offset) triples; offsets are 256-byte aligned.
    """
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    plans: list[list[tuple[str, torch.Tensor, int]]] = []
    current: list[tuple[str, torch.Tensor, int]] = []
    used = 0
    for name, t in named_tensors:
        nbytes = t.numel() * _target_dtype(t, dtype).itemsize
        if current and used + nbytes > bucket_bytes:
            plans.append(current)
            current, used = [], 0
        current.append((name, t, used))
        used = _aligned(used + nbytes)
    if current:
        plans.append(current)
    return plans


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    bucket_bytes: int,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
    total_bytes: int | None = None,
) -> Iterator[Bucket]:
    """Yield buckets packed on `device`, floating tensors converted to `dtype` (None: kept as they are),
    the same buckets and offsets as `plan_buckets`; each tensor is copied in as it is drawn (module doc).
    `total_bytes`: the (aligned) bytes of all tensors still to come, if known, to size the last buffers."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket_bytes must be >= {ALIGN}, got {bucket_bytes}")
    device = torch.device(device)
    left = total_bytes
    bucket: Bucket | None = None
    used = 0
    for name, t in named_tensors:
        target = _target_dtype(t, dtype)
        nbytes = t.numel() * target.itemsize
        if bucket is not None and (used + nbytes > bucket_bytes or used + nbytes > bucket.buffer.numel()):
            yield _trimmed(bucket, used)
            bucket = None
        if bucket is None:
            size = bucket_bytes if left is None else min(bucket_bytes, max(left, 0))
            bucket = Bucket(buffer=torch.empty(_aligned(max(size, nbytes)), dtype=torch.uint8, device=device))
            used = 0
        view = bucket.buffer[used : used + nbytes].view(target).view(t.shape)
        with torch.no_grad():
            view.copy_(t.detach())
        bucket.entries.append(BucketEntry(name, target, tuple(t.shape), used, nbytes))
        step = _aligned(used + nbytes) - used
        used += step
        if left is not None:
            left -= step
    if bucket is not None:
        yield _trimmed(bucket, used)


def _trimmed(bucket: Bucket, used: int) -> Bucket:
    """The bucket with its buffer cut to its contents (a view: same storage)."""
    return Bucket(buffer=bucket.buffer[:used], entries=bucket.entries)
