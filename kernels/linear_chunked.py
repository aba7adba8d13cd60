"""The chunked LM-head algorithm of `linear_flow_grpo_loss` / `linear_token_logprobs` (algorithm="chunked").

DESIGN.md names two algorithms for the LM-head ops, chosen per device by measurement: the fused
Triton kernels of `kernels.linear_token_logprobs` (blockwise log-sum-exp, logits recomputed in the
backward, d hidden / d weight by float32 atomics) and this one: GEMMs on the tensor cores (cuBLAS
through torch) with an in-place Triton epilogue, the gradient computed in the forward as in
Liger-Kernel's fused linear losses, no atomics. Rows go in chunks of C rows (`chunk_rows`: a float32
[C, V] buffer within a byte budget: a fraction of the free device memory on CUDA, `CHUNK_BYTES_CPU`
on the CPU). Per chunk of rows r (loss, `_linear_chunked_loss_fwd_kernel`, one program per row):

    Z  = H_r · Wᵀ (+ b)              GEMM into the float32 buffer (bf16/fp16: cuBLAS with fp32
                                     accumulation and fp32 output; fp32: IEEE fp32, no TF32)
    lse, logp, H of softmax(Z / T)   first stream over the row (`row_logsumexp_entropy`)
    stats of the row                 `write_token_stats`: ratio, pg, kl, clip flags, w·loss_t and
                                     g = w · d loss_t / d logp; h = −w · entropy_coef
    dZ = [g (onehot − p) − h p (log p + H)] / T     second stream over the row, written over Z in
                                     the input dtype (`_write_dlogits`)
    dH_r = dZ · W,  dW += dZᵀ · H_r,  db += Σ_rows dZ   two GEMMs and a column sum

The loss is linear in its output gradient, so the backward only scales the stored (dH, dW, db) by it,
in place (a second backward through the same forward is refused). FLOPs: 6·N·V·d (benchmarks count
8·N·V·d for every provider). Extra memory: the [C, V] float32 buffer, dH and dW in the input dtype
held from forward to backward, and, for bf16/fp16 with more than one chunk, a float32 [V, d]
accumulator of dW during the forward; the buffer is freed before the accumulator is rounded to the
input dtype, so the forward's peak beyond dH is max(buffer + fp32 dW, fp32 dW + dW) (without CUDA, plus
the float32 copy of a bf16/fp16 weight, see below). Without grad
(grad mode off or no input requiring it) only the stats are written and the gradient GEMMs are skipped.

The buffer's row stride V' is V rounded up to 16 (`chunk_buffer`): every row starts 64-byte aligned,
so the epilogue reads and writes whole 16-byte vectors for any V (a tail of < 8 elements aside).
bf16/fp16 dZ over float32 Z: each row of the bf16 view [C, 2V'] starts where its float32 row
starts, so dZ of block [j, j + BLOCK_V) lands on float32 elements [j/2, (j + BLOCK_V)/2) of the
same row: already read, by this program only. A barrier between a block's loads and its
stores (`tl.debug_barrier`) keeps one thread from overwriting a word another thread has yet to read
(the interpreter runs a block at once; there it is a no-op). float32 dZ is written element for element.

`linear_token_logprobs`: its backward coefficients (grad_logp, grad_entropy) exist only in the
backward, and d weight sums them row-weighted over all rows, so nothing useful is formed in the
forward. Forward: per chunk the GEMM and `token_logprobs`' row kernel (lse, logp, H); backward: per
chunk the GEMM again, `_linear_chunked_logprobs_bwd_kernel` (dZ from g, h and the saved lse, H, over Z
as above) and the two gradient GEMMs: 8·N·V·d like the fused kernel, on cuBLAS and without atomics.

Torch twin (impl="torch", the path without CUDA): the same chunks and GEMMs; the loss epilogue as
whole-chunk torch ops (log-sum-exp, log p in place, p, entropy, `token_stats_torch`, dZ over p or
log p: two [C, V] buffers), the log-prob ops' as `token_logprobs_fwd_torch` / `_bwd_torch`; dZ stays
float32. Without CUDA there is no mixed-dtype GEMM: bf16/fp16 products run on float32 copies
(exact), the weight's made once per call (4·V·d bytes).

The default algorithm per device kind is `DEFAULT_ALGORITHM` (measured; see there).

Simplifications: hidden, weight and bias share one dtype; a bias is added to the chunk by an extra
pass over it; the dH / dW GEMMs of the Triton path take dZ rounded to the input dtype (as the
fused kernel's tensor-core operands and the materialised path's d logits are).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.loss_common import STATS, WLOSS, LossConfig, grad_coefficients, token_stats_torch, write_token_stats
from kernels.token_logprobs import (
    _dlogits,
    launch_config,
    token_logprobs_bwd_torch,
    token_logprobs_fwd,
    token_logprobs_fwd_torch,
)
from kernels.utils import LOGP_FLOOR, output_buffer, row_logsumexp_entropy, vector_elems
from kernels.validation import is_interpreted

ALGORITHMS = ("auto", "fused", "chunked")
# algorithm="auto" per device kind, by measurement. cpu: chunked, `flowgrpo bench kernels` on the 2-core dev
# machine (float32, torch 2.13.0+cpu, 2 threads, other jobs running): 4096x64x32000 fused 7.0 s, chunked
# 3.2 s (Liger 9.4 s, materialize 6.5 s); 256x1536x151936 (55-row chunks then) fused 49.7 s, chunked 28.9 s
# (Liger 27.0 s, materialize 20.8 s). cuda: the fused kernels until a GPU measures both (none has yet).
DEFAULT_ALGORITHM = {"cpu": "chunked", "cuda": "fused"}
# Budget of the float32 [C, V] chunk: on CUDA a fraction of the free memory, at most CHUNK_MAX_BYTES_CUDA;
# on the CPU a fixed budget (read at call time: tests lower it to force chunk boundaries).
CHUNK_BYTES_CPU = 32 << 20
# ... but at least this many rows: each chunk streams the whole weight through three GEMMs (at the 1.5B head,
# 256 tokens, fp32, 1 thread: 28.1 s with 55-row chunks, 24.9 s with one 256-row chunk)
CHUNK_MIN_ROWS_CPU = 256
CHUNK_MAX_BYTES_CUDA = 2 << 30
CHUNK_FREE_FRACTION_CUDA = 0.25
CHUNK_ROW_MULTIPLE_CUDA = 128  # whole GEMM tiles per chunk
# Row stride of the chunk buffer: a multiple of 16 float32 elements, so every row starts 64-byte aligned
ROW_STRIDE_MULTIPLE = 16


def resolve_algorithm(algorithm: str, device: torch.device) -> str:
    """ "auto" → `DEFAULT_ALGORITHM` of the device kind; "fused" and "chunked" as given."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "auto":
        return DEFAULT_ALGORITHM.get(device.type, "fused")
    return algorithm


def padded_width(v: int) -> int:
    """V' = V rounded up to `ROW_STRIDE_MULTIPLE`: the chunk buffer's row stride."""
    return -(-v // ROW_STRIDE_MULTIPLE) * ROW_STRIDE_MULTIPLE


def chunk_rows(n: int, v: int, device: torch.device) -> int:
    """Rows C of a chunk: the float32 [C, V'] buffer within the budget (on the CPU at least
    `CHUNK_MIN_ROWS_CPU`), at least one row, at most N."""
    row_bytes = 4 * padded_width(v)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(CHUNK_MAX_BYTES_CUDA, int(free * CHUNK_FREE_FRACTION_CUDA))
        rows = budget // row_bytes
        if rows >= CHUNK_ROW_MULTIPLE_CUDA:
            rows -= rows % CHUNK_ROW_MULTIPLE_CUDA
    else:
        rows = max(CHUNK_BYTES_CPU // row_bytes, CHUNK_MIN_ROWS_CPU)
    return max(1, min(n, rows))


def chunk_buffer(rows: int, v: int, device: torch.device) -> torch.Tensor:
    """float32 [rows, V] over a [rows, V'] buffer, V' = V rounded up to `ROW_STRIDE_MULTIPLE`: rows start
    16-byte aligned for any V (the epilogue's vector loads and stores; GEMMs write the view in place,
    cuBLAS with ldc = V')."""
    return torch.empty((rows, padded_width(v)), dtype=torch.float32, device=device)[:, :v]


@triton.jit
def _write_dlogits(
    z_row,
    dz_row,
    target,
    lse,
    entropy,
    g,
    h,
    V,
    inv_t,
    HAS_H: tl.constexpr,
    SYNC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    """dZ_v = [g (1[v = target] − p_v) − h p_v (log p_v + H)] / T over one row, p = exp(z / T − lse),
    stored at `dz_row` (which may alias `z_row`, see the module docstring; SYNC: a smaller dtype).

    Rows start 16-byte aligned (`chunk_buffer` pads the row stride), so the body [0, V − V mod VEC)
    moves in 16-byte vectors of both dtypes (VEC: elements of dZ's dtype per 16 bytes); the tail
    (< VEC elements) comes after it: its stores land on float32 elements the body has already read."""
    active = (g != 0.0).to(tl.int32)
    if HAS_H:
        active = active | (h != 0.0).to(tl.int32)
    # no tl.multiple_of: Triton passes V = 1 as a constant, which it rejects; it derives the divisibility itself
    n_body = (V // VEC) * VEC
    n_read = n_body * active  # masked rows read nothing: z = −inf, p = 0, dZ = 0
    out_ty = dz_row.dtype.element_ty
    offs = tl.arange(0, BLOCK_V)  # [BLOCK_V]
    for start in range(0, n_body, BLOCK_V):
        cols = start + offs
        z = tl.load(z_row + cols, mask=cols < n_read, other=float("-inf"))  # [BLOCK_V]
        grad = _dlogits(z, target, cols, lse, g, h, entropy, inv_t, HAS_H)
        if SYNC:
            tl.debug_barrier()  # every thread has read this block before any overwrites part of it
        tl.store(dz_row + cols, grad.to(out_ty), mask=cols < n_body)
    tail = n_body + tl.arange(0, VEC)  # [VEC]
    z = tl.load(z_row + tail, mask=tail < V * active, other=float("-inf"))
    grad = _dlogits(z, target, tail, lse, g, h, entropy, inv_t, HAS_H)
    if SYNC:
        tl.debug_barrier()
    tl.store(dz_row + tail, grad.to(out_ty), mask=tail < V)


@triton.jit
def _linear_chunked_loss_fwd_kernel(
    z_ptr,
    dz_ptr,
    targets_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    w_ptr,
    stats_ptr,
    row0,
    N,
    V,
    stride_z,
    stride_dz,
    inv_t,
    clip_low,
    clip_high,
    clip_ratio_c,
    kl_coef,
    entropy_coef,
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_TYPE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_H: tl.constexpr,
    SYNC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
    DVEC: tl.constexpr,
):
    local = tl.program_id(0).to(tl.int64)  # row of the chunk; int64: local · stride may pass 2^31
    row = row0 + local  # row of the batch
    target = tl.load(targets_ptr + row)
    z_row = z_ptr + local * stride_z
    lse, logp, entropy = row_logsumexp_entropy(z_row, target, V, inv_t, WITH_ENTROPY=True, BLOCK_V=BLOCK_V, VEC=VEC)
    g = write_token_stats(
        stats_ptr,
        row,
        row < N,
        N,
        logp,
        lse,
        entropy,
        old_ptr,
        adv_ptr,
        ref_ptr,
        w_ptr,
        clip_low,
        clip_high,
        clip_ratio_c,
        kl_coef,
        entropy_coef,
        HAS_REF=HAS_REF,
        DUAL_CLIP=DUAL_CLIP,
        KL_TYPE=KL_TYPE,
    )
    if COMPUTE_GRAD:
        h = 0.0
        if HAS_H:
            h = -tl.load(w_ptr + row) * entropy_coef  # d (w · loss_t) / d H
        dz_row = dz_ptr + local * stride_dz
        _write_dlogits(z_row, dz_row, target, lse, entropy, g, h, V, inv_t, HAS_H, SYNC, BLOCK_V, DVEC)


@triton.jit
def _linear_chunked_logprobs_bwd_kernel(
    z_ptr,
    dz_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    g_ptr,
    h_ptr,
    row0,
    V,
    stride_z,
    stride_dz,
    inv_t,
    HAS_H: tl.constexpr,
    SYNC: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    local = tl.program_id(0).to(tl.int64)
    row = row0 + local
    target = tl.load(targets_ptr + row)
    lse = tl.load(lse_ptr + row)
    g = tl.load(g_ptr + row)
    h = 0.0
    entropy = 0.0
    if HAS_H:
        h = tl.load(h_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    z_row, dz_row = z_ptr + local * stride_z, dz_ptr + local * stride_dz
    _write_dlogits(z_row, dz_row, target, lse, entropy, g, h, V, inv_t, HAS_H, SYNC, BLOCK_V, VEC)


class _ChunkGemms:
    """The GEMMs of the chunked algorithm over one (hidden, weight, bias): per chunk the float32 logits,
    then d hidden / d weight / d bias (`needs`) accumulated from the chunk's dZ (`run`)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needs, rows: int):
        n, d = hidden.shape
        v = weight.shape[0]
        dev, dtype = hidden.device, hidden.dtype
        self.hidden, self.weight, self.dtype, self.rows = hidden, weight, dtype, rows
        self.half = dtype != torch.float32
        self.mixed = self.half and dev.type == "cuda"  # cuBLAS: bf16/fp16 in, float32 out
        # without CUDA the products of bf16/fp16 run on float32 copies (exact): the weight's once per call
        self.w32 = weight.to(torch.float32) if self.half and not self.mixed else weight
        self.bias32 = None if bias is None else bias.to(torch.float32)
        self.single = rows >= n  # one chunk: d weight and d bias are written once, in the input dtype
        self.dh = output_buffer((n, d), dtype=dtype, device=dev) if needs[0] else None
        self.dw = self.dw_acc = self.db_acc = None
        if needs[1]:
            if self.single:
                self.dw = output_buffer((v, d), dtype=dtype, device=dev)
            elif self.half:
                self.dw_acc = torch.zeros((v, d), dtype=torch.float32, device=dev)
            else:
                self.dw = torch.zeros((v, d), dtype=dtype, device=dev)
        self.db_acc = torch.zeros((v,), dtype=torch.float32, device=dev) if needs[2] and bias is not None else None

    def logits(self, out: torch.Tensor, sl: slice) -> None:
        """out [rows, V] float32 = hidden[sl] @ weight.T + bias."""
        h = self.hidden[sl]
        if self.mixed:
            torch.mm(h, self.weight.t(), out_dtype=torch.float32, out=out)
        else:
            torch.mm(h.to(torch.float32), self.w32.t(), out=out)
        if self.bias32 is not None:
            out.add_(self.bias32)

    def accumulate(self, dz: torch.Tensor, sl: slice) -> None:
        """d hidden[sl] = dZ @ weight, d weight += dZ.T @ hidden[sl], d bias += Σ_rows dZ (dZ float32 or
        the input dtype)."""
        h = self.hidden[sl]
        if self.mixed and dz.dtype == torch.float32:
            dz = dz.to(self.dtype)  # impl="torch" on CUDA: the GEMMs on the tensor cores, as the Triton path's
        low = dz.dtype != torch.float32  # dZ in the input dtype: the GEMMs in it, float32 accumulation
        if self.dh is not None:
            if low or not self.half:
                torch.mm(dz, self.weight, out=self.dh[sl])
            else:
                self.dh[sl] = torch.mm(dz, self.w32)
        if self.dw is not None:
            if self.single:
                if low or not self.half:
                    torch.mm(dz.t(), h, out=self.dw)
                else:
                    self.dw.copy_(torch.mm(dz.t(), h.to(torch.float32)))
            else:
                self.dw.addmm_(dz.t(), h)  # float32 inputs
        if self.dw_acc is not None:
            if low and self.mixed:
                torch.addmm(self.dw_acc, dz.t(), h, out_dtype=torch.float32, out=self.dw_acc)
            else:
                self.dw_acc.addmm_(dz.t().to(torch.float32), h.to(torch.float32))
        if self.db_acc is not None:
            self.db_acc += dz.sum(dim=0, dtype=torch.float32)

    def run(self, epilogue) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Per chunk of rows `sl`: the logits GEMM into one reused `chunk_buffer` z, `epilogue(z, sl)` (dZ
        over z, or None) and the gradient GEMMs of that dZ. The buffer is freed before d weight is
        converted to the input dtype. Returns (d hidden, d weight, d bias), None where not asked."""
        n, v = self.hidden.shape[0], self.weight.shape[0]
        dev = self.hidden.device
        buf = chunk_buffer(self.rows, v, dev)
        z = dz = None
        with torch.autocast(dev.type, enabled=False):
            for i in range(0, n, self.rows):
                sl = slice(i, min(i + self.rows, n))
                z = buf[: sl.stop - sl.start]
                self.logits(z, sl)
                dz = epilogue(z, sl)
                if dz is not None:
                    self.accumulate(dz, sl)
        del buf, z, dz
        dw = self.dw if self.dw_acc is None else self.dw_acc.to(self.dtype)
        self.dw_acc = None
        db = None if self.db_acc is None else self.db_acc.to(self.dtype)
        return self.dh, dw, db


def _dz_view(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """dZ [rows, V] of `dtype` over the float32 logits `z` (a `chunk_buffer` view): each dZ row starts
    where its float32 row starts (row stride 4V' / itemsize elements of `dtype`)."""
    return z if dtype == torch.float32 else z.view(dtype)[:, : z.shape[1]]


def linear_flow_grpo_loss_chunked_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    config: LossConfig,
    *,
    needs: tuple[bool, bool, bool],
    impl: str = "triton",
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
    """float32 stats [len(STATS), N] and (d hidden, d weight, d bias) of the loss (None where not in
    `needs`); the Triton epilogue with impl="triton", its torch twin with impl="torch"."""
    targets, old_logprobs, advantages, weights = (x.contiguous() for x in (targets, old_logprobs, advantages, weights))
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.contiguous()
    n = hidden.shape[0]
    grad = any(needs)
    gemms = _ChunkGemms(hidden, weight, bias, needs, chunk_rows(n, weight.shape[0], hidden.device))
    stats = output_buffer((len(STATS), n), dtype=torch.float32, device=hidden.device)
    per_token = (targets, old_logprobs, advantages, ref_logprobs, weights, stats, config, grad)

    def epilogue(z: torch.Tensor, sl: slice) -> torch.Tensor | None:
        if impl == "triton":
            dz = _dz_view(z, hidden.dtype)
            _loss_epilogue(z, dz, sl.start, *per_token)
            return dz if grad else None
        return _loss_epilogue_torch(z, sl, *per_token)

    return stats, gemms.run(epilogue)


def _loss_epilogue(z, dz, row0, targets, old, adv, ref, weights, stats, config: LossConfig, grad: bool) -> None:
    """`_linear_chunked_loss_fwd_kernel` over the rows of the chunk `z` (batch rows from row0)."""
    rows, v = z.shape
    block_v, num_warps = launch_config(v, z.dtype, is_interpreted(_linear_chunked_loss_fwd_kernel))
    has_ref = ref is not None
    _linear_chunked_loss_fwd_kernel[(rows,)](
        z,
        dz,
        targets,
        old,
        adv,
        ref if has_ref else old,
        weights,
        stats,
        row0,
        stats.shape[1],
        v,
        z.stride(0),
        dz.stride(0),
        1.0 / config.temperature,
        *config.kernel_scalars,
        **config.kernel_constexprs(has_ref),
        COMPUTE_GRAD=grad,
        HAS_H=config.entropy_coef != 0.0,
        SYNC=dz.dtype.itemsize < z.dtype.itemsize,
        BLOCK_V=block_v,
        VEC=vector_elems(z.dtype),
        DVEC=vector_elems(dz.dtype),
        num_warps=num_warps,
    )


def _loss_epilogue_torch(z, sl, targets, old, adv, ref, weights, stats, config: LossConfig, grad: bool):
    """Torch twin of `_linear_chunked_loss_fwd_kernel` over the chunk `z` (batch rows `sl`): writes the stats
    and returns float32 dZ (in z's buffer or in a second one of its size; z is overwritten)."""
    inv_t = 1.0 / config.temperature
    v = z.shape[1]
    t = targets[sl].long()
    valid = (t >= 0) & (t < v)
    t_safe = torch.where(valid, t, 0).unsqueeze(1)
    if inv_t != 1.0:
        z.mul_(inv_t)
    # log-sum-exp without a third [rows, V] buffer; a NaN or +inf logit makes the row's logp NaN, which the
    # value checks catch
    m = z.amax(dim=1)
    m = torch.where(m == float("-inf"), 0.0, m)
    p = torch.exp(z.sub_(m.unsqueeze(1)))  # [rows, V], unnormalised
    s = p.sum(dim=1)
    log_s = torch.log(s)
    lse = m + log_s
    logp = torch.where(valid, z.gather(1, t_safe).squeeze(1) - log_s, float("nan"))  # out of range → NaN
    log_p = z.sub_(log_s.unsqueeze(1))
    p.div_(s.unsqueeze(1))
    # log p < −1e4 only where p is 0 in float32: the floor keeps p·log p = 0 there (not 0·−inf)
    entropy = -torch.linalg.vecdot(p, log_p.clamp_min_(LOGP_FLOOR))
    w = weights[sl]
    chunk_stats = token_stats_torch(logp, lse, entropy, old[sl], adv[sl], None if ref is None else ref[sl], w, config)
    stats[:, sl] = chunk_stats
    if not grad:
        return None
    g, h = grad_coefficients(chunk_stats, w, 1.0, config.entropy_coef)
    if h is None:
        dz = p.mul_((-inv_t * g).unsqueeze(1))  # −g p / T
    else:  # −p (g + h (log p + H)) / T
        dz = log_p.add_(entropy.unsqueeze(1)).mul_(h.unsqueeze(1)).add_(g.unsqueeze(1)).mul_(p).mul_(-inv_t)
    return dz.scatter_add_(1, t_safe, torch.where(valid, g * inv_t, 0.0).unsqueeze(1))  # + g onehot / T


class LinearChunkedLossFunction(torch.autograd.Function):
    """(loss, stats) of the chunked algorithm; the loss's gradient is formed in the forward, stats carry none."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, ref, weights, config, impl, needs):
        stats, grads = linear_flow_grpo_loss_chunked_fwd(
            hidden, weight, bias, targets, old, adv, ref, weights, config, needs=needs, impl=impl
        )
        ctx.save_for_backward(*grads)
        ctx.scaled = False
        ctx.mark_non_differentiable(stats)
        return stats[WLOSS].sum(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        # scaled in place: one copy of d weight, not two (the stored one and its scaled copy)
        if ctx.scaled:
            raise RuntimeError(
                "backward through the chunked LM-head loss ran twice; its gradient is formed in the forward and "
                "scaled in place by the first backward: run the loss's forward again instead of retain_graph=True"
            )
        ctx.scaled = True
        grads = tuple(None if x is None else x.mul_(grad_loss) for x in ctx.saved_tensors)
        return *grads, *([None] * 8)


def linear_token_logprobs_chunked_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = True,
    impl: str = "triton",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """float32 (logp [N], entropy [N] or None, lse [N]): per chunk the GEMM and `token_logprobs`' row pass."""
    n = hidden.shape[0]
    dev = hidden.device
    logp = output_buffer((n,), dtype=torch.float32, device=dev)
    lse = output_buffer((n,), dtype=torch.float32, device=dev)
    entropy = output_buffer((n,), dtype=torch.float32, device=dev) if with_entropy else None
    fwd = token_logprobs_fwd if impl == "triton" else token_logprobs_fwd_torch

    def epilogue(z: torch.Tensor, sl: slice) -> None:
        lp, ent, ls = fwd(z, targets[sl], temperature=temperature, with_entropy=with_entropy)
        logp[sl], lse[sl] = lp, ls
        if with_entropy:
            entropy[sl] = ent

    _ChunkGemms(hidden, weight, bias, (False, False, False), chunk_rows(n, weight.shape[0], dev)).run(epilogue)
    return logp, entropy, lse


def linear_token_logprobs_chunked_bwd(
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
    impl: str = "triton",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias) for per-row coefficients g on logp and h on H: per chunk the logits
    GEMM again, dZ over them (`_linear_chunked_logprobs_bwd_kernel` or its torch twin), the two GEMMs."""
    targets, lse = targets.contiguous(), lse.contiguous()
    g = g.to(torch.float32).contiguous()
    has_h = h is not None
    if has_h:
        h, entropy = h.to(torch.float32).contiguous(), entropy.contiguous()
    n = hidden.shape[0]

    def epilogue(z: torch.Tensor, sl: slice) -> torch.Tensor:
        if impl != "triton":
            hs, es = (h[sl], entropy[sl]) if has_h else (None, None)
            return token_logprobs_bwd_torch(
                z, targets[sl], lse[sl], es, g[sl], hs, temperature=temperature, inplace=True
            )
        dz = _dz_view(z, hidden.dtype)
        block_v, num_warps = launch_config(z.shape[1], z.dtype, is_interpreted(_linear_chunked_logprobs_bwd_kernel))
        _linear_chunked_logprobs_bwd_kernel[(z.shape[0],)](
            z,
            dz,
            targets,
            lse,
            entropy if has_h else lse,
            g,
            h if has_h else g,
            sl.start,
            z.shape[1],
            z.stride(0),
            dz.stride(0),
            1.0 / temperature,
            HAS_H=has_h,
            SYNC=dz.dtype.itemsize < z.dtype.itemsize,
            BLOCK_V=block_v,
            VEC=vector_elems(dz.dtype),
            num_warps=num_warps,
        )
        return dz

    return _ChunkGemms(hidden, weight, bias, needs, chunk_rows(n, weight.shape[0], hidden.device)).run(epilogue)


class LinearChunkedLogprobsFunction(torch.autograd.Function):
    """logp (and entropy) through the LM head by the chunked algorithm, differentiable with respect to
    hidden, weight and bias (logits recomputed per chunk in the backward)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy, impl):
        logp, entropy, lse = linear_token_logprobs_chunked_fwd(
            hidden, weight, bias, targets, temperature=temperature, with_entropy=with_entropy, impl=impl
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.impl = temperature, impl
        ctx.set_materialize_grads(False)
        return (logp, entropy) if with_entropy else logp

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        dh, dw, db = linear_token_logprobs_chunked_bwd(
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
            impl=ctx.impl,
        )
        return dh, dw, db, None, None, None, None


def grad_needs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) the loss's gradient is formed for in the forward."""
    on = torch.is_grad_enabled()
    return tuple(on and x is not None and x.requires_grad for x in (hidden, weight, bias))
