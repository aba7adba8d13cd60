"""Data parallelism applied from outside the model and the loss (torchtitan's `parallelize.py`).

Under torchrun every rank holds an FSDP2 shard (`torch.distributed.fsdp.fully_shard`) of the
planner's parameters, gradients and AdamW state: each decoder layer is one FSDP group, the root
(embeddings, final norm, LM head) another. The trainer never reaches into the sharded model: its
packed forward and loss run through one method, `model.packed_forward(mb, head)`
(`engine.model.attach_packed_forward`), which FSDP wraps (`register_fsdp_forward_method`) so the
root's parameters are gathered for the LM head inside it, exactly as for `model(...)`.

Loss scaling: FSDP averages gradients over the data-parallel ranks, so an exact global mean over
tokens (or sequences) needs each rank's loss scaled by `world * local / global` (`DataParallel.scale`)
— the denominators are all-reduced once per mini-batch.

Mesh: 1-D (`fsdp`) on one node; 2-D HSDP (`replicate`, `fsdp`) across nodes: replicas across
nodes, shards within (`build_mesh(replicate=nodes)`).

`full_parameters(model)` yields the full, HF-named tensors for the weight sync one FSDP group at a
time (unshard -> yield -> reshard), so the peak is one group's full weights, not the whole model.

Simplifications: data parallelism only (no tensor or pipeline parallelism in the trainer); the
rollout engine of each rank is its own (vLLM `external_launcher`, or the embedded engine).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel group (world 1 when not distributed)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def nodes(self) -> int:
        return max(1, self.world // self.local_world)

    def all_sum(self, value: float) -> float:
        """The sum of `value` over the ranks (the value itself when not distributed)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item()

    def all_max(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def scale(self, local: float, global_: float) -> float:
        """The factor that turns FSDP's rank-average of gradients into the exact global mean."""
        return self.world * local / global_

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Means over ranks; `*_max` keys take the maximum, `*num*`/`*tokens*` counts the sum."""
        if not self.enabled:
            return dict(metrics)
        out = {}
        for k, v in metrics.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                out[k] = v
            elif k.endswith("_max"):
                out[k] = self.all_max(float(v))
            elif "num_" in k or k.endswith("_tokens"):
                out[k] = self.all_sum(float(v))
            else:
                out[k] = self.all_sum(float(v)) / self.world
        return out


SINGLE = DataParallel()


def init_from_env() -> DataParallel:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK); SINGLE without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if world % local_world:
        raise ValueError(f"WORLD_SIZE {world} is not a multiple of LOCAL_WORLD_SIZE {local_world}: unequal nodes")
    return DataParallel(rank=rank, world=world, local_rank=local, local_world=local_world)


def mesh_shape(dp: DataParallel, replicate: int | None = None) -> dict[str, int]:
    """The dimensions of the mesh `build_mesh` makes, by name: {"fsdp": world}, or with `replicate` > 1
    {"replicate": replicate, "fsdp": world // replicate}; `replicate` defaults to one replica per node."""
    replicate = dp.nodes if replicate is None else replicate
    if dp.world % replicate:
        raise ValueError(f"world size {dp.world} is not a multiple of replicate={replicate} (nodes)")
    return {"fsdp": dp.world} if replicate == 1 else {"replicate": replicate, "fsdp": dp.world // replicate}


def build_mesh(dp: DataParallel, replicate: int | None = None):
    """A 1-D mesh (`fsdp`) or, with `replicate` > 1, a 2-D HSDP mesh (`replicate`, `fsdp`). By default one
    replica per node (`dp.nodes`): parameters are sharded within a node and replicated across nodes, so the
    per-layer all-gathers stay on the node's fast links and only the gradient all-reduce crosses nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = mesh_shape(dp, replicate)
    return init_device_mesh(device, tuple(shape.values()), mesh_dim_names=tuple(shape))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no model.layers; FSDP groups are built per decoder layer")
    return list(layers)


def apply_fsdp(model: torch.nn.Module, mesh: Any, *, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard every decoder layer and the root with FSDP2; the packed forward becomes an FSDP forward."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not hasattr(model, "packed_forward"):
        raise ValueError("attach the packed forward first (engine.model.attach_packed_forward(model))")
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(model, "packed_forward")
    return model


def full_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every parameter, one FSDP group unsharded at a time."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(model, FSDPModule):
        yield from ((n, p.detach()) for n, p in model.named_parameters())
        return
    layer_ids = {id(m) for m in decoder_layers(model)}
    groups: list[tuple[str, torch.nn.Module]] = [(name, m) for name, m in model.named_modules() if id(m) in layer_ids]
    in_layers = set()
    for prefix, layer in groups:
        layer.unshard()
        try:
            for n, p in layer.named_parameters():
                in_layers.add(f"{prefix}.{n}")
                yield f"{prefix}.{n}", p.detach()
        finally:
            layer.reshard()
    model.unshard()
    try:
        for n, p in model.named_parameters():
            if n not in in_layers:
                yield n, (p.full_tensor() if isinstance(p, DTensor) else p).detach()
    finally:
        model.reshard()
