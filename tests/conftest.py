import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models run fastest so, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
