"""What the two Flow-GRPO loss ops share: the hyperparameters, the per-token math, the stats, the inputs.

`flow_grpo_loss` (on logits) and `linear_flow_grpo_loss` (fused with the LM head) differ only in how
they obtain (lse, logp, H) per token; everything after that is here, once:

* `LossConfig` — the loss hyperparameters as one frozen dataclass, validated on construction (as
  Liger-Kernel's `LigerFusedLinearGRPOLoss` takes them in `__init__`); `KL_TYPES`, `LOSS_AGGS`.
* `flow_grpo_token_terms` — the per-token math (`kernels.reference` definitions) as a `@triton.jit`
  function on scalars or blocks: (loss_t, d loss_t/d logp, ratio, pg, kl, clipped, clipped_lower);
  `flow_grpo_token_terms_torch` is its torch twin. Both take unweighted terms; the caller applies
  w_t as `where(w ≠ 0, w·x, 0)` so masked tokens never turn an inf into a NaN:

      d loss_t / d logp = −A·ratio  where the unclipped term is the max (pg2 ≤ pg1), else 0
                                    (and 0 where the dual clip is active, or |logp − old| ≥ 20)
                        + kl_coef · (k1: 1 | k2: d | k3: 1 − e^{−d}, 0 where the clamp is active)
      d loss_t / d H    = −entropy_coef

* `write_token_stats` — loads a row's (or a block of rows') per-token inputs, evaluates
  `flow_grpo_token_terms` and stores the `STATS` (logp, lse, H, ratio, pg, kl, the clip indicators,
  w·loss_t and g_t = w·d loss_t/d logp, which it also returns); `token_stats_torch` is its torch twin. The loss is Σ w·loss_t.
* `aggregation_weights` — w [N] and the number of counted sequences as device tensors (no sync).
* `prepare_loss_inputs` — every check of the per-token inputs and their device-side preparation
  (`LossInputs`); `finalize_metrics` (via `LossInputs.metrics`) — metrics and the value checks of
  `kernels.validation` with one sync.
* `grad_coefficients` — the per-row coefficients of the backward (g on logp, h on H), which the
  log-prob ops' backward turns into d logits = g (onehot − p) − h p (log p + H), over T.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.utils import output_buffer
from kernels.validation import (
    check_cu_seqlens,
    check_loss_mask,
    check_per_token,
    check_targets,
    check_temperature,
    cu_seqlens_invalid,
)

KL_TYPES = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
K3_CLAMP = 10.0
LOG_RATIO_CLAMP = 20.0  # verl clamps logp - old_logp to [-20, 20] before the exp

# Rows of the [len(STATS), N] float32 tensor the forward writes.
STATS = ("logp", "lse", "entropy", "ratio", "pg", "kl", "clipped", "clipped_lower", "wloss", "dlogp")
LOGP, LSE, ENTROPY, RATIO, PG, KL, CLIPPED, CLIPPED_LOWER, WLOSS, DLOGP = range(len(STATS))
METRIC_KEYS = (
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


def _finite(name: str, value: object) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return x


@dataclass(frozen=True)
class LossConfig:
    """Hyperparameters of the Flow-GRPO loss (`kernels.reference` definitions), validated on construction.

    temperature: the logits are divided by it (the sampling temperature of the rollout);
    clip_low / clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high];
    clip_ratio_c: the dual clip bound c > 1 for A < 0, or None for no dual clip;
    kl_type / kl_coef: the KL estimator against the reference log-probs and its weight (kl_coef > 0
    needs ref_logprobs at the call); entropy_coef: weight of the entropy bonus (subtracted);
    loss_agg: how per-token losses are aggregated (token-mean, seq-mean-token-mean, seq-mean-token-sum).
    """

    temperature: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_ratio_c: float | None = None
    kl_type: str = "k3"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1) (ratio clipped below at 1 - clip_low), got {self.clip_low}")
        if self.clip_high < 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.clip_ratio_c is not None:
            c = _finite("clip_ratio_c", self.clip_ratio_c)
            if c <= 1.0:
                raise ValueError(f"clip_ratio_c (dual clip) must be a finite number > 1 or None, got {c}")
            object.__setattr__(self, "clip_ratio_c", c)
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.kl_coef < 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")

    @property
    def kl_type_id(self) -> int:
        return KL_TYPES.index(self.kl_type) + 1

    @property
    def kernel_scalars(self) -> tuple[float, ...]:
        """(clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef): the runtime arguments of kernels
        that call `write_token_stats`, in its order."""
        c = self.clip_ratio_c if self.clip_ratio_c is not None else 0.0
        return (self.clip_low, self.clip_high, c, self.kl_coef, self.entropy_coef)

    def kernel_constexprs(self, has_ref: bool) -> dict[str, object]:
        """HAS_REF, DUAL_CLIP and KL_TYPE of kernels that call `write_token_stats`."""
        return {"HAS_REF": has_ref, "DUAL_CLIP": self.clip_ratio_c is not None, "KL_TYPE": self.kl_type_id}


DEFAULT_LOSS_CONFIG = LossConfig()  # the ops' default: PPO clip 0.2 / 0.3, no KL, no entropy term, token-mean


@triton.jit
def flow_grpo_token_terms(
    logp,
    old_logp,
    adv,
    ref_logp,
    entropy,
    clip_low,
    clip_high,
    clip_ratio_c,
    kl_coef,
    entropy_coef,
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_TYPE: tl.constexpr,
):
    """Per-token Flow-GRPO terms (float32 scalars or blocks); KL_TYPE 1/2/3 = k1/k2/k3.

    Returns (loss_t, d loss_t / d logp, ratio, pg, kl, clipped, clipped_lower), unweighted.
    """
    log_ratio = logp - old_logp
    outside = (log_ratio <= -20.0) | (log_ratio >= 20.0)  # LOG_RATIO_CLAMP: the ratio is constant out there
    ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    pg = tl.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dpg = tl.where(clipped | outside, 0.0, -adv * ratio)  # the clipped term is constant in logp
    lower = tl.zeros_like(clipped)
    if DUAL_CLIP:
        pg3 = -adv * clip_ratio_c
        lower = (pg > pg3) & (adv < 0.0)
        pg = tl.where(lower, pg3, pg)
        dpg = tl.where(lower, 0.0, dpg)
    kl = 0.0
    dkl = 0.0
    if HAS_REF:
        d = logp - ref_logp
        if KL_TYPE == 1:
            kl = d
            dkl = 1.0
        elif KL_TYPE == 2:
            kl = 0.5 * d * d
            dkl = d
        else:
            e = tl.exp(-d)
            raw = e + d - 1.0
            kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)  # K3_CLAMP
            dkl = tl.where((raw >= -10.0) & (raw <= 10.0), 1.0 - e, 0.0)
    loss = pg + kl_coef * kl - entropy_coef * entropy
    dloss = dpg + kl_coef * dkl
    return loss, dloss, ratio, pg, kl, clipped, lower


def flow_grpo_token_terms_torch(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    ref_logp: torch.Tensor | None,
    entropy: torch.Tensor,
    config: LossConfig,
) -> tuple[torch.Tensor, ...]:
    """Torch twin of `flow_grpo_token_terms` on float32 [N] tensors (same outputs, same conventions)."""
    log_ratio = logp - old_logp
    inside = (log_ratio > -LOG_RATIO_CLAMP) & (log_ratio < LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1.0 - config.clip_low, 1.0 + config.clip_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dpg = torch.where(clipped | ~inside, 0.0, -adv * ratio)
    lower = torch.zeros_like(clipped)
    if config.clip_ratio_c is not None:
        pg3 = -adv * config.clip_ratio_c
        lower = (pg > pg3) & (adv < 0)
        pg = torch.where(lower, pg3, pg)
        dpg = torch.where(lower, 0.0, dpg)
    kl = torch.zeros_like(logp)
    dkl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = logp - ref_logp
        if config.kl_type == "k1":
            kl, dkl = d, torch.ones_like(d)
        elif config.kl_type == "k2":
            kl, dkl = 0.5 * d * d, d
        else:
            e = torch.exp(-d)
            raw = e + d - 1.0
            kl = raw.clamp(-K3_CLAMP, K3_CLAMP)
            dkl = torch.where((raw >= -K3_CLAMP) & (raw <= K3_CLAMP), 1.0 - e, 0.0)
    loss = pg + config.kl_coef * kl - config.entropy_coef * entropy
    dloss = dpg + config.kl_coef * dkl
    return loss, dloss, ratio, pg, kl, clipped, lower


def aggregation_weights(
    mask: torch.Tensor, cu_seqlens: torch.Tensor | None, config: LossConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 weights w [N] with loss = Σ w·loss_t, and the number of sequences with a masked token.

    Same semantics as `kernels.reference.aggregation_weights`, but both results stay on the device
    (no sync; with an invalid `cu_seqlens` the result is garbage, flagged by `cu_seqlens_invalid`).
    """
    m = mask.to(torch.float32)
    n = m.numel()
    if cu_seqlens is None:
        seq_id = torch.zeros(n, dtype=torch.long, device=m.device)
        num_seq_slots = 1
    else:
        num_seq_slots = cu_seqlens.numel() - 1
        pos = torch.arange(n, device=m.device)
        seq_id = torch.searchsorted(cu_seqlens[1:].long(), pos, right=True).clamp_max_(num_seq_slots - 1)
    per_seq = torch.zeros(num_seq_slots, dtype=torch.float32, device=m.device).index_add_(0, seq_id, m)
    num_seqs = (per_seq > 0).sum()
    if config.loss_agg == "token-mean":
        w = m / m.sum().clamp_min(1.0)
    elif config.loss_agg == "seq-mean-token-mean":
        w = m / (per_seq[seq_id].clamp_min(1.0) * num_seqs.clamp_min(1))
    else:
        w = m / num_seqs.clamp_min(1)
    return w, num_seqs


@triton.jit
def write_token_stats(
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
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_TYPE: tl.constexpr,
):
    """Load the per-token inputs of `rows` (a row index or a block of them), evaluate
    `flow_grpo_token_terms` and store the `STATS` columns of those rows (where `row_ok`).

    Returns g_t = w·d loss_t/d logp (the `DLOGP` column), for kernels that form d logits next."""
    old = tl.load(old_ptr + rows, mask=row_ok, other=0.0)
    adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0)
    ref = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + rows, mask=row_ok, other=0.0)
    w = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    loss, dloss, ratio, pg, kl, clipped, lower = flow_grpo_token_terms(
        logp,
        old,
        adv,
        ref,
        entropy,
        clip_low,
        clip_high,
        clip_ratio_c,
        kl_coef,
        entropy_coef,
        HAS_REF=HAS_REF,
        DUAL_CLIP=DUAL_CLIP,
        KL_TYPE=KL_TYPE,
    )
    counted = w != 0.0  # masked-out tokens contribute exactly 0, even where their terms are inf
    out = stats_ptr + rows
    tl.store(out + 0 * N, logp, mask=row_ok)
    tl.store(out + 1 * N, lse, mask=row_ok)
    tl.store(out + 2 * N, entropy, mask=row_ok)
    tl.store(out + 3 * N, ratio, mask=row_ok)
    tl.store(out + 4 * N, pg, mask=row_ok)
    tl.store(out + 5 * N, kl, mask=row_ok)
    tl.store(out + 6 * N, clipped.to(tl.float32), mask=row_ok)
    tl.store(out + 7 * N, lower.to(tl.float32), mask=row_ok)
    tl.store(out + 8 * N, tl.where(counted, w * loss, 0.0), mask=row_ok)
    g = tl.where(counted, w * dloss, 0.0)
    tl.store(out + 9 * N, g, mask=row_ok)
    return g


def token_stats_torch(
    logp: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    weights: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """Torch twin of `write_token_stats`: the float32 stats [len(STATS), N] from the per-token log-probs."""
    loss, dloss, ratio, pg, kl, clipped, lower = flow_grpo_token_terms_torch(
        logp, old_logprobs, advantages, ref_logprobs, entropy, config
    )
    counted = weights != 0
    stats = output_buffer((len(STATS), logp.shape[0]), dtype=torch.float32, device=logp.device)
    for i, x in enumerate(
        (
            logp,
            lse,
            entropy,
            ratio,
            pg,
            kl,
            clipped,
            lower,
            torch.where(counted, weights * loss, 0.0),
            torch.where(counted, weights * dloss, 0.0),
        )
    ):
        stats[i] = x
    return stats


def grad_coefficients(
    stats: torch.Tensor, weights: torch.Tensor, grad_loss: torch.Tensor, entropy_coef: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row coefficients (g on logp, h on H, or None) of d(grad_loss · loss): g = g_t·grad, h = −w·entropy_coef·grad."""
    g = stats[DLOGP] * grad_loss
    h = None if entropy_coef == 0.0 else weights * (-entropy_coef) * grad_loss
    return g, h


def finalize_metrics(
    stats: torch.Tensor,
    mask: torch.Tensor,
    num_seqs: torch.Tensor,
    *,
    per_token_inputs: dict[str, torch.Tensor | None],
    cu_invalid: torch.Tensor | None,
    mask_invalid: torch.Tensor | None,
    diagnose_rows: Callable[[torch.Tensor], None],
) -> dict[str, float]:
    """Metrics of `kernels.reference.loss_metrics` from the O(N) stats, and every value check, in one sync.

    Raises ValueError for an invalid cu_seqlens / loss_mask, non-finite log-probs (`diagnose_rows`
    is called with logp to name the rows and the cause) or non-finite per-token inputs on masked rows.
    """
    zero = torch.zeros((), dtype=torch.float64, device=stats.device)

    def msum(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.double(), 0.0).sum()

    ratio_max = torch.where(mask, stats[RATIO], float("-inf")).max().double()
    finite_inputs = torch.ones_like(mask)
    for x in per_token_inputs.values():
        if x is not None:
            finite_inputs &= torch.isfinite(x)
    vals = torch.stack(
        [
            mask.sum().double(),
            num_seqs.double(),
            msum(stats[CLIPPED]),
            msum(stats[CLIPPED_LOWER]),
            msum(stats[KL]),
            msum(stats[ENTROPY]),
            msum(stats[PG]),
            msum(stats[RATIO]),
            ratio_max,
            (~torch.isfinite(stats[LOGP])).sum().double(),
            (mask & ~finite_inputs).sum().double(),
            zero if cu_invalid is None else cu_invalid.double(),
            zero if mask_invalid is None else mask_invalid.double(),
        ]
    ).tolist()
    count, nseq, s_clip, s_lower, s_kl, s_ent, s_pg, s_ratio, r_max, bad_rows, bad_inputs, cu_bad, mask_bad = vals
    if cu_bad:
        raise ValueError("cu_seqlens must start at 0, end at N (the number of tokens) and never decrease")
    if mask_bad:
        raise ValueError("loss_mask must contain only 0 and 1 (or be a bool tensor)")
    if bad_rows:
        diagnose_rows(stats[LOGP])
    if bad_inputs:
        bad = (mask & ~finite_inputs).nonzero().flatten()[:8].tolist()
        names = [k for k, x in per_token_inputs.items() if x is not None and not torch.isfinite(x[mask]).all()]
        raise ValueError(f"non-finite values in {names} at masked tokens, e.g. rows {bad}")
    if count == 0:
        return {**dict.fromkeys(METRIC_KEYS, 0.0)}
    return {
        "clipfrac": s_clip / count,
        "clipfrac_lower": s_lower / count,
        "kl": s_kl / count,
        "entropy": s_ent / count,
        "pg_loss": s_pg / count,
        "ratio_mean": s_ratio / count,
        "ratio_max": r_max,
        "num_tokens": count,
        "num_seqs": nseq,
    }


@dataclass(frozen=True)
class LossInputs:
    """The checked, device-side inputs of one loss call besides the logits (or hidden states and LM head)."""

    config: LossConfig
    mask: torch.Tensor  # bool [N]
    weights: torch.Tensor  # float32 [N], `aggregation_weights`
    num_seqs: torch.Tensor  # 0-d, sequences with a masked token
    old: torch.Tensor  # float32 contiguous [N], no gradient
    adv: torch.Tensor
    ref: torch.Tensor | None
    cu_invalid: torch.Tensor | None  # 0-d flags, checked with the one sync
    mask_invalid: torch.Tensor | None

    def metrics(self, stats: torch.Tensor, diagnose_rows: Callable[[torch.Tensor], None]) -> dict[str, float]:
        """`finalize_metrics` of the stats a forward wrote (the call's one device→host sync)."""
        return finalize_metrics(
            stats,
            self.mask,
            self.num_seqs,
            per_token_inputs={"old_logprobs": self.old, "advantages": self.adv, "ref_logprobs": self.ref},
            cu_invalid=self.cu_invalid,
            mask_invalid=self.mask_invalid,
            diagnose_rows=diagnose_rows,
        )


def prepare_loss_inputs(
    n: int,
    device: torch.device,
    targets: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    config: LossConfig,
    *,
    cu_seqlens: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
) -> LossInputs:
    """Check the per-token inputs of a loss over N tokens (no sync) and prepare them (`config` is valid by
    construction; only its agreement with the inputs is checked here)."""
    check_targets(targets, n, device)
    check_per_token(old_logprobs, n, device, "old_logprobs")
    check_per_token(advantages, n, device, "advantages")
    check_per_token(ref_logprobs, n, device, "ref_logprobs")
    check_loss_mask(loss_mask, n, device)
    check_cu_seqlens(cu_seqlens, device)
    if config.kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs (the reference policy's log-probs of the targets)")
    mask = loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0
    mask_invalid = None if loss_mask.dtype == torch.bool else ((loss_mask != 0) & (loss_mask != 1)).any()
    weights, num_seqs = aggregation_weights(mask, cu_seqlens, config)

    def per_token(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x.detach().to(torch.float32).contiguous()

    return LossInputs(
        config=config,
        mask=mask,
        weights=weights,
        num_seqs=num_seqs,
        old=per_token(old_logprobs),
        adv=per_token(advantages),
        ref=per_token(ref_logprobs),
        cu_invalid=cu_seqlens_invalid(cu_seqlens, n),
        mask_invalid=mask_invalid,
    )
