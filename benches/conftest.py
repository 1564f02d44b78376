"""pytest configuration for ``benches/`` (pytest-benchmark).

The helpers live in ``benches/benchlib.py`` (bench files do ``from benchlib import providers,
record``); this file puts ``benches/`` on ``sys.path`` so that import works in every pytest import
mode, registers the hooks that turn the recorded results into ``ratio_to_best_peer`` in the JSON
output and a summary table at the end of the run, and resets the CUDA peak-memory counter before
each bench so ``record`` reports the bench's own peak.
"""

from __future__ import annotations

import os
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import torch  # noqa: E402
from benchlib import (  # noqa: E402,F401  (pytest hooks, found by name in this module)
    pytest_benchmark_update_json,
    pytest_benchmark_update_machine_info,
    pytest_sessionstart,
    pytest_terminal_summary,
)


@pytest.fixture(autouse=True)
def _reset_cuda_peak_memory():
    """Start each bench with empty caches and a fresh ``max_memory_allocated`` counter."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield
