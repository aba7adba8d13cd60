"""Fused Flow-GRPO loss on given logits: log-probs, clipped surrogate, KL and entropy in one pass.

Per token t (definitions of `kernels.reference`, verl-compatible; z = logits / T):

    logp   = z_target − lse(z)               H = −Σ p log p
    ratio  = exp(logp − old_logp)
    pg     = max(−A·ratio, −A·clip(ratio, 1 − clip_low, 1 + clip_high))
             dual clip (c = clip_ratio_c > 1): where A < 0 and pg > −A·c, pg = −A·c
    kl     = k1: d | k2: d²/2 | k3: clamp(e^{−d} + d − 1, −10, 10),   d = logp − ref_logp
    loss_t = pg + kl_coef·kl − entropy_coef·H
    loss   = Σ_t w_t · loss_t            (w from `aggregation_weights`: token-mean,
                                          seq-mean-token-mean, seq-mean-token-sum)

The hyperparameters come as one `LossConfig`; the per-token math, the stats, the input checks and
the metrics are those of `kernels.loss_common`, shared with `linear_flow_grpo_loss`.

Forward kernel (`_flow_grpo_loss_fwd_kernel`): one program per row streams the logits once
(`kernels.utils.row_logsumexp_entropy`, shared with `token_logprobs`), then `write_token_stats`
evaluates the per-token terms and writes the O(N) `STATS` (logp, lse, H, ratio, pg, kl, the clip
indicators, w·loss_t and g_t = w·d loss_t/d logp). The loss is the sum of w·loss_t. Backward
(`flow_grpo_loss_bwd`) is `token_logprobs_bwd` with g = g_t·grad and h = −w·entropy_coef·grad
(`grad_coefficients`): d logits = grad · [g_t (onehot − p) + h_t (−p (log p + H))] / T, written
once (optionally into the logits buffer itself). Without CUDA the same math runs as chunked torch
(`token_logprobs_fwd_torch` + `token_stats_torch`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.loss_common import (
    DEFAULT_LOSS_CONFIG,
    ENTROPY,
    LSE,
    STATS,
    WLOSS,
    LossConfig,
    grad_coefficients,
    prepare_loss_inputs,
    token_stats_torch,
    write_token_stats,
)
from kernels.token_logprobs import launch_config, token_logprobs_bwd, token_logprobs_bwd_torch, token_logprobs_fwd_torch
from kernels.utils import LossOutput, output_buffer, row_logsumexp_entropy, unit_stride, vector_elems
from kernels.validation import check_logits, is_interpreted, raise_for_bad_rows, resolve_impl


@triton.jit
def _flow_grpo_loss_fwd_kernel(
    logits_ptr,
    targets_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    w_ptr,
    stats_ptr,
    stride_row,
    N,
    V,
    inv_t,
    clip_low,
    clip_high,
    clip_ratio_c,
    kl_coef,
    entropy_coef,
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_TYPE: tl.constexpr,
    BLOCK_V: tl.constexpr,
    VEC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 for N·V ≥ 2^31
    target = tl.load(targets_ptr + row)
    lse, logp, entropy = row_logsumexp_entropy(
        logits_ptr + row * stride_row, target, V, inv_t, WITH_ENTROPY=True, BLOCK_V=BLOCK_V, VEC=VEC
    )
    write_token_stats(
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


def flow_grpo_loss_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """Triton forward: float32 stats [len(STATS), N] (per-token inputs float32 [N], any stride)."""
    logits = unit_stride(logits)
    # the kernel indexes every per-token input by row at unit stride
    targets, old_logprobs, advantages, weights = (x.contiguous() for x in (targets, old_logprobs, advantages, weights))
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.contiguous()
    n, v = logits.shape
    stats = output_buffer((len(STATS), n), dtype=torch.float32, device=logits.device)
    block_v, num_warps = launch_config(v, logits.dtype, is_interpreted(_flow_grpo_loss_fwd_kernel))
    has_ref = ref_logprobs is not None
    _flow_grpo_loss_fwd_kernel[(n,)](
        logits,
        targets,
        old_logprobs,
        advantages,
        ref_logprobs if has_ref else old_logprobs,
        weights,
        stats,
        logits.stride(0),
        n,
        v,
        1.0 / config.temperature,
        *config.kernel_scalars,
        **config.kernel_constexprs(has_ref),
        BLOCK_V=block_v,
        VEC=vector_elems(logits.dtype),
        num_warps=num_warps,
    )
    return stats


def flow_grpo_loss_fwd_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """Chunked torch twin of `flow_grpo_loss_fwd` (same stats)."""
    logp, entropy, lse = token_logprobs_fwd_torch(logits, targets, temperature=config.temperature, with_entropy=True)
    return token_stats_torch(logp, lse, entropy, old_logprobs, advantages, ref_logprobs, weights, config)


def flow_grpo_loss_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    stats: torch.Tensor,
    weights: torch.Tensor,
    grad_loss: torch.Tensor,
    config: LossConfig,
    *,
    inplace: bool = False,
    impl: str = "triton",
) -> torch.Tensor:
    """d logits of `grad_loss · loss` (`grad_coefficients`) through `token_logprobs_bwd` (its torch twin
    with impl="torch")."""
    g, h = grad_coefficients(stats, weights, grad_loss, config.entropy_coef)
    bwd = token_logprobs_bwd if impl == "triton" else token_logprobs_bwd_torch
    return bwd(logits, targets, stats[LSE], stats[ENTROPY], g, h, temperature=config.temperature, inplace=inplace)


class FlowGRPOLossFunction(torch.autograd.Function):
    """(loss, stats) with the loss differentiable with respect to `logits`; stats are not."""

    @staticmethod
    def forward(ctx, logits, targets, old, adv, ref, weights, config, impl, inplace_backward):
        fwd = flow_grpo_loss_fwd if impl == "triton" else flow_grpo_loss_fwd_torch
        stats = fwd(logits, targets, old, adv, ref, weights, config)
        loss = stats[WLOSS].sum()
        ctx.save_for_backward(logits, targets, stats, weights)
        ctx.config, ctx.impl, ctx.inplace = config, impl, inplace_backward
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        logits, targets, stats, weights = ctx.saved_tensors
        dlogits = flow_grpo_loss_bwd(
            logits,
            targets,
            stats,
            weights,
            grad_loss,
            ctx.config,
            inplace=ctx.inplace,
            impl=ctx.impl,
        )
        return dlogits, *([None] * 8)


def flow_grpo_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig = DEFAULT_LOSS_CONFIG,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    impl: str = "auto",
    inplace_backward: bool = False,
) -> LossOutput:
    """Fused Flow-GRPO loss on [N, V] logits; `.loss` is differentiable with respect to `logits`.

    Semantics are those of `kernels.reference.flow_grpo_loss` (see the module docstring), with the
    hyperparameters in `config` (temperature, clipping, KL, entropy, aggregation); `old_logprobs`,
    `advantages`, `ref_logprobs` carry no gradient. `cu_seqlens` (int32 [S+1], 0 … N) delimits packed
    sequences for the seq-mean aggregations. impl: "auto" (Triton on CUDA, chunked torch elsewhere),
    "triton" or "torch". inplace_backward=True writes d logits into the `logits` buffer (saves N·V
    memory): `logits` is overwritten by the backward and must not be used afterwards. Costs one
    device→host sync (metrics and the value checks together).
    """
    n, _ = check_logits(logits)
    inp = prepare_loss_inputs(
        n,
        logits.device,
        targets,
        old_logprobs,
        advantages,
        loss_mask,
        config,
        cu_seqlens=cu_seqlens,
        ref_logprobs=ref_logprobs,
    )
    impl = resolve_impl(impl, logits.device, _flow_grpo_loss_fwd_kernel)
    loss, stats = FlowGRPOLossFunction.apply(
        logits, targets, inp.old, inp.adv, inp.ref, inp.weights, config, impl, inplace_backward
    )
    metrics = inp.metrics(stats, lambda logp: raise_for_bad_rows(logits.detach(), targets, logp))
    return LossOutput(loss=loss, metrics=metrics)
