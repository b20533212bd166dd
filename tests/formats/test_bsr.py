"""PackedBSR: round trips, block detection, sizes, and a clear error for every malformed buffer."""
import pytest
import torch

from sparsenet.formats import PackedBSR, registry
from sparsenet.formats.bsr import detect_block, is_made_of_blocks


def in_blocks(rows, cols, block, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, c = block
    keep = torch.rand(-(-rows // r), -(-cols // c), generator=g) < density
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)[:rows, :cols]
    return torch.randn(rows, cols, generator=g) * keep


@pytest.mark.parametrize("block", [(1, 1), (1, 16), (16, 1), (4, 4), (8, 8), (16, 16), (3, 5), (64, 64)])
@pytest.mark.parametrize("shape", [(0, 0), (1, 1), (37, 45), (64, 128), (5, 100)])
def test_round_trip_with_partial_edge_blocks(block, shape):
    w = in_blocks(*shape, block, 0.4)
    p = PackedBSR.from_dense(w, block=block)
    assert p.block == block and p.values.numel() == p.nnzb * block[0] * block[1]
    assert torch.equal(p.to_dense(), w)
    assert p.nnz <= shape[0] * shape[1] and p.density <= 1.0  # padding past the edges is not counted
    again = PackedBSR.from_tensors(p.tensors(), p.shape)
    assert torch.equal(again.to_dense(), w)
    assert p.metadata() == {"format": "bsr", "version": 1, "shape": list(shape), "nnz": p.nnz, "block": list(block)}


def test_detection_finds_the_largest_block_the_mask_is_made_of():
    assert detect_block(in_blocks(64, 128, (16, 16), 0.5) != 0) == (16, 16)
    assert detect_block(in_blocks(64, 128, (8, 4), 0.5, seed=1) != 0) == (8, 4)
    assert detect_block(in_blocks(37, 45, (8, 8), 0.5) != 0) == (8, 8)  # partial blocks at the edges
    assert detect_block(torch.rand(64, 64) < 0.5) is None  # unstructured
    assert detect_block(in_blocks(64, 64, (32, 1), 0.5, seed=2) != 0) == (32, 1)  # past the 4x1 pre-check
    assert detect_block(torch.ones(4, 4, dtype=torch.bool)) == (4, 4)  # never larger than the matrix
    keep = in_blocks(32, 32, (4, 4), 0.5) != 0
    assert is_made_of_blocks(keep, (4, 4)) and not is_made_of_blocks(keep, (4, 8))
    assert registry.get("bsr").fits(keep) and not registry.get("bsr").fits(torch.rand(32, 32) < 0.5)
    assert registry.fitting(keep) == ["bitmap", "bsr", "csr"]


def test_mask_keeps_zeros_and_stores_whole_blocks():
    w = torch.randn(8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[0, 0] = True  # one kept entry: its whole 4x4 block is stored, the rest of it as zeros
    p = PackedBSR.from_dense(w, mask, block=(4, 4))
    assert p.nnzb == 1 and p.nnz == 16
    want = torch.zeros(8, 8)
    want[0, 0] = w[0, 0]
    assert torch.equal(p.to_dense(), want)
    with pytest.raises(ValueError, match="not made of blocks"):
        PackedBSR.from_dense(torch.randn(16, 16) * (torch.rand(16, 16) < 0.5))
    with pytest.raises(ValueError, match="non-finite"):
        PackedBSR.from_dense(torch.tensor([[float("nan"), 1.0], [1.0, 1.0]]), block=(2, 2))
    with pytest.raises(ValueError, match="block must be"):
        PackedBSR.from_dense(w, block=(0, 4))
    with pytest.raises(ValueError, match="block must be"):
        PackedBSR.from_dense(w, block=(65, 1))
    with pytest.raises(ValueError, match="block must be two ints"):
        PackedBSR.from_dense(w, block=(2.5, 4))


def test_malformed_buffers_get_clear_errors():
    p = PackedBSR.from_dense(in_blocks(20, 30, (4, 4), 0.6, seed=2), block=(4, 4))
    t = {k: v.clone() for k, v in p.tensors().items()}

    def build(**changes):
        return PackedBSR.from_tensors({**t, **changes}, (20, 30))

    assert build().nnzb == p.nnzb
    with pytest.raises(ValueError, match="block_shape must hold 2"):
        build(block_shape=torch.tensor([4], dtype=torch.int64))
    with pytest.raises(TypeError, match="block_cols must be int32"):
        build(block_cols=t["block_cols"].long())
    with pytest.raises(ValueError, match="block_ptr has"):
        build(block_ptr=t["block_ptr"][:-1])
    with pytest.raises(ValueError, match="values has"):
        build(values=t["values"][:-1])
    bad = t["block_cols"].clone()
    bad[0] = 8
    with pytest.raises(ValueError, match="outside"):
        build(block_cols=bad)
    ptr = t["block_ptr"].clone()
    ptr[1] = ptr[2] + 1  # block row 1 would end before it starts
    with pytest.raises(ValueError, match="non-decreasing"):
        build(block_ptr=ptr)
    rows_with_two = int((t["block_ptr"].diff() >= 2).nonzero()[0, 0])
    cols = t["block_cols"].clone()
    start = int(t["block_ptr"][rows_with_two])
    cols[start], cols[start + 1] = cols[start + 1].clone(), cols[start].clone()
    with pytest.raises(ValueError, match="strictly increasing"):
        build(block_cols=cols)
    values = t["values"].clone()
    values[3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        build(values=values)
    with pytest.raises(ValueError, match="on the CPU|contiguous"):
        build(values=torch.randn(2 * t["values"].numel())[::2])
    assert PackedBSR.empty(20, 30, (4, 4)).nnzb == 0
