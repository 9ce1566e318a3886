"""The encode job: planning, the Ray task graph, per-shard tasks and the summary."""
