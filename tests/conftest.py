"""Test-suite setup shared by every test directory.

The Triton interpreter must be switched on before triton is first imported (triton fixes
interpreter-vs-compiled when `@triton.jit` decorates a kernel), so this runs at the top of the
first conftest pytest loads, ahead of every test module.
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def seed(request: pytest.FixtureRequest) -> int:
    """Seed python, numpy and torch from the test's id: every test gets its own stream, and a
    failing test sees the same numbers when rerun alone."""
    value = zlib.crc32(request.node.nodeid.encode())
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value
