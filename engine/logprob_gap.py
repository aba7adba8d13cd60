"""Trainer-side log-probs of sampled tokens, and the rollout/trainer log-prob gap.

The rollout engine reports, for every sampled token, its log-prob under the distribution it
sampled from. The trainer recomputes the same quantity with its own forward pass:

    logp_trainer[t] = log_softmax(mask(logits[t] / T))[token[t]]

where `mask` keeps only `allowed_token_ids` (when set) and the top-k / top-p nucleus (when set:
sort ascending, drop the low tail whose cumulative probability is <= 1 - p, always keep the most
likely token), as vLLM's sampler does. Greedy (`T = 0`) uses `T = 1`, as vLLM does for its
reported log-probs. The gap over a batch is the mean and max over all sampled tokens of
`|logp_rollout - logp_trainer|`: ~1e-6 in float32 when both hold the same weights, large when the
engine runs stale weights. It is cheap enough to log at every step.

Simplification: one plain forward pass per sequence (prompt + response), keeping only the
response positions' logits (`logits_to_keep`); the packed-sequence fused path belongs to the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.rollout.protocol import Generation, SamplingConfig
from engine.rollout.sampling import processed_logprobs


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def trainer_logprobs(model: Any, generations: Sequence[Generation], sampling: SamplingConfig) -> list[torch.Tensor]:
    """Per generation, float32 [len(token_ids)] log-probs of its sampled tokens under `model`."""
    if not generations:
        raise ValueError("trainer_logprobs got no generations; pass the batch the engine returned")
    device = _model_device(model)
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    try:
        for i, g in enumerate(generations):
            if not g.prompt_ids:
                raise ValueError(f"generation {i} has an empty prompt; the trainer needs the prompt ids to score it")
            n = len(g.token_ids)
            ids = torch.tensor([g.prompt_ids + g.token_ids], dtype=torch.long, device=device)
            # Positions P-1 .. P+n-2 predict the n sampled tokens: the last n+1 positions minus the final one.
            # An empty generation still runs its forward: under FSDP every rank must run as many as the others.
            logits = model(input_ids=ids, logits_to_keep=n + 1).logits[0, :-1]  # [n, V]
            if n == 0:
                out.append(torch.zeros(0, dtype=torch.float32))
                continue
            logp = processed_logprobs(logits, sampling)
            tok = torch.tensor(g.token_ids, dtype=torch.long, device=device)
            out.append(logp.gather(-1, tok[:, None]).squeeze(-1).cpu())
    finally:
        model.train(was_training)
    return out


def logprob_gap(
    generations: Sequence[Generation], trainer: Sequence[torch.Tensor] | None = None, **score: Any
) -> dict[str, float]:
    """{"gap_mean", "gap_max", "num_tokens"} of |logp_rollout - logp_trainer| over all sampled tokens.

    Pass the trainer's log-probs (`trainer=` from `trainer_logprobs`), or `model=` and `sampling=`
    to compute them here.
    """
    if trainer is None:
        if set(score) != {"model", "sampling"}:
            raise TypeError("logprob_gap needs trainer= log-probs, or model= and sampling= to compute them")
        trainer = trainer_logprobs(score["model"], generations, score["sampling"])
    if len(trainer) != len(generations):
        raise ValueError(f"{len(generations)} generations but {len(trainer)} trainer log-prob rows")
    diffs = []
    for i, (g, t) in enumerate(zip(generations, trainer)):
        if len(g.logprobs) != t.numel():
            raise ValueError(f"generation {i}: {len(g.logprobs)} rollout log-probs but {t.numel()} trainer log-probs")
        diffs.append((torch.tensor(g.logprobs, dtype=torch.float64) - t.double().cpu()).abs())
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if d.numel() == 0:
        raise ValueError("the batch has no sampled tokens, so the log-prob gap is undefined")
    return {"gap_mean": float(d.mean()), "gap_max": float(d.max()), "num_tokens": int(d.numel())}
