"""A fixed Flow-GRPO update run, launched by tests/test_fsdp.py: alone, or under torchrun with FSDP2.

    python tests/fsdp_worker.py MODEL_DIR OUT.pt [--steps 4] [--kl-coef 0.0] [--rank0-turns K]
    torchrun --nproc-per-node 2 tests/fsdp_worker.py MODEL_DIR OUT.pt

The same 8 planner turns (fixed token ids, rollout log-probs and advantages) every step; under
torchrun rank r trains on turns r, r + world, ... and the parameters are FSDP2 shards. Rank 0
writes the per-step losses and the full updated parameters (gathered one FSDP group at a time).
"""

from __future__ import annotations

import argparse
import random

import torch

from engine.model import attach_packed_forward, load_planner
from engine.packing import TrainSequence
from engine.parallelize import apply_fsdp, build_mesh, full_parameters, init_from_env
from engine.trainer import Trainer, TrainerConfig


def sequences(vocab: int, n: int = 8) -> list[TrainSequence]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randrange(5, 40))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 12))]
        logprobs = [-rng.uniform(2.0, 9.0) for _ in response]
        out.append(TrainSequence(prompt, response, logprobs, advantage=rng.uniform(-1.5, 1.5), traj_id=i))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--kl-coef", type=float, default=0.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--grad-clip", type=float, default=None)
    p.add_argument("--rank0-turns", type=int, default=None, help="rank 0 trains on the first K turns, rank 1 the rest")
    args = p.parse_args()
    dp = init_from_env()
    torch.manual_seed(0)
    model = load_planner(args.model_dir, dtype="float32")
    ref, mesh = None, None
    if dp.enabled:
        mesh = build_mesh(dp)  # 2-D (replicate, fsdp) when torchrun spans several nodes
        if args.kl_coef > 0:
            ref = load_planner(args.model_dir, dtype="float32")
            attach_packed_forward(ref)
            apply_fsdp(ref.requires_grad_(False), mesh)
        attach_packed_forward(model)
        apply_fsdp(model, mesh)
    config = TrainerConfig(
        lr=args.lr,
        kl_coef=args.kl_coef,
        micro_batch_tokens=int(__import__("os").environ.get("MBT", "96")),
        grad_clip=args.grad_clip,
        loss_impl="fused",
    )
    trainer = Trainer(model, config, ref_model=ref, dp=dp)
    turns = sequences(model.config.vocab_size)
    if args.rank0_turns is not None and dp.enabled:
        mine = turns[: args.rank0_turns] if dp.rank == 0 else turns[args.rank0_turns :]
    else:
        mine = turns[dp.rank :: dp.world]
    metrics = [trainer.update(mine) for _ in range(args.steps)]
    micro = [m["actor/num_micro_batches"] for m in metrics]
    if dp.enabled:
        everyone = [None] * dp.world
        torch.distributed.all_gather_object(everyone, micro)
        micro = everyone
    losses = [m["actor/loss"] for m in metrics]
    norms = [m["actor/grad_norm"] for m in metrics]
    params = {n: t.clone() for n, t in full_parameters(model)}
    if dp.rank == 0:
        out = {"losses": losses, "grad_norms": norms, "params": params, "world": dp.world, "micro_batches": micro}
        out["mesh"] = dict(zip(mesh.mesh_dim_names, mesh.shape)) if mesh is not None else None
        torch.save(out, args.out)
    if dp.enabled:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
