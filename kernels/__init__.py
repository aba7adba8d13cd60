"""Fused Triton kernels for Flow-GRPO: token log-probs, the clipped loss with KL, and the LM-head variant.

Each op has a Triton kernel (CUDA), a chunked torch path (everywhere else), and a plain-torch
reference in `kernels.reference`. This package imports only torch and triton.

    token_logprobs(logits, targets, *, temperature, return_entropy, impl)       -> logp [N] (, entropy [N])
    flow_grpo_loss(logits, targets, old_logprobs, advantages, loss_mask, ...)   -> LossOutput(loss, metrics)
"""

from kernels import reference
from kernels.flow_grpo_loss import flow_grpo_loss
from kernels.token_logprobs import token_logprobs
from kernels.utils import LossOutput

__all__ = ["LossOutput", "flow_grpo_loss", "reference", "token_logprobs"]
