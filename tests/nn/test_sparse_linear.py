"""SparseLinear: nn.Linear semantics, state_dict, autograd, compile/export, bad input."""
import copy

import pytest
import torch
from torch import nn

import sparsenet
from sparsenet.formats import CSR
from sparsenet.nn import SparseLinear
from sparsenet.ops import cached_handles


def pruned_linear(in_f, out_f, sparsity=0.8, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight[torch.rand_like(lin.weight) < sparsity] = 0
    return lin


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(), (1,), (7,), (2, 3), (2, 1, 4)])
def test_matches_linear_any_leading_dims(bias, lead):
    lin = pruned_linear(33, 21, bias=bias)
    sp = SparseLinear.from_dense(lin)
    x = torch.randn(*lead, 33)
    assert sp(x).shape == lin(x).shape
    assert rel_err(sp(x), lin(x)) < 1e-5


def test_non_contiguous_and_expanded_inputs():
    lin = pruned_linear(16, 9)
    sp = SparseLinear.from_dense(lin)
    base = torch.randn(16, 10, 4)
    for x in (base.transpose(0, 2)[..., :16].transpose(-1, -1), base.permute(2, 1, 0), torch.randn(1, 16).expand(5, 16)):
        assert rel_err(sp(x), lin(x)) < 1e-5


def test_lazily_negated_input_is_negated():
    # A tensor with torch's negative bit set holds -x in memory only after resolve_neg().
    lin = pruned_linear(16, 9)
    sp = SparseLinear.from_dense(lin)
    for x in (torch._neg_view(torch.randn(4, 16)), torch._neg_view(torch.randn(2, 3, 16))):  # fast, general path
        assert x.is_neg()
        for ctx in (torch.no_grad(), torch.inference_mode(), torch.enable_grad()):
            with ctx:
                assert rel_err(sp(x), lin(x.resolve_neg())) < 1e-5


def test_batch_sizes_around_kernel_switch():
    lin = pruned_linear(70, 40, sparsity=0.9)
    sp = SparseLinear.from_dense(lin)
    for batch in (1, 2, 3, 4, 5, 31, 32, 33, 65, 300):
        x = torch.randn(batch, 70)
        assert rel_err(sp(x), lin(x)) < 1e-5


def test_mask_argument_and_prune_masks_are_honoured():
    lin = nn.Linear(12, 6)
    mask = torch.rand(6, 12) < 0.3
    sp = SparseLinear.from_dense(lin, mask=mask)
    assert sp.nnz == int(mask.sum())
    expected = lin.weight.detach() * mask
    assert torch.equal(sp.to_csr().to_dense(), expected)
    torch.nn.utils.prune.l1_unstructured(lin, "weight", amount=0.5)
    sp2 = SparseLinear.from_dense(lin)
    assert sp2.nnz == 36
    x = torch.randn(4, 12)
    assert rel_err(sp2(x), lin(x)) < 1e-5


def test_from_csr_and_repr():
    w = torch.randn(5, 8) * (torch.rand(5, 8) < 0.5)
    sp = SparseLinear.from_csr(CSR.from_dense(w), bias=torch.zeros(5))
    text = repr(sp)
    assert "in_features=8" in text and "out_features=5" in text and "format=csr" in text and "density=" in text
    assert torch.equal(sp.to_csr().to_dense(), w)
    with pytest.raises(ValueError, match="bias"):
        SparseLinear.from_csr(CSR.from_dense(w), bias=torch.zeros(4))
    with pytest.raises(TypeError, match="CSR"):
        SparseLinear.from_csr(w)


def test_values_are_frozen_parameters_and_state_dict_keys():
    sp = SparseLinear.from_dense(pruned_linear(10, 4))
    assert isinstance(sp.values, nn.Parameter) and not sp.values.requires_grad
    assert set(sp.state_dict()) == {"crow_indices", "col_indices", "values", "bias"}
    assert sp.col_indices.dtype == torch.uint16 and sp.crow_indices.dtype == torch.int64


def test_state_dict_round_trip_into_skeleton_with_other_nnz():
    src = SparseLinear.from_dense(pruned_linear(30, 20, sparsity=0.7, seed=1))
    for skeleton in (SparseLinear(30, 20), SparseLinear.from_dense(pruned_linear(30, 20, sparsity=0.2, seed=2))):
        skeleton.load_state_dict(src.state_dict())
        x = torch.randn(6, 30)
        assert torch.equal(skeleton(x), src(x))
        assert skeleton.nnz == src.nnz and not skeleton.values.requires_grad


def test_invalid_state_dict_is_refused_and_leaves_module_untouched():
    sp = SparseLinear.from_dense(pruned_linear(10, 5, seed=3))
    before = copy.deepcopy(sp.state_dict())
    bad = copy.deepcopy(sp.state_dict())
    bad["col_indices"] = torch.full_like(bad["col_indices"], 11)
    with pytest.raises(RuntimeError, match="out of range"):
        sp.load_state_dict(bad)
    for k, v in sp.state_dict().items():
        assert torch.equal(v, before[k])


def test_in_place_structure_change_is_revalidated():
    sp = SparseLinear.from_dense(pruned_linear(10, 5, seed=4))
    x = torch.randn(2, 10)
    sp(x)
    with torch.no_grad():
        sp.col_indices.fill_(200)  # out of range for 10 columns: must be caught, not read
    with pytest.raises(ValueError, match="out of range"):
        sp(x)


def test_handle_cache_does_not_keep_layers_alive():
    import gc

    gc.collect()
    start = cached_handles()
    layers = [SparseLinear.from_dense(pruned_linear(8, 8, seed=s)) for s in range(5)]
    for layer in layers:
        layer(torch.randn(1, 8))
    assert cached_handles() == start + 5
    del layers, layer
    gc.collect()
    assert cached_handles() == start


def test_prepared_fast_path_dies_with_its_layer():
    import gc
    import weakref

    layer = SparseLinear.from_dense(pruned_linear(8, 8, seed=1))
    with torch.no_grad():
        layer(torch.randn(2, 8))  # builds the prepared path, whose handle holds the buffers
    values = weakref.ref(layer.values)
    del layer
    gc.collect()
    assert values() is None


def test_no_grad_and_inference_mode():
    lin = pruned_linear(12, 7)
    sp = SparseLinear.from_dense(lin)
    x = torch.randn(3, 12)
    with torch.no_grad():
        a = sp(x)
    with torch.inference_mode():
        b = sp(torch.randn(3, 12).copy_(x))
    assert torch.equal(a, b) and rel_err(a, lin(x)) < 1e-5


def test_gradients_flow_to_input_and_bias_only():
    lin = pruned_linear(9, 6, sparsity=0.6).double()
    sp = SparseLinear.from_dense(pruned_linear(9, 6, sparsity=0.6))
    x = torch.randn(4, 3, 9, requires_grad=True)
    x_ref = x.detach().double().requires_grad_(True)
    g = torch.randn(4, 3, 6)
    sp(x).backward(g)
    lin(x_ref).backward(g.double())
    assert rel_err(x.grad, x_ref.grad) < 1e-5
    assert rel_err(sp.bias.grad, lin.bias.grad) < 1e-5
    assert sp.values.grad is None
    sp.values.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen"):
        sp(torch.randn(2, 9, requires_grad=True)).sum().backward()


def test_jacobian_wrt_input_is_the_weight():
    sp = SparseLinear.from_dense(pruned_linear(6, 4, sparsity=0.5))
    x = torch.randn(1, 6, requires_grad=True)
    jac = torch.autograd.functional.jacobian(sp, x).reshape(4, 6)  # dy/dx of y = x W^T + b is W
    assert torch.allclose(jac, sp.to_csr().to_dense(), atol=1e-6)


def test_bad_inputs_raise_clear_errors():
    sp = SparseLinear.from_dense(pruned_linear(10, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 10\)"):
        sp(torch.randn(3, 11))
    with pytest.raises(TypeError, match="float32"):
        sp(torch.randn(3, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        sp(torch.randint(0, 3, (3, 10)))
    with pytest.raises(ValueError):
        sp(torch.tensor(1.0))
    with pytest.raises(TypeError, match="Tensor"):
        sp([1.0] * 10)
    for ctx in (torch.no_grad(), torch.enable_grad()):
        with ctx, pytest.raises(TypeError, match="strided"):
            sp(torch.randn(3, 10).to_sparse())
    wrong_bias = SparseLinear.from_dense(pruned_linear(10, 5))
    wrong_bias.bias = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    for ctx in (torch.no_grad(), torch.enable_grad()):
        with ctx, pytest.raises(TypeError, match="bias must be float32"):
            wrong_bias(torch.randn(3, 10))
    with pytest.raises(ValueError, match="mask must be a tensor of shape"):
        SparseLinear.from_dense(nn.Linear(4, 3), mask=torch.ones(3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        SparseLinear.from_dense(nn.Linear(4, 3), mask=torch.ones(3, 4))
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="nnz"):
        SparseLinear(3, 2, nnz=7)


def test_nan_weights_are_refused_at_conversion():
    lin = nn.Linear(4, 3)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN|finite"):
        SparseLinear.from_dense(lin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_cuda_input_for_a_cpu_module_is_a_clear_error():
    sp = SparseLinear.from_dense(pruned_linear(10, 5))
    with pytest.raises(ValueError, match=r"move the module"):
        sp(torch.randn(2, 10, device="cuda"))


def test_input_on_another_device_is_a_clear_error():
    # Stands in for CUDA on machines without a GPU: an input away from the weight is refused by name.
    sp = SparseLinear.from_dense(pruned_linear(10, 5))
    with pytest.raises(ValueError, match=r"x is on meta but the weight is on cpu: move the module"):
        sp(torch.randn(2, 10, device="meta"))


def test_a_device_without_kernels_is_a_clear_error():
    sp = SparseLinear.from_dense(pruned_linear(10, 5)).to("meta")
    with pytest.raises(ValueError, match="no meta kernel for csr_linear"):
        sp(torch.randn(2, 10, device="meta"))


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = SparseLinear.from_dense(pruned_linear(16, 32, seed=5))
        self.b = SparseLinear.from_dense(pruned_linear(32, 8, seed=6))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_torch_compile_fullgraph_keeps_the_op():
    model = TwoLayer()
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(5, 16)
    assert torch.equal(compiled(x), model(x))
    code = seen[0].code
    assert code.count("sparsenet.csr_linear") == 2, code
    assert "linear(" not in code.replace("csr_linear(", "")


def test_torch_compile_inductor_runs():
    model = TwoLayer()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 16)
    assert rel_err(compiled(x), model(x)) < 1e-5


def test_torch_export_keeps_the_op():
    model = TwoLayer()
    x = torch.randn(4, 16)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count("sparsenet.csr_linear.default") == 2, targets
    assert not any("aten.linear" in t or "aten.mm" in t or "addmm" in t for t in targets), targets
    assert torch.equal(ep.module()(x), model(x))


def test_built_under_inference_mode_still_tracks_in_place_changes():
    with torch.inference_mode():
        sp = SparseLinear.from_dense(pruned_linear(10, 5, seed=7))
        x = torch.randn(2, 10)
        y = sp(x)
    assert not sp.col_indices.is_inference() and not sp.values.is_inference()
    assert torch.equal(sp(x.clone()), y)
    with torch.no_grad():
        sp.col_indices.fill_(100)
    with pytest.raises(ValueError, match="out of range"):
        sp(x.clone())


def test_op_on_inference_tensors_is_validated_every_call():
    lin = pruned_linear(10, 5, seed=8)
    packed = SparseLinear.from_dense(lin).to_packed()
    with torch.inference_mode():
        crow, col, values = packed.crow_indices.clone(), packed.col_indices.clone(), packed.values.clone()
        x = torch.randn(3, 10)
        y = torch.ops.sparsenet.csr_linear(x, crow, col, values, None, 10)
        assert rel_err(y, x @ lin.weight.detach().T) < 1e-5
        col.fill_(50)
        with pytest.raises(ValueError, match="out of range"):
            torch.ops.sparsenet.csr_linear(x, crow, col, values, None, 10)


def test_eager_fast_path_notices_every_kind_of_change():
    lin = pruned_linear(12, 6, seed=9)
    sp = SparseLinear.from_dense(lin)
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert rel_err(sp(x), lin(x)) < 1e-5
        sp.values.mul_(2)  # in place, same memory: seen without re-preparing
        lin.weight.mul_(2)
        lin.bias.zero_()
        sp.bias.zero_()
        assert rel_err(sp(x), lin(x)) < 1e-5
        sp.values.data = sp.values.data * 0.5  # new storage behind the same Parameter
        lin.weight.mul_(0.5)
        assert rel_err(sp(x), lin(x)) < 1e-5
        new_bias = torch.randn(6)
        sp.bias.data = new_bias.clone()  # the native handle holds the bias: must follow the swap
        lin.bias.copy_(new_bias)
        assert rel_err(sp(x), lin(x)) < 1e-5
        assert rel_err(sp(x.clone().requires_grad_()), lin(x)) < 1e-5  # grad-requiring x, grad off
        sp.bias = None
        assert rel_err(sp(x), x @ lin.weight.T) < 1e-5
        sp.col_indices.fill_(99)  # structure changed in place: re-validated, refused
        with pytest.raises(ValueError, match="out of range"):
            sp(x)


def test_deepcopy_and_pickle_after_forward():
    import io

    sp = SparseLinear.from_dense(pruned_linear(8, 4, seed=10))
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = sp(x)
        twin = copy.deepcopy(sp)
        assert torch.equal(twin(x), y)
        buf = io.BytesIO()
        torch.save(sp, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_float64_default_dtype_does_not_leak_into_outputs():
    sp = SparseLinear.from_dense(pruned_linear(6, 3, seed=11))
    x = torch.randn(2, 6)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad():
            y = sp(x)
    finally:
        torch.set_default_dtype(before)
    assert y.dtype == torch.float32


# ---- code that reads .weight; dtype changes ---------------------------------------------------------

def test_weight_reads_give_a_stand_in_nothing_can_compute_with():
    sp = SparseLinear.from_dense(pruned_linear(12, 6, seed=11))
    w = sp.weight
    assert (w.shape, w.dtype, w.device.type) == ((6, 12), torch.float32, "meta")
    assert torch.overrides.has_torch_function((w,))  # what torch's fused transformer paths refuse
    assert isinstance(w, torch.Tensor) and w.size(1) == 12 and w.dim() == 2 and w.is_floating_point()
    assert "meta" in repr(w)
    x = torch.randn(2, 12)
    # torch itself returns uninitialised CPU memory for F.linear(cpu x, meta w): refused instead.
    for compute in (lambda: torch.nn.functional.linear(x, w), lambda: x @ w.T, lambda: w.to("cpu"),
                    lambda: w + 1, lambda: w.clone(), lambda: torch.matmul(x, w.t())):
        with pytest.raises(RuntimeError, match="stand-in without data"):
            compute()
    assert "weight" not in sp.state_dict() and "weight" not in dict(sp.named_parameters())


@pytest.mark.parametrize("stack", [False, True])
def test_torch_transformer_fast_path_calls_the_sparse_layers(stack):
    # In eval mode torch's fused path would hand linear1.weight to one C++ kernel and never call
    # the layer: with the stand-in it must take the plain path, which does.
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    model = (nn.TransformerEncoder(layer, 2, enable_nested_tensor=True) if stack else layer).eval()
    sparsenet.prune(model, 0.6).finalize()
    x = torch.randn(3, 5, 32)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, 3:] = True
    with torch.inference_mode():
        expected = model(x, src_key_padding_mask=padding)
        sparse, report = sparsenet.sparsify(model)
        got = sparse(x, src_key_padding_mask=padding)
    assert len(report.converted) == (4 if stack else 2)
    # The fused path writes zeros at padded positions, the plain one computes them: compare the rest.
    assert (got - expected)[~padding].abs().max() < 1e-5


def test_t5_reading_wo_weight_dtype_runs():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    sparsenet.prune(model, 0.5, exclude=["lm_head"]).finalize()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=ids, decoder_input_ids=ids).logits
        sparse, report = sparsenet.sparsify(model)
        got = sparse(input_ids=ids, decoder_input_ids=ids).logits
    assert len(report.converted) > 0 and (got - expected).abs().max() < 1e-5


@pytest.mark.parametrize("format", ["csr", "bitmap"])
def test_dtype_change_is_refused_at_once(format):
    # float16 / bfloat16 are for the CUDA kernels (every Linear format has them); nothing takes
    # float64. (Convolutions, with no CUDA kernel, refuse half too: test_sparse_conv2d.py.)
    sp = SparseLinear.from_dense(pruned_linear(12, 6, seed=12), format=format)
    before = {k: v.clone() for k, v in sp.state_dict().items()}
    with pytest.raises(TypeError, match="float32"):
        sp.double()
    assert all(torch.equal(v, before[k]) and v.dtype == before[k].dtype for k, v in sp.state_dict().items())
    assert sp.float().to("cpu") is sp  # no dtype change: fine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_csr_layers_carry_half_values_for_cuda(dtype):
    # CSR has CUDA kernels in these dtypes, so the layer converts (model.half().cuda() is the usual
    # order); on the CPU it then says what to do instead of running.
    lin = pruned_linear(12, 6, seed=12)
    sp = SparseLinear.from_dense(lin).to(dtype)
    assert sp.values.dtype == dtype and sp.bias.dtype == dtype
    assert torch.equal(sp.float().to_dense(), lin.weight.detach().to(dtype).float())
    with pytest.raises(TypeError, match="CPU kernels run in float32"):
        sp.to(dtype)(torch.randn(2, 12))
