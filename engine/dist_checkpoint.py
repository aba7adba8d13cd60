"""Sharded checkpoints of an FSDP2 run (torch.distributed.checkpoint), resumable on any world size.

Each rank writes its own shard of the parameters and of the AdamW state: `get_state_dict(model,
optimizer)` (torch.distributed.checkpoint.state_dict) gives both as DTensor shards keyed by the
model's parameter names, and `torch.distributed.checkpoint.save` writes one `__<rank>_0.distcp` file
per rank plus a `.metadata` file (rank 0) that records how every tensor was cut. Loading reads into
whatever layout the resuming run has (`dcp.load` then `set_state_dict`), so a checkpoint written
by 2 ranks loads on 1, 2 or 4 (DCP resharding); one process without a process group included.

The run directory layout is `engine.checkpoint`'s: `run_dir/checkpoints/step_NNNNNN/` holding the
DCP files, `state.json` (`layout: "dcp"`, the world size, the step, the size of every file, the
caller's state and the RNG states of every rank) and `manifest.json` (sha256 of every other file,
the same format), the same `latest` pointer, pruning (`keep_last`) and leftover handling, and
`engine.checkpoint.load_latest`/`verify_checkpoint` find and verify both kinds.

Save, in order (a writer killed at any point leaves the old checkpoints and at worst a hidden
`.tmp-*` directory, which readers ignore and the next save removes):
1. rank 0 removes leftovers and makes the hidden temp directory; its name is broadcast;
2. every rank writes its shards into it (`dcp.save`, files fsynced);
3. the RNG states of all ranks are gathered and rank 0 writes `state.json`; barrier;
4. the files are split between the ranks by size; each rank fsyncs and hashes its share, and the
   digests are gathered on rank 0, which writes the manifest;
5. rank 0 renames the directory to `step_NNNNNN` (the commit point), replaces `latest` and prunes
   (`engine.checkpoint.commit`); a final barrier, so `save_sharded` returns on every rank only once
   the checkpoint is committed.

Load: every rank checks the sizes of all files and hashes its share of them against the manifest;
the verdicts are gathered, so either every rank loads or every rank raises the same one-line
`UsageError` (a rank that raised alone would leave the others waiting in a collective). RNG states
are restored per rank when the world size matches; otherwise each rank keeps its own and a note
says so.

Simplifications: the checkpoint directory must be visible to all ranks at the same path (one node,
or a shared filesystem across nodes), as for DCP's `FileSystemWriter`; saving is synchronous (no
`async_save`); on an HSDP mesh the replicas hold equal shards and DCP's planner writes each once
(tests/test_dist_train.py saves on a two-node HSDP mesh and resumes on it and on a one-node FSDP mesh).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.checkpoint import (
    CHECKPOINTS,
    MANIFEST_FILE,
    STATE_FILE,
    Checkpoint,
    capture_rng,
    commit,
    file_digests,
    make_temp_dir,
    read_state,
    restore_rng,
    step_dirs,
    verify_checkpoint,
    write_manifest,
)
from engine.parallelize import SINGLE, DataParallel
from engine.preflight import UsageError

FORMAT = 2
LAYOUT = "dcp"


def _gather(dp: DataParallel, obj: Any) -> list[Any]:
    """`obj` of every rank, in rank order, on every rank."""
    if not dp.enabled:
        return [obj]
    out: list[Any] = [None] * dp.world
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(dp: DataParallel, obj: Any) -> Any:
    if not dp.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(errors: list[str]) -> str:
    return next((e for e in errors if e), "")


def share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` handles: largest first, each to the least loaded rank."""
    load = [0] * world
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += max(sizes[name], 1)
    return sorted(n for n, r in owner.items() if r == rank)


def _state_dicts(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_sharded(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    extra_state: dict[str, Any] | None = None,
    dp: DataParallel = SINGLE,
    *,
    keep_last: int = 3,
) -> Path:
    """Write checkpoint `step` of an FSDP2 (or plain) model and its optimizer, collectively on every
    rank (see the module doc); returns its directory on every rank."""
    import torch.distributed.checkpoint as dcp

    tmp, error = None, ""
    if dp.rank == 0:
        try:
            tmp = make_temp_dir(run_dir, step, keep_last)
        except (OSError, ValueError) as e:
            error = f"cannot write a checkpoint under {run_dir}: {e}"
    tmp, error = _from_rank0(dp, (tmp, error))
    if error:
        raise ValueError(error)
    assert tmp is not None

    dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp)
    rngs = _gather(dp, capture_rng())
    if dp.rank == 0:
        files = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file()}
        meta = {
            "format": FORMAT,
            "layout": LAYOUT,
            "world": dp.world,
            "step": int(step),
            "time": time.time(),
            "files": files,
            "rng_ranks": rngs,
            "state": extra_state or {},
        }
        with open(tmp / STATE_FILE, "w") as f:
            f.write(json.dumps(meta, indent=1, allow_nan=False, default=str))
            f.flush()
            os.fsync(f.fileno())
    if dp.enabled:
        dist.barrier()

    sizes = {p.name: p.stat().st_size for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST_FILE}
    mine = [tmp / n for n in share(sizes, dp.rank, dp.world)]
    for p in mine:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    digests: dict[str, Any] = {}
    for part in _gather(dp, file_digests(mine) if mine else {}):
        digests.update(part)

    final, error = None, ""
    if dp.rank == 0:
        try:
            write_manifest(tmp, digests)
            final = commit(tmp, step, keep_last)
        except OSError as e:
            error = f"cannot commit checkpoint {tmp.name}: {e}"
    final, error = _from_rank0(dp, (final, error))
    if error:
        raise OSError(error)
    return Path(final)


def verify_sharded(path: str | Path, dp: DataParallel = SINGLE) -> str:
    """ "" when checkpoint `path` matches its manifest, else why not: the same answer on every rank,
    each rank hashing its share of the files."""
    path = Path(path)
    ck, why = read_state(path)
    if ck is not None:
        try:  # an unreadable file is this rank's answer: every rank still reaches the gather
            sizes = {p.name: p.stat().st_size for p in path.iterdir() if p.is_file() and p.name != MANIFEST_FILE}
            why = verify_checkpoint(path, names=share(sizes, dp.rank, dp.world))
        except OSError as e:
            why = f"cannot read it ({e})"
    return _first_error(_gather(dp, why))


def latest_sharded(run_dir: str | Path, dp: DataParallel = SINGLE, notes: list[str] | None = None) -> Checkpoint | None:
    """The newest checkpoint of the run that verifies (either kind), the same on every rank, or None;
    each newer `step_*` directory passed over is reported in `notes` with the reason."""
    for _, p in reversed(step_dirs(Path(run_dir) / CHECKPOINTS)):
        why = verify_sharded(p, dp)
        if not why:
            return read_state(p)[0]
        if notes is not None:
            notes.append(f"skipped checkpoint {p.name}: {why}")
    return None


def load_sharded(
    checkpoint: Checkpoint | str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    dp: DataParallel = SINGLE,
    *,
    restore_rng_state: bool = True,
    notes: list[str] | None = None,
) -> Checkpoint:
    """Verify checkpoint `checkpoint` on every rank, then load it into `model` (FSDP2-sharded or plain)
    and `optimizer`, resharding to this run's world size; collective. Returns the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
    why = verify_sharded(path, dp)
    if why:
        raise UsageError(
            f"checkpoint {path}: {why}; move the directory aside to resume from an earlier checkpoint "
            f"(engine.checkpoint.load_latest skips damaged ones)"
        )
    ck, _ = read_state(path)
    assert ck is not None
    if ck.layout != LAYOUT:
        raise UsageError(
            f"{path} is a single-process checkpoint; load it with engine.checkpoint.load_checkpoint "
            f"(its weights can start a sharded run from the model directory)"
        )
    state = _state_dicts(model, optimizer)
    if optimizer is not None and "optim" not in _saved_keys(path):
        raise UsageError(
            f"checkpoint {path} holds no optimizer state (saved without an optimizer); pass optimizer=None"
        )
    dcp.load(state, checkpoint_id=path)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if restore_rng_state and ck.rng_ranks:
        if ck.world == dp.world:
            restore_rng(ck.rng_ranks[dp.rank])
        elif notes is not None:
            notes.append(
                f"RNG states not restored: {path.name} was written by {ck.world} rank{'s' * (ck.world > 1)} "
                f"and this run has {dp.world}; each rank keeps the RNG state it has"
            )
    return ck


def _saved_keys(path: Path) -> set[str]:
    """Top-level keys ("model", "optim") of the state saved in `path`."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(path).read_metadata()
    return {fqn.split(".", 1)[0] for fqn in metadata.state_dict_metadata}
