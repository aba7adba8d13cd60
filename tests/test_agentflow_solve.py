"""End to end with the real tiny model through the embedded engine: `flowgrpo solve` and `rollout`.

The tiny model has random weights, so its planner output is (almost always) malformed: these tests
check mechanics — turns with consistent ids and log-probs, invalid actions recorded, rewards and
stop reasons valid, one batched planner call per loop step — not success.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from agentflow import STOP_REASONS, AgentConfig, Trajectory, load_task, run_trajectories
from agentflow.trajectory import Turn
from engine.rollout.embedded import EmbeddedEngine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> EmbeddedEngine:
    return EmbeddedEngine.from_pretrained(tiny_model_dir, dtype="float32", device="cpu")


def _check_turn(turn: Turn, budget: int, max_new: int) -> None:
    assert turn.prompt_ids and 1 <= len(turn.response_ids) <= max_new
    assert len(turn.response_logprobs) == len(turn.response_ids)
    assert all(lp <= 0.0 for lp in turn.response_logprobs)
    assert len(turn.prompt_ids) + max_new <= budget
    if not turn.valid:
        assert turn.tool_result.startswith("invalid planner output: ")


def test_solve_cli_writes_trajectories(tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "traj.json"
    cmd = [
        sys.executable, "-m", "engine.cli", "solve", "--model", tiny_model_dir, "--task", "arithmetic",
        "--num-queries", "2", "--group-size", "3", "--max-turns", "2", "--planner-max-new-tokens", "16",
        "--seed", "1", "--json", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "success rate" in r.stdout and "turns/trajectory" in r.stdout and "planner tokens" in r.stdout
    assert "time: total" in r.stdout and f"wrote 6 trajectories to {out}" in r.stdout
    assert not list(out.parent.glob("*.tmp")), "the temporary file is renamed, not left behind"
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == 6
    for d in data:
        assert {"query", "answer", "reward", "stop_reason", "turns"} <= set(d)
        tr = Trajectory.from_dict(d)
        assert tr.reward in (0.0, 1.0) and tr.stop_reason in STOP_REASONS
        assert 1 <= len(tr.turns) <= 2
        for t in d["turns"]:
            assert {"prompt_ids", "response_ids", "response_logprobs", "tool", "sub_goal", "tool_result"} <= set(t)
        for turn in tr.turns:
            _check_turn(turn, AgentConfig().context_budget, 16)
    assert sorted({(d["query_id"], d["group_index"]) for d in data}) == [
        (q.id, g) for q in load_task("arithmetic", 2, seed=1) for g in range(3)
    ]


def test_solve_cli_reports_a_missing_model_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "solve", "--model", str(tmp_path / "nope"), "--num-queries", "1"],
        capture_output=True, text=True, cwd=REPO, check=False, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and "does not exist" in r.stderr and "make-tiny" in r.stderr


def test_rollout_on_the_real_model_batches_planner_calls_and_logs_exact_logprobs(engine):
    queries = load_task("multihop", 3, seed=0)
    cfg = AgentConfig(max_turns=3, planner_max_new_tokens=12, temperature=0.9, generator_max_new_tokens=8)
    before = engine.stats()
    res = run_trajectories(engine, queries, group_size=4, config=cfg, seed=0)
    after = engine.stats()
    assert len(res.trajectories) == 12
    # one batched planner call per loop step, never one per trajectory
    assert res.counters["planner_calls"] == res.loop_steps <= cfg.max_turns
    calls = sum(res.counters.get(f"{p}_calls", 0) for p in ("planner", "executor", "verifier", "generator"))
    assert after["generate_calls"] - before["generate_calls"] == calls
    assert calls <= 3 * res.loop_steps + 1
    turns = [t for tr in res.trajectories for t in tr.turns]
    assert after["prompts"] - before["prompts"] >= len(turns)
    assert res.counters["planner_prompts"] == len(turns)
    for tr in res.trajectories:
        assert tr.stop_reason in STOP_REASONS and tr.reward in (0.0, 1.0) and tr.memory is not None
        assert len(tr.turns) == len(tr.memory.steps)
        for turn in tr.turns:
            _check_turn(turn, cfg.context_budget, cfg.planner_max_new_tokens)
    # the recorded log-probs are what the trainer recomputes: log_softmax(logits / T) of prompt + response
    for turn in turns[:4]:
        with torch.no_grad():
            logits = engine.model(torch.tensor([turn.prompt_ids + turn.response_ids])).logits[0].float()
        lp = torch.log_softmax(logits / cfg.temperature, dim=-1)
        p = len(turn.prompt_ids)
        ref = lp[torch.arange(p - 1, p - 1 + len(turn.response_ids)), torch.tensor(turn.response_ids)]
        torch.testing.assert_close(torch.tensor(turn.response_logprobs), ref, atol=1e-5, rtol=0)  # seen: ~1e-6
    json.dumps([tr.to_dict() for tr in res.trajectories])


class _FixedPlanner:
    """The real engine behind a planner that always answers one valid action (the random model never does)."""

    def __init__(self, real: EmbeddedEngine, reply: str) -> None:
        self.real, self.reply = real, reply
        self.calls = 0

    @property
    def tokenizer(self):
        return self.real.tokenizer

    def generate(self, prompts, sampling):
        from engine.rollout.protocol import Generation

        self.calls += 1
        ids = [*self.tokenizer.encode(self.reply, add_special_tokens=False), self.tokenizer.eos_token_id]
        return [Generation(list(p), ids, [-1.0] * len(ids), self.reply, "stop") for p in prompts]

    def sleep(self, level=1):
        return self.real.sleep(level)

    def wake(self, tags=None):
        return self.real.wake(tags)

    def sync_weights(self, named_tensors):
        return self.real.sync_weights(named_tensors)

    def stats(self):
        return {"generate_calls": self.calls}


@pytest.mark.parametrize(
    ("reply", "executor"),
    [("Tool: base_generator\nSub-goal: Name a river.", "rule"), ("Tool: calculator\nSub-goal: add 2 and 3", "llm")],
)
def test_valid_actions_run_tools_and_agents_on_the_real_model(engine, reply, executor):
    from agentflow import RoleModels

    planner = _FixedPlanner(engine, reply)
    engines = RoleModels(planner=planner, executor=engine, verifier=engine, generator=engine)
    cfg = AgentConfig(max_turns=2, executor=executor, executor_max_new_tokens=12, base_generator_max_new_tokens=8,
                      generator_max_new_tokens=8)  # fmt: skip
    before = engine.stats()["generate_calls"]
    res = run_trajectories(engines, load_task("arithmetic", 2, seed=0), 2, cfg, seed=0)
    # per step one batched base_generator (or executor) call and one verifier call (none after the last
    # turn), then one generator call: 4 trajectories, a handful of calls
    steps = res.loop_steps
    assert engine.stats()["generate_calls"] - before == steps + min(steps, cfg.max_turns - 1) + 1
    for tr in res.trajectories:
        assert tr.turns and all(t.valid for t in tr.turns)
        for t in tr.turns:
            assert t.tool_result, "a tool result or a tool error is recorded"
            if executor == "rule":
                assert t.command == "Name a river." and not t.tool_result.startswith("error:")
        assert tr.stop_reason in ("verifier", "max_turns")
