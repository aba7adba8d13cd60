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


# ---- manifest: every file checksummed, damaged checkpoints skipped with the reason ----


def _flip(path: Path, offset: int) -> None:
    """Flip one bit at `offset` (negative: from the end); the file keeps its size, so a size check passes."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _header_offset(path: Path) -> int:
    """An offset inside the safetensors JSON header: a digit of the first data offset."""
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = path.read_bytes()[8 : 8 + n]
    return 8 + header.index(b'"data_offsets":[') + len(b'"data_offsets":[')


@pytest.mark.parametrize("damage", ["safetensors header", "tensor bytes", "optimizer.pt"])
def test_a_damaged_checkpoint_is_skipped_for_the_newest_that_verifies(tmp_path, damage):
    model = small_model(seed=1)
    trainer = Trainer(model, config())
    trainer.update(sequences(0))
    save_checkpoint(tmp_path, 1, model, trainer.optimizer, {"n": 1})
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.update(sequences(1))
    newest = save_checkpoint(tmp_path, 2, model, trainer.optimizer, {"n": 2})
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["algorithm"] == "sha256"
    assert set(manifest["files"]) == {"model.safetensors", "config.json", "optimizer.pt", "state.json"}
    assert load_latest(tmp_path).step == 2

    target = newest / ("optimizer.pt" if damage == "optimizer.pt" else "model.safetensors")
    if damage == "safetensors header":
        _flip(target, _header_offset(target))
    elif damage == "tensor bytes":
        _flip(target, -5)
    else:
        _flip(target, target.stat().st_size // 2)
    assert load_latest(tmp_path, verify=False).step == 2, "sizes alone do not see the damage"
    notes: list[str] = []
    ck = load_latest(tmp_path, notes=notes)
    assert ck.step == 1 and ck.state == {"n": 1}
    assert notes == [f"skipped checkpoint step_000002: {target.name} is damaged: bytes 0..{target.stat().st_size} "
                     "do not match their sha256"]  # fmt: skip
    other = small_model(seed=9)
    load_checkpoint(ck, other, Trainer(other, config()).optimizer)
    for k, v in other.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_a_damaged_manifest_or_state_is_skipped_too(tmp_path):
    model = small_model()
    save_checkpoint(tmp_path, 1, model, None)
    second = save_checkpoint(tmp_path, 2, model, None)
    (second / "manifest.json").write_text("{")
    notes: list[str] = []
    assert load_latest(tmp_path, notes=notes).step == 1 and notes == [
        "skipped checkpoint step_000002: manifest.json is damaged"
    ]
    third = save_checkpoint(tmp_path, 3, model, None, keep_last=5)
    _flip(third / "state.json", 3)
    notes.clear()
    assert load_latest(tmp_path, notes=notes).step == 1
    assert notes[0].startswith("skipped checkpoint step_000003: state.json")  # fmt: skip


# ---- pruning: an interruption leaves nothing that looks like a checkpoint ----

_PRUNER = r"""
import os, shutil, sys, time, torch
sys.path.insert(0, sys.argv[1])
from transformers import Qwen2Config
from engine import checkpoint as ck
from engine.model import build_random_model
run_dir = sys.argv[2]
model = build_random_model(Qwen2Config(**__SMALL__, tie_word_embeddings=True), dtype="float32", seed=0)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in (1, 2):
    ck.save_checkpoint(run_dir, step, model, opt, keep_last=2)

def stall(path, *args, **kwargs):  # the prune deletes one file of the old checkpoint, then the process dies
    os.unlink(os.path.join(path, "model.safetensors"))
    print("IN_FLIGHT", path, flush=True)
    time.sleep(120)

shutil.rmtree = stall
ck.save_checkpoint(run_dir, 3, model, opt, keep_last=2)
print("FINISHED", flush=True)
""".replace("__SMALL__", repr(SMALL))


def test_a_kill_during_pruning_leaves_no_incomplete_checkpoint_and_leftovers_are_cleaned(tmp_path):
    from engine.checkpoint import clean_leftovers

    proc = subprocess.Popen(
        [sys.executable, "-c", _PRUNER, str(REPO), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("IN_FLIGHT"), proc.stderr.read()[-3000:]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    root = tmp_path / "checkpoints"
    assert Path(line.split()[1]).name.startswith(".trash-step_000001-"), "pruning deletes a renamed directory"
    steps = sorted(p.name for p in root.glob("step_*"))
    assert steps == ["step_000002", "step_000003"], "the pruned checkpoint is gone under its own name at once"
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 3] and load_latest(tmp_path).step == 3
    # leftovers: the half-deleted trash dir, and a killed writer's temp dir
    (root / ".tmp-step_000004-1-abcd").mkdir()
    (root / ".tmp-step_000004-1-abcd" / "model.safetensors").write_bytes(b"\0" * 10)
    removed = clean_leftovers(tmp_path)
    assert len(removed) == 2 and any(r.startswith(".trash-step_000001-") for r in removed)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000002", "step_000003"]


def test_incomplete_step_directories_older_than_the_kept_ones_are_pruned(tmp_path):
    """What an interrupted prune of an earlier version left: a step_* directory missing files."""
    model = small_model()
    first = save_checkpoint(tmp_path, 1, model, None)
    (first / "model.safetensors").unlink()
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, model, None, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_000003", "step_000004"]
