"""sparsify(format="auto"): each layer's format follows the measured times, which are cached on disk."""
import json

import pytest
import torch
from torch import nn

import sparsenet
from sparsenet.nn import SparseLinear, autoformat

MEASURED = autoformat.time_calls  # the real timer (tests/conftest.py puts a scripted one in for the suite)


def pruned(out_features, in_features, density, seed):
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(in_features, out_features)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(out_features, in_features, generator=g)
                           * (torch.rand(out_features, in_features, generator=g) < density))
    return layer


def model():
    return nn.Sequential(pruned(32, 48, 0.3, 0), nn.ReLU(), pruned(40, 32, 0.3, 1), nn.ReLU(), pruned(8, 40, 0.3, 2))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSENET_CACHE_DIR", str(tmp_path))
    return tmp_path


def scripted_timer(fastest_by_width):
    """A timer whose winner depends on the layer, recognised by its output width (each candidate
    computes the layer's output: the dense one is run once to see it)."""
    seen = []

    def timer(calls):
        width = calls["dense"]().shape[-1]
        seen.append(width)
        winner = fastest_by_width[width]
        return {name: (1.0 if name == winner else 3.0) for name in calls}

    timer.seen = seen
    return timer


def test_choices_follow_the_measured_times_and_are_cached(cache_dir, monkeypatch):
    timer = scripted_timer({32: "bitmap", 40: "dense", 8: "csr"})
    monkeypatch.setattr(autoformat, "time_calls", timer)
    dense = model()
    x = torch.randn(4, 48)
    with torch.no_grad():
        want = dense(x)
    sparse, report = sparsenet.sparsify(dense, format="auto", rows=4)  # (bitmap's own kernels on every ISA)
    assert sorted(timer.seen) == [8, 32, 40]
    assert isinstance(sparse[0], SparseLinear) and sparse[0].format == "bitmap"
    assert isinstance(sparse[2], nn.Linear) and not isinstance(sparse[2], SparseLinear)  # dense was fastest
    assert isinstance(sparse[4], SparseLinear) and sparse[4].format == "csr"
    rows = {r.name: r for r in report.rows}
    assert rows["0"].gain == pytest.approx(3.0) and rows["2"].gain == pytest.approx(1.0)
    assert "dense measured fastest at rows=4" in rows["2"].note and "gain" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)

    entries = json.loads((cache_dir / "format_timings.json").read_text())
    assert len(entries) == 3
    density = float((dense[0].weight != 0).float().mean())
    key = (f"{autoformat.cpu_model()}|32x48|{density:.2f}|rows=4|threads={torch.get_num_threads()}|bitmap+csr"
           f"|build={autoformat.build_tag()}")
    assert set(entries[key]) == {"dense", "csr", "bitmap"}  # BSR does not fit an unstructured weight

    def no_timing(calls):
        raise AssertionError("a cached layer must not be timed again")

    monkeypatch.setattr(autoformat, "time_calls", no_timing)
    again, report = sparsenet.sparsify(model(), format="auto", rows=4)
    assert [getattr(m, "format", "dense") for m in (again[0], again[2], again[4])] == ["bitmap", "dense", "csr"]
    assert all("(cached)" in r.note for r in report.rows if r.format != "dense")
    monkeypatch.setattr(autoformat, "time_calls", scripted_timer({32: "csr", 40: "csr", 8: "csr"}))
    other_rows, _ = sparsenet.sparsify(model(), format="auto", rows=64)  # another key: timed again
    assert other_rows[0].format == "csr"


def test_block_structured_weights_are_timed_with_bsr_too(cache_dir, monkeypatch):
    layer = pruned(32, 48, 1.0, 3)
    with torch.no_grad():  # 8x16 blocks, every other one kept: unstructured formats still apply
        layer.weight.mul_((torch.arange(4).view(4, 1) + torch.arange(3)).remainder(2).repeat_interleave(8, 0)
                          .repeat_interleave(16, 1).bool())
    timer = scripted_timer({32: "bsr"})
    monkeypatch.setattr(autoformat, "time_calls", timer)
    x = torch.randn(4, 48)
    with torch.no_grad():
        want = layer(x)
    calls = []
    monkeypatch.setattr(autoformat, "time_calls", lambda c: calls.append(sorted(c)) or timer(c))
    sparse, report = sparsenet.sparsify(nn.Sequential(layer), format="auto", rows=4)
    assert calls == [["bitmap", "bsr", "csr", "dense"]]
    assert sparse[0].format == "bsr" and sparse[0].to_packed().block == (8, 16)
    assert report.rows[0].format == "bsr"
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)


def two_four(out_features, in_features, seed):
    """A Linear whose weight keeps the 2 largest of every 4 (2:4)."""
    layer = pruned(out_features, in_features, 1.0, seed)
    with torch.no_grad():
        groups = layer.weight.abs().view(out_features, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
        layer.weight.mul_(keep.view(out_features, in_features))
    return layer


def test_formats_on_csr_kernels_at_these_rows_are_not_timed(cache_dir, monkeypatch, isa):
    """A format that at ``rows`` runs CSR's kernels over a structure derived from its own (N:M from 4
    rows, bitmap on AVX2 from 5) is not a candidate: it is CSR's speed on more bytes."""
    timed = []
    monkeypatch.setattr(autoformat, "time_calls", lambda c: timed.append(sorted(c)) or {n: 1.0 for n in c})
    for rows in (1, 3, 4, 5, 8):
        timed.clear()
        sparsenet.sparsify(nn.Sequential(two_four(16, 32, 5)), format="auto", rows=rows)
        want = ["csr", "dense"] + ["bitmap"] * (rows < 5 or isa != "avx2") + ["nm"] * (rows < 4)
        assert timed == [sorted(want)], rows
        assert [sparsenet._C.runs_csr_kernels(f, rows) for f in ("bitmap", "nm", "csr", "bsr")] == [
            "bitmap" not in want, "nm" not in want, False, False]


def test_real_timer_and_a_corrupt_cache(cache_dir, monkeypatch):
    monkeypatch.setattr(autoformat, "time_calls", MEASURED)
    (cache_dir / "format_timings.json").write_text("{not json")
    dense = model()
    x = torch.randn(3, 48)
    with torch.no_grad():
        want = dense(x)
    sparse, report = sparsenet.sparsify(dense, format="auto", rows=3)
    assert {r.format for r in report.rows} <= {"dense", "csr", "bitmap"} and all(r.gain for r in report.rows)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), want, rtol=1e-5, atol=1e-5)
    assert len(json.loads((cache_dir / "format_timings.json").read_text())) == 3  # rewritten whole


def test_bad_rows_and_min_sparsity_still_a_floor(cache_dir, monkeypatch):
    with pytest.raises(ValueError, match="rows must be a positive int"):
        sparsenet.sparsify(model(), format="auto", rows=0)
    timer = scripted_timer({32: "bitmap", 40: "bitmap", 8: "bitmap"})
    monkeypatch.setattr(autoformat, "time_calls", timer)
    _, report = sparsenet.sparsify(model(), format="auto", min_sparsity=0.9)
    assert timer.seen == [] and all(r.note == "below min_sparsity" for r in report.rows)
