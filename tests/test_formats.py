"""Storage formats and FLOPs (sparsity_lib.formats) against costs counted by hand, Monte Carlo averages,
closed-form break-even points and torch's own FLOP counter."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

import sparsity_lib as sl
from sparsity_lib import formats as fm

# The example vector of survey Fig. 5: 12 entries, nonzeros at positions 1, 4, 5, 11.
FIG5 = torch.tensor([0, 2, 0, 0, 3, 4, 0, 0, 0, 0, 0, 5])

# A 3 x 4 matrix, nonzeros at (0,0), (0,3), (2,1), (2,2): flat positions 0, 3, 9, 10.
SMALL = torch.tensor([[1, 0, 0, 2],
                      [0, 0, 0, 0],
                      [0, 3, 4, 0]])


# ------------------------------------------------------------------------------------ hand-counted costs
def test_index_bits():
    assert [fm.index_bits(c) for c in (1, 2, 3, 4, 5, 12, 300, 1024, 1025)] == [0, 1, 2, 2, 3, 4, 9, 10, 11]
    with pytest.raises(ValueError):
        fm.index_bits(0)


def test_survey_fig5_vector_by_hand():
    k = 8
    cost = {f: fm.storage_bits(FIG5, f, value_bits=k) for f in fm.FORMATS if f != "bsr"}
    assert cost["dense"] == 12 * 8                       # 96
    assert cost["bitmap"] == 12 + 4 * 8                  # 44
    assert cost["coo"] == 4 * (8 + 0 + 4)                # one row: no row bits, ceil(log2 12) = 4 column bits
    assert cost["csr"] == 4 * (8 + 4) + 2 * 3            # 2 row pointers of ceil(log2 5) = 3 bits
    assert cost["ell"] == 1 * 4 * (8 + 4)                # one row of 4
    # delta: gaps 2, 3, 1, 6. b=3 (gaps up to 8) needs no padding: 4 entries of 11 bits = 44, the best width
    assert cost["delta"] == 4 * (8 + 3)
    assert fm.best_delta_bits(FIG5, value_bits=8) == 3
    # bsr with 1 x 4 blocks: all three blocks hold a nonzero; 2-bit block-column index, 2 pointers of 2 bits
    assert fm.storage_bits(FIG5, "bsr", value_bits=8, block=(1, 4)) == 3 * (4 * 8 + 2) + 2 * 2


def test_delta_padding_by_hand():
    # b = 2 bits holds gaps up to 4; the gap of 6 (position 5 -> 11) needs one padding zero (at position 9)
    assert fm.storage_bits(FIG5, "delta", value_bits=8, delta_bits=2) == 5 * (8 + 2)
    # b = 1 holds gaps up to 2: ceil(2/2) + ceil(3/2) + ceil(1/2) + ceil(6/2) = 1 + 2 + 1 + 3 = 7 entries
    assert fm.storage_bits(FIG5, "delta", value_bits=8, delta_bits=1) == 7 * (8 + 1)
    # one nonzero far away: position 100 with 3-bit fields (gaps up to 8): ceil(101 / 8) = 13 entries
    far = torch.zeros(128, dtype=torch.bool)
    far[100] = True
    assert fm.storage_bits(far, "delta", value_bits=4, delta_bits=3) == 13 * (4 + 3)
    # a gap of exactly 2^b needs no padding, one more does
    v = torch.zeros(20, dtype=torch.bool)
    v[[0, 8]] = True            # gaps 1 and 8
    assert fm.storage_bits(v, "delta", value_bits=4, delta_bits=3) == 2 * 7
    v[8], v[9] = False, True    # gaps 1 and 9
    assert fm.storage_bits(v, "delta", value_bits=4, delta_bits=3) == 3 * 7


def test_small_matrix_by_hand():
    k = 16
    cost = {f: fm.storage_bits(SMALL, f, value_bits=k, block=(2, 2)) for f in fm.FORMATS}
    assert cost["dense"] == 12 * 16                      # 192
    assert cost["bitmap"] == 12 + 4 * 16                 # 76
    assert cost["coo"] == 4 * (16 + 2 + 2)               # row in 3 values: 2 bits; column in 4: 2 bits
    assert cost["csr"] == 4 * (16 + 2) + 4 * 3           # 4 pointers (0, 2, 2, 4) of ceil(log2 5) = 3 bits
    # flat positions 0, 3, 9, 10 -> gaps 1, 3, 6, 1; b=3 needs no padding: 4 * 19 = 76 (b=2: 5 * 18 = 90)
    assert cost["delta"] == 4 * (16 + 3)
    assert fm.storage_bits(SMALL, "delta", value_bits=k, delta_bits=2) == 5 * (16 + 2)
    assert cost["ell"] == 3 * 2 * (16 + 2)               # every row padded to the longest (2)
    # 2x2 blocks on the matrix padded to 4x4: all four blocks hold a nonzero; 1-bit block column; 3 pointers
    assert cost["bsr"] == 4 * (4 * 16 + 1) + 3 * 3
    # fixed 8-bit indices and pointers, as a library would store them
    assert fm.storage_bits(SMALL, "coo", value_bits=k, index_bits=8) == 4 * (16 + 8 + 8)
    assert fm.storage_bits(SMALL, "csr", value_bits=k, index_bits=8) == 4 * (16 + 8) + 4 * 8
    assert fm.storage_bits(SMALL, "ell", value_bits=k, index_bits=8) == 3 * 2 * (16 + 8)
    # a mask gives the same cost as the weight it describes
    assert fm.storage_bits(SMALL != 0, "csr", value_bits=k) == cost["csr"]
    assert fm.storage_bits((SMALL != 0).numpy(), "delta", value_bits=k) == cost["delta"]


def test_convolution_is_stored_as_out_by_fan_in():
    assert fm.as_matrix_shape((8, 3, 3, 3)) == (8, 27)
    assert fm.as_matrix_shape((5,)) == (1, 5)
    w = torch.zeros(2, 3, 2, 2)
    w[0, 0, 0, 0] = w[1, 2, 1, 1] = 1.0
    # (2, 12): 1 row bit + 4 column bits per nonzero
    assert fm.storage_bits(w, "coo", value_bits=8) == 2 * (8 + 1 + 4)


def test_expected_costs_by_hand():
    shape, s, k = (10, 20), 0.75, 8          # n = 200, m = 50
    assert fm.expected_bits("dense", shape, s, value_bits=k) == 1600
    assert fm.expected_bits("bitmap", shape, s, value_bits=k) == 200 + 50 * 8
    assert fm.expected_bits("coo", shape, s, value_bits=k) == 50 * (8 + 4 + 5)
    assert fm.expected_bits("csr", shape, s, value_bits=k) == 50 * (8 + 5) + 11 * 6
    # a dense matrix: every format stores all values; delta needs no padding with any width
    assert fm.expected_bits("delta", shape, 0.0, value_bits=k, delta_bits=1) == 200 * 9
    assert fm.expected_bits("ell", shape, 0.0, value_bits=k) == 10 * 20 * (8 + 5)
    # an empty matrix: nothing but CSR's zero-width pointers and nothing else
    assert fm.expected_bits("bitmap", shape, 1.0, value_bits=k) == 200
    assert fm.expected_bits("delta", shape, 1.0, value_bits=k) == 0
    assert fm.expected_bits("bsr", shape, 1.0, value_bits=k) == 0


def test_expected_delta_closed_form_matches_direct_sum():
    # E[entries] = n d + d * sum_{t=1}^{T} (n - tG) s^{tG}; long sums take the arithmetico-geometric closed form
    for n, s, b in [(100_000, 0.9, 3), (50_000, 0.99, 2), (3_000, 0.7, 1), (1_000_000, 0.999, 5)]:
        d, G = 1 - s, 2 ** b
        t = np.arange(1, (n - 1) // G + 1, dtype=np.float64)
        direct = n * d + d * np.sum((n - t * G) * s ** (t * G))
        got = fm.expected_bits("delta", (n,), s, value_bits=1, delta_bits=b) / (1 + b)
        assert got == pytest.approx(direct, rel=1e-9)
        # and for a long vector it is close to m / (1 - s^G): geometric gaps
        assert got == pytest.approx(n * d / (1 - s ** G), rel=10 / (d * n))  # edge effects ~ one gap


@pytest.mark.parametrize("fmt", fm.FORMATS)
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_exact_cost_of_random_masks_averages_to_the_expected_cost(fmt, sparsity):
    shape = (100, 64)
    generator = torch.Generator().manual_seed(0)
    exact = [fm.storage_bits(torch.rand(shape, generator=generator) >= sparsity, fmt, value_bits=16)
             for _ in range(40)]
    expected = fm.expected_bits(fmt, shape, sparsity, value_bits=16)
    stderr = np.std(exact) / math.sqrt(len(exact))
    # unbiased up to sampling noise (and the rounding of m inside the pointer width of CSR/BSR)
    assert abs(np.mean(exact) - expected) <= 4 * stderr + 0.005 * expected


def test_best_delta_is_never_worse_than_unpadded_delta():
    generator = torch.Generator().manual_seed(1)
    for s in (0.3, 0.8, 0.95, 0.995):
        mask = torch.rand(50, 80, generator=generator) >= s
        positions = torch.nonzero(mask.reshape(-1)).reshape(-1)
        largest_gap = int(torch.diff(positions, prepend=torch.tensor([-1])).max())
        unpadded = len(positions) * (8 + fm.index_bits(largest_gap))   # survey: m * ceil(log2 d_hat)
        assert fm.storage_bits(mask, "delta", value_bits=8) <= unpadded
        # and the unpadded width itself never pads
        b = max(1, fm.index_bits(largest_gap))
        assert fm.storage_bits(mask, "delta", value_bits=8, delta_bits=b) == len(positions) * (8 + b)


# ------------------------------------------------------------------------------------ break-even and crossovers
@pytest.mark.parametrize("k", [4, 8, 16, 32])
def test_break_even_closed_forms(k):
    shape = (300, 64)
    assert fm.break_even_sparsity("bitmap", shape, value_bits=k) == pytest.approx(1 / k, abs=1e-7)
    i_r, i_c = fm.index_bits(300), fm.index_bits(64)
    coo = (i_r + i_c) / (k + i_r + i_c)
    assert fm.break_even_sparsity("coo", shape, value_bits=k) == pytest.approx(coo, abs=1e-7)
    coo32 = 64 / (k + 64)
    assert fm.break_even_sparsity("coo", shape, value_bits=k, index_bits=32) == pytest.approx(coo32, abs=1e-7)
    # CSR: s >= i_c/(k+i_c) + (r+1) p / (n (k+i_c)), p = ceil(log2(m+1)) at the break-even m
    s_csr = fm.break_even_sparsity("csr", shape, value_bits=k)
    m = round((1 - s_csr) * 300 * 64)
    closed = i_c / (k + i_c) + 301 * fm.index_bits(m + 1) / (300 * 64 * (k + i_c))
    assert s_csr == pytest.approx(closed, abs=2e-4)
    assert fm.break_even_sparsity("dense", shape) == 0.0


def test_break_even_moves_the_right_way():
    shape = (100, 300)
    # wider values make index overhead relatively cheaper: every sparse format pays off earlier
    for fmt in ("bitmap", "coo", "csr", "delta", "ell"):
        points = [fm.break_even_sparsity(fmt, shape, value_bits=k) for k in (4, 8, 16, 32, 64)]
        assert all(a > b for a, b in zip(points, points[1:])), (fmt, points)
    # wider indices make COO and CSR pay off later
    for fmt in ("coo", "csr"):
        points = [fm.break_even_sparsity(fmt, shape, value_bits=16, index_bits=b) for b in (None, 16, 32, 64)]
        assert all(a < b for a, b in zip(points, points[1:])), (fmt, points)
    # a format that can never beat dense
    assert fm.break_even_sparsity("coo", (4, 4), value_bits=1, index_bits=32) is not None  # at s=1 it is free
    assert fm.break_even_sparsity("bsr", (8, 8), value_bits=8, block=(8, 8)) is not None


def test_expected_costs_fall_with_sparsity():
    grid = np.linspace(0, 1, 201)
    for fmt in fm.FORMATS:
        if fmt == "dense":
            continue
        costs = [fm.expected_bits(fmt, (100, 300), s, value_bits=8) for s in grid]
        assert all(a >= b - 1e-9 for a, b in zip(costs, costs[1:])), fmt


def test_survey_example_crossovers():
    # survey §2.2: 10^4 x 10^4 with 8-bit values; bitmap best from 12.5% (s = 1/k), delta from ~76% on
    crossings = fm.crossover_sparsities((10_000, 10_000), value_bits=8)
    assert [(c.before, c.after) for c in crossings] == [("dense", "bitmap"), ("bitmap", "delta")]
    assert crossings[0].sparsity == pytest.approx(1 / 8, abs=1e-6)
    assert 0.70 < crossings[1].sparsity < 0.80
    # with a fixed 4-bit delta field, padding explodes at high sparsity and CSR, then COO, take over
    fixed = fm.crossover_sparsities((10_000, 10_000), value_bits=8, delta_bits=4)
    assert [c.after for c in fixed] == ["bitmap", "delta", "csr", "coo"]


@pytest.mark.parametrize("options", [dict(value_bits=32), dict(value_bits=8, delta_bits=4),
                                     dict(value_bits=16, index_bits=32), dict(value_bits=32, formats=fm.FORMATS)])
def test_crossovers_are_consistent(options):
    shape = (300, 64)
    crossings = fm.crossover_sparsities(shape, points=150, **options)
    cost_options = {k: v for k, v in options.items()}
    sparsities = [c.sparsity for c in crossings]
    assert sparsities == sorted(sparsities)
    assert crossings[0].before == fm.best_format(shape, 0.0, **cost_options)
    for a, b in zip(crossings, crossings[1:]):
        assert a.after == b.before
    for c in crossings:
        assert fm.best_format(shape, c.sparsity - 1e-6, **cost_options) == c.before
        assert fm.best_format(shape, min(c.sparsity + 1e-6, 1 - 1 / (300 * 64)), **cost_options) == c.after
    ranges = fm.winning_ranges(shape, **options)
    for name, intervals in ranges.items():
        for lo, hi in intervals:
            assert fm.best_format(shape, (lo + hi) / 2, **cost_options) == name


def test_best_format_ties_go_to_the_first_listed():
    # at s = 1/k dense and bitmap cost the same (n k = n + (1 - 1/k) n k)
    assert fm.best_format((1000, 1000), 1 / 8, value_bits=8, formats=("dense", "bitmap")) == "dense"
    assert fm.best_format((1000, 1000), 1 / 8, value_bits=8, formats=("bitmap", "dense")) == "bitmap"


# ------------------------------------------------------------------------------------ storage report
def test_storage_report_of_a_pruned_model(mlp):
    sl.prune(mlp, 0.9, scope="global")
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    report = fm.storage_report(mlp, value_bits=32)
    assert list(report.index) == ["0.weight", "2.weight", "4.weight", "total"]
    for f in fm.SURVEY_FORMATS:
        assert report.loc["total", f] == report[f].iloc[:-1].sum()
        assert report.loc["0.weight", f] == fm.storage_bits(mlp[0].weight, f, value_bits=32)
    for name in report.index[:-1]:
        row = report.loc[name]
        assert row["best_mixed"] == min(row[f] for f in fm.SURVEY_FORMATS)
    assert report.loc["total", "sparsity"] == pytest.approx(sl.sparsity(mlp))
    assert report.loc["total", "dense"] == 32 * sum(w.numel() for w in sl.prunable(mlp).values())
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())


# ------------------------------------------------------------------------------------ FLOPs
def _torch_macs(model, x):
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() // 2   # torch counts a multiply-add as two FLOPs


def test_dense_flops_match_torch_flop_counter(mlp, cnn):
    x = torch.randn(5, 16)
    assert fm.flops(mlp, x).dense == _torch_macs(mlp, x) == 5 * (16 * 40 + 40 * 24 + 24 * 5)
    assert fm.flops(mlp, (16,)).dense == 16 * 40 + 40 * 24 + 24 * 5
    images = torch.randn(3, 1, 6, 6)
    assert fm.flops(cnn, images).dense == _torch_macs(cnn, images)
    # by hand: 36 positions * 8 * 9 + 36 * 16 * 72 + 576 * 4, per example
    assert fm.flops(cnn, (1, 6, 6)).dense == 36 * 8 * 9 + 36 * 16 * 72 + 16 * 36 * 4


def test_weight_sparse_flops_scale_with_layer_density(mlp, cnn):
    sl.prune(mlp, 0.8, scope="global")
    count = fm.flops(mlp, (16,))
    nnz = {n: int((w != 0).sum()) for n, w in sl.prunable(mlp).items()}
    assert count.weight_sparse == sum(nnz.values())           # Linear: one MAC per nonzero weight
    assert count.weight_reduction == pytest.approx(count.dense / sum(nnz.values()))
    assert count.activation_sparse is None and count.per_example is None
    sl.prune(cnn, 0.7, scope="layerwise")
    c = fm.flops(cnn, (1, 6, 6))
    for layer in c.layers:
        assert layer["weight_sparse"] == pytest.approx(layer["dense"] * layer["weight_density"], rel=1e-6)


def _brute_force_linear(x, w):
    return sum(int(x[i, j] != 0 and w[o, j] != 0)
               for i in range(x.shape[0]) for o in range(w.shape[0]) for j in range(w.shape[1]))


def _brute_force_conv(x, w, padding):
    """Products w[o,c,a,b] * x[c, p+a-pad, q+b-pad] with both factors nonzero (padded zeros are zero)."""
    n, channels, height, width = x.shape
    out, _, kh, kw = w.shape
    count = 0
    for i in range(n):
        for o in range(out):
            for p in range(height + 2 * padding - kh + 1):
                for q in range(width + 2 * padding - kw + 1):
                    for c in range(channels):
                        for a in range(kh):
                            for b in range(kw):
                                r, t = p + a - padding, q + b - padding
                                if 0 <= r < height and 0 <= t < width and x[i, c, r, t] != 0 and w[o, c, a, b] != 0:
                                    count += 1
    return count


def test_activation_sparse_flops_against_brute_force():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    sl.prune(lin, 0.5, scope="global")
    x = torch.randn(4, 6)
    x[x.abs() < 0.5] = 0.0                                     # some zero inputs
    count = fm.flops(lin, x)
    hidden = F.relu(lin[0](x))
    expected = _brute_force_linear(x, lin[0].weight) + _brute_force_linear(hidden, lin[2].weight)
    assert count.activation_sparse == expected
    assert int(count.per_example.sum()) == expected
    per = [_brute_force_linear(x[i:i + 1], lin[0].weight) + _brute_force_linear(hidden[i:i + 1], lin[2].weight)
           for i in range(4)]
    assert count.per_example.tolist() == per

    conv = nn.Conv2d(2, 3, 3, padding=1)
    sl.prune(conv, 0.5, scope="global")
    images = torch.relu(torch.randn(2, 2, 4, 4))
    got = fm.flops(conv, images)
    assert got.activation_sparse == _brute_force_conv(images, conv.weight.detach(), padding=1)
    assert got.dense == 2 * 16 * 3 * 18


def test_flops_leave_the_model_as_it_was(mlp):
    mlp.train()
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    fm.flops(mlp, torch.randn(3, 16))
    assert mlp.training
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert not any(m._forward_hooks for m in mlp.modules())


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_is_rejected_with_a_clear_message(mlp):
    with pytest.raises(ValueError, match="fmt must be one of"):
        fm.expected_bits("csc", (3, 3), 0.5)
    with pytest.raises(ValueError, match="shape"):
        fm.expected_bits("csr", (3, 0), 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        fm.expected_bits("csr", (3, 3), 1.5)
    with pytest.raises(TypeError, match="sparsity"):
        fm.expected_bits("csr", (3, 3), "half")
    with pytest.raises(ValueError, match="value_bits"):
        fm.expected_bits("csr", (3, 3), 0.5, value_bits=0)
    with pytest.raises(ValueError, match="delta_bits"):
        fm.storage_bits(SMALL, "delta", delta_bits=0)
    with pytest.raises(ValueError, match="index_bits=1 cannot hold"):
        fm.storage_bits(SMALL, "coo", index_bits=1)
    with pytest.raises(ValueError, match="block"):
        fm.storage_bits(SMALL, "bsr", block=(2,))
    with pytest.raises(TypeError, match="mask"):
        fm.storage_bits([[1, 0]], "csr")
    with pytest.raises(ValueError, match="formats"):
        fm.best_format((3, 3), 0.5, formats=())
    with pytest.raises(ValueError, match="no Linear or Conv"):
        fm.flops(nn.Sequential(nn.ReLU()), (3,))
    with pytest.raises(ValueError, match="shape"):
        fm.flops(mlp, (16, -1))
