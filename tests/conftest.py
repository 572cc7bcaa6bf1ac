"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on shared cores: one intra-op thread avoids oversubscribed (spinning) OpenMP threads.
    Use with `pytestmark = pytest.mark.usefixtures('one_thread')`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
