"""Fused token log-probs (and entropy) of `softmax(logits / T)`, forward and backward.

Forward (one program per row, `kernels.utils.row_logsumexp_entropy`; the row is read once, in
BLOCK_V chunks, never materialised):

    z_v = logits_v / T                    m = running max of z       s = Σ_v exp(z_v − m)
    a   = Σ_v exp(z_v − m) · (z_v − m)    (kept relative to m for accuracy; rescaled when m grows:
                                            a ← e^{m_old − m_new} (a + (m_old − m_new) s))
    lse = m + log s      logp = z_target − lse      H = −Σ p log p = log s − a / s

The target logit is one scalar load. Outputs are O(N): logp, H and lse (saved for backward).

Memory access (both passes): a row of any length and alignment is split by its address
(`kernels.utils.row_segments`) into a head before its first 16-byte boundary, a body of whole
16-byte vectors and a tail; head and tail (< 2·VEC elements) take scalar loads, the body 16-byte
vector loads (`ld.global.v4`, also when V = 151 665 is not a multiple of 8 and rows start at every
alignment). The forward keeps the next body block's load in flight while it reduces the current
one and reduces only the block maximum across the program; the running sums stay per lane until
the end. Block sizes per V and dtype: `launch_config`.
`-inf` logits (masked vocabulary entries) contribute 0 to s and a; a NaN or +inf logit makes the
row's lse and logp non-finite, and a target outside [0, V) is read as NaN (never out of bounds), so
both are caught from the O(N) outputs (`kernels.validation`) without another pass over the logits.

Backward (shared with `flow_grpo_loss`): given per-row coefficients g (on logp) and h (on H),

    d logits_v = [ g (1[v = target] − p_v) − h p_v (log p_v + H) ] / T,   p_v = exp(z_v − lse)

recomputing p blockwise from the logits and the saved lse, writing d logits once in the logits
dtype — into a fresh buffer, or into the logits buffer itself (`inplace_backward=True`). Rows with
g = h = 0 (masked tokens) skip the read and write zeros.

Without CUDA (or with impl="torch") the same math runs as plain torch over chunks of rows, so the
extra memory is at most two [rows, V] float32 buffers with rows · V · 4 ≤ the chunk bound
`kernels.utils.TORCH_CHUNK_BYTES` (besides d logits), never N·V.

Simplifications: one program per row (no split of a row across programs, so very small N cannot
fill a GPU); logits must have unit stride along V (other layouts are copied first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.utils import (
    LOGP_FLOOR,
    VECTOR_BYTES,
    edge_columns,
    output_buffer,
    row_logsumexp_entropy,
    row_segments,
    torch_chunk_bytes,
    unit_stride,
    vector_elems,
)
from kernels.validation import (
    check_logits,
    check_targets,
    check_temperature,
    is_interpreted,
    raise_for_bad_rows,
    resolve_impl,
)

# Under TRITON_INTERPRET=1 each block step costs a few numpy calls: blocks small enough that V = 1000
# still takes several steps (the multi-block path is what the interpreter tests exercise).
INTERPRETER_BLOCK_V = 256


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    stride_row,
    V,
    inv_t,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 for N·V ≥ 2^31
    target = tl.load(targets_ptr + row)
    lse, logp, entropy = row_logsumexp_entropy(
        logits_ptr + row * stride_row, target, V, inv_t, WITH_ENTROPY=WITH_ENTROPY, BLOCK_V=BLOCK_V, VEC=VEC
    )
    tl.store(lse_ptr + row, lse)
    tl.store(logp_ptr + row, logp)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _dlogits(x, target, cols, lse, g, h, entropy, inv_t, HAS_H: tl.constexpr):
    """d logits (float32) of the logits `x` in columns `cols` of a row (see the module docstring)."""
    logp_v = x.to(tl.float32) * inv_t - lse
    p = tl.exp(logp_v)
    grad = tl.where(cols == target, g, 0.0) - g * p
    if HAS_H:
        grad -= h * p * tl.where(p > 0.0, logp_v + entropy, 0.0)  # dH/dz = −p (log p + H); 0 where p = 0
    return grad * inv_t


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr,
    dlogits_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    g_ptr,
    h_ptr,
    stride_row,
    stride_drow,
    V,
    inv_t,
    HAS_H: tl.constexpr,
    SAME_PHASE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    active = (g != 0.0).to(tl.int32)
    h = 0.0
    entropy = 0.0
    if HAS_H:
        h = tl.load(h_ptr + row)
        entropy = tl.load(entropy_ptr + row)
        active = active | (h != 0.0).to(tl.int32)
    row_ptr = logits_ptr + row * stride_row
    drow_ptr = dlogits_ptr + row * stride_drow
    out_ty = dlogits_ptr.dtype.element_ty
    # in place: each element is read before the same program overwrites it, and never read again
    head, body = row_segments(row_ptr, V, VEC)
    # head and tail (< 2·VEC elements); masked tokens (g = h = 0) read nothing: z = −inf gives p = 0, grad 0
    ecols, emask = edge_columns(head, body, V, VEC)
    x_edge = tl.load(row_ptr + ecols, mask=emask & (ecols < V * active), other=float("-inf"))
    grad_edge = _dlogits(x_edge, target, ecols, lse, g, h, entropy, inv_t, HAS_H)
    tl.store(drow_ptr + ecols, grad_edge.to(out_ty), mask=emask)
    # the aligned body in 16-byte vectors; d logits share the alignment when SAME_PHASE (same row phase)
    body_ptr = tl.multiple_of(row_ptr + head, 16)
    dbody_ptr = drow_ptr + head
    if SAME_PHASE:
        dbody_ptr = tl.multiple_of(dbody_ptr, 16)
    n_body = tl.multiple_of(body, VEC)
    n_read = tl.multiple_of(body * active, VEC)
    offs = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    for start in range(0, n_body, BLOCK_V):
        cols = start + offs
        x = tl.load(body_ptr + cols, mask=cols < n_read, other=float("-inf"))  # [BLOCK_V]
        grad = _dlogits(x, target, head + cols, lse, g, h, entropy, inv_t, HAS_H)
        tl.store(dbody_ptr + cols, grad.to(out_ty), mask=cols < n_body)


def launch_config(v: int, dtype: torch.dtype, interpreted: bool) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of `v` logits of `dtype`.

    On a GPU the row's aligned body streams in blocks of 8 KiB (4096 bf16/fp16 or 2048 fp32 values)
    at 8 warps: 16 bytes (one vector) ×2 per thread and block, the forward keeping the next block's
    load in flight besides, with enough registers left for 3 programs per SM. Rows shorter than that
    take the smallest power of two ≥ v (at least one vector per thread of 4 warps).
    """
    if interpreted:
        return min(triton.next_power_of_2(v), INTERPRETER_BLOCK_V), 1
    cap = 8192 // dtype.itemsize
    block = min(max(triton.next_power_of_2(v), 128 * vector_elems(dtype)), cap)
    num_warps = 8 if block == cap else 4
    return block, num_warps


def token_logprobs_fwd(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Triton forward: float32 (logp [N], entropy [N] or None, lse [N]); rows with bad input give NaN/inf."""
    logits, targets = unit_stride(logits), targets.contiguous()  # the kernel reads targets[row] at unit stride
    n, v = logits.shape
    logp = output_buffer((n,), dtype=torch.float32, device=logits.device)
    lse = output_buffer((n,), dtype=torch.float32, device=logits.device)
    entropy = output_buffer((n,), dtype=torch.float32, device=logits.device) if with_entropy else None
    block_v, num_warps = launch_config(v, logits.dtype, is_interpreted(_token_logprobs_fwd_kernel))
    _token_logprobs_fwd_kernel[(n,)](
        logits,
        targets,
        logp,
        entropy if with_entropy else logp,
        lse,
        logits.stride(0),
        v,
        1.0 / temperature,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=block_v,
        VEC=vector_elems(logits.dtype),
        num_warps=num_warps,
    )
    return logp, entropy, lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    inplace: bool = False,
) -> torch.Tensor:
    """Triton backward: d logits (logits dtype) for per-row coefficients g on logp and h on entropy.

    With `inplace=True` the gradient overwrites `logits` and `logits` is returned.
    """
    logits, targets, lse = unit_stride(logits), targets.contiguous(), lse.contiguous()
    n, v = logits.shape
    dlogits = logits if inplace else output_buffer((n, v), dtype=logits.dtype, device=logits.device)
    g = g.to(torch.float32).contiguous()
    has_h = h is not None
    if has_h:
        h, entropy = h.to(torch.float32).contiguous(), entropy.contiguous()
    block_v, num_warps = launch_config(v, logits.dtype, is_interpreted(_token_logprobs_bwd_kernel))
    _token_logprobs_bwd_kernel[(n,)](
        logits,
        dlogits,
        targets,
        lse,
        entropy if has_h else lse,
        g,
        h if has_h else g,
        logits.stride(0),
        dlogits.stride(0),
        v,
        1.0 / temperature,
        HAS_H=has_h,
        SAME_PHASE=same_phase(logits, dlogits),
        BLOCK_V=block_v,
        VEC=vector_elems(logits.dtype),
        num_warps=num_warps,
    )
    return dlogits


def same_phase(logits: torch.Tensor, dlogits: torch.Tensor) -> bool:
    """Whether every row of `dlogits` starts at the same offset from a 16-byte boundary as the same row
    of `logits` (same element size): then the aligned body of each logits row is aligned in d logits too."""
    item = logits.element_size()
    return (dlogits.data_ptr() - logits.data_ptr()) % VECTOR_BYTES == 0 and (
        (dlogits.stride(0) - logits.stride(0)) * item
    ) % VECTOR_BYTES == 0


def torch_chunk_rows(v: int, device: torch.device) -> int:
    """Rows per chunk of the torch path: a float32 [rows, V] buffer stays within the chunk bound."""
    return max(1, torch_chunk_bytes(device) // (4 * v))


def token_logprobs_fwd_torch(
    logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, with_entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Chunked torch twin of `token_logprobs_fwd` (same outputs, same handling of bad rows)."""
    n, v = logits.shape
    dev = logits.device
    logp = output_buffer((n,), dtype=torch.float32, device=dev)
    lse = output_buffer((n,), dtype=torch.float32, device=dev)
    entropy = output_buffer((n,), dtype=torch.float32, device=dev) if with_entropy else None
    t = targets.long()
    valid = (t >= 0) & (t < v)
    t_safe = torch.where(valid, t, 0).unsqueeze(1)
    copy = logits.dtype != torch.float32 or temperature != 1.0 or with_entropy
    rows = torch_chunk_rows(v, logits.device)
    for i in range(0, n, rows):
        sl = slice(i, min(i + rows, n))
        z = logits[sl].to(torch.float32, copy=True) if copy else logits[sl]  # [rows, V]
        if temperature != 1.0:
            z.div_(temperature)
        lse_c = torch.logsumexp(z, dim=1)  # NaN for a NaN logit, inf for +inf
        lse[sl] = lse_c
        logp[sl] = torch.where(valid[sl], z.gather(1, t_safe[sl]).squeeze(1) - lse_c, float("nan"))
        if with_entropy:
            z.sub_(lse_c.unsqueeze(1))  # log p
            p = torch.exp(z)  # [rows, V]
            # log p < −1e4 only where p is 0 in float32: the floor keeps p·log p = 0 there (not 0·−inf)
            entropy[sl] = p.mul_(z.clamp_min_(LOGP_FLOOR)).sum(dim=1).neg_()
            del p
        del z  # before the next chunk is allocated: at most two chunks live
    return logp, entropy, lse


def token_logprobs_bwd_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor | None,
    *,
    temperature: float = 1.0,
    inplace: bool = False,
    col_offset: int = 0,
) -> torch.Tensor:
    """Chunked torch twin of `token_logprobs_bwd`.

    col_offset: `logits` are the vocabulary columns [col_offset, col_offset + V) of wider logits
    whose `lse` and `entropy` are given (the LM-head variant works in vocabulary blocks); a target
    outside these columns contributes no one-hot term.
    """
    n, v = logits.shape
    dlogits = logits if inplace else output_buffer((n, v), dtype=logits.dtype, device=logits.device)
    inv_t = 1.0 / temperature  # one rounding of 1/T, as in the kernel: for V = 1 the gradient is exactly 0
    g = g.to(torch.float32).unsqueeze(1)
    g_t = g * inv_t
    if h is not None:
        h = h.to(torch.float32).unsqueeze(1)
        entropy = entropy.unsqueeze(1)
    t = targets.long().unsqueeze(1) - col_offset
    hit = (t >= 0) & (t < v)
    t = t.clamp(0, v - 1)
    g_hit = torch.where(hit, g_t, 0.0)
    direct = inplace and logits.dtype == torch.float32  # compute straight in the logits buffer
    rows = torch_chunk_rows(v, logits.device)
    for i in range(0, n, rows):
        sl = slice(i, min(i + rows, n))
        z = logits[sl] if direct else logits[sl].to(torch.float32, copy=True)  # [rows, V]
        if temperature != 1.0:
            z.div_(temperature)
        z.sub_(lse[sl].unsqueeze(1))  # log p
        p = None
        if h is None:
            z.exp_().mul_(-g_t[sl])  # −g p / T
        else:
            p = torch.exp(z)  # [rows, V]
            # −p (g + h (log p + H)) / T; the floor as in the forward (p = 0 there)
            z.clamp_min_(LOGP_FLOOR).add_(entropy[sl]).mul_(h[sl]).add_(g[sl]).mul_(p).mul_(-inv_t)
        z.scatter_add_(1, t[sl], g_hit[sl])  # + g onehot / T
        if not direct:
            dlogits[sl] = z
        del z, p  # before the next chunk is allocated: at most two chunks live
    return dlogits


class TokenLogprobsFunction(torch.autograd.Function):
    """logp (and entropy) of `targets`, differentiable with respect to `logits`."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, with_entropy, impl, inplace_backward):
        fwd = token_logprobs_fwd if impl == "triton" else token_logprobs_fwd_torch
        logp, entropy, lse = fwd(logits, targets, temperature=temperature, with_entropy=with_entropy)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.temperature, ctx.impl, ctx.inplace = temperature, impl, inplace_backward
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        logits, targets, lse, entropy = ctx.saved_tensors
        bwd = token_logprobs_bwd if ctx.impl == "triton" else token_logprobs_bwd_torch
        dlogits = bwd(
            logits,
            targets,
            lse,
            entropy,
            grad_logp,
            grad_entropy,
            temperature=ctx.temperature,
            inplace=ctx.inplace,
        )
        return dlogits, None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 [N] `log_softmax(logits / T)[targets]` (and the entropy [N] when asked), fused.

    logits: [N, V] float32 / bfloat16 / float16; targets: [N] int token ids in [0, V).
    impl: "auto" (Triton on CUDA, chunked torch elsewhere), "triton" (CUDA, or CPU under
    TRITON_INTERPRET=1) or "torch". inplace_backward=True writes d logits into the `logits` buffer
    (saves N·V memory): `logits` is overwritten by the backward and must not be used afterwards.
    Raises ValueError naming the rows for NaN/+inf logits, a -inf target logit or targets out of range
    (costs one device→host sync).
    """
    n, _ = check_logits(logits)
    check_targets(targets, n, logits.device)
    temperature = check_temperature(temperature)
    impl = resolve_impl(impl, logits.device, _token_logprobs_fwd_kernel)
    out = TokenLogprobsFunction.apply(logits, targets, temperature, bool(return_entropy), impl, inplace_backward)
    logp = out[0] if return_entropy else out
    if not bool(torch.isfinite(logp).all()):
        raise_for_bad_rows(logits.detach(), targets, logp.detach())
    return out
