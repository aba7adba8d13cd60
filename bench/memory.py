"""`flowgrpo bench memory`: the device memory one rank needs, computed from the model shape (not measured).

The command line and the table of `engine.memory_model` (each item's formula is in its module doc): one
column per layout (by default the 1×8 and 2×8 layouts), the phase totals, the larger phase and the headroom
on an H100 and an H200, then the JSON of every figure. `flowgrpo bench step --model DIR` measures the phases
on a real device.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from engine.memory_model import DTYPE_BYTES, GiB, Layout, Shape, load_shape, rank_memory

DEVICES_GIB = {"H100 80GB": 80.0, "H200 141GB": 139.8}


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


def _sharding(lay: Layout) -> str:
    if lay.world == 1:
        return "no FSDP"
    return "HSDP" if lay.hsdp and lay.nnodes > 1 else "FSDP"


def format_table(name: str, shape: Shape, plans: list[tuple[Layout, dict[str, dict[str, int]]]]) -> str:
    heads = [f"{lay.nnodes}×{lay.nproc_per_node} {_sharding(lay)}" for lay, _ in plans]
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
