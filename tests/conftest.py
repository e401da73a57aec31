import pytest
import torch


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # results must not depend on the thread count; tests are small, so one thread is fastest
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
