"""`flowgrpo train --nproc-per-node 2`: the whole loop on two real processes (torchrun, gloo, CPU).

Each run is a real `python -m engine.cli train` that re-launches itself under torchrun: FSDP2
trainer over both ranks, a vLLM-CPU engine per rank (tp 1) or one engine tensor-parallel over both
(tp 2, `external_launcher`), two steps of the toy preset with a learning rate that moves the policy.
The checks: the post-sync gap on every rank (the update moved the policy, the synced engines match
it), both ranks streamed identical weights into their engines, and rank 0 alone wrote metrics.
A two-rank run (embedded engine) SIGKILLed after its step-1 sharded checkpoint resumes on two
processes and then, from that 2-rank checkpoint, on one (DCP reshards). Two torchrun agents meeting as two
nodes run the loop on an HSDP mesh; stopped after step 2, it resumes on the same two nodes and on one node (an
FSDP mesh), and both equal an uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torchrun_nodes import run_two_nodes

from engine.checkpoint import list_checkpoints, load_latest
from engine.metrics import is_declared, read_metrics
from engine.presets import TOY_TOOLS
from engine.ranks import RANK_TIMING_FILE, combine_rows
from engine.tiny import TinyConfig, make_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("toy") / "model"
    make_tiny(out, TinyConfig(extra_tokens=TOY_TOOLS))
    return str(out)


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "VLLM_LOGGING_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    return env


def _train(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "train", *args],
        cwd=ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _whole_loop(run: Path, model_dir: str, engine: str, tp: int) -> tuple[list[dict], list[dict], str]:
    res = _train(
        *("--preset", "toy", "--model", model_dir, "--engine", engine, "--run-dir", str(run)),
        *("--steps", "2", "--queries-per-step", "2", "--group-size", "4", "--lr", "1e-2", "--seed", "1"),
        *("--nproc-per-node", "2", "--tp", str(tp)),
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return read_metrics(run / "metrics.jsonl"), read_metrics(run / RANK_TIMING_FILE), res.stdout


def _check(rows: list[dict], ranks: list[dict], stdout: str, tp: int) -> None:
    assert [r["step"] for r in rows] == [1, 2], "rank 0 alone writes one line per step"
    assert stdout.count("done: 2 steps") == 1 and stdout.count("flowgrpo train · preset toy") == 1
    for r in rows:
        assert not [k for k in r if not is_declared(k)]
        assert r["dist/world_size"] == 2 and r["dist/tp_size"] == tp
        assert r["dist/gen_s_min"] <= r["dist/gen_s_max"] and r["dist/step_s_min"] <= r["dist/step_s_max"]
        # the step's B = 2 queries: one per rank with tp 1, both on the shared engine with tp 2
        assert r["rollout/num_queries"] == 2 and r["rollout/num_trajectories"] == 8 and r["adv/num_groups"] == 2
        # every rollout ran on synced weights on every rank (max over ranks): engine and trainer agree
        assert r["training/rollout_logprob_diff_max"] < 1e-4  # float32: observed <= 1e-6
    first = rows[0]
    assert first["sync/gap_stale_max"] > 1e-3, "the update must move the policy (else the gap check is vacuous)"
    assert first["sync/gap_after_max"] < 1e-4 < first["sync/gap_stale_max"] / 100  # float32: observed ~5e-7
    assert [line["step"] for line in ranks] == [1, 2]
    for line in ranks:
        a, b = line["ranks"]
        # both ranks streamed the same full weights into their engines (gathered from the FSDP shards)
        assert a["sync/weights_sum"] == b["sync/weights_sum"]
        assert a["timing_s/gen"] > 0 and b["timing_s/gen"] > 0
    assert ranks[0]["ranks"][0]["sync/weights_sum"] != ranks[1]["ranks"][0]["sync/weights_sum"]
    for rank in ranks[0]["ranks"]:  # each rank's own engine matches the updated trainer right after the sync
        assert rank["sync/gap_after_max"] < 1e-4


def test_two_ranks_one_vllm_engine_each(tmp_path, toy_model_dir):
    pytest.importorskip("vllm")
    rows, ranks, stdout = _whole_loop(tmp_path / "run", toy_model_dir, "vllm", tp=1)
    _check(rows, ranks, stdout, tp=1)
    ck = load_latest(tmp_path / "run")
    assert ck is not None and ck.step == 2 and ck.layout == "dcp" and ck.world == 2


def test_two_ranks_one_tensor_parallel_vllm_engine(tmp_path, toy_model_dir):
    pytest.importorskip("vllm")
    rows, ranks, stdout = _whole_loop(tmp_path / "run", toy_model_dir, "vllm", tp=2)
    _check(rows, ranks, stdout, tp=2)
    assert all(r["rollout/schedule"] == "lockstep" for r in rows)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["rollout"]["tensor_parallel_size"] == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--queries-per-step", "3", "--nproc-per-node", "2"), "--queries-per-step 3 must be divisible by the 2"),
        (("--nproc-per-node", "2", "--tp", "3"), "--tp 3 must divide the number of processes 2"),
        (
            (
                "--tp",
                "2",
            ),
            "--tp 2 needs 2 ranks",
        ),
        (("--nproc-per-node", "2", "--tp", "2", "--engine", "embedded"), "the embedded engine runs one per rank"),
        (
            (
                "--nproc-per-node",
                "0",
            ),
            "--nproc-per-node 0: pass a count >= 1",
        ),
    ],
)
def test_bad_layouts_are_one_line_before_any_work(tmp_path, args, expected):
    res = _train("--run-dir", str(tmp_path / "run"), *args, timeout=120)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr
    assert "launching" not in res.stdout and not (tmp_path / "run").exists()


def test_rank_metrics_are_combined_by_kind():
    a = {"rollout/num_trajectories": 4, "actor/num_seqs": 5.0, "timing_s/gen": 1.0, "reward/max": 1.0}
    a.update({"actor/ratio_max": 1.2, "actor/num_mini_batches": 1.0, "engine": "vllm", "reward/x/mean": 0.5})
    b = {"rollout/num_trajectories": 4, "actor/num_seqs": 3.0, "timing_s/gen": 3.0, "reward/max": 0.0}
    b.update({"actor/ratio_max": 1.5, "actor/num_mini_batches": 1.0, "engine": "vllm", "sync/gap_after_max": None})
    out = combine_rows([a, b])
    assert out["rollout/num_trajectories"] == 8 and out["actor/num_seqs"] == 8.0  # counts add up
    assert out["timing_s/gen"] == 2.0 and out["actor/ratio_max"] == 1.5 and out["reward/max"] == 1.0
    assert out["actor/num_mini_batches"] == 1.0 and out["engine"] == "vllm"
    assert out["reward/x/mean"] == 0.5 and out["sync/gap_after_max"] is None  # keys of one rank only survive
    # tp 2: the two ranks of one engine report the same rollout, counted once; trainer keys over both
    tp = combine_rows([a, {**a, "actor/num_seqs": 3.0}], tp=2)
    assert tp["rollout/num_trajectories"] == 4 and tp["actor/num_seqs"] == 8.0
    # every rank validates the whole set and syncs the whole model: counted once, not world times
    v = {"val/num_queries": 4, "val/accuracy": 0.5, "sync/num_tensors": 30}
    both = combine_rows([v, dict(v)])
    assert both["val/num_queries"] == 4 and both["val/accuracy"] == 0.5 and both["sync/num_tensors"] == 30


def test_the_relaunch_command_parses_back_into_the_same_options():
    import argparse

    from engine.ranks import option_argv, torchrun_command
    from engine.train import add_arguments

    p = argparse.ArgumentParser()
    add_arguments(p)
    given = [
        "--preset",
        "toy",
        "--steps",
        "3",
        "--val-data",
        "a.jsonl",
        "b.jsonl",
        "--val-before-train",
        "--lr",
        "0.01",
    ]
    args = p.parse_args([*given, "--nproc-per-node", "2", "--tp", "2"])
    argv = option_argv(p, args, drop=("nproc_per_node",))
    assert vars(p.parse_args(argv)) == {**vars(args), "nproc_per_node": None}
    cmd = torchrun_command(2, ["train", *argv])
    assert cmd[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "engine.cli"]
    assert cmd[8:] == ["train", *argv]


def _read_sharded(ck_path: Path, model_dir: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The weights and AdamW state of a sharded checkpoint, read into a one-process model (DCP reshards)."""
    from engine.dist_checkpoint import load_sharded
    from engine.model import load_planner

    model = load_planner(model_dir, dtype="float32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    load_sharded(ck_path, model, opt, restore_rng_state=False)
    return model, opt


def _adam_steps(ck_path: Path, model_dir: str) -> set[int]:
    """The AdamW step counts stored in a checkpoint."""
    return {int(s["step"]) for s in _read_sharded(ck_path, model_dir)[1].state.values()}


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out.append(todo.pop())
        todo += children.get(out[-1], [])
    return out


def test_a_killed_two_rank_run_resumes_on_two_and_then_on_one_process(tmp_path, toy_model_dir):
    run = tmp_path / "run"
    common = ["--preset", "toy", "--model", toy_model_dir, "--engine", "embedded", "--run-dir", str(run)]
    common += ["--queries-per-step", "2", "--group-size", "4", "--lr", "1e-2", "--seed", "1", "--save-every", "1"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "train", *common, "--steps", "50", "--nproc-per-node", "2"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "step_000001").is_dir():  # committed: renamed from its temp directory
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run did not write its step-1 checkpoint in 300 s"
            time.sleep(0.02)
    finally:  # the launcher, torchrun, both ranks (each in a session of its own) and anything they started:
        stopped: list[int] = []  # frozen first (a stopped process starts nothing), then killed
        while new := [pid for pid in _process_tree(proc.pid) if pid not in stopped]:
            for pid in new:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            stopped += new
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    ck = load_latest(run)
    # killed right after step 1's checkpoint (step 2's, should this process have been descheduled that long)
    assert ck is not None and ck.step in (1, 2) and ck.layout == "dcp" and ck.world == 2
    # the checkpoint is written before its metrics line (which it also holds, combined over both ranks)
    lines = len(read_metrics(run / "metrics.jsonl"))
    assert lines in (ck.step - 1, ck.step)
    # the kill between a checkpoint and its metrics line, every time: drop the lines written after the checkpoint
    for name in ("metrics.jsonl", RANK_TIMING_FILE):
        kept = [json.dumps(r) + "\n" for r in read_metrics(run / name) if r["step"] < ck.step]
        (run / name).write_text("".join(kept))
    assert ck.state["metrics"]["dist/world_size"] == 2 and len(ck.state["ranks"]) == 2

    # validating every step from here on: the best checkpoint of an FSDP run is the full weights, on rank 0
    val = tmp_path / "val.jsonl"
    from agentflow.tasks import load_task

    val.write_text(
        "".join(
            json.dumps({"id": q.id, "question": q.question, "answer": q.answer, "judge": q.judge}) + "\n"
            for q in load_task("toy", 4)
        )
    )
    res = _train(
        *common, "--steps", "3", "--resume", "--nproc-per-node", "2", "--val-data", str(val), "--val-every", "1"
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert f"resumed from {ck.path} (step {ck.step}), a sharded checkpoint of 2 processes" in res.stdout
    assert f"metrics line of step {ck.step} restored from its checkpoint" in res.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3], "every step's line exactly once"
    assert [r["step"] for r in read_metrics(run / RANK_TIMING_FILE)] == [1, 2, 3]
    for r in rows:
        assert r["dist/world_size"] == 2 and r["training/rollout_logprob_diff_max"] < 1e-4  # float32: ~2e-7
    ck3 = load_latest(run)
    assert ck3.step == 3 and ck3.world == 2
    # the optimizer state went through the kill: one AdamW step per mini-batch of every step, before and after it
    mb = rows[0]["actor/num_mini_batches"]
    assert _adam_steps(ck3.path, toy_model_dir) == {3 * mb}
    best = list_checkpoints(run / "best")
    assert len(best) == 1 and best[0].layout == "single" and best[0].step in (2, 3)
    from engine.checkpoint import load_checkpoint
    from engine.dist_checkpoint import load_sharded
    from engine.model import load_planner

    full, sharded = load_planner(toy_model_dir, dtype="float32"), load_planner(toy_model_dir, dtype="float32")
    load_checkpoint(best[0], full, restore_rng_state=False)
    load_sharded(run / "checkpoints" / f"step_{best[0].step:06d}", sharded, restore_rng_state=False)
    for (n, a), b in zip(full.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(a, b), n

    res = _train(*common, "--steps", "4", "--resume")  # one process, from the 2-rank checkpoint
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    assert f"resumed from {ck3.path} (step 3), a sharded checkpoint of 2 processes" in res.stdout
    assert "RNG states not restored: step_000003 was written by 2 ranks and this run has 1" in res.stdout
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["dist/world_size"] == 1
    ck4 = load_latest(run)
    assert ck4.step == 4 and ck4.layout == "single"
    state = torch.load(ck4.path / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    assert {int(s["step"]) for s in state.values()} == {4 * mb}
    # a one-process checkpoint does not resume on two: one line, nothing launched
    res = _train(*common, "--steps", "5", "--resume", "--nproc-per-node", "2", timeout=120)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "was written by one process" in lines[0], res.stderr
    assert "launching" not in res.stdout and load_latest(run).step == 4
    res = _train(*common, "--steps", "5", "--nproc-per-node", "2", timeout=120)  # neither --resume nor --restart
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "holds an earlier run" in lines[0], res.stderr
    assert "launching" not in res.stdout and load_latest(run).step == 4


# the metrics a step's weights, rollout and update decide (no clock in them): equal from run to run
RESULT_PREFIXES = ("reward/", "adv/", "actor/", "training/", "rollout/num_")
# HSDP -> one-node FSDP: the grad norm sums its squares per shard (2 shards on fsdp 2, whole tensors on fsdp 1), so
# the clip coefficient and the update after it differ in the last bits; observed (float32, seed 4): grad norm
# 1.5e-7 relative, step-3 weights and AdamW moments <= 4.7e-7 of each tensor's largest entry (a missing or wrong
# restore is off by O(1)). On the same mesh the resumed run repeats every operation: bit for bit.
CROSS_MESH_RTOL = 1e-5


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |a| (0 when equal)."""
    d = (a.double() - b.double()).abs().max().item()
    return d / max(a.double().abs().max().item(), 1e-300) if d else 0.0


def _close(got: Any, want: Any, rtol: float) -> bool:
    """Floats within `rtol` of `want`; anything else (counts, names, None) equal."""
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) <= rtol * abs(want)
    return got == want


def test_hsdp_on_two_nodes_resumes_on_hsdp_and_on_one_node_as_if_never_stopped(tmp_path, toy_model_dir):
    """The whole loop on two torchrun agents that meet as two nodes (c10d on localhost): the trainer's mesh is
    HSDP (replicate 2 x fsdp 1). A run stopped after step 2 resumes its sharded checkpoint on the same two nodes
    (bit for bit an uninterrupted run's step 3: weights, AdamW state, metrics) and, from a copy, on one node of two
    processes (mesh fsdp 2: DCP reshards the replicas' shards; equal within CROSS_MESH_RTOL)."""
    env = {**_env(), "OMP_NUM_THREADS": "1"}  # torchrun sets it only for several processes per node: every run
    common = ["--preset", "toy", "--model", toy_model_dir, "--engine", "embedded", "--seed", "4", "--lr", "1e-2"]
    common += ["--queries-per-step", "2", "--group-size", "4", "--save-every", "1"]

    def hsdp(run: Path, steps: int, *more: str) -> str:
        argv = ["-m", "engine.cli", "train", *common, "--run-dir", str(run), "--steps", str(steps), *more]
        return run_two_nodes(argv, cwd=ROOT, env=env)

    whole, run, other = tmp_path / "whole", tmp_path / "run", tmp_path / "other"
    outs = [hsdp(whole, 3), hsdp(run, 2)]
    shutil.copytree(run, other)
    outs.append(hsdp(run, 3, "--resume"))
    res = _train(*common, "--run-dir", str(other), "--steps", "3", "--resume", "--nproc-per-node", "2", env=env)
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    for out in [*outs, res.stdout]:  # rank 0 alone prints, whichever node it is on
        assert out.count("flowgrpo train · preset toy") == 1 and out.count("done: ") == 1, out[-3000:]
    hsdp_note = "2 processes on 2 nodes: FSDP2 trainer on the HSDP mesh replicate 2 x fsdp 1, 2 rollout groups"
    assert hsdp_note in outs[0] and hsdp_note in outs[2]
    assert "2 processes on 1 node: FSDP2 trainer on the FSDP mesh fsdp 2, 2 rollout groups" in res.stdout
    for d, out in ((run, outs[2]), (other, res.stdout)):
        assert "steps 3..3" in out
        assert f"resumed from {d / 'checkpoints' / 'step_000002'} (step 2), a sharded checkpoint of 2 processes" in out

    ref, ref_ranks = read_metrics(whole / "metrics.jsonl"), read_metrics(whole / RANK_TIMING_FILE)
    assert ref[2]["actor/grad_norm"] > 0 and ref[2]["reward/std"] > 0, "step 3 must update, else it proves nothing"
    runs = ((whole, [(2, 1)] * 3, 0.0), (run, [(2, 1)] * 3, 0.0), (other, [(2, 1), (2, 1), (1, 2)], CROSS_MESH_RTOL))
    for d, meshes, rtol in runs:
        rows, ranks = read_metrics(d / "metrics.jsonl"), read_metrics(d / RANK_TIMING_FILE)
        assert [r["step"] for r in rows] == [1, 2, 3] and [r["step"] for r in ranks] == [1, 2, 3], d.name
        assert all(is_declared(k) for r in rows for k in r) and all(r["dist/world_size"] == 2 for r in rows)
        assert [(r["dist/replicate_size"], r["dist/fsdp_size"]) for r in rows] == meshes, d.name  # each step's mesh
        for r, u in zip(rows, ref):
            off = {
                k: (r.get(k), v)
                for k, v in u.items()
                if k.startswith(RESULT_PREFIXES) and not _close(r.get(k), v, rtol)
            }
            assert not off, f"{d.name} step {r['step']} (got, uninterrupted): {off}"
        # every rank synced the uninterrupted run's weights into its engine (their float64 sum)
        for line, u in zip(ranks, ref_ranks):
            sums = [(x["sync/weights_sum"], y["sync/weights_sum"]) for x, y in zip(line["ranks"], u["ranks"])]
            assert len(sums) == 2 and all(_close(a, b, rtol) for a, b in sums), (d.name, line["step"], sums)

    ck = load_latest(whole)
    assert ck is not None and ck.step == 3 and ck.layout == "dcp" and ck.world == 2
    model, opt = _read_sharded(ck.path, toy_model_dir)
    # the replicas hold equal shards: DCP writes every tensor once (both ranks share the writing), not once per node
    payload = sum(p.numel() * p.element_size() for p in model.parameters()) * 3  # weights, exp_avg, exp_avg_sq
    files = [p.stat().st_size for p in ck.path.glob("__*_0.distcp")]
    assert len(files) == 2 and min(files) > 0 and payload < sum(files) < 1.2 * payload, (files, payload)
    from engine.model import load_planner

    base = load_planner(toy_model_dir, dtype="float32").state_dict()
    weights, adam = model.state_dict(), opt.state_dict()["state"]
    assert max((weights[n] - base[n]).abs().max().item() for n in base) > 1e-3, "the weights must move"
    assert {int(s["step"]) for s in adam.values()} == {3 * ref[0]["actor/num_mini_batches"]}
    for d, _, rtol in runs[1:]:
        ck = load_latest(d)
        assert ck is not None and ck.step == 3 and ck.layout == "dcp" and ck.world == 2
        m, o = _read_sharded(ck.path, toy_model_dir)
        diffs = {n: _rel_diff(weights[n], t) for n, t in m.state_dict().items()}
        for i, state in o.state_dict()["state"].items():
            diffs.update({f"AdamW {k} of parameter {i}": _rel_diff(adam[i][k], t) for k, t in state.items()})
        assert max(diffs.values()) <= rtol, f"{d.name}: " + str({k: v for k, v in diffs.items() if v > rtol})


def test_killing_the_launcher_stops_every_rank(tmp_path, toy_model_dir):
    """SIGKILL of `flowgrpo train --nproc-per-node 2` itself (no cleanup can run): torchrun gets SIGTERM from
    the kernel (PR_SET_PDEATHSIG) and stops both ranks, so nothing keeps the run directory locked."""
    run = tmp_path / "run"
    args = ["--preset", "toy", "--model", toy_model_dir, "--engine", "embedded", "--run-dir", str(run)]
    args += ["--queries-per-step", "2", "--group-size", "2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "train", *args, "--steps", "100000", "--nproc-per-node", "2"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").stat().st_size:
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not write a metrics line"
        time.sleep(0.05)
    tree = _process_tree(proc.pid)
    assert len(tree) >= 4, f"launcher, torchrun and two ranks expected, got {tree}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 120
    while alive := [pid for pid in tree[1:] if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"]:
        assert time.monotonic() < deadline, f"still running 120 s after the launcher was killed: {alive}"
        time.sleep(0.2)
    res = _train(*args, "--steps", "1", "--restart")  # the lock is free: a new run takes the directory
    assert res.returncode == 0, res.stderr[-3000:]


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
