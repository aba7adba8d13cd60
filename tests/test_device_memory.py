"""Memory time-sharing: snapshots, optimizer-state offload round trips, phase order, OOM messages."""

from __future__ import annotations

import copy

import pytest
import torch

from engine.device_memory import (
    DeviceMemoryManager,
    HostOffloader,
    PhaseOrderError,
    PhaseOutOfMemoryError,
    fmt_bytes,
    snapshot,
)
from engine.rollout.protocol import SleepReport, SyncReport
from engine.timer import PhaseTimer

SNAPSHOT_KEYS = {
    "phase",
    "device",
    "torch_allocated",
    "torch_reserved",
    "torch_peak_allocated",
    "nvml_used",
    "nvml_total",
    "nvml",
    "rss",
}


def _model_and_optimizer(device, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(33, 65), torch.nn.GELU(), torch.nn.Linear(65, 7)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def _set_grads(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen).to(p.device)


def _state_tensors(opt):
    return [(k, v) for s in opt.state.values() for k, v in s.items() if isinstance(v, torch.Tensor)]


class ScriptedEngine:
    """Records the order of protocol calls (the real engine runs in the end-to-end test below)."""

    def __init__(self, held=123_456_789):
        self.calls = []
        self.held = held

    def wake(self, tags=None):
        self.calls.append(("wake", tuple(tags) if tags else None))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))
        return SleepReport(supported=True, level=level, freed_bytes=self.held)

    def sync_weights(self, named):
        names = [n for n, _ in named]
        self.calls.append(("sync", len(names)))
        return SyncReport(num_tensors=len(names), num_expected=len(names), bytes_moved=0, seconds=0.0)

    def stats(self):
        return {"held_bytes": float(self.held)}


def test_snapshot_reports_every_key_and_says_when_nvml_is_missing(device):
    snap = snapshot("rollout", device)
    assert set(snap) == SNAPSHOT_KEYS and snap["phase"] == "rollout"
    if device.type == "cpu":
        assert snap["nvml"].startswith("unavailable (") and snap["nvml_used"] is None
        assert snap["torch_allocated"] is None
        assert snap["rss"] is not None and snap["rss"] > 10 << 20
    else:
        assert snap["torch_allocated"] is not None and snap["torch_reserved"] >= snap["torch_allocated"]


def test_host_offloader_round_trips_state_exactly_and_training_continues_identically(device):
    model, opt = _model_and_optimizer(device)
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(2):
        for m, o in ((model, opt), (twin, twin_opt)):
            _set_grads(m, step)
            o.step()
    saved = [(k, v.clone()) for k, v in _state_tensors(opt)]
    grads = [p.grad.clone() for p in model.parameters()]
    ids = [id(v) for _, v in _state_tensors(opt)]

    off = HostOffloader(opt, grads="offload", device=device)
    report = off.offload()
    movable = [v for k, v in saved if v.device.type == device.type]
    grad_bytes = sum(g.numel() * g.element_size() for g in grads)
    assert report.tensors == len(movable) + len(grads)
    assert report.bytes == sum(v.numel() * v.element_size() for v in movable) + grad_bytes
    assert report.released_bytes == report.bytes
    assert all(v.numel() == 0 for _, v in _state_tensors(opt) if v.device.type == device.type)  # storage gone
    assert all(p.grad.numel() == 0 for p in model.parameters())
    with pytest.raises(RuntimeError, match="twice"):
        off.offload()

    back = off.reload()
    assert back.tensors == report.tensors and back.bytes == report.bytes
    assert [id(v) for _, v in _state_tensors(opt)] == ids, "the optimizer keeps its tensor objects"
    for (k, v), (k2, v2) in zip(saved, _state_tensors(opt)):
        assert k == k2 and torch.equal(v, v2), k
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)
    with pytest.raises(RuntimeError, match="without a preceding offload"):
        off.reload()

    for step in range(2, 4):  # offload/reload every step; the twin never offloads
        off.offload()
        off.reload()
        for m, o in ((model, opt), (twin, twin_opt)):
            _set_grads(m, step)
            o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_host_offloader_can_release_grads_instead(device):
    model, opt = _model_and_optimizer(device)
    _set_grads(model, 0)
    opt.step()
    off = HostOffloader(opt, grads="release", device=device)
    report = off.offload()
    assert all(p.grad is None for p in model.parameters())
    assert report.released_bytes > report.bytes  # grads released on top of the state copied out
    off.reload()
    with pytest.raises(ValueError, match="grads must be"):
        HostOffloader(opt, grads="drop")


def test_manager_owns_the_order_and_records_every_phase(device):
    model, opt = _model_and_optimizer(device)
    _set_grads(model, 0)
    opt.step()
    engine = ScriptedEngine()
    mm = DeviceMemoryManager(engine=engine, offloader=HostOffloader(opt, device=device), sleep_level=2, device=device)
    mm.to_train()  # from the start state: the engine gives its memory back, nothing to reload yet
    assert engine.calls == [("sleep", 2)]
    with pytest.raises(PhaseOrderError, match="already in train"):
        mm.to_train()
    timer = PhaseTimer(device)
    records = mm.to_rollout(lambda: model.named_parameters(), timer=timer)
    assert engine.calls[1:] == [("wake", ("weights",)), ("sync", 4), ("wake", ("kv_cache",))]
    assert [r["phase"] for r in records] == ["offload-trainer", "wake-weights", "sync", "wake-kv_cache"]
    assert records[0]["move"].bytes > 0 and records[2]["sync"].complete
    timed = timer.collect()
    assert set(timed.phases) == {"update_weights"}, "the sync is the update_weights phase on the step's clock"
    assert set(timed.spans) == {"offload-trainer", "wake-weights", "wake-kv_cache"}
    for r in records:
        assert set(r["memory"]) >= SNAPSHOT_KEYS
        assert r["memory"]["engine_held_bytes"] == engine.held
    with pytest.raises(PhaseOrderError, match="already in rollout"):
        mm.to_rollout()
    records = mm.to_train()
    assert [r["phase"] for r in records] == ["sleep-rollout", "reload-trainer"]
    assert records[0]["sleep"].freed_bytes == engine.held
    assert all(v.numel() > 0 for _, v in _state_tensors(opt))
    with pytest.raises(ValueError, match="sleep_level"):
        DeviceMemoryManager(sleep_level=3)


@pytest.mark.parametrize(
    ("phase", "knob"),
    [("rollout", "KV-cache size"), ("train", "token budget"), ("wake-weights", "offload its optimizer state")],
)
def test_out_of_memory_in_a_phase_names_phase_bytes_and_knob(phase, knob):
    mm = DeviceMemoryManager(engine=ScriptedEngine(held=3 << 30), device="cpu")
    with pytest.raises(PhaseOutOfMemoryError) as info, mm.phase(phase):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    err = info.value
    text = str(err)
    assert err.phase == phase and f"phase {phase!r}" in text
    assert "rollout engine held 3.00 GiB" in text and knob in text
    assert "Tried to allocate 2.00 GiB" in text
    assert isinstance(err.__cause__, torch.OutOfMemoryError)


def test_other_errors_pass_through_phases_unchanged():
    mm = DeviceMemoryManager(device="cpu")
    with pytest.raises(KeyError), mm.phase("rollout"):
        raise KeyError("not memory")
    with pytest.raises(PhaseOutOfMemoryError, match="DefaultCPUAllocator"), mm.phase("train"):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: out of memory")
    assert fmt_bytes(None) == "unknown" and fmt_bytes(3 << 20) == "3.0 MiB"


def test_manager_drives_the_real_vllm_engine(tiny_model_dir):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM

    from engine.rollout.vllm_engine import VLLMEngine

    kw = {"kv_cache_bytes": 16 << 20} if not torch.cuda.is_available() else {"gpu_memory_utilization": 0.2}
    engine = VLLMEngine.from_pretrained(tiny_model_dir, dtype="float32", max_model_len=256, **kw)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).to(engine.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _set_grads(model, 0)
    opt.step()
    mm = DeviceMemoryManager(engine=engine, offloader=HostOffloader(opt, device=engine.device), device=engine.device)
    records = mm.to_rollout(lambda: model.named_parameters())
    sync = records[2]["sync"]
    assert sync.complete and sync.bytes_moved > 0
    assert records[-1]["memory"]["engine_held_bytes"] == engine.stats()["held_bytes"]
    prompt = engine.tokenizer.encode("hello")
    from engine.rollout.protocol import SamplingConfig

    assert engine.generate([prompt], SamplingConfig(max_new_tokens=3, seed=0))[0].token_ids
    records = mm.to_train()
    sleep = records[0]["sleep"]
    if engine.device.type == "cpu":
        assert sleep.supported is False and sleep.freed_bytes == 0
    else:
        assert sleep.supported and sleep.freed_bytes > 0
    engine.shutdown()


@pytest.mark.gpu
def test_host_offloader_frees_device_memory_and_uses_pinned_buffers():
    torch.manual_seed(0)
    model = torch.nn.Linear(2048, 2048, device="cuda")
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(8, 2048, device="cuda")).sum().backward()
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for _, v in _state_tensors(opt) if v.is_cuda)
    saved = [v.clone() for _, v in _state_tensors(opt)]
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    off = HostOffloader(opt, grads="release")
    off.offload()
    assert before - torch.cuda.memory_allocated() >= state_bytes
    assert all(s.host.is_pinned() for s in off._slots.values())
    off.reload()
    for a, (_, b) in zip(saved, _state_tensors(opt)):
        assert torch.equal(a, b)
