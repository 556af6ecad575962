"""The rollout engine: G samples per prompt for GRPO (engine.py the host's loop, scheduler.py its block and slot
bookkeeping, step.py the device's decode step, kv_pages.py the paged and reserved key/value stores, weights.py what the
step reads, sampling.py and randomness.py the sampling and its random numbers)."""
