"""Float64 golds shared by the kernel tests, written from the definitions (DESIGN.md "Loss"),
independently of `kernels` and of `kernels.reference` (which is checked against them too).

* `gold_logprobs`: log-probs, entropies and d logits of Σ grad_logp·logp + grad_entropy·H.
* `gold_loss`: the Flow-GRPO loss, metrics and d logits; aggregation weights by a plain Python
  loop over the sequences. Gradient conventions are autograd's: no gradient where the clipped term
  strictly dominates, where the dual clip is active, or where the k3 clamp is active.
* `gold_linear`: either of them on the materialised float64 logits hidden @ weight.T + bias, with
  d hidden, d weight, d bias by float64 autograd through the product.
* `make_inputs` / `make_linear_inputs`: inputs that exercise every branch of the loss.
* `loss_args`: keyword arguments of the loss ops, the hyperparameters gathered into a `LossConfig`
  (the golds take them as plain keywords).
"""

from __future__ import annotations

import dataclasses
import itertools

import torch

from kernels import LossConfig

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KLS = ("k1", "k2", "k3")
METRICS = (
    "clipfrac",
    "clipfrac_lower",
    "kl",
    "entropy",
    "pg_loss",
    "ratio_mean",
    "ratio_max",
    "num_tokens",
    "num_seqs",
)
# every (loss_agg, kl_type, dual clip) combination; entropy_coef alternates between 0 and 0.01
CONFIGS = [
    {"loss_agg": agg, "kl_type": kl, "clip_ratio_c": c, "entropy_coef": 0.01 * (i % 2), "kl_coef": 0.05}
    for i, (agg, kl, c) in enumerate(itertools.product(AGGS, KLS, (None, 3.0)))
]


LOSS_FIELDS = tuple(f.name for f in dataclasses.fields(LossConfig))


def loss_args(**kwargs):
    """`kwargs` of a loss op with the `LossConfig` fields among them replaced by `config=LossConfig(...)`."""
    fields = {k: kwargs.pop(k) for k in LOSS_FIELDS if k in kwargs}
    return {**kwargs, "config": LossConfig(**fields)}


def config_id(cfg):
    return f"{cfg['loss_agg']}-{cfg['kl_type']}-{'dual' if cfg['clip_ratio_c'] else 'nodual'}-ent{cfg['entropy_coef']}"


def gold_loss(
    logits,
    targets,
    old_logprobs,
    advantages,
    loss_mask,
    *,
    cu_seqlens=None,
    ref_logprobs=None,
    temperature=1.0,
    clip_low=0.2,
    clip_high=0.3,
    clip_ratio_c=None,
    kl_coef=0.0,
    kl_type="k3",
    entropy_coef=0.0,
    loss_agg="token-mean",
):
    """float64 (loss, metrics, d loss / d logits) from the definitions."""
    z = logits.detach().to(torch.float64).requires_grad_()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
    A = advantages.double()
    ratio = torch.exp((logp - old_logprobs.double()).clamp(-20, 20))  # verl's log-ratio clamp
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    lower = torch.zeros_like(clipped)
    if clip_ratio_c is not None:
        lower = (pg > -A * clip_ratio_c) & (A < 0)
        pg = torch.where(A < 0, torch.minimum(pg, -A * clip_ratio_c), pg)
    kl = torch.zeros_like(logp)
    if ref_logprobs is not None:
        d = logp - ref_logprobs.double()
        if kl_type == "k1":
            kl = d
        elif kl_type == "k2":
            kl = 0.5 * d**2
        else:
            kl = (torch.exp(-d) + d - 1).clamp(-10, 10)
    loss_t = pg + kl_coef * kl - entropy_coef * entropy

    n = logits.shape[0]
    m = [bool(b) for b in loss_mask.tolist()]
    bounds = [0, n] if cu_seqlens is None else cu_seqlens.tolist()
    seqs = [(s, e) for s, e in itertools.pairwise(bounds) if any(m[s:e])]
    w = [0.0] * n
    for s, e in seqs:
        n_s = sum(m[s:e])
        for t in range(s, e):
            if m[t]:
                w[t] = {
                    "token-mean": 1.0 / sum(m),
                    "seq-mean-token-mean": 1.0 / (n_s * len(seqs)),
                    "seq-mean-token-sum": 1.0 / len(seqs),
                }[loss_agg]
    loss = (torch.tensor(w, dtype=torch.float64, device=z.device) * loss_t).sum()
    (grad,) = torch.autograd.grad(loss, z)
    mb = torch.tensor(m, dtype=torch.bool, device=z.device)
    count = int(mb.sum())
    if count == 0:
        metrics = dict.fromkeys(METRICS, 0.0)
    else:
        metrics = {
            "clipfrac": clipped[mb].double().mean().item(),
            "clipfrac_lower": lower[mb].double().mean().item(),
            "kl": kl[mb].mean().item(),
            "entropy": entropy[mb].mean().item(),
            "pg_loss": pg[mb].mean().item(),
            "ratio_mean": ratio[mb].mean().item(),
            "ratio_max": ratio[mb].max().item(),
            "num_tokens": float(count),
            "num_seqs": float(len(seqs)),
        }
    return loss.detach(), metrics, grad


def make_inputs(n, v, dtype, seed=0, temperature=1.0, device="cpu"):
    """Logits, targets and per-token inputs that exercise every branch of the loss."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype)
    tensors = {"logits": logits, **per_token_inputs(logits.double(), g, temperature)}
    return {k: t.to(device) for k, t in tensors.items()}


def per_token_inputs(logits64, g, temperature):
    """Targets, old/ref log-probs, advantages, mask and cu_seqlens (CPU) for float64 logits [N, V].

    Ratios spread over [0.2, 5] (both clip sides and the dual clip at c = 3), advantages of both
    signs and exactly 0, ref log-probs ±2 nats away (k3 clamp active on some tokens), packed
    sequences of which one is fully masked and one empty.
    """
    n, v = logits64.shape
    targets = torch.randint(0, v, (n,), generator=g)
    logp_all = torch.log_softmax(logits64 / temperature, -1)
    logp = logp_all.gather(1, targets[:, None].to(logits64.device)).squeeze(1).cpu()
    old = (logp - (torch.rand(n, generator=g) * 3.2 - 1.6)).float()  # ratio in [0.2, 5]
    choices = torch.tensor([-1.5, -0.4, 0.0, 0.7, 2.0])
    adv = choices[torch.randint(0, len(choices), (n,), generator=g)]
    ref = (logp + torch.randn(n, generator=g) * 2).float()
    mask = torch.rand(n, generator=g) > 0.25
    if n >= 8:  # sequences: an empty one and a fully masked one among them
        cuts = sorted(torch.randint(1, n, (4,), generator=g).tolist())
        cu = [0, cuts[0], cuts[0], *cuts[1:], n]
        mask[cu[3] : cu[4]] = False
        cu_seqlens = torch.tensor(cu, dtype=torch.int32)
    else:
        mask[0] = True
        cu_seqlens = torch.tensor([0, n], dtype=torch.int32)
    return {
        "targets": targets,
        "old_logprobs": old,
        "advantages": adv,
        "loss_mask": mask,
        "cu_seqlens": cu_seqlens,
        "ref_logprobs": ref,
    }


def gold_logprobs(logits, targets, temperature, grad_logp=None, grad_entropy=None):
    """float64 (logp, entropy, d(Σ grad_logp·logp + grad_entropy·H)/d logits) from the definitions."""
    z = logits.detach().to(torch.float64).requires_grad_()
    logp_all = torch.log_softmax(z / temperature, dim=-1)
    p = logp_all.exp()
    logp = logp_all.gather(1, targets.long().unsqueeze(1)).squeeze(1)
    entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)  # p log p = 0 where p = 0
    grad = None
    if grad_logp is not None:
        obj = (grad_logp.double() * logp).sum()
        if grad_entropy is not None:
            obj = obj + (grad_entropy.double() * entropy).sum()
        (grad,) = torch.autograd.grad(obj, z)
    return logp.detach(), entropy.detach(), grad


def gold_linear(gold_fn, hidden, weight, bias, *args, **kwargs):
    """`gold_fn(logits, *args, **kwargs)` (`gold_loss` or `gold_logprobs`, whose last result is d logits)
    on the float64 logits hidden @ weight.T + bias; returns its results with d logits replaced by
    (d hidden, d weight, d bias or None), by float64 autograd through the product."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.T if b is None else h @ w.T + b
    *out, dlogits = gold_fn(logits.detach(), *args, **kwargs)
    if dlogits is None:  # gold_logprobs without grad_logp: forward values only
        return (*out, (None, None, None))
    logits.backward(dlogits)
    return (*out, tuple(None if x is None else x.grad for x in leaves))


def make_linear_inputs(n, d, v, dtype, seed=0, temperature=1.0, device="cpu", with_bias=True):
    """hidden [N, d], weight [V, d] (logits of std ≈ 2, as in `make_inputs`), bias [V] and the
    per-token inputs of `per_token_inputs` for the exact float64 logits of these values."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * (2.0 / d**0.5)).to(dtype)
    bias = (torch.randn(v, generator=g) * 0.5).to(dtype) if with_bias else None
    # on the test's device: at GPU-test sizes a float64 product on the CPU would take minutes
    logits64 = hidden.to(device, torch.float64) @ weight.to(device, torch.float64).T
    if bias is not None:
        logits64 += bias.to(device, torch.float64)
    tensors = {"hidden": hidden, "weight": weight, "bias": bias, **per_token_inputs(logits64, g, temperature)}
    return {k: None if t is None else t.to(device) for k, t in tensors.items()}
