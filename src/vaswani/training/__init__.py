"""Training: data, batching, the paper's schedule, Trainer wiring and checkpoint averaging (§5)."""
