"""The book's models: small MLPs and CNNs whose prunable layers have short, stable names.

Layer names matter because masks, budgets and reports are keyed by them: an :class:`MLP` has ``fc1 .. fcL``,
so ``sl.prunable(mlp(...))`` gives ``{"fc1.weight", "fc2.weight", ...}``; the CNNs have ``conv1, conv2, ...``
and ``fc``.

Every factory takes a ``seed``: the initial weights are then drawn from ``torch.manual_seed(seed)`` inside
``torch.random.fork_rng()``, so the same seed gives the same network and the global RNG is left as it was
(``seed=None`` draws from the global RNG instead). The initialization is PyTorch's default (Kaiming-uniform
with ``a = sqrt(5)``).

Survey §8 (the model zoo of the pruning literature: LeNet-300-100 and LeNet-5 on MNIST,
Han et al. {cite}`han2015learning`, LeCun et al. {cite}`lecun1998gradient`). Defined for Chapter 01.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: Activation functions an :class:`MLP` can use, by name.
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "gelu": F.gelu,
}


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Draw from ``torch.manual_seed(seed)`` inside the block, leaving the global RNG as it was."""
    if seed is None:
        yield
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------- MLP
class MLP(nn.Module):
    """Fully connected network ``in_features -> hidden[0] -> ... -> hidden[-1] -> out_features``.

    The layers are ``fc1 .. fcL`` (``L = len(hidden) + 1``), with the activation between them and none after
    the last (the output are logits). Inputs of any shape ``(N, ...)`` are flattened to ``(N, in_features)``.

    Arguments:
        in_features, out_features: sizes of the input and output.
        hidden: widths of the hidden layers (may be empty: a linear model).
        activation: one of ``"relu"``, ``"tanh"``, ``"softplus"``, ``"gelu"``.
        bias: whether the Linear layers have biases.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int, activation: str = "relu",
                 bias: bool = True):
        super().__init__()
        _check_positive_int(in_features, "in_features")
        _check_positive_int(out_features, "out_features")
        hidden = [hidden] if isinstance(hidden, int) else list(hidden)
        for i, width in enumerate(hidden):
            _check_positive_int(width, f"hidden[{i}]")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        self.in_features, self.out_features, self.hidden = in_features, out_features, tuple(hidden)
        self.activation = activation
        self._act = ACTIVATIONS[activation]
        widths = [in_features, *hidden, out_features]
        self.num_layers = len(widths) - 1
        for i in range(self.num_layers):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1], bias=bias))

    def layers(self):
        """The Linear layers ``[fc1, ..., fcL]`` in order."""
        return [getattr(self, f"fc{i + 1}") for i in range(self.num_layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        layers = self.layers()
        for layer in layers[:-1]:
            x = self._act(layer(x))
        return layers[-1](x)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


def mlp(in_features: int = 64, hidden: Sequence[int] = (128,), out_features: int = 10, *,
        activation: str = "relu", bias: bool = True, seed: Optional[int] = 0) -> MLP:
    """An :class:`MLP` with weights drawn from ``seed`` (see the module docstring). Defaults fit :func:`digits`."""
    with _seeded(seed):
        return MLP(in_features, hidden, out_features, activation=activation, bias=bias)


def lenet_300_100(in_features: int = 64, out_features: int = 10, *, activation: str = "relu", bias: bool = True,
                  seed: Optional[int] = 0) -> MLP:
    """LeNet-300-100 {cite}`lecun1998gradient`: an MLP with hidden layers of 300 and 100 units.

    The classic pruning benchmark of Han et al. {cite}`han2015learning` (92% of its weights removed without
    loss of accuracy on MNIST; survey §8). Here ``in_features=64`` for :func:`sparsity_lib.data.digits`
    (784 for MNIST). Layers ``fc1`` (300 x in), ``fc2`` (100 x 300), ``fc3`` (out x 100).
    """
    return mlp(in_features, (300, 100), out_features, activation=activation, bias=bias, seed=seed)


# ---------------------------------------------------------------------------------------------------- CNNs
class DigitsCNN(nn.Module):
    """A small 2-D CNN for 8x8 digits: ``conv1`` (1->c1, 3x3, pad 1), ReLU, ``conv2`` (c1->c2, 3x3, pad 1),
    ReLU, 2x2 max-pool, ``fc`` (c2*4*4 -> num_classes).

    Accepts flattened inputs ``(N, 64)`` as well as images ``(N, 1, 8, 8)``. With the default channels
    (16, 32): 4,752 convolution weights and 5,120 in ``fc``.
    """

    def __init__(self, channels: Sequence[int] = (16, 32), num_classes: int = 10):
        super().__init__()
        if len(channels) != 2:
            raise ValueError(f"channels must be two integers (conv1, conv2 widths), got {channels!r}")
        c1, c2 = (_check_positive_int(c, "channels") for c in channels)
        _check_positive_int(num_classes, "num_classes")
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc = nn.Linear(c2 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


class MNIST1DCNN(nn.Module):
    """A small 1-D CNN for MNIST-1D: three ``Conv1d`` layers (``conv1`` 1->c, ``conv2`` c->c, ``conv3`` c->c;
    kernel 5, stride 2, padding 2, ReLU), then ``fc`` (c*5 -> num_classes).

    The length halves at every convolution (40 -> 20 -> 10 -> 5). Accepts ``(N, 40)`` or ``(N, 1, 40)``.
    Close to the CNN of Greydanus {cite}`greydanus2020scaling`, which reaches about 95% on MNIST-1D where an
    MLP stays near 70%.
    """

    def __init__(self, channels: int = 32, num_classes: int = 10, length: int = 40):
        super().__init__()
        _check_positive_int(channels, "channels")
        _check_positive_int(num_classes, "num_classes")
        _check_positive_int(length, "length")
        self.length = length
        self.conv1 = nn.Conv1d(1, channels, kernel_size=5, stride=2, padding=2)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2)
        self.conv3 = nn.Conv1d(channels, channels, kernel_size=5, stride=2, padding=2)
        out_length = length
        for _ in range(3):
            out_length = (out_length + 2 * 2 - 5) // 2 + 1
        self.fc = nn.Linear(channels * out_length, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, self.length)
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.flatten(1))


def digits_cnn(channels: Sequence[int] = (16, 32), num_classes: int = 10, *, seed: Optional[int] = 0) -> DigitsCNN:
    """A :class:`DigitsCNN` with weights drawn from ``seed``."""
    with _seeded(seed):
        return DigitsCNN(channels, num_classes)


def mnist1d_cnn(channels: int = 32, num_classes: int = 10, *, seed: Optional[int] = 0) -> MNIST1DCNN:
    """A :class:`MNIST1DCNN` with weights drawn from ``seed``."""
    with _seeded(seed):
        return MNIST1DCNN(channels, num_classes)


__all__ = ["ACTIVATIONS", "MLP", "mlp", "lenet_300_100", "DigitsCNN", "MNIST1DCNN", "digits_cnn", "mnist1d_cnn"]


# ------------------------------------------------------------------------------- shrinking after neuron pruning
def shrink_mlp(model: MLP) -> MLP:
    """The small *dense* :class:`MLP` that neuron pruning leaves: a new model with the same outputs as ``model``
    and every removable hidden neuron physically deleted. ``model`` is not changed.

    Neuron (row) pruning (survey §3.1; ``sl.prune(model, s, structure="neuron")``) zeroes whole rows of a weight
    matrix, but the masked model still multiplies full-size matrices. Here the rows really go. For hidden layer
    :math:`\\ell` with weights :math:`W_\\ell` (the effective ones, :math:`w \\odot m`), bias :math:`b_\\ell` and
    activation :math:`\\sigma`, a hidden neuron :math:`j` is removed when

    * its incoming row is zero, :math:`W_\\ell[j, :] = 0`: its output is the constant :math:`\\sigma(b_{\\ell,j})`,
      which is folded into the next layer's bias,
      :math:`b_{\\ell+1} \\leftarrow b_{\\ell+1} + W_{\\ell+1}[:, j]\\, \\sigma(b_{\\ell,j})`, and column :math:`j`
      of :math:`W_{\\ell+1}` is deleted with row :math:`j` of :math:`W_\\ell`; or
    * its outgoing column is zero, :math:`W_{\\ell+1}[:, j] = 0`: it has no effect on the output.

    The first rule runs forward through the layers (a neuron whose only inputs were constant neurons becomes
    constant itself), the second backward. A constant neuron with :math:`\\sigma(b_j) \\ne 0` is kept when the
    next layer has no bias to absorb it (``bias=False`` with e.g. softplus), and every hidden layer keeps at
    least one neuron, so the outputs stay exactly those of ``model`` (up to float rounding). The input and
    output layers keep their sizes.

    What is left is a plain dense network, e.g. ``64-30-10-10`` after pruning 90% of the neurons of both hidden
    layers of LeNet-300-100: it runs with ordinary dense matrix products on any hardware (survey §7, §8.4;
    Li et al. {cite}`li2017pruning` for filters, Liu et al. {cite}`liu2019rethinking` on the pruned
    architecture as a small dense network). Weight zeros *inside* the kept rows (unstructured sparsity) are
    kept as stored zeros; the result carries no masks.

    Arguments:
        model: a :class:`MLP` (e.g. from :func:`lenet_300_100`), masked or not.

    Returns:
        a new :class:`MLP` on the same device and dtype; ``new.hidden`` holds the kept widths.

    Defined in Chapter 03.

    Example::

        >>> net = lenet_300_100(seed=0)
        >>> sl.prune(net, 0.9, structure="neuron", scope="layerwise", exclude=["fc3.weight"])
        >>> small = shrink_mlp(net)
        >>> small.hidden
        (30, 10)
        >>> x = torch.randn(5, 64)
        >>> bool(torch.allclose(small(x), net(x), atol=1e-5))
        True
    """
    if not isinstance(model, MLP):
        raise TypeError(f"model must be a sparsity_lib.models.MLP (e.g. from sl.models.mlp or lenet_300_100), "
                        f"got {type(model).__name__}")
    layers = model.layers()
    with torch.no_grad():
        # effective weights (original * mask when masked) and biases, as float copies on the model's device
        weights = [layer.weight.detach().clone() for layer in layers]
        biases = [None if layer.bias is None else layer.bias.detach().clone() for layer in layers]
        keep = [torch.ones(w.shape[0], dtype=torch.bool, device=w.device) for w in weights[:-1]]

        # forward: neurons with a zero incoming row are constant; fold them into the next layer's bias
        for i in range(len(weights) - 1):
            constant = (weights[i] == 0).all(dim=1)
            bias = biases[i] if biases[i] is not None else torch.zeros_like(weights[i][:, 0])
            value = model._act(bias)  # the constant output of each neuron (used only where constant)
            foldable = constant & ((value == 0) | torch.tensor(biases[i + 1] is not None, device=bias.device))
            if biases[i + 1] is not None:
                biases[i + 1] += weights[i + 1][:, foldable] @ value[foldable]
            keep[i] = ~foldable
            weights[i + 1][:, foldable] = 0.0  # their contribution now lives in the bias

        # backward: neurons whose outgoing column is zero do not affect the output
        for i in range(len(weights) - 2, -1, -1):
            silent = (weights[i + 1] == 0).all(dim=0)
            keep[i] &= ~silent
            weights[i][~keep[i], :] = 0.0  # removed rows; columns of the layer below may become silent

        for i, k in enumerate(keep):  # every hidden layer keeps at least one neuron (an MLP has no empty layer)
            if not bool(k.any()):
                k[0] = True  # a removable neuron (folded or silent) kept as a placeholder that contributes nothing
                weights[i][0, :] = 0.0
                if biases[i] is not None:
                    biases[i][0] = 0.0
                weights[i + 1][:, 0] = 0.0  # so whatever it outputs is multiplied by zero

        widths = [int(k.sum()) for k in keep]
        first = layers[0]
        new = MLP(model.in_features, widths, model.out_features, activation=model.activation,
                  bias=first.bias is not None).to(device=first.weight.device, dtype=first.weight.dtype)
        for i, layer in enumerate(new.layers()):
            rows = keep[i] if i < len(keep) else slice(None)
            cols = keep[i - 1] if i > 0 else slice(None)
            layer.weight.copy_(weights[i][rows][:, cols])
            if layer.bias is not None:
                layer.bias.copy_(biases[i][rows])
    new.train(model.training)
    return new


__all__ += ["shrink_mlp"]


# ------------------------------------------------------------------------------------- Chapter 12: ResNet-like CNN
class ResidualBlock(nn.Module):
    """``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``, 3x3 convolutions without bias (He et al. {cite}`he2016deep`).

    The addition couples ``conv2``'s output channels with those of whatever produced ``x``: they can only be
    removed together (:mod:`sparsity_lib.structure`)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    """A small residual CNN with batch norm for 8x8 images (Chapter 12): ``stem`` (conv 1->c, BN, ReLU), ``blocks``
    (:class:`ResidualBlock` with ``hidden`` inner channels each), 2x2 max-pool, flatten, ``fc`` (c*4*4 -> classes).

    Accepts ``(N, 64)`` or ``(N, 1, 8, 8)``. The stem and every block's ``conv2`` write into one residual stream:
    one coupled channel group of ``c`` channels; each block's ``conv1`` is a group of its own."""

    def __init__(self, channels: int = 16, hidden: int = 16, num_blocks: int = 2, num_classes: int = 10):
        super().__init__()
        for value, name in ((channels, "channels"), (hidden, "hidden"), (num_blocks, "num_blocks"),
                            (num_classes, "num_classes")):
            _check_positive_int(value, name)
        self.stem = nn.Conv2d(1, channels, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(channels)
        self.blocks = nn.Sequential(*[ResidualBlock(channels, hidden) for _ in range(num_blocks)])
        self.fc = nn.Linear(channels * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 8, 8)
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(F.max_pool2d(x, 2).flatten(1))


def residual_cnn(channels: int = 16, hidden: int = 16, num_blocks: int = 2, num_classes: int = 10, *,
                 seed: Optional[int] = 0) -> ResidualCNN:
    """A :class:`ResidualCNN` with weights drawn from ``seed``."""
    with _seeded(seed):
        return ResidualCNN(channels, hidden, num_blocks, num_classes)


__all__ += ["ResidualBlock", "ResidualCNN", "residual_cnn"]


# ------------------------------------------------------------------------------------- Chapter 12: tiny transformer
class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v``, ``out`` Linear layers (all prunable by
    ``sl.prune``), a per-head gate :math:`\\xi_h` (buffer ``head_gate``, ones; head pruning sets entries to 0) and
    an optional boolean attention pattern over (query, key) (:mod:`sparsity_lib.attention`)::

        A_h = softmax(Q_h K_h^T / sqrt(d_h) + log M),   out = W_o concat_h(xi_h A_h V_h)

    (Vaswani et al. {cite}`vaswani2017attention`; gates as in Michel et al. {cite}`michel2019sixteen`).
    ``pattern`` (``(L, L)`` bool, True = may attend) and ``topk`` (keep the ``topk`` largest scores per query,
    data-dependent sparse attention) are plain attributes, ``None`` = dense.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        _check_positive_int(dim, "dim")
        _check_positive_int(num_heads, "num_heads")
        if dim % num_heads:
            raise ValueError(f"num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.register_buffer("head_gate", torch.ones(num_heads))
        self.pattern: Optional[torch.Tensor] = None
        self.topk: Optional[int] = None
        self.last_attention: Optional[torch.Tensor] = None

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, length, _ = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        scores = q @ k.transpose(-2, -1) / self.head_dim ** 0.5            # (N, H, L, L)
        if self.pattern is not None:
            scores = scores.masked_fill(~self.pattern[:length, :length].to(scores.device), float("-inf"))
        if self.topk is not None and self.topk > length:
            raise ValueError(f"topk must be <= the sequence length {length} (keys per query), got {self.topk}")
        if self.topk is not None and self.topk < length:
            kth = scores.topk(self.topk, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        attention = torch.softmax(scores, dim=-1)
        self.last_attention = attention.detach()
        heads = attention @ v                                                   # (N, H, L, d_h)
        gate = self.head_gate if gate is None else gate
        heads = heads * gate.reshape(1, -1, 1, 1)
        return self.out(heads.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` with ``mlp = fc2(gelu(fc1(.)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads)
        self.fc1, self.fc2 = nn.Linear(dim, mlp_ratio * dim), nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A tiny pre-norm transformer classifier for token sequences (Chapter 12): token and learned position
    embeddings, ``blocks.i`` (:class:`TransformerBlock`), a final LayerNorm and ``head`` (dim -> num_classes)
    read at the **last** position. Inputs ``(N, L)`` int64 tokens, output ``(N, num_classes)`` logits, so it trains
    with :func:`sparsity_lib.train.fit` and cross-entropy like every model of the book.

    Prunable layers: ``blocks.i.attn.{q,k,v,out}`` and ``blocks.i.{fc1,fc2}`` and ``head``; the embeddings are not
    Linear layers and stay dense. Head gates: ``blocks.i.attn.head_gate``.
    """

    def __init__(self, vocab_size: int, num_classes: int, max_len: int, dim: int = 32, num_heads: int = 4,
                 num_layers: int = 2, mlp_ratio: int = 2):
        super().__init__()
        for value, name in ((vocab_size, "vocab_size"), (num_classes, "num_classes"), (max_len, "max_len"),
                            (num_layers, "num_layers"), (mlp_ratio, "mlp_ratio")):
            _check_positive_int(value, name)
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList([TransformerBlock(dim, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def attentions(self):
        """The :class:`MultiHeadAttention` modules, in order."""
        return [block.attn for block in self.blocks]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be (N, L) with L <= max_len={self.max_len}, got {tuple(tokens.shape)}")
        x = self.embed(tokens.long()) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x[:, -1]))


def tiny_transformer(vocab_size: int, num_classes: int, max_len: int, dim: int = 32, num_heads: int = 4,
                     num_layers: int = 2, mlp_ratio: int = 2, *, seed: Optional[int] = 0) -> TinyTransformer:
    """A :class:`TinyTransformer` with weights drawn from ``seed``."""
    with _seeded(seed):
        return TinyTransformer(vocab_size, num_classes, max_len, dim, num_heads, num_layers, mlp_ratio)


__all__ += ["MultiHeadAttention", "TransformerBlock", "TinyTransformer", "tiny_transformer"]
