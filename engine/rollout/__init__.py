"""Rollout engines behind one protocol (`engine.rollout.protocol.RolloutEngine`)."""

from engine.rollout.protocol import Generation, RolloutEngine, SamplingConfig, SleepReport, SyncReport

__all__ = ["Generation", "RolloutEngine", "SamplingConfig", "SleepReport", "SyncReport"]
