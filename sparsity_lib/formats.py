"""What sparsity buys: the storage cost of a sparse matrix in each format, and the multiply-adds it saves.

Storage (survey §2.2, Fig. 5). A matrix of ``r`` rows and ``c`` columns, :math:`n = r c` entries of which
:math:`k` are nonzero (density :math:`d = k / n = 1 - s`), each value :math:`b_v` bits wide (``value_bits``),
costs in each format (the book's notation: :math:`k` kept weights; the survey writes :math:`m` for them):

========  ==========================================================================================
format    bits
========  ==========================================================================================
dense     :math:`n b_v`
bitmap    :math:`n + k b_v` (one presence bit per entry, then the nonzero values)
coo       :math:`k\\,(b_v + i_r + i_c)` (every nonzero with its row and column index)
csr       :math:`k\\,(b_v + i_c) + (r + 1)\\, p` (column index per nonzero, one pointer per row, plus one)
delta     :math:`E\\,(b_v + b)`: relative indices of ``b`` bits; a gap longer than :math:`2^b` is bridged by
          explicitly stored zeros, so the number of entries is :math:`E = \\sum_i \\lceil g_i / 2^b \\rceil \\ge k`
ell       :math:`r\\,K\\,(b_v + i_c)` (ELLPACK: every row padded to the longest row, ``K`` nonzeros)
bsr       :math:`B\\,(R C b_v + i_{bc}) + (r/R + 1)\\, p_B` (blocked CSR, ``R x C`` blocks, ``B`` of them nonzero)
========  ==========================================================================================

Index widths are the fewest bits that tell the possible values apart, :math:`i_r = \\lceil \\log_2 r \\rceil`,
:math:`i_c = \\lceil \\log_2 c \\rceil`, :math:`p = \\lceil \\log_2 (k + 1) \\rceil` (a row pointer runs from 0
to :math:`k`), as in the survey; pass ``index_bits=32`` to count fixed-width indices as real libraries store them.
The survey's COO stores one flat offset of :math:`\\lceil \\log_2 n \\rceil` bits instead of two coordinates:
at most one bit less per nonzero.

Two ways to get a cost:

* :func:`storage_bits`: the **exact** cost of a concrete mask or weight tensor (actual row lengths, actual gaps
  between nonzeros for delta coding);
* :func:`expected_bits`: the **closed-form expected** cost as a function of ``(shape, sparsity)`` when every
  entry is nonzero independently with probability ``d`` (the survey's setting). For delta coding the gaps are
  then geometric, :math:`P(g = j) = d\\,s^{\\,j-1}`, and in a long vector the expected number of entries per
  nonzero is :math:`\\mathbb E \\lceil g / G \\rceil = \\sum_{t \\ge 0} s^{tG} = 1 / (1 - s^{G})` with
  :math:`G = 2^b` (the exact finite-length sum is used).

On top of them, :func:`best_format`, :func:`break_even_sparsity` (where a format becomes smaller than dense),
:func:`crossover_sparsities` (where the smallest format changes) and :func:`storage_report` (a pruned model,
layer by layer). :func:`flops` counts the multiply-adds of a model's Linear and Conv layers densely, skipping
zero weights (model sparsity), and, given real inputs, also skipping zero input activations (ephemeral sparsity,
survey §2.3).

Survey §2.2 and §2.3 {cite}`hoefler2021sparsity`; delta coding with zero padding as in Deep Compression
{cite}`han2016deep`. Defined in Chapter 01 (and used again in Chapter 13).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .masks import PRUNABLE_TYPES, _prunable_modules
from .plumbing import eval_mode

#: Every format this module prices, in the order of survey Fig. 5 (plus ELLPACK and blocked CSR).
FORMATS: Tuple[str, ...] = ("dense", "bitmap", "coo", "csr", "delta", "ell", "bsr")
#: The formats of survey Fig. 5, compared by default in :func:`best_format` and :func:`crossover_sparsities`.
SURVEY_FORMATS: Tuple[str, ...] = ("dense", "bitmap", "coo", "csr", "delta")
#: Largest relative-index width tried when ``delta_bits=None`` picks the best one.
MAX_DELTA_BITS = 64
#: Costs closer than this (relative) are a tie in :func:`best_format`, won by the format listed first.
RELATIVE_TIE = 1e-9


# ----------------------------------------------------------------------------------------------- validation
def _check_format(fmt) -> str:
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    return fmt.lower()


def _check_formats(formats) -> Tuple[str, ...]:
    if isinstance(formats, str):
        formats = (formats,)
    try:
        formats = tuple(_check_format(f) for f in formats)
    except TypeError:
        raise TypeError(f"formats must be a sequence of format names from {FORMATS}, got {formats!r}") from None
    if not formats:
        raise ValueError(f"formats must name at least one of {FORMATS}")
    return formats


def _check_positive_int(value, name: str, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if value < 1 or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name} must be an integer >= 1{upper}, got {value!r}")
    return int(value)


def _check_optional_bits(value, name: str, maximum: int = 64) -> Optional[int]:
    if value is None:
        return None
    return _check_positive_int(value, name, maximum)


def _check_shape(shape) -> Tuple[int, ...]:
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (int(shape),)
    if not isinstance(shape, (tuple, list)) or not shape or any(
            isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive integers, got {shape!r}")
    return tuple(int(v) for v in shape)


def _check_sparsity(sparsity) -> float:
    """Sparsity of a *format* question may be 1 (an all-zero matrix still has a size), unlike ``sl.prune``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating, np.integer)):
        raise TypeError(f"sparsity must be a number in [0, 1], got {sparsity!r}")
    sparsity = float(sparsity)
    if math.isnan(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1] (the fraction of zero entries), got {sparsity!r}")
    return sparsity


def _check_block(block) -> Tuple[int, int]:
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise ValueError(f"block must be a pair (rows, cols) of positive integers, got {block!r}")
    return (_check_positive_int(block[0], "block[0]"), _check_positive_int(block[1], "block[1]"))


def _nonzero_pattern(x) -> torch.Tensor:
    """A boolean tensor: ``x`` itself if boolean (a mask, True = stored), else ``x != 0``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or numpy array (a bool mask or a weight), got {type(x).__name__}")
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"mask must have at least one dimension and one entry, got shape {tuple(x.shape)}")
    x = x.detach()
    return x if x.dtype == torch.bool else (x != 0)


# --------------------------------------------------------------------------------------------------- basics
def index_bits(count: int) -> int:
    """Fewest bits that tell ``count`` values apart: :math:`\\lceil \\log_2 \\text{count} \\rceil` (0 for one value).

    E.g. a column index of a 300-column matrix needs ``index_bits(300) == 9`` bits; a row pointer that runs
    from 0 to ``m`` needs ``index_bits(m + 1)``.
    """
    count = int(count)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    return (count - 1).bit_length()


def as_matrix_shape(shape) -> Tuple[int, int]:
    """The ``(rows, cols)`` a tensor is stored as: a vector is one row, a convolution ``(out, in, k1, ...)`` is
    ``(out, in * k1 * ...)`` (output channels as rows, as in :mod:`sparsity_lib.select`)."""
    shape = _check_shape(shape)
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], int(math.prod(shape[1:]))


def _fixed_or_minimal(index_bits_arg: Optional[int], needed: int, what: str) -> int:
    if index_bits_arg is None:
        return needed
    if index_bits_arg < needed:
        raise ValueError(f"index_bits={index_bits_arg} cannot hold {what}, which needs {needed} bits")
    return index_bits_arg


# ------------------------------------------------------------------------------------------ one formula each
def _dense(n: int, k: int) -> float:
    return float(n * k)


def _bitmap(n: int, m: float, k: int) -> float:
    return n + m * k


def _coo(rows: int, cols: int, m: float, k: int, ib: Optional[int]) -> float:
    i_r = _fixed_or_minimal(ib, index_bits(rows), f"a row index of {rows} rows")
    i_c = _fixed_or_minimal(ib, index_bits(cols), f"a column index of {cols} columns")
    return m * (k + i_r + i_c)


def _csr(rows: int, cols: int, m: float, k: int, ib: Optional[int]) -> float:
    i_c = _fixed_or_minimal(ib, index_bits(cols), f"a column index of {cols} columns")
    p = _fixed_or_minimal(ib, index_bits(int(round(m)) + 1), f"a row pointer up to {int(round(m))}")
    return m * (k + i_c) + (rows + 1) * p


def _ell(rows: int, cols: int, widest_row: float, k: int, ib: Optional[int]) -> float:
    i_c = _fixed_or_minimal(ib, index_bits(cols), f"a column index of {cols} columns")
    return rows * widest_row * (k + i_c)


def _bsr(rows: int, cols: int, nonzero_blocks: float, block: Tuple[int, int], k: int, ib: Optional[int]) -> float:
    br, bc = block
    block_rows, block_cols = math.ceil(rows / br), math.ceil(cols / bc)
    i_bc = _fixed_or_minimal(ib, index_bits(block_cols), f"a block-column index of {block_cols} block columns")
    p = _fixed_or_minimal(ib, index_bits(int(round(nonzero_blocks)) + 1),
                          f"a block-row pointer up to {int(round(nonzero_blocks))}")
    return nonzero_blocks * (br * bc * k + i_bc) + (block_rows + 1) * p


def _delta_entries_exact(positions: np.ndarray, bits: int) -> int:
    """Entries of zero-padded delta coding: nonzeros plus the explicit zeros that bridge long gaps."""
    if positions.size == 0:
        return 0
    gaps = np.diff(positions, prepend=-1)  # g_i = p_i - p_{i-1} >= 1, with p_{-1} = -1
    span = 1 << bits                         # a b-bit field stores g - 1 in 0 .. 2^b - 1, so gaps up to 2^b
    return int(np.sum(-(-gaps // span)))     # sum of ceil(g_i / 2^b)


def _delta_entries_expected(n: int, s: float, bits: int) -> float:
    """Expected entries (nonzeros plus padding zeros) of delta coding with ``bits``-bit fields, for ``n`` entries
    each nonzero independently with probability :math:`d = 1 - s`.

    A padding zero sits at position ``q`` when ``q`` lies a positive multiple :math:`tG` (:math:`G = 2^b`) after
    the previous nonzero (or after the start, :math:`p_{-1} = -1`) and a nonzero follows later. Summing these
    probabilities over ``q`` (the terms at the start of the vector cancel exactly) gives

    .. math:: \\mathbb E[E] = n d + d \\sum_{t=1}^{T} (n - tG)\\, s^{tG}, \\qquad T = \\lfloor (n - 1) / G \\rfloor,

    which tends to :math:`k / (1 - s^{G})` for a long vector (geometric gaps). The sum has the
    closed form of an arithmetico-geometric series in :math:`r = s^G`; short sums are added term by term.
    """
    d = 1.0 - s
    if d <= 0.0:
        return 0.0
    span = 2 ** bits
    terms = (n - 1) // span
    if s == 0.0 or terms == 0:
        return n * d
    log_r = span * math.log(s)
    if terms <= 4096:
        t = np.arange(1, terms + 1, dtype=np.float64)
        padding = float(np.sum((n - t * span) * np.exp(t * log_r)))
    else:
        r = math.exp(log_r)
        one_minus_r = -math.expm1(log_r)
        r_pow_t = math.exp(terms * log_r)
        geometric = r * -math.expm1(terms * log_r) / one_minus_r           # sum_t r^t
        weighted = (geometric - terms * r_pow_t * r) / one_minus_r          # sum_t t r^t
        padding = n * geometric - span * weighted
    return n * d + d * padding


def _delta_bits_range(n: int) -> range:
    # beyond ceil(log2 n) bits no gap ever needs padding, so wider fields only cost more
    return range(1, min(MAX_DELTA_BITS, max(1, index_bits(n))) + 1)


def _expected_widest_row(rows: int, cols: int, d: float) -> float:
    """:math:`\\mathbb E \\max_i X_i` for ``rows`` i.i.d. :math:`X_i \\sim \\mathrm{Binomial}(\\text{cols}, d)`:
    :math:`\\sum_{j=0}^{c-1} (1 - F(j)^r)`, with ``F`` the binomial CDF."""
    if d <= 0.0:
        return 0.0
    if d >= 1.0:
        return float(cols)
    from scipy.stats import binom

    j = np.arange(cols)
    log_cdf = binom.logcdf(j, cols, d)
    return float(np.sum(-np.expm1(rows * log_cdf)))


def _expected_nonzero_blocks(rows: int, cols: int, block: Tuple[int, int], s: float) -> float:
    """:math:`\\sum_{\\text{blocks}} (1 - s^{|\\text{block}|})` (edge blocks may be smaller: the padding is zeros)."""
    br, bc = block
    full_r, rest_r = divmod(rows, br)
    full_c, rest_c = divmod(cols, bc)
    total = 0.0
    for n_r, h in ((full_r, br), (1 if rest_r else 0, rest_r)):
        for n_c, w in ((full_c, bc), (1 if rest_c else 0, rest_c)):
            if n_r and n_c:
                total += n_r * n_c * (1.0 - s ** (h * w))
    return total


def _common_args(value_bits, index_bits_arg, delta_bits, block):
    return (_check_positive_int(value_bits, "value_bits", 1024), _check_optional_bits(index_bits_arg, "index_bits"),
            _check_optional_bits(delta_bits, "delta_bits", MAX_DELTA_BITS), _check_block(block))


# ----------------------------------------------------------------------------------------- the two costings
def expected_bits(fmt: str, shape, sparsity: float, *, value_bits: int = 32, index_bits: Optional[int] = None,
                  delta_bits: Optional[int] = None, block: Tuple[int, int] = (4, 4)) -> float:
    """Closed-form expected storage, in bits, of a ``shape`` tensor at ``sparsity`` in format ``fmt``.

    Every entry is nonzero independently with probability :math:`d = 1 - s`; :math:`k = d n` nonzeros of
    ``value_bits`` = :math:`b_v` bits each, in an ``r x c`` matrix (see :func:`as_matrix_shape`):

    * dense :math:`n b_v`; bitmap :math:`n + k b_v`; COO :math:`k (b_v + i_r + i_c)`;
      CSR :math:`k (b_v + i_c) + (r + 1) \\lceil \\log_2 (k + 1) \\rceil` (survey §2.2);
    * delta with ``b = delta_bits``: :math:`(b_v + b)\\,\\mathbb E[E]` with the expected entries (nonzeros and
      padding zeros) :math:`\\mathbb E[E] = n d + d \\sum_{t=1}^{T} (n - tG) s^{tG}`, :math:`G = 2^b`,
      :math:`T = \\lfloor (n-1)/G \\rfloor`, about :math:`k / (1 - s^{G})` (geometric gaps);
      ``delta_bits=None`` takes the ``b`` with the smallest expected cost, as an encoder would;
    * ELL: :math:`r\\, \\mathbb E[K] (b_v + i_c)`, ``K`` the longest row, :math:`\\mathbb E[K] = \\sum_j 1 - F(j)^r`
      with ``F`` the Binomial(``cols``, ``d``) CDF;
    * BSR with ``block = (R, C)``: :math:`\\mathbb E[B] = \\frac{n}{RC} (1 - s^{RC})` nonzero blocks, each stored
      densely with one block-column index, plus :math:`r / R + 1` block-row pointers.

    ``index_bits=None`` uses the fewest bits for every index (the survey's convention); an integer (16, 32)
    counts fixed-width indices and row pointers as libraries store them (too narrow a width raises).

    Example (survey §2.2: 10^4 x 10^4 values of 8 bits; the bitmap wins at 50% sparsity)::

        >>> {f: expected_bits(f, (10_000, 10_000), 0.5, value_bits=8) / 1e8 for f in ("dense", "bitmap")}
        {'dense': 8.0, 'bitmap': 5.0}
    """
    fmt = _check_format(fmt)
    shape = _check_shape(shape)
    s = _check_sparsity(sparsity)
    k, ib, db, block = _common_args(value_bits, index_bits, delta_bits, block)
    rows, cols = as_matrix_shape(shape)
    n = rows * cols
    d = 1.0 - s
    m = d * n
    if fmt == "dense":
        return _dense(n, k)
    if fmt == "bitmap":
        return _bitmap(n, m, k)
    if fmt == "coo":
        return _coo(rows, cols, m, k, ib)
    if fmt == "csr":
        return _csr(rows, cols, m, k, ib)
    if fmt == "delta":
        candidates = [db] if db is not None else _delta_bits_range(n)
        return min(_delta_entries_expected(n, s, b) * (k + b) for b in candidates)
    if fmt == "ell":
        return _ell(rows, cols, _expected_widest_row(rows, cols, d), k, ib)
    return _bsr(rows, cols, _expected_nonzero_blocks(rows, cols, block, s), block, k, ib)


def storage_bits(mask, fmt: str, *, value_bits: int = 32, index_bits: Optional[int] = None,
                 delta_bits: Optional[int] = None, block: Tuple[int, int] = (4, 4)) -> int:
    """Exact storage, in bits, of one concrete tensor in format ``fmt``.

    ``mask`` is a boolean tensor (``True`` = stored) or any weight tensor (its nonzeros are stored), viewed as
    a ``(rows, cols)`` matrix (:func:`as_matrix_shape`) and read in row-major order. The formulas are those of
    :func:`expected_bits` with the actual numbers: :math:`k` the nonzeros, ``K`` the longest row, ``B`` the
    nonzero blocks, and for delta coding the actual gaps :math:`g_i = p_i - p_{i-1}` between consecutive
    nonzero positions (:math:`p_{-1} = -1`): a ``b``-bit field holds gaps up to :math:`2^b`, a longer gap is
    bridged by :math:`\\lceil g_i / 2^b \\rceil - 1` explicitly stored zeros (Han et al. {cite}`han2016deep`),
    so the cost is :math:`(b_v + b) \\sum_i \\lceil g_i / 2^b \\rceil`. ``delta_bits=None`` picks the cheapest
    ``b``; it is never worse than the unpadded :math:`b = \\lceil \\log_2 \\hat g \\rceil` of survey §2.2
    (:math:`\\hat g` the largest gap), which is among the candidates.

    Example (the vector of survey Fig. 5, 12 entries, 4 nonzeros, 8-bit values)::

        >>> v = torch.tensor([0, 2, 0, 0, 3, 4, 0, 0, 0, 0, 0, 5])
        >>> storage_bits(v, "bitmap", value_bits=8), storage_bits(v, "coo", value_bits=8)
        (44, 48)
    """
    fmt = _check_format(fmt)
    pattern = _nonzero_pattern(mask)
    k, ib, db, block = _common_args(value_bits, index_bits, delta_bits, block)
    rows, cols = as_matrix_shape(tuple(pattern.shape))
    n = rows * cols
    matrix = pattern.reshape(rows, cols)
    m = int(matrix.sum())
    if fmt == "dense":
        return int(_dense(n, k))
    if fmt == "bitmap":
        return int(_bitmap(n, m, k))
    if fmt == "coo":
        return int(_coo(rows, cols, m, k, ib))
    if fmt == "csr":
        return int(_csr(rows, cols, m, k, ib))
    if fmt == "delta":
        positions = torch.nonzero(matrix.reshape(-1)).reshape(-1).cpu().numpy().astype(np.int64)
        candidates = [db] if db is not None else _delta_bits_range(n)
        return int(min(_delta_entries_exact(positions, b) * (k + b) for b in candidates))
    if fmt == "ell":
        widest = int(matrix.sum(1).max())
        return int(_ell(rows, cols, widest, k, ib))
    br, bc = block
    padded = torch.zeros(math.ceil(rows / br) * br, math.ceil(cols / bc) * bc, dtype=torch.bool)
    padded[:rows, :cols] = matrix.cpu()
    tiles = padded.reshape(padded.shape[0] // br, br, padded.shape[1] // bc, bc)
    nonzero_blocks = int(tiles.any(dim=3).any(dim=1).sum())
    return int(_bsr(rows, cols, nonzero_blocks, block, k, ib))


def best_delta_bits(mask=None, *, shape=None, sparsity: Optional[float] = None, value_bits: int = 32) -> int:
    """The relative-index width ``b`` that ``delta_bits=None`` chooses: for a concrete ``mask`` (exact cost) or
    for ``shape`` and ``sparsity`` (expected cost). Ties go to the narrower field."""
    k = _check_positive_int(value_bits, "value_bits", 1024)
    if mask is not None:
        pattern = _nonzero_pattern(mask).reshape(-1)
        positions = torch.nonzero(pattern).reshape(-1).cpu().numpy().astype(np.int64)
        costs = {b: _delta_entries_exact(positions, b) * (k + b) for b in _delta_bits_range(pattern.numel())}
    else:
        if shape is None or sparsity is None:
            raise ValueError("best_delta_bits needs a mask, or both shape and sparsity")
        rows, cols = as_matrix_shape(shape)
        s = _check_sparsity(sparsity)
        costs = {b: _delta_entries_expected(rows * cols, s, b) * (k + b)
                 for b in _delta_bits_range(rows * cols)}
    return min(costs, key=lambda b: (costs[b], b))


# --------------------------------------------------------------------------------------------- comparisons
def best_format(shape, sparsity: float, *, formats: Sequence[str] = SURVEY_FORMATS, **cost_options) -> str:
    """The format of ``formats`` with the smallest :func:`expected_bits` at ``sparsity``.

    Costs within a relative ``1e-9`` of the smallest count as ties, won by the format listed first (so that
    floating-point noise never decides: e.g. at :math:`s = 1/b_v` dense, bitmap and 1-bit delta coding cost the
    same). ``cost_options`` are those of :func:`expected_bits` (``value_bits``, ``index_bits``, ``delta_bits``,
    ``block``).
    """
    formats = _check_formats(formats)
    costs = {f: expected_bits(f, shape, sparsity, **cost_options) for f in formats}
    smallest = min(costs.values())
    return next(f for f in formats if costs[f] <= smallest * (1 + RELATIVE_TIE) + 1e-12)


def _bisect(fn, lo: float, hi: float, tol: float) -> float:
    """Smallest ``x`` in ``(lo, hi]`` (to ``tol``) with ``fn(x)`` True, given ``fn(lo)`` False and ``fn(hi)`` True."""
    while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        if fn(mid):
            hi = mid
        else:
            lo = mid
    return hi


def break_even_sparsity(fmt: str, shape, *, tol: float = 1e-9, **cost_options) -> Optional[float]:
    """The smallest sparsity at which ``fmt`` is no larger than dense storage (``None`` if it never is).

    Found by bisection on :func:`expected_bits` (every sparse format's expected cost falls monotonically with
    sparsity). Closed forms to check it against, with :math:`b_v` = ``value_bits``:

    * bitmap: :math:`n + (1 - s) n b_v \\le n b_v \\iff s \\ge 1 / b_v` (3.1% for 32-bit values, 12.5% for 8-bit);
    * COO: :math:`(1 - s)(b_v + i_r + i_c) \\le b_v \\iff s \\ge (i_r + i_c) / (b_v + i_r + i_c)`;
    * CSR: :math:`s \\ge i_c / (b_v + i_c) + (r + 1) p / (n (b_v + i_c))` (up to the slowly varying pointer width
      :math:`p`).
    """
    fmt = _check_format(fmt)
    shape = _check_shape(shape)

    def wins(s):
        return expected_bits(fmt, shape, s, **cost_options) <= expected_bits("dense", shape, s, **cost_options)

    if wins(0.0):
        return 0.0
    if not wins(1.0):
        return None
    return _bisect(wins, 0.0, 1.0, tol)


class Crossover(NamedTuple):
    """At ``sparsity`` the smallest format changes from ``before`` to ``after``."""

    sparsity: float
    before: str
    after: str


def _sparsity_grid(n: int, points: int) -> np.ndarray:
    """Linear in sparsity up to 99%, then logarithmic in density down to one expected nonzero, ``1 - 1/n``."""
    top = 1.0 - 1.0 / n
    linear = np.linspace(0.0, min(0.99, top), points)
    densities = np.logspace(-2, math.log10(1.0 / n), points) if n > 100 else np.array([])
    return np.unique(np.concatenate([linear, 1.0 - densities, [top]]))


def crossover_sparsities(shape, *, formats: Sequence[str] = SURVEY_FORMATS, points: int = 400, tol: float = 1e-9,
                         **cost_options) -> List[Crossover]:
    """Where the smallest format changes as sparsity grows from 0 to 1: a list of :class:`Crossover`.

    The first entry's ``before`` is the winner at sparsity 0 (dense, unless ``formats`` excludes it), and each
    ``after`` *starts to win* at that entry's sparsity (up to the next entry). The winners (:func:`best_format`)
    are compared on a grid (``points`` linear steps to 99%, as many logarithmic ones in density down to one
    expected nonzero, :math:`s = 1 - 1/n`), then each change is located by bisection to ``tol``.

    Example (survey §2.2: 10^4 x 10^4, 8-bit values; bitmap from 12.5%, delta from about 76%)::

        >>> [(round(c.sparsity, 3), c.before, c.after) for c in crossover_sparsities((10**4, 10**4), value_bits=8)]
        [(0.125, 'dense', 'bitmap'), (0.759, 'bitmap', 'delta')]
    """
    formats = _check_formats(formats)
    shape = _check_shape(shape)
    rows, cols = as_matrix_shape(shape)
    _check_positive_int(points, "points")
    grid = _sparsity_grid(rows * cols, points)

    def winner(s):
        return best_format(shape, s, formats=formats, **cost_options)

    winners = [winner(s) for s in grid]
    out: List[Crossover] = []
    for i in range(1, len(grid)):
        lo, before = float(grid[i - 1]), winners[i - 1]
        for _ in range(2 * len(formats)):  # several changes may hide between two grid points
            if before == winners[i]:
                break
            at = _bisect(lambda s: winner(s) != before, lo, float(grid[i]), tol)
            after = winner(at)
            out.append(Crossover(at, before, after))
            lo, before = at, after
    return out


def winning_ranges(shape, *, formats: Sequence[str] = SURVEY_FORMATS, **options) -> Dict[str, List[Tuple[float, float]]]:
    """``{format: [(from_sparsity, to_sparsity), ...]}``: the sparsity intervals in which each format is smallest.

    Built from :func:`crossover_sparsities` (same options); formats that never win are absent.
    """
    formats = _check_formats(formats)
    crossings = crossover_sparsities(shape, formats=formats, **options)
    first = best_format(shape, 0.0, formats=formats,
                        **{k: v for k, v in options.items() if k not in ("points", "tol")})
    edges = [0.0] + [c.sparsity for c in crossings] + [1.0]
    names = [first] + [c.after for c in crossings]
    out: Dict[str, List[Tuple[float, float]]] = {}
    for name, lo, hi in zip(names, edges[:-1], edges[1:]):
        out.setdefault(name, []).append((lo, hi))
    return out


def storage_report(model: nn.Module, *, formats: Sequence[str] = SURVEY_FORMATS, value_bits: int = 32,
                   index_bits: Optional[int] = None, delta_bits: Optional[int] = None,
                   block: Tuple[int, int] = (4, 4)):
    """Exact storage of every prunable weight of ``model`` in each format, in bits, with the smallest per layer.

    Rows: one per prunable weight (by its dense name) and a ``total`` row; columns: ``shape``, ``sparsity``,
    one column of bits per format, and ``best``. In the total row each format's bits are summed over layers
    and ``best_mixed`` (a column) gives the total when each layer uses its own best format. A pandas
    ``DataFrame`` (a list of dicts without pandas). The model is not changed.
    """
    formats = _check_formats(formats)
    modules = _prunable_modules(model)
    if not modules:
        raise ValueError("model has no prunable weights (Linear or Conv layers)")
    rows = []
    with torch.no_grad():
        for name, module in modules.items():
            weight = getattr(module, name.rsplit('.', 1)[-1])
            costs = {f: storage_bits(weight, f, value_bits=value_bits, index_bits=index_bits,
                                     delta_bits=delta_bits, block=block) for f in formats}
            best = min(formats, key=lambda f: costs[f])
            rows.append({"name": name, "shape": tuple(weight.shape),
                         "sparsity": float((weight == 0).float().mean()), **costs, "best": best,
                         "best_mixed": costs[best]})
    total_params = sum(math.prod(r["shape"]) for r in rows)
    total = {"name": "total", "shape": "",
             "sparsity": sum(r["sparsity"] * math.prod(r["shape"]) for r in rows) / total_params}
    for f in formats:
        total[f] = sum(r[f] for r in rows)
    total["best"] = min(formats, key=lambda f: total[f])
    total["best_mixed"] = sum(r["best_mixed"] for r in rows)
    rows.append(total)
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        return rows
    return pd.DataFrame(rows).set_index("name")


# ----------------------------------------------------------------------------------------------------- FLOPs
@dataclass
class FlopCount:
    """Multiply-adds (MACs) of the Linear and Conv layers of one forward pass (biases and activations excluded).

    Attributes:
        dense: every multiply-add, zeros included.
        weight_sparse: skipping zero weights (model sparsity, the same for every input).
        activation_sparse: skipping zero weights *and* zero inputs of each layer (model and ephemeral sparsity);
            ``None`` when :func:`flops` was given only a shape.
        per_example: ``activation_sparse`` of each example (a tensor), or ``None``.
        layers: one dict per layer: ``name``, ``dense``, ``weight_sparse``, ``activation_sparse``,
            ``weight_density``, ``input_density`` (fraction of nonzero inputs; ``None`` without real inputs).
        batch_size: the number of examples the counts are summed over.
    """

    dense: int
    weight_sparse: int
    activation_sparse: Optional[int]
    per_example: Optional[torch.Tensor]
    layers: List[dict] = field(default_factory=list)
    batch_size: int = 1

    @property
    def weight_reduction(self) -> float:
        """``dense / weight_sparse``: the ideal speed-up from model sparsity alone (inf if nothing is left)."""
        return self.dense / self.weight_sparse if self.weight_sparse else math.inf

    @property
    def activation_reduction(self) -> Optional[float]:
        """``dense / activation_sparse``: the ideal speed-up from model and ephemeral sparsity together."""
        if self.activation_sparse is None:
            return None
        return self.dense / self.activation_sparse if self.activation_sparse else math.inf

    def table(self):
        """The per-layer counts as a pandas ``DataFrame`` (with a total row)."""
        import pandas as pd

        total = {"name": "total", "dense": self.dense, "weight_sparse": self.weight_sparse,
                 "activation_sparse": self.activation_sparse,
                 "weight_density": self.weight_sparse / self.dense if self.dense else math.nan,
                 "input_density": None}
        return pd.DataFrame(self.layers + [total]).set_index("name")


def _conv_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # isinstance, not type(): a masked layer's class is a parametrized subclass (ParametrizedConv2d)
    fn = next(f for t, f in ((nn.Conv1d, F.conv1d), (nn.Conv2d, F.conv2d), (nn.Conv3d, F.conv3d))
              if isinstance(module, t))
    if module.padding_mode != "zeros":
        raise ValueError(f"flops counts convolutions with zero padding only, {type(module).__name__} has "
                         f"padding_mode={module.padding_mode!r}")
    return fn(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


def flops(model: nn.Module, inputs) -> FlopCount:
    """Count the multiply-adds of ``model``'s Linear and Conv layers for one forward pass.

    ``inputs`` is the shape of one example (e.g. ``(64,)`` or ``(1, 8, 8)``: counts for a single example), or
    a batch tensor of real inputs (counts summed over the batch, and the ephemeral count is available). For a
    layer with weight :math:`W` (``out x fan_in`` after flattening a kernel) applied at :math:`P` output
    positions per example (1 for Linear, the output pixels for Conv):

    * dense: :math:`P \\cdot \\text{out} \\cdot \\text{fan\\_in}` per example;
    * weight-sparse: :math:`P \\cdot \\mathrm{nnz}(W)`: a pruned weight is never multiplied (model sparsity);
    * activation-sparse: the products :math:`w_{oj} x_{j}` with both factors nonzero, counted exactly as
      :math:`\\sum [x \\ne 0] \\ast [W \\ne 0]` (the same Linear/Conv applied to the indicator tensors), e.g. the
      zeros a ReLU leaves in the input of the next layer (ephemeral sparsity, survey §2.3).

    Zero padding of a convolution counts as in the dense count (multiplications by padded zeros are included
    in dense and weight-sparse counts, excluded from the activation-sparse one). The model is run once in eval
    mode under ``torch.no_grad()``; its mode is restored and nothing else changes.

    Ideal counts only: real speed-ups also depend on the format and the kernel (survey §2.2, §7; Chapter 13).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = {n: m for n, m in _prunable_modules(model).items() if isinstance(m, PRUNABLE_TYPES)}
    if not modules:
        raise ValueError("model has no Linear or Conv layers to count")
    param = next(iter(model.parameters()))
    real = isinstance(inputs, torch.Tensor)
    if real:
        if inputs.dim() < 1 or inputs.shape[0] < 1:
            raise ValueError(f"inputs must be a batch tensor (N, ...) with N >= 1, got shape {tuple(inputs.shape)}")
        x = inputs.to(device=param.device, dtype=param.dtype)
    else:
        shape = _check_shape(inputs) if not isinstance(inputs, (int, np.integer)) else _check_shape((inputs,))
        x = torch.zeros((1, *shape), device=param.device, dtype=param.dtype)
    batch = int(x.shape[0])
    names = {module: name for name, module in modules.items()}
    records: Dict[str, dict] = {}
    per_example = torch.zeros(batch, dtype=torch.float64)

    def hook(module, args, output):
        name = names[module]
        layer_in = args[0]
        weight = module.weight
        nonzero_w = (weight != 0).to(layer_in.dtype)
        if isinstance(module, nn.Linear):
            positions = output.numel() // (batch * module.out_features)
            dense = batch * positions * module.out_features * module.in_features
            weight_sparse = batch * positions * int(nonzero_w.sum())
            if real:
                act_ex = F.linear((layer_in != 0).to(layer_in.dtype), nonzero_w).reshape(batch, -1).sum(1)
        else:
            positions = output[0, 0].numel()
            fan_in = weight[0].numel()
            dense = batch * positions * module.out_channels * fan_in
            weight_sparse = batch * positions * int(nonzero_w.sum())
            if real:
                act_ex = _conv_forward(module, (layer_in != 0).to(layer_in.dtype), nonzero_w).reshape(batch, -1).sum(1)
        entry = records.setdefault(name, {"name": name, "dense": 0, "weight_sparse": 0,
                                          "activation_sparse": 0 if real else None,
                                          "weight_density": float(nonzero_w.mean()), "input_density": None})
        entry["dense"] += dense               # a layer called twice (weight sharing) counts twice
        entry["weight_sparse"] += weight_sparse
        if real:
            act_ex = act_ex.double().round()
            per_example.add_(act_ex.cpu())
            entry["activation_sparse"] += int(act_ex.sum())
            entry["input_density"] = float((layer_in != 0).float().mean())

    handles = [module.register_forward_hook(hook) for module in modules.values()]
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in records]
    if missing:
        raise ValueError(f"layers {missing} were not used in the forward pass, so their cost is unknown")
    layers = [records[n] for n in modules]
    dense = sum(r["dense"] for r in layers)
    weight_sparse = sum(r["weight_sparse"] for r in layers)
    activation_sparse = sum(r["activation_sparse"] for r in layers) if real else None
    return FlopCount(dense=dense, weight_sparse=weight_sparse, activation_sparse=activation_sparse,
                     per_example=per_example.long() if real else None, layers=layers, batch_size=batch)


__all__ = [
    "FORMATS", "SURVEY_FORMATS", "index_bits", "as_matrix_shape", "expected_bits", "storage_bits",
    "best_delta_bits", "best_format", "break_even_sparsity", "Crossover", "crossover_sparsities",
    "winning_ranges", "storage_report", "FlopCount", "flops",
]
