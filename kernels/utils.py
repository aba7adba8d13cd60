"""Shared pieces of the kernels package, used by every op.

* `output_buffer`: every kernel wrapper allocates the tensors a kernel writes through it, so the
  test suite can fill them with NaN first (`poisoned_outputs`) and catch any element a kernel forgets.
* `row_logsumexp_entropy`: the Triton row pass of the logits ops (lse, the target's log-prob and the
  entropy of one row, streamed once in blocks).
* `unit_stride`: the layout the Triton kernels need (unit stride along the last dimension; rows may
  be padded); `LOGP_FLOOR`: the floor on log p that keeps p·log p = 0 where p underflows.
* `TORCH_CHUNK_BYTES` / `torch_chunk_bytes`: the bound on the float32 chunks of the torch paths,
  read at call time (tests lower it to force many chunks).
* `LossOutput`: the result of the loss ops.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

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


# Bound on the float32 [rows, V] chunk of the torch paths (their extra memory is at most 2 chunks besides
# d logits). On CPU 8 MiB was fastest of 2-128 MiB (2 cores, N·V = 512·32000); on CUDA (impl="torch")
# larger chunks amortise the per-chunk kernel launches.
TORCH_CHUNK_BYTES = 8 << 20
TORCH_CHUNK_BYTES_CUDA = 256 << 20
# float32 exp(x) is 0 for x < −104, so flooring log p at −1e4 changes no p·log p but avoids 0·(−inf).
LOGP_FLOOR = -1e4


def torch_chunk_bytes(device: torch.device) -> int:
    """The chunk bound of the torch paths on `device` (the module constants, read at call time)."""
    return TORCH_CHUNK_BYTES_CUDA if device.type == "cuda" else TORCH_CHUNK_BYTES


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """`x` [rows, k] itself when its last dimension has unit stride (any row stride), else a contiguous copy."""
    return x if x.stride(1) == 1 else x.contiguous()


@triton.jit
def row_logsumexp_entropy(row_ptr, target, V, inv_t, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """(lse, logp of `target`, entropy) of softmax(row * inv_t), streaming the row once.

    A NaN or +inf logit makes lse and logp non-finite; a target outside [0, V) gives logp = NaN
    (never an out-of-bounds read). Entropy: a = Σ e^{z−m}(z − m) kept relative to the running max m
    and rescaled when m grows, H = log s − a / s.
    """
    offs = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    m = float("-inf")  # running max of z
    s = 0.0  # Σ exp(z − m)
    a = 0.0  # Σ exp(z − m) · (z − m)
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t  # [BLOCK_V]
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: any finite reference works
        alpha = tl.exp(m - m_ref)
        e = tl.exp(z - m_ref)  # [BLOCK_V]
        if WITH_ENTROPY:
            zc = tl.where(z == float("-inf"), 0.0, z - m_ref)  # p·log p → 0 where p = 0
            shift = tl.where(m == float("-inf"), 0.0, m - m_ref)  # s = 0 there; avoids −inf · 0
            a = alpha * (a + shift * s) + tl.sum(e * zc, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    lse = m_fin + log_s
    valid = (target >= 0) & (target < V)
    z_t = tl.load(row_ptr + target, mask=valid, other=float("nan")).to(tl.float32) * inv_t  # out of range → NaN
    entropy = 0.0
    if WITH_ENTROPY:
        entropy = log_s - a / s
    return lse, z_t - lse, entropy


@dataclass
class LossOutput:
    """Result of a Flow-GRPO loss: a differentiable scalar and detached float metrics."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
