"""Shared pieces of the kernels package: output allocation (poisonable in tests) and the loss result.

Every kernel wrapper allocates the tensors a kernel writes through `output_buffer`, so the test
suite can fill them with NaN first (`poisoned_outputs`) and catch any element a kernel forgets.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

_POISON: float | None = None


def output_buffer(
    shape: tuple[int, ...] | torch.Size, *, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """`torch.empty` for tensors a kernel fills; NaN-filled (or -1 for integers) under `poisoned_outputs`."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON is not None:
        out.fill_(_POISON if out.is_floating_point() else -1)
    return out


@contextlib.contextmanager
def poisoned_outputs(value: float = float("nan")) -> Iterator[None]:
    """Within this block, `output_buffer` returns tensors pre-filled with `value` instead of garbage."""
    global _POISON
    prev, _POISON = _POISON, value
    try:
        yield
    finally:
        _POISON = prev


@dataclass
class LossOutput:
    """Result of a Flow-GRPO loss: a differentiable scalar and detached float metrics."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
