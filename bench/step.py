"""`flowgrpo bench step`: where a training step's time and memory go, per rollout engine.

For each engine in --engines (embedded, and vLLM where it is importable and the planner is a model
directory) this builds the preset's `engine.loop.TrainLoop` in a fresh run directory and runs
`--steps` steps, exactly as `flowgrpo train` does. Step 1 includes warm-up (vLLM's first
generate, allocator growth, lazy initialisation) and is left out of every figure unless it is the
only step, in which case the output says so. From the measured steps' metrics lines:

- **phases** (`timing_s/<phase>`, disjoint: the loop already takes the judge's time `reward` out of
  `gen` and the weight sync `update_weights` out of `wake`): mean seconds, share of the mean step;
  `other` = step − the sum of the phases (loop bookkeeping, metrics, the progress line).
  `save_checkpoint` happens on the last step only (the loop saves at its last step).
- **step time**: median and p20/p80 over the measured steps; the header names the packed-attention
  backend the trainer ran (`engine.attention`).
- **throughput**: generated tokens/s during `gen` (every agent's tokens), training tokens/s during
  the trainer's phases (`perf/train_tokens_per_s`), trajectories/s over the whole step.
- **memory per phase**, the maximum over the measured steps of the snapshot taken when the phase
  ends: on CUDA the phase's own torch peak (`peak_allocated_gb`, reset when the phase starts), on
  CPU the process RSS (`rss_gb`; it includes everything the process ever touched and rarely falls).

On CPU the default preset is `tiny` (its tiny model is built once and shared by both engines);
on CUDA `qwen2.5-1.5b` with random bf16 weights built on the device (embedded engine: vLLM loads
from a directory). Prints a table per engine, the conditions, and a last-line JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.harness import percentile
from engine.timer import PHASES as STEP_PHASES

PHASES = tuple(p for p in STEP_PHASES if p != "step")
TRAIN_PHASES = ("pack", "old_log_prob", "ref", "update_actor")
ENGINES = ("embedded", "vllm")


def default_preset(device: torch.device) -> str:
    return "qwen2.5-1.5b" if device.type == "cuda" else "tiny"


def memory_field(device: torch.device) -> tuple[str, str]:
    """(metric field, label) of the per-phase memory figure on this device."""
    if device.type == "cuda":
        return "peak_allocated_gb", "torch peak allocated in the phase"
    return (
        "rss_gb",
        "process RSS at the phase end (CPU; engines run one after another in this process, so RSS carries over)",
    )


def available_engines(cfg) -> list[str]:
    """The engines this preset can run here: vLLM needs the package and a model directory."""
    from engine.build import vllm_available

    has_dir = cfg.model.path is not None or cfg.model.arch == "tiny"
    return ["embedded", *(["vllm"] if vllm_available() and has_dir else [])]


def build_config(preset_name: str, engine: str, run_dir: Path, *, steps: int, **overrides: Any):
    """The preset for a benchmark: `steps` steps, one checkpoint at the end, overrides of B and G applied."""
    from engine.presets import preset, with_overrides

    return with_overrides(
        preset(preset_name, run_dir=str(run_dir)),
        group_size=overrides.get("group_size"),
        queries_per_step=overrides.get("queries"),
        model=None if overrides.get("model") is None else str(overrides["model"]),
        engine=engine,
        steps=steps,
        save_every=10**9,
        keep_last=1,
    )


def shared_tiny_model(cfg, root: Path) -> Path | None:
    """Build the preset's tiny model once under `root` (both engines then load the same weights)."""
    if cfg.model.arch != "tiny" or cfg.model.path is not None:
        return None
    from engine.tiny import ensure_tiny

    return ensure_tiny(root / "model", cfg.model.tiny)[0]


def run_steps(cfg, info: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run a TrainLoop for `cfg.steps` steps (its console output captured); the metrics lines.
    `info`, if given, receives the packed-attention backend the trainer ran (`attention`)."""
    from engine.attention import packed_attention_of
    from engine.loop import TrainLoop
    from engine.metrics import read_metrics

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    console = io.StringIO()
    loop = TrainLoop(cfg, out=console)
    if info is not None:
        info["attention"] = packed_attention_of(loop.model).name
    try:
        loop.run()
    finally:
        shutdown = getattr(loop.engine, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del loop
    return read_metrics(Path(cfg.run_dir) / "metrics.jsonl")


def summarize(records: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """Phase shares, step time, throughput and memory per phase of the measured (post-warm-up) steps."""
    warm = len(records) > 1
    rows = records[1:] if warm else records
    step_s = [r["timing_s/step"] for r in rows]
    mean_step = statistics.fmean(step_s)
    phases = {}
    for p in PHASES:
        vals = [r.get(f"timing_s/{p}") or 0.0 for r in rows]
        phases[p] = {"mean_s": statistics.fmean(vals), "share_pct": 100 * statistics.fmean(vals) / mean_step}
    other = mean_step - sum(v["mean_s"] for v in phases.values())
    phases["other"] = {"mean_s": other, "share_pct": 100 * other / mean_step}
    field, label = memory_field(device)
    memory = {}
    for p in (*PHASES, "step"):
        vals = [r.get(f"memory/{p}/{field}") for r in rows]
        vals = [v for v in vals if v is not None]
        memory[p] = max(vals) if vals else None

    def mean_of(key: str) -> float | None:
        vals = [r.get(key) for r in rows if r.get(key) is not None]
        return statistics.fmean(vals) if vals else None

    trajectories = mean_of("rollout/num_trajectories") or 0.0
    return {
        "steps_measured": [r["step"] for r in rows],
        "includes_warmup": not warm,
        "step_s_median": statistics.median(step_s),
        "step_s_p20": percentile(step_s, 20),
        "step_s_p80": percentile(step_s, 80),
        "step_s_mean": mean_step,
        "phases": phases,
        "memory_field": field,
        "memory_label": label,
        "memory_gb": memory,
        "generated_tokens_per_s": mean_of("perf/rollout_tokens_per_s"),
        "train_tokens_per_s": mean_of("perf/train_tokens_per_s"),
        "trajectories_per_s": trajectories / mean_step if mean_step > 0 else None,
        "trajectories": trajectories,
        "train_tokens": mean_of("actor/num_packed_tokens"),
        "generated_tokens": mean_of("rollout/generated_tokens"),
        "train_peak_gb": max(
            (memory[p] for p in TRAIN_PHASES if memory[p] is not None),
            default=None,
        ),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_summary(engine: str, s: dict[str, Any]) -> str:
    warm = "includes warm-up (one step only)" if s["includes_warmup"] else "step 1 (warm-up) left out"
    lines = [
        f"engine {engine}: steps {s['steps_measured']} ({warm}); step {s['step_s_median']:.3f} s median "
        f"(p20 {s['step_s_p20']:.3f}, p80 {s['step_s_p80']:.3f}); packed attention {s.get('attention', '?')}",
        f"{'phase':<16} {'mean s':>9} {'share':>7} {'memory GiB':>11}  what",
    ]
    for p, v in s["phases"].items():
        mem = s["memory_gb"].get(p)
        lines.append(
            f"{p:<16} {v['mean_s']:>9.4f} {v['share_pct']:>6.1f}% {_fmt(mem, '.3f'):>11}  {STEP_PHASES.get(p, 'step - sum of phases')}"
        )
    lines.append(
        f"throughput: {_fmt(s['generated_tokens_per_s'], '.0f')} generated tok/s in gen, "
        f"{_fmt(s['train_tokens_per_s'], '.0f')} training tok/s in the trainer, "
        f"{_fmt(s['trajectories_per_s'], '.2f')} trajectories/s per step "
        f"({s['trajectories']:.0f} trajectories, {_fmt(s['train_tokens'], '.0f')} training tokens per step)"
    )
    lines.append(f"memory: {s['memory_label']} ({s['memory_field']}); '-' where the phase takes no snapshot")
    return "\n".join(lines)


def check_group_args(args: argparse.Namespace) -> str | None:
    if args.steps is not None and args.steps < 1:
        return f"--steps must be >= 1, got {args.steps}"
    if getattr(args, "group_size", None) is not None and args.group_size < 1:
        return f"--group-size must be >= 1, got {args.group_size}"
    if args.queries is not None and args.queries < 1:
        return f"--queries must be >= 1, got {args.queries}"
    return None


def add_common(parser: argparse.ArgumentParser) -> None:
    from engine.presets import PRESETS

    parser.add_argument(
        "--preset", choices=sorted(PRESETS), default=None, help="default: tiny on CPU, qwen2.5-1.5b on CUDA"
    )
    parser.add_argument("--model", default=None, help="a local HF model directory instead of the preset's")
    parser.add_argument("--queries", type=int, default=None, help="queries per step B (default: the preset's)")
    parser.add_argument("--run-dir", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument(
        "--save", nargs="?", const="", default=None, metavar="PATH", help="write the JSON (default: bench/results/)"
    )
    parser.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, run nothing")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument(
        "--engines", default=None, help=f"comma-separated of {list(ENGINES)} (default: every available)"
    )
    parser.add_argument("--steps", type=int, default=3, help="steps per engine; the first is warm-up (default 3)")
    parser.add_argument("--group-size", type=int, default=None, help="trajectories per query G (default: the preset's)")


def resolve_engines(text: str | None, cfg) -> list[str]:
    """The engines asked for (or every available one); ValueError naming the problem."""
    available = available_engines(cfg)
    if text is None:
        return available
    wanted = [e for e in text.split(",") if e]
    for e in wanted:
        if e not in ENGINES:
            raise ValueError(f"unknown engine {e!r}; choose from {list(ENGINES)}")
        if e not in available:
            raise ValueError(
                f"engine {e!r} is not available here (vLLM needs the vllm package and a model directory; "
                f"available: {available})"
            )
    if not wanted:
        raise ValueError("--engines is empty")
    return wanted


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    error = check_group_args(args)
    preset_name = args.preset or default_preset(device)
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="flowgrpo-bench-step-"))
    try:
        probe = build_config(
            preset_name,
            "auto",
            root,
            steps=args.steps,
            group_size=args.group_size,
            queries=args.queries,
            model=args.model,
        )
        engines = resolve_engines(args.engines, probe)
    except ValueError as e:
        error = error or str(e)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(
            f"# dry run: preset {preset_name}, engines {engines}, B={probe.task.queries_per_step} x "
            f"G={probe.task.group_size}, {args.steps} steps, {probe.model.dtype}"
        )
        if not args.run_dir:
            root.rmdir()  # the empty temporary directory made above
        return 0
    model = args.model or shared_tiny_model(probe, root)
    summaries: dict[str, Any] = {}
    for engine in engines:
        cfg = build_config(
            preset_name,
            engine,
            root / engine,
            steps=args.steps,
            group_size=args.group_size,
            queries=args.queries,
            model=model,
        )
        info: dict[str, Any] = {}
        try:
            records = run_steps(cfg, info)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            print(f"error: engine {engine}: {e}", file=sys.stderr)
            return 1
        s = summarize(records, device)
        s["attention"] = info["attention"]
        s["config"] = {
            "preset": preset_name,
            "queries": cfg.task.queries_per_step,
            "group_size": cfg.task.group_size,
            "steps": args.steps,
            "dtype": cfg.model.dtype,
            "micro_batch_tokens": cfg.trainer.micro_batch_tokens,
        }
        summaries[engine] = s
        print(format_summary(engine, s), flush=True)
        print()
    cond = report.conditions(device)
    print(
        f"# preset {preset_name}, B={cfg.task.queries_per_step} x G={cfg.task.group_size}, {cfg.model.dtype}, "
        f"{args.steps} steps per engine"
    )
    print(report.conditions_line(cond))
    payload = {"bench": "step", "conditions": cond, "engines": summaries}
    if args.save is not None:
        print(f"# saved {report.save(payload, 'step', args.save or None)}")
    print(json.dumps(payload))
    return 0
