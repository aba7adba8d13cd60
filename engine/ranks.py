"""The ranks of a multi-process training run: who rolls out what, who trains on what, how metrics meet.

A run under torchrun has `world` ranks (`engine.parallelize.init_from_env`). The trainer is FSDP2
over all of them. The rollout is split into `world / tp` data-parallel rollout groups of `tp`
consecutive ranks; the ranks of one group share one vLLM engine, tensor-parallel over them
(`distributed_executor_backend="external_launcher"`: each rank runs the engine's SPMD program
itself, so every rank of a group must make the same engine calls with the same prompts and seeds).

- Queries: the step's B queries are cut into `world / tp` contiguous, equal slices, one per rollout
  group (B must be divisible by world / tp). All G trajectories of a query are rolled out by one
  group, so the group-normalised advantages need no communication.
- Training: every rank of a group holds the group's whole rollout (the TP ranks ran the same one);
  rank `tp_rank` of the group trains on the planner turns `tp_rank, tp_rank + tp, ...` of it, so each
  turn is trained on exactly once over the world.
- Metrics (`RankLayout.combine`): each rank's metrics line is gathered (one `all_gather_object` per
  step, robust to keys that exist on some ranks only) and combined: counts (`num_*`, `*_tokens`,
  `*_calls`) are summed, `*_max`/`*/max` take the maximum, `*_min`/`*/min` the minimum, the rest is
  the mean over ranks; rollout-side keys (`rollout/`, `adv/`, `reward/`, `helper/`) are taken from one
  rank per rollout group (the TP ranks of a group report the same rollout); validation (`val/`) runs the
  whole set on every rank, so rank 0's line is kept. `dist/*` records the layout (world, tp, the
  trainer mesh's replicate and fsdp sizes) and the spread of the rollout (`gen`) and step time
  between the fastest and slowest rank.

Simplifications: one rollout layout (tensor parallel within a group, data parallel across groups);
no pipeline parallelism; the run directory must be shared by all ranks (one node, or a shared file
system).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.parallelize import SINGLE, DataParallel, mesh_shape
from engine.preflight import UsageError

# taken from one rank per rollout group; validation runs the whole set on every rank (rank 0's is kept)
ROLLOUT_PREFIXES = ("rollout/", "adv/", "reward/", "helper/", "perf/rollout_tokens_per_s")
EVERY_RANK_PREFIXES = ("val/",)
RANK_TIMING_FILE = "ranks.jsonl"  # per step, every rank's phase times (rank 0 writes it; world > 1 only)


@dataclass(frozen=True)
class RankLayout:
    """This rank's place: its data-parallel rank in the trainer and its rollout group (see the module doc)."""

    dp: DataParallel = SINGLE
    tp: int = 1

    @property
    def distributed(self) -> bool:
        return self.dp.enabled

    @property
    def is_main(self) -> bool:
        return self.dp.rank == 0

    @property
    def group(self) -> int:
        return self.dp.rank // self.tp

    @property
    def num_groups(self) -> int:
        return self.dp.world // self.tp

    @property
    def tp_rank(self) -> int:
        return self.dp.rank % self.tp

    @property
    def mesh(self) -> dict[str, int]:
        """The trainer's FSDP2 mesh by dimension: {"fsdp": world} on one node, HSDP {"replicate", "fsdp"} across."""
        return mesh_shape(self.dp)

    def describe_mesh(self) -> str:
        """E.g. "HSDP mesh replicate 2 x fsdp 4" or "FSDP mesh fsdp 8" (the run header's words)."""
        dims = " x ".join(f"{k} {v}" for k, v in self.mesh.items())
        return f"{'HSDP' if 'replicate' in self.mesh else 'FSDP'} mesh {dims}"

    def queries(self, queries: Sequence[Any]) -> list[Any]:
        """This rollout group's contiguous slice of the step's queries."""
        n = len(queries) // self.num_groups
        return list(queries[self.group * n : (self.group + 1) * n])

    def train_share(self, sequences: Sequence[Any]) -> list[Any]:
        """The planner turns this rank trains on: every tp-th of its group's rollout."""
        return list(sequences[self.tp_rank :: self.tp])

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def all_min(self, value: int) -> int:
        return int(-self.dp.all_max(-float(value)))

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, in rank order (the list [obj] when not distributed)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.dp.world
        dist.all_gather_object(out, obj)
        return out

    def combine(self, metrics: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(the world's metrics line, every rank's line), the same on every rank; see the module doc."""
        rows = self.gather(metrics)
        out = combine_rows(rows, self.tp)
        gen = [r.get("timing_s/gen") or 0.0 for r in rows]
        step = [r.get("timing_s/step") or 0.0 for r in rows]
        out.update(
            {
                "dist/world_size": self.dp.world,
                "dist/tp_size": self.tp,
                "dist/replicate_size": self.mesh.get("replicate", 1),
                "dist/fsdp_size": self.mesh["fsdp"],
                "dist/gen_s_min": min(gen),
                "dist/gen_s_max": max(gen),
                "dist/step_s_min": min(step),
                "dist/step_s_max": max(step),
            }
        )
        return out, rows


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _rule(key: str) -> str:
    if key in ("actor/num_mini_batches", "sync/num_tensors"):  # the same on every rank
        return "max"
    if key.endswith(("_max", "/max")):
        return "max"
    if key.endswith(("_min", "/min")):
        return "min"
    if "num_" in key or key.endswith(("_tokens", "_calls")):
        return "sum"
    return "mean"


def combine_rows(rows: Sequence[dict[str, Any]], tp: int = 1) -> dict[str, Any]:
    """Combine per-rank metrics lines (rank order) into one (module doc); rank 0's value for non-numbers."""
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    out: dict[str, Any] = {}
    for k in keys:
        if k.startswith(EVERY_RANK_PREFIXES):
            ranks = rows[:1]
        elif k.startswith(ROLLOUT_PREFIXES):
            ranks = [r for i, r in enumerate(rows) if i % tp == 0]
        else:
            ranks = rows
        vals = [r[k] for r in ranks if _is_number(r.get(k))]
        if not vals:
            out[k] = next((r[k] for r in rows if k in r), None)
            continue
        rule = _rule(k)
        if rule == "sum":
            out[k] = sum(vals)
        elif rule == "max":
            out[k] = max(vals)
        elif rule == "min":
            out[k] = min(vals)
        else:
            out[k] = statistics.fmean(vals)
        if all(isinstance(v, int) for v in vals) and rule != "mean":
            out[k] = int(out[k])
    return out


def single_process_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The `dist/*` keys of a one-process run (world 1: the spread is zero)."""
    gen, step = metrics.get("timing_s/gen"), metrics.get("timing_s/step")
    return {
        "dist/world_size": 1,
        "dist/tp_size": 1,
        "dist/replicate_size": 1,
        "dist/fsdp_size": 1,
        "dist/gen_s_min": gen,
        "dist/gen_s_max": gen,
        "dist/step_s_min": step,
        "dist/step_s_max": step,
    }


def check_layout(config: Any, world: int, *, local_world: int | None = None) -> None:
    """One line naming the problem, before any work, for a run of `config` on `world` ranks, `local_world`
    of them on each node (default: all on one)."""
    tp = config.rollout.tensor_parallel_size
    if world == 1:
        if tp != 1:
            raise UsageError(f"--tp {tp} needs {tp} ranks at least: add --nproc-per-node {tp} (or run under torchrun)")
        return
    if world % tp:
        raise UsageError(f"--tp {tp} must divide the number of processes {world}; choose a divisor of {world}")
    local_world = world if local_world is None else local_world
    if local_world % tp:
        raise UsageError(
            f"--tp {tp} must divide the {local_world} processes per node: a tensor-parallel engine stays within a node"
        )
    groups = world // tp
    b = config.task.queries_per_step
    if b % groups:
        raise UsageError(
            f"--queries-per-step {b} must be divisible by the {groups} rollout groups (processes {world} / tp {tp}); "
            f"use a multiple of {groups}"
        )
    if tp > 1 and config.rollout.engine == "embedded":
        raise UsageError(f"--tp {tp} shards a vLLM engine; the embedded engine runs one per rank: use --tp 1")
    if config.helper.kind in ("reference", "vllm"):
        raise UsageError(
            f"--helper {config.helper.kind} is single-process only; with several processes use --helper policy or http"
        )


def check_resume_layout(run_dir: Any, world: int) -> None:
    """--resume on `world` > 1 processes: refuse a run whose newest checkpoint is a single-process one (its
    optimizer state is keyed by parameter index, which a sharded run cannot map); one line, before any work."""
    from engine.checkpoint import load_latest

    ck = load_latest(run_dir, verify=False) if world > 1 else None
    if ck is not None and ck.layout != "dcp":
        raise UsageError(
            f"--resume with {world} processes: the newest checkpoint in {run_dir} ({ck.path.name}) was written by "
            f"one process and resumes on one only; drop --nproc-per-node (its later checkpoints stay single-process)"
        )


def option_argv(parser: argparse.ArgumentParser, args: argparse.Namespace, drop: Sequence[str] = ()) -> list[str]:
    """The command line that parses back into `args` (options differing from their defaults), without `drop`."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest in drop or action.dest == "help":
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def torchrun_command(nproc: int, module_argv: Sequence[str]) -> list[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node N -m engine.cli ...` (one node)."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "engine.cli",
        *module_argv,
    ]
