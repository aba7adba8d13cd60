"""The four-agent system (Planner, Executor, Verifier, Generator) over an evolving memory."""
