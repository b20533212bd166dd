import pytest

import sparsenet


# Two threads where the process may use two CPUs (set_num_threads refuses more than it has).
@pytest.fixture(params=[n for n in (1, 2) if n <= sparsenet.ops.runtime.usable_threads()],
                ids=lambda n: f"{n}thread{'s' if n > 1 else ''}")
def threads(request):
    before = sparsenet.get_num_threads()
    sparsenet.set_num_threads(request.param)
    yield request.param
    sparsenet.set_num_threads(before)
