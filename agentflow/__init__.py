"""The four-agent system (Planner, Executor, Verifier, Generator) over an evolving memory.

Talks to generation only through its own protocol, `agentflow.lm.LanguageModel` (the engines in
`engine.rollout` implement it). Entry point: `run_trajectories(models, queries, group_size,
AgentConfig(...)) -> RolloutResult` (see `agentflow.runner`); models that also implement the
request-level `StreamingLanguageModel` are scheduled continuously (`agentflow.scheduler`).
"""

from agentflow.lm import Generation, LanguageModel, SamplingConfig, StreamingLanguageModel
from agentflow.memory import Memory, Step
from agentflow.runner import AgentConfig, RoleModels, RolloutResult, run_trajectories
from agentflow.tasks import Query, load_jsonl, load_task
from agentflow.trajectory import STOP_REASONS, Trajectory, Turn

__all__ = [
    "STOP_REASONS",
    "AgentConfig",
    "Generation",
    "LanguageModel",
    "Memory",
    "Query",
    "RoleModels",
    "RolloutResult",
    "SamplingConfig",
    "Step",
    "StreamingLanguageModel",
    "Trajectory",
    "Turn",
    "load_jsonl",
    "load_task",
    "run_trajectories",
]
