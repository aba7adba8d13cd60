"""`flowgrpo bench {kernels,step,scale,rollout,allocator,ceilings,retrieval,memory}`: the instruments, each in its own module.

    kernels   micro-benchmarks of the fused ops against the eager reference, torch.compile and Liger
              (`bench.kernels`), with the roofline of the same run (`bench.roofline`)
    attention the packed-attention backends (varlen, FlexAttention, SDPA per sequence) on one pack (`bench.attention`)
    step      the phase breakdown of a few training steps of a preset, per rollout engine (`bench.step`)
    scale     a sweep of the group size G at fixed queries and hardware, until the first OOM (`bench.scale`)
    rollout   lock-step against continuous scheduling of the four-agent loop on vLLM (`bench.rollout`)
    allocator pause/resume bandwidth of the VMM allocator against plain pinned copies (`bench.allocator`)
    ceilings  copy GB/s, matmul TFLOP/s at the LM-head shapes, pinned host<->device GB/s (`bench.ceilings`)
    retrieval build/load time and queries/s of the search indexes on a generated corpus (`bench.retrieval`)
    memory    device memory per rank for FSDP2/HSDP training with colocated vLLM, computed from the shape

Each module defines `add_arguments(parser)` and `main(args) -> int`; this one only dispatches, and imports
only the chosen module (as `engine.cli` does for commands).
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "kernels": ("bench.kernels", "kernel micro-benchmarks: time, memory, GB/s, roofline ratio, correctness gate"),
    "attention": ("bench.attention", "packed-attention backends on one pack of planner-turn lengths: fwd, fwd+bwd ms"),
    "step": ("bench.step", "phase breakdown of a few training steps (seconds, share, tokens/s, memory)"),
    "scale": ("bench.scale", "group-size sweep until the first out-of-memory: step time, tokens/s, memory"),
    "rollout": ("bench.rollout", "lock-step vs continuous rollout scheduling: trajectories/s, busy fraction, latency"),
    "allocator": ("bench.allocator", "VMM allocator pause/resume GB/s against pinned copies (CUDA only)"),
    "ceilings": ("bench.ceilings", "the device's ceilings: copy GB/s, LM-head matmul TFLOP/s, pinned copy GB/s"),
    "retrieval": ("bench.retrieval", "search index build time, load time and queries/s on a generated corpus"),
    "memory": ("bench.memory", "device memory per rank (FSDP2/HSDP + colocated vLLM), computed from the model shape"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "instruments:\n" + "\n".join(f"  {k:<9} {text}" for k, (_, text) in SUBCOMMANDS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "instrument", choices=list(SUBCOMMANDS), help="flowgrpo bench INSTRUMENT --help for its options"
    )
    parser.add_argument("options", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def main(args: argparse.Namespace) -> int:
    module_name, text = SUBCOMMANDS[args.instrument]
    module = importlib.import_module(module_name)  # only the chosen one: `bench kernels` never imports the loop
    parser = argparse.ArgumentParser(prog=f"flowgrpo bench {args.instrument}", description=text)
    module.add_arguments(parser)
    return int(module.main(parser.parse_args(args.options)) or 0)
