"""The CUDA backend (sparsenet/ops/cuda.py, csrc/cuda): what the build carries, the errors without it,
and, on a GPU (marked ``gpu``, skipped elsewhere), the kernels against a float64 reference."""
import shutil
import subprocess

import pytest
import torch

import sparsenet
from sparsenet.nn import SparseConv2d, SparseLinear
from sparsenet.ops import cuda
from sparsenet.ops.fatbin import architectures

NVCC = shutil.which("nvcc")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(NVCC is None, reason="no nvcc: the build has no CUDA kernels to inspect")
def test_the_build_carries_sm80_and_sm90a_code():
    # Where nvcc is on PATH the package must have built _C_cuda (SPARSENET_CUDA=AUTO), with real
    # code for Ampere and for Hopper's architecture-specific features.
    assert cuda.available(), "nvcc is on PATH but sparsenet._C_cuda was not built"
    from sparsenet import _C_cuda

    assert {"sm_80", "sm_90a"} <= architectures(_C_cuda.__file__)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_the_fatbin_reader_names_what_nvcc_compiled(tmp_path):
    # A plain sm_90 cubin (no "a") beside sm_80 and PTX: the reader must tell the variants apart.
    source = tmp_path / "k.cu"
    source.write_text("__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n")
    obj = tmp_path / "k.o"
    subprocess.run([NVCC, "-c", str(source), "-o", str(obj), "-gencode", "arch=compute_80,code=sm_80",
                    "-gencode", "arch=compute_90,code=[sm_90,compute_90]"], check=True, cwd=tmp_path)
    assert architectures(str(obj)) == {"sm_80", "sm_90", "compute_90"}


def test_the_fatbin_reader_refuses_what_is_not_elf(tmp_path):
    path = tmp_path / "x.so"
    path.write_bytes(b"not an ELF file at all")
    with pytest.raises(ValueError, match="ELF64"):
        architectures(str(path))
    path.write_bytes(b"\x7fELF\x02\x01" + b"\0" * 20)  # an ELF64 header cut short
    with pytest.raises(ValueError, match="not a readable"):
        architectures(str(path))


def test_the_fatbin_reader_survives_a_corrupt_section(tmp_path):
    # A fat binary header whose entry claims a zero-byte header: no endless loop, nothing found.
    import struct

    from sparsenet.ops import fatbin

    blob = struct.pack("<IHHQ", fatbin._MAGIC, 1, 16, 64) + b"\0" * 64
    assert fatbin._architectures(blob) == set()


def test_without_the_cuda_module_a_cuda_call_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(cuda, "_C_cuda", None)
    monkeypatch.setattr(cuda, "_MISSING", "No module named 'sparsenet._C_cuda'")
    assert not cuda.available()
    with pytest.raises(RuntimeError, match=r"no CUDA kernels .*SPARSENET_CUDA=ON"):
        cuda.require()


@pytest.mark.parametrize("op", cuda.OPS)
def test_cuda_ops_are_registered_for_the_cuda_key(op):
    # The dispatcher, not the module, picks the backend (no device branch in SparseLinear).
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsenet::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsenet::{op}_grad_input", "CUDA")


def test_bitmap_layers_carry_half_values_for_cuda():
    sp = SparseLinear.from_dense(_pruned(8, 20, 0.5, seed=5), format="bitmap").half()
    assert sp.values.dtype == torch.float16


# ---- on a GPU ---------------------------------------------------------------------------------------

def _pruned(out_f, in_f, density, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g))
        lin.weight.mul_(torch.rand(out_f, in_f, generator=g) < density)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
    return lin


def _two_of_four(out_f, in_f, seed):
    lin = _pruned(out_f, in_f, 1.0, seed)
    with torch.no_grad():
        lin.weight.view(out_f, in_f // 4, 4)[..., 2:] = 0
    return lin


def test_the_nm_helpers_make_nm_layers():
    assert SparseLinear.from_dense(_two_of_four(16, 32, seed=3), format="nm").format == "nm"
    for shape, pattern in [((32, 64), (2, 4)), ((45, 70), (2, 4)), ((64, 100), (4, 8)), ((17, 30), (1, 4)),
                           ((20, 48), (3, 16))]:
        lin = _nm_pruned(*shape, *pattern, seed=1)
        sp = SparseLinear.from_dense(lin, format="nm", pattern=pattern)
        x = torch.randn(3, shape[1])
        torch.testing.assert_close(sp(x).double(), _reference(lin.double(), x.double()), rtol=1e-4, atol=1e-4)


_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _reference(lin, x):
    y = x.double() @ lin.weight.double().T
    return y + lin.bias.double() if lin.bias is not None else y


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("format", ["csr", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,density,batch", [((37, 53), 0.3, 1), ((256, 300), 0.1, 7), ((64, 70000), 0.02, 3),
                                                 ((128, 512), 0.5, 64), ((9, 16), 1.0, 9), ((5, 8), 0.0, 2),
                                                 ((33, 41), 0.4, 0)])
def test_linear_on_cuda_matches_float64(format, dtype, shape, density, batch):
    lin = _pruned(*shape, density, seed=batch + shape[0])
    sp = SparseLinear.from_dense(lin, format=format).to("cuda", dtype)
    x = torch.randn(batch, shape[1], device="cuda").to(dtype)
    y = sp(x)
    assert y.dtype == dtype and y.device.type == "cuda" and y.shape == (batch, shape[0])
    ref = _reference(lin.double().cuda(), x.double())
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=_TOLERANCE[dtype], atol=_TOLERANCE[dtype] * max(scale, 1.0))


def _block_pruned(out_f, in_f, block, density, seed):
    lin = _pruned(out_f, in_f, 1.0, seed)
    g = torch.Generator().manual_seed(seed)
    r, c = block
    keep = torch.rand(-(-out_f // r), -(-in_f // c), generator=g) < density
    with torch.no_grad():
        lin.weight.mul_(keep.repeat_interleave(r, 0)[:out_f].repeat_interleave(c, 1)[:, :in_f])
    return lin


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,block,density,batch", [((64, 96), (16, 16), 0.3, 1), ((100, 70), (16, 16), 0.5, 130),
                                                       ((96, 128), (32, 32), 0.1, 64), ((50, 45), (4, 8), 0.4, 17),
                                                       ((130, 200), (64, 64), 0.5, 5), ((33, 17), (1, 4), 0.6, 70),
                                                       ((24, 40), (8, 8), 0.0, 3), ((40, 24), (8, 8), 1.0, 0)])
def test_bsr_linear_on_cuda_matches_float64(dtype, shape, block, density, batch):
    lin = _block_pruned(*shape, block, density, seed=batch + shape[0])
    sp = SparseLinear.from_dense(lin, format="bsr", block=block).to("cuda", dtype)
    x = torch.randn(batch, shape[1], device="cuda").to(dtype)
    y = sp(x)
    assert y.dtype == dtype and y.shape == (batch, shape[0])
    ref = _reference(lin.double().cuda(), x.double())
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=_TOLERANCE[dtype], atol=_TOLERANCE[dtype] * max(scale, 1.0))


def _nm_pruned(out_f, in_f, n, m, seed):
    lin = _pruned(out_f, in_f, 1.0, seed)
    with torch.no_grad():
        w = lin.weight
        groups = -(-in_f // m)
        padded = torch.nn.functional.pad(w.abs(), (0, groups * m - in_f), value=-1.0).view(out_f, groups, m)
        drop = padded.argsort(dim=-1)[..., : m - n]  # the m - n smallest of each group
        keep = torch.ones_like(padded, dtype=torch.bool).scatter_(-1, drop, False).view(out_f, -1)[:, :in_f]
        w.mul_(keep)
    return lin


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("shape,pattern,batch", [((32, 64), (2, 4), 1), ((45, 70), (2, 4), 9), ((64, 100), (4, 8), 33),
                                                 ((17, 30), (1, 4), 3), ((20, 48), (3, 16), 0)])
def test_nm_linear_on_cuda_matches_float64(dtype, shape, pattern, batch):
    lin = _nm_pruned(*shape, *pattern, seed=batch + shape[0])
    sp = SparseLinear.from_dense(lin, format="nm", pattern=pattern).to("cuda", dtype)
    x = torch.randn(batch, shape[1], device="cuda").to(dtype)
    y = sp(x)
    ref = _reference(lin.double().cuda(), x.double())
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=_TOLERANCE[dtype], atol=_TOLERANCE[dtype] * max(scale, 1.0))


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("format", ["csr", "bitmap"])
def test_cuda_input_shapes_strides_and_streams(format):
    lin = _pruned(40, 24, 0.3, seed=1)
    sp = SparseLinear.from_dense(lin, format=format).cuda()
    x = torch.randn(3, 5, 48, device="cuda")[..., ::2]  # 3-D and strided
    torch.testing.assert_close(sp(x).double(), _reference(lin.double().cuda(), x.double()), rtol=1e-4, atol=1e-4)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        y = sp(x)
    stream.synchronize()
    torch.testing.assert_close(y.double(), _reference(lin.double().cuda(), x.double()), rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("format,kernel", [("csr", "csr_rows_kernel"), ("bitmap", "bitmap_rows_kernel"),
                                           ("bsr", "bsr_tile_kernel"), ("nm", "nm_rows_kernel")])  # conv: below
def test_cuda_path_runs_the_sparsenet_kernel_not_a_fallback(format, kernel):
    lin = {"bsr": lambda: _block_pruned(512, 512, (16, 16), 0.1, seed=2),
           "nm": lambda: _two_of_four(512, 512, seed=2)}.get(format, lambda: _pruned(512, 512, 0.1, seed=2))()
    sp = SparseLinear.from_dense(lin, format=format).cuda().half()
    x = torch.randn(4, 512, device="cuda", dtype=torch.float16)
    sp(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sp(x)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any(kernel in n for n in names), names
    assert not any("cusparse" in n.lower() or "gemm" in n.lower() for n in names), names


@needs_gpu
@pytest.mark.gpu
def test_cuda_backward_compile_and_errors():
    lin = _pruned(16, 32, 0.3, seed=3)
    sp = SparseLinear.from_dense(lin).cuda()
    x = torch.randn(5, 32, device="cuda", requires_grad=True)
    sp(x).sum().backward()
    torch.testing.assert_close(x.grad, lin.weight.detach().cuda().sum(0).expand(5, 32), rtol=1e-4, atol=1e-4)
    compiled = torch.compile(sp, fullgraph=True)
    torch.testing.assert_close(compiled(x.detach()), sp(x.detach()))
    with pytest.raises(TypeError, match="weight's values are torch.float32"):
        sp(x.detach().half())
    conv = SparseConv2d.from_dense(torch.nn.Conv2d(4, 8, 3)).cuda()
    xi = torch.randn(1, 4, 8, 8, device="cuda", requires_grad=True)
    with pytest.raises(NotImplementedError, match="convolution layer has no CUDA kernel yet"):
        conv(xi).sum().backward()


@needs_gpu
@pytest.mark.gpu
def test_cuda_handle_validates_the_structure():
    from sparsenet import _C_cuda
    from torch.utils.dlpack import to_dlpack

    crow = torch.tensor([0, 2, 1], dtype=torch.int64, device="cuda")  # decreasing
    col = torch.tensor([0, 1], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError):
        _C_cuda.CsrHandle(2, 4, to_dlpack(crow), to_dlpack(col))
    shape = torch.tensor([2, 2], dtype=torch.int64, device="cuda")
    block_ptr = torch.tensor([0, 2], dtype=torch.int64, device="cuda")
    block_cols = torch.tensor([1, 0], dtype=torch.int32, device="cuda")  # not increasing
    with pytest.raises(ValueError):
        _C_cuda.BsrHandle(2, 4, to_dlpack(shape), to_dlpack(block_ptr), to_dlpack(block_cols))
    masks = torch.tensor([0b101, 0b1], dtype=torch.int16, device="cuda")  # 3 bits set, row_ptr says 2
    row_ptr = torch.tensor([0, 1, 2], dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError):
        _C_cuda.BitmapHandle(2, 4, to_dlpack(masks), to_dlpack(row_ptr))


@needs_gpu
@pytest.mark.gpu
def test_cuda_bitmap_backward_is_a_clear_error():
    sp = SparseLinear.from_dense(_pruned(16, 32, 0.3, seed=4), format="bitmap").cuda()
    x = torch.randn(5, 32, device="cuda", requires_grad=True)
    with pytest.raises(NotImplementedError, match="format='csr'"):
        sp(x).sum().backward()
    crow = torch.tensor([0, 1, 2], dtype=torch.int64, device="cuda")
    col = torch.tensor([0, 9], dtype=torch.int32, device="cuda")  # out of range
    with pytest.raises(ValueError):
        _C_cuda.CsrHandle(2, 4, to_dlpack(crow), to_dlpack(col))

def _pruned_conv(cin, cout, k, density, seed, **options):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, **options)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=g) < density)
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(cout, generator=g))
    return conv


_CONVS = [  # (in, out, kernel, options, input size, batch)
    (8, 16, 3, {"padding": 1}, 9, 2), (6, 10, 3, {"stride": 2, "padding": 1}, 11, 3),
    (4, 6, 1, {}, 7, 1), (8, 8, 3, {"groups": 2, "dilation": 2, "padding": 2}, 10, 2),
    (5, 7, (3, 5), {"stride": (2, 1), "padding": (1, 2), "bias": False}, 8, 4), (3, 4, 3, {}, 5, 0),
]


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("cin,cout,k,options,size,batch", _CONVS)
def test_conv2d_on_cuda_matches_float64(dtype, cin, cout, k, options, size, batch):
    conv = _pruned_conv(cin, cout, k, 0.4, seed=cin + batch, **options)
    sparse = SparseConv2d.from_dense(conv).to("cuda", dtype)
    x = torch.randn(batch, cin, size, size, device="cuda").to(dtype)
    y = sparse(x)
    ref = conv.double().cuda()(x.double())
    assert y.dtype == dtype and y.shape == ref.shape
    scale = ref.abs().max().item() if ref.numel() else 1.0
    torch.testing.assert_close(y.double(), ref, rtol=_TOLERANCE[dtype], atol=_TOLERANCE[dtype] * max(scale, 1.0))
    cl = x.contiguous(memory_format=torch.channels_last)  # channels-last in, channels-last out
    assert sparse(cl).is_contiguous(memory_format=torch.channels_last) or batch == 0


def test_the_conv_cases_are_valid_convolutions():
    for cin, cout, k, options, size, batch in _CONVS:
        conv = _pruned_conv(cin, cout, k, 0.4, seed=cin + batch, **options)
        x = torch.randn(batch, cin, size, size)
        torch.testing.assert_close(SparseConv2d.from_dense(conv)(x), conv(x), rtol=1e-4, atol=1e-4)


@needs_gpu
@pytest.mark.gpu
def test_cuda_conv_runs_the_sparsenet_kernel():
    sparse = SparseConv2d.from_dense(_pruned_conv(16, 16, 3, 0.2, seed=1, padding=1)).cuda().half()
    x = torch.randn(2, 16, 14, 14, device="cuda", dtype=torch.float16)
    sparse(x)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        sparse(x)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("csr_conv2d_kernel" in n for n in names), names
    assert not any("conv" in n.lower() and "csr_conv2d_kernel" not in n for n in names), names


@needs_gpu
@pytest.mark.gpu
def test_cuda_half_models_save_load_and_densify(tmp_path):
    model = torch.nn.Sequential(_pruned(24, 16, 0.3, seed=7), torch.nn.ReLU(), _pruned(8, 24, 0.3, seed=8))
    sparse, _ = sparsenet.sparsify(model.cuda().half(), format="csr")
    sparsenet.save(sparse, str(tmp_path / "m.sparsenet"))
    skeleton = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    loaded = sparsenet.load(str(tmp_path / "m.sparsenet"), skeleton).cuda().half()
    x = torch.randn(4, 16, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
        dense = sparsenet.densify(sparse)
        assert dense[0].weight.device.type == "cuda" and dense[0].weight.dtype == torch.float16
        torch.testing.assert_close(dense(x), sparse(x), rtol=2e-3, atol=2e-3)
