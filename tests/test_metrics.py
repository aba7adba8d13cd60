"""Step-record outputs: crash-safe metrics.jsonl, terminal table, Chrome trace, MFU."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.metrics import ConsoleReporter, MetricsWriter, mfu, peak_flops, read_metrics, step_trace
from engine.timer import PhaseTimer

REPO = Path(__file__).resolve().parents[1]


def test_metrics_writer_lines_nan_and_resume(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 6):
            w.write(step, {"loss": float(step), "bad": float("nan"), "t": torch.tensor(2.5), "inf": float("inf")})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first == {"step": 1, "loss": 1.0, "bad": None, "t": 2.5, "inf": None}
    # Resume from step 3: later lines go, the file stays valid, appends continue after step 3.
    with MetricsWriter(tmp_path, resume_step=3) as w:
        w.write(4, {"loss": 40.0})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 40.0


def test_metrics_writer_repairs_a_partial_trailing_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1]
    with MetricsWriter(tmp_path) as w:
        w.write(2, {"loss": 2.0})
    assert path.read_text() == '{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 2.0}\n'


_APPENDER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from engine.metrics import MetricsWriter
w = MetricsWriter(sys.argv[2])
big = "x" * 20000
step = 0
while True:
    step += 1
    w.write(step, {"payload": big})
    if step == 3:
        print("RUNNING", flush=True)
"""


def test_killed_writer_leaves_only_complete_lines(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _APPENDER, str(REPO), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "RUNNING", proc.stderr.read()[-2000:]
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    path = tmp_path / "metrics.jsonl"
    rows = read_metrics(path)
    assert len(rows) >= 3 and [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    # Reopening leaves only complete, parseable lines (a torn tail, had the kill produced one, is cut).
    with MetricsWriter(tmp_path):
        pass
    data = path.read_bytes()
    assert data.endswith(b"\n") and len(data.splitlines()) == len(rows)
    assert all(json.loads(line)["payload"] == "x" * 20000 for line in data.splitlines())
    with MetricsWriter(tmp_path, resume_step=2):
        pass
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_console_reporter_plain_text_when_not_a_terminal():
    buf = io.StringIO()
    rep = ConsoleReporter(total_steps=3, file=buf, header_every=2)
    assert not rep.is_terminal
    rep.progress(1, "gen")  # no live line off a terminal
    rep.step_done(1, {"timing_s/step": 1.234, "reward/mean": 0.5, "actor/kl_loss": 1e-3, "perf/mfu/actor": None})
    rep.step_done(2, {"timing_s/step": 2.0})
    rep.step_done(3, {"timing_s/step": 3.0})
    rep.close()
    out = buf.getvalue()
    assert "\x1b[" not in out, "no ANSI escapes off a terminal"
    lines = out.splitlines()
    assert len(lines) == 5 and lines[0].split()[:3] == ["step", "step_s", "gen_s"] and lines[3] == lines[0]
    cells = lines[1].split()
    assert cells[:4] == ["1", "1.23", "-", "-"] and "0.500" in cells and "1.0e-03" in cells


def test_console_reporter_on_a_terminal_uses_rich():
    from rich.console import Console

    buf = io.StringIO()
    rep = ConsoleReporter(total_steps=2, file=buf)
    rep.console = Console(file=buf, force_terminal=True, width=200)
    rep.is_terminal = True
    rep.progress(1, "gen")
    row = rep.step_done(1, {"timing_s/step": 1.5})
    rep.close()
    assert "1.50" in row and "1.50" in buf.getvalue()


def test_step_trace_only_for_the_chosen_step(tmp_path):
    timer = PhaseTimer("cpu")
    for step in (1, 2, 3):
        with step_trace(tmp_path, step, trace_step=2) as prof, timer.phase("update_actor"):
            torch.randn(64, 64) @ torch.randn(64, 64)
        assert (prof is not None) == (step == 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace_step_2.json"]
    trace = json.loads((tmp_path / "trace_step_2.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "update_actor" in names, "phases are labelled in the trace"


def test_mfu():
    assert peak_flops("cpu") is None
    assert mfu(1e12, 1.0, None) is None
    assert mfu(1e12, 0.0, 989e12) is None
    assert mfu(989e12 / 2, 1.0, 989e12) == pytest.approx(0.5)


def test_step_trace_adds_the_rollout_queue_as_counter_events(tmp_path):
    timer = PhaseTimer("cpu")
    samples = [(0.0, 3, 0), (0.01, 1, 2), (0.02, 0, 1)]
    with step_trace(tmp_path, 1, trace_step=1, queue=lambda: samples), timer.phase("gen"):
        torch.randn(64, 64) @ torch.randn(64, 64)
    trace = json.loads((tmp_path / "trace_step_1.json").read_text())
    gen = next(e for e in trace["traceEvents"] if e.get("name") == "gen" and e.get("ph") == "X")
    counters = [e for e in trace["traceEvents"] if e.get("ph") == "C" and e["name"] == "rollout queue"]
    assert [(e["args"]["engine_requests"], e["args"]["tool_calls"]) for e in counters] == [(3, 0), (1, 2), (0, 1)]
    assert counters[0]["ts"] == pytest.approx(float(gen["ts"])) and counters[2]["ts"] > counters[1]["ts"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace_step_1.json"]


def test_reward_per_data_source_and_dynamic_keys():
    from agentflow.trajectory import Trajectory
    from engine.metrics import is_declared, reward_by_source

    trajs = [
        Trajectory("a", 0, "q", "g", reward=1.0, source="nq"),
        Trajectory("a", 1, "q", "g", reward=0.0, source="nq"),
        Trajectory("b", 0, "q", "g", reward=1.0, source="mathhard"),
        Trajectory("c", 0, "q", "g", reward=1.0),  # no source: not reported per source
    ]
    assert reward_by_source(trajs) == {"reward/mathhard/mean": 1.0, "reward/nq/mean": 0.5}
    for key in ("reward/nq/mean", "reward/openai/gsm8k/mean", "val/aime24/accuracy", "val/accuracy", "step"):
        assert is_declared(key), key
    assert is_declared("memory/gen/rss_gb")
    for key in ("reward/nq/median", "val/accuracy/x", "rewards/nq/mean", "banana"):
        assert not is_declared(key), key
