"""The four-agent system (Planner, Executor, Verifier, Generator) over an evolving memory.

Talks to generation only through `engine.rollout.protocol.RolloutEngine`. Entry point:
`rollout(engines, queries, group_size, AgentConfig(...)) -> RolloutResult` (see `agentflow.loop`).
"""

from agentflow.loop import AgentConfig, Engines, RolloutResult, rollout
from agentflow.memory import Memory, Step
from agentflow.tasks import Query, load_jsonl, load_task
from agentflow.trajectory import STOP_REASONS, Trajectory, Turn

__all__ = [
    "STOP_REASONS",
    "AgentConfig",
    "Engines",
    "Memory",
    "Query",
    "RolloutResult",
    "Step",
    "Trajectory",
    "Turn",
    "load_jsonl",
    "load_task",
    "rollout",
]
