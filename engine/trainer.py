"""The Flow-GRPO update of the planner: packed micro-batches, recomputed old/reference log-probs,
the fused LM-head loss, gradient accumulation, AdamW with grad-norm clipping.

`Trainer.update(sequences)` runs, for the planner turns of one step:

1. pack: the sequences are split into `mini_batches` contiguous mini-batches (1 = the whole step,
   one optimizer step per PPO epoch), each packed without padding into micro-batches of at most
   `micro_batch_tokens` tokens (`engine.packing`), moved to the model's device;
2. old log-probs: the current policy's log-probs of every response token, under no_grad (the
   trainer's recompute, the `old_logp` of the ratio; the rollout engine's own log-probs are kept
   only for the gap metric and the optional correction below). This pass runs only when more than
   one optimizer step follows the rollout (ppo_epochs × mini-batches > 1); with one step the
   policy has not moved when the loss is taken, so old_logp is the loss's own log-prob, detached
   (verl's on-policy case, ratio = 1): it is computed from the same hidden rows by the LM-head
   log-prob function alone, inside the update, and the decoder body runs once instead of twice;
3. reference log-probs from the frozen reference policy, only when kl_coef > 0 (the trainer then
   holds a deep copy of the initial model, or the `ref_model` it was given; with kl_coef = 0 no
   copy is made);
4. for each PPO epoch and mini-batch: per micro-batch, the decoder body on the packed tokens, the
   hidden rows at `loss_positions` (response tokens only), the linear loss with the LM-head
   weight, backward of the loss times a scale that makes the accumulated gradient exactly that of
   the loss aggregated over the whole mini-batch:
       token-mean:            scale = masked tokens in the micro-batch / in the mini-batch
       seq-mean-token-mean/-sum: scale = sequences in the micro-batch / in the mini-batch
   then grad-norm clipping (the norm before clipping is reported) and one AdamW step. A
   non-finite gradient norm skips the step (counted in `actor/skipped_steps`).

Truncated importance sampling (`tis_cap`): with rollout log-probs from another engine, tokens are
weighted by w = min(exp(old_trainer − rollout), tis_cap). Since every pg form here is positively
homogeneous in A (max(−A·r, −A·clip(r)) and the dual clip min(·, −A·c), with A·w < 0 ⇔ A < 0),
w·pg(A) = pg(A·w) exactly, so the weight is folded into the advantage passed to the loss.

Restricted action vocabulary (`allowed_token_ids`): when the rollout engine samples the planner
under constrained decoding (`SamplingConfig.allowed_token_ids`), its log-probs are those of the
softmax renormalised over the allowed ids. The trainer computes the same distribution exactly and
cheaply by slicing the LM head to the allowed rows (`weight[allowed]`, bias likewise) and remapping
the targets to their row in that slice; the loss then never sees the other rows, and gradients
flow into the allowed rows of the (possibly tied) weight only. Entropy is that of the restricted
distribution. A response token outside the set is an error (the sampling and the trainer disagree).

Several ranks (`dp`, FSDP2): every forward is a collective (each layer's parameters are gathered),
so every rank must run as many as the others. Ranks pack different turns into different numbers of
micro-batches; `prepare` takes the largest count per mini-batch over the ranks and the others run
the difference as padding passes on their first micro-batch, whose output is
0 · (Σ hidden + Σ LM-head weight): every parameter takes part, every gradient it adds is exactly zero.

Loss implementations: "fused" calls `kernels.linear_flow_grpo_loss` / `kernels.linear_token_logprobs`
(never materialise [N, V]); "reference" calls the plain-torch definitions in `kernels.reference`.
Both take the loss hyperparameters as one `kernels.LossConfig` (`TrainerConfig.loss`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from agentflow.timing import NO_TIMER, Timer
from engine.attention import enable_packed_attention
from engine.model import attach_packed_forward, flops_per_token, forward_flops, lm_head_weight, resolve_dtype
from engine.packing import MicroBatch, TrainSequence, pack
from engine.parallelize import SINGLE, DataParallel
from kernels import LossConfig

__all__ = ["TrainBatch", "Trainer", "TrainerConfig", "flops_per_token"]

LOSS_IMPLS = ("fused", "reference")
LM_HEAD_ALGORITHMS = ("auto", "fused", "chunked")  # kernels.linear_chunked.ALGORITHMS


@dataclass
class TrainerConfig:
    """Optimisation and loss settings (AgentFlow defaults: lr 1e-6, clip 0.2/0.3, k3 KL at 0.001, token-mean).

    The loss fields (those of `kernels.LossConfig`: temperature, clip_low, clip_high, clip_ratio_c,
    kl_type, kl_coef, entropy_coef, loss_agg) are validated by `LossConfig` and reach the loss as
    `self.loss`, one frozen `LossConfig`.
    """

    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_tokens: int = 8192
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_ratio_c: float | None = None
    kl_coef: float = 0.001
    kl_type: str = "k3"
    entropy_coef: float = 0.0
    loss_agg: str = "token-mean"
    temperature: float = 1.0
    tis_cap: float | None = None
    loss_impl: str = "fused"
    lm_head_algorithm: str = "auto"  # fused's LM head: "fused" kernels, "chunked" GEMMs + epilogue, "auto" per device
    compute_dtype: str | None = None
    gradient_checkpointing: bool = False
    allowed_token_ids: tuple[int, ...] | None = None  # constrained decoding's action set (module doc)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = tuple(int(t) for t in self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise ValueError("allowed_token_ids must be None (whole vocabulary) or non-empty")
            if len(set(self.allowed_token_ids)) != len(self.allowed_token_ids):
                raise ValueError(f"allowed_token_ids has duplicates: {self.allowed_token_ids}")
            if min(self.allowed_token_ids) < 0:
                raise ValueError(f"allowed_token_ids must be >= 0, got {self.allowed_token_ids}")
        checks = [
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.ppo_epochs >= 1, f"ppo_epochs must be >= 1, got {self.ppo_epochs}"),
            (self.mini_batches >= 1, f"mini_batches must be >= 1, got {self.mini_batches}"),
            (self.micro_batch_tokens >= 2, f"micro_batch_tokens must be >= 2, got {self.micro_batch_tokens}"),
            (self.tis_cap is None or self.tis_cap > 0, f"tis_cap must be > 0 or None, got {self.tis_cap}"),
            (self.loss_impl in LOSS_IMPLS, f"loss_impl must be one of {LOSS_IMPLS}, got {self.loss_impl!r}"),
            (
                self.lm_head_algorithm in LM_HEAD_ALGORITHMS,
                f"lm_head_algorithm must be one of {LM_HEAD_ALGORITHMS}, got {self.lm_head_algorithm!r}",
            ),
            (self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.compute_dtype is not None:
            resolve_dtype(self.compute_dtype)
        _ = self.loss  # LossConfig validates the loss fields (one line naming a bad one)

    @property
    def loss(self) -> LossConfig:
        """The loss hyperparameters as the kernels' frozen, validated `LossConfig`."""
        return LossConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig)})


def loss_functions(impl: str, algorithm: str = "auto") -> tuple[Callable, Callable]:
    """(linear_flow_grpo_loss, linear_token_logprobs) of the chosen implementation; for "fused", with the
    LM-head `algorithm` of `kernels.linear_chunked.ALGORITHMS` bound."""
    if impl == "reference":
        from kernels import reference

        return reference.linear_flow_grpo_loss, reference.linear_token_logprobs
    if impl != "fused":
        raise ValueError(f"loss_impl must be one of {LOSS_IMPLS}, got {impl!r}")
    import kernels

    loss = getattr(kernels, "linear_flow_grpo_loss", None)
    logprobs = getattr(kernels, "linear_token_logprobs", None)
    if loss is None or logprobs is None:
        raise RuntimeError(
            "loss_impl='fused' needs kernels.linear_flow_grpo_loss and kernels.linear_token_logprobs, which this "
            "build of `kernels` does not provide; use loss_impl='reference'"
        )
    return functools.partial(loss, algorithm=algorithm), functools.partial(logprobs, algorithm=algorithm)


@dataclass
class TrainBatch:
    """One step's sequences packed per mini-batch (on the device), with their per-micro-batch log-probs."""

    sequences: list[TrainSequence]
    mini_batches: list[list[MicroBatch]]
    old_logprobs: list[list[torch.Tensor]] | None = None
    ref_logprobs: list[list[torch.Tensor]] | None = None
    advantages: list[list[torch.Tensor]] | None = None  # after the optional TIS weighting
    tis_weights: list[torch.Tensor] = field(default_factory=list)
    on_policy_old: list[tuple[MicroBatch, torch.Tensor]] = field(default_factory=list)  # no separate old pass
    pad: list[int] = field(default_factory=list)  # per mini-batch: discarded passes that even out FSDP's collectives
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def micro_batches(self) -> list[MicroBatch]:
        return [mb for mini in self.mini_batches for mb in mini]

    @property
    def pads(self) -> list[int]:
        return self.pad or [0] * len(self.mini_batches)


def _item(norm: torch.Tensor) -> float:
    """A grad norm as a float; FSDP2's is a DTensor holding the global norm."""
    full = getattr(norm, "full_tensor", None)
    return (full() if callable(full) else norm).item()


def _split_contiguous(n: int, k: int) -> list[range]:
    k = min(k, n)
    base, extra = divmod(n, k)
    out, start = [], 0
    for i in range(k):
        size = base + (1 if i < extra else 0)
        out.append(range(start, start + size))
        start += size
    return out


class Trainer:
    """Flow-GRPO updates of `model` (a transformers causal LM) with AdamW; see the module doc."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainerConfig,
        ref_model: torch.nn.Module | None = None,
        dp: DataParallel = SINGLE,
    ) -> None:
        self.model = model
        self.config = config
        self.dp = dp
        attach_packed_forward(model)
        self.loss_config = config.loss
        self.loss_fn, self.logprob_fn = loss_functions(config.loss_impl, config.lm_head_algorithm)
        enable_packed_attention(model)
        if config.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.loss_config.kl_coef == 0.0:
            if ref_model is not None:
                raise ValueError("ref_model given but kl_coef = 0: the reference policy would never be used")
            self.ref_model = None
        else:
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.requires_grad_(False)
            self.ref_model.eval()
            enable_packed_attention(self.ref_model)
            attach_packed_forward(self.ref_model)
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.lr,
            betas=config.betas,
            eps=config.eps,
            weight_decay=config.weight_decay,
            fused=self.device.type == "cuda",
        )
        self.compute_dtype = resolve_dtype(config.compute_dtype) if config.compute_dtype else None
        self._allowed: torch.Tensor | None = None
        self._remap: torch.Tensor | None = None
        if config.allowed_token_ids is not None:
            vocab = lm_head_weight(model).shape[0]
            if max(config.allowed_token_ids) >= vocab:
                raise ValueError(
                    f"allowed_token_ids {config.allowed_token_ids} reach beyond the LM head's {vocab} rows"
                )
            self._allowed = torch.tensor(config.allowed_token_ids, dtype=torch.long, device=self.device)
            self._remap = torch.full((vocab,), -1, dtype=torch.long, device=self.device)
            self._remap[self._allowed] = torch.arange(len(config.allowed_token_ids), device=self.device)

    # ---- pieces of one update (each usable on its own, e.g. to time them separately) ----

    def prepare(self, sequences: Sequence[TrainSequence]) -> TrainBatch:
        """Split into mini-batches, pack each under the token budget, move to the device."""
        sequences = list(sequences)
        # decided together: a rank raising alone would leave the others waiting in a collective
        fewest = -int(self.dp.all_max(-len(sequences))) if self.dp.enabled else len(sequences)
        if fewest == 0:
            where = " on some rank" if self.dp.enabled else ""
            raise ValueError(f"no sequences to train on{where}: the step produced no planner turns")
        if self.config.allowed_token_ids is not None:
            allowed = set(self.config.allowed_token_ids)
            for i, s in enumerate(sequences):
                bad = [t for t in s.response_ids if t not in allowed]
                if bad:
                    raise ValueError(
                        f"sequence {i} (trajectory {s.traj_id}, turn {s.turn}) has response token {bad[0]} outside "
                        f"allowed_token_ids {self.config.allowed_token_ids}: the rollout sampled from another action "
                        f"set than the trainer's (set the same allowed ids on both)"
                    )
        minis = []
        for idx in _split_contiguous(len(sequences), self.config.mini_batches):
            sub = [sequences[i] for i in idx]
            mbs = pack(sub, self.config.micro_batch_tokens)
            minis.append(
                [
                    dataclasses.replace(mb, seq_indices=tuple(idx[i] for i in mb.seq_indices)).to(self.device)
                    for mb in mbs
                ]
            )
        return TrainBatch(sequences=sequences, mini_batches=minis, pad=self._padding(minis))

    def _padding(self, minis: list[list[MicroBatch]]) -> list[int]:
        """Extra passes per mini-batch so every rank runs as many FSDP forwards (collectives) as the busiest."""
        if not self.dp.enabled:
            return [0] * len(minis)
        most, fewest = int(self.dp.all_max(len(minis))), -int(self.dp.all_max(-len(minis)))
        if fewest != most:  # the same error on every rank (none is left waiting in a collective)
            raise RuntimeError(
                f"the ranks have {fewest} to {most} mini-batches: every rank needs at least "
                f"mini_batches={self.config.mini_batches} planner turns; lower --mini-batches or raise B x G"
            )
        return [int(self.dp.all_max(len(m))) - len(m) for m in minis]

    def _padding_pass(self, mb: MicroBatch, model: torch.nn.Module, backward: bool) -> None:
        """One forward (and backward) through every parameter that contributes exactly zero (module doc)."""

        def head(h, w, b):
            h, w, b = self._head(h, w, b)
            return (h.sum() + w.sum() + (0.0 if b is None else b.sum())) * 0.0

        with torch.no_grad() if not backward else contextlib.nullcontext(), self._autocast():
            out = model.packed_forward(mb, head)
        if backward:
            out.backward()

    def _autocast(self):
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def _head(
        self, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Response hidden rows and LM-head weight/bias (restricted to the allowed rows) in one dtype."""
        if self._allowed is not None:
            w = w.index_select(0, self._allowed)
            b = None if b is None else b.index_select(0, self._allowed)
        dt = self.compute_dtype or h.dtype
        return h.to(dt), w.to(dt), None if b is None else b.to(dt)

    def _targets(self, mb: MicroBatch) -> torch.Tensor:
        """The response tokens as rows of the (possibly restricted) LM head."""
        return mb.targets if self._remap is None else self._remap[mb.targets]

    @torch.no_grad()
    def compute_logprobs(
        self, micro_batches: Sequence[MicroBatch], model: torch.nn.Module | None = None, pad: int = 0
    ) -> list[torch.Tensor]:
        """float32 log-probs [R] of each micro-batch's response tokens under `model` (default: the policy);
        `pad` discarded passes after them (`TrainBatch.pad`)."""
        model = self.model if model is None else model
        out = []
        with self._autocast():
            for mb in micro_batches:

                def head(h, w, b, mb=mb):
                    h, w, b = self._head(h, w, b)
                    return self.logprob_fn(h, w, self._targets(mb), bias=b, temperature=self.loss_config.temperature)

                out.append(model.packed_forward(mb, head).float())
        for _ in range(pad):
            self._padding_pass(micro_batches[0], model, backward=False)
        return out

    def recompute_old(self, batch: TrainBatch) -> bool:
        """Whether old log-probs need their own pass: more than one optimizer step follows the rollout (module doc)."""
        return self.config.ppo_epochs * len(batch.mini_batches) > 1

    def _on_policy_old(self, batch: TrainBatch, mb: MicroBatch, h, w, b) -> tuple[torch.Tensor, torch.Tensor]:
        """(old log-probs, advantages) of one micro-batch when no old pass ran: the LM-head log-probs of the
        update's own hidden rows, detached, kept on `batch` for the gap and TIS metrics."""
        with torch.no_grad():
            old = self.logprob_fn(
                h.detach(),
                w.detach(),
                self._targets(mb),
                bias=None if b is None else b.detach(),
                temperature=self.loss_config.temperature,
            ).float()
        batch.on_policy_old.append((mb, old))
        return old, self._weighted_advantages(batch, mb, old)

    def compute_old_logprobs(self, batch: TrainBatch) -> None:
        """Old-policy log-probs (trainer recompute), the rollout/trainer gap, and the TIS-weighted advantages."""
        batch.old_logprobs = [self.compute_logprobs(mini, pad=p) for mini, p in zip(batch.mini_batches, batch.pads)]
        batch.advantages = [
            [self._weighted_advantages(batch, mb, old) for mb, old in zip(mini, olds)]
            for mini, olds in zip(batch.mini_batches, batch.old_logprobs)
        ]
        self._old_logprob_metrics(batch)

    def _weighted_advantages(self, batch: TrainBatch, mb: MicroBatch, old: torch.Tensor) -> torch.Tensor:
        cap = self.config.tis_cap
        if cap is None:
            return mb.advantages
        w = torch.exp(old - mb.rollout_logprobs).clamp(max=cap)
        batch.tis_weights.append(w)
        return mb.advantages * w

    def _old_logprob_metrics(self, batch: TrainBatch) -> None:
        """The rollout/trainer gap and the TIS weights, over every micro-batch's old log-probs."""
        pairs = batch.on_policy_old or [
            (mb, old) for mini, olds in zip(batch.mini_batches, batch.old_logprobs or []) for mb, old in zip(mini, olds)
        ]
        gaps = torch.cat([(mb.rollout_logprobs - old).abs() for mb, old in pairs])
        batch.metrics["training/rollout_logprob_diff_mean"] = gaps.double().mean().item()
        batch.metrics["training/rollout_logprob_diff_max"] = gaps.max().item()
        if batch.tis_weights:
            w = torch.cat(batch.tis_weights)
            batch.metrics["actor/tis_weight_mean"] = w.double().mean().item()
            batch.metrics["actor/tis_capped_frac"] = (w >= self.config.tis_cap).double().mean().item()

    def compute_ref_logprobs(self, batch: TrainBatch) -> None:
        """Reference-policy log-probs (only when kl_coef > 0)."""
        if self.ref_model is None:
            batch.ref_logprobs = None
            return
        batch.ref_logprobs = [
            self.compute_logprobs(mini, self.ref_model, pad=p) for mini, p in zip(batch.mini_batches, batch.pads)
        ]

    def accumulate_gradients(self, batch: TrainBatch, mini: int = 0) -> dict[str, float]:
        """Forward + backward over every micro-batch of mini-batch `mini`, adding into `.grad`.

        Each micro-batch loss is scaled so that the accumulated gradient equals the gradient of the
        loss aggregated over the whole mini-batch (module doc). Returns the (scaled) total loss and
        token-weighted sums of the loss metrics.
        """
        if (batch.old_logprobs is None or batch.advantages is None) and self.recompute_old(batch):
            raise ValueError("compute_old_logprobs(batch) must run before an update of more than one optimizer step")
        if self.loss_config.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0: compute_ref_logprobs(batch) must run before the update")
        mbs = batch.mini_batches[mini]
        # the global denominators: over every rank's micro-batches of this mini-batch
        token_mean = self.loss_config.loss_agg == "token-mean"
        total_tokens = self.dp.all_sum(sum(mb.num_response_tokens for mb in mbs))
        total_seqs = self.dp.all_sum(sum(mb.num_seqs for mb in mbs))
        acc = {"loss": 0.0, "tokens": 0.0, "ratio_max": -math.inf}
        for j, mb in enumerate(mbs):
            ref = None if batch.ref_logprobs is None else batch.ref_logprobs[mini][j]

            def head(h, w, b, mb=mb, j=j, ref=ref):
                h, w, b = self._head(h, w, b)
                if batch.old_logprobs is None:
                    old, adv = self._on_policy_old(batch, mb, h, w, b)
                else:
                    old, adv = batch.old_logprobs[mini][j], batch.advantages[mini][j]
                out = self.loss_fn(
                    h,
                    w,
                    self._targets(mb),
                    old,
                    adv,
                    torch.ones_like(mb.targets, dtype=torch.bool),
                    self.loss_config,
                    bias=b,
                    cu_seqlens=mb.response_cu_seqlens,
                    ref_logprobs=ref,
                )
                return out.loss, out.metrics

            with self._autocast():
                loss, metrics = self.model.packed_forward(mb, head)
            local, total = (mb.num_response_tokens, total_tokens) if token_mean else (mb.num_seqs, total_seqs)
            (loss * self.dp.scale(local, total)).backward()
            acc["loss"] += loss.detach().item() * local / total
            n = metrics["num_tokens"]
            acc["tokens"] += n
            for key in ("pg_loss", "clipfrac", "clipfrac_lower", "kl", "entropy", "ratio_mean"):
                acc[key] = acc.get(key, 0.0) + metrics[key] * n
            acc["ratio_max"] = max(acc["ratio_max"], metrics["ratio_max"])
        for _ in range(batch.pads[mini]):
            self._padding_pass(mbs[0], self.model, backward=True)
        return acc

    def train(self, batch: TrainBatch) -> dict[str, float]:
        """PPO epochs over the mini-batches: accumulate exact gradients over micro-batches, clip, AdamW step."""
        cfg = self.config
        self.model.train()
        keys = ("pg_loss", "clipfrac", "clipfrac_lower", "kl", "entropy", "ratio_mean")
        sums = dict.fromkeys(keys, 0.0)
        tokens_seen = 0.0
        ratio_max = -math.inf
        losses, norms, skipped = [], [], 0
        clip = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        for _ in range(cfg.ppo_epochs):
            for m in range(len(batch.mini_batches)):
                self.optimizer.zero_grad(set_to_none=True)
                acc = self.accumulate_gradients(batch, m)
                for k in keys:
                    sums[k] += acc[k]
                tokens_seen += acc["tokens"]
                ratio_max = max(ratio_max, acc["ratio_max"])
                losses.append(self.dp.all_sum(acc["loss"]))
                norm = _item(torch.nn.utils.clip_grad_norm_(self.params, clip))
                norms.append(norm)
                if math.isfinite(norm):
                    self.optimizer.step()
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
        sums = {k: self.dp.all_sum(v) for k, v in sums.items()}
        tokens_seen, ratio_max = self.dp.all_sum(tokens_seen), self.dp.all_max(ratio_max)
        mean = {k: (v / tokens_seen if tokens_seen else 0.0) for k, v in sums.items()}
        return {
            "actor/loss": sum(losses) / len(losses),
            "actor/pg_loss": mean["pg_loss"],
            "actor/pg_clipfrac": mean["clipfrac"],
            "actor/pg_clipfrac_lower": mean["clipfrac_lower"],
            "actor/kl_loss": mean["kl"],
            "actor/kl_coef": self.loss_config.kl_coef,
            "actor/entropy": mean["entropy"],
            "actor/ratio_mean": mean["ratio_mean"],
            "actor/ratio_max": ratio_max,
            "actor/grad_norm": sum(norms) / len(norms),
            "actor/grad_norm_max": max(norms),
            "actor/skipped_steps": float(skipped),
            "actor/optimizer_steps": float(len(norms) - skipped),
            "actor/lr": self.optimizer.param_groups[0]["lr"],
        }

    # ---- the whole update ----

    def update(self, sequences: Sequence[TrainSequence], timer: Timer = NO_TIMER) -> dict[str, float]:
        """One Flow-GRPO update on the step's planner turns; returns float metrics.

        Keys: the loss terms of `train` (actor/loss, pg_loss, pg_clipfrac, pg_clipfrac_lower, kl_loss,
        kl_coef, entropy, ratio_mean, ratio_max, grad_norm, grad_norm_max, skipped_steps,
        optimizer_steps, lr: token means over all epochs and mini-batches, grad norms before
        clipping); training/rollout_logprob_diff_mean and _max (|rollout − trainer old log-prob| over
        response tokens); actor/tis_weight_mean and tis_capped_frac when tis_cap is set; batch sizes
        (actor/num_seqs, num_tokens = response tokens, num_packed_tokens, num_micro_batches,
        num_mini_batches, packing_efficiency, zero_adv_seqs); perf/train_flops (update, model FLOPs) and
        perf/logprob_flops (old + ref passes).

        `timer` (an `engine.timer.PhaseTimer`) times the phases pack, old_log_prob, ref, update_actor;
        throughput and MFU are derived from those times by the step record (`engine.metrics`).
        """
        with timer.phase("pack"):
            batch = self.prepare(sequences)
        if self.recompute_old(batch):
            with timer.phase("old_log_prob"):
                self.compute_old_logprobs(batch)
        if self.ref_model is not None:
            with timer.phase("ref"):
                self.compute_ref_logprobs(batch)
        with timer.phase("update_actor"):
            metrics = self.train(batch)
        if batch.on_policy_old:
            self._old_logprob_metrics(batch)

        mbs = batch.micro_batches
        cfg_model = self.model.config
        fwd = sum(forward_flops(cfg_model, mb.seq_lens, mb.num_response_tokens) for mb in mbs)
        packed = sum(mb.num_tokens for mb in mbs)
        metrics.update(batch.metrics)
        metrics.update(
            {
                "actor/num_seqs": float(len(batch.sequences)),
                "actor/num_tokens": float(sum(mb.num_response_tokens for mb in mbs)),
                "actor/num_packed_tokens": float(packed),
                "actor/num_micro_batches": float(len(mbs)),
                "actor/num_mini_batches": float(len(batch.mini_batches)),
                "actor/packing_efficiency": packed / (len(mbs) * self.config.micro_batch_tokens),
                "actor/zero_adv_seqs": float(sum(s.advantage == 0.0 for s in batch.sequences)),
                "perf/train_flops": 3.0 * fwd * self.config.ppo_epochs,
                "perf/logprob_flops": fwd * ((self.ref_model is not None) + self.recompute_old(batch)),
                "actor/old_logprob_fused": float(bool(batch.on_policy_old)),
            }
        )
        return metrics
