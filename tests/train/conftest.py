"""The training tests run tiny models whose matrix products gain nothing from threads, while on a
shared 2-core machine a second OpenMP thread competing with other processes slows them down a
hundredfold: run them single-threaded."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
