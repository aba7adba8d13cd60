"""Training sequences and their packing into padding-free micro-batches under a token budget.

Every planner turn becomes one `TrainSequence` (prompt + response, with the rollout engine's
sampling log-probs and the trajectory's advantage). `pack` concatenates whole sequences into
micro-batches of at most `token_budget` tokens, first-fit-decreasing by length (longest sequences
first, each into the first micro-batch with room), with no padding anywhere:

    input_ids     [T]    the sequences back to back
    position_ids  [T]    0, 1, ... restarting at every sequence start (rotary embeddings see each
                         sequence as if alone)
    cu_seqlens    [S+1]  int32 sequence boundaries in T, for varlen attention
    loss_positions[R]    the row of the hidden states that predicts each response token:
                         row start + len(prompt) - 1 + i for response token i
    targets       [R]    the response tokens themselves
    advantages, rollout_logprobs [R]   per response token (the advantage broadcast over the turn)
    response_cu_seqlens [S+1]          boundaries of each sequence's response tokens in R, for the
                                       loss aggregation over sequences

Only the R response rows are ever gathered for the LM head, so prompt positions never reach the
vocabulary projection. A sequence needs at least one prompt token (its first response token is
predicted from the last prompt row) and at least one response token. A sequence longer than the
budget is an error naming the knob; nothing is truncated or dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class TrainSequence:
    """One planner turn to train on: the token ids, the rollout's log-probs, the trajectory's advantage."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    rollout_logprobs: Sequence[float]
    advantage: float
    traj_id: int = -1
    group_id: int = -1
    turn: int = 0

    def __post_init__(self) -> None:
        self.prompt_ids = [int(t) for t in self.prompt_ids]
        self.response_ids = [int(t) for t in self.response_ids]
        self.rollout_logprobs = [float(x) for x in self.rollout_logprobs]
        self.advantage = float(self.advantage)
        where = f"sequence (trajectory {self.traj_id}, turn {self.turn})"
        if not self.prompt_ids:
            raise ValueError(f"{where}: empty prompt; the first response token is predicted from the last prompt token")
        if not self.response_ids:
            raise ValueError(f"{where}: empty response; a planner turn with no generated token has nothing to train")
        if len(self.rollout_logprobs) != len(self.response_ids):
            raise ValueError(
                f"{where}: {len(self.response_ids)} response tokens but {len(self.rollout_logprobs)} rollout log-probs"
            )
        if not math.isfinite(self.advantage):
            raise ValueError(f"{where}: advantage is {self.advantage}; advantages must be finite")
        if not all(math.isfinite(x) for x in self.rollout_logprobs):
            raise ValueError(f"{where}: non-finite rollout log-prob; the rollout engine returned NaN/inf")

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass
class MicroBatch:
    """Packed sequences: the model input [T] and the response-token view [R] for the loss (see module doc)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    loss_positions: torch.Tensor
    targets: torch.Tensor
    advantages: torch.Tensor
    rollout_logprobs: torch.Tensor
    response_cu_seqlens: torch.Tensor
    seq_of_token: torch.Tensor
    seq_indices: tuple[int, ...]
    seq_lens: tuple[int, ...]
    prompt_lens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_response_tokens(self) -> int:
        return int(self.targets.numel())

    @property
    def num_seqs(self) -> int:
        return len(self.seq_indices)

    @property
    def response_lens(self) -> tuple[int, ...]:
        return tuple(s - p for s, p in zip(self.seq_lens, self.prompt_lens))

    @property
    def cu_seqlens_host(self) -> tuple[int, ...]:
        out = [0]
        for n in self.seq_lens:
            out.append(out[-1] + n)
        return tuple(out)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MicroBatch:
        """A copy with every tensor on `device` (host tuples unchanged)."""
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            moved[f.name] = v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        return MicroBatch(**moved)


def _first_fit_decreasing(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Bins of indices with sum(lengths) <= budget; longest first, each into the first bin with room."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(budget - lengths[i])
    return [sorted(b) for b in bins]


def build_micro_batch(sequences: Sequence[TrainSequence], indices: Sequence[int]) -> MicroBatch:
    """Concatenate `sequences[i] for i in indices` into one MicroBatch (no budget check)."""
    if not indices:
        raise ValueError("a micro-batch needs at least one sequence")
    ids: list[int] = []
    pos: list[int] = []
    loss_pos: list[int] = []
    targets: list[int] = []
    adv: list[float] = []
    lp: list[float] = []
    seq_of: list[int] = []
    cu = [0]
    rcu = [0]
    seq_lens, prompt_lens = [], []
    for local, i in enumerate(indices):
        s = sequences[i]
        start, p, r = len(ids), len(s.prompt_ids), len(s.response_ids)
        ids += s.prompt_ids + s.response_ids
        pos += range(p + r)
        loss_pos += range(start + p - 1, start + p - 1 + r)
        targets += s.response_ids
        adv += [s.advantage] * r
        lp += s.rollout_logprobs
        seq_of += [local] * r
        cu.append(len(ids))
        rcu.append(len(targets))
        seq_lens.append(p + r)
        prompt_lens.append(p)
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.long),
        position_ids=torch.tensor(pos, dtype=torch.long),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        max_seqlen=max(seq_lens),
        loss_positions=torch.tensor(loss_pos, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        advantages=torch.tensor(adv, dtype=torch.float32),
        rollout_logprobs=torch.tensor(lp, dtype=torch.float32),
        response_cu_seqlens=torch.tensor(rcu, dtype=torch.int32),
        seq_of_token=torch.tensor(seq_of, dtype=torch.long),
        seq_indices=tuple(int(i) for i in indices),
        seq_lens=tuple(seq_lens),
        prompt_lens=tuple(prompt_lens),
    )


def pack(sequences: Sequence[TrainSequence], token_budget: int) -> list[MicroBatch]:
    """Pack all `sequences` without padding into micro-batches of at most `token_budget` tokens each.

    `MicroBatch.seq_indices` index into `sequences`; every sequence lands in exactly one micro-batch.
    """
    if token_budget < 2:
        raise ValueError(f"micro_batch_tokens must be >= 2 (one prompt + one response token), got {token_budget}")
    if not sequences:
        raise ValueError("no sequences to pack: the step produced no planner turns")
    lengths = [len(s) for s in sequences]
    too_long = [(i, n) for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        i, n = max(too_long, key=lambda x: x[1])
        s = sequences[i]
        raise ValueError(
            f"{len(too_long)} sequence(s) exceed micro_batch_tokens={token_budget}; the longest, sequence {i} "
            f"(trajectory {s.traj_id}, turn {s.turn}), has {n} tokens (prompt {len(s.prompt_ids)} + response "
            f"{len(s.response_ids)}). Raise micro_batch_tokens to at least {n} or cap the planner's prompt/response length."
        )
    return [build_micro_batch(sequences, b) for b in _first_fit_decreasing(lengths, token_budget)]


def split_responses(mb: MicroBatch, values: torch.Tensor) -> list[torch.Tensor]:
    """Split per-response-token `values` [R, ...] of `mb` into one tensor per sequence (mb order)."""
    if values.shape[0] != mb.num_response_tokens:
        raise ValueError(
            f"values have {values.shape[0]} rows, micro-batch has {mb.num_response_tokens} response tokens"
        )
    return list(torch.split(values, list(mb.response_lens)))


def unpack_responses(
    micro_batches: Sequence[MicroBatch], values: Sequence[torch.Tensor], num_sequences: int
) -> list[torch.Tensor]:
    """Per-response-token values of every micro-batch back to a list indexed like the packed sequences."""
    out: list[torch.Tensor | None] = [None] * num_sequences
    for mb, v in zip(micro_batches, values, strict=True):
        for i, part in zip(mb.seq_indices, split_responses(mb, v)):
            if out[i] is not None:
                raise ValueError(f"sequence {i} appears in more than one micro-batch")
            out[i] = part
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"sequences {missing[:8]} are in no micro-batch")
    return out  # type: ignore[return-value]


def unpack_tokens(mb: MicroBatch) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) of every sequence of `mb`, in mb order: the inverse of packing."""
    out = []
    ids = mb.input_ids.tolist()
    cu = mb.cu_seqlens_host
    for k, p in enumerate(mb.prompt_lens):
        seq = ids[cu[k] : cu[k + 1]]
        out.append((seq[:p], seq[p:]))
    return out
