"""FSDP2 over two real processes (torchrun, gloo on CPU) against one process: the same update.

Two ranks each train on half of the same 8 planner turns with the fused LM-head loss; with the
global denominators all-reduced and FSDP's gradient average undone (`engine.parallelize`), the
losses and the updated parameters must equal a single process training on all 8.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torchrun_nodes import run_two_nodes

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "fsdp_worker.py"


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _run(cmd: list[str], tmp: Path) -> None:
    res = subprocess.run(cmd, cwd=tmp, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


def test_fsdp2_on_two_ranks_equals_one_process(tmp_path, tiny_model_dir):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    # the reference model (kl_coef > 0) is sharded too; lr 1e-5: AdamW's first steps turn float32
    # noise in near-zero gradients (4e-7 relative, observed) into updates of up to ~0.03 * lr
    common = [tiny_model_dir, "--steps", "3", "--kl-coef", "0.01", "--lr", "1e-5"]
    _run([sys.executable, str(WORKER), common[0], str(one), *common[1:]], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*launcher, str(WORKER), common[0], str(two), *common[1:]], tmp_path)
    a, b = torch.load(one), torch.load(two)
    assert a["world"] == 1 and b["world"] == 2
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) <= 1e-6  # float32: observed 2.2e-8
    assert a["params"].keys() == b["params"].keys()
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    moved = max((a["params"][n] - base[n]).abs().max().item() for n in a["params"])
    assert moved > 2e-5, "the update must move the weights, else the comparison below is vacuous"
    diff = max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"])
    assert diff <= 1e-6, f"max |param difference| {diff:.2e}"


def test_ranks_with_different_micro_batch_counts_stay_in_step(tmp_path, tiny_model_dir):
    """Rank 0 packs 6 turns, rank 1 two: the short rank runs zero-gradient padding passes (engine.trainer), so
    FSDP's collectives stay matched (no hang) and the update still equals one process on all 8 turns."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = [tiny_model_dir, "--steps", "2", "--kl-coef", "0.01", "--lr", "1e-5"]
    _run([sys.executable, str(WORKER), common[0], str(one), *common[1:]], tmp_path)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    _run([*launcher, str(WORKER), common[0], str(two), *common[1:], "--rank0-turns", "6"], tmp_path)
    a, b = torch.load(one), torch.load(two)
    counts = [m[0] for m in b["micro_batches"]]
    assert counts[0] > counts[1], f"the split must give the ranks different micro-batch counts, got {counts}"
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) <= 1e-6
    # the padding passes add exactly nothing to the gradient: the same norms as one process
    norms = [abs(x - y) / x for x, y in zip(a["grad_norms"], b["grad_norms"])]
    assert max(norms) <= 1e-4, f"relative grad-norm differences {norms}"  # observed 1.1e-5, as with an even split
    diff = max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"])
    assert diff <= 1e-6, f"max |param difference| {diff:.2e}"


def test_hsdp_across_two_nodes_with_c10d_rendezvous_equals_one_process(tmp_path, tiny_model_dir):
    """Two torchrun agents, one per "node" (`--nnodes 2 --node-rank i`), meet through a c10d rendezvous as on a
    cluster; the mesh is then 2-D HSDP (replicate over nodes, shard within) and the update equals one process."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    common = [tiny_model_dir, "--steps", "2", "--kl-coef", "0.01", "--lr", "1e-5"]
    _run([sys.executable, str(WORKER), common[0], str(one), *common[1:]], tmp_path)
    run_two_nodes([str(WORKER), common[0], str(two), *common[1:]], cwd=tmp_path, env=_env())
    a, b = torch.load(one), torch.load(two)
    assert b["world"] == 2 and b["mesh"] == {"replicate": 2, "fsdp": 1}
    assert max(abs(x - y) for x, y in zip(a["losses"], b["losses"])) <= 1e-6
    diff = max((a["params"][n] - b["params"][n]).abs().max().item() for n in a["params"])
    assert diff <= 1e-6, f"max |param difference| {diff:.2e}"


def test_a_rank_without_turns_stops_every_rank_with_the_same_error(tmp_path, tiny_model_dir):
    """Rank 1 gets no planner turns: both ranks raise the same error (decided by a collective) instead of
    rank 1 raising alone and rank 0 waiting forever in FSDP's first all-gather."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd = [*launcher, str(WORKER), tiny_model_dir, str(tmp_path / "x.pt"), "--steps", "1", "--rank0-turns", "8"]
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode != 0
    assert res.stderr.count("no sequences to train on on some rank") == 2, res.stderr[-3000:]
