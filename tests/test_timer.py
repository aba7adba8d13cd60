"""The step clock: nested phases with disjoint self-times, spans, hooks, one list of phase names."""

from __future__ import annotations

import time

import pytest
import torch

from agentflow.timing import NO_TIMER, Timer
from engine.metrics import peak_flops
from engine.timer import PHASES, PhaseTimer, timing_key


def test_nested_phases_report_disjoint_self_times():
    timer = PhaseTimer("cpu")
    with timer.phase("step"):
        with timer.phase("gen"):
            time.sleep(0.02)
            with timer.phase("reward"):
                time.sleep(0.03)
        with timer.phase("wake"), timer.phase("update_weights"):
            time.sleep(0.02)
        with timer.phase("gap_probe"):
            pass
        with timer.phase("gap_probe"):  # entered twice in a step: accumulates
            time.sleep(0.01)
    t = timer.collect()
    p = t.phases
    assert p["reward"] >= 0.03 and 0.02 <= p["gen"] < 0.03, "gen's self-time excludes the nested reward"
    assert p["update_weights"] >= 0.02 and p["wake"] < 0.01, "wake's self-time excludes the sync"
    assert p["gap_probe"] >= 0.01
    parts = sum(v for k, v in p.items() if k != "step")
    assert p["step"] == pytest.approx(parts, abs=5e-3), "the self-times add up to the inclusive step"
    m = t.metrics()
    assert set(m) == {timing_key(n) for n in PHASES} and m["timing_s/ref"] is None


def test_spans_are_inclusive_and_take_nothing_from_their_phase():
    timer = PhaseTimer(None)
    with timer.phase("gen"):
        with timer.span("planner"):
            time.sleep(0.02)
        with timer.span("planner"):
            time.sleep(0.01)
    t = timer.collect()
    assert t.spans["planner"] >= 0.03
    assert t.phases["gen"] >= t.spans["planner"], "a span does not carve time out of its phase"


def test_open_brackets_are_left_out_and_unknown_phases_refused():
    timer = PhaseTimer("cpu")
    with timer.phase("step"):
        with timer.phase("adv"):
            pass
        partial = timer.collect()
        assert "step" not in partial.phases and "adv" in partial.phases
    assert "step" in timer.collect().phases
    with pytest.raises(ValueError, match="unknown phase 'planner'"), timer.phase("planner"):
        pass


def test_hooks_see_enter_and_exit_even_on_error():
    calls = []
    timer = PhaseTimer(None, hooks=[lambda name, what: calls.append((name, what))])
    with pytest.raises(RuntimeError), timer.phase("gen"):
        raise RuntimeError("boom")
    with timer.span("tools"):
        pass
    assert calls == [("gen", "enter"), ("gen", "exit"), ("tools", "enter"), ("tools", "exit")]
    assert "gen" in timer.collect().phases


def test_the_engine_timer_implements_agentflows_protocol():
    assert isinstance(PhaseTimer("cpu"), Timer) and isinstance(NO_TIMER, Timer)


@pytest.mark.gpu
def test_cuda_events_and_peak():
    timer = PhaseTimer("cuda")
    a = torch.randn(2048, 2048, device="cuda")
    with timer.phase("update_actor"):
        for _ in range(10):
            a = a @ a
            a = a / a.norm()
    assert timer.collect().phases["update_actor"] > 0
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        assert peak_flops("cuda") is not None
