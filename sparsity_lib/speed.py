"""Measuring what sparsity buys in time: interleaved min-of-N timing, a measured roofline, the speed-up table.

Three tools, used by Chapter 13 and by ``make bench`` (``python -m sparsity_lib.speed`` prints the table):

* :func:`time_variants`: times several callables *interleaved* (round after round, each variant once per round,
  in a shuffled order), so that a change of load on a shared machine hits all of them alike, and reports the
  **minimum** over rounds of the time per call (the run least disturbed by other processes; the median is kept
  too). Each timed block repeats the call until it lasts about ``target`` seconds, so even microsecond calls are
  measured above the clock's resolution.
* :func:`measure_roofline`: the roofline of this machine (Williams et al. {cite}`williams2009roofline`), from two
  micro-benchmarks: the achievable multiply-add rate :math:`\\pi` (a dense matrix product) and the memory
  bandwidth :math:`\\beta` (STREAM-style copies of slices of an array far larger than the caches). A kernel
  that performs
  :math:`M` multiply-adds and moves :math:`Q` bytes has arithmetic intensity :math:`I = M / Q` and can at best
  run at :math:`\\min(\\pi, \\beta I)` multiply-adds per second.
* :func:`sweep` and :func:`bench_table`: a layer ``out x in`` at several sparsities, batch sizes and formats
  (dense, CSR, BSR with a few block sizes, compacted rows), timed with :func:`time_variants`, with the ideal
  speed-up :math:`1 / (1 - s)` beside the measured one, and the storage of every variant.

Each format gets the sparsity pattern it is made for: CSR an unstructured random mask, BSR a mask of random
``R x C`` blocks (an unstructured mask at 90% leaves almost every 4x4 block nonzero, so BSR gains nothing from
it), compaction a mask of random whole rows (which it deletes, leaving a smaller dense product; in a network the
next layer loses the matching columns as well). All patterns have exactly the same number of kept weights.
Timing never depends on the values, so the weights are random.

Survey §2.2 and §7 {cite}`hoefler2021sparsity`; Gale et al. {cite}`gale2020sparse`, Elsen et al.
{cite}`elsen2020fast`, Gray et al. {cite}`gray2017gpu`, Mishra et al. {cite}`mishra2021accelerating` (2:4 on
GPUs). Defined in Chapter 13.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from . import formats as _formats

#: Sparsities of the benchmark table (fraction of weights removed).
SPARSITIES: Tuple[float, ...] = (0.0, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999)
#: Batch sizes of the benchmark table: latency (one input) and throughput (a batch).
BATCHES: Tuple[int, ...] = (1, 64)
#: Formats of the table: dense, CSR, BSR with 4x4 and 16x16 blocks, compacted rows.
LAYER_FORMATS: Tuple[str, ...] = ("dense", "csr", "bsr4", "bsr16", "rows")
#: Layer shapes (out, in): LeNet-300-100's first two layers and one large layer.
SHAPES: Tuple[Tuple[int, int], ...] = ((300, 64), (100, 300), (4096, 4096))
_FORMAT_LABELS = {"dense": "dense", "csr": "CSR", "bsr4": "BSR 4x4", "bsr16": "BSR 16x16", "rows": "compacted rows",
                  "bsr2": "BSR 2x2", "bsr8": "BSR 8x8", "bsr32": "BSR 32x32"}


def format_label(fmt: str) -> str:
    """A readable name of a layer format of :func:`sweep` (``"bsr4"`` -> ``"BSR 4x4"``)."""
    return _FORMAT_LABELS.get(fmt, fmt)


def _check_layer_format(fmt) -> str:
    if not isinstance(fmt, str) or not (fmt in ("dense", "csr", "rows") or (fmt.startswith("bsr") and fmt[3:].isdigit()
                                                                            and int(fmt[3:]) >= 1)):
        raise ValueError(f"format must be 'dense', 'csr', 'rows' or 'bsr<B>' (B x B blocks, e.g. 'bsr4'), got {fmt!r}")
    return fmt


def _block_of(fmt: str) -> int:
    return int(fmt[3:])


# ------------------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call of one variant: ``best`` (minimum over rounds), ``median``, every round's ``samples``,
    and ``number``, the calls per timed block."""

    best: float
    median: float
    samples: List[float]
    number: int

    def __repr__(self) -> str:
        return f"Timing(best={self.best * 1e6:.1f} us, median={self.median * 1e6:.1f} us, rounds={len(self.samples)})"


def time_variants(variants: Mapping[str, Callable[[], object]], repeats: int = 15, target: float = 5e-4,
                  warmup: int = 1, seed: int = 0, synchronize: Optional[Callable[[], None]] = None,
                  max_number: int = 100_000) -> Dict[str, Timing]:
    """Time every callable of ``variants`` (``{name: f}``, ``f()`` does the work), interleaved; min of N.

    1. Warm-up: each ``f`` is called ``warmup`` times, then once more, timed, to choose its ``number``: the
       calls per block that make a block last about ``target`` seconds (at least 1, at most ``max_number``).
    2. ``repeats`` rounds: in every round each variant runs one block, the variants in a freshly shuffled
       order (seeded by ``seed``), so that slow phases of a loaded machine spread over all of them.
    3. Per variant: ``best`` = the minimum over rounds of block time / ``number`` (noise only ever *adds* time,
       so the minimum is the best estimate of the undisturbed cost), and the median.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) is called before starting and before stopping each clock,
    for devices that run asynchronously. Returns ``{name: Timing}`` in the order of ``variants``.
    """
    if not isinstance(variants, Mapping) or not variants:
        raise ValueError("variants must be a non-empty dict {name: callable}")
    for name, f in variants.items():
        if not callable(f):
            raise TypeError(f"variants[{name!r}] must be callable, got {type(f).__name__}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not target >= 0:
        raise ValueError(f"target must be a number of seconds >= 0 (0: one call per block), got {target!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
    sync = synchronize or (lambda: None)
    clock = time.perf_counter

    def block(f, number):
        sync()
        start = clock()
        for _ in range(number):
            f()
        sync()
        return clock() - start

    numbers = {}
    for name, f in variants.items():
        for _ in range(warmup):
            f()
        once = max(block(f, 1), 1e-9)
        numbers[name] = int(min(max_number, max(1, math.ceil(target / once))))
    samples: Dict[str, List[float]] = {name: [] for name in variants}
    order = list(variants)
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(order)
        for name in order:
            samples[name].append(block(variants[name], numbers[name]) / numbers[name])
    out = {}
    for name in variants:
        s = sorted(samples[name])
        out[name] = Timing(best=s[0], median=s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2]),
                           samples=samples[name], number=numbers[name])
    return out


def time_forward(models: Mapping[str, torch.nn.Module], inputs: torch.Tensor, **options) -> Dict[str, Timing]:
    """:func:`time_variants` of ``model(inputs)`` for every model of ``{name: model}``, in inference mode."""
    def forward(model):
        def run():
            with torch.inference_mode():
                return model(inputs)
        return run
    return time_variants({name: forward(model) for name, model in models.items()}, **options)


# ------------------------------------------------------------------------------------------------ roofline
@dataclass
class Roofline:
    """The measured roofline of this machine: ``macs_per_second`` (:math:`\\pi`, multiply-adds per second of a
    dense matrix product) and ``bytes_per_second`` (:math:`\\beta`, STREAM-style copy bandwidth), with the
    ``threads`` they were measured with."""

    macs_per_second: float
    bytes_per_second: float
    threads: int
    details: dict = field(default_factory=dict)

    @property
    def ridge(self) -> float:
        """The ridge point :math:`I^* = \\pi / \\beta` (multiply-adds per byte): below it a kernel is memory-bound."""
        return self.macs_per_second / self.bytes_per_second

    def attainable(self, intensity):
        """:math:`\\min(\\pi, \\beta I)`: the best multiply-add rate at arithmetic intensity ``I`` (MAC/byte)."""
        import numpy as np

        return np.minimum(self.macs_per_second, self.bytes_per_second * np.asarray(intensity, dtype=float))


def measure_roofline(matrix_size: int = 256, buffer_bytes: int = 64 * 2**20, chunk_bytes: int = 2**20,
                     repeats: int = 15, dtype: torch.dtype = torch.float32, device="cpu") -> Roofline:
    """Measure :math:`\\pi` and :math:`\\beta` with two micro-benchmarks (min of ``repeats``, interleaved).

    * :math:`\\pi`: ``A @ B`` for two ``matrix_size`` square matrices: :math:`n^3` multiply-adds;
    * :math:`\\beta`: copies of ``chunk_bytes`` slices of a ``buffer_bytes`` array into another, slice after
      slice, counted as :math:`2 \\times` ``chunk_bytes`` moved per copy (one read, one write), as STREAM's *copy*
      counts. With a buffer of twice the last-level cache or more, no slice is still cached when its turn comes:
      this is the bandwidth of main memory. With ``chunk_bytes == buffer_bytes`` small enough to stay in a
      cache, it is that cache's bandwidth.

    Both are short operations repeated many times, because on a machine shared with other processes a long
    operation is almost always interrupted (and runs several times slower), while the minimum over many short
    rounds keeps the undisturbed ones. Uses torch's current thread count (``threads`` records it); allocates
    ``2 * buffer_bytes``.
    """
    n = int(matrix_size)
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    chunk = max(1, int(chunk_bytes) // size)
    chunks = max(1, int(buffer_bytes) // size // chunk)
    src = torch.randn(chunks * chunk, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    position = [0]

    def copy_next_chunk():
        i = position[0]
        position[0] = (i + 1) % chunks
        dst[i * chunk:(i + 1) * chunk].copy_(src[i * chunk:(i + 1) * chunk])

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    t = time_variants({"matmul": lambda: torch.mm(a, b), "copy": copy_next_chunk}, repeats=repeats,
                      synchronize=sync)
    macs = n ** 3 / t["matmul"].best
    moved = 2 * chunk * size
    return Roofline(macs_per_second=macs, bytes_per_second=moved / t["copy"].best, threads=torch.get_num_threads(),
                    details={"matrix_size": n, "buffer_bytes": chunks * chunk * size, "chunk_bytes": chunk * size,
                             "matmul_seconds": t["matmul"].best, "copy_seconds": t["copy"].best})


def product_cost(weight_bits: int, macs: int, in_features: int, out_features: int, batch: int,
                 value_bytes: int = 4) -> Tuple[int, float]:
    """``(multiply-adds, bytes)`` of one layer product with the fewest possible memory transfers: the stored
    weight (``weight_bits``, indices included) read once, the ``batch x in`` input read once and the
    ``batch x out`` output written once. Intensity = multiply-adds / bytes."""
    moved = weight_bits / 8 + value_bytes * batch * (in_features + out_features)
    return int(macs), float(moved)


# ----------------------------------------------------------------------------------------- masks and layers
def random_mask(shape: Tuple[int, int], sparsity: float, structure=None, seed: int = 0) -> torch.Tensor:
    """A random boolean ``out x in`` mask with exactly ``round((1 - s) * n)`` kept entries (for blocks and rows:
    the nearest whole number of blocks or rows).

    ``structure``: ``None`` (unstructured), ``"rows"`` (whole output rows), or ``("block", R, C)`` (aligned
    ``R x C`` blocks; ``R`` and ``C`` must divide the shape).
    """
    rows, cols = shape
    s = _formats._check_sparsity(sparsity)
    g = torch.Generator().manual_seed(int(seed))
    if structure is None:
        units, unit_shape = rows * cols, None
    elif structure == "rows":
        units = rows
    elif isinstance(structure, tuple) and len(structure) == 3 and structure[0] == "block":
        br, bc = structure[1], structure[2]
        if rows % br or cols % bc:
            raise ValueError(f"block ({br}, {bc}) must divide the shape {shape}")
        units = (rows // br) * (cols // bc)
    else:
        raise ValueError(f"structure must be None, 'rows' or ('block', R, C), got {structure!r}")
    kept = int(round((1 - s) * units))
    flat = torch.zeros(units, dtype=torch.bool)
    flat[torch.randperm(units, generator=g)[:kept]] = True
    if structure is None:
        return flat.reshape(rows, cols)
    if structure == "rows":
        return flat[:, None].expand(rows, cols).clone()
    br, bc = structure[1], structure[2]
    return flat.reshape(rows // br, cols // bc).repeat_interleave(br, 0).repeat_interleave(bc, 1)


def _structure_of(fmt: str):
    if fmt == "rows":
        return "rows"
    if fmt.startswith("bsr"):
        b = _block_of(fmt)
        return ("block", b, b)
    return None


def layer_variant(weight: torch.Tensor, fmt: str, sparsity: float, seed: int = 0):
    """``(matrix, storage_bits, kept)`` for one format of the benchmark: the object :func:`layer_product` multiplies
    with (a dense tensor, a CSR/BSR tensor with int32 indices, or the dense kept rows), its exact storage in
    bits (indices and row pointers included), and the number of kept weights. ``None`` if the format does not
    fit the shape (a BSR block that does not divide it)."""
    fmt = _check_layer_format(fmt)
    from .export import _sparse_weight

    rows, cols = weight.shape
    value_bits = weight.element_size() * 8
    if fmt == "dense":
        return weight, rows * cols * value_bits, rows * cols
    if fmt.startswith("bsr") and (rows % _block_of(fmt) or cols % _block_of(fmt)):
        return None
    mask = random_mask((rows, cols), sparsity, _structure_of(fmt), seed=seed).to(weight.device)
    kept = int(mask.sum())
    if fmt == "rows":
        matrix = weight[mask[:, 0]].contiguous()
        return matrix, matrix.numel() * value_bits, kept
    masked = weight * mask
    block = (_block_of(fmt),) * 2 if fmt.startswith("bsr") else (1, 1)
    matrix = _sparse_weight(masked, "bsr" if fmt.startswith("bsr") else "csr", block, torch.int32)
    bits = sum(t.numel() * t.element_size() * 8 for t in (matrix.values(), matrix.col_indices(), matrix.crow_indices()))
    return matrix, bits, kept


def layer_product(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x @ matrix.T`` (a Linear layer without bias) for a dense or sparse ``matrix``; ``x`` is ``batch x in``."""
    if matrix.layout == torch.strided:
        return F.linear(x, matrix)
    return torch.sparse.mm(matrix, x.t()).t()


def sweep(shape: Tuple[int, int] = (1024, 1024), sparsities: Sequence[float] = SPARSITIES,
          batches: Sequence[int] = BATCHES, formats: Sequence[str] = LAYER_FORMATS, repeats: int = 15,
          target: float = 5e-4, seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32) -> List[dict]:
    """Time one ``out x in`` layer in every format at every sparsity and batch size, interleaved per batch size.

    Returns one record per (format, sparsity, batch): ``shape``, ``format``, ``sparsity`` (the target; the
    ``kept`` weights are exact), ``batch``, ``seconds`` (min of ``repeats``), ``median``, ``dense_seconds`` (the
    dense layer, timed in the same rounds), ``speedup = dense_seconds / seconds``, ``ideal = 1 / (1 - s)`` (for
    the kept fraction actually reached), ``storage_bits`` and ``dense_bits``, ``macs`` (multiply-adds actually
    needed: kept weights x batch) and ``bytes`` (minimal traffic, :func:`product_cost`). Dense records appear
    once per batch with ``sparsity = 0``. A BSR block that does not divide the shape is skipped.
    """
    rows, cols = shape
    formats = [_check_layer_format(f) for f in formats]
    g = torch.Generator().manual_seed(int(seed))
    weight = torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype)
    value_bytes = weight.element_size()
    dense_bits = rows * cols * value_bytes * 8
    variants = {("dense", 0.0): layer_variant(weight, "dense", 0.0)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "sparse CSR support is in beta"
        for fmt in formats:
            if fmt == "dense":
                continue
            for s in sparsities:
                v = layer_variant(weight, fmt, s, seed=seed + 1)
                if v is not None:
                    variants[fmt, float(s)] = v
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    records = []
    for batch in batches:
        x = torch.randn(batch, cols, generator=g).to(device=device, dtype=dtype)
        calls = {key: (lambda m=matrix: layer_product(m, x)) for key, (matrix, _, _) in variants.items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timings = time_variants(calls, repeats=repeats, target=target, seed=seed + batch, synchronize=sync)
        dense_t = timings["dense", 0.0].best
        for (fmt, s), (matrix, bits, kept) in variants.items():
            t = timings[fmt, s]
            macs, moved = product_cost(bits, kept * batch, cols, rows if fmt != "rows" else kept // cols, batch,
                                       value_bytes)
            records.append({"shape": (rows, cols), "format": fmt, "sparsity": s, "batch": batch,
                            "seconds": t.best, "median": t.median, "dense_seconds": dense_t,
                            "speedup": dense_t / t.best, "ideal": rows * cols / kept if kept else math.inf,
                            "kept": kept, "storage_bits": bits, "dense_bits": dense_bits, "macs": macs,
                            "bytes": moved})
    return records


def break_even(records: Sequence[dict], fmt: str, batch: int, shape=None) -> Optional[float]:
    """The sparsity at which ``fmt`` becomes as fast as dense (speed-up 1), from :func:`sweep` records.

    Interpolates :math:`\\log(\\text{speed-up})` linearly in :math:`\\log(1 - s)` between the two measured
    sparsities around the first crossing from below 1 to at least 1. Returns the smallest measured sparsity if
    ``fmt`` already wins there, and ``None`` if it never wins in the measured range.
    """
    points = sorted((r["sparsity"], r["speedup"]) for r in records
                    if r["format"] == fmt and r["batch"] == batch and (shape is None or tuple(r["shape"]) == tuple(shape))
                    and r["sparsity"] < 1.0)
    if not points:
        raise ValueError(f"no records for format={fmt!r}, batch={batch}, shape={shape}")
    if points[0][1] >= 1.0:
        return points[0][0]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if v0 < 1.0 <= v1:
            x0, x1 = math.log(1 - s0), math.log(1 - s1)
            y0, y1 = math.log(v0), math.log(v1)
            x = x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0)
            return 1 - math.exp(x)
    return None


# ------------------------------------------------------------------------------------------------- tables
def _format_order(fmt: str) -> float:
    """dense, CSR, BSR by block size, compacted rows."""
    fixed = {"dense": 0.0, "csr": 1.0, "rows": 3.0}
    return fixed[fmt] if fmt in fixed else 2.0 + _block_of(fmt) / 1e6


def records_table(records: Sequence[dict]) -> str:
    """A markdown table of :func:`sweep` records: time, measured and ideal speed-up, storage (KiB)."""
    lines = ["| layer | batch | format | sparsity | time (us) | speed-up | ideal 1/(1-s) | of ideal | storage (KiB) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(records, key=lambda r: (r["shape"], r["batch"], _format_order(r["format"]), r["sparsity"])):
        rows, cols = r["shape"]
        lines.append(f"| {rows}x{cols} | {r['batch']} | {format_label(r['format'])} | {100 * r['sparsity']:.1f}% | "
                     f"{1e6 * r['seconds']:.1f} | {r['speedup']:.2f} | {r['ideal']:.1f} | "
                     f"{r['speedup'] / r['ideal']:.2f} | {r['storage_bits'] / 8192:.1f} |")
    return "\n".join(lines)


def break_even_table(records: Sequence[dict]) -> str:
    """Break-even sparsities (:func:`break_even`) of every sparse format, shape and batch size. Compacted rows are
    left out: they are a smaller dense product, faster from the first removed row (their record at sparsity 0 is
    the dense product itself, whose measured "speed-up" only shows the timing noise)."""
    lines = ["| layer | batch | format | break-even sparsity |", "|---|---:|---|---:|"]
    keys = sorted({(tuple(r["shape"]), r["batch"], r["format"]) for r in records if r["format"] not in ("dense", "rows")})
    for shape, batch, fmt in keys:
        s = break_even(records, fmt, batch, shape)
        text = "never (in the measured range)" if s is None else f"{100 * s:.1f}%"
        lines.append(f"| {shape[0]}x{shape[1]} | {batch} | {format_label(fmt)} | {text} |")
    return "\n".join(lines)


def gpu_table(repeats: int = 20, size: int = 4096, batch: int = 64, device=None) -> str:
    """On a CUDA device: dense fp16 vs 2:4 semi-structured fp16 (sparse tensor cores, Mishra et al.) and
    cuSPARSE CSR (fp32) of a ``size x size`` layer. Without CUDA, a line that says the section is skipped.

    ``device`` defaults to ``"cuda"``; another device (``"cpu"``) runs the same code, which tests it anywhere
    (2:4 semi-structured tensors need a CUDA GPU of compute capability 8.0 or more: elsewhere the table says that
    the variant is unavailable, and why). A variant that fails its check against the dense product is left out
    with a note, never timed."""
    if device is None:
        if not torch.cuda.is_available():
            return "GPU section skipped: no CUDA device here (torch.cuda.is_available() is False)."
        device = "cuda"
    device = torch.device(device)
    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=g)
    x32 = torch.randn(batch, size, generator=g).to(device)
    x16 = x32.half()
    rows = [f"Device: {name}, layer {size}x{size}, batch {batch}, min of {repeats} interleaved rounds.", "",
            "| variant | sparsity | time (us) | speed-up vs dense of its precision |", "|---|---:|---:|---:|"]
    dense32, dense16 = weight.to(device), weight.half().to(device)
    variants = {"dense fp32": lambda: F.linear(x32, dense32), "dense fp16": lambda: F.linear(x16, dense16)}
    notes = []
    # 2:4: keep the 2 largest of every 4 consecutive input weights
    groups = weight.abs().reshape(size, size // 4, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    w24 = (weight * keep.reshape(size, size)).half().to(device)
    try:
        from torch.sparse import to_sparse_semi_structured

        s24 = to_sparse_semi_structured(w24)
        torch.testing.assert_close(F.linear(x16, s24), F.linear(x16, w24), rtol=1e-2, atol=1e-1)
        variants["2:4 semi-structured fp16"] = lambda: F.linear(x16, s24)
    except Exception as error:   # an unsupported GPU or build: say so in the table
        notes.append(f"2:4 semi-structured unavailable: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    csr = {}
    for s in (0.9, 0.99):
        mask = random_mask((size, size), s, seed=1).to(device)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = (dense32 * mask).to_sparse_csr()
                torch.testing.assert_close(torch.sparse.mm(m, x32.t()).t(), F.linear(x32, dense32 * mask),
                                           rtol=1e-3, atol=1e-3)
            csr[s] = m
            variants[f"cuSPARSE CSR fp32 @{s}"] = lambda m=m: torch.sparse.mm(m, x32.t())
        except Exception as error:
            notes.append(f"CSR on CUDA unavailable: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
            break
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time_variants(variants, repeats=repeats, target=5e-3, synchronize=torch.cuda.synchronize if cuda else None)
    for key, timing in t.items():
        base = t["dense fp16"].best if "fp16" in key else t["dense fp32"].best
        sparsity = "50% (2:4)" if key.startswith("2:4") else (f"{100 * float(key.split('@')[1]):.0f}%" if "@" in key else "0%")
        rows.append(f"| {key.split(' @')[0]} | {sparsity} | {1e6 * timing.best:.1f} | {base / timing.best:.2f} |")
    return "\n".join(rows + [""] + notes)


def bench_table(shapes: Sequence[Tuple[int, int]] = SHAPES, sparsities: Sequence[float] = SPARSITIES,
                batches: Sequence[int] = BATCHES, formats: Sequence[str] = LAYER_FORMATS, repeats: int = 15,
                threads: Optional[int] = None, gpu: bool = True) -> str:
    """The speed-up table of ``make bench``: :func:`sweep` for every shape, the break-even sparsities, the
    measured roofline, and (with CUDA) :func:`gpu_table`. ``threads`` sets torch's thread count for the run."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        roof = measure_roofline(repeats=repeats)
        out = [f"Sparse layer products on this CPU: torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
               f"time = min of {repeats} interleaved rounds. Ideal speed-up = 1/(1-s) (multiply-adds saved). CSR "
               f"gets an unstructured mask, BSR a mask of random blocks, compacted rows a mask of whole rows; "
               f"indices are int32.", "",
               f"Measured roofline: {roof.macs_per_second / 1e9:.1f} GMAC/s (dense {roof.details['matrix_size']}^3 "
               f"product), {roof.bytes_per_second / 1e9:.1f} GB/s (copy from memory), ridge at {roof.ridge:.2f} MAC/byte.", ""]
        records = []
        for shape in shapes:
            part = sweep(shape, sparsities, batches, formats, repeats=repeats)
            records += part
            print(f"  measured {shape[0]}x{shape[1]}", file=sys.stderr, flush=True)
        out += [records_table(records), "", "Break-even sparsities (where a format first matches dense):", "",
                break_even_table(records)]
        if gpu:
            out += ["", gpu_table()]
        return "\n".join(out)
    finally:
        torch.set_num_threads(previous)


def _int_list(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return values


def _shapes(text: str) -> List[Tuple[int, int]]:
    try:
        shapes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"--shapes must look like 300x64,4096x4096, got {text!r}")
    return shapes


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m sparsity_lib.speed``: print the speed-up table (options: ``--shapes``, ``--batches``,
    ``--repeats``, ``--threads``, ``--no-gpu``)."""
    parser = argparse.ArgumentParser(prog="python -m sparsity_lib.speed", description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=_shapes, default=list(SHAPES), help="layer shapes out x in, e.g. 300x64,4096x4096")
    parser.add_argument("--batches", type=_int_list, default=list(BATCHES), help="batch sizes, e.g. 1,64")
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per variant (default 15)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=True,
                        help="add the CUDA section when a GPU is present (default; --no-gpu skips it)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"## Sparse inference: measured speed-up vs the ideal\n\n{os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} (a loaded machine inflates times; min-of-N and interleaving keep the ratios)\n")
    print(bench_table(args.shapes, SPARSITIES, args.batches, LAYER_FORMATS, repeats=args.repeats,
                      threads=args.threads, gpu=args.gpu))


__all__ = ["SPARSITIES", "BATCHES", "LAYER_FORMATS", "SHAPES", "Timing", "time_variants", "time_forward",
           "Roofline", "measure_roofline", "product_cost", "random_mask", "layer_variant", "layer_product", "sweep",
           "break_even", "records_table", "break_even_table", "gpu_table", "bench_table", "format_label", "main"]


if __name__ == "__main__":
    main()
