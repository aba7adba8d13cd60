"""The step record and its outputs: which keys a step writes, how they are assembled, where they go.

- `StepRecord`: the typed parts of one step (rollout result, advantages, trainer metrics, the
  clock, the memory hand-over, gap probes, memory snapshots); `to_metrics()` flattens it into
  the metrics line. `STEP_KEYS` declares every key of that line (a test checks that every key
  written is declared and every declared key is written); keys with a data-dependent part
  (`DYNAMIC_KEYS`: memory per phase, reward per data source, validation accuracy per source) exist
  where that part does; `is_declared` checks both. Names follow verl where verl has the metric.
- `COLUMNS`: the console table (key, header, format).
- `MetricsWriter`: one JSON object per line in `run_dir/metrics.jsonl`, each line one `write`
  of the whole encoded line to an O_APPEND descriptor, then fsync; non-finite floats become null
  (valid JSON). Opening repairs a trailing partial line left by a crash, and with `resume_step`
  drops lines of later steps (the file is rewritten atomically).
- `ConsoleReporter`: a live progress line (rich, only on a terminal) and one table row per step.
- `step_trace`: a `torch.profiler` Chrome trace of one chosen step, `run_dir/trace_step_<N>.json`.
- `peak_flops` / `mfu`: peak dense bf16 tensor throughput of known GPUs (None on CPU or an unknown
  GPU, so MFU is reported only where the peak is known).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from agentflow.runner import MODEL_ROLES, ROLES, RolloutResult
from agentflow.trajectory import STOP_REASONS
from engine.fsio import atomic_write_bytes
from engine.timer import PHASES, Timings, timing_key

GiB = float(1 << 30)
# (key in a memory snapshot, field in memory/<phase>/<field>)
MEMORY_FIELDS = (
    ("torch_allocated", "allocated_gb"),
    ("torch_peak_allocated", "peak_allocated_gb"),
    ("torch_reserved", "reserved_gb"),
    ("nvml_used", "nvml_used_gb"),
    ("rss", "rss_gb"),
)
SYNC_FIELDS = ("bytes_moved", "seconds", "num_tensors", "complete", "zero_copy")

# Every key of a metrics line (null where a figure does not exist on this machine or step, e.g.
# perf/mfu/actor on CPU, timing_s/ref without a reference model, the gap probes between probe steps).
STEP_KEYS: tuple[str, ...] = (
    "step",
    *(timing_key(p) for p in PHASES),
    *(f"reward/{k}" for k in ("mean", "std", "max", "min", "success_rate")),
    *(
        f"rollout/{k}"
        for k in (
            "num_queries",
            "group_size",
            "num_trajectories",
            "num_turns",
            "turns_mean",
            "turns_max",
            "response_length_mean",
            "response_length_max",
            "prompt_length_mean",
            "prompt_length_max",
            "invalid_action_rate",
            "generated_tokens",
            "prompt_tokens",
            "planner_response_tokens",
            "engine_calls",
            "loop_steps",
        )
    ),
    *(f"rollout/stop_reason/{r}" for r in STOP_REASONS),
    *(f"rollout/time_{r}_s" for r in ROLES),
    # model calls per role (planner on the policy, the rest on the helper unless helper=policy); 0 where a role made none
    *(f"rollout/{r}_{k}" for r in MODEL_ROLES for k in ("calls", "prompt_tokens", "response_tokens")),
    "helper",
    "helper/wake_s",
    "helper/sleep_s",
    "reward/judge_rule_matched",
    "reward/judge_asked",
    "reward/judge_unparsed",
    "rollout/schedule",
    "rollout/busy_fraction",
    "rollout/engine_busy_s",
    "rollout/latency_p50_s",
    "rollout/latency_p90_s",
    *(
        f"adv/{k}"
        for k in (
            "num_trajectories",
            "num_groups",
            "num_zero_var_groups",
            "zero_var_group_frac",
            "num_singleton_groups",
            "reward_mean",
            "reward_std",
            "adv_abs_mean",
        )
    ),
    *(
        f"actor/{k}"
        for k in (
            "loss",
            "pg_loss",
            "pg_clipfrac",
            "pg_clipfrac_lower",
            "kl_loss",
            "kl_coef",
            "entropy",
            "ratio_mean",
            "ratio_max",
            "grad_norm",
            "grad_norm_max",
            "skipped_steps",
            "optimizer_steps",
            "lr",
            "num_seqs",
            "num_tokens",
            "num_packed_tokens",
            "num_micro_batches",
            "num_mini_batches",
            "packing_efficiency",
            "zero_adv_seqs",
            "loss_impl",
            "old_logprob_fused",
        )
    ),
    "training/rollout_logprob_diff_mean",
    "training/rollout_logprob_diff_max",
    "sync/gap_stale_mean",
    "sync/gap_stale_max",
    "sync/gap_after_mean",
    "sync/gap_after_max",
    "sync/gap_probed",
    *(f"sync/{k}" for k in SYNC_FIELDS),
    "sleep/supported",
    "sleep/freed_bytes",
    "perf/rollout_tokens_per_s",
    "perf/train_tokens_per_s",
    "perf/mfu/actor",
    "perf/time_per_step",
    "perf/train_flops",
    "perf/logprob_flops",
    "perf/max_memory_allocated_gb",
    "perf/max_memory_reserved_gb",
    "perf/cpu_memory_used_gb",
    "time/elapsed_s",
    "engine",
    # the ranks (engine.ranks): world and tensor-parallel size, the trainer mesh's replicate (nodes) and fsdp
    # (shards per replica) dimensions, fastest and slowest rank's rollout and step time
    *(f"dist/{k}" for k in ("world_size", "tp_size", "replicate_size", "fsdp_size")),
    *(f"dist/{k}" for k in ("gen_s_min", "gen_s_max", "step_s_min", "step_s_max")),
)

# Keys with a data-dependent part, written only where it exists: memory/<phase>/<field> for every phase
# that ran, reward/<source>/mean for every data source of the step's queries, and on validation steps
# val/<source>/accuracy per source and val/accuracy over all validation queries.
DYNAMIC_KEYS: tuple[re.Pattern[str], ...] = (
    re.compile(r"memory/[^/]+/[a-z_]+"),
    re.compile(r"reward/.+/mean"),
    re.compile(r"val/.+/accuracy"),
    re.compile(r"val/(accuracy|num_queries)"),
)


def is_declared(key: str) -> bool:
    """Whether `key` may appear in a metrics line: a `STEP_KEYS` key or one of the `DYNAMIC_KEYS` forms."""
    return key in STEP_KEYS or any(p.fullmatch(key) for p in DYNAMIC_KEYS)


# (metric key, column header, format) of the console table; missing keys print as "-".
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("step", "step", "{:d}"),
    ("timing_s/step", "step_s", "{:.2f}"),
    ("timing_s/gen", "gen_s", "{:.2f}"),
    ("timing_s/update_actor", "upd_s", "{:.2f}"),
    ("timing_s/update_weights", "sync_s", "{:.3f}"),
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/success_rate", "success", "{:.3f}"),
    ("val/accuracy", "val_acc", "{:.3f}"),
    ("rollout/turns_mean", "turns", "{:.2f}"),
    ("rollout/response_length_mean", "resp_len", "{:.1f}"),
    ("actor/kl_loss", "kl", "{:.1e}"),
    ("actor/entropy", "entropy", "{:.3f}"),
    ("actor/pg_clipfrac", "clipfrac", "{:.3f}"),
    ("actor/grad_norm", "grad_norm", "{:.3f}"),
    ("training/rollout_logprob_diff_max", "gap_max", "{:.1e}"),
    ("sync/gap_after_max", "gap_synced", "{:.1e}"),
    ("perf/rollout_tokens_per_s", "gen_tok/s", "{:.0f}"),
    ("perf/train_tokens_per_s", "train_tok/s", "{:.0f}"),
    ("perf/mfu/actor", "mfu", "{:.3f}"),
)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


@dataclass
class StepRecord:
    """The parts of one step, as the loop collected them; `to_metrics()` is the metrics line."""

    step: int
    rollout: RolloutResult
    group_size: int
    engine_name: str
    engine_stats: tuple[Mapping[str, float], Mapping[str, float]]  # the engine's counters before and after gen
    advantages: Mapping[str, float]
    train: Mapping[str, float]
    loss_impl: str
    gaps: Mapping[str, float | None]
    timings: Timings
    sync: Any  # the SyncReport of the hand-over, None when nothing was synced
    sleep: Any  # the SleepReport of the hand-over, None without an engine
    memory: Mapping[str, Mapping[str, Any]]  # phase -> memory snapshot (engine.device_memory.snapshot)
    train_tokens: int  # packed tokens processed by the update (all epochs)
    peak_flops: float | None
    elapsed_s: float
    helper: str = "policy"  # HelperConfig.kind: which model served every role but the planner
    validation: Mapping[str, Any] | None = None  # val/* of a validation step (engine.loop), else None

    def to_metrics(self) -> dict[str, Any]:
        m: dict[str, Any] = dict.fromkeys(STEP_KEYS)
        m["step"] = self.step
        m.update(self.timings.metrics())
        m.update(rollout_metrics(self.rollout, self.group_size, *self.engine_stats))
        role_time = self.rollout.stats.get("role_time_s")  # continuous: summed request latencies (they overlap)
        for role in ROLES:
            m[f"rollout/time_{role}_s"] = (
                (role_time or {}).get(role, 0.0) if role_time else self.timings.spans.get(role, 0.0)
            )
        counters = self.rollout.counters
        for role in MODEL_ROLES:
            for k in ("calls", "prompt_tokens", "response_tokens"):
                m[f"rollout/{role}_{k}"] = counters.get(f"{role}_{k}", 0)
        m["helper"] = self.helper
        m["helper/wake_s"] = self.timings.spans.get("helper-wake")  # a helper that sleeps with the rollout
        m["helper/sleep_s"] = self.timings.spans.get("helper-sleep")
        for k in ("rule_matched", "asked", "unparsed"):  # the LLM judge's counts; null under the rule judge
            m[f"reward/judge_{k}"] = counters.get(f"judge_{k}")
        gen = self.timings.phases.get("gen", 0.0)
        before, after = self.engine_stats
        busy_key = "busy_seconds" if "busy_seconds" in after else "generate_seconds"
        if busy_key in after and busy_key in before:
            m["rollout/engine_busy_s"] = after[busy_key] - before[busy_key]
            m["rollout/busy_fraction"] = m["rollout/engine_busy_s"] / gen if gen > 0 else None
        m.update(self.advantages)
        m.update(self.train)
        m.update(self.gaps)
        m["actor/loss_impl"] = self.loss_impl
        m["engine"] = self.engine_name
        for f in SYNC_FIELDS:
            v = getattr(self.sync, f) if self.sync is not None else None
            m[f"sync/{f}"] = float(v) if isinstance(v, bool) else v
        m["sleep/supported"] = float(self.sleep.supported) if self.sleep is not None else None
        m["sleep/freed_bytes"] = self.sleep.freed_bytes if self.sleep is not None else None
        gen, upd = self.timings.phases.get("gen", 0.0), self.timings.phases.get("update_actor", 0.0)
        m["perf/rollout_tokens_per_s"] = m["rollout/generated_tokens"] / gen if gen > 0 else None
        m["perf/train_tokens_per_s"] = self.train_tokens / upd if upd > 0 else None
        m["perf/mfu/actor"] = mfu(self.train.get("perf/train_flops", 0.0), upd, self.peak_flops)
        m["perf/time_per_step"] = self.timings.phases.get("step")
        m.update(memory_metrics(self.memory))
        m["time/elapsed_s"] = self.elapsed_s
        m.update(self.validation or {})
        return m


def rollout_metrics(result: RolloutResult, group_size: int, before: Mapping, after: Mapping) -> dict[str, Any]:
    """reward/* and rollout/* of one rollout; `before`/`after`: the engine's counters around it."""
    trajs = result.trajectories
    turns = [t for tr in trajs for t in tr.turns]
    rewards = [tr.reward for tr in trajs]
    resp = [len(t.response_ids) for t in turns]
    prompt = [len(t.prompt_ids) for t in turns]
    n = len(trajs)
    mean_r = _mean(rewards)
    m: dict[str, Any] = {
        "reward/mean": mean_r,
        "reward/std": math.sqrt(_mean([(r - mean_r) ** 2 for r in rewards])),
        "reward/max": max(rewards),
        "reward/min": min(rewards),
        "reward/success_rate": sum(r >= 1.0 for r in rewards) / n,
        "rollout/num_queries": n // group_size,
        "rollout/group_size": group_size,
        "rollout/num_trajectories": n,
        "rollout/num_turns": len(turns),
        "rollout/turns_mean": len(turns) / n,
        "rollout/turns_max": max(len(tr.turns) for tr in trajs),
        "rollout/response_length_mean": _mean(resp),
        "rollout/response_length_max": max(resp, default=0),
        "rollout/prompt_length_mean": _mean(prompt),
        "rollout/prompt_length_max": max(prompt, default=0),
        "rollout/invalid_action_rate": _mean([float(not t.valid) for t in turns]),
        "rollout/generated_tokens": after["generated_tokens"] - before["generated_tokens"],
        "rollout/prompt_tokens": after["prompt_tokens"] - before["prompt_tokens"],
        "rollout/planner_response_tokens": sum(resp),
        "rollout/engine_calls": after["generate_calls"]
        - before["generate_calls"]
        + after.get("stream_requests", 0)
        - before.get("stream_requests", 0),
        "rollout/loop_steps": result.loop_steps,
        "rollout/schedule": result.schedule,
    }
    lat = sorted(result.stats.get("trajectory_latency_s") or [])
    if lat:  # continuous only: in lock-step every answer arrives with the last generator batch
        m["rollout/latency_p50_s"] = lat[(len(lat) - 1) // 2]
        m["rollout/latency_p90_s"] = lat[min(len(lat) - 1, math.ceil(0.9 * len(lat)) - 1)]
    for reason in STOP_REASONS:
        m[f"rollout/stop_reason/{reason}"] = sum(tr.stop_reason == reason for tr in trajs) / n
    m.update(reward_by_source(trajs))
    return m


def reward_by_source(trajectories: Sequence[Any]) -> dict[str, float]:
    """reward/<source>/mean for every data source among `trajectories` (those with a source)."""
    by: dict[str, list[float]] = {}
    for tr in trajectories:
        if tr.source:
            by.setdefault(tr.source, []).append(tr.reward)
    return {f"reward/{src}/mean": _mean(rs) for src, rs in sorted(by.items())}


def memory_metrics(snapshots: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """memory/<phase>/<field> in GiB per snapshot, and the step's peaks (perf/max_memory_*)."""
    out: dict[str, float | None] = {}
    for phase, snap in snapshots.items():
        for key, f in MEMORY_FIELDS:
            v = snap.get(key)
            out[f"memory/{phase}/{f}"] = None if v is None else v / GiB

    def peak(key: str) -> float | None:
        vals = [s[key] for s in snapshots.values() if s.get(key) is not None]
        return max(vals) / GiB if vals else None

    out["perf/max_memory_allocated_gb"] = peak("torch_peak_allocated")
    out["perf/max_memory_reserved_gb"] = peak("torch_reserved")
    out["perf/cpu_memory_used_gb"] = peak("rss")
    return out


def json_safe(value: Any) -> Any:
    """`value` as strict JSON takes it: tensors and numpy scalars as numbers, non-finite floats as None."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return json_safe(value.item())
    return value


def read_metrics(path: str | Path) -> list[dict]:
    """The complete lines of a metrics.jsonl (a trailing partial line, if any, is ignored)."""
    p = Path(path)
    if not p.exists():
        return []
    data = p.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


class MetricsWriter:
    """Appends one JSON line per step to `run_dir/metrics.jsonl`, crash-safe (see module doc)."""

    def __init__(self, run_dir: str | Path, *, resume_step: int | None = None, filename: str = "metrics.jsonl") -> None:
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair(resume_step)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.splitlines(keepends=True)
        if resume_step is not None:
            lines = [ln for ln in lines if not ln.strip() or json.loads(ln).get("step", -1) <= resume_step]
        kept = b"".join(lines)
        if kept != data:
            atomic_write_bytes(self.path, kept)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append {"step": step, **metrics} as one line (one write, then fsync); returns the record written."""
        record = {"step": int(step), **{str(k): json_safe(v) for k, v in metrics.items() if k != "step"}}
        data = (json.dumps(record, allow_nan=False) + "\n").encode()
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes (disk full?)")
        os.fsync(self._fd)
        return record

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fmt(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(int(value) if fmt.endswith("d}") else value)
    except (TypeError, ValueError):
        return str(value)


class ConsoleReporter:
    """A live one-line progress display and a per-step table; plain text when the stream is not a terminal."""

    def __init__(
        self,
        total_steps: int | None = None,
        columns: Sequence[tuple[str, str, str]] = COLUMNS,
        *,
        file: TextIO | None = None,
        header_every: int = 20,
    ) -> None:
        from rich.console import Console

        self.total_steps = total_steps
        self.columns = tuple(columns)
        self.header_every = header_every
        self.file = file or sys.stdout
        self.console = Console(file=self.file, highlight=False, soft_wrap=True)
        self.is_terminal = self.console.is_terminal
        self._rows = 0
        self._live = None
        self._t0 = time.perf_counter()

    def _widths(self) -> list[int]:
        return [max(len(h), 9) for _, h, _ in self.columns]

    def format_header(self) -> str:
        return "  ".join(h.rjust(w) for (_, h, _), w in zip(self.columns, self._widths()))

    def format_row(self, metrics: Mapping[str, Any]) -> str:
        cells = [_fmt(metrics.get(k), f) for k, _, f in self.columns]
        return "  ".join(c.rjust(w) for c, w in zip(cells, self._widths()))

    def progress(self, step: int, phase: str, detail: str = "") -> None:
        """Show "step N/T · phase · elapsed" on a terminal (no output otherwise)."""
        if not self.is_terminal:
            return
        from rich.live import Live
        from rich.text import Text

        total = f"/{self.total_steps}" if self.total_steps else ""
        text = Text(f"step {step}{total} · {phase} · {time.perf_counter() - self._t0:.1f}s {detail}", style="cyan")
        if self._live is None:
            self._live = Live(text, console=self.console, transient=True, refresh_per_second=8)
            self._live.start()
        else:
            self._live.update(text)

    def step_done(self, step: int, metrics: Mapping[str, Any]) -> str:
        """Print the step's table row (with a header on the first row and every `header_every` rows)."""
        row = self.format_row({**metrics, "step": step})
        lines = []
        if self._rows % self.header_every == 0:
            lines.append(self.format_header())
        lines.append(row)
        self._rows += 1
        if self.is_terminal:
            for i, line in enumerate(lines):
                self.console.print(line, style="bold" if i == 0 and len(lines) == 2 else None)
        else:
            self.file.write("\n".join(lines) + "\n")
            self.file.flush()
        return row

    def close(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


@contextlib.contextmanager
def step_trace(
    run_dir: str | Path, step: int, trace_step: int | None, queue: Callable[[], Sequence] | None = None
) -> Iterator[Any]:
    """Profile this step with torch.profiler when `step == trace_step`; export run_dir/trace_step_<step>.json.

    `queue()`, called after the step, gives the rollout's queue-depth samples (seconds from the
    rollout's start, engine requests pending, tool calls running; `RolloutResult.stats["queue"]`);
    they are added as Chrome-trace counter events ("rollout queue") starting at the trace's `gen` range."""
    if trace_step is None or step != trace_step:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    path = Path(run_dir) / f"trace_step_{step}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities, record_shapes=True) as prof:
        yield prof
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    prof.export_chrome_trace(str(tmp))
    samples = list(queue() or []) if queue is not None else []
    if samples:
        trace = json.loads(tmp.read_text())
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        gen = next((e for e in events if e.get("name") == "gen" and e.get("ph") == "X"), None)
        if gen is not None:
            pid, tid, ts0 = gen.get("pid", 0), gen.get("tid", 0), float(gen["ts"])
            events += [
                {"name": "rollout queue", "ph": "C", "pid": pid, "tid": tid, "ts": ts0 + t * 1e6,
                 "args": {"engine_requests": n, "tool_calls": k}}
                for t, n, k in samples
            ]  # fmt: skip
            atomic_write_bytes(path, json.dumps(trace).encode())
            tmp.unlink()
            return
    os.replace(tmp, path)


# Dense (no sparsity) bf16/fp16 tensor-core peaks in FLOP/s from the vendors' datasheets; first match wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("H800", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def peak_flops(device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak dense FLOP/s of the CUDA device for bf16/fp16 matmuls; None on CPU, other dtypes, or unknown GPUs."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    return None


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: flops / seconds / peak; None without a known peak or a positive duration."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / peak
