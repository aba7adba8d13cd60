"""The device memory a run needs, computed from the model shape (not measured): one model for every caller.

For a planner architecture of `engine.model.MODEL_SHAPES` (or an HF `config.json`) trained with FSDP2 or
HSDP over `nnodes × nproc_per_node` ranks, each rank also running a colocated vLLM engine of tensor-parallel
size `tp`, `rank_memory` adds up what each rank holds in the two phases of a step. S is the shard group size
(the ranks of one node under HSDP, all ranks under FSDP), P the parameter count, b the bytes of the weight
dtype (bf16: 2; AdamW's moments follow the parameter dtype), L layers, d hidden, F FFN width, V vocabulary,
K KV heads of head_dim h, T the micro-batch token budget.

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
      vLLM weights           P·b / tp (none for the embedded engine, which samples from the trainer's
                             weights), and as much again for a frozen vLLM helper engine (`--vllm-helper`)
      KV cache               (B·G / R) trajectories × `max_model_len` tokens × `kv_bytes_per_token` / tp,
                             where R = world / tp rollout groups share the B·G trajectories of a step
                             (worst case: every trajectory at the full context length at once)
      weight sync            one FSDP group gathered at a time; the largest is the root (or one layer)
    host (per rank)          the offloaded AdamW moments, 2·P·b / S

World 1 is one process without FSDP (`engine.parallelize.SINGLE`): S = 1 and nothing is gathered, so the
gathered groups, unsharded gradients and weight sync items are 0. `state_bytes` leaves out the items that
grow with the micro-batch and the context (`BATCH_ITEMS`: activations, loss, KV cache): what
`engine.build.check_recipe_fits` holds against a device's free memory before a one-process run starts.

Not computed: CUDA context and NCCL buffers (~1 GiB per rank), vLLM's activation workspace and CUDA graphs,
allocator fragmentation, the helper engine's KV cache, the weight sync's staging bucket. Importing this
module imports neither torch, transformers nor vLLM; `Shape.from_config` counts parameters with transformers
on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GiB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
ACTIVATIONS, LOSS, KV_CACHE = "activations", "loss (rows, fp32 dW, logits chunk)", "vLLM KV cache"
BATCH_ITEMS = (ACTIVATIONS, LOSS, KV_CACHE)  # grow with the micro-batch and the context; not in state_bytes


def attention_dims(config: Any) -> tuple[int, int, int, int]:
    """(layers, heads, KV heads, head_dim) of an HF config object or its config.json dict; KV heads default
    to the heads and head_dim to hidden / heads, as transformers does."""
    get = config.get if isinstance(config, Mapping) else lambda key: getattr(config, key, None)
    heads = int(get("num_attention_heads"))
    head_dim = int(get("head_dim") or get("hidden_size") // heads)
    return int(get("num_hidden_layers")), heads, int(get("num_key_value_heads") or heads), head_dim


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """KV-cache bytes one token takes: 2 (K and V) × layers × KV heads × head_dim × element size."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes


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
        layers, heads, kv_heads, head_dim = attention_dims(config)
        return cls(
            vocab=int(config.vocab_size),
            hidden=int(config.hidden_size),
            ffn=int(config.intermediate_size),
            layers=layers,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            params=num_parameters(model),
            layer_params=num_parameters(decoder_layers(model)[0]),
        )


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
    vllm: bool = True  # the policy's rollout engine is vLLM (its own weights); False: the embedded engine
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
    fsdp = layout.world > 1  # one process trains unsharded: no group is ever gathered
    shard = -(-p // s) * b  # FSDP pads each parameter's dim 0 to a multiple of S; negligible at these sizes
    layer_full = shape.layer_params * b
    layer_acts = 2 * t * (2 * shape.heads * h + 2 * shape.kv_heads * h + 2 * d + 4 * shape.ffn) * b
    if layout.gradient_checkpointing:
        activations = shape.layers * t * d * b + layer_acts
    else:
        activations = shape.layers * layer_acts
    kv_per_token = kv_bytes_per_token(shape.layers, shape.kv_heads, h, b) // layout.tp
    trajectories = layout.queries * layout.group_size // layout.rollout_groups
    vllm_weights = p * b // layout.tp
    train = {
        "weights shard": shard,
        "reference shard": shard if layout.reference else 0,
        "gradients shard": shard,
        "AdamW moments shard": 2 * shard,
        "gathered root + 2 layers": shape.root_params * b + 2 * layer_full if fsdp else 0,
        "unsharded gradients (root + 1 layer)": shape.root_params * b + layer_full if fsdp else 0,
        ACTIVATIONS: activations,
        LOSS: t * d * (b + 4) + shape.vocab * d * 4 + int(layout.loss_chunk_mib * (1 << 20)),
    }
    rollout = {
        "weights shard": shard,
        "reference shard": shard if layout.reference else 0,
        "vLLM weights": vllm_weights if layout.vllm else 0,
        "vLLM helper weights": vllm_weights if layout.vllm_helper else 0,
        KV_CACHE: trajectories * layout.max_model_len * kv_per_token,
        "weight sync (largest group gathered)": max(shape.root_params, shape.layer_params) * b if fsdp else 0,
    }
    return {"train": train, "rollout": rollout, "host": {"offloaded AdamW moments": 2 * shard}}


def state_bytes(plan: dict[str, dict[str, int]]) -> dict[str, int]:
    """Per phase of a `rank_memory` plan, the bytes that do not grow with the batch or the context (weights
    and their copies, gradients, AdamW moments, gathered groups): every item but `BATCH_ITEMS`."""
    return {phase: sum(v for k, v in items.items() if k not in BATCH_ITEMS) for phase, items in plan.items()}


def one_process_state(shape: Shape, **layout: Any) -> dict[str, int]:
    """`state_bytes` of one process (world 1: nothing sharded or gathered) running `Layout(**layout)`."""
    return state_bytes(rank_memory(shape, Layout(nnodes=1, nproc_per_node=1, **layout)))
