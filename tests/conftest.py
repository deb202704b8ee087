"""Shared test setup: one torch thread for the whole suite.

Every test runs tiny models, which are faster and steadier on one thread; on a busy 2-core
machine torch's two-thread pool made them up to 40x slower. torchrun workers in
test_distributed.py run with OMP_NUM_THREADS=1 too, so in-process references compute alike.
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
