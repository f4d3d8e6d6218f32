"""Structure across layers: coupled channel groups, channel scores, and *compaction* into a smaller dense model.

Removing output channel :math:`c` of a convolution is not a local change: the batch norm after it loses entry
:math:`c`, every layer that reads the tensor loses input channel :math:`c`, and when the tensor is added to a
residual stream, every other producer of that stream must lose channel :math:`c` too, because
:math:`y_c = f_c(x) + x_c` only vanishes when both terms do. Fang et al. {cite}`fang2023depgraph`
(Torch-Pruning's *dependency graph*) call the set of tensor slices that must go together a **group**. We build the
groups here from the computation graph itself (``torch.fx``), written from these equations:

* every tensor carries one *channel atom* per channel (its dimension 1);
* a Conv/Linear layer creates fresh atoms for its outputs; a batch norm, an activation with
  :math:`\\sigma(0) = 0`, pooling and dropout pass atoms through; ``flatten`` repeats each atom over the spatial
  positions it covers; ``cat`` along channels concatenates atoms;
* an addition ``a + b`` *unifies* the atoms of ``a`` and ``b`` position by position (union-find).

A channel (a class of unified atoms) can be removed exactly when its value is zero, for every input, in every
tensor that carries it and is read by a Conv/Linear layer or returned (a convolution output that only feeds a batch
norm with :math:`\\gamma = \\beta = 0` may be anything). That is decided from the weights: a Conv/Linear output is identically zero when its row is zero on
the live input channels and its bias is zero; a batch norm output (eval mode) when its scale and shift are zero
(network slimming's :math:`\\gamma = 0`, Liu et al. {cite}`liu2017learning`); ``a + b`` when both are. The model's
input and output channels are never removed. :func:`compact` then slices every member of every group and checks
the result against the original on the example input: a pattern it does not understand (a grouped convolution, an
unknown function, a reshape of a prunable tensor, a module used twice) raises ``NotImplementedError`` naming the
node, never a silently different network.

Channel scores (higher = keep), usable with ``sl.prune(..., structure="neuron")`` or group-wise with
:func:`prune_channels`: L1 filter norm (Li et al. {cite}`li2017pruning`), batch-norm scale (Liu et al.
{cite}`liu2017learning`) and the first-order Taylor channel score (Molchanov et al. {cite}`molchanov2019importance`).

Survey §6.1 (CNNs), §3.1 (structured sparsity), §7.1.1 (structured sparsity runs on dense kernels). Chapter 12.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F
from torch.nn.utils import parametrize

from .masks import PRUNABLE_TYPES, apply_masks, get_masks, prunable

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
#: modules that map a zero channel to a zero channel and keep channels in place
_PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Identity, nn.Dropout, nn.MaxPool1d,
                 nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                 nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
_PASS_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.gelu, torch.tanh, F.dropout, F.max_pool1d,
                   F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                   F.adaptive_max_pool2d}
_PASS_METHODS = {"relu", "tanh", "contiguous", "clone"}
_ADD = {operator.add, operator.iadd, torch.add}


class _UnionFind:
    def __init__(self):
        self.parent: List[int] = []

    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self, atoms: torch.Tensor) -> torch.Tensor:
        return torch.tensor([self.find(int(a)) for a in atoms], dtype=torch.long)


@dataclass
class ChannelGroup:
    """Channels that must be removed together. ``size`` channels; ``producers[layer]`` maps each output row of a
    Conv/Linear to its channel index in the group, ``consumers[layer]`` each input column (after ``flatten``, a
    channel covers several columns), ``norms[bn]`` each batch-norm entry. ``frozen[c]``: channel ``c`` reaches the
    model's input or output and can never be removed."""

    size: int
    producers: Dict[str, torch.Tensor] = field(default_factory=dict)
    consumers: Dict[str, torch.Tensor] = field(default_factory=dict)
    norms: Dict[str, torch.Tensor] = field(default_factory=dict)
    frozen: Optional[torch.Tensor] = None

    def __repr__(self) -> str:
        return (f"ChannelGroup(size={self.size}, producers={list(self.producers)}, consumers={list(self.consumers)}, "
                f"norms={list(self.norms)}, frozen={int(self.frozen.sum()) if self.frozen is not None else 0})")


def _baked_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with every parametrization (masks included) baked into plain tensors."""
    work = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in list(work.modules()):
            if parametrize.is_parametrized(module):
                # (remove_parametrizations would delete the property from a class the original may share)
                values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
                grads = {name: module.parametrizations[name].original.requires_grad for name in values}
                module.__class__ = module.__class__.__bases__[0]
                del module._modules["parametrizations"]
                for name, value in values.items():
                    setattr(module, name, nn.Parameter(value, requires_grad=grads[name]))
    return work


class _Analysis:
    """One pass over the traced graph: atoms, dead channels, layer records (see the module docstring)."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.model = model
        try:
            self.gm = fx.symbolic_trace(model)
        except Exception as error:  # noqa: BLE001 - re-raised with the reason
            raise NotImplementedError(f"structure: the model {type(model).__name__} cannot be traced by torch.fx "
                                      f"({type(error).__name__}: {error}); compaction needs a traceable forward") from None
        ShapeProp(self.gm).propagate(example_input)
        self.uf = _UnionFind()
        self.atoms: Dict[fx.Node, torch.Tensor] = {}
        self.dead: Dict[fx.Node, torch.Tensor] = {}
        self.frozen_atoms: List[torch.Tensor] = []
        self.layers: Dict[str, dict] = {}   # name -> {"in": atoms, "out": atoms}
        self.norms: Dict[str, torch.Tensor] = {}
        self.consumed: List[fx.Node] = []  # tensors read by a Conv/Linear or returned: only their values matter
        self._walk()

    @staticmethod
    def _shape(node: fx.Node):
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def _refuse(self, node: fx.Node, why: str):
        raise NotImplementedError(f"structure: cannot follow channels through node {node.name!r} "
                                  f"({node.op} {getattr(node.target, '__name__', node.target)}): {why}. "
                                  f"Supported: Conv1d/Conv2d (groups=1), Linear on 2-D inputs, BatchNorm, ReLU-like "
                                  f"activations, pooling (and mean over spatial dims), dropout, flatten, residual '+', "
                                  f"torch.cat on dim 1")

    def _pass(self, node, src):
        self.atoms[node], self.dead[node] = self.atoms[src], self.dead[src]

    def _walk(self):
        seen_modules = set()
        for node in self.gm.graph.nodes:
            shape = self._shape(node)
            if node.op == "placeholder":
                if shape is None:
                    continue
                c = shape[1] if len(shape) > 1 else 1
                self.atoms[node] = self.uf.fresh(c)
                self.dead[node] = torch.zeros(c, dtype=torch.bool)
                self.frozen_atoms.append(self.atoms[node])
                continue
            if node.op == "output":
                for arg in node.all_input_nodes:
                    if arg in self.atoms:
                        self.frozen_atoms.append(self.atoms[arg])
                        self.consumed.append(arg)
                continue
            if node.op == "get_attr":
                self._refuse(node, "a parameter used directly in forward")
            if shape is None:      # sizes, shapes, getitem of sizes: not tensors
                continue
            tensor_inputs = [a for a in node.args if isinstance(a, fx.Node) and a in self.atoms]
            if node.op == "call_module":
                module = self.gm.get_submodule(node.target)
                if node.target in seen_modules and isinstance(module, _LAYERS + _NORMS):
                    self._refuse(node, "the module is called twice (shared weights)")
                seen_modules.add(node.target)
                src = tensor_inputs[0] if tensor_inputs else None
                if src is None:
                    self._refuse(node, "no tensor input")
                if isinstance(module, _LAYERS):
                    self._layer(node, module, src)
                elif isinstance(module, _NORMS):
                    self._norm(node, module, src)
                elif isinstance(module, nn.Flatten):
                    self._flatten(node, src, module.start_dim, module.end_dim)
                elif isinstance(module, _PASS_MODULES):
                    self._pass(node, src)
                else:
                    self._refuse(node, f"module type {type(module).__name__} is not supported")
            elif node.op == "call_function" or node.op == "call_method":
                name = node.target if node.op == "call_method" else None
                if node.target in _ADD:
                    self._add(node, tensor_inputs)
                elif node.target is torch.cat:
                    self._cat(node)
                elif node.target is torch.flatten or name == "flatten":
                    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
                    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
                    self._flatten(node, tensor_inputs[0], start, end)
                elif name in ("reshape", "view"):
                    self._reshape(node, tensor_inputs[0])
                elif node.target is torch.mean or name == "mean":
                    self._mean(node, tensor_inputs[0])
                elif node.target in _PASS_FUNCTIONS or name in _PASS_METHODS:
                    self._pass(node, tensor_inputs[0])
                else:
                    self._refuse(node, "this function is not supported")
            else:
                self._refuse(node, "unsupported node kind")

    def _layer(self, node, module, src):
        name = node.target
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            self._refuse(node, f"layer {name!r} is a grouped convolution (groups={module.groups})")
        if isinstance(module, nn.Linear) and len(self._shape(src)) != 2:
            self._refuse(node, f"layer {name!r} is a Linear applied to a {len(self._shape(src))}-D tensor "
                               f"(only (N, features) inputs are supported)")
        w = module.weight.detach()
        dead_in = self.dead[src]
        live = w[:, ~dead_in] if w.dim() == 2 else w[:, ~dead_in, ...]
        dead_out = (live.reshape(w.shape[0], -1) == 0).all(dim=1)
        if module.bias is not None:
            dead_out &= module.bias.detach() == 0
        out = self.uf.fresh(w.shape[0])
        self.consumed.append(src)
        self.layers[name] = {"in": self.atoms[src], "out": out}
        self.atoms[node], self.dead[node] = out, dead_out

    def _norm(self, node, module, src):
        if not (module.affine and module.track_running_stats):
            self._refuse(node, f"batch norm {node.target!r} needs affine=True and running statistics")
        g, b = module.weight.detach(), module.bias.detach()
        shift = b - module.running_mean * g / torch.sqrt(module.running_var + module.eps)  # output for x = 0
        self.norms[node.target] = self.atoms[src]
        self.atoms[node] = self.atoms[src]
        self.dead[node] = ((g == 0) & (b == 0)) | (self.dead[src] & (shift == 0))

    def _add(self, node, inputs):
        if len(inputs) != 2 or len(node.args) != 2 or node.kwargs:
            self._refuse(node, "only the sum of two tensors (no scalars, no alpha) is supported")
        a, b = inputs
        if self._shape(a) != self._shape(b):
            self._refuse(node, f"the operands have different shapes {self._shape(a)} and {self._shape(b)} "
                               f"(broadcasting)")
        for x, y in zip(self.atoms[a].tolist(), self.atoms[b].tolist()):
            self.uf.union(x, y)
        self.atoms[node], self.dead[node] = self.atoms[a], self.dead[a] & self.dead[b]

    def _cat(self, node):
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if dim not in (1, 1 - len(self._shape(node))):
            self._refuse(node, f"torch.cat along dim {dim} (only the channel dimension 1 is supported)")
        self.atoms[node] = torch.cat([self.atoms[t] for t in tensors])
        self.dead[node] = torch.cat([self.dead[t] for t in tensors])

    def _flatten(self, node, src, start, end):
        in_shape = self._shape(src)
        start = start % len(in_shape)
        end = end % len(in_shape)
        if start == 0 and end == 0:
            return self._pass(node, src)
        if start != 1 or end != len(in_shape) - 1:
            self._refuse(node, f"flatten({start}, {end}) of a {len(in_shape)}-D tensor (only flatten(1) is supported)")
        repeat = math.prod(in_shape[2:])
        self.atoms[node] = self.atoms[src].repeat_interleave(repeat)
        self.dead[node] = self.dead[src].repeat_interleave(repeat)

    def _mean(self, node, src):
        """Global average pooling written as ``x.mean(dim=(2, 3))``: channels stay in place (mean of 0 is 0)."""
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        ndim = len(self._shape(src))
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if sorted(d % ndim for d in dims) != list(range(2, ndim)):
            self._refuse(node, f"mean over dims {dims} (only the spatial dims 2.. of an (N, C, ...) tensor are supported)")
        self._pass(node, src)

    def _reshape(self, node, src):
        frozen = torch.cat(self.frozen_atoms) if self.frozen_atoms else torch.empty(0, dtype=torch.long)
        roots = set(self.uf.roots(frozen).tolist())
        if set(self.uf.roots(self.atoms[src]).tolist()) <= roots:   # a reshape of the input: nothing prunable
            c = self._shape(node)[1] if len(self._shape(node)) > 1 else 1
            self.atoms[node] = self.uf.fresh(c)
            self.dead[node] = torch.zeros(c, dtype=torch.bool)
            self.frozen_atoms.append(self.atoms[node])
            return
        in_shape, out_shape = self._shape(src), self._shape(node)
        if len(out_shape) == 2 and out_shape[0] == in_shape[0]:
            return self._flatten(node, src, 1, -1)
        self._refuse(node, f"reshape {in_shape} -> {out_shape} of a prunable tensor")

    # ------------------------------------------------------------------------------------------ results
    def groups(self) -> List[ChannelGroup]:
        frozen_roots = set(self.uf.roots(torch.cat(self.frozen_atoms)).tolist()) if self.frozen_atoms else set()
        by_root: Dict[int, ChannelGroup] = {}
        root_index: Dict[int, tuple] = {}
        # connected components of layers: channels produced by the same layer belong to the same group
        comp = _UnionFind()
        comp.fresh(len(self.uf.parent))
        for rec in self.layers.values():
            roots = self.uf.roots(rec["out"])
            for r in roots.tolist()[1:]:
                comp.union(int(roots[0]), r)
        members: Dict[int, List[int]] = {}
        for rec in self.layers.values():
            for r in self.uf.roots(rec["out"]).tolist():
                members.setdefault(comp.find(r), [])
                if r not in members[comp.find(r)]:
                    members[comp.find(r)].append(r)
        out = []
        for key, roots in members.items():
            index = {r: i for i, r in enumerate(sorted(roots))}
            group = ChannelGroup(size=len(index), frozen=torch.tensor([r in frozen_roots for r in sorted(roots)]))
            for r in index:
                root_index[r] = (len(out), index[r])
            out.append(group)

        def mapping(atoms):
            roots = self.uf.roots(atoms).tolist()
            hits = [root_index.get(r) for r in roots]
            gids = {h[0] for h in hits if h is not None}
            if len(gids) != 1 or any(h is None for h in hits):
                return None, None
            return gids.pop(), torch.tensor([h[1] for h in hits])

        for name, rec in self.layers.items():
            g, idx = mapping(rec["out"])
            out[g].producers[name] = idx
            g, idx = mapping(rec["in"])
            if g is not None:
                out[g].consumers[name] = idx
        for name, atoms in self.norms.items():
            g, idx = mapping(atoms)
            if g is not None:
                out[g].norms[name] = idx
        return out

    def removable_roots(self) -> set:
        alive, frozen = set(), set()
        for node in self.consumed:
            roots = self.uf.roots(self.atoms[node])
            alive.update(roots[~self.dead[node]].tolist())
        for atoms in self.frozen_atoms:
            frozen.update(self.uf.roots(atoms).tolist())
        every = {self.uf.find(i) for i in range(len(self.uf.parent))}
        return every - alive - frozen


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> List[ChannelGroup]:
    """The coupled channel groups of ``model`` (see the module docstring), traced on ``example_input``.

    A plain chain gives one group per Conv/Linear output; a residual stage whose blocks add into one stream gives
    one group holding the stem and every block's last convolution (their output rows are removed together).
    """
    return _Analysis(_baked_copy(model), example_input).groups()


def _slice_param(module, name, index, dim):
    t = getattr(module, name)
    if t is None:
        return
    new = t.detach().index_select(dim, index.to(t.device)).clone()
    if isinstance(t, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=t.requires_grad))
    else:
        setattr(module, name, new)


def compact(model: nn.Module, example_input: torch.Tensor, atol: float = 1e-4) -> nn.Module:
    """The smaller *dense* model that computes the same function as ``model``: every channel that is zero in
    every tensor that carries it (see the module docstring: masked rows with zero bias, or a batch norm with
    :math:`\\gamma = \\beta = 0`) is physically removed from all members of its coupled group. ``model`` is unchanged.

    Generalizes :func:`sparsity_lib.models.shrink_mlp` to Conv1d/Conv2d + BatchNorm + Linear chains with residual
    additions and channel concatenation (Fang et al. {cite}`fang2023depgraph`; survey §6.1, §7.1.1). The result
    carries no masks (unstructured zeros inside kept rows stay as stored zeros), is in ``model``'s training mode,
    and is checked against ``model`` in eval mode on ``example_input`` (``RuntimeError`` when outputs differ by more
    than ``atol`` relative to their scale).

    Raises ``NotImplementedError`` naming the node for patterns it cannot follow (grouped convolution, Linear on
    3-D inputs, unknown functions, reshapes of prunable tensors, modules called twice).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor (one batch of inputs), got {type(example_input).__name__}")
    work = _baked_copy(model)
    analysis = _Analysis(work, example_input)
    removable = analysis.removable_roots()
    uf = analysis.uf
    for rec in analysis.layers.values():           # every layer keeps at least one output channel
        roots = uf.roots(rec["out"]).tolist()
        if all(r in removable for r in roots):
            removable.discard(roots[0])

    def keep_index(atoms):
        roots = uf.roots(atoms).tolist()
        return torch.tensor([i for i, r in enumerate(roots) if r not in removable], dtype=torch.long)

    with torch.no_grad():
        for name, rec in analysis.layers.items():
            module = work.get_submodule(name)
            keep_out, keep_in = keep_index(rec["out"]), keep_index(rec["in"])
            _slice_param(module, "weight", keep_out, 0)
            _slice_param(module, "weight", keep_in, 1)
            _slice_param(module, "bias", keep_out, 0)
            if isinstance(module, nn.Linear):
                module.out_features, module.in_features = len(keep_out), len(keep_in)
            else:
                module.out_channels, module.in_channels = len(keep_out), len(keep_in)
        for name, atoms in analysis.norms.items():
            module = work.get_submodule(name)
            keep = keep_index(atoms)
            for p in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(module, p, keep, 0)
            module.num_features = len(keep)
        reference_mode = model.training
        model.eval()
        try:
            expected = model(example_input)
            got = work(example_input)
        finally:
            model.train(reference_mode)
        scale = float(expected.abs().max().clamp_min(1.0))
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=atol * scale, rtol=0):
            raise RuntimeError("structure.compact: the compacted model does not reproduce the original on "
                               "example_input; its forward probably hard-codes a channel count")
    work.train(model.training)
    return work


# --------------------------------------------------------------------------------------- channel scores
def _channel_vectors(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {name: w.detach() for name, w in prunable(model).items()}


def l1_filter(model: nn.Module) -> Dict[str, torch.Tensor]:
    """L1 filter norm (Li et al. {cite}`li2017pruning`): every weight of output row / filter :math:`j` gets
    :math:`s_j = \\sum_{i} |W_{j,i}|` (all input channels and kernel positions). Use with ``structure="neuron"``.
    Survey §3.2, §6.1."""
    out = {}
    for name, w in _channel_vectors(model).items():
        s = w.abs().reshape(w.shape[0], -1).sum(dim=1)
        out[name] = s.reshape((-1,) + (1,) * (w.dim() - 1)).expand(w.shape).clone()
    return out


def _bn_after(model: nn.Module) -> Dict[str, str]:
    """``{layer weight name: batch norm module name}`` for each Conv/Linear whose output goes straight into a BN."""
    try:
        gm = fx.symbolic_trace(_baked_copy(model))
    except Exception as err:  # fx cannot trace data-dependent Python (e.g. nn.TransformerEncoder's fast-path checks)
        raise ValueError(
            f"method 'bn_scale' reads which layer feeds which batch norm from a torch.fx trace of the model, and "
            f"{type(model).__name__} cannot be traced ({type(err).__name__}: {err}). Use a channel score that needs "
            f"no trace: method='l1_filter' or method='taylor_channel'.") from err
    found = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _NORMS):
            src = node.args[0]
            if isinstance(src, fx.Node) and src.op == "call_module" and isinstance(gm.get_submodule(src.target), _LAYERS):
                found[f"{src.target}.weight"] = node.target
    return found


def bn_scale(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Batch-norm scale (network slimming, Liu et al. {cite}`liu2017learning`): every weight of output channel
    :math:`j` of a layer followed by a batch norm gets :math:`|\\gamma_j|`. Layers with no batch norm after them get
    ``+inf`` (this score never removes them: exclude them or choose another score). Survey §3.6, §6.1."""
    after = _bn_after(model)
    out = {}
    for name, w in _channel_vectors(model).items():
        if name in after:
            g = model.get_submodule(after[name]).weight.detach().abs()
            out[name] = g.reshape((-1,) + (1,) * (w.dim() - 1)).expand(w.shape).clone()
        else:
            out[name] = torch.full_like(w, math.inf)
    return out


def taylor_channel(model: nn.Module, data=None, loss_fn=None, num_batches: Optional[int] = None
                   ) -> Dict[str, torch.Tensor]:
    """First-order Taylor channel importance (Molchanov et al. {cite}`molchanov2019importance`, eq. 8):
    :math:`I_j = \\big(\\sum_{i \\in j} g_i w_i\\big)^2` summed over batches, the estimated change of the loss when
    channel :math:`j` is removed, given to every weight of the channel. Survey §3.4, §6.1."""
    from .scores.first_order import taylor_neuron

    return taylor_neuron(model, data=data, loss_fn=loss_fn, num_batches=num_batches)


CHANNEL_SCORES: Dict[str, Callable] = {"l1_filter": l1_filter, "bn_scale": bn_scale, "taylor_channel": taylor_channel}


class ChannelMask(nn.Module):
    """Parametrization ``v -> v * keep`` for one channel vector (a batch norm's scale or shift, a bias). It has
    ``hard_mask()``, so it is a mask of the library's protocol."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.detach().clone().to(torch.bool))

    def hard_mask(self) -> torch.Tensor:
        return self.keep

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.keep.to(v.dtype)


def _mask_vector(module: nn.Module, name: str, keep: torch.Tensor) -> None:
    if getattr(module, name, None) is None:
        return
    if parametrize.is_parametrized(module, name):
        for p in module.parametrizations[name]:
            if isinstance(p, ChannelMask):
                p.keep &= keep.to(p.keep.device)
                return
    parametrize.register_parametrization(module, name, ChannelMask(keep.to(getattr(module, name).device)))


def prune_channels(model: nn.Module, amount: float, example_input: torch.Tensor, score="l1_filter",
                   data=None, loss_fn=None, groups: Optional[Sequence[ChannelGroup]] = None) -> Dict[str, torch.Tensor]:
    """Remove the fraction ``amount`` of the channels of every coupled group (frozen channels excepted), by masks.

    A channel's score is the sum over the group's producers of their per-row score (``score`` is a name of
    :data:`CHANNEL_SCORES` or a function returning ``{weight name: tensor}`` broadcast over rows); the lowest
    ``round(amount * removable)`` channels of each group go (at least one channel stays). For a removed channel,
    every producer row is masked (``sl.apply_masks``, merged with existing masks), and the producers' biases and the
    group's batch-norm scales and shifts are masked by :class:`ChannelMask`, so the channel is exactly zero and
    :func:`compact` removes it (and bakes every mask, these included). ``sl.remove_masks`` bakes only the masks of
    Conv/Linear weights; the :class:`ChannelMask` of biases and batch norms stay until :func:`compact`.
    Returns the channel keep-vectors ``{"group<i>": bool tensor}``.
    """
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be a fraction in [0, 1), got {amount!r}")
    if isinstance(score, str):
        if score not in CHANNEL_SCORES:
            raise ValueError(f"score must be one of {sorted(CHANNEL_SCORES)} or a function, got {score!r}")
        score = CHANNEL_SCORES[score]
    groups = channel_groups(model, example_input) if groups is None else groups
    import inspect

    takes_data = "data" in inspect.signature(score).parameters
    scores = score(model, data=data, loss_fn=loss_fn) if takes_data else score(model)
    masks = get_masks(model)
    new_masks, keeps = {}, {}
    for gi, group in enumerate(groups):
        total = torch.zeros(group.size, dtype=torch.float64)
        for layer, idx in group.producers.items():
            s = scores[f"{layer}.weight"].detach().reshape(len(idx), -1)[:, 0].double().cpu()
            total.index_add_(0, idx, s)
        candidates = (~group.frozen).nonzero().flatten()
        n_remove = min(int(round(amount * len(candidates))), group.size - 1)
        keep = torch.ones(group.size, dtype=torch.bool)
        if n_remove > 0 and len(candidates):
            order = candidates[torch.argsort(total[candidates], stable=True)]
            keep[order[:n_remove]] = False
        keeps[f"group{gi}"] = keep
        for layer, idx in group.producers.items():
            w = model.get_submodule(layer).weight
            rows = keep[idx].to(w.device).reshape((-1,) + (1,) * (w.dim() - 1)).expand(w.shape)
            old = masks.get(f"{layer}.weight")
            new_masks[f"{layer}.weight"] = rows.clone() if old is None else (old & rows)
    apply_masks(model, new_masks)
    for gi, group in enumerate(groups):
        keep = keeps[f"group{gi}"]
        for layer, idx in group.producers.items():
            _mask_vector(model.get_submodule(layer), "bias", keep[idx])
        for norm, idx in group.norms.items():
            _mask_vector(model.get_submodule(norm), "weight", keep[idx])
            _mask_vector(model.get_submodule(norm), "bias", keep[idx])
    return keeps


def flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-adds of the Conv/Linear layers of one forward pass on ``example_input``, divided by the batch size:
    :math:`c_{out}\\, (c_{in}/g)\\, k \\cdot` output positions for a convolution, :math:`n_{out} n_{in}` per
    row for a Linear. Masked zeros are counted (a masked model runs dense kernels); compaction is what lowers it."""
    total = [0]

    def hook(module, inputs, output):
        w = module.weight
        if isinstance(module, nn.Linear):
            total[0] += w.shape[0] * w.shape[1] * (output.numel() // output.shape[-1])
        else:
            total[0] += w[0].numel() * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        model.train(training)
        for h in handles:
            h.remove()
    return total[0] // example_input.shape[0]


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (what a compacted model stores; masks are not subtracted)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["ChannelGroup", "channel_groups", "compact", "l1_filter", "bn_scale", "taylor_channel", "CHANNEL_SCORES",
           "ChannelMask", "prune_channels", "flops", "count_parameters"]
