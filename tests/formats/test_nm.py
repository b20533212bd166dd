"""PackedNM: round trips, pattern detection, sizes, and a clear error for every malformed buffer."""
import pytest
import torch

from sparsenet.formats import PackedNM, registry
from sparsenet.formats.nm import detect_pattern


def nm_weight(rows, cols, n, m, seed=0, fill=1.0):
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(rows, -(-cols // m), m, generator=g).argsort(dim=-1)
    keep = (order < n).reshape(rows, -(-cols // m) * m)[:, :cols] & (torch.rand(rows, cols, generator=g) < fill)
    return torch.randn(rows, cols, generator=g) * keep


@pytest.mark.parametrize("pattern", [(1, 2), (2, 4), (4, 8), (8, 16), (1, 4), (3, 8)])
@pytest.mark.parametrize("shape", [(0, 0), (1, 16), (7, 48), (5, 100), (3, 130)])
def test_round_trip(pattern, shape):
    n, m = pattern
    if 0 < shape[1] % m < n:
        pytest.skip("a last group too short for N")
    w = nm_weight(*shape, n, m, fill=0.8)
    p = PackedNM.from_dense(w, pattern=pattern)
    assert p.nm == pattern and torch.equal(p.to_dense(), w)
    groups = -(-shape[1] // m)
    assert p.nnz == shape[0] * groups * n  # every slot, padding included
    assert torch.equal(PackedNM.from_tensors(p.tensors(), p.shape).to_dense(), w)
    assert p.metadata() == {"format": "nm", "version": 1, "shape": list(shape), "nnz": p.nnz, "pattern": f"{n}:{m}"}


def test_bytes_per_position_of_2_4():
    p = PackedNM.from_dense(nm_weight(64, 256, 2, 4))
    assert p.nm == (2, 4) and p.nbytes == 64 * 256 // 2 * 4 + 64 * 256 // 2 // 4 + 16  # values, 2-bit indices, pattern


def test_detection():
    assert detect_pattern(nm_weight(16, 64, 2, 4) != 0) == (2, 4)
    assert detect_pattern(nm_weight(16, 64, 1, 4) != 0) == (1, 4)
    assert detect_pattern(nm_weight(16, 64, 4, 8, fill=0.9) != 0) == (4, 8)
    assert detect_pattern(torch.rand(64, 64) < 0.3) is None  # unstructured: mostly padding as 8:16
    assert detect_pattern(torch.rand(64, 64) < 0.9) is None
    keep = nm_weight(16, 64, 2, 4) != 0
    assert registry.get("nm").fits(keep) and registry.fitting(keep) == ["bitmap", "csr", "nm"]


def test_bad_weights_and_patterns():
    with pytest.raises(ValueError, match="keep 3 weights: more than 2 of 4"):
        PackedNM.from_dense(torch.tensor([[1.0, 1, 1, 0]]), pattern=(2, 4))
    with pytest.raises(ValueError, match="follow no N:M pattern"):
        PackedNM.from_dense(torch.ones(4, 8))
    with pytest.raises(ValueError, match="pattern must be"):
        PackedNM.from_dense(torch.zeros(4, 8), pattern=(4, 4))
    with pytest.raises(ValueError, match="pattern must be"):
        PackedNM.from_dense(torch.zeros(4, 32), pattern=(2, 32))
    with pytest.raises(ValueError, match="pattern must be two ints"):
        PackedNM.from_dense(torch.zeros(4, 8), pattern=(2.5, 4))  # not silently 2:4
    with pytest.raises(ValueError, match="at least 2 columns"):
        PackedNM.from_dense(torch.zeros(4, 9), pattern=(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        PackedNM.from_dense(torch.tensor([[float("inf"), 0.0, 0, 0]]), pattern=(2, 4))
    assert PackedNM.empty(3, 9).nm == (1, 2) and PackedNM.empty(3, 8).nm == (2, 4)


def test_malformed_buffers_get_clear_errors():
    p = PackedNM.from_dense(nm_weight(5, 32, 2, 4, seed=2))
    t = {k: v.clone() for k, v in p.tensors().items()}

    def build(**changes):
        return PackedNM.from_tensors({**t, **changes}, (5, 32))

    assert torch.equal(build().to_dense(), p.to_dense())
    with pytest.raises(ValueError, match="pattern must hold 2"):
        build(pattern=torch.tensor([2], dtype=torch.int64))
    with pytest.raises(TypeError, match="indices must be uint8"):
        build(indices=t["indices"].to(torch.int16))
    with pytest.raises(ValueError, match="indices has"):
        build(indices=t["indices"][:-1])
    with pytest.raises(ValueError, match="values has"):
        build(values=t["values"][:-1])
    same = t["indices"].clone()
    same[0] = 0
    with pytest.raises(ValueError, match="strictly increasing"):
        build(indices=same)
    values = t["values"].clone()
    values[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        build(values=values)
    # 4:8 on 12 columns: the last group has 4 columns, so index 5 there is outside it
    q = PackedNM.from_dense(nm_weight(1, 12, 4, 8), pattern=(4, 8))
    bad = q.indices.clone()
    bad[-1] = 0x75  # slots 6, 7 of the last group: columns 5 and 7
    with pytest.raises(ValueError, match="outside the group's columns"):
        PackedNM.from_tensors({**q.tensors(), "indices": bad}, (1, 12))
