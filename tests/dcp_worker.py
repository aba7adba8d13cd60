"""Training with sharded checkpoints, launched by tests/test_dist_checkpoint.py under torchrun (or alone).

    torchrun --nproc-per-node 2 tests/dcp_worker.py MODEL_DIR RUN_DIR OUT.pt --steps 3 --save-at 2
    torchrun --nproc-per-node 2 tests/dcp_worker.py MODEL_DIR RUN_DIR OUT.pt --steps 3 --resume
    python tests/dcp_worker.py MODEL_DIR RUN_DIR OUT.pt --steps 3 --resume       # one process, no FSDP

The 8 planner turns of tests/fsdp_worker.py every step (rank r trains on turns r, r + world, ...),
the trainer's AdamW, FSDP2 shards when the world is larger than one. Each rank seeds its own RNG
stream (1000 + rank) and draws one number per step, so a resume shows whether each rank got its own
stream back. `--kill RANK:STEP:POINT` SIGKILLs rank RANK in the middle of the save of step STEP:
`hash` when it starts hashing its share (its shards are written, the manifest is not), `commit` just
before rank 0 renames the finished temp directory. Rank 0 rewrites OUT.pt after every save and at
the end: per-step (loss, grad norm) and draws, the full parameters and optimizer state after each save and
right after loading, the notes of the load.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from fsdp_worker import sequences  # tests/ is the script's directory, first on sys.path
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import engine.dist_checkpoint as dcpt
from engine.model import attach_packed_forward, load_planner
from engine.parallelize import apply_fsdp, build_mesh, init_from_env
from engine.trainer import Trainer, TrainerConfig


def full_state(model, optimizer) -> dict:
    """Copies of the full (unsharded) parameters and optimizer state keyed by parameter name, on every
    rank (without FSDP the state dicts hold the live tensors, which later steps change in place)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    optim = {name: {k: v.clone() for k, v in state.items()} for name, state in optim_sd["state"].items()}
    return {"params": {k: v.clone() for k, v in model_sd.items()}, "optim": optim}


def arm_kill(rank: int, spec: str | None, current_step: list[int]) -> None:
    if not spec:
        return
    who, at, point = spec.split(":")
    if int(who) != rank:
        return

    def die():
        if current_step[0] == int(at):
            os.kill(os.getpid(), signal.SIGKILL)

    if point == "hash":
        original = dcpt.file_digests

        def file_digests(*a, **k):
            die()
            return original(*a, **k)

        dcpt.file_digests = file_digests
    elif point == "commit":
        original_commit = dcpt.commit

        def commit(*a, **k):
            die()
            return original_commit(*a, **k)

        dcpt.commit = commit
    else:
        raise ValueError(f"unknown kill point {point!r}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--load", help="load this checkpoint directory (instead of the newest that verifies)")
    p.add_argument("--kill")
    args = p.parse_args()
    dp = init_from_env()
    model = load_planner(args.model_dir, dtype="float32")
    if dp.enabled:
        attach_packed_forward(model)
        apply_fsdp(model, build_mesh(dp))
    trainer = Trainer(
        model, TrainerConfig(lr=1e-3, kl_coef=0.0, entropy_coef=0.01, micro_batch_tokens=96, loss_impl="fused"), dp=dp
    )
    torch.manual_seed(1000 + dp.rank)
    mine = sequences(model.config.vocab_size)[dp.rank :: dp.world]
    step = [0]
    arm_kill(dp.rank, args.kill, step)
    out: dict = {"world": dp.world, "losses": {}, "draws": {}, "saved": {}, "notes": []}

    def dump() -> None:
        if dp.rank == 0:
            torch.save(out, f"{args.out}.tmp")
            os.replace(f"{args.out}.tmp", args.out)

    start = 1
    if args.resume or args.load:
        ck = args.load or dcpt.latest_sharded(args.run_dir, dp, out["notes"])
        assert ck is not None, f"no checkpoint in {args.run_dir}: {out['notes']}"
        ck = dcpt.load_sharded(ck, model, trainer.optimizer, dp, notes=out["notes"])
        out["loaded_step"] = ck.step
        out["loaded"] = full_state(model, trainer.optimizer)
        start = ck.step + 1
    for s in range(start, args.steps + 1):
        step[0] = s
        metrics = trainer.update(mine)
        out["losses"][s] = (metrics["actor/loss"], metrics["actor/grad_norm"])
        out["draws"][s] = dcpt._gather(dp, torch.rand(1).item())
        if s in args.save_at:
            dcpt.save_sharded(args.run_dir, s, model, trainer.optimizer, {"note": f"step {s}"}, dp, keep_last=2)
            out["saved"][s] = full_state(model, trainer.optimizer)
            dump()
    out["final"] = full_state(model, trainer.optimizer)
    dump()
    if dp.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
