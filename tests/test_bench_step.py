"""`flowgrpo bench step`: the phase breakdown of real training steps (tiny model, CPU), and its arithmetic."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import step as bench_step
from engine.build import vllm_available

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "step", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_bench_step_on_both_engines_prints_phases_and_saves(tmp_path):
    engines = "embedded,vllm" if vllm_available() else "embedded"
    saved = tmp_path / "step.json"
    r = _run(
        "--engines",
        engines,
        "--steps",
        "2",
        "--queries",
        "1",
        "--group-size",
        "2",
        "--run-dir",
        str(tmp_path / "runs"),
        "--save",
        str(saved),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads(saved.read_text())
    assert result["bench"] == "step" and result["conditions"]["torch"] == torch.__version__
    assert list(result["engines"]) == engines.split(",")
    for engine, s in result["engines"].items():
        assert f"engine {engine}: steps [2] (step 1 (warm-up) left out)" in r.stdout
        assert s["steps_measured"] == [2] and not s["includes_warmup"]
        assert s["config"] == {
            "preset": "tiny",
            "queries": 1,
            "group_size": 2,
            "steps": 2,
            "dtype": "float32",
            "micro_batch_tokens": 4096,
        }
        phases = s["phases"]
        assert list(phases) == [*bench_step.PHASES, "other"]
        assert sum(p["share_pct"] for p in phases.values()) == pytest.approx(100.0, abs=1e-6)
        assert phases["other"]["mean_s"] >= -1e-3  # the phases are disjoint parts of the step
        assert phases["gen"]["mean_s"] > 0 and phases["update_actor"]["mean_s"] > 0
        assert s["memory_field"] == "rss_gb" and s["memory_gb"]["gen"] > 0 and s["train_peak_gb"] > 0
        assert s["trajectories"] == 2 and s["train_tokens_per_s"] > 0 and s["generated_tokens_per_s"] > 0
    if vllm_available():  # the sync moves bytes into vLLM; the embedded engine shares the trainer's storage
        assert result["engines"]["vllm"]["phases"]["update_weights"]["mean_s"] > 0


def test_bench_step_on_two_processes_shows_every_rank_and_the_spread(tmp_path):
    r = _run(
        *("--engines", "embedded", "--steps", "2", "--queries", "2", "--group-size", "2"),
        *("--nproc-per-node", "2", "--run-dir", str(tmp_path / "runs")),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])["engines"]["embedded"]
    assert s["config"]["nproc_per_node"] == 2 and s["config"]["tp"] == 1 and s["steps_measured"] == [2]
    ranks = s["ranks"]
    assert ranks["world"] == 2 and len(ranks["per_rank_s"]) == 2
    assert all(p["gen"] > 0 and p["update_actor"] > 0 for p in ranks["per_rank_s"])
    assert ranks["gen_s_fastest"] == min(p["gen"] for p in ranks["per_rank_s"])
    assert ranks["gen_s_slowest"] == max(p["gen"] for p in ranks["per_rank_s"])
    assert 0 <= ranks["gen_spread_pct"] < 100
    assert "rollout imbalance: gen fastest" in r.stdout and s["trajectories"] == 4  # 2 queries x G=2, both ranks


def test_one_step_is_labelled_as_including_warmup(tmp_path):
    r = _run("--engines", "embedded", "--steps", "1", "--queries", "1", "--group-size", "2", "--run-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])["engines"]["embedded"]
    assert s["includes_warmup"] and s["steps_measured"] == [1]
    assert "includes warm-up (one step only)" in r.stdout
    assert s["attention"] == "sdpa_per_sequence" and "packed attention sdpa_per_sequence" in r.stdout


def _records(step_times, phase_times):
    return [
        {
            "step": i + 1,
            "timing_s/step": t,
            **{f"timing_s/{k}": v for k, v in phase_times.items()},
            "memory/gen/rss_gb": 1.0 + i,
            "memory/update_actor/rss_gb": 2.0 + i,
            "rollout/num_trajectories": 8,
        }
        for i, t in enumerate(step_times)
    ]


def test_summarize_drops_the_warmup_step_and_accounts_for_the_rest():
    s = bench_step.summarize(
        _records([9.0, 1.0, 2.0, 3.0], {"gen": 0.5, "update_actor": 0.25, "ref": None}), torch.device("cpu")
    )
    assert s["steps_measured"] == [2, 3, 4] and s["step_s_median"] == 2.0 and s["step_s_mean"] == 2.0
    assert s["phases"]["gen"] == {"mean_s": 0.5, "share_pct": 25.0}
    assert s["phases"]["ref"]["mean_s"] == 0.0  # a phase that did not run counts as 0
    assert s["phases"]["other"]["mean_s"] == pytest.approx(1.25)
    assert s["memory_gb"]["gen"] == 4.0 and s["train_peak_gb"] == 5.0  # max over the measured steps
    assert s["trajectories_per_s"] == 4.0


def test_bad_arguments_are_refused_with_exit_2(tmp_path):
    for args in (
        ["--engines", "nope"],
        ["--steps", "0"],
        ["--group-size", "0"],
        ["--queries", "0"],
        ["--group-size", "1"],  # GRPO needs a group
        ["--preset", "nope"],
        ["--tp", "2"],  # a tensor-parallel engine needs several processes
        ["--nproc-per-node", "2", "--queries", "3"],  # B splits evenly over the rollout groups
    ):
        r = _run(*args, "--run-dir", str(tmp_path))
        assert r.returncode == 2 and "error" in r.stderr, (args, r.stderr)


def test_vllm_is_refused_where_it_cannot_run(tmp_path):
    cfg = bench_step.build_config("qwen2.5-1.5b", "auto", tmp_path, steps=1)  # random weights: no directory
    assert bench_step.available_engines(cfg) == ["embedded"]
    with pytest.raises(ValueError, match="not available here"):
        bench_step.resolve_engines("vllm", cfg)
    with pytest.raises(ValueError, match="unknown engine"):
        bench_step.resolve_engines("embedded,fast", cfg)


def test_help_lists_the_options():
    p = argparse.ArgumentParser()
    bench_step.add_arguments(p)
    text = p.format_help()
    for opt in ("--engines", "--steps", "--group-size", "--queries", "--preset", "--save"):
        assert opt in text
