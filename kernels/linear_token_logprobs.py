"""Token log-probs (and entropy) through the LM head, without materialising the [N, V] logits.

    z = (hidden @ weight.T + bias) / T          hidden [N, d], weight [V, d] (the LM head), bias [V]
    logp = z_target − lse(z)                    H = −Σ_v p_v log p_v,   p = softmax(z)

Same result as `token_logprobs(hidden @ weight.T + bias, ...)` with the product accumulated in
float32 (bf16/fp16 products are exact in float32; the reference instead rounds the logits to the
input dtype, see `kernels.reference.linear_token_logprobs`).

Triton forward (`_linear_token_logprobs_fwd_kernel`): the grid is (token blocks × vocabulary
splits). A program owns BLOCK_N rows and a contiguous range of BLOCK_V-wide vocabulary blocks;
for each block it computes the logits tile with `tl.dot` over d in BLOCK_D chunks (float32
accumulator, on chip), and folds it into per-row online softmax statistics

    m = max z,   s = Σ e^{z−m},   a = Σ e^{z−m}(z − m)        (`_merge_softmax_stats`)

plus the target logit (where the target falls in the tile). Only these four floats per row and
split are written. A second small kernel merges the splits (`combine_splits`):
lse = m + log s, H = log s − a/s, logp = z_target − lse. The splits exist to fill the GPU when
N / BLOCK_N is below the number of SMs (a 2k-token micro-batch is 16 token blocks); they cost
4·N floats per split. Their number (`choose_splits`) makes whole waves of programs at the occupancy
the compiled kernel gets (`ctas_per_sm` of its registers and shared memory: one program per SM for
bf16 on sm_90, 255 registers), read from the kernel after its first launch on the device.

Triton backward (`_linear_token_logprobs_bwd_kernel`): given per-row coefficients g (on logp) and
h (on H), with p recomputed from the saved lse,

    dZ = [g (onehot − p) − h p (log p + H)] / T          (the d logits of `token_logprobs_bwd`)
    d hidden = dZ @ weight,   d weight = dZ.T @ hidden,   d bias = Σ_rows dZ

The grid is (token blocks × vocabulary blocks), grouped so that programs running together share
weight and hidden tiles in L2. Each program recomputes its logits tile once, forms dZ in
registers, then loops over d: one `tl.dot` for the d hidden tile and one for the d weight tile,
each added with float32 atomics into float32 accumulators ([N, d] and [V, d]; cast to the input
dtype at the end). This is Cut Cross-Entropy's scheme (which uses locks instead of atomics). It
keeps the FLOP floor of 4 matmuls of N·V·d for forward + backward (logits, recomputed logits,
d hidden, d weight), at the price of N·V·d·(1/BLOCK_V + 1/BLOCK_N) = N·V·d/64 float32 atomic adds
(one per 128 MACs of the two gradient products; for 16k tokens on the 7B head 1.4e11 adds, 0.56 TB
of L2 read-modify-write, which may well cost as much as the matmuls: not measured, there was no
GPU) and a summation order that is not deterministic run to run (float32 rounding only). The
alternatives: no [BLOCK_N, d] accumulator fits on chip for d in the thousands, so a race-free
d hidden needs the same N·d·V/BLOCK_V read-modify-writes without atomics, or d-chunk-wise
recomputation of the logits (d/BLOCK_D more matmuls); a second kernel over vocabulary blocks for
d weight recomputes the logits once more (5 matmuls). Writing dZ for chunks of rows and using
cuBLAS for the two products (Liger's approach) trades [N_chunk, V] memory for no atomics. dZ
enters the tensor cores in the input dtype (bf16: 2^-9 relative rounding, as the d logits of the
materialised path are rounded); fp32 inputs use IEEE fp32 dots (no TF32), i.e. CUDA-core speed.

Skipping: tiles whose rows all have g = h = 0 (masked tokens) skip everything, and tiles whose
dZ is exactly 0 skip the d hidden / d weight dots. Both are exact. The CCE-style skip of tiles
whose |dZ| is below the dtype's resolution (most of the vocabulary for a trained model, and most
of CCE's backward speed) is left out: it is not exact where it matters here — the d weight rows
of rare tokens consist only of such small entries, and AdamW normalises each element, so zeroing
them changes the update of exactly those rows. The tests would not catch it (with random logits
no 64×256 tile falls below 1e-5), so it is not offered as an option either.

Torch path (CPU, or impl="torch"): the same blockwise algorithm with torch ops, over blocks of
rows × vocabulary columns (`torch_blocks`): a float32 [rows, cols] logits block and the float32
[cols, d] weight block each within the torch paths' chunk bound (`kernels.utils.TORCH_CHUNK_BYTES`, 8 MiB on
CPU), with up to `TORCH_MAX_ROWS` rows so that the weight is read once per 4096 tokens. Forward:
per block the product in float32 (hidden and weight blocks upcast: exact for bf16/fp16, as on the
tensor cores), then the block's (max, Σe, Σe·z) merged into the running ones
(`merge_softmax_stats_torch`, the twin of `_merge_softmax_stats`). Backward: per block the logits
are recomputed, turned into dZ in place by `token_logprobs_bwd_torch` (the d logits of
`token_logprobs`, here for a block of columns), then d hidden += dZ @ W_blk, d weight_blk =
dZ.T @ h (written once when all rows fit one row block, else accumulated in float32), d bias_blk =
Σ dZ. dZ stays float32 here. Peak extra memory: a few blocks + a float32 [rows, d] d hidden
accumulator + the outputs, independent of N·V. It runs under an autograd Function with a manual
backward (no graph over the blocks), with autocast disabled inside (the products stay float32).

Simplifications: hidden, weight and bias share one dtype (float32, bfloat16 or float16); on the
Triton path hidden and weight need a unit stride along d (others are copied).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.linear_chunked import LinearChunkedLogprobsFunction, resolve_algorithm
from kernels.token_logprobs import token_logprobs_bwd_torch
from kernels.utils import LOGP_FLOOR, output_buffer, torch_chunk_bytes, unit_stride
from kernels.validation import (
    check_linear,
    check_targets,
    check_temperature,
    is_interpreted,
    raise_for_bad_linear_rows,
    resolve_impl,
)

# Rows of the float32 [4, splits, N] partial statistics of the forward tile pass.
PART_M, PART_S, PART_A, PART_ZT = range(4)
# Torch path: rows per block that share one read of the weight, and the narrowest vocabulary block.
TORCH_MAX_ROWS = 4096
TORCH_MIN_COLS = 128


@dataclass(frozen=True)
class LinearLaunch:
    """Tile sizes and launch parameters of the linear kernels for one shape and dtype."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    splits: int  # vocabulary splits of the forward grid
    blocks_per_split: int  # BLOCK_V-wide vocabulary blocks per split
    group_n: int  # backward: token blocks per group of the grouped tile order


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many programs of a kernel run at once (sm_90: H100 / H200)."""

    regs: int = 65536
    reg_unit: int = 256  # registers are allocated per warp, in units of 256
    smem: int = 228 * 1024
    smem_reserved: int = 1024  # per CTA, by the driver
    max_warps: int = 64
    max_ctas: int = 32


HOPPER = SMLimits()
# (registers per thread, shared memory bytes) of `_linear_token_logprobs_fwd_kernel` at `linear_launch`'s
# GPU tiles, by input element size, as the compile report reads them for sm_90 (Triton 3.9, ptxas 13.4):
# the occupancy estimate until a launch on the device reports the compiled kernel's own (`_FWD_OCCUPANCY`).
FWD_RESOURCES_ESTIMATE = {2: (255, 96 * 1024), 4: (160, 24 * 1024)}
# (dtype, device index) → programs per SM of the compiled forward kernel, recorded after its first launch
_FWD_OCCUPANCY: dict[tuple[torch.dtype, int], int] = {}
MAX_SPLITS = 64


def ctas_per_sm(regs_per_thread: int, smem_bytes: int, num_warps: int, sm: SMLimits = HOPPER) -> int:
    """Programs of `num_warps` warps that fit one SM at once, by registers, shared memory and warps."""
    regs_per_warp = triton.cdiv(max(regs_per_thread, 1) * 32, sm.reg_unit) * sm.reg_unit
    by_regs = (sm.regs // regs_per_warp) // num_warps
    by_smem = sm.smem // (smem_bytes + sm.smem_reserved)
    return max(1, min(by_regs, by_smem, sm.max_warps // num_warps, sm.max_ctas))


def choose_splits(n_blocks: int, v_blocks: int, slots: int, max_splits: int = MAX_SPLITS) -> tuple[int, int]:
    """(splits, blocks_per_split) of the forward grid for `slots` programs running at once.

    Model: programs of blocks_per_split vocabulary blocks each, run in waves of `slots`; SM use =
    n_blocks·v_blocks / (waves · slots · blocks_per_split). The fewest splits within 1 % of the best
    SM use is taken (each split costs 4·N floats of partial statistics and a step of the merge).
    """
    options = []
    for want in range(1, min(v_blocks, max_splits) + 1):
        per_split = triton.cdiv(v_blocks, want)
        splits = triton.cdiv(v_blocks, per_split)
        options.append((sm_use(n_blocks, splits, per_split, v_blocks, slots), splits, per_split))
    top = max(use for use, _, _ in options)
    return min((splits, per_split) for use, splits, per_split in options if use >= top - 0.01)


def sm_use(n_blocks: int, splits: int, per_split: int, v_blocks: int, slots: int) -> float:
    """Modeled SM use of a forward grid (see `choose_splits`)."""
    return n_blocks * v_blocks / (triton.cdiv(n_blocks * splits, slots) * slots * per_split)


def linear_launch(
    n: int, v: int, dtype: torch.dtype, device: torch.device, interpreted: bool, *, backward: bool = False
) -> LinearLaunch:
    """Tiles for Hopper (128×128 logits tiles, 64-wide d chunks for bf16/fp16; fp32: 64×128×32 in the
    forward, 64×64×16 in the backward, whose FMA dots spill at larger tiles), or small ones under the
    interpreter (where each block step costs numpy calls, and several token, vocabulary and d blocks —
    and vocabulary splits — are still exercised at test sizes). The forward's vocabulary splits fill
    the SMs at the occupancy the compiled kernel gets (`choose_splits`, `ctas_per_sm`)."""
    if interpreted:
        bn, bv, bd, warps, stages = 64, 256, 32, 1, 1
    elif dtype.itemsize <= 2:
        bn, bv, bd, warps, stages = 128, 128, 64, 8, 3
    elif backward:
        bn, bv, bd, warps, stages = 64, 64, 16, 8, 2
    else:
        bn, bv, bd, warps, stages = 64, 128, 32, 8, 2
    n_blocks, v_blocks = triton.cdiv(n, bn), triton.cdiv(v, bv)
    if interpreted:
        per_split = triton.cdiv(v_blocks, min(v_blocks, 3))
        splits = triton.cdiv(v_blocks, per_split)
    else:
        slots = fwd_ctas_per_sm(dtype, device, warps) * torch.cuda.get_device_properties(device).multi_processor_count
        splits, per_split = choose_splits(n_blocks, v_blocks, slots)
    return LinearLaunch(bn, bv, bd, warps, stages, splits, per_split, 8)


def fwd_ctas_per_sm(dtype: torch.dtype, device: torch.device, num_warps: int) -> int:
    """Programs per SM of the forward kernel: the compiled kernel's, once launched on this device, else
    the estimate from the compile report's figures (`FWD_RESOURCES_ESTIMATE`)."""
    known = _FWD_OCCUPANCY.get((dtype, _device_index(device)))
    if known is not None:
        return known
    regs, smem = FWD_RESOURCES_ESTIMATE[min(dtype.itemsize, 4)]
    return ctas_per_sm(regs, smem, num_warps)


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else 0


def record_fwd_occupancy(compiled: object, dtype: torch.dtype, device: torch.device, num_warps: int) -> None:
    """Keep the programs per SM of a launched forward kernel (Triton's CompiledKernel: `n_regs`, and
    `metadata.shared`) for the next grid on this device; anything else (a launch that returned no
    compiled kernel) leaves the estimate in place."""
    regs = getattr(compiled, "n_regs", None)
    smem = getattr(getattr(compiled, "metadata", None), "shared", None)
    if isinstance(regs, int) and regs > 0 and isinstance(smem, int):
        _FWD_OCCUPANCY[(dtype, _device_index(device))] = ctas_per_sm(regs, smem, num_warps)


@triton.jit
def _dot_operand(x, UPCAST: tl.constexpr):
    """`x` as a `tl.dot` operand; UPCAST (bf16 under the interpreter only, whose `tl.dot` multiplies the
    raw bf16 bit patterns) widens it to float32, which is exact, like the tensor cores' products."""
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _linear_logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    N,
    V,
    D,
    stride_h,
    stride_w,
    inv_t,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """z = (hidden[rows] @ weight[cols].T + bias[cols]) · inv_t in float32; −inf in columns ≥ V."""
    row_ok = rows < N  # [BLOCK_N]
    col_ok = cols < V  # [BLOCK_V]
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        dd = k + offs_d
        d_ok = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        h = _dot_operand(h, UPCAST)  # [BLOCK_N, BLOCK_D]
        w = _dot_operand(w, UPCAST)  # [BLOCK_V, BLOCK_D]
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_V]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _merge_softmax_stats(m1, s1, a1, m2, s2, a2):
    """Merge (max, Σe^{z−max}, Σe^{z−max}(z−max)) of two disjoint sets of logits (elementwise).

    An empty set is (−inf, 0, 0); the shifts are taken as 0 there so that no −inf·0 appears.
    """
    m = tl.maximum(m1, m2)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    d1 = tl.where(m1 == float("-inf"), 0.0, m1 - m_ref)
    d2 = tl.where(m2 == float("-inf"), 0.0, m2 - m_ref)
    e1 = tl.exp(d1)
    e2 = tl.exp(d2)
    return m, e1 * s1 + e2 * s2, e1 * (a1 + d1 * s1) + e2 * (a2 + d2 * s2)


@triton.jit
def _linear_token_logprobs_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    targets_ptr,
    part_ptr,
    N,
    V,
    D,
    stride_h,
    stride_w,
    inv_t,
    blocks_per_split,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: rows · stride may pass 2^31
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)  # [BLOCK_N]
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + blocks_per_split * BLOCK_V)
    for start in range(v_start, v_end, BLOCK_V):
        cols = (start + tl.arange(0, BLOCK_V)).to(tl.int64)
        z = _linear_logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_h, stride_w, inv_t,
            HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        # the tile's own statistics, merged into the running ones
        m_blk = tl.max(z, axis=1)  # [BLOCK_N]
        m_ref = tl.where(m_blk == float("-inf"), 0.0, m_blk)
        e = tl.exp(z - m_ref[:, None])  # [BLOCK_N, BLOCK_V]
        zc = tl.where(z == float("-inf"), 0.0, z - m_ref[:, None])  # p·log p → 0 where p = 0
        m, s, a = _merge_softmax_stats(m, s, a, m_blk, tl.sum(e, axis=1), tl.sum(e * zc, axis=1))
        z_t += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), axis=1)
    out = part_ptr + split.to(tl.int64) * N + rows
    stride_part = splits.to(tl.int64) * N
    tl.store(out + 0 * stride_part, m, mask=row_ok)  # PART_M
    tl.store(out + 1 * stride_part, s, mask=row_ok)  # PART_S
    tl.store(out + 2 * stride_part, a, mask=row_ok)  # PART_A
    tl.store(out + 3 * stride_part, z_t, mask=row_ok)  # PART_ZT


@triton.jit
def combine_splits(part_ptr, rows, row_ok, target, N, V, SPLITS, BLOCK_N: tl.constexpr):
    """(lse, logp, entropy) of `rows` from the partial statistics of the vocabulary splits.

    A target outside [0, V) gives logp = NaN, as in `token_logprobs` (caught by the value checks).
    """
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    a = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    stride_part = SPLITS * N  # 4·SPLITS·N < 2^31 (int32 products; rows is int64)
    for split in range(0, SPLITS):
        p = part_ptr + rows + split * N
        m2 = tl.load(p + 0 * stride_part, mask=row_ok, other=0.0)
        s2 = tl.load(p + 1 * stride_part, mask=row_ok, other=1.0)  # keeps rows ≥ N finite
        a2 = tl.load(p + 2 * stride_part, mask=row_ok, other=0.0)
        z_t += tl.load(p + 3 * stride_part, mask=row_ok, other=0.0)
        m, s, a = _merge_softmax_stats(m, s, a, m2, s2, a2)
    log_s = tl.log(s)
    lse = tl.where(m == float("-inf"), 0.0, m) + log_s
    valid = (target >= 0) & (target < V)
    return lse, tl.where(valid, z_t - lse, float("nan")), log_s - a / s


@triton.jit
def _linear_token_logprobs_reduce_kernel(
    part_ptr,
    targets_ptr,
    logp_ptr,
    entropy_ptr,
    lse_ptr,
    N,
    V,
    SPLITS,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse, logp, entropy = combine_splits(part_ptr, rows, row_ok, target, N, V, SPLITS, BLOCK_N)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + rows, entropy, mask=row_ok)


@triton.jit
def _linear_token_logprobs_bwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    g_ptr,
    hc_ptr,
    dh_ptr,
    dw_ptr,
    db_ptr,
    N,
    V,
    D,
    stride_h,
    stride_w,
    inv_t,
    HAS_BIAS: tl.constexpr,
    HAS_H: tl.constexpr,
    COMPUTE_DH: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # grouped order: GROUP_N token blocks sweep the vocabulary together (weight tiles reused from L2)
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    v_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * v_blocks
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(n_blocks - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)  # [BLOCK_V]
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    active = g != 0.0
    hc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    entropy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_H:
        hc = tl.load(hc_ptr + rows, mask=row_ok, other=0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        active = active | (hc != 0.0)
    if tl.max(active.to(tl.int32), axis=0) > 0:  # else a tile of masked tokens: zero gradient, exactly
        z = _linear_logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_h, stride_w, inv_t,
            HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        logp_v = z - lse[:, None]
        p = tl.exp(logp_v)  # [BLOCK_N, BLOCK_V]; 0 in columns ≥ V
        dz = tl.where(cols[None, :] == target[:, None], g[:, None], 0.0) - g[:, None] * p
        if HAS_H:
            dz -= hc[:, None] * p * tl.where(p > 0.0, logp_v + entropy[:, None], 0.0)  # dH/dz = −p (log p + H)
        dz = dz * inv_t  # d logits (before the 1/T)
        if tl.max(tl.max(tl.abs(dz), axis=1), axis=0) > 0.0:  # all-zero dZ adds nothing: skip, exactly
            if COMPUTE_DB:
                tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
            dz_in = _dot_operand(dz.to(h_ptr.dtype.element_ty), UPCAST)  # tensor-core operand in the input dtype
            offs_d = tl.arange(0, BLOCK_D)
            for k in range(0, D, BLOCK_D):
                dd = k + offs_d
                d_ok = dd < D
                if COMPUTE_DH:
                    w = tl.load(
                        w_ptr + cols[:, None] * stride_w + dd[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0
                    )  # [BLOCK_V, BLOCK_D]
                    dh = tl.dot(dz_in, _dot_operand(w, UPCAST), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
                    tl.atomic_add(
                        dh_ptr + rows[:, None] * D + dd[None, :],
                        dh,
                        mask=row_ok[:, None] & d_ok[None, :],
                        sem="relaxed",
                    )
                if COMPUTE_DW:
                    h = tl.load(
                        h_ptr + rows[:, None] * stride_h + dd[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
                    )  # [BLOCK_N, BLOCK_D]
                    dw = tl.dot(
                        tl.trans(dz_in), _dot_operand(h, UPCAST), input_precision=DOT_PRECISION
                    )  # [BLOCK_V, BLOCK_D]
                    tl.atomic_add(
                        dw_ptr + cols[:, None] * D + dd[None, :],
                        dw,
                        mask=col_ok[:, None] & d_ok[None, :],
                        sem="relaxed",
                    )


def _dot_args(dtype: torch.dtype, kernel: object) -> dict[str, object]:
    """DOT_PRECISION (fp32 operands: IEEE, no TF32 rounding; others ignore it) and UPCAST (`_dot_operand`)."""
    upcast = dtype == torch.bfloat16 and is_interpreted(kernel)
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 or upcast else "tf32", "UPCAST": upcast}


def linear_token_logprobs_partials(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *, temperature: float
) -> torch.Tensor:
    """Triton tile pass: float32 partial softmax statistics [4, splits, N] (`PART_*`)."""
    hidden, weight, targets = unit_stride(hidden), unit_stride(weight), targets.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    interpreted = is_interpreted(_linear_token_logprobs_fwd_kernel)
    cfg = linear_launch(n, v, hidden.dtype, hidden.device, interpreted)
    part = output_buffer((4, cfg.splits, n), dtype=torch.float32, device=hidden.device)
    compiled = _linear_token_logprobs_fwd_kernel[(triton.cdiv(n, cfg.block_n), cfg.splits)](
        hidden,
        weight,
        bias.contiguous() if bias is not None else hidden,
        targets,
        part,
        n,
        v,
        d,
        hidden.stride(0),
        weight.stride(0),
        1.0 / temperature,
        cfg.blocks_per_split,
        HAS_BIAS=bias is not None,
        **_dot_args(hidden.dtype, _linear_token_logprobs_fwd_kernel),
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    if hidden.is_cuda and not interpreted:
        record_fwd_occupancy(compiled, hidden.dtype, hidden.device, cfg.num_warps)
    return part


REDUCE_BLOCK_N = 128


def linear_token_logprobs_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Triton forward: float32 (logp [N], entropy [N] or None, lse [N]); rows with bad input give NaN/inf."""
    part = linear_token_logprobs_partials(hidden, weight, bias, targets, temperature=temperature)
    n, v = hidden.shape[0], weight.shape[0]
    logp = output_buffer((n,), dtype=torch.float32, device=hidden.device)
    lse = output_buffer((n,), dtype=torch.float32, device=hidden.device)
    entropy = output_buffer((n,), dtype=torch.float32, device=hidden.device) if with_entropy else None
    _linear_token_logprobs_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK_N),)](
        part,
        targets.contiguous(),
        logp,
        entropy if with_entropy else logp,
        lse,
        n,
        v,
        part.shape[1],
        WITH_ENTROPY=with_entropy,
        BLOCK_N=REDUCE_BLOCK_N,
    )
    return logp, entropy, lse


def linear_token_logprobs_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor | None,
    *,
    temperature: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Triton backward: (d hidden, d weight, d bias) in the input dtype (None where not in `needs`)
    for per-row coefficients g on logp and h on H (or None)."""
    hidden, weight, targets = unit_stride(hidden), unit_stride(weight), targets.contiguous()
    lse = lse.contiguous()
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    # float32 accumulators of the atomic adds (zero-initialised by necessity, so not poisonable)
    dh = torch.zeros((n, d), dtype=torch.float32, device=dev) if needs[0] else None
    dw = torch.zeros((v, d), dtype=torch.float32, device=dev) if needs[1] else None
    db = torch.zeros((v,), dtype=torch.float32, device=dev) if needs[2] and bias is not None else None
    g = g.to(torch.float32).contiguous()
    has_h = h is not None
    if has_h:
        h, entropy = h.to(torch.float32).contiguous(), entropy.contiguous()
    cfg = linear_launch(n, v, hidden.dtype, dev, is_interpreted(_linear_token_logprobs_bwd_kernel), backward=True)
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(v, cfg.block_v),)
    _linear_token_logprobs_bwd_kernel[grid](
        hidden,
        weight,
        bias.contiguous() if bias is not None else hidden,
        targets,
        lse,
        entropy if has_h else lse,
        g,
        h if has_h else g,
        dh if dh is not None else g,
        dw if dw is not None else g,
        db if db is not None else g,
        n,
        v,
        d,
        hidden.stride(0),
        weight.stride(0),
        1.0 / temperature,
        HAS_BIAS=bias is not None,
        HAS_H=has_h,
        COMPUTE_DH=dh is not None,
        COMPUTE_DW=dw is not None,
        COMPUTE_DB=db is not None,
        **_dot_args(hidden.dtype, _linear_token_logprobs_bwd_kernel),
        BLOCK_N=cfg.block_n,
        BLOCK_V=cfg.block_v,
        BLOCK_D=cfg.block_d,
        GROUP_N=cfg.group_n,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    dtype = hidden.dtype
    return tuple(None if x is None else x.to(dtype) for x in (dh, dw, db))


def torch_blocks(n: int, v: int, d: int, device: torch.device) -> tuple[int, int]:
    """(rows, cols) of the torch path's blocks: the float32 [rows, cols] logits block and the float32
    [cols, d] weight block each stay within the torch paths' chunk bound (`TORCH_CHUNK_BYTES`), with
    at least `TORCH_MIN_COLS` columns, and as many rows as that allows (up to `TORCH_MAX_ROWS`, the
    rows that read the weight once)."""
    limit = torch_chunk_bytes(device)
    cols = max(TORCH_MIN_COLS, min(limit // (4 * min(n, TORCH_MAX_ROWS)), limit // (4 * d)))
    cols = min(v, cols)
    return min(n, TORCH_MAX_ROWS, max(1, limit // (4 * cols))), cols


def _logits_block(h32: torch.Tensor, w32: torch.Tensor, b32: torch.Tensor | None, inv_t: float) -> torch.Tensor:
    """float32 (h32 @ w32.T + b32) · inv_t [rows, cols], a fresh buffer."""
    if b32 is None:
        z = torch.mm(h32, w32.t())
        return z if inv_t == 1.0 else z.mul_(inv_t)
    return torch.addmm(b32, h32, w32.t(), beta=inv_t, alpha=inv_t)


def merge_softmax_stats_torch(m1, s1, a1, m2, s2, a2):
    """Torch twin of `_merge_softmax_stats` (elementwise on [rows] tensors)."""
    m = torch.maximum(m1, m2)
    m_ref = torch.where(m == float("-inf"), 0.0, m)
    d1 = torch.where(m1 == float("-inf"), 0.0, m1 - m_ref)
    d2 = torch.where(m2 == float("-inf"), 0.0, m2 - m_ref)
    e1, e2 = torch.exp(d1), torch.exp(d2)
    return m, e1 * s1 + e2 * s2, e1 * (a1 + d1 * s1) + e2 * (a2 + d2 * s2)


def linear_token_logprobs_fwd_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Blockwise torch twin of `linear_token_logprobs_fwd` (same outputs, same handling of bad rows)."""
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    logp = output_buffer((n,), dtype=torch.float32, device=dev)
    lse = output_buffer((n,), dtype=torch.float32, device=dev)
    entropy = output_buffer((n,), dtype=torch.float32, device=dev) if with_entropy else None
    inv_t = 1.0 / temperature
    rows, cols = torch_blocks(n, v, d, dev)
    with torch.autocast(dev.type, enabled=False):
        for i in range(0, n, rows):
            sl = slice(i, min(i + rows, n))
            h32 = hidden[sl].to(torch.float32)
            t = targets[sl].long()
            m = torch.full((h32.shape[0],), float("-inf"), device=dev)
            s, a, z_t = torch.zeros_like(m), torch.zeros_like(m), torch.zeros_like(m)
            for j in range(0, v, cols):
                sv = slice(j, min(j + cols, v))
                z = _logits_block(h32, weight[sv].to(torch.float32), _float32_slice(bias, sv), inv_t)  # [rows, cols]
                local = t - j
                hit = (local >= 0) & (local < z.shape[1])
                z_t += torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
                m_blk = z.amax(dim=1)
                z.sub_(torch.where(m_blk == float("-inf"), 0.0, m_blk)[:, None])  # z − max
                e = torch.exp(z)
                a_blk = torch.zeros_like(m_blk)  # Σ e·(z − max), for the entropy only
                if with_entropy:
                    # e = 0 where z − max < −1e4 (float32 exp underflows at −104): the floor keeps e·(z − max) = 0
                    a_blk = torch.linalg.vecdot(e, z.clamp_min_(LOGP_FLOOR))
                m, s, a = merge_softmax_stats_torch(m, s, a, m_blk, e.sum(dim=1), a_blk)
                del z, e  # before the next block is allocated
            log_s = torch.log(s)
            lse[sl] = torch.where(m == float("-inf"), 0.0, m) + log_s
            valid = (t >= 0) & (t < v)
            logp[sl] = torch.where(valid, z_t - lse[sl], float("nan"))  # out of range → NaN, as in the kernels
            if with_entropy:
                entropy[sl] = log_s - a / s
    return logp, entropy, lse


def _float32_slice(x: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if x is None else x[sl].to(torch.float32)


def linear_token_logprobs_bwd_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    g: torch.Tensor,
    h: torch.Tensor | None,
    *,
    temperature: float,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Blockwise torch twin of `linear_token_logprobs_bwd`.

    Per block, dZ comes from `token_logprobs_bwd_torch` on the recomputed logits, in place, with the
    1/T folded into g and h. With one row block (N ≤ rows) d weight and d bias blocks are written
    once in the output dtype; otherwise they are accumulated in float32 and cast at the end.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    dev, dtype = hidden.device, hidden.dtype
    inv_t = 1.0 / temperature
    rows, cols = torch_blocks(n, v, d, dev)
    single = rows >= n

    def grad_buffer(shape: tuple[int, ...]) -> torch.Tensor:
        return output_buffer(shape, dtype=dtype, device=dev) if single else torch.zeros(shape, device=dev)

    dh = output_buffer((n, d), dtype=dtype, device=dev) if needs[0] else None
    dw = grad_buffer((v, d)) if needs[1] else None
    db = grad_buffer((v,)) if needs[2] and bias is not None else None
    g = g.to(torch.float32) * inv_t
    h = None if h is None else h.to(torch.float32) * inv_t
    with torch.autocast(dev.type, enabled=False):
        for i in range(0, n, rows):
            sl = slice(i, min(i + rows, n))
            h32 = hidden[sl].to(torch.float32)
            dh32 = torch.zeros_like(h32) if dh is not None else None
            for j in range(0, v, cols):
                sv = slice(j, min(j + cols, v))
                w32 = weight[sv].to(torch.float32)
                z = _logits_block(h32, w32, _float32_slice(bias, sv), inv_t)  # [rows, cols]
                dz = token_logprobs_bwd_torch(
                    z,
                    targets[sl],
                    lse[sl],
                    None if entropy is None else entropy[sl],
                    g[sl],
                    None if h is None else h[sl],
                    inplace=True,
                    col_offset=j,
                )  # d logits of this block, in z's buffer
                if dh32 is not None:
                    dh32.addmm_(dz, w32)
                if dw is not None:
                    if single:
                        dw[sv] = torch.mm(dz.t(), h32)
                    else:
                        dw[sv].addmm_(dz.t(), h32)
                if db is not None:
                    if single:
                        db[sv] = dz.sum(dim=0)
                    else:
                        db[sv] += dz.sum(dim=0)
                del z, dz, w32  # before the next block is allocated
            if dh is not None:
                dh[sl] = dh32
    if not single:
        dw, db = (None if x is None else x.to(dtype) for x in (dw, db))
    return dh, dw, db


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """logp (and entropy) of `targets` under softmax((hidden @ weight.T + bias) / T), differentiable
    with respect to hidden, weight and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, impl):
        fwd = linear_token_logprobs_fwd if impl == "triton" else linear_token_logprobs_fwd_torch
        logp, entropy, lse = fwd(hidden, weight, bias, targets, temperature=temperature, with_entropy=with_entropy)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.impl = temperature, impl
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        bwd = linear_token_logprobs_bwd if ctx.impl == "triton" else linear_token_logprobs_bwd_torch
        dh, dw, db = bwd(
            hidden,
            weight,
            bias,
            targets,
            lse,
            entropy,
            grad_logp,
            grad_entropy,
            temperature=ctx.temperature,
            needs=tuple(ctx.needs_input_grad[:3]),
        )
        return dh, dw, db, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    impl: str = "auto",
    algorithm: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 [N] log-probs of `targets` under softmax((hidden @ weight.T + bias) / T) (and the entropy
    [N] when asked), without materialising the [N, V] logits.

    hidden [N, d], weight [V, d] (the LM head; may be the tied input embedding), bias [V] or None,
    all float32 / bfloat16 / float16 of one dtype; targets [N] int token ids in [0, V). Same result as
    `token_logprobs(hidden @ weight.T + bias, targets, ...)` with the product accumulated in float32;
    differentiable with respect to hidden, weight and bias. impl: "auto" (Triton on CUDA, chunked
    torch elsewhere), "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "torch". algorithm: "fused"
    (this module's kernels), "chunked" (`kernels.linear_chunked`: per chunk of rows a cuBLAS GEMM and
    a row pass, the logits recomputed in the backward) or "auto" (`DEFAULT_ALGORITHM` there). Raises
    ValueError naming the rows for non-finite inputs or log-probs and out-of-range targets (one
    device→host sync).
    """
    algorithm = resolve_algorithm(algorithm, hidden.device)
    n, _, _ = check_linear(hidden, weight, bias)
    check_targets(targets, n, hidden.device)
    temperature = check_temperature(temperature)
    impl = resolve_impl(impl, hidden.device, _linear_token_logprobs_fwd_kernel)
    fn = LinearChunkedLogprobsFunction if algorithm == "chunked" else LinearTokenLogprobsFunction
    out = fn.apply(hidden, weight, bias, targets, temperature, bool(return_entropy), impl)
    logp = out[0] if return_entropy else out
    if not bool(torch.isfinite(logp).all()):
        raise_for_bad_linear_rows(hidden.detach(), weight.detach(), _detach(bias), targets, logp.detach())
    return out


def _detach(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.detach()
