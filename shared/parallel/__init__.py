"""Tensor parallelism inside one worker: the process group (state.py), the sharding of a model's
heads and matrices (sharding.py), rank 0's view of its followers (driver.py) and the follower
processes (follower.py). See docs/architecture.md, "Tensor parallelism"."""
