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


# Vectorised global accesses are 16 bytes wide: a row is split into a head (before its first 16-byte
# aligned element), an aligned body of whole 16-byte vectors and a tail (`row_segments`).
VECTOR_BYTES = 16


def vector_elems(dtype: torch.dtype) -> int:
    """Elements of `dtype` per 16-byte vector (8 for bf16/fp16, 4 for fp32): the VEC of `row_segments`."""
    return VECTOR_BYTES // dtype.itemsize


@triton.jit
def row_segments(row_ptr, V, VEC: tl.constexpr):
    """(head, body) of the row of V elements at `row_ptr`: elements [0, head) precede the first
    16-byte-aligned one (head < VEC, computed from the address itself), [head, head + body) are whole
    16-byte vectors (body a multiple of VEC), and the tail [head + body, V) has fewer than VEC elements.

    The body may be read with vector loads from `row_ptr + head` (`tl.multiple_of(..., 16)` holds by
    construction); head and tail together have fewer than 2·VEC elements (`edge_columns`).
    """
    addr = row_ptr.to(tl.int64, bitcast=True)
    head = ((16 - addr % 16) % 16) // (16 // VEC)  # elements of 16 // VEC bytes (addresses are element-aligned)
    head = tl.minimum(head, V)
    body = ((V - head) // VEC) * VEC
    return head, body


@triton.jit
def edge_columns(head, body, V, VEC: tl.constexpr):
    """(columns, mask) [2·VEC] of a row's head and tail (`row_segments`): lanes [0, VEC) hold the head,
    lanes [VEC, 2·VEC) the tail."""
    lane = tl.arange(0, 2 * VEC)
    in_head = lane < VEC
    cols = tl.where(in_head, lane, head + body + lane - VEC)
    mask = tl.where(in_head, lane < head, cols < V)
    return cols, mask


@triton.jit
def row_logsumexp_entropy(
    row_ptr, target, V, inv_t, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr
):
    """(lse, logp of `target`, entropy) of softmax(row * inv_t), streaming the row once.

    A NaN or +inf logit makes lse and logp non-finite; a target outside [0, V) gives logp = NaN
    (never an out-of-bounds read); −inf logits contribute nothing. Entropy: a = Σ e^{z−m}(z − m)
    relative to the running max m, H = log s − a / s.

    Layout (`row_segments`): the head and tail (< 2·VEC elements, scalar loads) are folded in first;
    the aligned body is read in BLOCK_V blocks with 16-byte vector loads, the next block's load issued
    before the current one is reduced (register double buffering). Per block only the maximum is
    reduced across the program (one reduction, not three): s and a are kept per lane, relative to the
    running maximum (rescaled, under a branch uniform across the program, only when the maximum grows),
    and summed once at the end.
    """
    FLOOR: tl.constexpr = -1e4  # LOGP_FLOOR
    head, body = row_segments(row_ptr, V, VEC)
    # head and tail: their maximum and sums start the running statistics (in lane 0 of the body's vectors)
    ecols, emask = edge_columns(head, body, V, VEC)
    z_edge = tl.load(row_ptr + ecols, mask=emask, other=float("-inf")).to(tl.float32) * inv_t  # [2·VEC]
    m = tl.max(z_edge, axis=0)
    m_ref = tl.where(m == float("-inf"), 0.0, m)  # all −inf: any finite reference works
    e_edge = tl.exp(z_edge - m_ref)
    offs = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    s_vec = tl.where(offs == 0, tl.sum(e_edge, axis=0), 0.0)  # [BLOCK_V] per-lane Σ e^{z−m}
    a_vec = tl.zeros((BLOCK_V,), dtype=tl.float32)  # [BLOCK_V] per-lane Σ e^{z−m}(z − m)
    if WITH_ENTROPY:
        # e^{z−m} = 0 exactly where z − m < −104: the floor keeps 0·(z − m) = 0 where z = −inf
        a_vec = tl.where(offs == 0, tl.sum(e_edge * tl.maximum(z_edge - m_ref, FLOOR), axis=0), 0.0)
    body_ptr = tl.multiple_of(row_ptr + head, 16)  # 16-byte aligned by construction (row_segments)
    n_body = tl.multiple_of(body, VEC)
    nxt = tl.load(body_ptr + offs, mask=offs < n_body, other=float("-inf"))  # [BLOCK_V] first block
    for start in range(0, n_body, BLOCK_V):
        z = nxt.to(tl.float32) * inv_t  # [BLOCK_V]
        cols = start + BLOCK_V + offs
        nxt = tl.load(body_ptr + cols, mask=cols < n_body, other=float("-inf"))  # in flight while this block reduces
        m_new = tl.maximum(m, tl.max(z, axis=0))
        if m_new > m:  # uniform: rescale the per-lane sums to the new maximum (m = −inf: they are 0)
            shift = tl.where(m == float("-inf"), 0.0, m - m_new)
            alpha = tl.exp(shift)
            if WITH_ENTROPY:
                a_vec = alpha * (a_vec + shift * s_vec)
            s_vec = alpha * s_vec
            m = m_new
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        zc = z - m_ref
        e = tl.exp(zc)  # [BLOCK_V]
        s_vec += e
        if WITH_ENTROPY:
            a_vec += e * tl.maximum(zc, FLOOR)
    s = tl.sum(s_vec, axis=0)
    m_fin = tl.where(m == float("-inf"), 0.0, m)
    log_s = tl.log(s)
    lse = m_fin + log_s
    valid = (target >= 0) & (target < V)
    z_t = tl.load(row_ptr + target, mask=valid, other=float("nan")).to(tl.float32) * inv_t  # out of range → NaN
    entropy = 0.0
    if WITH_ENTROPY:
        entropy = log_s - tl.sum(a_vec, axis=0) / s
    return lse, z_t - lse, entropy


@dataclass
class LossOutput:
    """Result of a Flow-GRPO loss: a differentiable scalar and detached float metrics."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
