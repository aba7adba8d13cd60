"""Fused LM head + log-probs + Flow-GRPO loss that never materialises the [N, V] logits.

`linear_flow_grpo_loss(hidden, weight, targets, ...)` is `flow_grpo_loss` on the logits
`hidden @ weight.T + bias` (product accumulated in float32): same `.loss`, same `.metrics`, and a
loss differentiable with respect to hidden, weight and bias. For a 7B-class planner (V = 152k) a
16k-token micro-batch would otherwise hold 5 GB of bf16 logits and 10 GB of float32 gradients.

It is assembled from the two landed ops, with no formula of its own:

* forward: the vocabulary tile pass of `linear_token_logprobs` (partial softmax statistics per
  token block and vocabulary split, see `kernels.linear_token_logprobs`), then one small kernel
  (`_linear_flow_grpo_loss_fwd_kernel`) that merges the splits into (lse, logp, H) and writes the
  O(N) `STATS` of `flow_grpo_loss` through `write_token_stats` (the per-token Flow-GRPO math of
  `flow_grpo_token_terms`), all from `kernels.loss_common`. The loss is Σ w·loss_t over the stats;
  metrics and every value check come from `LossInputs.metrics` (`finalize_metrics`, one device→host sync).
* backward (`linear_flow_grpo_loss_bwd`): `grad_coefficients` gives per-row g (on logp) and h
  (on H) from the stats, and the backward of `linear_token_logprobs` recomputes the logits tiles and
  forms d hidden, d weight and d bias from dZ = [g (onehot − p) − h p (log p + H)] / T without
  writing [N, V].

FLOPs: 2·N·V·d forward, 6·N·V·d backward (recomputed logits, d hidden, d weight), the floor of
DESIGN.md's 8·N·V·d. The torch path (CPU, or impl="torch") runs the same math over row chunks
(`linear_token_logprobs_fwd_torch` + `token_stats_torch`); its memory is bounded by the chunk.

algorithm="chunked" runs the other LM-head algorithm instead, `kernels.linear_chunked` (chunks of
rows through cuBLAS GEMMs and an in-place Triton epilogue that forms d logits in the forward);
algorithm="auto" takes the measured default of the device kind (`DEFAULT_ALGORITHM` there).

There is no `inplace_backward`: there is no logits buffer to reuse. With a tied embedding the
`weight` passed is the embedding matrix itself; autograd adds the head's d weight to the
embedding's gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.linear_chunked import LinearChunkedLossFunction, grad_needs, resolve_algorithm
from kernels.linear_token_logprobs import (
    REDUCE_BLOCK_N,
    combine_splits,
    linear_token_logprobs_bwd,
    linear_token_logprobs_bwd_torch,
    linear_token_logprobs_fwd_torch,
    linear_token_logprobs_partials,
)
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
from kernels.utils import LossOutput, output_buffer
from kernels.validation import check_linear, raise_for_bad_linear_rows, resolve_impl


@triton.jit
def _linear_flow_grpo_loss_fwd_kernel(
    part_ptr,
    targets_ptr,
    old_ptr,
    adv_ptr,
    ref_ptr,
    w_ptr,
    stats_ptr,
    N,
    V,
    SPLITS,
    clip_low,
    clip_high,
    clip_ratio_c,
    kl_coef,
    entropy_coef,
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_TYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    row_ok = rows < N
    target = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse, logp, entropy = combine_splits(part_ptr, rows, row_ok, target, N, V, SPLITS, BLOCK_N)
    write_token_stats(
        stats_ptr,
        rows,
        row_ok,
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


def linear_flow_grpo_loss_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """Triton forward: float32 stats [len(STATS), N] (per-token inputs float32 [N], any stride)."""
    # the kernel indexes every per-token input by row at unit stride
    targets, old_logprobs, advantages, weights = (x.contiguous() for x in (targets, old_logprobs, advantages, weights))
    ref_logprobs = None if ref_logprobs is None else ref_logprobs.contiguous()
    part = linear_token_logprobs_partials(hidden, weight, bias, targets, temperature=config.temperature)
    n, v = hidden.shape[0], weight.shape[0]
    stats = output_buffer((len(STATS), n), dtype=torch.float32, device=hidden.device)
    has_ref = ref_logprobs is not None
    _linear_flow_grpo_loss_fwd_kernel[(triton.cdiv(n, REDUCE_BLOCK_N),)](
        part,
        targets,
        old_logprobs,
        advantages,
        ref_logprobs if has_ref else old_logprobs,
        weights,
        stats,
        n,
        v,
        part.shape[1],
        *config.kernel_scalars,
        **config.kernel_constexprs(has_ref),
        BLOCK_N=REDUCE_BLOCK_N,
    )
    return stats


def linear_flow_grpo_loss_fwd_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """Chunked torch twin of `linear_flow_grpo_loss_fwd` (same stats)."""
    logp, entropy, lse = linear_token_logprobs_fwd_torch(
        hidden, weight, bias, targets, temperature=config.temperature, with_entropy=True
    )
    return token_stats_torch(logp, lse, entropy, old_logprobs, advantages, ref_logprobs, weights, config)


def linear_flow_grpo_loss_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    stats: torch.Tensor,
    weights: torch.Tensor,
    grad_loss: torch.Tensor,
    config: LossConfig,
    *,
    needs: tuple[bool, bool, bool],
    impl: str = "triton",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias) of `grad_loss · loss` (`grad_coefficients`) through
    `linear_token_logprobs_bwd` (its torch twin with impl="torch"); None where not in `needs`."""
    g, h = grad_coefficients(stats, weights, grad_loss, config.entropy_coef)
    bwd = linear_token_logprobs_bwd if impl == "triton" else linear_token_logprobs_bwd_torch
    return bwd(
        hidden, weight, bias, targets, stats[LSE], stats[ENTROPY], g, h, temperature=config.temperature, needs=needs
    )


class LinearFlowGRPOLossFunction(torch.autograd.Function):
    """(loss, stats) with the loss differentiable with respect to hidden, weight and bias; stats are not."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, ref, weights, config, impl):
        fwd = linear_flow_grpo_loss_fwd if impl == "triton" else linear_flow_grpo_loss_fwd_torch
        stats = fwd(hidden, weight, bias, targets, old, adv, ref, weights, config)
        loss = stats[WLOSS].sum()
        ctx.save_for_backward(hidden, weight, bias, targets, stats, weights)
        ctx.config, ctx.impl = config, impl
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        hidden, weight, bias, targets, stats, weights = ctx.saved_tensors
        dh, dw, db = linear_flow_grpo_loss_bwd(
            hidden,
            weight,
            bias,
            targets,
            stats,
            weights,
            grad_loss,
            ctx.config,
            needs=tuple(ctx.needs_input_grad[:3]),
            impl=ctx.impl,
        )
        return dh, dw, db, *([None] * 7)


def linear_flow_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig = DEFAULT_LOSS_CONFIG,
    *,
    bias: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    impl: str = "auto",
    algorithm: str = "auto",
) -> LossOutput:
    """Flow-GRPO loss on the logits `hidden @ weight.T + bias`, fused with the LM head (never [N, V]).

    hidden [N, d], weight [V, d] (the LM head, or the tied input embedding), bias [V] or None, all of
    one float dtype; the other arguments (the hyperparameters in `config`) and the result are those of
    `kernels.flow_grpo_loss` (see `kernels.reference.flow_grpo_loss` for the definitions). `.loss` is
    differentiable with respect to hidden, weight and bias. impl: "auto" (Triton on CUDA, chunked torch
    elsewhere), "triton" or "torch". algorithm: "fused" (this module's kernels), "chunked"
    (`kernels.linear_chunked`: GEMMs and an in-place epilogue, the gradient formed in the forward) or
    "auto" (`kernels.linear_chunked.DEFAULT_ALGORITHM` of the device kind). Costs one device→host sync
    (metrics and the value checks together).
    """
    algorithm = resolve_algorithm(algorithm, hidden.device)
    n, _, _ = check_linear(hidden, weight, bias)
    inp = prepare_loss_inputs(
        n,
        hidden.device,
        targets,
        old_logprobs,
        advantages,
        loss_mask,
        config,
        cu_seqlens=cu_seqlens,
        ref_logprobs=ref_logprobs,
    )
    impl = resolve_impl(impl, hidden.device, _linear_flow_grpo_loss_fwd_kernel)
    if algorithm == "chunked":
        loss, stats = LinearChunkedLossFunction.apply(
            hidden, weight, bias, targets, inp.old, inp.adv, inp.ref, inp.weights, config, impl,
            grad_needs(hidden, weight, bias),
        )  # fmt: skip
    else:
        loss, stats = LinearFlowGRPOLossFunction.apply(
            hidden, weight, bias, targets, inp.old, inp.adv, inp.ref, inp.weights, config, impl
        )

    def diagnose(logp: torch.Tensor) -> None:
        raise_for_bad_linear_rows(
            hidden.detach(), weight.detach(), None if bias is None else bias.detach(), targets, logp
        )

    return LossOutput(loss=loss, metrics=inp.metrics(stats, diagnose))
