"""`flowgrpo bench scale`: the G sweep end to end on CPU (tiny model), and its OOM handling."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from bench import scale as bench_scale
from engine.device_memory import PhaseOutOfMemoryError

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "scale", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_sweep_on_cpu_writes_csv_png_and_json(tmp_path):
    out = tmp_path / "out"
    r = _run(
        "--engine",
        "embedded",
        "--groups",
        "4,2",
        "--queries",
        "1",
        "--steps",
        "2",
        "--run-dir",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        "--save",
        str(tmp_path / "scale.json"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "scale.json").read_text())
    assert [row["group_size"] for row in result["rows"]] == [2, 4]  # sorted
    assert all(row["status"] == "ok" for row in result["rows"])
    assert result["largest_fitting_group"] == 4 and "largest G that fits: 4 (no OOM within the sweep)" in r.stdout
    for row in result["rows"]:
        assert row["trajectories"] == row["group_size"]  # B = 1
        assert row["s_per_trajectory"] == pytest.approx(row["step_s"] / row["group_size"])
        assert row["train_tokens_per_s"] > 0 and row["train_peak_gb"] > 0 and row["rollout_peak_gb"] > 0
    with open(result["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["group_size"]) for row in rows] == [2, 4]
    assert list(rows[0]) == list(bench_scale.CSV_COLUMNS)
    png = Path(result["png"])
    assert png.parent == out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _summary(g: int) -> dict:
    return {
        "trajectories": 2 * g,
        "step_s_median": 0.1 * g,
        "step_s_p20": 0.1 * g,
        "step_s_p80": 0.1 * g,
        "train_tokens_per_s": 1000.0,
        "generated_tokens_per_s": 500.0,
        "train_tokens": 100.0 * g,
        "memory_gb": {"gen": 1.0, "wake": 1.5},
        "train_peak_gb": 2.0 + 0.01 * g,
        "memory_field": "rss_gb",
    }


@pytest.mark.parametrize(
    "oom",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        PhaseOutOfMemoryError("update_actor", 1 << 30, 2 << 30, "lower micro_batch_tokens", "CUDA out of memory"),
        RuntimeError("CUDA error: out of memory"),
    ],
    ids=["torch", "phase", "driver"],
)
def test_the_first_oom_ends_the_sweep_and_is_reported(oom, tmp_path):
    """The sweep logic with a scripted point runner (the real runner is exercised above)."""
    seen = []

    def run_point(g: int) -> dict:
        seen.append(g)
        if g >= 8:
            raise oom
        return _summary(g)

    rows = bench_scale.sweep([2, 4, 8, 16], run_point)
    assert seen == [2, 4, 8]  # nothing after the first OOM
    assert [r["status"] for r in rows] == ["ok", "ok", "oom"]
    assert "out of memory" in rows[-1]["error"]
    assert bench_scale.largest_fitting(rows) == 4
    assert bench_scale.train_memory_spread(rows) == pytest.approx(0.02 / 2.02)
    table = bench_scale.format_table(rows, "label")
    assert "oom" in table and table.endswith("memory: label")
    assert bench_scale.write_csv(rows, tmp_path / "s.csv").read_text().count("\n") == 4
    png = bench_scale.plot(rows, tmp_path / "s.png", "title", "label")
    assert png is not None and png.read_bytes()[:4] == b"\x89PNG"


def test_a_real_cpu_allocation_failure_ends_the_sweep_after_freeing_the_point():
    """The CPU allocator's real refusal (4 PiB is beyond any address space), not a scripted exception; when
    the OOM is reported, the failed point's tensors are already released."""
    held: dict = {}
    freed_when_reported = []

    def run_point(g: int) -> dict:
        if g < 4:
            return _summary(g)
        work = torch.ones(1 << 20)
        held["work"] = weakref.ref(work)
        torch.empty(1 << 50)  # float32: 4 PiB, refused with ENOMEM
        return _summary(g)

    def on_point(row: dict) -> None:
        if row["status"] == "oom":
            freed_when_reported.append(held["work"]() is None)

    rows = bench_scale.sweep([2, 4, 8], run_point, on_point=on_point)
    assert [(r["group_size"], r["status"]) for r in rows] == [(2, "ok"), (4, "oom")]
    assert "DefaultCPUAllocator" in rows[-1]["error"]
    assert freed_when_reported == [True]
    assert bench_scale.largest_fitting(rows) == 2


def test_other_errors_are_not_swallowed():
    def run_point(g: int) -> dict:
        raise ValueError("a bug, not a capacity limit")

    with pytest.raises(ValueError, match="a bug"):
        bench_scale.sweep([2, 4], run_point)


def test_groups_and_bad_arguments():
    assert bench_scale.parse_groups("16, 4,8,4") == [4, 8, 16]
    assert bench_scale.default_groups(torch.device("cuda"), 64) == [4, 8, 16, 32, 64]
    assert bench_scale.default_groups(torch.device("cpu"), 64) == [2, 4, 8]
    for bad in ("0,2", "a,b", ""):
        with pytest.raises(ValueError):
            bench_scale.parse_groups(bad)
    for args in (["--groups", "0,4"], ["--groups", "1,2"], ["--steps", "0"], ["--engine", "nope"], ["--queries", "0"]):
        r = _run(*args)
        assert r.returncode == 2 and "error" in r.stderr, (args, r.stderr)
