"""Step-loop instruments: phase timers, the metrics.jsonl writer, the terminal view, a Chrome trace, MFU.

- `PhaseTimer`: `with timer.phase("gen"): ...` times a phase. On CUDA it records a pair of CUDA
  events on the current stream (device time, no synchronisation inside the step) and resolves
  them all in `collect()`, which synchronises once; on CPU it uses `time.perf_counter`. Keys are
  `timing_s/<name>` with verl's phase names where verl has one (`PHASES`). A phase entered twice
  in a step accumulates; phases may nest (`step` around everything). Each phase is also a
  `torch.profiler.record_function` range, so it is labelled in a trace.
- `MetricsWriter`: one JSON object per line in `run_dir/metrics.jsonl`, each line one `write`
  of the whole encoded line to an O_APPEND descriptor, then fsync; non-finite floats become null
  (valid JSON). Opening repairs a trailing partial line left by a crash, and with `resume_step`
  drops lines of later steps (the file is rewritten atomically: temp file, fsync, rename).
- `ConsoleReporter`: a live progress line (rich, only on a terminal) and one table row per step
  (rich on a terminal, plain text otherwise).
- `step_trace`: a `torch.profiler` Chrome trace of one chosen step, `run_dir/trace_step_<N>.json`.
- `peak_flops` / `mfu`: peak dense bf16 tensor throughput of known GPUs (None on CPU or an unknown
  GPU, so MFU is reported only where the peak is known).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

# Our phase names → metric keys; verl's names (ray_trainer's marked_timer) where verl has the phase.
PHASES: dict[str, str] = {
    "step": "timing_s/step",
    "wake": "timing_s/wake",
    "gen": "timing_s/gen",
    "reward": "timing_s/reward",
    "adv": "timing_s/adv",
    "sleep": "timing_s/sleep",
    "pack": "timing_s/pack",
    "old_log_prob": "timing_s/old_log_prob",
    "ref": "timing_s/ref",
    "update_actor": "timing_s/update_actor",
    "update_weights": "timing_s/update_weights",
    "save_checkpoint": "timing_s/save_checkpoint",
}


def timing_key(name: str) -> str:
    return PHASES.get(name, f"timing_s/{name}")


class PhaseTimer:
    """Per-phase durations of one step: CUDA events on a CUDA device, perf_counter otherwise."""

    def __init__(
        self, device: torch.device | str | None = None, hooks: Sequence[Callable[[str, str], None]] = ()
    ) -> None:
        self.cuda = device is not None and torch.device(device).type == "cuda"
        self.hooks = list(hooks)
        self._records: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        for h in self.hooks:
            h(name, "enter")
        with torch.profiler.record_function(name):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                start = time.perf_counter()
            try:
                yield
            finally:
                if self.cuda:
                    end = torch.cuda.Event(enable_timing=True)
                    end.record()
                else:
                    end = time.perf_counter()
                self._records.append((name, start, end))
                for h in self.hooks:
                    h(name, "exit")

    __call__ = phase

    def collect(self) -> dict[str, float]:
        """Seconds per phase as {"timing_s/<name>": s} since the last collect; synchronises CUDA once."""
        if self.cuda and self._records:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, start, end in self._records:
            s = start.elapsed_time(end) / 1e3 if self.cuda else end - start
            key = timing_key(name)
            out[key] = out.get(key, 0.0) + s
        self._records.clear()
        return out


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _clean(value.item())
    return value


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` via a temp file in the same directory, fsync, rename, fsync the directory."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        record = {"step": int(step), **{str(k): _clean(v) for k, v in metrics.items() if k != "step"}}
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


# (metric key, column header, format); missing keys print as "-".
DEFAULT_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("step", "step", "{:d}"),
    ("timing_s/step", "step_s", "{:.2f}"),
    ("timing_s/gen", "gen_s", "{:.2f}"),
    ("timing_s/update_actor", "upd_s", "{:.2f}"),
    ("reward/mean", "reward", "{:.3f}"),
    ("reward/success_rate", "success", "{:.2f}"),
    ("actor/kl_loss", "kl", "{:.2e}"),
    ("actor/entropy", "entropy", "{:.3f}"),
    ("actor/pg_clipfrac", "clip", "{:.3f}"),
    ("actor/grad_norm", "gnorm", "{:.3f}"),
    ("training/rollout_logprob_diff_max", "gap_max", "{:.2e}"),
    ("perf/train_tokens_per_s", "train_tok/s", "{:.0f}"),
    ("perf/mfu/actor", "mfu", "{:.3f}"),
)


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
        columns: Sequence[tuple[str, str, str]] = DEFAULT_COLUMNS,
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
def step_trace(run_dir: str | Path, step: int, trace_step: int | None) -> Iterator[Any]:
    """Profile this step with torch.profiler when `step == trace_step`; export run_dir/trace_step_<step>.json."""
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


def throughput_metrics(
    timings: Mapping[str, float],
    *,
    rollout_tokens: int,
    train_tokens: int,
    train_flops: float,
    peak: float | None,
) -> dict[str, float | None]:
    """Tokens/s of rollout (generated tokens over timing_s/gen) and training (packed tokens over
    timing_s/update_actor), and MFU of the update (`perf/mfu/actor`, as verl names it)."""
    gen = timings.get(timing_key("gen"), 0.0)
    upd = timings.get(timing_key("update_actor"), 0.0)
    step = timings.get(timing_key("step"), 0.0)
    return {
        "perf/rollout_tokens_per_s": rollout_tokens / gen if gen > 0 else None,
        "perf/train_tokens_per_s": train_tokens / upd if upd > 0 else None,
        "perf/time_per_step": step or None,
        "perf/mfu/actor": mfu(train_flops, upd, peak),
    }
