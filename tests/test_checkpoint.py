"""Checkpoints: exact round trip, bitwise resume, and writers killed mid-save leave a loadable run."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import list_checkpoints, load_checkpoint, load_latest, save_checkpoint
from engine.model import build_random_model
from engine.packing import TrainSequence
from engine.trainer import Trainer, TrainerConfig

REPO = Path(__file__).resolve().parents[1]

SMALL = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
)


def small_model(seed: int = 0, tie: bool = True):
    from transformers import Qwen2Config

    return build_random_model(Qwen2Config(**SMALL, tie_word_embeddings=tie), dtype="float32", seed=seed)


def sequences(seed: int) -> list[TrainSequence]:
    rng = random.Random(seed)
    out = []
    for i in range(6):
        p, r = rng.randint(1, 15), rng.randint(1, 10)
        out.append(
            TrainSequence(
                [rng.randrange(211) for _ in range(p)],
                [rng.randrange(211) for _ in range(r)],
                [-rng.random() * 4 for _ in range(r)],
                rng.uniform(-1, 1),
                traj_id=i,
            )
        )
    return out


def config() -> TrainerConfig:
    return TrainerConfig(loss_impl="reference", kl_coef=0.0, lr=1e-3, micro_batch_tokens=40)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_exact_and_loads_as_hf_model(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    model = small_model(seed=1, tie=tie)
    trainer = Trainer(model, config())
    trainer.update(sequences(0))
    random.seed(123)
    torch.manual_seed(456)
    path = save_checkpoint(tmp_path, 7, model, trainer.optimizer, {"config": {"lr": 1e-3}, "metrics_lines": 7})
    expected_python, expected_torch = random.random(), torch.rand(3)
    assert path.name == "step_000007" and (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000007"

    other = small_model(seed=2, tie=tie)
    t2 = Trainer(other, config())
    ck = load_checkpoint(load_latest(tmp_path), other, t2.optimizer)
    assert ck.step == 7 and ck.state == {"config": {"lr": 1e-3}, "metrics_lines": 7}
    assert_same_weights(model, other)
    assert_same_optimizer(trainer.optimizer, t2.optimizer)
    assert random.random() == expected_python and torch.equal(torch.rand(3), expected_torch), "RNG states restored"
    if tie:
        assert other.lm_head.weight is other.model.embed_tokens.weight, "tying survives loading"

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(hf.state_dict()[k], v), k


def test_resume_continues_bitwise(tmp_path):
    seqs = [sequences(s) for s in range(3)]
    # Uninterrupted: three updates.
    a = small_model(seed=3)
    ta = Trainer(a, config())
    for i, s in enumerate(seqs):
        ta.update(s)
        if i == 0:
            save_checkpoint(tmp_path, 1, a, ta.optimizer, {"step": 1})
    # Interrupted after the first: a fresh process state resumes from the checkpoint.
    b = small_model(seed=99)
    tb = Trainer(b, config())
    ck = load_checkpoint(load_latest(tmp_path), b, tb.optimizer)
    assert ck.step == 1
    for s in seqs[ck.step :]:
        tb.update(s)
    assert_same_weights(a, b)
    assert_same_optimizer(ta.optimizer, tb.optimizer)


def test_keeps_the_last_k(tmp_path):
    model = small_model()
    opt = torch.optim.AdamW(model.parameters())
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model, opt, keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 5]
    # Saving a step again (a resumed run repeating it) replaces it atomically.
    save_checkpoint(tmp_path, 5, model, opt, {"again": True}, keep_last=2)
    assert load_latest(tmp_path).state == {"again": True}
    assert not list((tmp_path / "checkpoints").glob(".old-*"))


def test_partial_and_corrupt_checkpoints_are_ignored(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path, 1, model, None)
    root = tmp_path / "checkpoints"
    # A killed writer's temp dir, a step dir whose model file was truncated, one without state.json.
    (root / ".tmp-step_000002-1-abc").mkdir()
    (root / ".tmp-step_000002-1-abc" / "model.safetensors").write_bytes(b"\0" * 100)
    bad = save_checkpoint(tmp_path, 3, model, None)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(10)
    (root / "step_000004").mkdir()
    assert load_latest(tmp_path).step == 1
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(root / "step_000004", model)
    save_checkpoint(tmp_path, 5, model, None)
    assert not list(root.glob(".tmp-*")), "the next save removes a dead writer's temp dir"


def test_mismatched_model_is_a_clear_error(tmp_path):
    save_checkpoint(tmp_path, 1, small_model(tie=False), None)
    with pytest.raises(ValueError, match="does not match the model"):
        load_checkpoint(load_latest(tmp_path), _wider())
    with pytest.raises(ValueError, match="dtype it was trained in"):
        load_checkpoint(load_latest(tmp_path), small_model(tie=False).to(torch.bfloat16))


def _wider():
    from transformers import Qwen2Config

    return build_random_model(Qwen2Config(**{**SMALL, "num_hidden_layers": 3}), dtype="float32")


_WRITER = r"""
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from transformers import Qwen2Config
from engine import checkpoint as ck
from engine.model import build_random_model
run_dir, hook = sys.argv[2], sys.argv[3]
cfg = Qwen2Config(**__SMALL__, tie_word_embeddings=True)
model = build_random_model(cfg, dtype="float32", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ck.save_checkpoint(run_dir, 1, model, opt, {"note": "first"})
with torch.no_grad():
    for p in model.parameters():
        p.add_(1.0)
original = getattr(ck, hook)

def stall(*args, **kwargs):
    if hook == "_fsync_file":  # the first file of step 2 is on disk, the rest is not
        original(*args, **kwargs)
    print("IN_FLIGHT", flush=True)
    time.sleep(120)

setattr(ck, hook, stall)
ck.save_checkpoint(run_dir, 2, model, opt, {"note": "second"})
print("FINISHED", flush=True)
""".replace("__SMALL__", repr(SMALL))


@pytest.mark.parametrize(("hook", "expected_step"), [("_fsync_file", 1), ("_write_latest", 2)])
def test_writer_killed_mid_save_leaves_a_loadable_checkpoint(tmp_path, hook, expected_step):
    """SIGKILL the writer while it writes step 2: inside the temp dir (step 1 stays the latest) or
    after the commit rename but before the pointer update (step 2 is complete and is the latest)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(REPO), str(tmp_path), hook],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "IN_FLIGHT", proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    root = tmp_path / "checkpoints"
    if expected_step == 1:
        assert list(root.glob(".tmp-step_000002-*")), "the killed writer left its temp dir behind"
    else:
        assert (root / "latest").read_text().strip() == "step_000001", "killed before the pointer moved"

    ck = load_latest(tmp_path)
    assert ck.step == expected_step and ck.state["note"] == ("first" if expected_step == 1 else "second")
    model = small_model(seed=5)
    load_checkpoint(ck, model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    reference = small_model(seed=0)
    if expected_step == 2:
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(1.0)
    assert_same_weights(model, reference)
    meta = json.loads((ck.path / "state.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "config.json", "optimizer.pt"}
