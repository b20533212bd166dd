"""SparseConv2d: nn.Conv2d's forward semantics (layouts, unbatched input, bias, groups), autograd,
compile/export, sparsify (explicit and timed), save/load into the plain model, and the memory of a
forward far below the im2col matrix it never builds."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsenet
from sparsenet.nn import SparseConv2d, autoformat

from call_paths import assert_compiled_and_exported_keep, assert_gradients_match_dense


def pruned_conv(density=0.3, seed=0, **kwargs):
    torch.manual_seed(seed)
    conv = nn.Conv2d(**{"in_channels": 8, "out_channels": 12, "kernel_size": 3, "padding": 1, **kwargs})
    with torch.no_grad():
        conv.weight.mul_(torch.rand_like(conv.weight) < density)
    return conv


@pytest.mark.parametrize("kwargs", [{}, {"stride": 2, "groups": 2, "dilation": (1, 2)}, {"kernel_size": 1, "padding": 0},
                                    {"padding": "same", "kernel_size": 5, "bias": False}, {"padding": "valid"}])
def test_forward_matches_the_dense_layer_in_float64(isa, kwargs):
    dense = pruned_conv(**kwargs)
    sparse = SparseConv2d.from_dense(dense)
    weight = dense.weight.double()
    for x in (torch.randn(2, 8, 11, 9), torch.randn(8, 7, 6), torch.randn(3, 8, 10, 10).to(memory_format=torch.channels_last),
              torch.randn(2, 8, 9, 9)[:, :, 1:, 1:]):
        want = F.conv2d(x.double(), weight, None if dense.bias is None else dense.bias.double(), dense.stride,
                        dense.padding, dense.dilation, dense.groups)
        with torch.no_grad():
            got = sparse(x)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert got.is_contiguous(memory_format=torch.channels_last) == (
            x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
    torch.testing.assert_close(sparse.to_dense(), dense.weight.detach())
    assert sparse.weight.shape == dense.weight.shape and sparse.weight.device.type == "meta"
    torch.testing.assert_close(sparse.to_dense_conv().weight, dense.weight)


def test_unsupported_convolutions_are_refused_clearly():
    with pytest.raises(ValueError, match="pads with zeros only"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="unevenly"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 4, padding="same"))
    sparse = SparseConv2d.from_dense(pruned_conv())
    with pytest.raises(ValueError, match=r"x must have shape \(N, 8, H, W\)"):
        sparse(torch.randn(1, 7, 5, 5))
    with pytest.raises(TypeError, match="float32"):
        sparse(torch.randn(1, 8, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="cannot become float64"):
        sparse.double()
    with pytest.raises(TypeError, match="CPU kernels run in float32"):  # half is for CUDA
        sparse.half()(torch.randn(1, 8, 5, 5))


def test_gradients_reach_the_input_and_the_bias():
    dense = pruned_conv(stride=2)
    sparse = SparseConv2d.from_dense(dense)
    assert_gradients_match_dense(sparse, dense, torch.randn(2, 8, 9, 9))


def test_compile_fullgraph_and_export_keep_the_op():
    assert_compiled_and_exported_keep(SparseConv2d.from_dense(pruned_conv()), torch.randn(2, 8, 10, 10), "csr_conv2d")


def test_eager_fast_path_is_taken_and_notices_every_kind_of_change():
    import copy
    import io

    dense = pruned_conv(seed=3)
    sparse = SparseConv2d.from_dense(dense)
    x = torch.randn(2, 8, 9, 10)

    def check(bias=True):
        want = F.conv2d(x, dense.weight, dense.bias if bias else None, padding=1)
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)

    with torch.no_grad():
        check()
        prepared = sparse._prepared
        assert prepared.handle.keeps_buffers  # eager inference: one native call on the kept buffers
        check()
        assert sparse._prepared is prepared  # reused while nothing changed
        sparse.values.mul_(2)  # in place, same memory
        dense.weight.mul_(2)
        check()
        sparse.values.data = sparse.values.data * 0.5  # new storage behind the same Parameter
        dense.weight.mul_(0.5)
        check()
        new_bias = torch.randn(12)
        sparse.bias.data = new_bias.clone()  # the handle holds the bias: must follow the swap
        dense.bias.copy_(new_bias)
        check()
        twin = copy.deepcopy(sparse)  # the prepared handle is neither copied nor pickled
        buf = io.BytesIO()
        torch.save(sparse, buf)
        buf.seek(0)
        for other in (twin, torch.load(buf, weights_only=False)):
            torch.testing.assert_close(other(x), sparse(x), rtol=0, atol=0)
        sparse.bias = None
        check(bias=False)
        sparse.col_indices.fill_(999)  # structure changed in place: re-validated, refused
        with pytest.raises(ValueError, match="out of range"):
            sparse(x)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_stale_prepared_path_lets_the_old_tensors_go(kind):
    import gc
    import weakref

    from sparsenet.nn import SparseLinear

    if kind == "linear":
        torch.manual_seed(4)
        dense = nn.Linear(8, 6)
        with torch.no_grad():
            dense.weight.mul_(torch.rand_like(dense.weight) < 0.3)
        layer, x = SparseLinear.from_dense(dense), torch.randn(2, 8)
    else:
        layer, x = SparseConv2d.from_dense(pruned_conv(seed=4)), torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        want = layer(x)  # prepares the fast path, whose handle holds the values
    assert "_prepared" in layer.__dict__
    old = weakref.ref(layer.values)
    with torch.inference_mode():  # new values the fast path does not take (inference tensors)
        layer.values = nn.Parameter(layer.values.detach().clone(), requires_grad=False)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)  # through the op
    gc.collect()
    assert "_prepared" not in layer.__dict__ and old() is None


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.Conv2d(16, 32, 1, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


def test_sparsify_converts_convolutions_and_lists_them(tmp_path):
    model = small_cnn()
    sparsenet.prune(model, sparsity=0.8, progress=False).finalize()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
    sparse, report = sparsenet.sparsify(model, format="csr")
    rows = {r.name: r for r in report.rows}
    assert isinstance(sparse[0], SparseConv2d) and isinstance(sparse[3], SparseConv2d)
    assert rows["2"].format == "dense" and "depthwise" in rows["2"].note
    assert rows["0"].shape == (16, 27) and rows["0"].bytes_after < rows["0"].bytes_before
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)
    path = tmp_path / "cnn.sn"
    sparsenet.save(sparse, path)
    entries = {m["name"]: m for m in sparsenet.io.read_metadata(path)["modules"]}
    assert entries["0"]["type"] == "SparseConv2d" and entries["3"]["conv"]["stride"] == [2, 2]
    loaded = sparsenet.load(path, small_cnn())  # the plain model: its convolutions are swapped
    assert isinstance(loaded[0], SparseConv2d) and isinstance(loaded[2], nn.Conv2d)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
    back = sparsenet.densify(sparse)
    assert type(back[0]) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(back(x), want, rtol=1e-5, atol=1e-5)


def test_a_model_with_batchnorm_folded_by_torch_fx_converts_saves_and_loads(tmp_path):
    # The README's route for CNNs: prune, finalize, fold BatchNorm with torch's fuse, sparsify.
    from torch.fx.experimental.optimization import fuse

    def cnn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU()).eval()

    model = cnn()
    with torch.no_grad():  # statistics other than the defaults, so that folding changes the weights
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 2)
    sparsenet.prune(model, 0.75, structure="block", block=(4, 1), progress=False).finalize()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        want = model(x)
    fused = fuse(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    sparse, _ = sparsenet.sparsify(fused, format="csr", min_sparsity=0.0)
    assert isinstance(sparse.get_submodule("3"), SparseConv2d) and sparse.get_submodule("3").density == 0.25
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-4, atol=1e-4)
    sparsenet.save(sparse, tmp_path / "cnn.safetensors")
    plain = cnn()
    plain.load_state_dict(model.state_dict())  # (the BatchNorm statistics a rebuilt model would load)
    restored = sparsenet.load(tmp_path / "cnn.safetensors", fuse(plain))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), sparse(x))


def test_load_refuses_a_convolution_of_another_geometry(tmp_path):
    model = small_cnn()
    sparsenet.prune(model, sparsity=0.8, progress=False).finalize()
    sparse, _ = sparsenet.sparsify(model, format="csr")
    sparsenet.save(sparse, tmp_path / "cnn.sn")
    other = small_cnn()
    other[3] = nn.Conv2d(16, 32, 1, stride=1)
    with pytest.raises(ValueError, match="sparse convolution '3' is .* in the file, but the model's Conv2d"):
        sparsenet.load(tmp_path / "cnn.sn", other)
    padded = small_cnn()
    padded[0] = nn.Conv2d(3, 16, 3, padding=0)
    with pytest.raises(ValueError, match="'padding': \\[0, 0\\]"):
        sparsenet.load(tmp_path / "cnn.sn", padded)
    same = small_cnn()
    same[0] = nn.Conv2d(3, 16, 3, padding="same")  # the file's padding 1, spelled otherwise: loads
    assert isinstance(sparsenet.load(tmp_path / "cnn.sn", same)[0], SparseConv2d)
    reflect = small_cnn()
    reflect[0] = nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="cannot hold the file's sparse convolution: padding_mode='reflect'"):
        sparsenet.load(tmp_path / "cnn.sn", reflect)


def test_format_auto_times_convolutions_on_the_example_input(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSENET_CACHE_DIR", str(tmp_path))
    model = small_cnn()
    sparsenet.prune(model, sparsity=0.8, progress=False)
    seen = []

    def timer(calls):  # the first conv is faster sparse, the 1x1 dense
        out = calls["dense"]()
        seen.append(tuple(out.shape))
        sparse_wins = out.shape[1] == 16 if out.dim() == 4 else False
        return {name: (1.0 if (name != "dense") == sparse_wins else 2.0) for name in calls}

    monkeypatch.setattr(autoformat, "time_calls", timer)
    untimed, report = sparsenet.sparsify(model)
    assert all(isinstance(m, nn.Conv2d) for m in (untimed[0], untimed[3]))
    assert "pass example_inputs" in {r.name: r for r in report.rows}["0"].note
    x = torch.randn(2, 3, 8, 8)
    sparse, report = sparsenet.sparsify(model, example_inputs=x)
    rows = {r.name: r for r in report.rows}
    assert isinstance(sparse[0], SparseConv2d) and rows["0"].gain == pytest.approx(2.0)
    assert "measured on 2x3x8x8" in rows["0"].note
    assert isinstance(sparse[3], nn.Conv2d) and "dense measured fastest on 2x16x8x8" in rows["3"].note
    assert (2, 16, 8, 8) in seen and (2, 32, 4, 4) in seen and (2, 10) in seen  # the Linear at its 2 rows
    assert "rows=2" in rows["6"].note


def test_convolution_timings_are_kept_apart_by_structure_and_build(monkeypatch, tmp_path):
    # An unstructured weight and one pruned in blocks of 4 output channels (same geometry, same
    # density) run at different speeds, and so do two builds of the kernels: neither answers for
    # the other from the cache.
    monkeypatch.setenv("SPARSENET_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    unstructured = nn.Conv2d(8, 16, 3, padding=1)
    blocked = nn.Conv2d(8, 16, 3, padding=1)
    def keep_18_of_72(rows):  # 18 random columns of 72 in each row: density 0.25 exactly
        return torch.zeros(rows, 72).scatter_(1, torch.rand(rows, 72).argsort(1)[:, :18], 1.0).bool()

    with torch.no_grad():
        unstructured.weight.mul_(keep_18_of_72(16).reshape(16, 8, 3, 3))
        blocked.weight.mul_(keep_18_of_72(4).repeat_interleave(4, 0).reshape(16, 8, 3, 3))
    timed = []
    monkeypatch.setattr(autoformat, "time_calls", lambda calls: timed.append(1) or {n: 1.0 for n in calls})
    x = torch.randn(1, 8, 10, 10)
    for conv in (unstructured, blocked, unstructured, blocked):
        autoformat.measure_conv(conv, tuple(x.shape), autoformat.TimingCache())
    assert len(timed) == 2  # each structure timed once, then cached
    monkeypatch.setattr(autoformat, "build_tag", lambda: "another-build")
    autoformat.measure_conv(blocked, tuple(x.shape), autoformat.TimingCache())
    assert len(timed) == 3


def test_rows_run_together_counts_what_the_kernel_groups():
    from sparsenet.formats import PackedCSR
    from sparsenet.ops.handles import csr_handle

    def share(runs, cols=10):
        rows, g = [], torch.Generator().manual_seed(len(runs))
        for n in runs:
            row = torch.rand(cols, generator=g) < 0.5
            row[0] = True  # (a row storing nothing is never grouped)
            rows += [row] * n
        p = PackedCSR.from_dense(torch.stack(rows) * 1.0)
        return csr_handle(p.crow_indices, p.col_indices, p.values, cols).rows_run_together()

    assert share([1] * 8) == 0.0
    assert share([4, 4]) == 1.0
    assert share([2, 1, 3]) == pytest.approx(4 / 6)  # 2; 1 alone; 2 of 3
    assert share([7]) == pytest.approx(6 / 7)  # 4, then 2, then 1 alone


def test_a_forward_stays_far_below_the_im2col_matrix(tmp_path):
    # In a fresh process, its peak resident memory reset (Linux: clear_refs 5) just before the
    # forward: what the forward allocates at its peak.
    script = textwrap.dedent("""
        import json, torch
        from torch import nn
        from sparsenet.nn import SparseConv2d

        def resident(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

        torch.set_num_threads(1)
        conv = nn.Conv2d(128, 128, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(torch.rand_like(conv.weight) < 0.3)
        layer = SparseConv2d.from_dense(conv)
        x = torch.randn(2, 128, 128, 128)
        with torch.no_grad():
            layer(torch.randn(1, 128, 8, 8))  # handles, threads and the rest set up
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = resident("VmRSS:")
            y = layer(x)
            peak = resident("VmHWM:")
        print(json.dumps({"grew": peak - before, "out": y.numel() * 4, "x": x.numel() * 4}))
    """)
    # (cwd: away from the source tree, which `python -c` would import instead of the installed package)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    if result.returncode and "clear_refs" in result.stderr:
        pytest.skip("this kernel cannot reset the peak resident memory")
    assert result.returncode == 0, result.stderr
    grew = json.loads(result.stdout)
    im2col = 2 * 128 * 128 * 128 * 9 * 4  # the (N * H * W) x (C * 3 * 3) matrix: 151 MB
    # What a forward needs: its output and the zero-padded copy of its input (16.8 MB and ~17.3 MB).
    assert 0 < grew["grew"] < grew["out"] + 1.2 * grew["x"] + 16 * 2**20 < im2col / 2.5, grew
