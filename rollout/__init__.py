"""The rollout engine: G samples per prompt for GRPO (engine.py the host's scheduler, step.py the device's decode
step, kv_slots.py the static key/value store, sampling.py and randomness.py the sampling and its random numbers)."""
