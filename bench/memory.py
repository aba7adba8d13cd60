"""`flowgrpo bench memory`: the device memory one rank needs, computed from the model shape (not measured).

For a planner architecture of `engine.model.MODEL_SHAPES` (or an HF `config.json`) trained with FSDP2 or
HSDP over `nnodes × nproc_per_node` ranks, each rank also running a colocated vLLM engine of tensor-parallel
size `tp`, this adds up what each rank holds in the two phases of a step. S is the shard group size (the
ranks of one node under HSDP, all ranks under FSDP), P the parameter count, b the bytes of the weight dtype
(bf16: 2; AdamW's moments follow the parameter dtype), L layers, d hidden, F FFN width, V vocabulary, K
KV heads of head_dim h, T the micro-batch token budget.

    training (vLLM asleep: level 2 frees its weights and KV cache)
      weights shard          P·b / S, and as much again for the KL reference policy (kl_coef > 0)
      gradients shard        P·b / S
      AdamW moments shard    2·P·b / S
      gathered groups        the root (embedding, untied LM head, final norm) stays gathered through the
                             forward and backward, with two decoder layers (current + prefetched)
      unsharded gradients    the root's full gradients (reduce-scattered last) and the current layer's
      activations            with gradient checkpointing: each layer's input T·d·b, plus one layer's
                             recomputed activations and their gradients, 2·T·(2·H·h + 2·K·h + 2·d + 4·F)·b;
                             without it, L times the latter
      loss                   the fused LM-head loss never holds [T, V]: the final hidden rows and their fp32
                             gradient, T·d·(b + 4), its fp32 LM-head weight gradient V·d·4, and one chunk
                             of fp32 logits (`loss_chunk_mib`)
    rollout (optimizer state offloaded to pinned host memory, gradients released)
      weights shard          P·b / S (the trainer keeps its shard on the device)
      vLLM weights           P·b / tp, and as much again for a frozen vLLM helper engine (`--vllm-helper`)
      vLLM KV cache          (B·G / R) trajectories × `--max-model-len` tokens × 2·L·K·h·b / tp bytes, where
                             R = world / tp rollout groups share the B·G trajectories of a step (worst case:
                             every trajectory at the full context length at once)
      weight sync            one FSDP group gathered at a time; the largest is the root (or one layer)
    host (per rank)          the offloaded AdamW moments, 2·P·b / S

Not computed: CUDA context and NCCL buffers (~1 GiB per rank), vLLM's activation workspace and CUDA graphs,
allocator fragmentation, the helper engine's KV cache. `flowgrpo bench step --model DIR` measures the phases on a real device.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DEVICES_GIB = {"H100 80GB": 80.0, "H200 141GB": 139.8}


@dataclass(frozen=True)
class Shape:
    """The dimensions of a decoder-only planner that memory depends on, and its parameter counts
    (counted on the meta device by `engine.model`, so tied weights and biases are as transformers builds them)."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    params: int
    layer_params: int

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embedding, untied LM head, final norm (FSDP's root group)."""
        return self.params - self.layers * self.layer_params

    @classmethod
    def from_config(cls, config: Any) -> Shape:
        from engine.model import build_random_model, num_parameters
        from engine.parallelize import decoder_layers

        model = build_random_model(config, device="meta")
        heads = int(config.num_attention_heads)
        return cls(
            vocab=int(config.vocab_size),
            hidden=int(config.hidden_size),
            ffn=int(config.intermediate_size),
            layers=int(config.num_hidden_layers),
            heads=heads,
            kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            params=num_parameters(model),
            layer_params=num_parameters(decoder_layers(model)[0]),
        )


@dataclass(frozen=True)
class Layout:
    """How the ranks are arranged and what one step runs."""

    nnodes: int = 1
    nproc_per_node: int = 8
    hsdp: bool = True  # shard within a node, replicate across nodes; False: shard over every rank
    tp: int = 1
    queries: int = 32
    group_size: int = 8
    max_model_len: int = 4096
    micro_batch_tokens: int = 16384
    gradient_checkpointing: bool = True
    reference: bool = True  # a KL reference policy (kl_coef > 0), sharded like the planner
    vllm_helper: bool = False  # a frozen vLLM helper engine (executor/verifier/generator) per rollout group
    dtype: str = "bfloat16"
    loss_chunk_mib: float = 256.0

    def __post_init__(self) -> None:
        if min(self.nnodes, self.nproc_per_node, self.tp, self.queries, self.group_size) < 1:
            raise ValueError("nnodes, nproc_per_node, tp, queries and group_size must all be >= 1")
        if self.nproc_per_node % self.tp:
            raise ValueError(
                f"tp={self.tp} must divide --nproc-per-node {self.nproc_per_node} (a TP group is in a node)"
            )
        if self.queries % self.rollout_groups:
            raise ValueError(
                f"--queries {self.queries} must be divisible by the {self.rollout_groups} rollout groups "
                f"(world {self.world} / tp {self.tp}): groups of G stay on one rollout group"
            )
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")

    @property
    def world(self) -> int:
        return self.nnodes * self.nproc_per_node

    @property
    def shard(self) -> int:
        return self.nproc_per_node if self.hsdp else self.world

    @property
    def rollout_groups(self) -> int:
        return self.world // self.tp


def rank_memory(shape: Shape, layout: Layout) -> dict[str, dict[str, int]]:
    """Bytes per rank by phase and item (see the module doc for each formula)."""
    b, s, p = DTYPE_BYTES[layout.dtype], layout.shard, shape.params
    t, d, h = layout.micro_batch_tokens, shape.hidden, shape.head_dim
    shard = -(-p // s) * b  # FSDP pads each parameter's dim 0 to a multiple of S; negligible at these sizes
    layer_full = shape.layer_params * b
    layer_acts = 2 * t * (2 * shape.heads * h + 2 * shape.kv_heads * h + 2 * d + 4 * shape.ffn) * b
    if layout.gradient_checkpointing:
        activations = shape.layers * t * d * b + layer_acts
    else:
        activations = shape.layers * layer_acts
    kv_per_token = 2 * shape.layers * shape.kv_heads * h * b // layout.tp
    trajectories = layout.queries * layout.group_size // layout.rollout_groups
    train = {
        "weights shard": shard,
        "reference shard": shard if layout.reference else 0,
        "gradients shard": shard,
        "AdamW moments shard": 2 * shard,
        "gathered root + 2 layers": shape.root_params * b + 2 * layer_full,
        "unsharded gradients (root + 1 layer)": shape.root_params * b + layer_full,
        "activations": activations,
        "loss (rows, fp32 dW, logits chunk)": t * d * (b + 4)
        + shape.vocab * d * 4
        + int(layout.loss_chunk_mib * (1 << 20)),
    }
    rollout = {
        "weights shard": shard,
        "reference shard": shard if layout.reference else 0,
        "vLLM weights": p * b // layout.tp,
        "vLLM helper weights": p * b // layout.tp if layout.vllm_helper else 0,
        "vLLM KV cache": trajectories * layout.max_model_len * kv_per_token,
        "weight sync (largest group gathered)": max(shape.root_params, shape.layer_params) * b,
    }
    return {"train": train, "rollout": rollout, "host": {"offloaded AdamW moments": 2 * shard}}


def load_shape(model: str) -> tuple[str, Shape]:
    """A `MODEL_SHAPES` name, or a directory (or file) holding an HF config.json."""
    from transformers import AutoConfig

    from engine.model import MODEL_SHAPES, preset_config

    if model in MODEL_SHAPES:
        return model, Shape.from_config(preset_config(model))
    path = Path(model)
    if not (path / "config.json" if path.is_dir() else path).is_file():
        raise ValueError(
            f"--model {model!r} is neither a known shape {sorted(MODEL_SHAPES)} nor a model dir or config.json"
        )
    return str(path), Shape.from_config(AutoConfig.from_pretrained(path))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="qwen2.5-7b", help="a MODEL_SHAPES name or an HF model dir/config.json")
    parser.add_argument("--nnodes", type=int, default=None, help="one layout (default: the 1×8 and 2×8 layouts)")
    parser.add_argument("--nproc-per-node", type=int, default=8)
    parser.add_argument("--fsdp", action="store_true", help="shard over every rank (default: HSDP across nodes)")
    parser.add_argument("--tp", type=int, default=1, help="vLLM tensor-parallel size per rollout group")
    parser.add_argument("--queries", type=int, default=32, help="B, queries per step")
    parser.add_argument("--group-size", type=int, default=8, help="G, trajectories per query")
    parser.add_argument("--max-model-len", type=int, default=4096, help="context per trajectory (KV worst case)")
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="kl_coef = 0: no reference policy")
    parser.add_argument("--vllm-helper", action="store_true", help="a frozen vLLM helper engine per rollout group")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--json", action="store_true", help="print only the JSON")


def _layouts(args: argparse.Namespace) -> list[Layout]:
    common = dict(
        nproc_per_node=args.nproc_per_node,
        hsdp=not args.fsdp,
        tp=args.tp,
        queries=args.queries,
        group_size=args.group_size,
        max_model_len=args.max_model_len,
        micro_batch_tokens=args.micro_batch_tokens,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        reference=not args.no_reference,
        vllm_helper=args.vllm_helper,
        dtype=args.dtype,
    )
    return [Layout(nnodes=n, **common) for n in ([args.nnodes] if args.nnodes else [1, 2])]


def format_table(name: str, shape: Shape, plans: list[tuple[Layout, dict[str, dict[str, int]]]]) -> str:
    heads = [
        f"{lay.nnodes}×{lay.nproc_per_node} {'HSDP' if lay.hsdp and lay.nnodes > 1 else 'FSDP'}" for lay, _ in plans
    ]
    width = max(len(k) for _, plan in plans for ph in plan.values() for k in ph) + 12
    lines = [
        f"flowgrpo bench memory · {name}: {shape.params / 1e9:.2f} B parameters · computed, not measured (GiB per rank)",
        f"{'':<{width}}" + "".join(f"{h:>14}" for h in heads),
    ]
    for phase in ("train", "rollout", "host"):
        for item in plans[0][1][phase]:
            lines.append(
                f"{phase + ': ' + item:<{width}}" + "".join(f"{plan[phase][item] / GiB:>14.2f}" for _, plan in plans)
            )
        if phase != "host":
            total = [sum(plan[phase].values()) / GiB for _, plan in plans]
            lines.append(f"{phase + ' total':<{width}}" + "".join(f"{x:>14.2f}" for x in total))
    peak = [max(sum(plan["train"].values()), sum(plan["rollout"].values())) / GiB for _, plan in plans]
    lines.append(f"{'peak (larger phase)':<{width}}" + "".join(f"{x:>14.2f}" for x in peak))
    for dev, cap in DEVICES_GIB.items():
        lines.append(f"{'headroom on ' + dev:<{width}}" + "".join(f"{cap - x:>14.2f}" for x in peak))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        name, shape = load_shape(args.model)
        layouts = _layouts(args)
    except ValueError as e:
        print(f"flowgrpo bench memory: error: {e}", file=sys.stderr)
        return 2
    plans = [(lay, rank_memory(shape, lay)) for lay in layouts]
    payload = {
        "model": name,
        "params": shape.params,
        "shape": asdict(shape),
        "layouts": [{"layout": asdict(lay), "bytes": plan} for lay, plan in plans],
    }
    if not args.json:
        print(format_table(name, shape, plans))
    print(json.dumps(payload))
    return 0
