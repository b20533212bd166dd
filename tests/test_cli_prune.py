"""``sparsenet prune``, run in-process: every kind of model source, calibration layouts, outputs, errors.

The factories live in this module and are passed as ``f"{__name__}:factory"``: pytest imports test
files under a name that depends on its import mode, and ``__name__`` is whatever it chose (the
module is already in ``sys.modules``, so the CLI's import finds this very module).
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsenet
from sparsenet import cli
from sparsenet.nn import SparseLinear


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # 8x8 in, 8x8 out: 64 positions per sample
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def factory() -> nn.Module:
    torch.manual_seed(0)
    return TinyNet()


def mlp_factory() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def not_a_module():
    return 42


FACTORY = f"{__name__}:factory"
MLP = f"{__name__}:mlp_factory"


def run(argv, capsys):
    code = cli.main(["prune", "--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def weight_sparsity(model: nn.Module) -> dict[str, float]:
    return {
        name: float((m.weight == 0).float().mean())
        for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    }


@pytest.fixture
def calib(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "calib.safetensors"
    save_file({"inputs": torch.randn(12, 3, 8, 8), "targets": torch.randint(0, 4, (12,))}, str(path))
    return path


def test_factory_magnitude_saves_a_loadable_pruned_model(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", FACTORY, "--sparsity", "0.5", "-o", out], capsys)
    assert code == 0, err
    model = sparsenet.load(out, factory())
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert int((m.weight == 0).sum()) == round(0.5 * m.weight.numel()), name
    # The report is printed; without calibration data FLOPs are per output position.
    assert "fc1" in stdout and "total" in stdout and "per output position" in stdout
    assert f"saved {out}" in stdout


def test_global_wanda_with_calib_reports_flops_per_sample(tmp_path, calib, capsys):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", FACTORY, "--sparsity", "0.8", "--criterion", "wanda",
                             "--scope", "global", "--exclude", "head", "--calib", calib,
                             "--calib-batch", "5", "-o", out], capsys)
    assert code == 0, err
    model = sparsenet.load(out, factory())
    layers = ["conv", "fc1", "fc2"]
    total = sum(getattr(model, n).weight.numel() for n in layers)
    zeros = sum(int((getattr(model, n).weight == 0).sum()) for n in layers)
    assert zeros == round(0.8 * total)
    assert int((model.head.weight == 0).sum()) == 0
    assert "per sample" in stdout
    # conv: 108 weights x 64 output positions x 2 FLOPs before pruning.
    assert "13.8k" in stdout


def test_taylor_and_sparsify(tmp_path, calib, capsys):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", FACTORY, "--sparsity", "0.9", "--criterion", "taylor", "--calib", calib,
                             "--sparsify", "-o", out], capsys)
    assert code == 0, err
    assert "sparsify" in stdout
    skeleton, _ = sparsenet.sparsify(sparsenet.prune(factory(), 0.9, progress=False).finalize())
    model = sparsenet.load(out, skeleton)
    assert isinstance(model.fc1, SparseLinear) and isinstance(model.head, SparseLinear)
    assert model.fc1.density == pytest.approx(0.1, abs=1 / model.fc1.in_features)


def test_sparsify_to_bitmap(tmp_path, capsys):
    out = tmp_path / "bitmap.sn"
    code, stdout, err = run(["--model", FACTORY, "--sparsity", "0.6", "--sparsify", "--format", "bitmap", "-o", out],
                            capsys)
    assert code == 0, err
    formats = {m["name"]: m["format"] for m in sparsenet.io.read_metadata(out)["modules"]}
    assert formats == {"conv": "csr", "fc1": "bitmap", "fc2": "bitmap", "head": "bitmap"}  # csr: the conv's one format
    model = sparsenet.load(out, factory())
    assert isinstance(model.fc1, SparseLinear) and model.fc1.format == "bitmap"
    assert isinstance(model.conv, sparsenet.SparseConv2d)


def test_pruned_in_blocks_and_sparsified_to_bsr(tmp_path, capsys):
    out = tmp_path / "bsr.sn"
    code, stdout, err = run(["--model", MLP, "--sparsity", "0.5", "--structure", "block", "--block", "4x8", "--sparsify",
                             "--format", "bsr", "-o", out], capsys)
    assert code == 0, err
    meta = sparsenet.io.read_metadata(out)["modules"]
    assert {m["format"] for m in meta} == {"bsr"} and meta[1]["block"] == [4, 8]  # (the 32 x 32 layer)
    model = sparsenet.load(out, mlp_factory())
    assert isinstance(model[0], SparseLinear) and model[0].format == "bsr"


def test_input_shape_times_the_convolution(tmp_path, capsys, monkeypatch):
    from sparsenet.nn import autoformat

    monkeypatch.setenv("SPARSENET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autoformat, "time_calls", lambda calls: {n: (1.0 if n != "dense" else 2.0) for n in calls})
    out = tmp_path / "auto.sn"
    code, stdout, err = run(["--model", FACTORY, "--sparsity", "0.8", "--sparsify", "--input-shape", "2,3,8,8",
                             "-o", out], capsys)
    assert code == 0, err
    assert "measured on 2x3x8x8" in stdout
    assert isinstance(sparsenet.load(out, factory()).conv, sparsenet.SparseConv2d)
    code, _, err = run(["--model", FACTORY, "--sparsity", "0.8", "--sparsify", "--input-shape", "2,3,9",
                        "-o", tmp_path / "bad.sn"], capsys)
    assert code != 0 and "example_inputs do not run through the model" in err
    assert not (tmp_path / "bad.sn").exists()


def test_sparsify_auto_times_each_layer(tmp_path, capsys, monkeypatch):
    from sparsenet.nn import autoformat

    monkeypatch.setenv("SPARSENET_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autoformat, "time_calls", lambda calls: {n: (1.0 if n == "bitmap" else 2.0) for n in calls})
    out = tmp_path / "auto.sn"
    code, stdout, err = run(["--model", FACTORY, "--sparsity", "0.6", "--sparsify", "--format", "auto", "--rows", "4",
                             "-o", out], capsys)
    assert code == 0, err
    assert "measured at rows=4" in stdout and "2.00x" in stdout
    assert {m["format"] for m in sparsenet.io.read_metadata(out)["modules"]} == {"bitmap"}


def test_keyword_calib_layout(tmp_path, capsys):
    # Any tensors besides "inputs" are keyword arguments: model(x=...).
    calib = tmp_path / "kw.safetensors"
    save_file({"x": torch.randn(6, 3, 8, 8)}, str(calib))
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", FACTORY, "--sparsity", "0.5", "--criterion", "wanda", "--calib", calib, "-o", out],
                       capsys)
    assert code == 0, err
    for name, s in weight_sparsity(sparsenet.load(out, factory())).items():
        assert s == pytest.approx(0.5, abs=0.01), name


def whole_tiles(w, r, c):
    """Every r x c tile is all zero or all non-zero (random weights are never exactly 0)."""
    zero = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).transpose(1, 2).reshape(-1, r * c).eq(0)
    return bool((zero.all(1) | ~zero.any(1)).all()) and bool(zero.any())


@pytest.mark.parametrize("extra, check", [
    (["--structure", "2:4"], lambda w: (w.reshape(-1, 4) != 0).sum(1).le(2).all()),
    (["--structure", "block", "--block", "4x8", "--sparsity", "0.5"], lambda w: whole_tiles(w, 4, 8)),
    (["--structure", "channel", "--sparsity", "0.25"], lambda w: int(w.eq(0).all(1).sum()) == round(w.shape[0] / 4)),
])
def test_structures(tmp_path, capsys, extra, check):
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", MLP, *extra, "-o", out], capsys)
    assert code == 0, err
    model = sparsenet.load(out, mlp_factory())
    for m in model:
        if isinstance(m, nn.Linear):
            assert check(m.weight), m


def test_weights_plain_state_dict_and_sparsenet_file(tmp_path, capsys):
    # Plain state_dict: the pruned model keeps exactly those weights where it keeps anything.
    torch.manual_seed(7)
    donor = TinyNet()
    plain = tmp_path / "plain.safetensors"
    save_file(donor.state_dict(), str(plain))
    first = tmp_path / "first.safetensors"
    code, _, err = run(["--model", FACTORY, "--weights", plain, "--sparsity", "0.5", "--sparsify", "-o", first],
                       capsys)
    assert code == 0, err
    # A sparsified sparsenet file as --weights: re-pruned further, saved dense.
    second = tmp_path / "second.safetensors"
    code, _, err = run(["--model", FACTORY, "--weights", first, "--sparsity", "0.75", "-o", second], capsys)
    assert code == 0, err
    model = sparsenet.load(second, factory())
    for name, s in weight_sparsity(model).items():
        assert s == pytest.approx(0.75, abs=0.01), name
        w, ref = model.get_submodule(name).weight, donor.get_submodule(name).weight
        assert torch.equal(w[w != 0], ref[w != 0])


# torch >= 2.10 deprecates TorchScript; the CLI still accepts the files people have.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_model(tmp_path, capsys):
    path = tmp_path / "mlp.pt"
    torch.jit.save(torch.jit.script(mlp_factory()), str(path))
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", path, "--sparsity", "0.5", "--exclude", "4", "-o", out], capsys)
    assert code == 0, err
    model = sparsenet.load(out, torch.jit.load(str(path)))
    ref = mlp_factory()
    for i, s in {"0": 0.5, "2": 0.5, "4": 0.0}.items():
        w = getattr(model, i).weight
        assert float((w == 0).float().mean()) == s
        # The kept weights are the largest ones (magnitude), unchanged.
        kept = w != 0
        assert torch.equal(w[kept], ref[int(i)].weight[kept])
        if s:
            assert w.abs()[kept].min() >= ref[int(i)].weight.abs()[~kept].max()
    code, _, err = run(["--model", path, "--sparsity", "0.5", "--criterion", "wanda", "--calib", path, "-o", out],
                       capsys)
    assert code == 1 and "TorchScript" in err


def test_pickle_needs_trust(tmp_path, capsys):
    path = tmp_path / "full.pt"
    torch.save(mlp_factory(), str(path))
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", path, "--sparsity", "0.5", "-o", out], capsys)
    assert code == 1 and "--trust-pickle" in err and not out.exists()
    code, _, err = run(["--model", path, "--trust-pickle", "--sparsity", "0.5", "-o", out], capsys)
    assert code == 0, err
    assert all(s == pytest.approx(0.5) for s in weight_sparsity(sparsenet.load(out, mlp_factory())).values())


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], "argument --sparsity: must be a number in [0, 1)"),
    (["--sparsity", "-0.5"], "argument --sparsity: must be a number in [0, 1)"),
    ([], "--sparsity is required for --structure unstructured"),
    (["--structure", "4:2"], "argument --structure: N:M needs 1 <= N < M, got '4:2'"),
    (["--structure", "2:x"], "argument --structure: must be unstructured, channel, block or N:M"),
    (["--structure", "2:4", "--sparsity", "0.9"], "fixes the sparsity at 0.5; --sparsity 0.9 conflicts"),
    (["--structure", "block", "--block", "4y4", "--sparsity", "0.5"], "argument --block: must be RxC"),
    (["--structure", "block", "--block", "0x4", "--sparsity", "0.5"], "argument --block: must be RxC"),
    (["--block", "4x4", "--sparsity", "0.5"], "--block applies only to --structure block"),
    (["--criterion", "wanda", "--sparsity", "0.5"], "--criterion wanda needs calibration data"),
    (["--criterion", "obs", "--sparsity", "0.5"], "argument --criterion: invalid choice: 'obs'"),
    (["--min-sparsity", "0.3", "--sparsity", "0.5"], "--min-sparsity applies only with --sparsify"),
    (["--format", "bitmap", "--sparsity", "0.5"], "--format applies only with --sparsify"),
    (["--format", "coo", "--sparsity", "0.5", "--sparsify"], "invalid choice: 'coo'"),
    (["--input-shape", "1,3,8,8", "--sparsity", "0.5"], "--input-shape applies only with --sparsify"),
    (["--input-shape", "1,x", "--sparsity", "0.5", "--sparsify"], "must be positive integers separated by commas"),
    (["--rows", "8", "--sparsity", "0.5"], "--rows applies only with --sparsify and --format auto"),
    (["--rows", "8", "--sparsity", "0.5", "--sparsify", "--format", "csr"], "--rows applies only with"),
])
def test_bad_options_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", MLP, *argv, "-o", out], capsys)
    assert code == 2 and message in err
    assert not out.exists()


@pytest.mark.parametrize("model, extra, message", [
    ("no_such_module_xyz:factory", [], "cannot import 'no_such_module_xyz'"),
    (f"{__name__}:missing", [], "has no callable 'missing'"),
    (f"{__name__}:not_a_module", [], "returned a int, not an nn.Module"),
    ("nonsense", [], "is neither a file nor pkg.module:factory"),
    (MLP, ["--weights", "missing.safetensors"], "no such file"),
    (MLP, ["--exclude", "nothing_like_this"], "exclude patterns match no module"),
    (MLP, ["--structure", "block", "--block", "3x3", "--sparsity", "0.5"], "block 3x3 does not tile"),
])
def test_runtime_errors_exit_1(tmp_path, capsys, model, extra, message):
    out = tmp_path / "out.safetensors"
    argv = ["--model", model, *extra, "-o", out]
    if "--sparsity" not in extra:
        argv += ["--sparsity", "0.5"]
    code, _, err = run(argv, capsys)
    assert code == 1 and message in err, err
    assert not out.exists()


def test_bad_weights_and_calib_files(tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    wrong = tmp_path / "wrong.safetensors"
    save_file({"other": torch.zeros(3)}, str(wrong))
    code, _, err = run(["--model", MLP, "--weights", wrong, "--sparsity", "0.5", "-o", out], capsys)
    assert code == 1 and "does not fit the model" in err
    ragged = tmp_path / "ragged.safetensors"
    save_file({"inputs": torch.randn(4, 16), "targets": torch.zeros(3, dtype=torch.long)}, str(ragged))
    code, _, err = run(["--model", MLP, "--sparsity", "0.5", "--criterion", "wanda", "--calib", ragged, "-o", out],
                       capsys)
    assert code == 1 and "same number of rows" in err
    wrong_shape = tmp_path / "wrong_shape.safetensors"
    save_file({"inputs": torch.randn(4, 5)}, str(wrong_shape))
    code, _, err = run(["--model", MLP, "--sparsity", "0.5", "--criterion", "wanda", "--calib", wrong_shape,
                        "-o", out], capsys)
    assert code == 1 and "error:" in err
    code, _, err = run(["--model", MLP, "--sparsity", "0.5", "-o", tmp_path / "nowhere" / "out.safetensors"], capsys)
    assert code == 1 and "does not exist" in err
    stray = tmp_path / "stray.safetensors"
    save_file({"inputs": torch.randn(4, 16), "mask": torch.ones(4)}, str(stray))
    code, _, err = run(["--model", MLP, "--sparsity", "0.5", "--criterion", "wanda", "--calib", stray, "-o", out],
                       capsys)
    assert code == 1 and "only 'targets' is allowed" in err
    assert not out.exists()


def test_file_model_from_path(tmp_path, capsys, monkeypatch):
    src = tmp_path / "my_model.py"
    src.write_text("import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(8, 8))\n")
    out = tmp_path / "out.safetensors"
    code, _, err = run(["--model", f"{src}:build", "--sparsity", "0.25", "-o", out], capsys)
    assert code == 0, err
    # pkg.module:factory resolves against the working directory too, as `python -m` would.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    code, _, err = run(["--model", "my_model:build", "--sparsity", "0.25", "-o", out], capsys)
    assert code == 0, err


def raises_in_factory():
    raise KeyError("no weights here")


def needs_arguments(width):
    return nn.Linear(width, width)


def one_error_line(code, err, message, command="prune"):
    assert code == 1 and err.startswith(f"sparsenet {command}: error: ") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("model, message", [
    ("../../etc/passwd:make", "is neither a file nor pkg.module:factory"),
    (".mod:make", "is neither a file nor pkg.module:factory"),
    (f"{__name__}:raises_in_factory", "the factory raised KeyError: 'no weights here'"),
    (f"{__name__}:needs_arguments", "the factory raised TypeError: needs_arguments() missing 1 required"),
    ("builtins:exit", "the factory called exit()"),
])
def test_model_code_failures_are_one_error_line(tmp_path, capsys, model, message):
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", model, "--sparsity", "0.5", "-o", out], capsys)
    one_error_line(code, err, message)
    assert not out.exists()


@pytest.mark.parametrize("source, message", [
    ("def build(:\n", "importing '{path}' raised SyntaxError"),
    ("import torch\nraise RuntimeError('no GPU here')\n", "importing '{path}' raised RuntimeError: no GPU here"),
    ("raise SystemExit(3)\n", "importing '{path}' called exit(3)"),
    ("import no_such_module_xyz\n", "cannot import '{path}'"),
])
def test_model_file_failing_to_import_is_one_error_line(tmp_path, capsys, source, message):
    path = tmp_path / "model.py"
    path.write_text(source)
    code, _, err = run(["--model", f"{path}:build", "--sparsity", "0.5", "-o", tmp_path / "out.sn"], capsys)
    one_error_line(code, err, message.format(path=path))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch >= 2.10 deprecates torch.jit.load
def test_zip_posing_as_torchscript(tmp_path, capsys):
    import zipfile

    path = tmp_path / "fake.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x/code/", "")
        z.writestr("x/constants.pkl", b"not a pickle")
    code, _, err = run(["--model", path, "--sparsity", "0.5", "-o", tmp_path / "out.sn"], capsys)
    one_error_line(code, err, f"cannot load '{path}' as TorchScript")


def test_output_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    folder, plain, fifo = tmp_path / "folder", tmp_path / "plain.txt", tmp_path / "pipe"
    folder.mkdir()
    plain.write_text("a file, not a folder")
    os.mkfifo(fifo)
    for out, message in ((folder, "it is a directory, not a regular file"), (fifo, "it is a FIFO"),
                         (plain / "out.sn", f"folder '{plain}' is not a folder")):
        code, stdout, err = run(["--model", MLP, "--sparsity", "0.5", "-o", out], capsys)
        one_error_line(code, err, message)
        assert stdout == ""  # refused before the model was even built
    assert list(folder.iterdir()) == [] and plain.read_text() == "a file, not a folder"
    # What the checks cannot foresee (a read-only mount, a full disk) surfaces when writing.
    def no_space(model, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(sparsenet, "save", no_space)
    code, _, err = run(["--model", MLP, "--sparsity", "0.5", "-o", tmp_path / "out.sn"], capsys)
    one_error_line(code, err, "No space left on device")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_read_only_folder(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run(["--model", MLP, "--sparsity", "0.5", "-o", locked / "out.sn"], capsys)
    finally:
        locked.chmod(0o755)
    one_error_line(code, err, "is not writable")


FAILING_FORWARD = """
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(192, 4)

    def forward(self, x):
        {body}


def build():
    return Net()
"""


@pytest.mark.parametrize("body, message", [
    ("raise KeyError('labels')", "the model's forward raised KeyError: 'labels'"),
    ("exit(4)", "the model's forward called exit(4)"),
])
def test_model_forward_failing_is_one_error_line(tmp_path, calib, capsys, body, message):
    path = tmp_path / "net.py"
    path.write_text(FAILING_FORWARD.format(body=body))
    out = tmp_path / "out.sn"
    code, _, err = run(["--model", f"{path}:build", "--sparsity", "0.5", "--criterion", "wanda",
                        "--calib", calib, "-o", out], capsys)
    one_error_line(code, err, message)
    assert not out.exists()


# ---- Hugging Face models; progress bars ---------------------------------------------------------------

def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=32, architectures=["BertModel"])


@pytest.mark.parametrize("with_weights", [False, True])
def test_hugging_face_directory(tmp_path, capsys, with_weights):
    from transformers import BertModel

    torch.manual_seed(0)
    folder = tmp_path / "bert"
    original = BertModel(tiny_bert_config())
    if with_weights:
        original.save_pretrained(folder)
    else:
        tiny_bert_config().save_pretrained(folder)
    out = tmp_path / "out.safetensors"
    code, stdout, err = run(["--model", f"hf:{folder}", "--sparsity", "0.5", "-o", out], capsys)
    assert code == 0, err
    pruned = sparsenet.load(out, BertModel(tiny_bert_config()))
    w = pruned.encoder.layer[0].intermediate.dense.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    if with_weights:  # the directory's weights were the ones pruned
        kept = w != 0
        assert torch.equal(w[kept], original.encoder.layer[0].intermediate.dense.weight[kept])


def test_hugging_face_spec_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for spec, message in ((f"hf:{tmp_path / 'empty'}", "has no config.json"),
                          ("hf:NoSuchModelClass", "neither a directory nor a transformers model class")):
        code, _, err = run(["--model", spec, "--sparsity", "0.5", "-o", tmp_path / "o.sn"], capsys)
        one_error_line(code, err, message)


def test_no_progress_bars_in_a_redirected_stderr(tmp_path, capsys):
    # capsys stands for a redirected stderr (not a terminal): bars would only fill a log with \r-lines.
    code, _, err = run_with_progress(["--model", FACTORY, "--sparsity", "0.5", "-o", tmp_path / "o.sn"], capsys)
    assert code == 0 and "\r" not in err and "it/s" not in err and "%|" not in err, err


def run_with_progress(argv, capsys):
    code = cli.main(["prune", *map(str, argv)])  # no --no-progress
    out = capsys.readouterr()
    return code, out.out, out.err
