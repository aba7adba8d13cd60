"""`flowgrpo bench scale`: group size G against step time and memory, at fixed queries and hardware.

For each G in --groups (ascending; default 4, 8, 16, … up to --max-group on CUDA, 2, 4, 8 on CPU)
this builds the preset with `group_size = G` (B = --queries fixed) in a fresh run directory and
runs --steps steps through `bench.step.run_steps` (the `flowgrpo train` loop); step 1 is warm-up
and left out (`bench.step.summarize`). Per point: median step time, time per trajectory (step /
(B·G)), training tokens/s, and peak memory per phase group: rollout (`gen`), train (the maximum
over pack, old_log_prob, ref and update_actor) and wake; on CUDA the phases' own torch peaks, on
CPU the process RSS (label in the output).

The first out-of-memory (torch.OutOfMemoryError, a driver error that says so, or the loop's
PhaseOutOfMemoryError naming the phase) ends the sweep: it is reported with its message and the
largest G that fitted is printed. On CPU the allocator's refusal (ENOMEM) counts as out of memory;
the kernel's OOM killer, which ends the process instead, cannot be caught: sweep CPU memory with care.
Memory is released between points (the loop and engine dropped, gc, the CUDA cache emptied).

The trainer packs sequences into micro-batches of a fixed token budget, so training memory should
stay flat as G grows while step time grows with the B·G trajectories; the plot shows whether it
does. Writes `<device>-<date>-scale.csv` and `.png` (step time and time per trajectory against G;
peak memory per phase group against G; the OOM point marked) into --out, prints a table, the
conditions and a last-line JSON; --save also writes the JSON.
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import report
from bench.step import (
    add_common,
    available_engines,
    build_config,
    default_preset,
    run_steps,
    shared_tiny_model,
    summarize,
)
from engine.device_memory import PhaseOutOfMemoryError, is_oom

CSV_COLUMNS = (
    "group_size",
    "status",
    "trajectories",
    "step_s",
    "step_s_p20",
    "step_s_p80",
    "s_per_trajectory",
    "train_tokens_per_s",
    "generated_tokens_per_s",
    "train_tokens",
    "rollout_peak_gb",
    "train_peak_gb",
    "wake_peak_gb",
    "error",
)


def default_groups(device: torch.device, max_group: int) -> list[int]:
    if device.type != "cuda":
        return [2, 4, 8]
    out, g = [], 4
    while g <= max_group:
        out.append(g)
        g *= 2
    return out


def parse_groups(text: str) -> list[int]:
    try:
        groups = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--groups {text!r} is not a comma-separated list of integers (e.g. 4,8,16)") from None
    if not groups or groups[0] < 1:
        raise ValueError(f"--groups needs sizes >= 1, got {text!r}")
    return groups


def _oom_message(exc: BaseException) -> str | None:
    if isinstance(exc, PhaseOutOfMemoryError) or is_oom(exc):
        return str(exc).strip().splitlines()[0][:400]
    cause = exc.__cause__
    return _oom_message(cause) if cause is not None else None


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sweep(
    groups: list[int],
    run_point: Callable[[int], dict[str, Any]],
    *,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> list[dict[str, Any]]:
    """Run `run_point(G)` for G in `groups` (a summary from `bench.step.summarize`) until the first OOM.

    With `budget_s`, a point is not started when the time spent so far plus twice the last point's time
    (a point's time grows with G, which at least doubles from one point to the next) would pass the budget.
    Returns one row per G that ran, the OOM row last when there was one; other exceptions propagate."""
    rows = []
    start = last = clock()
    for g in groups:
        now = clock()
        if budget_s is not None and rows and (now - start) + 2 * (now - last) > budget_s:
            break
        last = now
        oom = None
        try:
            s = run_point(g)
        except Exception as e:
            oom = _oom_message(e)
            if oom is None:
                raise
        if oom is not None:
            rows.append({"group_size": g, "status": "oom", "error": oom})
            _release()  # out of the except block: its traceback no longer pins the failed point's tensors
            if on_point:
                on_point(rows[-1])
            break
        mem = s["memory_gb"]
        rows.append(
            {
                "group_size": g,
                "status": "ok",
                "trajectories": s["trajectories"],
                "step_s": s["step_s_median"],
                "step_s_p20": s["step_s_p20"],
                "step_s_p80": s["step_s_p80"],
                "s_per_trajectory": s["step_s_median"] / s["trajectories"] if s["trajectories"] else None,
                "train_tokens_per_s": s["train_tokens_per_s"],
                "generated_tokens_per_s": s["generated_tokens_per_s"],
                "train_tokens": s["train_tokens"],
                "rollout_peak_gb": mem.get("gen"),
                "train_peak_gb": s["train_peak_gb"],
                "wake_peak_gb": mem.get("wake"),
                "memory_field": s["memory_field"],
                "error": None,
            }
        )
        _release()
        if on_point:
            on_point(rows[-1])
    return rows


def largest_fitting(rows: list[dict[str, Any]]) -> int | None:
    ok = [r["group_size"] for r in rows if r["status"] == "ok"]
    return max(ok) if ok else None


def train_memory_spread(rows: list[dict[str, Any]]) -> float | None:
    """(max − min) / min of the train peak over the points that ran: 0.1 means within 10%."""
    vals = [r["train_peak_gb"] for r in rows if r["status"] == "ok" and r.get("train_peak_gb")]
    return (max(vals) - min(vals)) / min(vals) if len(vals) > 1 else None


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]], memory_label: str) -> str:
    head = f"{'G':>5} {'status':<6} {'step s':>8} {'s/traj':>8} {'train tok/s':>12} {'rollout GiB':>12} {'train GiB':>10} {'wake GiB':>9}"
    lines = [head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['group_size']:>5} {r['status']:<6} {r['error']}")
            continue
        lines.append(
            f"{r['group_size']:>5} {r['status']:<6} {r['step_s']:>8.3f} {_fmt(r['s_per_trajectory'], '.4f'):>8} "
            f"{_fmt(r['train_tokens_per_s'], '.0f'):>12} {_fmt(r['rollout_peak_gb'], '.3f'):>12} "
            f"{_fmt(r['train_peak_gb'], '.3f'):>10} {_fmt(r['wake_peak_gb'], '.3f'):>9}"
        )
    lines.append(f"memory: {memory_label}")
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    from engine.fsio import atomic_write_bytes

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in CSV_COLUMNS})
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def plot(rows: list[dict[str, Any]], path: Path, title: str, memory_label: str) -> Path | None:
    """Two panels against G (log2 axis); None (and a message) where matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"# plot skipped: matplotlib is not importable ({e})", file=sys.stderr)
        return None
    ok = [r for r in rows if r["status"] == "ok"]
    oom = [r for r in rows if r["status"] == "oom"]
    g = [r["group_size"] for r in ok]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(g, [r["step_s"] for r in ok], "o-", label="step time (median)")
    ax1.set_ylabel("step time (s)")
    twin = ax1.twinx()
    twin.plot(g, [r["s_per_trajectory"] for r in ok], "s--", color="tab:orange", label="time per trajectory")
    twin.set_ylabel("s per trajectory")
    handles = ax1.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax1.legend(handles=handles, loc="upper center", fontsize=8)  # one legend, clear of both curves' ends
    for key, label in (("rollout_peak_gb", "rollout (gen)"), ("train_peak_gb", "train"), ("wake_peak_gb", "wake")):
        ax2.plot(g, [r[key] for r in ok], "o-", label=label)
    ax2.set_ylabel("peak memory (GiB)")
    ax2.set_title(textwrap.fill(memory_label, 70), fontsize=8)
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["group_size"] for r in rows], [str(r["group_size"]) for r in rows])
        ax.set_xlim(rows[0]["group_size"] / 1.3, rows[-1]["group_size"] * 1.3)  # an OOM line at the end stays inside
        ax.set_xlabel("group size G")
        ax.grid(alpha=0.3)
        for r in oom:
            ax.axvline(r["group_size"], color="red", ls=":")
            ax.text(
                r["group_size"],
                0.5,
                f"out of memory at G={r['group_size']} ",
                color="red",
                rotation=90,
                ha="right",
                va="center",
                fontsize=8,
                transform=ax.get_xaxis_transform(),
            )
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument(
        "--groups", default=None, help="comma-separated G values (default: 4,8,16,... on CUDA; 2,4,8 on CPU)"
    )
    parser.add_argument(
        "--max-group", type=int, default=256, help="largest G of the default sweep on CUDA (default 256)"
    )
    parser.add_argument("--engine", choices=("embedded", "vllm"), default=None, help="default: vllm where available")
    parser.add_argument("--steps", type=int, default=2, help="steps per point; the first is warm-up (default 2)")
    parser.add_argument(
        "--out", default=str(report.RESULTS_DIR), help="directory of the CSV and PNG (default bench/results)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="start no point that would end past this many seconds (at twice the last point's time); default: none",
    )


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    preset_name = args.preset or default_preset(device)
    root = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="flowgrpo-bench-scale-"))
    try:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.queries is not None and args.queries < 1:
            raise ValueError(f"--queries must be >= 1, got {args.queries}")
        if args.budget_s is not None and args.budget_s <= 0:
            raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
        groups = parse_groups(args.groups) if args.groups else default_groups(device, args.max_group)
        probe = build_config(preset_name, "auto", root, steps=args.steps, queries=args.queries, model=args.model)
        for g in groups:  # the preset's own checks (e.g. G >= 2) before anything runs
            build_config(preset_name, "auto", root, steps=args.steps, group_size=g, queries=args.queries)
        available = available_engines(probe)
        engine = args.engine or available[-1]
        if engine not in available:
            raise ValueError(f"engine {engine!r} is not available here (available: {available})")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    queries = args.queries or probe.task.queries_per_step
    if args.dry_run:
        budget = "" if args.budget_s is None else f", budget {args.budget_s:g} s"
        print(
            f"# dry run: preset {preset_name}, engine {engine}, B={queries}, G in {groups}, {args.steps} steps{budget}"
        )
        if not args.run_dir:
            root.rmdir()  # the empty temporary directory made above
        return 0
    model = args.model or shared_tiny_model(probe, root)

    def run_point(g: int) -> dict[str, Any]:
        cfg = build_config(
            preset_name, engine, root / f"G{g}", steps=args.steps, group_size=g, queries=queries, model=model
        )
        return summarize(run_steps(cfg), device)

    def progress(row: dict[str, Any]) -> None:
        if row["status"] == "ok":
            print(f"# G={row['group_size']}: step {row['step_s']:.3f} s", flush=True)
        else:
            print(f"# G={row['group_size']}: out of memory: {row['error']}", flush=True)

    rows = sweep(groups, run_point, on_point=progress, budget_s=args.budget_s)
    not_run = groups[len(rows) :] if rows and rows[-1]["status"] == "ok" else []
    cond = report.conditions(device)
    memory_label = (
        "torch peak allocated in the phase"
        if device.type == "cuda"
        else "process RSS at the phase end (CPU; one process runs the whole sweep, so RSS carries over from earlier points)"
    )
    fits = largest_fitting(rows)
    spread = train_memory_spread(rows)
    title = f"flowgrpo bench scale · {preset_name} · B={queries} · {engine} · {cond['device']} · torch {cond['torch']}"
    print(f"# preset {preset_name}, B={queries} queries per step, engine {engine}, {args.steps} steps per point")
    print(report.conditions_line(cond))
    print(format_table(rows, memory_label))
    print(
        f"largest G that fits: {fits if fits is not None else 'none'}"
        + ("" if rows[-1]["status"] == "oom" else " (no OOM within the sweep)")
        + (f"; G={not_run} not run: the next point would pass --budget-s {args.budget_s:g}" if not_run else "")
    )
    if spread is not None:
        print(f"train peak memory spread over the sweep: {100 * spread:.1f}% ((max - min) / min)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = report.result_path(cond, "scale", out).with_suffix("")
    csv_path = write_csv(rows, stem.with_suffix(".csv"))
    png_path = plot(rows, stem.with_suffix(".png"), title, memory_label)
    print(f"# wrote {csv_path}" + (f" and {png_path}" if png_path else ""))
    payload = {
        "bench": "scale",
        "conditions": cond,
        "preset": preset_name,
        "engine": engine,
        "queries": queries,
        "steps_per_point": args.steps,
        "memory": memory_label,
        "largest_fitting_group": fits,
        "not_run_budget": not_run,
        "train_memory_spread": spread,
        "rows": rows,
        "csv": str(csv_path),
        "png": None if png_path is None else str(png_path),
    }
    if args.save is not None:
        print(f"# saved {report.save(payload, 'scale', args.save or None)}")
    print(json.dumps(payload))
    return 0
