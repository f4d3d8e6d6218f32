"""Real sparse inference: from a masked model to one that *computes* with stored sparse weights.

Every other chapter simulates sparsity: a mask multiplies a dense weight and the dense kernels still run over
every zero (survey §7). :func:`to_sparse` turns a pruned model into one whose Linear and Conv layers hold only
their nonzero weights, in a ``torch.sparse`` format, and multiply with a sparse kernel:

* ``"csr"``: compressed sparse row (survey §2.2): the nonzero values, a column index for each, one pointer per
  row. A layer :math:`y = W x + b` is computed as :math:`Y^\\top = W X^\\top` with a sparse-times-dense
  product (``torch.sparse.mm``; on CPU it calls the sparse BLAS of MKL, on CUDA cuSPARSE), which touches each
  nonzero once per input: :math:`\\mathrm{nnz}(W) \\cdot N` multiply-adds instead of :math:`r c N`;
* ``"bsr"``: blocked CSR with ``R x C`` blocks: a block with any nonzero is stored densely, with one
  block-column index; the index cost falls by the block size :math:`RC` (survey §7.1.1, Fig. 23) and the kernel
  works on small dense tiles. It pays off only when the zeros come in blocks (``structure=("block", R, C)``);
* ``"dense"``: the same model with the masks baked into plain dense weights (the baseline).

A convolution is lowered to a matrix product by *im2col* (``torch.nn.functional.unfold``; survey §7.2.1,
Lavin & Gray): the ``out x (in * k_1 * k_2)`` weight matrix times the matrix of input patches, one column per
output position, so the same sparse kernels serve Linear and Conv layers.

Structured (neuron/row) sparsity needs no sparse format at all: :func:`compact` removes the pruned rows and the
matching columns of the next layer and leaves a smaller *dense* model (here through
:func:`sparsity_lib.models.shrink_mlp`, the row case of compaction; general channel and head compaction belong
to Chapter 12).

Storage is counted from the stored tensors themselves (:func:`storage_report`), and equals the closed forms of
:mod:`sparsity_lib.formats` with fixed-width indices (``index_bits=32`` for the default ``int32`` indices).
Sparse modules are for *inference*: their weights are buffers, not parameters.

Survey §2.2, §7 {cite}`hoefler2021sparsity`; GPU kernels for unstructured and block sparsity:
Gale et al. {cite}`gale2020sparse`, Gray et al. {cite}`gray2017gpu`; CPU kernels: Elsen et al.
{cite}`elsen2020fast`. Defined in Chapter 13.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from . import formats as _formats
from .masks import PRUNABLE_TYPES, _prunable_modules

#: The formats :func:`to_sparse` produces.
FORMATS: Tuple[str, ...] = ("dense", "csr", "bsr")
#: What :func:`to_sparse` does with a layer it cannot convert: raise, or keep it dense.
FALLBACKS: Tuple[str, ...] = ("raise", "dense")
_INDEX_DTYPES = (torch.int32, torch.int64)


# ----------------------------------------------------------------------------------------------- validation
def _check_format(fmt) -> str:
    if not isinstance(fmt, str) or fmt.lower() not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return fmt.lower()


def _check_blocksize(blocksize) -> Tuple[int, int]:
    if (not isinstance(blocksize, (tuple, list)) or len(blocksize) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in blocksize)):
        raise ValueError(f"blocksize must be a pair (rows, cols) of positive integers, got {blocksize!r}")
    return int(blocksize[0]), int(blocksize[1])


def _check_index_dtype(index_dtype) -> torch.dtype:
    if index_dtype not in _INDEX_DTYPES:
        raise ValueError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype!r}")
    return index_dtype


def _sparse_weight(matrix: torch.Tensor, fmt: str, blocksize: Tuple[int, int], index_dtype: torch.dtype):
    """``matrix`` (2-D, zeros where pruned) in ``fmt`` ("csr" or "bsr"), indices of ``index_dtype``."""
    matrix = matrix.detach().contiguous()
    rows, cols = matrix.shape
    if fmt == "bsr" and (rows % blocksize[0] or cols % blocksize[1]):
        raise ValueError(f"blocksize {blocksize} must divide the weight matrix {rows}x{cols} (torch's BSR has no "
                         f"partial blocks); choose another blocksize, format='csr', or fallback='dense'")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        sparse = matrix.to_sparse_csr() if fmt == "csr" else matrix.to_sparse_bsr(blocksize)
        make = torch.sparse_csr_tensor if fmt == "csr" else torch.sparse_bsr_tensor
        # check_invariants: validated once here, so that no kernel ever sees malformed indices
        return make(sparse.crow_indices().to(index_dtype), sparse.col_indices().to(index_dtype), sparse.values(),
                    size=matrix.shape, dtype=matrix.dtype, device=matrix.device, check_invariants=True)


def _bits_of(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size() * 8


# ---------------------------------------------------------------------------------------------- the modules
class _SparseMatrixLayer(nn.Module):
    """Shared parts of :class:`SparseLinear` and :class:`SparseConv`: a sparse ``out x fan_in`` weight matrix."""

    def __init__(self, matrix: torch.Tensor, bias: Optional[torch.Tensor], fmt: str = "csr",
                 blocksize: Tuple[int, int] = (4, 4), index_dtype: torch.dtype = torch.int32):
        super().__init__()
        fmt = _check_format(fmt)
        if fmt == "dense":
            raise ValueError("a sparse layer needs format 'csr' or 'bsr' (format='dense' keeps nn.Linear / nn.Conv)")
        if matrix.dim() != 2:
            raise ValueError(f"the weight matrix must be 2-D, got shape {tuple(matrix.shape)}")
        self.format = fmt
        self.blocksize = _check_blocksize(blocksize) if fmt == "bsr" else None
        self.index_dtype = _check_index_dtype(index_dtype)
        self.shape = tuple(matrix.shape)
        self.register_buffer("weight", _sparse_weight(matrix, fmt, self.blocksize, self.index_dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def __deepcopy__(self, memo):
        # torch cannot deepcopy a sparse compressed tensor (no storage to copy): copy its parts by hand
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_buffers":
                value = {k: (v.clone() if v is not None and v.layout != torch.strided else copy.deepcopy(v, memo))
                         for k, v in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def _matmul(self, columns: torch.Tensor) -> torch.Tensor:
        """:math:`W C` for a dense ``fan_in x M`` matrix ``C``: the sparse kernel."""
        return torch.sparse.mm(self.weight, columns)

    @property
    def nnz(self) -> int:
        """Stored nonzero weights (for BSR: the weights that are nonzero, not the stored block entries)."""
        return int((self.weight.values() != 0).sum())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / math.prod(self.shape)

    def dense_weight(self) -> torch.Tensor:
        """The weight matrix as a dense tensor (``out x fan_in``; a Conv's kernel flattened)."""
        return self.weight.to_dense()

    def storage_bits(self) -> int:
        """Bits of the stored tensors: values, column (block-column) indices and row (block-row) pointers.

        For CSR this is :math:`k b_v + k\\,i + (r + 1)\\,i`, for BSR :math:`B (R C b_v + i) + (r / R + 1)\\, i`
        with :math:`i` the index width: the formulas of :func:`sparsity_lib.formats.storage_bits` with
        ``index_bits`` = the width of the index dtype. The bias is not counted (it is dense in every format).
        """
        w = self.weight
        return _bits_of(w.values()) + _bits_of(w.col_indices()) + _bits_of(w.crow_indices())

    def _extra(self) -> str:
        block = f", blocksize={self.blocksize}" if self.format == "bsr" else ""
        return (f"format={self.format!r}{block}, nnz={self.nnz}, sparsity={self.sparsity:.4f}, "
                f"bias={self.bias is not None}")


class SparseLinear(_SparseMatrixLayer):
    """A Linear layer computed with a sparse weight: :math:`y = x W^\\top + b`, as :math:`(W x^\\top)^\\top + b`.

    Arguments:
        weight: the dense ``out x in`` weight, zeros where pruned (e.g. a masked layer's ``weight``).
        bias: ``out`` values or ``None``.
        format: ``"csr"`` or ``"bsr"``; ``blocksize`` the BSR block ``(R, C)``, which must divide the shape.
        index_dtype: ``torch.int32`` (default; half the index storage of int64, and faster in MKL) or ``int64``.

    The weight is a buffer (``self.weight``, a ``torch.sparse_csr`` or ``sparse_bsr`` tensor): the layer is for
    inference, not training. Inputs of any leading shape ``(..., in)`` are accepted, as by ``nn.Linear``.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, format: str = "csr",
                 blocksize: Tuple[int, int] = (4, 4), index_dtype: torch.dtype = torch.int32):
        super().__init__(weight, bias, format, blocksize, index_dtype)
        self.out_features, self.in_features = self.shape

    @classmethod
    def from_linear(cls, layer: nn.Linear, **options) -> "SparseLinear":
        """The sparse version of ``layer`` (its effective weight: a masked layer's ``original * mask``)."""
        return cls(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), **options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features in the last dimension, "
                             f"got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        y = self._matmul(x.reshape(-1, self.in_features).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + self._extra()


class SparseConv(_SparseMatrixLayer):
    """A Conv1d/Conv2d computed by im2col and a sparse matrix product (survey §7.2.1).

    The input's patches are unfolded into a ``(in * k_1 * k_2) x (N * P)`` matrix ``X`` (``P`` output positions
    per example; ``torch.nn.functional.unfold``), multiplied by the sparse ``out x (in * k_1 * k_2)`` weight
    matrix, and folded back to ``(N, out, ...)``. Outputs equal those of the dense convolution with the same
    weight (to float rounding). Supported: ``groups=1``, ``padding_mode="zeros"``, numeric or ``"valid"``
    padding; anything else raises (see :func:`to_sparse`'s ``fallback``). im2col copies each input value up
    to :math:`k_1 k_2` times, a cost the sparse product must win back.
    """

    def __init__(self, conv: nn.Module, format: str = "csr", blocksize: Tuple[int, int] = (4, 4),
                 index_dtype: torch.dtype = torch.int32):
        check_conv(conv)
        weight = conv.weight.detach()
        super().__init__(weight.reshape(weight.shape[0], -1), None if conv.bias is None else conv.bias.detach(),
                         format, blocksize, index_dtype)
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        pad = (0,) * self.dims if conv.padding == "valid" else tuple(conv.padding)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = pad, tuple(conv.dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == self.dims + 1
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != self.dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected inputs (N, {self.in_channels}, ...) with {self.dims} spatial dimension(s), "
                             f"got shape {tuple(x.shape)}")
        if self.dims == 1:   # a 1-D convolution is a 2-D one over a height-1 image
            x4 = x.unsqueeze(2)
            k, s, p, d = (1, *self.kernel_size), (1, *self.stride), (0, *self.padding), (1, *self.dilation)
        else:
            x4, k, s, p, d = x, self.kernel_size, self.stride, self.padding, self.dilation
        n = x4.shape[0]
        out_hw = [(x4.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(2)]
        columns = F.unfold(x4, k, dilation=d, padding=p, stride=s)            # (N, fan_in, P)
        fan_in, positions = columns.shape[1], columns.shape[2]
        columns = columns.transpose(0, 1).reshape(fan_in, n * positions)     # (fan_in, N*P)
        y = self._matmul(columns).reshape(self.out_channels, n, positions).transpose(0, 1)
        if self.bias is not None:
            y = y + self.bias[:, None]
        y = y.reshape(n, self.out_channels, *(out_hw if self.dims == 2 else out_hw[1:]))
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, " + self._extra())


def check_conv(conv: nn.Module) -> None:
    """Raise ``ValueError`` (naming the reason) unless :class:`SparseConv` can compute ``conv`` exactly."""
    if not isinstance(conv, (nn.Conv1d, nn.Conv2d)):
        raise ValueError(f"SparseConv supports Conv1d and Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"SparseConv supports groups=1 only, got groups={conv.groups}")
    if conv.padding_mode != "zeros":
        raise ValueError(f"SparseConv supports padding_mode='zeros' only, got {conv.padding_mode!r}")
    if isinstance(conv.padding, str) and conv.padding != "valid":
        raise ValueError(f"SparseConv supports numeric or 'valid' padding, got padding={conv.padding!r}")


# ------------------------------------------------------------------------------------------------ conversion
def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _plain_layer(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """A new plain ``nn.Linear`` / ``nn.ConvNd`` with the hyper-parameters of ``module`` and the given weight."""
    bias = module.bias
    kwargs = dict(bias=bias is not None, device=weight.device, dtype=weight.dtype)
    if isinstance(module, nn.Linear):
        new = nn.Linear(module.in_features, module.out_features, **kwargs)
    else:
        base = next(t for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(module, t))
        new = base(module.in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                   padding=module.padding, dilation=module.dilation, groups=module.groups,
                   padding_mode=module.padding_mode, **kwargs)
    with torch.no_grad():
        new.weight.copy_(weight)
        new.weight.requires_grad_(weight.requires_grad)
        if bias is not None:
            new.bias.copy_(bias.detach())
            new.bias.requires_grad_(bias.requires_grad)
    new.train(module.training)
    return new


def _baked_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{module name: plain layer}``: every prunable layer with its effective weight baked in (masks multiplied,
    any parametrization evaluated in eval mode, so stochastic gates and dropout are deterministic)."""
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = {}
            for name, module in _prunable_modules(model).items():
                if not isinstance(module, PRUNABLE_TYPES):   # attention in-projections stay as they are
                    continue
                stored = (module.parametrizations["weight"].original if parametrize.is_parametrized(module, "weight")
                          else module.weight)
                weight = module.weight.detach().clone().requires_grad_(stored.requires_grad)
                out[name[: -len(".weight")] if name.endswith(".weight") else ""] = (module, weight)
    finally:
        for m, t in was_training.items():
            m.train(t)
    return {name: _plain_layer(module, weight) for name, (module, weight) in out.items()}


def to_sparse(model: nn.Module, format: str = "csr", *, blocksize: Tuple[int, int] = (4, 4),
              index_dtype: torch.dtype = torch.int32, min_sparsity: float = 0.0, fallback: str = "raise",
              layers: Optional[Sequence[str]] = None) -> nn.Module:
    """A copy of ``model`` whose pruned Linear and Conv layers compute with sparse weights; ``model`` is unchanged.

    Every prunable layer (``sl.prunable`` names, e.g. ``"fc1.weight"``) of the copy is handled so:

    1. its effective weight (``original * mask`` for a masked layer, any parametrization evaluated in eval mode)
       is baked into a plain weight: the copy carries no masks;
    2. with ``format="csr"`` or ``"bsr"``, a layer whose weight sparsity is at least ``min_sparsity`` is replaced
       by a :class:`SparseLinear` (``nn.Linear``) or :class:`SparseConv` (``nn.Conv1d``/``nn.Conv2d``, by
       im2col) holding only the nonzeros; other layers stay dense. ``format="dense"`` stops after step 1.

    The copy computes the same function as ``model`` (to float rounding; tested) and has the same mode
    (train/eval). A layer that cannot be converted (Conv3d, grouped convolutions, non-zero padding modes, a BSR
    ``blocksize`` that does not divide the weight matrix) raises ``ValueError`` naming it, unless
    ``fallback="dense"``, which keeps it dense. ``layers`` restricts the conversion to the named layers.

    Which format is *faster* depends on the sparsity, the batch size, the layer's size and the machine: measure
    it (:mod:`sparsity_lib.speed`, Chapter 13). Storage: :func:`storage_report`.

    Example::

        >>> net = sl.models.lenet_300_100(seed=0)
        >>> sl.prune(net, 0.95)
        >>> fast = sl.export.to_sparse(net, "csr")
        >>> fast.fc1
        SparseLinear(in_features=64, out_features=300, format='csr', nnz=..., sparsity=..., bias=True)
        >>> x = torch.randn(8, 64)
        >>> bool(torch.allclose(fast(x), net(x), atol=1e-5))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fmt = _check_format(format)
    blocksize = _check_blocksize(blocksize)
    index_dtype = _check_index_dtype(index_dtype)
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if isinstance(min_sparsity, bool) or not isinstance(min_sparsity, (int, float)) or not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")
    names = [n for n, m in _prunable_modules(model).items() if isinstance(m, PRUNABLE_TYPES)]
    if not names:
        raise ValueError("model has no Linear or Conv layers to convert")
    if layers is not None:
        unknown = [n for n in layers if n not in names]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; the prunable layers are {names}")
        selected = set(layers)
    else:
        selected = set(names)

    new = copy.deepcopy(model)   # not shared with `model`: its parametrized layers are replaced, never edited
    options = dict(format=fmt, blocksize=blocksize, index_dtype=index_dtype)
    problems = []
    for module_name, plain in _baked_layers(new).items():
        name = f"{module_name}.weight" if module_name else "weight"
        layer = plain
        sparsity = float((plain.weight == 0).float().mean())
        if fmt != "dense" and name in selected and sparsity >= min_sparsity:
            try:
                if isinstance(plain, nn.Linear):
                    layer = SparseLinear.from_linear(plain, **options)
                else:
                    layer = SparseConv(plain, **options)
                layer.train(plain.training)
            except ValueError as error:
                problems.append(f"{name}: {error}")
                if fallback == "raise":
                    continue
        if module_name:
            _set_submodule(new, module_name, layer)
        else:   # the model itself is a single layer
            new = layer
    if problems and fallback == "raise":
        raise ValueError("cannot convert " + "; ".join(problems) + " (fallback='dense' keeps such layers dense)")
    return new


def compact(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """The smaller *dense* model that row (neuron) pruning leaves: pruned rows, and the matching columns of the
    next layer, are deleted (survey §7: structured sparsity maps to dense operations). ``model`` is unchanged.

    Covers the book's MLPs through :func:`sparsity_lib.models.shrink_mlp` (constant neurons folded into the next
    bias; outputs equal to the masked model's). Any other model is handed to
    :func:`sparsity_lib.structure.compact` (Conv/BatchNorm/Linear chains with residual groups, Chapter 12), which
    traces it on ``example_input`` (required then) and refuses patterns it cannot follow; the book's
    :class:`~sparsity_lib.models.TinyTransformer` loses its pruned heads (:func:`sparsity_lib.attention.compact_heads`).
    """
    from .models import MLP, TinyTransformer, shrink_mlp

    if isinstance(model, MLP):
        return shrink_mlp(model)
    if isinstance(model, TinyTransformer):   # heads whose gate is 0 go (sparsity_lib.attention.compact_heads)
        from .attention import compact_heads

        return compact_heads(model)
    if example_input is None:
        raise TypeError(f"compact of a {type(model).__name__} (not a sparsity_lib.models.MLP) needs example_input, "
                        f"one batch of inputs to trace it on (sparsity_lib.structure.compact, Chapter 12)")
    from .structure import compact as compact_structure

    return compact_structure(model, example_input)


# ---------------------------------------------------------------------------------------------------- storage
def storage_report(model: nn.Module, value_bits: Optional[int] = None) -> List[Dict]:
    """Storage of every Linear/Conv layer of ``model`` (dense, masked or converted by :func:`to_sparse`).

    One record per layer: ``name``, ``format`` (``"dense"``, ``"csr"``, ``"bsr"``), ``shape`` (the weight
    matrix), ``nonzeros``, ``bits`` (the layer as stored: dense layers ``r c b_v``, sparse layers the bits of
    their tensors, :meth:`SparseLinear.storage_bits`), ``dense_bits`` and ``ratio = bits / dense_bits``. Biases
    are left out (the same in every format). ``value_bits`` defaults to the weights' own element size.
    A masked layer counts as dense: the mask simulates sparsity, it does not store it.
    """
    records = []
    for module_name, module in model.named_modules():
        if isinstance(module, _SparseMatrixLayer):
            rows, cols = module.shape
            bits = module.storage_bits()
            vb = value_bits or module.weight.values().element_size() * 8
            if value_bits:   # recount the values at the requested width
                bits += module.weight.values().numel() * (value_bits - module.weight.values().element_size() * 8)
            records.append({"name": module_name, "format": module.format, "shape": (rows, cols),
                            "nonzeros": module.nnz, "bits": int(bits), "dense_bits": rows * cols * vb})
        elif isinstance(module, PRUNABLE_TYPES):
            weight = module.weight.detach()
            rows, cols = _formats.as_matrix_shape(tuple(weight.shape))
            vb = value_bits or weight.element_size() * 8
            records.append({"name": module_name, "format": "dense", "shape": (rows, cols),
                            "nonzeros": int((weight != 0).sum()), "bits": rows * cols * vb,
                            "dense_bits": rows * cols * vb})
    for r in records:
        r["ratio"] = r["bits"] / r["dense_bits"]
    return records


__all__ = ["FORMATS", "FALLBACKS", "SparseLinear", "SparseConv", "check_conv", "to_sparse", "compact",
           "storage_report"]
