import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The optimizer tests use small matrices: one thread is as fast, and it keeps them from
    # thrashing when the CI box runs other jobs beside them.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
