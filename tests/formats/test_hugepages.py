"""Huge-page placement of packed weights: same values and dtypes whatever the system grants."""
import os

import pytest
import torch

from sparsenet.formats import hugepages
from sparsenet.nn import SparseLinear


def _smaps_entry(addr: int) -> dict:
    """The /proc/self/smaps fields of the mapping holding `addr` (Linux only)."""
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                if inside:
                    break
                inside = lo <= addr < hi
            elif inside:
                fields[head.rstrip(":")] = line.split(None, 1)[1].strip()
    return fields


def _no_region(nbytes):
    pytest.fail(f"a huge-page region of {nbytes} bytes was asked for")


def test_small_requests_are_plain_tensors(monkeypatch):
    monkeypatch.setattr(hugepages, "_huge_region", _no_region)
    (t,) = hugepages.empty_group([(1000, torch.float32)])
    assert t.shape == (1000,) and t.dtype == torch.float32


@pytest.mark.parametrize("numel", [0, 1, hugepages.HUGE_PAGE // 4 + 3, 3 * hugepages.HUGE_PAGE // 4 + 17])
def test_group_layout(numel):
    col, values = hugepages.empty_group([(numel, torch.uint16), (numel, torch.float32)])
    assert (col.shape, col.dtype, values.shape, values.dtype) == ((numel,), torch.uint16, (numel,), torch.float32)
    if numel:
        col.fill_(7)
        values.copy_(torch.arange(numel, dtype=torch.float32))
        # Neither array overlaps the other: writing one left the other intact.
        assert torch.equal(col.to(torch.int32), torch.full((numel,), 7, dtype=torch.int32))
        assert values[-1].item() == numel - 1
        assert values.data_ptr() % 64 == 0
        big = 6 * numel >= hugepages.MIN_BYTES
        if big and hugepages.supported():
            assert col.data_ptr() % hugepages.HUGE_PAGE == 0  # the region starts on a 2 MiB boundary
            assert values.data_ptr() >= col.data_ptr() + 2 * numel


@pytest.mark.skipif(not hugepages.supported() or not os.path.exists("/proc/self/smaps"),
                    reason="no MADV_HUGEPAGE or /proc on this system")
def test_large_region_is_marked_for_huge_pages():
    (t,) = hugepages.empty_group([(3 * hugepages.HUGE_PAGE // 4, torch.float32)])  # 3 whole 2 MiB blocks
    t.fill_(1.0)
    fields = _smaps_entry(t.data_ptr())
    # The advice is recorded on the mapping ("hg"); whether the kernel grants huge pages depends on
    # the system's THP setting, so that is not asserted.
    assert "hg" in fields["VmFlags"].split()


def test_copy_group_copies_values_and_detaches():
    src = torch.randn(hugepages.HUGE_PAGE // 2, requires_grad=True)
    idx = torch.arange(src.numel(), dtype=torch.int32)
    out_idx, out_src = hugepages.copy_group([idx, src])
    assert torch.equal(out_idx, idx) and torch.equal(out_src, src.detach())
    assert not out_src.requires_grad
    out_src.zero_()
    assert src.abs().sum() > 0  # a copy, not a view


@pytest.mark.parametrize("refusal", ["no madvise", "mapping refused"])
def test_fallback_gives_plain_working_tensors(monkeypatch, refusal):
    if refusal == "no madvise":
        monkeypatch.setattr(hugepages, "_MADV_HUGEPAGE", None)
        monkeypatch.setattr(hugepages, "_huge_region", _no_region)
    else:
        monkeypatch.setattr(hugepages, "_huge_region", lambda nbytes: None)
    n = hugepages.HUGE_PAGE
    col, values = hugepages.empty_group([(n, torch.uint16), (n, torch.float32)])
    assert col.numel() == values.numel() == n
    col.fill_(3)
    values.copy_(torch.arange(n, dtype=torch.float32))
    assert int(col.to(torch.int32).sum()) == 3 * n and values[-1].item() == n - 1


def test_sparse_linear_values_live_in_huge_pages_and_survive_their_module():
    torch.manual_seed(0)
    dense = torch.nn.Linear(1024, 2048)
    with torch.no_grad():
        dense.weight.mul_(torch.rand_like(dense.weight) < 0.5)
    layer = SparseLinear.from_dense(dense)
    if hugepages.supported():
        assert layer.values.data_ptr() % hugepages.HUGE_PAGE == 0
    x = torch.randn(3, 1024)
    expected = dense(x)
    values = layer.values
    del layer  # the region stays alive as long as any tensor in it does
    assert values.abs().sum() > 0
    clone = SparseLinear.from_dense(dense)
    torch.testing.assert_close(clone(x), expected, rtol=1e-5, atol=1e-5)
