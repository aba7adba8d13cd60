"""Nothing lost, errors before work: make-tiny never overwrites, one run per run directory, --resume
without a checkpoint refuses (--restart moves the run aside), and bad input is one line, exit 2,
before anything is built or deleted.

End-to-end cases run the real command line in subprocesses on the toy preset shrunk to a few
seconds per step (one-token planner, rule-based agents, embedded engine, CPU)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints
from engine.cli import main as cli_main
from engine.metrics import read_metrics
from engine.presets import TOY_TOOLS
from engine.run_dir import LOCK_FILE, RunDirLocked, lock_run_dir, move_aside
from engine.tiny import TinyConfig, make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("toy") / "model"
    make_tiny(out, TinyConfig(extra_tokens=TOY_TOOLS))
    return str(out)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def flowgrpo(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def toy_args(model: str, run: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "toy",
        "--model",
        model,
        "--engine",
        "embedded",
        "--run-dir",
        str(run),
        "--queries-per-step",
        "1",
        "--group-size",
        "2",
        *extra,
    ]


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowgrpo: error: "), stderr[-3000:]
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes | None]:
    """Every path under `d` with its bytes (None for directories)."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


# ---- make-tiny never overwrites ----


def test_make_tiny_refuses_a_non_empty_directory_a_file_and_bad_heads(tmp_path, capsys):
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "model.safetensors").write_bytes(b"someone's weights")
    out = flowgrpo("make-tiny", str(kept))  # the real command line once; the other cases in-process
    assert out.returncode == 2 and "is not empty (model.safetensors)" in one_error_line(out.stderr)
    assert "--force" in out.stderr and snapshot(kept) == {"model.safetensors": b"someone's weights"}

    a_file = tmp_path / "a_file"
    a_file.write_text("notes\n")
    assert cli_main(["make-tiny", str(a_file)]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err) and a_file.read_text() == "notes\n"

    assert cli_main(["make-tiny", str(tmp_path / "new"), "--hidden", "200", "--heads", "3"]) == 2
    assert "hidden (200) must be a multiple of heads (3)" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()

    assert cli_main(["make-tiny", str(kept), "--force", "--vocab-size", "300"]) == 0
    assert (kept / "config.json").is_file() and (kept / "model.safetensors").read_bytes() != b"someone's weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "kept"], "no temp or trash directory left"


# ---- one run per run directory ----


def test_the_lock_names_its_holder_and_is_released_on_exit(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):
        info = json.loads((run / LOCK_FILE).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        holder = rf"in use by PID {os.getpid()} on {socket.gethostname()}"
        with pytest.raises(RunDirLocked, match=holder), lock_run_dir(run):
            pass
        assert json.loads((run / LOCK_FILE).read_text()) == info, "the refused attempt changed the lock file"
    assert not (run / LOCK_FILE).exists() and not run.exists(), "released, and the unused directory removed"
    run.mkdir()
    (run / "kept").write_text("x")
    with lock_run_dir(run):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["kept"]


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    run = tmp_path / "run"
    run.mkdir()
    stale = {"pid": pid, "host": socket.gethostname(), "started": time.time() - 60, "command": "flowgrpo train"}
    (run / LOCK_FILE).write_text(json.dumps(stale))
    notes: list[str] = []
    with lock_run_dir(run, notes=notes):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and f"took over a stale lock of {run}: PID {pid}" in notes[0] and "gone" in notes[0]


def _wait_for_lines(proc: subprocess.Popen, metrics: Path, n: int) -> None:
    deadline = time.monotonic() + 120
    while len(read_metrics(metrics)) < n:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, f"the first run did not write {n} metrics lines in 120 s"
        time.sleep(0.05)


def test_a_second_train_on_the_same_run_dir_exits_naming_the_holder_and_touches_nothing(tmp_path, toy_model_dir):
    run = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", *toy_args(toy_model_dir, run, "--steps", "1000")],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for_lines(first, run / "metrics.jsonl", 1)
        first.send_signal(signal.SIGSTOP)  # a frozen first run: any change below is the second's
        try:
            before = snapshot(run)
            second = flowgrpo(*toy_args(toy_model_dir, run, "--steps", "3"))
            after = snapshot(run)
        finally:
            first.send_signal(signal.SIGCONT)
        assert second.returncode == 2
        line = one_error_line(second.stderr)
        assert f"run directory {run} is in use by PID {first.pid} on {socket.gethostname()}" in line
        assert after == before, "the refused run changed the run directory"
        assert first.poll() is None, "the first run goes on"
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert first.returncode == 130, first.stderr.read().decode()[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 1
    assert not (run / LOCK_FILE).exists(), "the lock is released when the run exits"


# ---- --resume without a checkpoint; --restart ----


def test_resume_without_a_complete_checkpoint_refuses_and_restart_moves_the_run_aside(tmp_path, toy_model_dir, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)  # an interrupted save: no state.json
    (run / "checkpoints" / "step_000002" / "model.safetensors").write_bytes(b"\0" * 64)
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward/mean": 0.5}) + "\n" for s in (1, 2)))
    before = snapshot(run)
    assert cli_main(toy_args(toy_model_dir, run, "--steps", "3", "--resume")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "holds an earlier run (metrics.jsonl, checkpoints/step_000002)" in line
    assert "skipped checkpoint step_000002: incomplete, no state.json" in line and "--restart" in line
    assert snapshot(run) == before, "the refused run changed the run directory"

    out = flowgrpo(*toy_args(toy_model_dir, run, "--steps", "1", "--restart"))
    assert out.returncode == 0, out.stderr[-3000:]
    (old,) = tmp_path.glob("run.old-*")
    assert f"--restart: moved the earlier run in {run} aside to {old}" in out.stdout
    assert snapshot(old) == before, "moved aside, byte for byte"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert [c.step for c in list_checkpoints(run)] == [1]


def test_resume_skips_a_damaged_checkpoint_and_never_duplicates_steps(tmp_path, toy_model_dir):
    run = tmp_path / "run"
    out = flowgrpo(*toy_args(toy_model_dir, run, "--steps", "2"))
    assert out.returncode == 0, out.stderr[-3000:]
    newest = run / "checkpoints" / "step_000002" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-7] ^= 0x40  # one bit of tensor data; the file keeps its size
    newest.write_bytes(bytes(data))
    out = flowgrpo(*toy_args(toy_model_dir, run, "--steps", "2", "--resume"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped checkpoint step_000002: model.safetensors is damaged" in out.stdout
    assert f"resumed from {run / 'checkpoints' / 'step_000001'} (step 1)" in out.stdout
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert [c.step for c in list_checkpoints(run)] == [1, 2]


# ---- errors before work ----


def _populated_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "checkpoints" / "step_000001" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    return run


def _bad_inputs(tmp_path: Path, model: str) -> dict[str, tuple[list[str], str]]:
    """name -> (extra train arguments, expected text in the one error line)."""
    import shutil

    def data(name: str, text: str) -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    def model_copy(name: str) -> Path:
        d = tmp_path / name
        shutil.copytree(model, d)
        return d

    bad_config = model_copy("bad_config")
    (bad_config / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": 12 8}\n')
    truncated = model_copy("truncated")
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate((truncated / "model.safetensors").stat().st_size - 1000)
    gpt2 = model_copy("gpt2")
    cfg = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    a_file = tmp_path / "run_file"
    a_file.write_text("x")
    m = ["--model", model]
    return {
        "data missing": ([*m, "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl' not found"),
        "data empty": ([*m, "--data", data("empty.jsonl", "\n")], "empty.jsonl: no queries"),
        "data invalid json": ([*m, "--data", data("bad.jsonl", '{"question": "1+1", "answer": 2}\n{oops\n')], ":2: invalid JSON"),
        "data without answer": ([*m, "--data", data("noanswer.jsonl", '{"question": "1+1"}\n')], "noanswer.jsonl:1: missing field 'answer'"),
        "corrupt config.json": (["--model", str(bad_config)], "config.json:2: invalid JSON"),
        "truncated safetensors": (["--model", str(truncated)], "model.safetensors is truncated"),
        "unsupported architecture": (["--model", str(gpt2)], "'gpt2' (GPT2LMHeadModel) is not supported by the trainer; supported: LlamaForCausalLM (llama), Qwen2ForCausalLM (qwen2)"),
        "micro-batch below a planner turn": ([*m, "--micro-batch-tokens", "100"], "--micro-batch-tokens 100 is smaller than one planner turn, which can reach 512 tokens"),
        "cuda without a GPU": ([*m, "--device", "cuda"], "--device cuda: "),
        "run dir is a file": ([*m, "--run-dir", str(a_file)], f"--run-dir {a_file} is a file"),
    }  # fmt: skip


CASES = (
    "data missing",
    "data empty",
    "data invalid json",
    "data without answer",
    "corrupt config.json",
    "truncated safetensors",
    "unsupported architecture",
    "micro-batch below a planner turn",
    "cuda without a GPU",
    "run dir is a file",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_before_anything_is_built_or_deleted(tmp_path, toy_model_dir, case, capsys):
    if case == "cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = _populated_run(tmp_path)
    before = snapshot(run)
    extra, expected = _bad_inputs(tmp_path, toy_model_dir)[case]
    args = toy_args(toy_model_dir, run)
    args = args[:3] + args[5:]  # the case's own --model
    if "--run-dir" in extra:
        i = args.index("--run-dir")
        args = args[:i] + args[i + 2 :]
    rc = cli_main([*args, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and expected in one_error_line(err)
    assert snapshot(run) == before, "the run directory was touched"


def test_bad_input_through_the_real_command_line_and_solve(tmp_path, toy_model_dir):
    run = _populated_run(tmp_path)
    before = snapshot(run)
    extra, expected = _bad_inputs(tmp_path, toy_model_dir)["data without answer"]
    out = flowgrpo(*toy_args(toy_model_dir, run), *extra)
    assert out.returncode == 2 and expected in one_error_line(out.stderr)
    assert snapshot(run) == before
    truncated = tmp_path / "truncated"
    out = flowgrpo("solve", "--model", str(truncated), "--num-queries", "1", "--group-size", "2")
    assert out.returncode == 2 and "model.safetensors is truncated" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-3000:]


def test_move_aside_keeps_everything_but_the_lock(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run):
        (run / "checkpoints").mkdir()
        (run / "metrics.jsonl").write_text("{}\n")
        moved = move_aside(run)
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]
    assert moved is not None and sorted(p.name for p in moved.iterdir()) == ["checkpoints", "metrics.jsonl"]
    assert move_aside(run) is None


def test_a_run_dir_with_an_earlier_run_is_refused_without_resume_or_restart(tmp_path, toy_model_dir, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    before = snapshot(run)
    assert cli_main(toy_args(toy_model_dir, run, "--steps", "2")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{run} holds an earlier run (metrics.jsonl, checkpoints/step_000001)" in line
    assert "--resume" in line and "--restart" in line
    assert snapshot(run) == before, "the refused run changed the run directory"
