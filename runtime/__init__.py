"""The run's machinery: processes and model placement (parallel.py), checkpoints (checkpoints.py), logs and curves
(logs.py), crash-safe files (files.py), and the memory planner (memory_plan.py)."""
