"""sparsenet.save / sparsenet.load: round trips, size, tied tensors, and every kind of bad file."""
import copy
import io as _io
import json
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import sparsenet.io as sio
from sparsenet.formats import CSR
from sparsenet.nn import SparseLinear

from layer_twins import as_linear, zero_linear_weights


class Net(nn.Module):
    def __init__(self, hidden=256):
        super().__init__()
        self.fc1 = nn.Linear(128, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, 64)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def pruned(linear, sparsity, seed):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(linear.weight.shape, generator=g) >= sparsity
    return SparseLinear.from_csr(CSR.from_dense(linear.weight.detach() * keep), linear.bias.detach())


def sparse_net(seed=0, sparsity=0.9, hidden=256):
    torch.manual_seed(seed)
    net = Net(hidden)
    with torch.no_grad():
        net.norm.weight.uniform_(0.5, 1.5)
        net.step.fill_(seed + 7)
    net.fc1 = pruned(net.fc1, sparsity, seed)
    net.fc2 = pruned(net.fc2, sparsity, seed + 1)
    return net


def skeleton(hidden=256):
    net = Net(hidden)
    net.fc1 = SparseLinear(128, hidden)
    net.fc2 = SparseLinear(hidden, 64)
    return net


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_tensors(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if x.dtype == torch.uint16:  # few ops exist for uint16 in older torch
            x, y = x.to(torch.int32), y.to(torch.int32)
        if not torch.equal(x, y):
            return False
    return True


@pytest.fixture()
def saved(tmp_path):
    model = sparse_net()
    path = tmp_path / "model.sn"
    sio.save(model, path)
    return model, path


# ---- round trips ---------------------------------------------------------------------------------

def test_round_trip_identical_outputs(saved):
    model, path = saved
    loaded = sio.load(path, skeleton())
    assert same_tensors(snapshot(model), snapshot(loaded))
    x = torch.randn(5, 128)
    assert torch.equal(model(x), loaded(x))


def test_load_into_skeleton_with_different_nnz(saved):
    model, path = saved
    skel = sparse_net(seed=3, sparsity=0.5)
    assert skel.fc1.nnz != model.fc1.nnz
    loaded = sio.load(path, skel)
    assert loaded is skel
    assert loaded.fc1.nnz == model.fc1.nnz and loaded.fc2.nnz == model.fc2.nnz
    x = torch.randn(4, 128)
    assert torch.equal(model(x), loaded(x))


def test_metadata_contents(saved):
    model, path = saved
    meta = sio.read_metadata(path)
    assert meta["format"] == "sparsenet"
    assert meta["file_format_version"] == sio.FILE_FORMAT_VERSION == 1
    import sparsenet

    assert meta["sparsenet_version"] == sparsenet.__version__
    by_name = {m["name"]: m for m in meta["modules"]}
    assert by_name["fc1"] == {"name": "fc1", "type": "SparseLinear", "format": "csr", "version": 1,
                              "shape": [256, 128], "nnz": model.fc1.nnz, "index_dtype": "uint16"}
    assert by_name["fc2"]["shape"] == [64, 256]
    assert meta["dtype_views"] == {"fc1.col_indices": "uint16", "fc2.col_indices": "uint16"}
    assert meta["sizes"] == {"fc1": {"in_features": 128, "out_features": 256}, "norm": {"normalized_shape": [256]},
                             "fc2": {"in_features": 256, "out_features": 64}}


def test_file_much_smaller_than_dense_state_dict(tmp_path):
    torch.manual_seed(0)
    dense = Net()
    buf = _io.BytesIO()
    torch.save(dense.state_dict(), buf)
    model = sparse_net(sparsity=0.9)
    path = tmp_path / "m.sn"
    report = sio.save(model, path)
    ratio = path.stat().st_size / buf.getbuffer().nbytes
    print(f"\nsaved {path.stat().st_size:,} bytes vs torch.save(dense) {buf.getbuffer().nbytes:,}: ratio {ratio:.3f}")
    print(report)
    assert ratio < 0.5
    assert report.ratio < 0.5
    assert report == sio.size_report(model)
    assert report.stored_bytes < path.stat().st_size < report.stored_bytes + 4096  # header is small


def test_dense_module_round_trip(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    model(torch.randn(4, 8))
    path = tmp_path / "dense.sn"
    sio.save(model, path)
    assert sio.read_metadata(path)["modules"] == []
    torch.manual_seed(2)
    skel = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).eval()
    sio.load(str(path), skel)
    assert same_tensors(snapshot(model), snapshot(skel))


def test_sparsify_round_trip(tmp_path):
    import sparsenet.nn as snn

    def make(seed):
        torch.manual_seed(seed)
        m = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
        with torch.no_grad():
            for layer in (m[0], m[2]):
                layer.weight[torch.rand(layer.weight.shape) < 0.8] = 0
        return snn.sparsify(m, min_sparsity=0.5)[0]

    model, path = make(0), tmp_path / "s.sn"
    sio.save(model, path)
    loaded = sio.load(path, make(1))
    x = torch.randn(3, 32)
    assert torch.equal(model(x), loaded(x))


class Tied(nn.Module):
    def __init__(self, tie=True):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        if tie:
            self.head.weight = self.emb.weight


def test_tied_weights_stored_once(tmp_path):
    torch.manual_seed(0)
    model, path = Tied(), tmp_path / "tied.sn"
    sio.save(model, path)
    meta = sio.read_metadata(path)
    assert meta["aliases"] == {"head.weight": "emb.weight"}
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"emb.weight"}

    tied = sio.load(path, Tied())
    assert tied.head.weight is tied.emb.weight
    assert torch.equal(tied.emb.weight, model.emb.weight)
    untied = sio.load(path, Tied(tie=False))
    assert torch.equal(untied.head.weight, model.emb.weight)
    assert torch.equal(untied.emb.weight, model.emb.weight)


def test_overlapping_views_are_copied(tmp_path):
    model = nn.Module()
    model.register_buffer("whole", torch.arange(10.0))
    model.register_buffer("part", model.whole[2:5])
    model.register_buffer("empty_a", torch.zeros(0))
    model.register_buffer("empty_b", torch.zeros(0))
    path = tmp_path / "views.sn"
    sio.save(model, path)
    assert sio.read_metadata(path)["aliases"] == {}
    skel = nn.Module()
    for name, n in (("whole", 10), ("part", 3), ("empty_a", 0), ("empty_b", 0)):
        skel.register_buffer(name, torch.zeros(n))
    sio.load(path, skel)
    assert torch.equal(skel.part, torch.tensor([2.0, 3.0, 4.0]))
    assert torch.equal(skel.whole, torch.arange(10.0))


def test_save_is_atomic_and_refuses_broken_layers(tmp_path):
    model = sparse_net()
    with torch.no_grad():
        model.fc1.values[0] = float("nan")
    path = tmp_path / "bad.sn"
    with pytest.raises(ValueError, match="NaN/Inf"):
        sio.save(model, path)
    assert list(tmp_path.iterdir()) == []
    sio.save(sparse_net(), path)
    assert [p.name for p in tmp_path.iterdir()] == ["bad.sn"]  # no temporary file left behind


def test_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        sio.save({"a": torch.ones(1)}, "x.sn")
    with pytest.raises(TypeError, match="nn.Module"):
        sio.load("x.sn", {"a": torch.ones(1)})


# ---- where save writes -------------------------------------------------------------------------------

def test_save_refuses_fifos_and_directories_before_writing(tmp_path):
    fifo, folder = tmp_path / "pipe", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    for path, kind in ((fifo, "a FIFO"), (folder, "a directory")):
        with pytest.raises(ValueError, match=f"is {kind}, not a regular file"):
            sio.save(sparse_net(), path)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and list(folder.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "pipe"]  # no temporary file either


def test_save_writes_through_symlinks(tmp_path):
    target, link = tmp_path / "target.sn", tmp_path / "link.sn"
    target.write_bytes(b"old")
    link.symlink_to(target)
    model = sparse_net()
    sio.save(model, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert same_tensors(snapshot(model), snapshot(sio.load(target, skeleton())))
    dangling = tmp_path / "dangling.sn"
    dangling.symlink_to(tmp_path / "new.sn")
    sio.save(model, dangling)
    assert dangling.is_symlink() and (tmp_path / "new.sn").is_file()


# ---- one module under two names --------------------------------------------------------------------

class SharedTwice(nn.Module):
    """One SparseLinear registered under two names."""

    def __init__(self, layer):
        super().__init__()
        self.a = self.b = layer


def untie_b(edit=lambda tensors: None):
    """A file whose b.* are stored on their own rather than as aliases of a.*, then ``edit``ed."""
    def mutate(tensors, header):
        for alias in [k for k in header["aliases"] if k.startswith("b.")]:
            target = header["aliases"].pop(alias)
            tensors[alias] = tensors[target].clone()
            if target in header["dtype_views"]:
                header["dtype_views"][alias] = header["dtype_views"][target]
        edit(tensors)
    return mutate


def shared_skeleton(mask_seed=3):
    """mask_seed=3: the saved file's non-zero count (other values); another seed: another count."""
    torch.manual_seed(1)
    return SharedTwice(pruned(nn.Linear(16, 8), 0.5, seed=mask_seed))


@pytest.fixture()
def shared_file(tmp_path):
    torch.manual_seed(0)
    model = SharedTwice(pruned(nn.Linear(16, 8), 0.5, seed=3))
    path = tmp_path / "shared.sn"
    sio.save(model, path)
    return model, path


def test_shared_module_loads_when_its_names_agree(shared_file, tmp_path):
    model, path = shared_file
    assert set(sio.read_metadata(path)["aliases"]) == {"b.crow_indices", "b.col_indices", "b.values", "b.bias"}
    for source in (path, rewrite(path, tmp_path / "copies.sn", untie_b())):
        for mask_seed in (3, 9):
            loaded = sio.load(source, shared_skeleton(mask_seed))
            assert loaded.a is loaded.b and same_tensors(snapshot(model), snapshot(loaded))


@pytest.mark.parametrize("edit, match", [
    (lambda t: t["b.col_indices"].__setitem__(0, 1000), r"sparse module 'b' \(8x16\) is invalid"),
    (lambda t: t["b.values"].mul_(2), "'a.values' and 'b.values' are one tensor in the model"),
    (lambda t: t["b.bias"].add_(1), "'a.bias' and 'b.bias' are one tensor in the model"),
])
def test_shared_module_file_disagreeing_with_itself_is_refused(shared_file, tmp_path, edit, match):
    _, path = shared_file
    bad = rewrite(path, tmp_path / "bad.sn", untie_b(edit))
    skel = shared_skeleton()
    before = snapshot(skel)
    with pytest.raises(ValueError, match=match):
        sio.load(bad, skel)
    assert same_tensors(before, snapshot(skel))


def test_names_are_checked_before_any_tensor_is_read(saved, tmp_path, monkeypatch):
    # A stray tensor could be huge: the refusal must come from the header alone.
    import safetensors

    _, good = saved
    bad = rewrite(good, tmp_path / "extra.sn", add_extra)
    real, read = safetensors.safe_open, []

    class Spy:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            self.inner = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    with pytest.raises(ValueError, match="not in the model: extra"):
        sio.load(bad, skeleton())
    assert read == []
    sio.load(good, skeleton())  # the spy does see reads
    assert "fc1.values" in read


# ---- bad files: ValueError, and the skeleton is untouched ------------------------------------------

def rewrite(src, dst, mutate, fix_checksums=True):
    """Re-save ``src`` as ``dst`` after ``mutate(tensors, header)`` edits its stored tensors/metadata."""
    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["sparsenet"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors, header)
    if fix_checksums:
        header["crc32"] = {k: sio._checksum(t) for k, t in tensors.items()}
    save_file(tensors, str(dst), metadata={"sparsenet": json.dumps(header)})
    return dst


def edit_bytes(edit):
    def make(src, dst):
        dst.write_bytes(edit(src.read_bytes()))
        return dst
    return make


def edit_file(mutate, fix_checksums=True):
    return lambda src, dst: rewrite(src, dst, mutate, fix_checksums)


def setitem(path, value):
    def mutate(tensors, header):
        target = header
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def flip_last_byte(b):
    return b[:-1] + bytes([b[-1] ^ 0x40])


def corrupt_header(b):
    return b[:8] + b"#" * 8 + b[16:]


def tensors_only(src, dst):
    with safe_open(str(src), framework="pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, str(dst))
    return dst


def foreign_metadata(value):
    def make(src, dst):
        with safe_open(str(src), framework="pt") as f:
            save_file({k: f.get_tensor(k) for k in f.keys()}, str(dst), metadata={"sparsenet": value})
        return dst
    return make


def col_out_of_range(tensors, header):
    tensors["fc1.col_indices"][3] = 1000  # stored as int16; the layer has 128 columns


def nan_value(tensors, header):
    tensors["fc2.values"][5] = float("nan")


def drop(name):
    def mutate(tensors, header):
        del tensors[name]
    return mutate


def add_extra(tensors, header):
    tensors["extra"] = torch.ones(2)


def reshape_norm(tensors, header):
    tensors["norm.weight"] = tensors["norm.weight"][:-1].contiguous()


def retype(name, dtype):
    def mutate(tensors, header):
        tensors[name] = tensors[name].to(dtype)
    return mutate


def describe_wrong_nnz(tensors, header):
    header["modules"][0]["nnz"] += 1


def short_crow(tensors, header):
    tensors["fc1.crow_indices"] = tensors["fc1.crow_indices"][:-1].contiguous()


def bad_alias(tensors, header):
    header["aliases"] = {"ghost": "nowhere"}


def uncover_checksum(tensors, header):
    header["crc32"].pop("norm.bias")


BAD_FILES = {
    "missing": (lambda src, dst: dst, "no such file"),
    "empty": (edit_bytes(lambda b: b""), "not a readable safetensors file"),
    "truncated": (edit_bytes(lambda b: b[:-7]), "not a readable safetensors file"),
    "truncated_header": (edit_bytes(lambda b: b[:40]), "not a readable safetensors file"),
    "corrupted_header": (edit_bytes(corrupt_header), "not a readable safetensors file"),
    "corrupted_data": (edit_bytes(flip_last_byte), "fails its checksum"),
    "no_metadata": (tensors_only, "without sparsenet metadata"),
    "metadata_not_json": (foreign_metadata("{not json"), "not valid JSON"),
    "metadata_foreign": (foreign_metadata('{"format": "something else"}'), "not sparsenet's"),
    "metadata_incomplete": (edit_file(setitem(["aliases"], None)), "lacks a valid 'aliases'"),
    "future_file_format": (edit_file(setitem(["file_format_version"], 2)), "file format 2.*upgrade"),
    "future_csr_version": (edit_file(setitem(["modules", 0, "version"], 2)), "format version 2.*upgrade"),
    "unknown_format": (edit_file(setitem(["modules", 0, "format"], "coo")), "'coo', which this sparsenet cannot read"),
    "missing_tensor": (edit_file(drop("fc2.bias")), "missing from the file: fc2.bias"),
    "unexpected_tensor": (edit_file(add_extra), "not in the model: extra"),
    "wrong_dense_shape": (edit_file(reshape_norm), r"'norm.weight' has shape \(255,\)"),
    "wrong_int_dtype": (edit_file(retype("step", torch.int32)), "'step' is torch.int32, the model expects torch.int64"),
    "csr_col_out_of_range": (edit_file(col_out_of_range), r"'fc1'.*col_indices\[3\] = 1000 is out of range"),
    "csr_nan_value": (edit_file(nan_value), "'fc2'.*NaN/Inf"),
    "csr_crow_length": (edit_file(short_crow), r"'fc1'.*crow_indices has 256 entries"),
    "csr_crow_dtype": (edit_file(retype("fc1.crow_indices", torch.int32)), "'fc1'.*must be int64"),
    "csr_values_dtype": (edit_file(retype("fc1.values", torch.float64)), "'fc1'.*must be float32"),
    "csr_described_wrongly": (edit_file(describe_wrong_nnz), "is described as"),
    "sparse_modules_differ": (edit_file(setitem(["modules"], [])), "sparse modules"),
    "bad_alias": (edit_file(bad_alias), "invalid alias 'ghost'"),
    "bad_dtype_view": (edit_file(setitem(["dtype_views", "fc1.col_indices"], "uint7")), "invalid dtype view"),
    "checksums_incomplete": (edit_file(uncover_checksum, fix_checksums=False), "checksums do not list"),
    "checksum_mismatch": (edit_file(nan_value, fix_checksums=False), "fails its checksum"),
}


# A dense skeleton meets a few of these files at another check first.
DENSE_SKELETON_MATCH = {
    "sparse_modules_differ": "missing from the file: fc1.weight",
    "missing_tensor": "sparse layer 'fc2' has no bias in the file, but the model's Linear 'fc2' has one",
}


def unchanged(model):
    """``check = unchanged(model)``; ``check()`` asserts the model holds the same module objects under
    the same names and the same tensors as when ``unchanged`` was called."""
    modules, state = list(model.named_modules(remove_duplicate=False)), snapshot(model)

    def check():
        after = list(model.named_modules(remove_duplicate=False))
        assert [(n, id(m)) for n, m in after] == [(n, id(m)) for n, m in modules]
        assert same_tensors(state, snapshot(model))
    return check


@pytest.mark.parametrize("dense", [False, True], ids=["sparse_skeleton", "dense_skeleton"])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_and_leaves_skeleton_untouched(saved, tmp_path, case, dense):
    # With the dense skeleton the file is checked against a converted stand-in: nothing is swapped.
    _, good = saved
    make, match = BAD_FILES[case]
    bad = make(good, tmp_path / f"{case}.sn")
    skel = Net() if dense else sparse_net(seed=5, sparsity=0.5)
    check = unchanged(skel)
    with pytest.raises(ValueError, match=DENSE_SKELETON_MATCH.get(case, match) if dense else match):
        sio.load(bad, skel)
    check()


def test_wrong_architecture_skeleton(saved):
    _, path = saved
    skel = skeleton(hidden=128)
    before = snapshot(skel)
    with pytest.raises(ValueError, match="'fc1'"):
        sio.load(path, skel)
    assert same_tensors(before, snapshot(skel))


def test_read_metadata_rejects_bad_files(saved, tmp_path):
    _, good = saved
    with pytest.raises(ValueError, match="file format 2"):
        sio.read_metadata(rewrite(good, tmp_path / "f.sn", setitem(["file_format_version"], 2)))


# ---- loading into the plain dense model --------------------------------------------------------------

def test_dense_skeleton_gets_sparse_layers(saved):
    model, path = saved
    skel = Net()
    loaded = sio.load(path, skel)
    assert loaded is skel
    assert isinstance(loaded.fc1, SparseLinear) and isinstance(loaded.fc2, SparseLinear)
    assert isinstance(loaded.norm, nn.LayerNorm)
    assert same_tensors(snapshot(model), snapshot(loaded))
    x = torch.randn(5, 128)
    assert torch.equal(model(x), loaded(x))


def sparse_layer_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, SparseLinear))


def test_plain_mlp_round_trip(tmp_path):
    import sparsenet.nn as snn

    def mlp(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8, bias=False))

    model, _ = snn.sparsify(zero_linear_weights(mlp(0), 0.8, seed=0), min_sparsity=0.5)
    path = tmp_path / "mlp.sn"
    sio.save(model, path)
    fresh = mlp(1)
    loaded = sio.load(path, fresh)
    assert loaded is fresh and sparse_layer_names(loaded) == ["0", "2"] == sparse_layer_names(model)
    x = torch.randn(3, 32)
    torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


def test_single_linear_becomes_a_new_sparse_layer(tmp_path):
    torch.manual_seed(0)
    model, path = pruned(nn.Linear(16, 8), 0.7, seed=1), tmp_path / "one.sn"
    sio.save(model, path)
    dense = nn.Linear(16, 8)
    check = unchanged(dense)
    loaded = sio.load(path, dense)
    assert isinstance(loaded, SparseLinear) and same_tensors(snapshot(model), snapshot(loaded))
    check()  # as sparsify does for a lone Linear, the layer passed in is left as it was


class SharedParent(nn.Module):
    """One container, holding a Linear, registered under two names."""

    def __init__(self, layer):
        super().__init__()
        self.x = self.y = nn.Sequential(layer)


@pytest.mark.parametrize("wrap, names", [(SharedTwice, ("a", "b")), (SharedParent, ("x.0", "y.0"))])
def test_dense_layer_under_two_names_gets_one_sparse_layer(tmp_path, wrap, names):
    torch.manual_seed(0)
    model, path = wrap(pruned(nn.Linear(16, 8), 0.5, seed=3)), tmp_path / "shared.sn"
    sio.save(model, path)
    assert [m["name"] for m in sio.read_metadata(path)["modules"]] == [names[0]]
    loaded = sio.load(path, wrap(nn.Linear(16, 8)))
    first, second = (loaded.get_submodule(n) for n in names)
    assert isinstance(first, SparseLinear) and first is second
    assert same_tensors(snapshot(model), snapshot(loaded))


def test_dense_layer_under_two_names_in_a_file_of_two_layers_is_refused(tmp_path):
    # The file holds two different layers a and b; the model has one layer under both names.
    torch.manual_seed(0)
    model = nn.Module()
    model.a, model.b = pruned(nn.Linear(16, 8), 0.5, seed=3), pruned(nn.Linear(16, 8), 0.5, seed=4)
    path = tmp_path / "two.sn"
    sio.save(model, path)
    skel = SharedTwice(nn.Linear(16, 8))
    check = unchanged(skel)
    with pytest.raises(ValueError, match="sparse modules"):
        sio.load(path, skel)
    check()


def with_fc1(layer):
    net = Net()
    net.fc1 = layer
    return net


@pytest.mark.parametrize("make, match", [
    pytest.param(lambda: Net(hidden=128), "'fc1' is in_features=128, out_features=256 in the file, but the model's "
                 "Linear 'fc1' is in_features=128, out_features=128: a file loads into the model it was saved from, or "
                 "into the plain model built from the config it was shrunk from", id="shape"),
    pytest.param(lambda: with_fc1(nn.Linear(128, 256, bias=False)),
                 "sparse layer 'fc1' has a bias in the file, but the model's Linear 'fc1' has none", id="bias"),
    pytest.param(lambda: with_fc1(nn.Conv1d(128, 256, 1)), "the model's 'fc1' is a Conv1d: it must be an "
                 "nn.Linear, a transformers Conv1D or a SparseLinear", id="not_a_linear"),
    pytest.param(lambda: nn.Sequential(nn.Linear(128, 256)),
                 "holds a sparse layer 'fc1', but the model has no module 'fc1'", id="no_such_module"),
])
def test_dense_skeleton_that_cannot_take_the_file(saved, make, match):
    # fc2 could be converted in the first two cases: it is not, since fc1 cannot.
    _, path = saved
    skel = make()
    check = unchanged(skel)
    with pytest.raises(ValueError, match=match):
        sio.load(path, skel)
    check()


# ---- Hugging Face models built from their configs --------------------------------------------------

def bert_config():
    transformers = pytest.importorskip("transformers")
    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64)


def test_bert_round_trip_into_a_fresh_model(tmp_path):
    import sparsenet.nn as snn
    from transformers import BertModel

    torch.manual_seed(0)
    model, _ = snn.sparsify(zero_linear_weights(BertModel(bert_config()).eval(), 0.8, seed=0), min_sparsity=0.5)
    path = tmp_path / "bert.sn"
    sio.save(model, path)
    torch.manual_seed(1)
    fresh = BertModel(bert_config()).eval()
    loaded = sio.load(path, fresh)
    assert loaded is fresh
    assert len(sparse_layer_names(loaded)) == 2 * 6 + 1  # q, k, v, attention output, intermediate, output; pooler
    assert sparse_layer_names(loaded) == sparse_layer_names(model)
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"sparsenet\.save"):  # see sparsenet.nn.hf
        loaded.save_pretrained(tmp_path / "hf")


def sparse_as_linear(conv, seed):
    """A SparseLinear computing what the transformers Conv1D ``conv`` computes, with 70% of it zeroed."""
    return SparseLinear.from_dense(zero_linear_weights(as_linear(conv), 0.7, seed))


@pytest.mark.parametrize("head", [False, True], ids=["GPT2Model", "GPT2LMHeadModel"])
def test_gpt2_conv1d_round_trip_into_a_fresh_model(tmp_path, head):
    transformers = pytest.importorskip("transformers")
    from sparsenet._weights import is_conv1d

    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    cls = transformers.GPT2LMHeadModel if head else transformers.GPT2Model

    def gpt2(seed):
        torch.manual_seed(seed)
        return cls(config).eval()

    model = gpt2(0)
    blocks = model.transformer.h if head else model.h
    prefix = "transformer." if head else ""
    for i, block in enumerate(blocks):  # c_attn and c_fc sparse, c_proj left Conv1D
        block.attn.c_attn = sparse_as_linear(block.attn.c_attn, seed=2 * i)
        block.mlp.c_fc = sparse_as_linear(block.mlp.c_fc, seed=2 * i + 1)
    path = tmp_path / "gpt2.sn"
    sio.save(model, path)

    fresh = gpt2(1)
    loaded = sio.load(path, fresh)
    assert loaded is fresh
    assert sparse_layer_names(loaded) == sorted(
        f"{prefix}h.{i}.{layer}" for i in range(2) for layer in ("attn.c_attn", "mlp.c_fc"))
    conv = loaded.get_submodule(f"{prefix}h.0.attn.c_proj")
    assert is_conv1d(conv)
    if head:  # the tied output embedding stays tied
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 100, (2, 9))
    out = "logits" if head else "last_hidden_state"
    torch.testing.assert_close(getattr(loaded(input_ids=ids), out), getattr(model(input_ids=ids), out),
                               atol=1e-6, rtol=0)


def test_load_dense_keeps_the_models_own_layer_types(tmp_path):
    # For re-pruning or fine-tuning a saved sparse model: the weights land in the model's own
    # Linear / Conv1D layers (a Conv1D's transposed layout included), nothing becomes SparseLinear.
    transformers = pytest.importorskip("transformers")
    from sparsenet._weights import is_conv1d

    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    model.h[0].attn.c_attn = sparse_as_linear(model.h[0].attn.c_attn, seed=0)
    model.h[0].mlp.c_fc = sparse_as_linear(model.h[0].mlp.c_fc, seed=1)
    path = tmp_path / "gpt2.sn"
    sio.save(model, path)
    torch.manual_seed(1)
    fresh = transformers.GPT2Model(config).eval()
    assert sio.load_dense(path, fresh) is fresh and not sparse_layer_names(fresh)
    assert is_conv1d(fresh.h[0].attn.c_attn) and is_conv1d(fresh.h[0].mlp.c_fc)
    ids = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(fresh(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                               atol=1e-6, rtol=0)
    single = nn.Linear(8, 4)
    zero_linear_weights(single, 0.7, seed=2)
    sio.save(nn.Sequential(SparseLinear.from_dense(single)), tmp_path / "one.sn")
    target = nn.Sequential(nn.Linear(8, 4))
    assert sio.load_dense(tmp_path / "one.sn", target) is target and isinstance(target[0], nn.Linear)
    assert torch.equal(target[0].weight, single.weight)


@pytest.mark.parametrize("format", ["csr", "bitmap"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_sparse_layers_save_load_and_densify(tmp_path, format, dtype):
    # Half-precision values are for the CUDA kernels; a model holding them (e.g. model.half() before
    # .cuda()) still saves, loads (its sparse values in the file's precision) and densifies in its
    # own dtype.
    import sparsenet

    model = zero_linear_weights(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)), 0.7)
    sparse, _ = sparsenet.sparsify(model, format=format)
    half = sparse.to(dtype)
    path = tmp_path / "half.sparsenet"
    sparsenet.save(half, str(path))
    loaded = sparsenet.load(str(path), nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)))
    assert loaded[0].format == format and loaded[0].values.dtype == dtype
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded.float()(x), copy.deepcopy(half).float()(x))  # (.float() is in place)
    dense = sparsenet.densify(half)
    assert type(dense[0]) is nn.Linear and dense[0].weight.dtype == dtype
    torch.testing.assert_close(dense[0].weight, model[0].weight.detach().to(dtype))
