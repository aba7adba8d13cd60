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

With `--nproc-per-node N` each engine's steps run as `flowgrpo train --nproc-per-node N` (torchrun,
FSDP2, one rollout engine per rank or per `--tp` ranks; `engine.ranks`) in a subprocess; the
phase table is that of the combined metrics line (means over ranks), followed by every rank's
own breakdown (`ranks.jsonl`) and the rollout imbalance: the fastest and the slowest rank's `gen`
time and their spread, (slowest − fastest) / slowest.

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
import subprocess
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


def run_steps_distributed(cfg, nproc: int, tp: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`cfg`'s steps under `flowgrpo train --nproc-per-node nproc --tp tp`; (metrics lines, ranks.jsonl lines)."""
    from engine.metrics import read_metrics
    from engine.ranks import RANK_TIMING_FILE

    argv = ["--preset", cfg.preset, "--run-dir", cfg.run_dir, "--engine", cfg.rollout.engine, "--steps", str(cfg.steps)]
    argv += ["--queries-per-step", str(cfg.task.queries_per_step), "--group-size", str(cfg.task.group_size)]
    argv += ["--save-every", str(cfg.save_every), "--nproc-per-node", str(nproc), "--tp", str(tp)]
    argv += ["--model", cfg.model.path] if cfg.model.path is not None else []
    env = {**os.environ, "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR")}
    res = subprocess.run(
        [sys.executable, "-m", "engine.cli", "train", *argv], capture_output=True, text=True, env=env, check=False
    )
    if res.returncode != 0:
        raise RuntimeError(f"flowgrpo train {' '.join(argv)} exited {res.returncode}:\n{res.stderr[-3000:]}")
    return read_metrics(Path(cfg.run_dir) / "metrics.jsonl"), read_metrics(Path(cfg.run_dir) / RANK_TIMING_FILE)


def summarize_ranks(rank_lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Per rank, the mean seconds of each phase over the measured steps; the fastest and slowest rank's gen."""
    rows = rank_lines[1:] if len(rank_lines) > 1 else rank_lines
    world = len(rows[0]["ranks"])
    per_rank = []
    for r in range(world):
        phases = {}
        for p in ("step", *PHASES):
            vals = [line["ranks"][r].get(f"timing_s/{p}") or 0.0 for line in rows]
            phases[p] = statistics.fmean(vals)
        per_rank.append(phases)
    gen = [p["gen"] for p in per_rank]
    step = [p["step"] for p in per_rank]
    return {
        "world": world,
        "per_rank_s": per_rank,
        "gen_s_fastest": min(gen),
        "gen_s_slowest": max(gen),
        "gen_spread_pct": 100 * (max(gen) - min(gen)) / max(gen) if max(gen) > 0 else 0.0,
        "step_s_fastest": min(step),
        "step_s_slowest": max(step),
    }


def format_ranks(s: dict[str, Any]) -> str:
    cols = ("step", "gen", "update_actor", "ref", "gap_probe", "update_weights")
    lines = [f"{'rank':<6}" + "".join(f"{c:>15}" for c in cols)]
    for r, phases in enumerate(s["per_rank_s"]):
        lines.append(f"{r:<6}" + "".join(f"{phases[c]:>15.4f}" for c in cols))
    lines.append(
        f"rollout imbalance: gen fastest {s['gen_s_fastest']:.3f} s, slowest {s['gen_s_slowest']:.3f} s "
        f"(spread {s['gen_spread_pct']:.1f}% of the slowest); step fastest {s['step_s_fastest']:.3f} s, "
        f"slowest {s['step_s_slowest']:.3f} s"
    )
    return "\n".join(lines)


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
    parser.add_argument(
        "--nproc-per-node", type=int, default=None, help="run each engine's steps on N processes (torchrun, FSDP2)"
    )
    parser.add_argument(
        "--tp", type=int, default=1, help="with --nproc-per-node: vLLM tensor-parallel size (default 1)"
    )


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
        nproc = args.nproc_per_node or 1
        if nproc > 1:
            from dataclasses import replace

            from engine.ranks import check_layout

            for e in engines:
                check_layout(
                    replace(probe, rollout=replace(probe.rollout, engine=e, tensor_parallel_size=args.tp)), nproc
                )
        elif args.tp != 1:
            raise ValueError("--tp needs --nproc-per-node (a tensor-parallel engine spans several processes)")
    except ValueError as e:
        error = error or str(e)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(
            f"# dry run: preset {preset_name}, engines {engines}, B={probe.task.queries_per_step} x "
            f"G={probe.task.group_size}, {args.steps} steps, {probe.model.dtype}, {nproc} process(es), tp {args.tp}"
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
            if nproc > 1:
                records, rank_lines = run_steps_distributed(cfg, nproc, args.tp)
            else:
                records = run_steps(cfg, info)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            print(f"error: engine {engine}: {e}", file=sys.stderr)
            return 1
        s = summarize(records, device)
        if nproc > 1:
            s["ranks"] = summarize_ranks(rank_lines)
            s["memory_label"] = f"{s['memory_field']} at the phase end, mean over the {nproc} ranks"
        s["attention"] = info.get("attention", "see the run's header")
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
        if nproc > 1:
            s["config"].update(nproc_per_node=nproc, tp=args.tp)
            print(format_ranks(s["ranks"]), flush=True)
        print()
    cond = report.conditions(device)
    print(
        f"# preset {preset_name}, B={cfg.task.queries_per_step} x G={cfg.task.group_size}, {cfg.model.dtype}, "
        f"{args.steps} steps per engine, {nproc} process(es), tp {args.tp}"
    )
    print(report.conditions_line(cond))
    payload = {"bench": "step", "conditions": cond, "engines": summaries}
    if args.save is not None:
        print(f"# saved {report.save(payload, 'step', args.save or None)}")
    print(json.dumps(payload))
    return 0
