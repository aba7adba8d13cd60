"""Plain-torch references for every op in `kernels`: the definitions, written the way RL frameworks do.

These are what the fused kernels must agree with and what benchmarks compare against (the "eager
reference"): logits are upcast to float32, `log_softmax` materialises [N, V], `gather` picks the
targets, and autograd derives the backward. They are obviously correct and memory-hungry.

Definitions (verl-compatible, see shared/DESIGN.md "Loss"; the hyperparameters of the losses come as
one `kernels.LossConfig`):

    logp    = log_softmax(logits / T)[target]                 H = -sum_v p_v log p_v, p = softmax(logits / T)
    ratio   = exp(clamp(logp - old_logp, -20, 20))          (verl's log-ratio clamp)
    pg      = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))
              dual clip (clip_ratio_c = c > 1): where A < 0, pg = min(pg, -A * c)
    kl      = k1: logp - ref | k2: (logp - ref)^2 / 2 | k3: clamp(exp(ref - logp) - (ref - logp) - 1, -10, 10)
    loss_t  = pg + kl_coef * kl - entropy_coef * H
    loss    = sum_t w_t * loss_t, with weights from loss_mask m and sequences s (cu_seqlens):
              token-mean           w_t = m_t / sum(m)
              seq-mean-token-mean  w_t = m_t / (n_s * S),  n_s = sum of m over t's sequence
              seq-mean-token-sum   w_t = m_t / S
              where S counts sequences with n_s > 0. No masked token at all: loss = 0, zero gradient.

Metrics are token means over masked tokens (independent of the aggregation): `clipfrac` (share of
tokens where the clipped term is the larger, i.e. the clip is active), `clipfrac_lower` (share
where the dual clip is active), `kl`, `entropy`, `pg_loss`, `ratio_mean`, `ratio_max`,
`num_tokens` (masked tokens), `num_seqs` (sequences with a masked token). With no masked token every
metric is 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.loss_common import DEFAULT_LOSS_CONFIG, K3_CLAMP, KL_TYPES, LOG_RATIO_CLAMP, LOSS_AGGS, LossConfig
from kernels.utils import LossOutput


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """float32 [N] log-probs of `targets` under softmax(logits / T); with entropy [N] when asked.

    Half-precision and float32 logits are computed in float32; float64 logits stay float64 (a gold).
    """
    logp_all = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def aggregation_weights(
    loss_mask: torch.Tensor, cu_seqlens: torch.Tensor | None, loss_agg: str
) -> tuple[torch.Tensor, int]:
    """Per-token weights w [N] (float32) with loss = sum(w * loss_t), and the number of counted sequences."""
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    m = loss_mask.to(torch.float32)
    n = m.numel()
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32, device=m.device)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=m.device), lengths)
    # masked tokens per sequence as differences of a prefix sum (exact: integers below 2^24), a gather
    # rather than a scatter-add, which torch.compile's CPU backend fails to generate (torch 2.13)
    csum = torch.cat([m.new_zeros(1), m.cumsum(0)])
    per_seq = csum[cu_seqlens[1:].long()] - csum[cu_seqlens[:-1].long()]
    num_seqs = int((per_seq > 0).sum().item())
    if loss_agg == "token-mean":
        total = m.sum()
        w = m / total if total > 0 else torch.zeros_like(m)
    elif loss_agg == "seq-mean-token-mean":
        w = m / (per_seq[seq_id].clamp_min(1.0) * max(num_seqs, 1))
    else:
        w = m / max(num_seqs, 1)
    return w, num_seqs


def per_token_terms(
    logp: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    ref_logprobs: torch.Tensor | None,
    clip_low: float,
    clip_high: float,
    clip_ratio_c: float | None,
    kl_type: str,
) -> dict[str, torch.Tensor]:
    """ratio, pg, kl and the clip indicators per token (differentiable through `logp`)."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    A = advantages.to(logp.dtype)
    ratio = torch.exp((logp - old_logprobs.to(logp.dtype)).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = (pg2 > pg1).to(logp.dtype)
    lower = torch.zeros_like(pg)
    if clip_ratio_c is not None:
        pg3 = -A * clip_ratio_c
        lower = ((pg > pg3) & (A < 0)).to(logp.dtype)
        pg = torch.where(A < 0, torch.minimum(pg, pg3), pg)
    if ref_logprobs is None:
        kl = torch.zeros_like(logp)
    else:
        d = logp - ref_logprobs.to(logp.dtype)
        if kl_type == "k1":
            kl = d
        elif kl_type == "k2":
            kl = 0.5 * d * d
        else:
            kl = torch.clamp(torch.exp(-d) + d - 1.0, -K3_CLAMP, K3_CLAMP)
    return {"ratio": ratio, "pg": pg, "kl": kl, "clipped": clipped, "clipped_lower": lower}


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
) -> LossOutput:
    """Eager Flow-GRPO loss on materialised logits (float32 upcast, autograd backward)."""
    if config.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    logp, entropy = token_logprobs(logits, targets, temperature=config.temperature, return_entropy=True)
    t = per_token_terms(
        logp,
        old_logprobs.detach(),
        advantages.detach(),
        ref_logprobs=None if ref_logprobs is None else ref_logprobs.detach(),
        clip_low=config.clip_low,
        clip_high=config.clip_high,
        clip_ratio_c=config.clip_ratio_c,
        kl_type=config.kl_type,
    )
    loss_t = t["pg"] + config.kl_coef * t["kl"] - config.entropy_coef * entropy
    w, num_seqs = aggregation_weights(loss_mask, cu_seqlens, config.loss_agg)
    loss = (w * loss_t).sum()
    return LossOutput(loss=loss, metrics=loss_metrics(loss_mask, t, entropy, num_seqs))


def loss_metrics(
    loss_mask: torch.Tensor, terms: dict[str, torch.Tensor], entropy: torch.Tensor, num_seqs: int
) -> dict[str, float]:
    """Token means over masked tokens of the per-token terms (all 0 when nothing is masked)."""
    m = loss_mask.to(torch.bool)
    count = int(m.sum().item())
    if count == 0:
        keys = ("clipfrac", "clipfrac_lower", "kl", "entropy", "pg_loss", "ratio_mean", "ratio_max")
        return {**dict.fromkeys(keys, 0.0), "num_tokens": 0.0, "num_seqs": 0.0}

    def mean(x: torch.Tensor) -> float:
        return x.detach()[m].double().mean().item()

    return {
        "clipfrac": mean(terms["clipped"]),
        "clipfrac_lower": mean(terms["clipped_lower"]),
        "kl": mean(terms["kl"]),
        "entropy": mean(entropy),
        "pg_loss": mean(terms["pg"]),
        "ratio_mean": mean(terms["ratio"]),
        "ratio_max": terms["ratio"].detach()[m].max().item(),
        "num_tokens": float(count),
        "num_seqs": float(num_seqs),
    }


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`token_logprobs` on materialised logits `hidden @ weight.T + bias` (matmul in the input dtype)."""
    return token_logprobs(
        F.linear(hidden, weight, bias), targets, temperature=temperature, return_entropy=return_entropy
    )


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
) -> LossOutput:
    """`flow_grpo_loss` on materialised logits `hidden @ weight.T + bias` (matmul in the input dtype)."""
    return flow_grpo_loss(
        F.linear(hidden, weight, bias),
        targets,
        old_logprobs,
        advantages,
        loss_mask,
        config,
        cu_seqlens=cu_seqlens,
        ref_logprobs=ref_logprobs,
    )
