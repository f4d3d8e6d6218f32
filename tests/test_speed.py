"""Tests of sparsity_lib.speed: the timing helpers, the roofline and the benchmark records.

No timed assertions: timings on a shared machine are noise. These tests check structure and arithmetic (call
counts, interleaving, exact masks, storage against sparsity_lib.formats, products against dense ones, the
break-even interpolation on hand-made records).
"""

import math

import pytest
import torch

from sparsity_lib import speed
from sparsity_lib.formats import storage_bits

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def test_time_variants_calls_every_variant_interleaved():
    log = []
    variants = {name: (lambda name=name: log.append(name)) for name in "abc"}
    out = speed.time_variants(variants, repeats=4, target=0.0, warmup=2, seed=3)
    assert list(out) == ["a", "b", "c"]
    for name, t in out.items():
        assert isinstance(t, speed.Timing) and t.number == 1 and len(t.samples) == 4
        assert 0 <= t.best <= t.median <= max(t.samples) and t.best == min(t.samples)
        assert log.count(name) == 2 + 1 + 4           # warm-up, calibration, one block per round
    rounds = log[9:]                                   # after warm-up and calibration (3 x 3 calls)
    for r in range(4):
        assert sorted(rounds[3 * r: 3 * r + 3]) == ["a", "b", "c"]   # every round times every variant once
    assert len({tuple(rounds[3 * r: 3 * r + 3]) for r in range(4)}) > 1  # in shuffled orders


def test_time_variants_blocks_reach_the_target():
    calls = []
    out = speed.time_variants({"tiny": lambda: calls.append(1)}, repeats=2, target=1e-3, warmup=0)
    assert out["tiny"].number > 1 and len(calls) == 1 + 2 * out["tiny"].number


@pytest.mark.parametrize("kwargs", [dict(variants={}), dict(variants={"a": 3}), dict(repeats=0),
                                    dict(target=-1.0), dict(warmup=-1)])
def test_time_variants_validates(kwargs):
    args = dict(variants={"a": lambda: None})
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)):
        speed.time_variants(**args)


def test_time_forward_runs_models_without_gradients():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_grad_enabled())
            return x

    out = speed.time_forward({"probe": Probe()}, torch.zeros(2), repeats=2, target=0.0)
    assert set(out) == {"probe"} and seen and not any(seen)


def test_roofline_arithmetic_and_measurement():
    roof = speed.Roofline(macs_per_second=1e10, bytes_per_second=2e9, threads=1)
    assert roof.ridge == pytest.approx(5.0)
    assert list(roof.attainable([1.0, 5.0, 100.0])) == pytest.approx([2e9, 1e10, 1e10])
    measured = speed.measure_roofline(matrix_size=64, buffer_bytes=2**20, chunk_bytes=2**16, repeats=2)
    assert math.isfinite(measured.macs_per_second) and measured.macs_per_second > 0
    assert math.isfinite(measured.bytes_per_second) and measured.bytes_per_second > 0
    assert measured.threads == torch.get_num_threads() and measured.details["matrix_size"] == 64
    assert measured.details["buffer_bytes"] == 2**20 and measured.details["chunk_bytes"] == 2**16


@pytest.mark.parametrize("structure, unit", [(None, 1), ("rows", 24), (("block", 4, 8), 32)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 1.0])
def test_random_mask_exact_counts_and_structure(structure, unit, sparsity):
    mask = speed.random_mask((16, 24), sparsity, structure, seed=1)
    units = 16 * 24 // unit
    assert mask.dtype == torch.bool and mask.shape == (16, 24)
    assert int(mask.sum()) == unit * round((1 - sparsity) * units)
    if structure == "rows":
        assert bool((mask.all(1) | ~mask.any(1)).all())
    if structure is not None and structure != "rows":
        tiles = mask.reshape(4, 4, 3, 8).permute(0, 2, 1, 3).reshape(12, -1)
        assert bool((tiles.all(1) | ~tiles.any(1)).all())
    assert torch.equal(mask, speed.random_mask((16, 24), sparsity, structure, seed=1))   # seeded
    with pytest.raises(ValueError):
        speed.random_mask((16, 24), sparsity, ("block", 5, 8))


@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr4", "bsr8", "rows"])
def test_layer_variants_compute_the_masked_product_and_report_exact_storage(fmt):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    x = torch.randn(5, 48, generator=g)
    matrix, bits, kept = speed.layer_variant(w, fmt, 0.75, seed=2)
    y = speed.layer_product(matrix, x)
    if fmt == "dense":
        assert kept == 32 * 48 and bits == 32 * 48 * 32
        torch.testing.assert_close(y, x @ w.t())
    elif fmt == "rows":
        mask = speed.random_mask((32, 48), 0.75, "rows", seed=2)
        assert kept == int(mask.sum()) == 8 * 48 and bits == kept * 32
        torch.testing.assert_close(y, x @ w[mask[:, 0]].t())
    else:
        structure = None if fmt == "csr" else ("block", int(fmt[3:]), int(fmt[3:]))
        mask = speed.random_mask((32, 48), 0.75, structure, seed=2)
        assert kept == int(mask.sum())
        torch.testing.assert_close(y, x @ (w * mask).t(), atol=1e-5, rtol=1e-5)
        block = (int(fmt[3:]),) * 2 if structure else (4, 4)
        assert bits == storage_bits(mask, "csr" if fmt == "csr" else "bsr", index_bits=32, block=block)
    assert speed.layer_variant(torch.randn(30, 48), "bsr4", 0.5) is None     # 4 does not divide 30
    with pytest.raises(ValueError, match="format"):
        speed.layer_variant(w, "coo", 0.5)


def test_sweep_records():
    records = speed.sweep((16, 32), sparsities=(0.5, 0.875), batches=(1, 3), formats=("dense", "csr", "bsr4", "rows"),
                          repeats=2, target=0.0)
    assert len(records) == 2 * (1 + 3 * 2)
    for r in records:
        assert r["shape"] == (16, 32) and r["batch"] in (1, 3)
        assert r["speedup"] == pytest.approx(r["dense_seconds"] / r["seconds"])
        assert r["ideal"] == pytest.approx(16 * 32 / r["kept"])
        assert r["macs"] == r["kept"] * r["batch"] and r["dense_bits"] == 16 * 32 * 32
        assert r["seconds"] <= r["median"]
    dense = [r for r in records if r["format"] == "dense"]
    assert len(dense) == 2 and all(r["sparsity"] == 0.0 and r["speedup"] == 1.0 for r in dense)
    assert {r["kept"] for r in records if r["sparsity"] == 0.875} == {64}
    assert "| 16x32 | 3 | CSR | 87.5% |" in speed.records_table(records)
    assert "break-even" in speed.break_even_table(records)


def _records(speedups, fmt="csr", batch=1):
    return [{"shape": (4, 4), "format": fmt, "batch": batch, "sparsity": s, "speedup": v} for s, v in speedups]


def test_break_even_interpolates_in_log_density():
    # speed-up 0.5 at s=0.5 (density 1/2), 2 at s=0.875 (density 1/8): log-linear crossing at density 1/4
    assert speed.break_even(_records([(0.0, 0.2), (0.5, 0.5), (0.875, 2.0)]), "csr", 1) == pytest.approx(0.75)
    assert speed.break_even(_records([(0.5, 1.2), (0.9, 3.0)]), "csr", 1) == 0.5
    assert speed.break_even(_records([(0.5, 0.2), (0.9, 0.9)]), "csr", 1) is None
    with pytest.raises(ValueError, match="no records"):
        speed.break_even(_records([(0.5, 0.2)]), "bsr4", 1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without a GPU")
def test_gpu_section_is_skipped_with_a_message_without_cuda():
    text = speed.gpu_table()
    assert "skipped" in text and "CUDA" in text


def test_gpu_table_code_path_runs_on_any_device():
    """The CUDA section's code, run on the CPU: dense rows, CSR rows, and 2:4 either timed or explained."""
    text = speed.gpu_table(repeats=1, size=64, batch=4, device="cpu")
    assert "| dense fp32 | 0% |" in text and "| dense fp16 | 0% |" in text
    assert "| cuSPARSE CSR fp32 | 90% |" in text and "| cuSPARSE CSR fp32 | 99% |" in text
    assert "| 2:4 semi-structured fp16 | 50% (2:4) |" in text or "2:4 semi-structured unavailable" in text


def test_main_prints_the_table(capsys):
    speed.main(["--shapes", "8x16", "--batches", "1", "--repeats", "1", "--no-gpu"])
    out = capsys.readouterr().out
    assert "| 8x16 | 1 | CSR | 99.9% |" in out and "Break-even" in out and "roofline" in out
