"""The processed sampling distribution: the one definition rollout and training must agree on.

Given raw logits and a `SamplingConfig`, the distribution an engine samples from is: the logits
restricted to `allowed_token_ids` (the rest -inf), then, when sampling (T > 0), divided by T,
cut to the top-k and to the top-p nucleus (the most likely token always stays), then normalised.
Greedy decoding (T = 0) reports log-probs of the restricted softmax at temperature 1. The
embedded engine samples from it; the trainer's gap probes score with it; vLLM computes the same
quantity with `logprobs_mode="processed_logprobs"`.
"""

from __future__ import annotations

import torch

from agentflow.lm import SamplingConfig


def processed_logprobs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Float32 log-probs [N, V] of the distribution sampled from, given raw logits [N, V]."""
    logits = logits.float()
    vocab = logits.shape[-1]
    if sampling.allowed_token_ids is not None:
        allowed = torch.tensor(sampling.allowed_token_ids, dtype=torch.long, device=logits.device)
        if allowed.min() < 0 or allowed.max() >= vocab:
            raise ValueError(f"allowed_token_ids must lie in [0, {vocab}), got {sampling.allowed_token_ids}")
        keep = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        keep[allowed] = True
        logits = logits.masked_fill(~keep, float("-inf"))
    if sampling.temperature == 0:
        return torch.log_softmax(logits, dim=-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum <= 1.0 - sampling.top_p  # the low tail whose total mass is <= 1 - p
        drop[:, -1] = False  # the most likely token always stays
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.log_softmax(logits, dim=-1)
