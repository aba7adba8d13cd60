"""The one tolerance table for comparing kernels and references against a float64 gold.

Used by the test suite and by the correctness gate of every benchmark, so a benchmark never
reports a speed for a result the tests would reject. Entries are (atol, rtol) for values of
order one (log-probs, losses, gradients scaled by the aggregation); a caller comparing values of
another scale passes `scale`, and a looser comparison names its reason where it is made.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float


_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-10, rtol=1e-9),
    # float32 inputs, float32 accumulation over V ≤ 50257: observed |err| ≤ 3e-6 on log-probs.
    torch.float32: Tolerance(atol=2e-5, rtol=2e-5),
    # bf16 logits are read exactly and accumulated in float32, so the error against a gold built from
    # the same bf16 values is float32 rounding; bf16 *outputs* (gradients) carry 2^-8 relative rounding.
    torch.bfloat16: Tolerance(atol=1e-2, rtol=1.6e-2),
    torch.float16: Tolerance(atol=2e-3, rtol=2e-3),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """(atol, rtol) for results computed from inputs of `dtype`."""
    try:
        return _TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no tolerance defined for {dtype}; add one to kernels/testing.py") from None


def assert_close(
    actual: torch.Tensor | float,
    expected: torch.Tensor | float,
    *,
    dtype: torch.dtype,
    name: str = "value",
    scale: float = 1.0,
) -> None:
    """Compare `actual` to a (float64) `expected` with the tolerance of the input `dtype`.

    NaN anywhere in `actual` fails, even where `expected` is NaN too: golds here are finite.
    """
    tol = tolerance(dtype)
    a = torch.as_tensor(actual).detach().to(torch.float64).cpu()
    e = torch.as_tensor(expected).detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    if not torch.isfinite(a).all():
        bad = (~torch.isfinite(a)).nonzero().flatten()[:8].tolist()
        raise AssertionError(f"{name}: non-finite values at {bad} (a kernel left an output unwritten or overflowed)")
    torch.testing.assert_close(a, e, atol=tol.atol * scale, rtol=tol.rtol, msg=lambda m: f"{name} ({dtype}): {m}")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64; for reports and benchmark gates."""
    return (
        (actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max().item()
        if actual.numel()
        else 0.0
    )


class AllocationTracker(TorchDispatchMode):
    """Peak live bytes of the tensor storages that aten ops create inside the block (any device).

    A storage counts from the op that returns it (and does not take it as an input: views and in-place
    results are not new memory) until it is freed. Scratch memory an op allocates and frees inside
    itself is invisible, so this is a lower bound on the allocator's peak; on CUDA prefer
    `torch.cuda.max_memory_allocated`. Used by the torch-path memory tests and by bench on CPU.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.largest_bytes = 0
        self._tracked: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            id(t.untyped_storage())
            for t in pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.layout == torch.strided
        }
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                storage = t.untyped_storage()
                key = id(storage)
                if key not in inputs and key not in self._tracked:
                    self._track(storage, key)
        return out

    def _track(self, storage: torch.UntypedStorage, key: int) -> None:
        nbytes = storage.nbytes()
        self._tracked.add(key)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.largest_bytes = max(self.largest_bytes, nbytes)
        weakref.finalize(storage, self._release, key, nbytes)

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live_bytes -= nbytes
