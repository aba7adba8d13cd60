"""Fused Triton kernels for Flow-GRPO: token log-probs, the clipped loss with KL, and the LM-head variant.

Each op has a Triton kernel (CUDA), a chunked torch path (everywhere else), and a plain-torch
reference in `kernels.reference`. This package imports only torch and triton.

    token_logprobs(logits, targets, *, temperature, return_entropy, impl)     -> logp [N] (, entropy [N])
    flow_grpo_loss(logits, targets, old_logprobs, advantages, loss_mask,
                   config: LossConfig, *, cu_seqlens, ref_logprobs, ...)     -> LossOutput(loss, metrics)
    linear_token_logprobs(hidden, weight, targets, *, bias, ...)              -> token_logprobs of hidden @ weight.T + bias
    linear_flow_grpo_loss(hidden, weight, targets, old_logprobs, ..., config, *, bias, ...)
                                                                              -> flow_grpo_loss of the same logits

`LossConfig` holds the loss hyperparameters (validated once, on construction). The `linear_*` ops
fuse the LM head and never materialise the [N, V] logits; `algorithm=` picks one of two LM-head
algorithms, "fused" (`linear_token_logprobs`' kernels) or "chunked" (`linear_chunked`: cuBLAS GEMMs
per chunk of rows and an in-place epilogue), "auto" the measured default of the device kind. Modules: one per op
(`_<op>_fwd_kernel` → `<op>_fwd` / `<op>_bwd` → `<Op>Function` → `<op>()`), `loss_common` (what
the two loss ops share), `utils` (what every op shares), `validation`, `reference`, `testing`.
"""

from kernels import reference
from kernels.flow_grpo_loss import flow_grpo_loss
from kernels.linear_flow_grpo_loss import linear_flow_grpo_loss
from kernels.linear_token_logprobs import linear_token_logprobs
from kernels.loss_common import KL_TYPES, LOSS_AGGS, LossConfig
from kernels.token_logprobs import token_logprobs
from kernels.utils import LossOutput

__all__ = [
    "KL_TYPES",
    "LOSS_AGGS",
    "LossConfig",
    "LossOutput",
    "flow_grpo_loss",
    "linear_flow_grpo_loss",
    "linear_token_logprobs",
    "reference",
    "token_logprobs",
]
