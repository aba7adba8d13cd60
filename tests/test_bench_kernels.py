"""Smoke test of the kernel micro-benchmark (`bench.kernels` on `bench.harness`), CPU, tiny shapes."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import kernels as bench_kernels
from bench.harness import format_table, percentile
from kernels import reference

REPO = Path(__file__).resolve().parents[1]


def test_rows_have_times_memory_and_bandwidth():
    rows = bench_kernels.run(
        list(bench_kernels.OPS),
        ["ours", "reference"],
        [(17, 97)],
        torch.float32,
        torch.device("cpu"),
        warmup=0,
        repeats=3,
    )
    assert [(r.op, r.provider) for r in rows] == [
        ("token_logprobs", "ours"),
        ("token_logprobs", "reference"),
        ("flow_grpo_loss", "ours"),
        ("flow_grpo_loss", "reference"),
    ]
    for r in rows:
        assert r.ok, r.error
        assert 0 < r.ms_p20 <= r.ms_median <= r.ms_p80
        assert r.peak_mem_bytes > 0 and r.memory_method == "aten-storage-tracker"
        assert r.gbps > 0 and r.max_err < 1e-4
    assert "flow_grpo_loss" in format_table(rows)


def test_linear_ops_rows_against_materialize_and_reference():
    shape = (17, 32, 97)
    rows = bench_kernels.run(
        ["linear_token_logprobs", "linear_flow_grpo_loss"],
        None,  # each op's default providers
        [(17, 97), shape],  # the NxV shape is not of their rank: skipped
        torch.float32,
        torch.device("cpu"),
        warmup=0,
        repeats=2,
    )
    assert [(r.op, r.provider) for r in rows] == [
        (op, p)
        for op in ("linear_token_logprobs", "linear_flow_grpo_loss")
        for p in ("ours", "materialize", "reference")
    ]
    for r in rows:
        assert r.ok, r.error
        assert r.shape == {"N": 17, "d": 32, "V": 97}
        assert r.flops == (2 if r.op == "linear_token_logprobs" else 8) * 17 * 32 * 97 and r.tflops > 0
        assert r.peak_mem_bytes > 0 and r.max_err < 1e-4
    assert "TFLOP/s" in format_table(rows)


def test_linear_gate_in_bf16_accepts_the_bf16_logits_providers():
    """The gate compares with float32 logits; bf16 `materialize`/`reference` round the logits and still pass."""
    rows = bench_kernels.run(
        ["linear_flow_grpo_loss"], None, [(64, 64, 500)], torch.bfloat16, torch.device("cpu"), warmup=0, repeats=1
    )
    errs = {r.provider: r.max_err for r in rows}
    assert all(r.ok for r in rows), [r.error for r in rows]
    assert errs["ours"] < errs["reference"]  # ours keeps the logits in float32


def test_parse_shapes_and_presets():
    assert bench_kernels.parse_shapes("qwen2.5-7b,3x4x5,9x50,Qwen2.5-1.5B", tokens=16) == [
        (16, 3584, 152_064),
        (3, 4, 5),
        (9, 50),
        (16, 1536, 151_936),
    ]
    for bad in ("12by7", "1x2x3x4", "0x5", "qwen3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_kernels.parse_shapes(bad, tokens=16)


def test_gate_refuses_to_time_a_wrong_provider(monkeypatch):
    spec = bench_kernels.OPS["token_logprobs"]

    def wrong(inp):
        return reference.token_logprobs(inp["logits"], inp["targets"]) + 1e-3

    broken = dataclasses.replace(spec, providers={**spec.providers, "wrong": wrong})
    monkeypatch.setitem(bench_kernels.OPS, "token_logprobs", broken)
    (row,) = bench_kernels.run(
        ["token_logprobs"], ["wrong"], [(9, 50)], torch.float32, torch.device("cpu"), warmup=0, repeats=2
    )
    assert not row.ok and row.ms_median is None and row.gbps is None
    assert row.error.startswith("correctness gate failed")


def test_percentile():
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 20) == 1.2
    assert percentile([5.0], 80) == 5.0


def test_cli_prints_a_table_and_a_json_line():
    r = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--shapes", "9x50,3x1000", "--warmup", "0", "--repeats", "2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[1].split()[:2] == ["op", "provider"]
    result = json.loads(lines[-1])
    assert result["bench"] == "kernels" and result["conditions"]["torch"] == torch.__version__
    assert len(result["rows"]) == 8 and all(row["ok"] for row in result["rows"])


def test_cli_rejects_bad_arguments():
    for args in (["--shapes", "12by7"], ["--ops", "nope"], ["--providers", "nope"], ["--tokens", "0"]):
        r = subprocess.run(
            [sys.executable, "-m", "bench.kernels", *args], capture_output=True, text=True, cwd=REPO, check=False
        )
        assert r.returncode == 2 and "error:" in r.stderr, (args, r.stderr)
    r = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--help"], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert r.returncode == 0 and "--shapes" in r.stdout
