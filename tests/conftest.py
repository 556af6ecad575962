"""Shared pytest setup: make the repository root importable and keep CPU threads small."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared")

torch.set_num_threads(min(2, os.cpu_count() or 1))
