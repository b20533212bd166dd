"""Native sparse convolution kernels against a float64 dense reference (torch's conv2d in float64),
on every ISA this CPU runs: strides, paddings, dilations, groups, odd sizes, batch 0 and 1, both
kernels (stride-1 direct and the panel one), and the handle's validation of what it is handed."""
import random

import pytest
import torch
import torch.nn.functional as F

from sparsenet import _C
from sparsenet._machine import last_level_cache_bytes
from sparsenet.formats import PackedCSR

# (in, out, kernel, stride, padding, dilation, groups, height, width)
CASES = [
    (3, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, 9, 11),
    (8, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2, 13, 7),
    (4, 4, (1, 1), (1, 1), (0, 0), (1, 1), 1, 5, 5),  # pointwise: read in place, one masked tile
    (8, 6, (1, 1), (1, 1), (0, 0), (1, 1), 2, 9, 15),  # in place, groups, several tiles
    (6, 9, (5, 5), (1, 1), (2, 2), (2, 2), 3, 10, 17),
    (5, 7, (2, 3), (3, 2), (0, 1), (1, 1), 1, 8, 9),
    (16, 32, (3, 3), (1, 1), (1, 1), (1, 1), 1, 20, 20),  # tiles spanning output rows, several per image
    (4, 8, (3, 1), (1, 1), (1, 0), (1, 3), 4, 6, 31),
    (2, 3, (7, 7), (2, 2), (3, 3), (1, 1), 1, 7, 7),
    (3, 5, (3, 3), (1, 1), (0, 0), (1, 1), 1, 3, 3),  # one output pixel
    (70, 3, (1, 1), (1, 2), (0, 0), (1, 1), 1, 1, 130),  # a wide row, stride only along it
    (20, 12, (1, 1), (1, 1), (0, 0), (1, 1), 1, 16, 16),  # pointwise, planes a multiple of the tile
    (12, 10, (1, 1), (1, 1), (0, 0), (1, 1), 2, 4, 12),  # planes of 48: one full tile, one masked
    (6, 10, (1, 1), (1, 1), (0, 0), (1, 1), 1, 7, 7),  # pointwise, 49 pixels: tiles run on into the next image
    (5, 9, (1, 1), (1, 1), (0, 0), (1, 1), 1, 6, 11),  # 66 pixels: a tile ends two pixels into an image
    (3, 4, (3, 5), (1, 1), (1, 2), (1, 1), 1, 7, 9),  # stride 1, read in place with lane masks per tap
    (3, 4, (3, 3), (1, 1), (1, 1), (1, 1), 1, 5, 80),  # rows wider than two tiles: taps with every lane inside
    (4, 6, (3, 3), (1, 1), (2, 2), (1, 1), 1, 5, 6),  # stride 1, output wider than the input: planes
    (5, 4, (1, 1), (1, 1), (1, 1), (1, 1), 1, 4, 5),  # 1 x 1 with padding: planes
    (2, 3, (9, 9), (1, 1), (4, 4), (1, 1), 1, 12, 10),  # 81 taps, more than the masks kept: planes
]


def native_conv(w, stride, padding, dilation, groups):
    """The native convolution by w (one handle, made once), as a function of (x, bias, out) that
    writes into out and returns it."""
    cout, cin_g, kh, kw = w.shape
    p = PackedCSR.from_dense(w.reshape(cout, -1))
    h = _C.CsrHandle(cout, cin_g * kh * kw, p.crow_indices.numpy(), p.col_indices.numpy(), p.values.numpy())
    geometry = [kh, kw, *stride, *padding, *dilation, groups]

    def conv(x, bias, out):
        h.conv2d(p.values.numpy(), x.numpy(), out.numpy(), None if bias is None else bias.numpy(), geometry)
        return out
    return conv


def run(w, x, bias, stride, padding, dilation, groups):
    ref = F.conv2d(x.double(), w.double(), None if bias is None else bias.double(), stride, padding, dilation, groups)
    out = native_conv(w, stride, padding, dilation, groups)(x, bias, torch.full(ref.shape, float("nan")))
    return out, ref


def assert_close(out, ref):
    scale = ref.abs().max().clamp_min(1.0) if ref.numel() else 1.0
    assert out.shape == ref.shape
    if ref.numel():
        assert ((out.double() - ref).abs().max() / scale) < 1e-5


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, (c[0], c[1], *c[2], *c[3], c[6], c[7], c[8]))))
def test_every_geometry(isa, one_thread, case):
    cin, cout, k, stride, padding, dilation, groups, h, w_ = case
    g = torch.Generator().manual_seed(cin + cout)
    for density in (0.0, 0.3, 1.0):
        w = torch.randn(cout, cin // groups, *k, generator=g) * (torch.rand(cout, cin // groups, *k, generator=g) < density)
        bias = torch.randn(cout, generator=g)
        for batch in (0, 1, 3):
            x = torch.randn(batch, cin, h, w_, generator=g)
            assert_close(*run(w, x, bias if density else None, stride, padding, dilation, groups))


def test_large_and_threaded(isa, two_threads):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(48, 32, 3, 3, generator=g) * (torch.rand(48, 32, 3, 3, generator=g) < 0.3)
    for x, stride in ((torch.randn(2, 32, 30, 30, generator=g), (1, 1)), (torch.randn(1, 32, 7, 7, generator=g), (1, 1)),
                      (torch.randn(2, 32, 30, 30, generator=g), (2, 2))):
        assert_close(*run(w, x, torch.randn(48, generator=g), stride, (1, 1), (1, 1), 1))


def rows_sharing_columns(cout, cin_g, k, runs, density, g):
    """A (cout, cin_g, *k) weight whose output channels come in runs (lengths cycled from `runs`)
    that store the same columns with different values, as block pruning along the output channels
    leaves them."""
    keep = torch.empty(cout, cin_g * k[0] * k[1], dtype=torch.bool)
    r, i = 0, 0
    while r < cout:
        n = min(runs[i % len(runs)], cout - r)
        keep[r:r + n] = torch.rand(cin_g * k[0] * k[1], generator=g) < density
        r, i = r + n, i + 1
    return (torch.randn(cout, cin_g * k[0] * k[1], generator=g) * keep).reshape(cout, cin_g, *k)


@pytest.mark.parametrize("runs", [(4,), (2,), (3, 1, 6, 5), (1, 2, 4, 7)])
def test_rows_storing_the_same_columns_run_together(isa, two_threads, runs):
    # Runs of every length, cut by the channel chunks of an item (260 channels: 3 chunks) and by
    # groups; empty runs; 1x1 and 3x3, stride 1 and 2; a pointwise weight of one block, whose items
    # take more than 128 channels (150 on two threads: their sums go straight to the output).
    g = torch.Generator().manual_seed(sum(runs))
    for cin, cout, k, stride, groups, size in ((16, 260, (3, 3), (1, 1), 1, 9), (12, 18, (3, 3), (2, 2), 3, 11),
                                               (24, 40, (1, 1), (1, 1), 2, 13), (16, 300, (1, 1), (1, 1), 1, 7)):
        for density in (0.0, 0.3, 1.0):
            w = rows_sharing_columns(cout, cin // groups, k, runs, density, g)
            x = torch.randn(2, cin, size, size, generator=g)
            padding = (k[0] // 2, k[1] // 2)
            assert_close(*run(w, x, torch.randn(cout, generator=g), stride, padding, (1, 1), groups))


@pytest.mark.parametrize("batch, size, stride", [(3, 6, 1), (1, 8, 1), (3, 12, 2), (1, 15, 2)])
def test_threads_runs_cut_images_and_tiles(isa, two_threads, batch, size, stride):
    # At stride 2 each thread copies the planes its run of tiles reads into its own scratch and may
    # take the other thread's leftovers: runs that end inside an image (batch 3: 18 items, cut at
    # image 1's second tile) and inside a tile's channel chunks (260 channels: 3 chunks; batch 1: 9
    # items, cut in tile 1). At stride 1 (read in place) the threads share one run. All against float64.
    g = torch.Generator().manual_seed(batch * size)
    for density in (0.3, 1.0):
        w = torch.randn(260, 8, 3, 3, generator=g) * (torch.rand(260, 8, 3, 3, generator=g) < density)
        x = torch.randn(batch, 8, size, size, generator=g)
        assert_close(*run(w, x, torch.randn(260, generator=g), (stride, stride), (1, 1), (1, 1), 1))


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_inputs_follow_dense_semantics(isa, bad, stride):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(6, 4, 3, 3, generator=g) * (torch.rand(6, 4, 3, 3, generator=g) < 0.5)
    w[2] = 0  # an output channel storing nothing
    x = torch.randn(2, 4, 8, 9, generator=g)
    x[0, 1, 3, 4] = bad
    x[1, 3, 0, 8] = bad  # at an edge, next to the padding
    out, _ = run(w, x, None, stride, (1, 1), (1, 1), 1)
    want = F.conv2d(x.double(), w.double(), None, stride, (1, 1))
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(torch.isinf(out), torch.isinf(want))
    finite = torch.isfinite(want)
    assert torch.allclose(out.double()[finite], want[finite], atol=1e-5)


# The SIMD kernels check the inputs for Inf and NaN as they load them (into the phase planes, or
# into a tile's packed slots where a convolution reads its input in place) instead of scanning them
# afterwards: every input position some output reads must be seen. One non-finite value per call
# (one value seen anywhere sends the whole call down the exact path, which would hide a position
# missed elsewhere in it), at up to 48 positions (all of them for small inputs), in every geometry,
# against dense semantics.
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, (c[0], c[1], *c[2], *c[3], c[6], c[7], c[8]))))
def test_every_input_position_is_checked(isa, threads, case):
    cin, cout, k, stride, padding, dilation, groups, h, w_ = case
    g = torch.Generator().manual_seed(7 + cin * cout)
    w = torch.randn(cout, cin // groups, *k, generator=g) * (torch.rand(cout, cin // groups, *k, generator=g) < 0.5)
    conv = native_conv(w, stride, padding, dilation, groups)
    x = torch.randn(1, cin, h, w_, generator=g)
    nan_wanted = False
    for i, at in enumerate(torch.randperm(cin * h * w_, generator=g)[:48].tolist()):
        bad = x.clone()
        bad.view(-1)[at] = float("nan") if i % 2 else float("inf")
        want = F.conv2d(bad.double(), w.double(), None, stride, padding, dilation, groups)
        nan_wanted |= bool(torch.isnan(want).any())
        out = conv(bad, None, torch.full(want.shape, 7.0))  # (not NaN: an unwritten output must not pass)
        assert torch.equal(torch.isnan(out), torch.isnan(want)), f"input position {at}"
        assert torch.equal(torch.isinf(out), torch.isinf(want)), f"input position {at}"
        finite = torch.isfinite(want)
        assert torch.allclose(out.double()[finite], want[finite], atol=1e-4)
    assert nan_wanted


# A weight of over 32K stored values on an image of few tiles (3 here): the kernel then asks for
# each row's weights of a block 8 rows ahead, wrapping into the next block at a chunk's last rows.
# Prefetches change no result, so what this pins is the answer on that path (three blocks, three
# channel chunks), and that its look-ahead reads of the block starts stay in bounds (no crash).
@pytest.mark.parametrize("batch", [1, 2])
def test_large_weight_on_few_tiles(isa, threads, batch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 128, 3, 3, generator=g) * (torch.rand(96, 128, 3, 3, generator=g) < 0.4)
    assert int((w != 0).sum()) >= 32768
    x = torch.randn(batch, 128, 8, 8, generator=g)
    assert_close(*run(w, x, torch.randn(96, generator=g), (1, 1), (1, 1), (1, 1), 1))


# Weights of 576 columns run in blocks of 512 (64 KB of packed slots) below 25% density and of 256
# above (planner.h): both, each with a last, partial block.
@pytest.mark.parametrize("density", [0.1, 0.4])
def test_blocks_of_either_size(isa, threads, density):
    g = torch.Generator().manual_seed(9)
    w = torch.randn(40, 64, 3, 3, generator=g) * (torch.rand(40, 64, 3, 3, generator=g) < density)
    x = torch.randn(2, 64, 10, 10, generator=g)
    assert_close(*run(w, x, torch.randn(40, generator=g), (1, 1), (1, 1), (1, 1), 1))


# 2 x 16 x 64 x 64 inputs: past the size where the scan for non-finite inputs is split between the
# threads (at image 1). A value at each end of each thread's share must be found.
@pytest.mark.parametrize("at", [(0, 0, 0, 0), (0, 15, 63, 63), (1, 0, 0, 0), (1, 15, 63, 63)], ids=str)
def test_a_large_input_is_scanned_whole(two_threads, at):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 16, 3, 3, generator=g) * (torch.rand(4, 16, 3, 3, generator=g) < 0.3)
    x = torch.randn(2, 16, 64, 64, generator=g)
    x[at] = float("nan")
    out, want = run(w, x, None, (1, 1), (1, 1), (1, 1), 1)
    assert torch.isnan(want[at[0]]).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    finite = torch.isfinite(want)
    assert torch.allclose(out.double()[finite], want[finite], atol=1e-5)


def test_the_handle_refuses_what_does_not_fit():
    w = torch.randn(6, 4, 3, 3)
    p = PackedCSR.from_dense(w.reshape(6, -1))
    h = _C.CsrHandle(6, 36, p.crow_indices.numpy(), p.col_indices.numpy(), p.values.numpy())
    x = torch.randn(1, 4, 8, 8)
    out = torch.empty(1, 6, 8, 8)
    geometry = [3, 3, 1, 1, 1, 1, 1, 1, 1]
    vals = p.values.numpy()
    with pytest.raises(ValueError, match="columns, expected"):
        h.conv2d(vals, torch.randn(1, 5, 8, 8).numpy(), out.numpy(), None, geometry)
    with pytest.raises(ValueError, match="divisible by groups"):
        h.conv2d(vals, x.numpy(), out.numpy(), None, [3, 3, 1, 1, 1, 1, 1, 1, 3])
    with pytest.raises(ValueError, match="out must have shape"):
        h.conv2d(vals, x.numpy(), torch.empty(1, 6, 7, 8).numpy(), None, geometry)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        h.conv2d(vals, torch.randn(1, 4, 1, 1).numpy(), torch.empty(1, 6, 1, 1).numpy(), None, [3, 3, 1, 1, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="must be positive"):
        h.conv2d(vals, x.numpy(), out.numpy(), None, [3, 3, 0, 1, 1, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="contiguous"):
        h.conv2d(vals, x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).numpy(), out.numpy(), None, geometry)
    with pytest.raises(ValueError, match="must be 4-D"):
        h.conv2d(vals, x[0].numpy(), out.numpy(), None, geometry)
    with pytest.raises(ValueError, match="geometry must be"):
        h.conv2d(vals, x.numpy(), out.numpy(), None, geometry[:-1])
    with pytest.raises(ValueError, match="values has"):
        h.conv2d(vals[:-1], x.numpy(), out.numpy(), None, geometry)
    both = torch.empty(2, 6, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        h.conv2d(vals, both[:1, :4].numpy(), both[:1].numpy(), None, geometry)



# Outputs past a third of the last-level cache are written with streaming stores where a tile's
# outputs fill whole lines, and pointwise layers whose input is past a quarter of it ask for their
# input ahead (planner.h); a cache of 3 bytes here sends every layer both ways: pointwise planes of
# whole lines (16 x 16) and of part lines (14 x 14: tiles across images, some rows' runs unaligned;
# the last tiles' look-ahead past the input), a weight of several blocks (the sums written from
# memory), stride 2 (phase planes), bias or none, against the float64 reference.
@pytest.fixture
def tiny_cache():
    before = _C.set_last_level_cache_bytes(3)
    yield
    _C.set_last_level_cache_bytes(before)


@pytest.mark.parametrize("case", [(24, 40, 1, 1, 0, 16), (24, 40, 1, 1, 0, 14), (64, 24, 3, 1, 1, 16),
                                  (16, 24, 1, 2, 0, 64)], ids=lambda c: "x".join(map(str, c)))
def test_streamed_outputs_and_input_ahead(isa, threads, tiny_cache, case):
    cin, cout, k, stride, pad, size = case
    g = torch.Generator().manual_seed(cin * cout + size)
    w = torch.randn(cout, cin, k, k, generator=g) * (torch.rand(cout, cin, k, k, generator=g) < 0.3)
    for batch, bias in ((1, torch.randn(cout, generator=g)), (3, None)):
        x = torch.randn(batch, cin, size, size, generator=g)
        assert_close(*run(w, x, bias, (stride, stride), (pad, pad), (1, 1), 1))


def test_the_kernels_plan_by_the_machine_s_cache():
    assert _C.last_level_cache_bytes() == last_level_cache_bytes()


# Geometries drawn at random (seeded): combinations the hand-picked cases above do not name (groups
# with stride 3 and dilation, rectangular kernels on odd images, batch 0 to 5), each with the machine's
# cache size or a 3-byte one (every output streamed, every pointwise input looked ahead).
@pytest.mark.parametrize("seed", [0, 1])
def test_random_geometries(isa, threads, seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    cache = _C.last_level_cache_bytes()
    drawn = 0
    try:
        for _ in range(30):
            groups = rng.choice([1, 1, 2, 3])
            cin, cout = groups * rng.randint(1, 12), groups * rng.randint(1, 24)
            kh, kw = rng.choice([(1, 1), (1, 1), (3, 3), (3, 3), (5, 5), (1, 3), (3, 2)])
            stride = (rng.choice([1, 1, 2, 3]), rng.choice([1, 1, 2]))
            padding = (rng.randint(0, kh // 2 + 1), rng.randint(0, kw // 2 + 1))
            dilation = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
            h, w_ = rng.randint(1, 24), rng.randint(1, 24)
            if h + 2 * padding[0] < dilation[0] * (kh - 1) + 1 or w_ + 2 * padding[1] < dilation[1] * (kw - 1) + 1:
                continue
            density = rng.choice([0.0, 0.1, 0.3, 1.0, rng.random()])
            w = torch.randn(cout, cin // groups, kh, kw, generator=g)
            w *= torch.rand(w.shape, generator=g) < density
            bias = torch.randn(cout, generator=g) if rng.random() < 0.5 else None
            x = torch.randn(rng.choice([0, 1, 1, 2, 5]), cin, h, w_, generator=g)
            _C.set_last_level_cache_bytes(3 if rng.random() < 0.5 else cache)
            assert_close(*run(w, x, bias, stride, padding, dilation, groups))
            drawn += 1
    finally:
        _C.set_last_level_cache_bytes(cache)
    assert drawn >= 20  # (draws the kernel's reach exceeds are skipped)
