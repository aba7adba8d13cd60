"""flowgrpo engine: model loading, packing, rollout engines, memory time-sharing, trainer, profiler, CLI."""
