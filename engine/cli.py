"""`flowgrpo`: the command line. Each subcommand lives in the module that owns it.

Parsing is two-stage so `flowgrpo --help` does not import torch: the first word picks a module
from COMMANDS, which then defines its own arguments (`add_arguments(parser)`) and runs (`main(args)`).
A `UsageError` (bad input found before any work, `engine.preflight`) prints as one line,
`flowgrpo: error: <line>`, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from engine.preflight import UsageError

COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("engine.tiny", "build a tiny tokenizer + random Qwen2 model locally (no network)"),
    "make-model": ("engine.make_model", "build an HF model directory from installed files (SmolLM2, tiny Llama)"),
    "train": ("engine.train", "Flow-GRPO training of the planner in the colocated loop (the main job)"),
    "solve": ("engine.solve", "run the four-agent loop on a task set and write trajectories"),
    "eval": ("engine.eval", "accuracy per benchmark (AgentFlow's test layout), greedy, with 95% intervals"),
    "check-sync": ("engine.check_sync", "perturb trainer weights, sync them into the rollout engine, report the gap"),
    "bench": ("bench.cli", "micro-benchmarks, step-time breakdown and group-size scaling"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: flowgrpo COMMAND [options]   (flowgrpo COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flowgrpo: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"flowgrpo {name}: not available in this build ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"flowgrpo {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except UsageError as e:
        print(f"flowgrpo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
