"""Model tests run single-threaded: on a shared 2-core machine, torch's intra-op threads spin-wait against other
processes and the forward/backward grid takes minutes instead of seconds."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
