"""CSR / PackedCSR: round trips, validation errors, and the packed layout contract with sparsenet._C."""
import numpy as np
import pytest
import torch

from sparsenet import _C
from sparsenet.formats import CSR, PackedCSR

# torch warns that sparse CSR support is in beta; that is torch's business, not these tests'.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def sparse_dense(rows, cols, density, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=dtype)
    keep = torch.rand(rows, cols, generator=g) < density
    return w * keep


SHAPES = [
    (7, 11, 0.0), (7, 11, 0.01), (7, 11, 0.5), (7, 11, 1.0),
    (200, 150, 0.01), (1, 33, 0.5), (33, 1, 0.5), (0, 5, 0.5), (5, 0, 0.5),
]


def small_csr():
    # [[0, 1.5, 0, 2], [0, 0, 0, 0], [3, 0, 0, 4]]
    crow = torch.tensor([0, 2, 2, 4])
    col = torch.tensor([1, 3, 0, 3])
    values = torch.tensor([1.5, 2.0, 3.0, 4.0])
    return crow, col, values, (3, 4)


# ---- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,density", SHAPES)
def test_dense_csr_dense(rows, cols, density):
    d = sparse_dense(rows, cols, density)
    c = CSR.from_dense(d)
    assert c.shape == (rows, cols)
    assert c.nnz == int((d != 0).sum())
    assert c.crow_indices.dtype == c.col_indices.dtype == torch.int64
    assert torch.equal(c.to_dense(), d)


@pytest.mark.parametrize("rows,cols,density", SHAPES)
def test_csr_torch_round_trip(rows, cols, density):
    d = sparse_dense(rows, cols, density)
    c = CSR.from_torch(d.to_sparse_csr())
    assert torch.equal(c.to_dense(), d)
    t = c.to_torch()
    assert t.layout == torch.sparse_csr and torch.equal(t.to_dense(), d)


@pytest.mark.parametrize("rows,cols,density", SHAPES)
def test_csr_packed_round_trip(rows, cols, density):
    d = sparse_dense(rows, cols, density)
    p = CSR.from_dense(d).pack()
    assert p.crow_indices.dtype == torch.int64
    assert p.col_indices.dtype == torch.uint16
    assert p.values.dtype == torch.float32
    back = p.to_csr()
    assert back.col_indices.dtype == torch.int64
    assert torch.equal(back.to_dense(), d)
    assert torch.equal(p.to_dense(), d)


def test_int32_indices_and_float64_values():
    d = sparse_dense(6, 9, 0.4, dtype=torch.float64)
    t = d.to_sparse_csr()
    c = CSR(t.crow_indices().int(), t.col_indices().int(), t.values(), d.shape)
    assert c.index_dtype == torch.int32 and c.dtype == torch.float64
    assert torch.equal(c.to_dense(), d)
    assert torch.equal(c.to_torch().to_dense(), d)
    p = c.pack()
    assert p.values.dtype == torch.float32
    torch.testing.assert_close(p.to_dense(), d.float())


def test_from_dense_keeps_float64_and_converts_half():
    d = sparse_dense(4, 5, 0.5, dtype=torch.float64)
    assert CSR.from_dense(d).dtype == torch.float64
    h = CSR.from_dense(d.half())
    assert h.dtype == torch.float32
    assert torch.equal(h.to_dense(), d.half().float())


@pytest.mark.parametrize("cols,index_dtype", [(65536, torch.uint16), (65537, torch.int32)])
def test_index_dtype_boundary(cols, index_dtype):
    d = torch.zeros(2, cols)
    d[0, 0] = 1.0
    d[0, cols - 1] = 2.0  # the last column must be addressable
    d[1, cols // 2] = 3.0
    p = CSR.from_dense(d).pack()
    assert p.index_dtype == index_dtype
    assert p.metadata()["index_dtype"] == str(index_dtype).removeprefix("torch.")
    assert int(p.col_indices.to(torch.int32)[1]) == cols - 1
    assert torch.equal(p.to_dense(), d)


def test_empty_rows_and_single_row():
    d = torch.zeros(5, 4)
    d[1, 2] = 1.0
    d[4, 0] = -2.0
    c = CSR.from_dense(d)
    assert c.crow_indices.tolist() == [0, 0, 1, 1, 1, 2]
    assert torch.equal(c.pack().to_dense(), d)
    row = torch.tensor([[0.0, 3.0, 0.0, 5.0]])
    assert CSR.from_dense(row).col_indices.tolist() == [1, 3]


def test_non_contiguous_input():
    base = sparse_dense(8, 12, 0.3)
    for d in (base.t(), base[::2, ::3]):
        assert not d.is_contiguous()
        assert torch.equal(CSR.from_dense(d).to_dense(), d)
        mask = d != 0
        assert torch.equal(CSR.from_dense(d, mask.t().contiguous().t()).to_dense(), d)


def test_requires_grad_input_is_detached():
    w = torch.nn.Parameter(sparse_dense(4, 4, 0.5))
    c = CSR.from_dense(w)
    assert not c.values.requires_grad


# ---- mask semantics ------------------------------------------------------------------------------

def test_mask_selects_entries_and_keeps_explicit_zeros():
    d = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, True, False]])
    c = CSR.from_dense(d, mask)
    assert c.nnz == 3  # (0,0)=1, explicit zero at (0,1), (1,1)=3; (0,2)=2 dropped
    assert c.col_indices.tolist() == [0, 1, 1]
    assert c.values.tolist() == [1.0, 0.0, 3.0]
    assert torch.equal(c.to_dense(), d * mask)


def test_mask_drops_nan_outside_kept_entries():
    d = torch.tensor([[float("nan"), 1.0]])
    c = CSR.from_dense(d, torch.tensor([[False, True]]))
    assert c.values.tolist() == [1.0]


# ---- properties ----------------------------------------------------------------------------------

def test_properties_and_nbytes():
    c = CSR(*small_csr())
    assert (c.nnz, c.shape, c.dtype) == (4, (3, 4), torch.float32)
    assert c.density == pytest.approx(4 / 12)
    assert c.nbytes == 4 * 8 + 4 * 8 + 4 * 4
    p = c.pack()
    assert p.nbytes == 4 * 8 + 4 * 2 + 4 * 4
    assert p.density == pytest.approx(4 / 12)
    assert p.metadata() == {"format": "csr", "version": 1, "shape": [3, 4], "nnz": 4, "index_dtype": "uint16"}
    wide = CSR.from_dense(torch.ones(1, 70000)).pack()
    assert wide.nbytes == 2 * 8 + 70000 * 4 + 70000 * 4


def test_density_of_empty_shape_is_zero():
    assert CSR.from_dense(torch.zeros(0, 0)).density == 0.0
    assert CSR.from_dense(torch.zeros(0, 3)).pack().density == 0.0


def test_metadata_is_json():
    import json

    json.dumps(CSR(*small_csr()).pack().metadata())


# ---- the contract with the native kernels --------------------------------------------------------

@pytest.mark.parametrize("rows,cols,density", [(7, 11, 0.5), (64, 300, 0.1), (5, 65537, 0.0005), (3, 4, 0.0)])
def test_packed_layout_accepted_by_native_handle(rows, cols, density):
    d = sparse_dense(rows, cols, density, seed=3)
    p = PackedCSR.from_dense(d)
    buffers = (p.crow_indices.numpy(), p.col_indices.numpy(), p.values.numpy())
    h = _C.CsrHandle(rows, cols, *buffers)
    assert (h.rows, h.cols, h.nnz) == (rows, cols, p.nnz)
    assert h.index_bytes == p.col_indices.element_size()
    x = torch.randn(5, cols)
    out = torch.empty(5, rows)
    h.matmul(buffers[2], x.numpy(), out.numpy(), None)
    torch.testing.assert_close(out, (x.double() @ d.double().T).float(), rtol=1e-4, atol=1e-4)


def test_native_handle_rejects_what_packed_csr_rejects():
    crow, col, values, shape = small_csr()
    bad_col = torch.tensor([1, 9, 0, 3], dtype=torch.uint16)
    with pytest.raises(ValueError, match="out of range"):
        PackedCSR(crow, bad_col, values, shape)
    with pytest.raises(ValueError, match="out of range"):
        _C.CsrHandle(3, 4, crow.numpy(), bad_col.numpy(), values.numpy())


# ---- validation errors (one per invariant) -------------------------------------------------------

def test_error_shape_not_2d():
    crow, col, values, _ = small_csr()
    with pytest.raises(ValueError, match="2 dimensions"):
        CSR(crow, col, values, (3, 4, 1))


def test_error_shape_negative():
    with pytest.raises(ValueError, match="non-negative"):
        CSR(torch.zeros(1, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), (-1, 4))


def test_error_shape_not_ints():
    crow, col, values, _ = small_csr()
    with pytest.raises(TypeError, match="shape must hold ints"):
        CSR(crow, col, values, (3.0, 4))
    with pytest.raises(TypeError, match="shape must hold ints"):
        CSR(crow, col, values, (True, 4))
    with pytest.raises(TypeError, match="shape must be"):
        CSR(crow, col, values, 12)


def test_error_not_a_tensor():
    crow, col, values, shape = small_csr()
    with pytest.raises(TypeError, match="col_indices must be a torch.Tensor"):
        CSR(crow, col.tolist(), values, shape)


def test_error_not_1d():
    crow, col, values, shape = small_csr()
    with pytest.raises(ValueError, match="values must be 1-D"):
        CSR(crow, col, values.reshape(2, 2), shape)


def test_error_index_dtype():
    crow, col, values, shape = small_csr()
    with pytest.raises(TypeError, match="crow_indices must be int32 or int64"):
        CSR(crow.short(), col.short(), values, shape)


def test_error_index_dtypes_differ():
    crow, col, values, shape = small_csr()
    with pytest.raises(TypeError, match="must share a dtype"):
        CSR(crow, col.int(), values, shape)


def test_error_values_dtype():
    crow, col, values, shape = small_csr()
    with pytest.raises(TypeError, match="values must be float32 or float64"):
        CSR(crow, col, values.half(), shape)


def test_error_crow_length():
    crow, col, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"crow_indices has 4 entries, expected rows \+ 1 = 5"):
        CSR(crow, col, values, (4, 4))


def test_error_crow_first():
    _, col, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"crow_indices\[0\] = 1, expected 0"):
        CSR(torch.tensor([1, 2, 2, 4]), col, values, shape)


def test_error_crow_decreasing():
    _, col, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"non-decreasing: crow_indices\[2\] = 1 < crow_indices\[1\] = 3"):
        CSR(torch.tensor([0, 3, 1, 4]), col, values, shape)


def test_error_crow_last_vs_nnz():
    _, col, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"crow_indices\[-1\] = 3 does not match nnz = 4"):
        CSR(torch.tensor([0, 2, 2, 3]), col, values, shape)


def test_error_col_values_length():
    crow, col, values, shape = small_csr()
    with pytest.raises(ValueError, match="col_indices has 3 entries but values has 4"):
        CSR(crow, col[:3], values, shape)


def test_error_col_out_of_range():
    crow, _, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"col_indices\[3\] = 12 is out of range for 4 columns"):
        CSR(crow, torch.tensor([1, 3, 0, 12]), values, shape)
    with pytest.raises(ValueError, match=r"col_indices\[0\] = -1 is out of range"):
        CSR(crow, torch.tensor([-1, 3, 0, 1]), values, shape)


def test_error_col_unsorted():
    crow, _, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"row 2 are not strictly increasing: col_indices\[3\] = 0 follows"):
        CSR(crow, torch.tensor([1, 3, 2, 0]), values, shape)


def test_error_col_duplicate():
    crow, _, values, shape = small_csr()
    with pytest.raises(ValueError, match=r"row 0 are not strictly increasing: col_indices\[1\] = 1 follows"):
        CSR(crow, torch.tensor([1, 1, 0, 3]), values, shape)


def test_decrease_across_rows_is_fine():
    crow, _, values, shape = small_csr()
    CSR(crow, torch.tensor([2, 3, 0, 1]), values, shape)  # row 0 ends at 3, row 2 restarts at 0


def test_error_non_finite_values():
    crow, col, _, shape = small_csr()
    with pytest.raises(ValueError, match="non-finite.*refuses to store NaN/Inf"):
        CSR(crow, col, torch.tensor([1.0, float("inf"), 2.0, 3.0]), shape)


def test_error_devices_differ():
    crow, col, values, shape = small_csr()
    with pytest.raises(ValueError, match="one device"):
        CSR(crow, col, values.to("meta"), shape)


def test_error_sparse_layout_passed_as_indices():
    crow, col, values, shape = small_csr()
    with pytest.raises(TypeError, match="dense \\(strided\\)"):
        CSR(crow.to_sparse(), col, values, shape)


# ---- from_dense / from_torch errors --------------------------------------------------------------

def test_from_dense_errors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        CSR.from_dense([[1.0]])
    with pytest.raises(ValueError, match="2-D"):
        CSR.from_dense(torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        CSR.from_dense(torch.ones(2, 2, dtype=torch.int64))


def test_from_dense_mask_errors():
    d = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"mask has shape \(3, 2\)"):
        CSR.from_dense(d, torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        CSR.from_dense(d, torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        CSR.from_dense(d, [[True] * 3] * 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_from_dense_refuses_non_finite(bad):
    d = torch.ones(3, 3)
    d[1, 2] = bad
    with pytest.raises(ValueError, match="refuses to store NaN/Inf"):
        CSR.from_dense(d)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    mask[1, 2] = True
    with pytest.raises(ValueError, match="refuses to store NaN/Inf"):
        CSR.from_dense(d, mask)


def test_pack_refuses_float64_overflow():
    c = CSR(torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1e300], dtype=torch.float64), (1, 1))
    with pytest.raises(ValueError, match="non-finite"):
        c.pack()


def test_from_torch_errors():
    with pytest.raises(TypeError, match="layout torch.sparse_csr"):
        CSR.from_torch(torch.ones(2, 2))
    batched = torch.ones(2, 2, 2).to_sparse_csr()
    with pytest.raises(ValueError, match="2-D"):
        CSR.from_torch(batched)


def test_from_torch_unsorted_columns_rejected():
    t = torch.sparse_csr_tensor(torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([1.0, 2.0]), (1, 2),
                                check_invariants=False)
    with pytest.raises(ValueError, match="not strictly increasing"):
        CSR.from_torch(t)


# ---- PackedCSR-specific errors -------------------------------------------------------------------

def packed_parts():
    crow, col, values, shape = small_csr()
    return crow, col.to(torch.uint16), values, shape


def test_packed_accepts_valid():
    p = PackedCSR(*packed_parts())
    assert p.index_dtype == torch.uint16 and p.nnz == 4


def test_packed_error_crow_dtype():
    crow, col, values, shape = packed_parts()
    with pytest.raises(TypeError, match="packed crow_indices must be int64"):
        PackedCSR(crow.int(), col, values, shape)


def test_packed_error_col_dtype():
    crow, col, values, shape = packed_parts()
    with pytest.raises(TypeError, match="col_indices for 4 columns must be torch.uint16, got torch.int32"):
        PackedCSR(crow, col.to(torch.int32), values, shape)
    wide = CSR.from_dense(torch.ones(1, 65537)).pack()
    with pytest.raises(TypeError, match="must be torch.int32"):
        PackedCSR(wide.crow_indices, wide.col_indices.to(torch.int64), wide.values, wide.shape)


def test_packed_error_values_dtype():
    crow, col, values, shape = packed_parts()
    with pytest.raises(TypeError, match="packed values must be float32"):
        PackedCSR(crow, col, values.double(), shape)


def test_packed_error_non_contiguous():
    crow, col, values, shape = packed_parts()
    strided = torch.stack([values, values], 1)[:, 0]
    with pytest.raises(ValueError, match="packed values must be contiguous"):
        PackedCSR(crow, col, strided, shape)


def test_packed_error_structure_uses_shared_checks():
    crow, _, values, shape = packed_parts()
    with pytest.raises(ValueError, match=r"col_indices\[3\] = 7 is out of range for 4 columns"):
        PackedCSR(crow, torch.tensor([1, 3, 0, 7], dtype=torch.uint16), values, shape)
    with pytest.raises(ValueError, match="not strictly increasing"):
        PackedCSR(crow, torch.tensor([3, 1, 0, 3], dtype=torch.uint16), values, shape)


def test_packed_from_csr_type_error():
    with pytest.raises(TypeError, match="sparsenet.formats.CSR"):
        PackedCSR.from_csr(torch.ones(2, 2))


def test_random_fuzz_matches_torch():
    # Many small random matrices through every path, compared with torch's own conversion.
    rng = np.random.default_rng(0)
    for i in range(30):
        rows, cols = int(rng.integers(0, 20)), int(rng.integers(0, 20))
        d = sparse_dense(rows, cols, float(rng.random()), seed=i)
        c = CSR.from_dense(d)
        ref = d.to_sparse_csr()
        assert torch.equal(c.crow_indices, ref.crow_indices())
        assert torch.equal(c.col_indices, ref.col_indices())
        assert torch.equal(c.pack().to_csr().to_dense(), d)
