"""Fixtures shared across test folders."""

import pytest
import torch

import sparsenet
from sparsenet.nn import autoformat


def _csr_first(calls):
    return {name: (0.5 if name == "csr" else 1.0) for name in calls}


@pytest.fixture(autouse=True, scope="session")
def format_timings(tmp_path_factory):
    """sparsify's default, format="auto", times layers on the machine. Tests get a private timing
    cache (never the user's) and a timer that ranks CSR first, so that conversions are the same on
    every machine; tests of the choice itself (tests/nn/test_autoformat.py) put in their own timer,
    or the real one."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SPARSENET_CACHE_DIR", str(tmp_path_factory.mktemp("format_timings")))
        patch.setattr(autoformat, "time_calls", _csr_first)
        yield


@pytest.fixture(params=sparsenet.available_isas())
def isa(request):
    """Run the test once per kernel family this CPU can execute, then restore the default."""
    before = sparsenet.get_isa()
    sparsenet.set_isa(request.param)
    yield request.param
    sparsenet.set_isa(before)


@pytest.fixture
def two_threads():
    """sparsenet's kernels on two threads (or what this machine allows) for one test, so that their
    threaded paths run; the setting before is restored."""
    threads = sparsenet.get_num_threads()
    sparsenet.set_num_threads(min(2, sparsenet._C.usable_threads()))
    yield
    sparsenet.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: their matrices are tiny, and a second thread
    only adds synchronisation, which is many times slower on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def standardized_digits():
    """scikit-learn's digits as flat 64-pixel rows, standardised with the training split's
    statistics (constant pixels get std 1): (x_train, y_train, x_test, y_test), 1347 / 450."""
    # Imported here, not at collection: scikit-learn loads its own libgomp, which would fail
    # tests/ops/test_runtime.py's one-OpenMP-runtime check if it ran later in the process.
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1347], perm[1347:]
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    return x[train], y[train], x[test], y[test]


@pytest.fixture
def untouched():
    """``check = untouched(model)`` snapshots; ``check()`` asserts the model is as it was then:
    same state, no parametrizations, no hooks, no ``.grad``, same training/requires_grad flags."""
    from torch.nn.utils import parametrize

    def module_flags(model):
        return [
            (m.training, len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()
        ]

    def snapshot(model):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        flags = module_flags(model)
        grads = [p.requires_grad for p in model.parameters()]

        def check():
            after = model.state_dict()
            assert after.keys() == state.keys()
            assert all(torch.equal(after[k], v) for k, v in state.items())
            assert not any(parametrize.is_parametrized(m) for m in model.modules())
            assert module_flags(model) == flags
            assert [p.requires_grad for p in model.parameters()] == grads
            assert all(p.grad is None for p in model.parameters())

        return check

    return snapshot
