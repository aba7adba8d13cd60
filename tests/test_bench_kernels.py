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
from bench import report
from bench.harness import format_table, percentile
from kernels import reference
from kernels.linear_chunked import resolve_algorithm

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
    ours = resolve_algorithm("auto", torch.device("cpu"))
    other = "fused" if ours == "chunked" else "chunked"  # both LM-head algorithms run by default
    assert [(r.op, r.provider) for r in rows] == [
        *(("linear_token_logprobs", p) for p in ("ours", other, "materialize", "reference")),
        *(("linear_flow_grpo_loss", p) for p in ("ours", other, "materialize", "reference", "liger")),
    ]
    for r in rows:
        assert r.ok, r.error
        if r.provider in ("ours", other):
            assert r.extra["algorithm"] == (ours if r.provider == "ours" else other)
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
    assert bench_kernels.parse_shapes("qwen2.5-7b,3x4x5,9x50,Qwen2.5-1.5B", tokens=(16, 32)) == [
        (16, 3584, 152_064),
        (32, 3584, 152_064),
        (3, 4, 5),
        (9, 50),
        (16, 1536, 151_936),
        (32, 1536, 151_936),
    ]
    for bad in ("12by7", "1x2x3x4", "0x5", "qwen3"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_kernels.parse_shapes(bad, tokens=(16,))
    assert bench_kernels.parse_tokens("1k,4096, 32K") == (1024, 4096, 32768)
    for bad in ("0", "x", "1k5", "-4"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_kernels.parse_tokens(bad)


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


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "bench", "kernels", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_cli_prints_roofline_table_json_and_saves_and_compares(tmp_path):
    saved = tmp_path / "old.json"
    r = _bench("--shapes", "9x50,3x1000", "--warmup", "0", "--repeats", "2", "--save", str(saved))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("# cpu") and "torch " + torch.__version__ in lines[0] and "commit" in lines[0]
    assert lines[1].startswith("# roofline (measured now): copy") and "TFLOP/s" in lines[1]
    assert lines[2].split()[:2] == ["op", "provider"]
    result = json.loads(lines[-1])
    assert result["bench"] == "kernels" and result["conditions"]["torch"] == torch.__version__
    assert result["roofline"]["copy_gbps"] > 0 and result["roofline"]["matmul_tflops"] > 0
    assert len(result["rows"]) == 8 and all(row["ok"] for row in result["rows"])
    assert all(row["extra"]["roofline"] == "copy" and row["extra"]["roofline_pct"] > 0 for row in result["rows"])
    assert json.loads(saved.read_text()) == result

    r = _bench(
        "--ops", "token_logprobs", "--shapes", "9x50", "--repeats", "2", "--no-roofline", "--compare", str(saved)
    )
    assert r.returncode == 0, r.stderr
    assert f"# compared with {saved}" in r.stdout and "speed-up" in r.stdout
    pairs = json.loads(r.stdout.strip().splitlines()[-1])["compare"]["pairs"]
    assert [(p["op"], p["provider"], p["shape"]) for p in pairs] == [
        ("token_logprobs", "ours", "9x50"),
        ("token_logprobs", "reference", "9x50"),
    ]
    assert all(p["speedup"] > 0 for p in pairs)


def test_cli_rejects_bad_arguments(tmp_path):
    not_a_result = tmp_path / "x.json"
    not_a_result.write_text("[1, 2]")
    for args in (
        ["--shapes", "12by7"],
        ["--ops", "nope"],
        ["--providers", "nope"],
        ["--tokens", "0"],
        ["--repeats", "0"],
        ["--compare", str(tmp_path / "missing.json")],
        ["--compare", str(not_a_result)],
    ):
        r = _bench(*args)
        assert r.returncode == 2 and "error:" in r.stderr, (args, r.stderr)
    r = _bench("--help")
    assert r.returncode == 0 and "--shapes" in r.stdout and "--compare" in r.stdout


def test_liger_provider_passes_the_gate_and_reports_kl_and_clipfrac():
    pytest.importorskip("liger_kernel")
    spec = bench_kernels.OPS["linear_flow_grpo_loss"]
    # 2 full sequences and a partial one (padded for Liger), per-sequence advantages
    inp = spec.make_inputs({"N": 2 * bench_kernels.SEQ_LEN + 37, "d": 32, "V": 211}, torch.float32, torch.device("cpu"))
    loss, metrics, grads = spec.providers["liger"](inp)
    assert set(metrics) == {"kl", "clipfrac"} and metrics["clipfrac"] > 0
    assert spec.compare((loss, metrics, grads), spec.expected(inp), torch.float32) < 1e-5


def test_report_paths_conditions_and_compare(tmp_path):
    cond = report.conditions(torch.device("cpu"))
    for key in ("device", "driver", "torch", "triton", "vllm", "transformers", "python", "commit", "date"):
        assert key in cond
    assert (
        report.result_path(cond, "kernels", tmp_path).name == f"{report.slug(cond['device'])}-{cond['date'][:10]}.json"
    )
    assert report.result_path(cond, "scale", tmp_path).name.endswith("-scale.json")
    assert report.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    rows = [{"op": "a", "provider": "ours", "shape": {"N": 3}, "dtype": "float32", "ok": True, "ms_median": 2.0}]
    old = report.save({"conditions": cond, "rows": rows}, "kernels", tmp_path / "old.json")
    new = [dict(rows[0], ms_median=0.5), dict(rows[0], provider="reference"), dict(rows[0], shape={"N": 4})]
    table, pairs = report.compare(new, old)
    assert [p["speedup"] for p in pairs] == [4.0] and "4.00x" in table
    _, none = report.compare([dict(rows[0], ok=False)], old)
    assert none == []


def test_compiled_reference_passes_the_gate_on_cpu():
    """torch.compile of the reference (the `compiled` provider) builds and matches on CPU."""
    rows = bench_kernels.run(
        ["token_logprobs", "flow_grpo_loss"],
        ["compiled"],
        [(17, 97)],
        torch.float32,
        torch.device("cpu"),
        warmup=0,
        repeats=1,
    )
    assert [r.provider for r in rows] == ["compiled", "compiled"]
    assert all(r.ok for r in rows), [r.error for r in rows]
