"""What a handle derives and keeps between calls (CSR's column-tiled copy of the values, BSR's
block-transposed one, a convolution's plan for one input size) under calls from two threads at once:
a call with other values or another input size replaces it while the other call's kernel may still
be reading the old one, which must stay alive and unchanged for it (each call holds what it started
with). Before that, these calls crashed the process."""
import threading

import torch
import torch.nn.functional as F

from sparsenet import _C
from sparsenet.formats.bsr import PackedBSR

from csr_testing import pack, random_sparse, reference


def in_two_threads(work, rounds=150):
    """work(k, i) in thread k = 0, 1 for rounds i; asserts that it returned True every time."""
    wrong = []

    def loop(k):
        wrong.extend((k, i) for i in range(rounds) if not work(k, i))

    threads = [threading.Thread(target=loop, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} calls gave another call's answer: {wrong[:5]}"


def assert_each_call_gets_its_own_values(matmul, weight, values, x):
    """Two threads call matmul(values, x, out) on one handle, one with `values` (weight's), the
    other with -2 x them, so that each call finds the copy built for the other's values."""
    scales = (1.0, -2.0)
    mine = [(values * s).numpy() for s in scales]
    want = [reference(weight * s, x).float() for s in scales]

    def work(k, _):
        out = torch.empty(x.shape[0], weight.shape[0])
        matmul(mine[k], x.numpy(), out.numpy())
        return torch.allclose(out, want[k], rtol=1e-4, atol=1e-4)

    in_two_threads(work)


def test_csr_tiled_copy(isa, two_threads):
    w = random_sparse(96, 512, 0.5, torch.Generator().manual_seed(0))
    crow, col, values = pack(w)
    h = _C.CsrHandle(96, 512, crow.numpy(), col.numpy(), values.numpy())
    assert_each_call_gets_its_own_values(h.matmul, w, values, torch.randn(64, 512))


def test_bsr_transposed_copy(isa, two_threads):
    g = torch.Generator().manual_seed(1)
    keep = (torch.rand(6, 32, generator=g) < 0.5).repeat_interleave(16, 0).repeat_interleave(16, 1)
    w = torch.randn(96, 512, generator=g) * keep
    p = PackedBSR.from_dense(w, block=(16, 16))
    h = _C.BsrHandle(96, 512, *(t.numpy() for t in (p.block_shape, p.block_ptr, p.block_cols, p.values)))
    assert_each_call_gets_its_own_values(h.matmul, w, p.values, torch.randn(64, 512))


def test_conv_plan_per_input_size(isa, two_threads):
    w = random_sparse(16, 8 * 9, 0.3, torch.Generator().manual_seed(2))
    crow, col, values = pack(w)
    h = _C.CsrHandle(16, 8 * 9, crow.numpy(), col.numpy(), values.numpy())
    inputs = [torch.randn(2, 8, 24, 24), torch.randn(2, 8, 17, 31)]  # a plan each
    want = [F.conv2d(x.double(), w.double().reshape(16, 8, 3, 3), padding=1).float() for x in inputs]

    def work(k, _):
        out = torch.empty(want[k].shape)
        h.conv2d(values.numpy(), inputs[k].numpy(), out.numpy(), None, [3, 3, 1, 1, 1, 1, 1, 1, 1])
        return torch.allclose(out, want[k], rtol=1e-4, atol=1e-4)

    in_two_threads(work)
