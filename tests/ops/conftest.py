import pytest
import torch

import sparsenet


@pytest.fixture(params=sparsenet.available_isas())
def isa(request):
    """Run the test once per kernel family this CPU can execute, then restore the default."""
    before = sparsenet.get_isa()
    sparsenet.set_isa(request.param)
    yield request.param
    sparsenet.set_isa(before)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    before = sparsenet.get_num_threads()
    sparsenet.set_num_threads(request.param)
    yield request.param
    sparsenet.set_num_threads(before)
