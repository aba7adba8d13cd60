"""`flowgrpo bench attention`: every backend that runs here, gated against SDPA per sequence, on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.attention import pack_lengths

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "engine.cli", "bench", "attention", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_pack_lengths_fill_the_row_exactly():
    lengths = pack_lengths(1000, 30, 300, seed=2)
    assert sum(lengths) == 1000 and all(1 <= n <= 300 for n in lengths) and min(lengths[:-1]) >= 30
    assert pack_lengths(1000, 30, 300, seed=2) == lengths


def test_bench_attention_times_every_cpu_backend_and_saves(tmp_path):
    saved = tmp_path / "attention.json"
    r = _run(
        *("--tokens", "300", "--min-len", "1", "--max-len", "130", "--shape", "smollm2", "--repeats", "2"),
        *("--save", str(saved)),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == json.loads(saved.read_text())
    assert result["bench"] == "attention" and result["auto"] == "sdpa_per_sequence"
    assert result["conditions"]["torch"] == torch.__version__ and sum(result["lengths"]) == 300
    assert "auto picks sdpa_per_sequence here (cpu, float32)" in r.stdout.splitlines()[0]
    rows = {(row["op"], row["provider"]): row for row in result["rows"]}
    # FlexAttention has no backward on CPU: forward only (and its block mask, built once per packed forward)
    assert sorted(rows) == [
        ("attention_fwd", "flex"),
        ("attention_fwd", "sdpa_per_sequence"),
        ("attention_fwd_bwd", "sdpa_per_sequence"),
        ("block_mask", "flex"),
    ]
    for row in rows.values():
        assert row["ok"] and row["ms_median"] > 0 and row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
    assert rows[("attention_fwd", "flex")]["max_err"] < 1e-5  # float32, gated against SDPA per sequence
    assert rows[("attention_fwd", "sdpa_per_sequence")]["shape"] == {
        "tokens": 300,
        "sequences": len(result["lengths"]),
        "heads": 9,
        "kv_heads": 3,
        "head_dim": 64,
    }


def test_bad_arguments_are_one_line_and_exit_2():
    r = _run("--backends", "varlen_attn")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "backend 'varlen_attn' cannot run here: needs CUDA" in r.stderr
    r = _run("--min-len", "50", "--max-len", "10")
    assert r.returncode == 2 and "--min-len <= --max-len" in r.stderr
    r = _run("--dry-run")
    assert r.returncode == 0 and r.stdout.startswith("# attention: auto picks")
