"""The bitmap format: the packed layout (the contract with csrc/cpu/bitmap_view.h), round trips and
its validation of malformed buffers."""
import pytest
import torch

from sparsenet.formats.bitmap import CHUNK, PackedBitmap, chunks_for


def sparse(rows, cols, density, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * (torch.rand(rows, cols, generator=g) < density)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (3, 0), (1, 1), (4, 15), (4, 16), (4, 17), (7, 33), (5, 100)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_round_trip_and_layout(shape, density):
    w = sparse(*shape, density)
    b = PackedBitmap.from_dense(w)
    assert torch.equal(b.to_dense(), w)
    rows, cols = shape
    assert b.masks.dtype == torch.uint16 and b.masks.numel() == rows * chunks_for(cols)
    assert b.row_ptr.tolist()[0] == 0 and b.nnz == int((w != 0).sum())
    assert b.nbytes == 2 * rows * chunks_for(cols) + 8 * (rows + 1) + 4 * b.nnz
    # the contract, bit by bit: bit j of word (r, k) <=> W[r, 16 k + j] stored
    words = b.masks.to(torch.int32).reshape(rows, chunks_for(cols))
    for r in range(rows):
        for c in range(cols):
            assert bool((words[r, c // CHUNK] >> (c % CHUNK)) & 1) == bool(w[r, c] != 0)


def test_mask_keeps_zeros_and_bytes_beat_csr_at_half_density():
    w = sparse(64, 4096, 0.5)
    keep = w != 0
    keep[0, 0] = True
    w[0, 0] = 0.0
    b = PackedBitmap.from_dense(w, keep)
    assert b.nnz == int(keep.sum()) and torch.equal(b.to_dense(), w)
    csr_bytes = b.nnz * (4 + 2) + 8 * 65  # 16-bit column indices
    assert b.nbytes < 0.75 * csr_bytes  # 2.13 bytes per position against 3
    assert b.metadata() == {"format": "bitmap", "version": 1, "shape": [64, 4096], "nnz": b.nnz}


def fields(w):
    b = PackedBitmap.from_dense(w)
    return b.masks.clone(), b.row_ptr.clone(), b.values.clone(), b.shape


def test_malformed_buffers_are_clear_errors():
    w = sparse(4, 20, 0.5)
    masks, row_ptr, values, shape = fields(w)
    bad = masks.to(torch.int32)
    bad[0] ^= 1  # one bit more or less than row_ptr says
    with pytest.raises(ValueError, match="row 0 stores"):
        PackedBitmap(bad.to(torch.uint16), row_ptr, values, shape)
    past = masks.to(torch.int32)
    past[1] |= 1 << 5  # column 21 of 20 (second word of row 0)
    with pytest.raises(ValueError, match="past the last column"):
        PackedBitmap(past.to(torch.uint16), row_ptr, values, shape)
    with pytest.raises(ValueError, match="does not match"):
        PackedBitmap(masks, row_ptr, values[:-1], shape)  # truncated values
    with pytest.raises(ValueError, match="expected rows \\* ceil"):
        PackedBitmap(masks[:-1], row_ptr, values, shape)
    with pytest.raises(ValueError, match="row_ptr\\[0\\]"):
        PackedBitmap(masks, row_ptr + 1, values, shape)
    with pytest.raises(TypeError, match="uint16"):
        PackedBitmap(masks.to(torch.int32), row_ptr, values, shape)
    with pytest.raises(ValueError, match="contiguous"):
        PackedBitmap(masks, row_ptr, torch.stack([values, values], 1)[:, 0], shape)
    nan = values.clone()
    nan[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        PackedBitmap(masks, row_ptr, nan, shape)
    with pytest.raises(ValueError, match="non-finite"):
        PackedBitmap.from_dense(torch.tensor([[float("inf"), 0.0]]))
