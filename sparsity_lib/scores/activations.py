"""Activation-based neuron criteria (survey §3.3 "data-driven selection based on input or output sensitivity").

These criteria look at what neurons *do* on data, not at their weights:

* **APoZ**, the Average Percentage of Zeros of Hu et al. {cite}`hu2016network`: a ReLU neuron that is zero on
  almost every input contributes almost nothing and can go;
* **mean |activation|** ("energy", Hagiwara; DropNet): a finer version of APoZ that also sees *how much* a neuron
  fires;
* **output sensitivity** (Engelbrecht and Cloete; Zeng and Yeung): how much the network's output moves when the
  neuron's value moves.

All three score *neurons* (output rows of a Linear layer, output channels of a convolution). The registered
methods return per-weight tensors in which every weight of row j carries neuron j's score, so that
``sl.prune(model, s, method="apoz", data=..., structure="neuron")`` (which averages the scores of a row) removes
whole neurons by that score. :func:`neuron_scores` returns the per-neuron vectors themselves, and
:func:`oracle_neuron_loss_increase` the true loss increase of removing each neuron, the yardstick every
neuron criterion is measured against in Chapter 05.

**Where the activation is taken.** Models often apply their nonlinearity functionally (``F.relu(self.fc1(x))``),
so there may be no module whose output is the activation. The activation of neuron j is therefore defined as
``activation(z_j)``, with ``z_j`` the *output of the prunable layer* (captured by a forward hook) and
``activation`` the model's nonlinearity, ReLU by default. For a ReLU network this is exactly the post-ReLU value,
and "zero" means ``z_j <= 0``. Pass ``activation=None`` (identity) or any callable for other networks. For a
convolution every spatial position of a channel counts as one sample of that neuron, and for a Linear layer
applied to sequences every token does.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Union

import torch
from torch import nn

from ._common import (batch_size, batches, broadcast_rows, effective_weights, check_loss_fn, layer_samples, neuron_sum_per_example,
                      scoring, weighted_average)

Activation = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]

_ACTIVATIONS = {"relu": torch.relu, "identity": (lambda t: t), None: (lambda t: t)}


def _check_activation(activation: Activation) -> Callable:
    if callable(activation):
        return activation
    if activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]
    raise ValueError(f"activation must be 'relu', 'identity', None or a callable, got {activation!r}")


def _forward_with_output_hooks(model, modules, x, fn):
    """Run ``model(x)`` with a forward hook on every prunable layer calling ``fn(name, module, output)``.

    An in-projection of ``nn.MultiheadAttention`` hands over its output ``x W^T + b`` (``q, k, v`` stacked) from
    inside :func:`sparsity_lib.plumbing.attention_forward` (run under :func:`~sparsity_lib.plumbing.attention_math`,
    which :func:`scoring` enters), as the tensor the attention goes on with."""
    handles, attention = [], []
    for name, m in modules.items():
        if isinstance(m, nn.MultiheadAttention):
            hooks = m.__dict__.setdefault("_sl_projection_hooks", {})
            hooks[name.rsplit(".", 1)[-1]] = (name, lambda out, name=name, m=m: fn(name, m, out))
            attention.append(m)
        else:
            handles.append(m.register_forward_hook(lambda mod, inp, out, name=name: fn(name, mod, out)))
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()
        for m in attention:
            m.__dict__.pop("_sl_projection_hooks", None)


def activation_statistics(model: nn.Module, data, activation: Activation = "relu",
                          num_batches: Optional[int] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """Per-neuron activation statistics over ``data``: ``{name: {"apoz": (out,), "mean_abs": (out,)}}``.

    With ``a = activation(z)`` the activation of a neuron on one sample (an example, a token, or a spatial
    position of a channel), over all N samples of the data:

    * ``APoZ_j = (1/N) sum_n [a_nj == 0]``, the Average Percentage of Zeros {cite}`hu2016network` (for ReLU:
      the fraction of samples on which the layer output ``z_nj <= 0``);
    * ``mean_abs_j = (1/N) sum_n |a_nj|``.

    Survey §3.3. Computed in evaluation mode; the model is not changed. Defined in Chapter 05.
    """
    act = _check_activation(activation)
    items = batches(data, model, num_batches)
    zeros: Dict[str, torch.Tensor] = {}
    absum: Dict[str, torch.Tensor] = {}
    count: Dict[str, int] = {}

    def record(name, module, out):
        a = act(layer_samples(module, out.detach())).double()
        zeros[name] = zeros.get(name, 0) + (a == 0).sum(0).double()
        absum[name] = absum.get(name, 0) + a.abs().sum(0)
        count[name] = count.get(name, 0) + a.shape[0]

    with scoring(model) as modules, torch.no_grad():
        for x, _ in items:
            _forward_with_output_hooks(model, modules, x, record)
    missing = [n for n in modules if n not in count]
    if missing:
        raise ValueError(f"layers {missing} were never called in the forward pass of the model")
    return {n: {"apoz": (zeros[n] / count[n]).float(), "mean_abs": (absum[n] / count[n]).float()} for n in modules}


def output_sensitivity_per_neuron(model: nn.Module, data, num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Root-mean-square sensitivity of the network output to each neuron: ``{name: (out,)}``.

    For example ``x_n``, network output ``f_k`` (k = 1..K) and a shift ``delta`` added to neuron j of a layer
    (to its output ``z_j``; for a convolution the same shift at every position of channel j)::

        S_j = sqrt( 1/(N K) sum_n sum_k ( d f_k(x_n) / d delta_j )^2 )

    the mean-square summary of the sensitivity matrix of Engelbrecht and Cloete (survey §3.3,
    {cite}`hoefler2021sparsity`). Derivatives are
    taken w.r.t. the layer output ``z`` (the input of the nonlinearity), so in a ReLU network a neuron that is
    off on an example has zero sensitivity there. One backward pass per output k (the K outputs of a classifier);
    evaluation mode, so examples are independent. The model is not changed.
    """
    items = batches(data, model, num_batches)
    acc: Dict[str, torch.Tensor] = {}
    total = 0
    with scoring(model) as modules:
        attention = [n for n, m in modules.items() if isinstance(m, nn.MultiheadAttention)]
        if attention:
            raise ValueError(f"{attention[0]}: output sensitivity of an attention in-projection is not supported "
                             "(its q, k, v outputs are not reduced per neuron here); leave the layer out "
                             "(exclude=[...]) or use another method")
        for x, _ in items:
            captured: Dict[str, list] = {}
            f = _forward_with_output_hooks(model, modules, x,
                                           lambda name, mod, out: captured.setdefault(name, []).append(out))
            missing = [n for n in modules if n not in captured]
            if missing:
                raise ValueError(f"layers {missing} were never called in the forward pass of the model")
            b = batch_size(x)
            f = f.reshape(b, -1)
            names = list(captured)
            flat = [t for n in names for t in captured[n]]
            for k in range(f.shape[1]):
                grads = torch.autograd.grad(f[:, k].sum(), flat, retain_graph=k + 1 < f.shape[1], allow_unused=True)
                i = 0
                for n in names:
                    d = 0
                    for t in captured[n]:
                        g = grads[i] if grads[i] is not None else torch.zeros_like(t)
                        d = d + neuron_sum_per_example(modules[n], g)
                        i += 1
                    acc[n] = acc.get(n, 0) + (d.detach().double() ** 2).sum(0)
            total += b * f.shape[1]
    return {n: (acc[n] / total).sqrt().float() for n in modules}


# ----------------------------------------------------- the methods of the catalogue (sparsity_lib/catalogue.py)
def apoz(model: nn.Module, data=None, loss_fn=None, activation: Activation = "relu",
         num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Keep score ``1 - APoZ_j`` (Average Percentage of Zeros, Hu et al. {cite}`hu2016network`), broadcast to
    every weight of neuron j. Survey §3.3.

    ``APoZ_j = (1/N) sum_n [activation(z_nj) == 0]`` over all samples of ``data`` (see
    :func:`activation_statistics`). Use with ``structure="neuron"``. ``loss_fn`` is ignored (no loss involved).
    Defined in Chapter 05.
    """
    stats = activation_statistics(model, data, activation, num_batches)
    with scoring(model) as modules:
        return broadcast_rows({n: 1.0 - s["apoz"] for n, s in stats.items()}, modules)


def mean_activation(model: nn.Module, data=None, loss_fn=None, activation: Activation = "relu",
                    num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Keep score ``(1/N) sum_n |activation(z_nj)|`` (mean absolute activation of neuron j), broadcast to its
    weights. Survey §3.3 {cite}`hoefler2021sparsity` (Hagiwara's "energy"; DropNet). Use with ``structure="neuron"``. Defined in Chapter 05.
    """
    stats = activation_statistics(model, data, activation, num_batches)
    with scoring(model) as modules:
        return broadcast_rows({n: s["mean_abs"] for n, s in stats.items()}, modules)


def output_sensitivity(model: nn.Module, data=None, loss_fn=None,
                       num_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Keep score ``S_j = sqrt(mean_{n,k} (d f_k(x_n) / d z_j)^2)`` (see :func:`output_sensitivity_per_neuron`),
    broadcast to the weights of neuron j. Survey §3.3 {cite}`hoefler2021sparsity`. Use with ``structure="neuron"``. Defined in Chapter 05.
    """
    sens = output_sensitivity_per_neuron(model, data, num_batches)
    with scoring(model) as modules:
        return broadcast_rows(sens, modules)


# ------------------------------------------------------------------------------- neuron-level comparisons
NEURON_CRITERIA = ("apoz", "mean_activation", "output_sensitivity", "taylor", "l1_norm")


def neuron_scores(model: nn.Module, criterion: str, data=None, loss_fn=None, **options) -> Dict[str, torch.Tensor]:
    """Per-neuron scores ``{name: (out,) tensor}``, higher = keep, for ``criterion`` in :data:`NEURON_CRITERIA`:

    * ``"apoz"``: ``1 - APoZ_j``; ``"mean_activation"``: ``mean |a_j|`` (:func:`activation_statistics`);
    * ``"output_sensitivity"``: :func:`output_sensitivity_per_neuron`;
    * ``"taylor"``: Molchanov et al.'s group Taylor score ``(sum_{i in j} g_i w_i)^2`` averaged over batches
      (:func:`sparsity_lib.scores.first_order.taylor_per_neuron`);
    * ``"l1_norm"``: ``sum_i |W_ji|``, the weight-only baseline of Li et al. {cite}`li2017pruning`.

    ``options`` go to the criterion (``activation``, ``num_batches``, ``include_bias``). Used by Chapter 05 to
    compare criteria with :func:`oracle_neuron_loss_increase` by rank correlation. Survey §3.3, §3.4.
    """
    if criterion not in NEURON_CRITERIA:
        raise ValueError(f"criterion must be one of {NEURON_CRITERIA}, got {criterion!r}")
    if criterion == "l1_norm":
        if options:
            raise TypeError(f"criterion 'l1_norm' takes no options, got {sorted(options)}")
        with scoring(model) as modules:
            return {n: m.detach().abs().reshape(m.shape[0], -1).sum(1) for n, m in effective_weights(modules).items()}
    if criterion == "taylor":
        from .first_order import taylor_per_neuron

        return taylor_per_neuron(model, data, loss_fn, **options)
    if criterion == "output_sensitivity":
        return output_sensitivity_per_neuron(model, data, **options)
    stats = activation_statistics(model, data, **options)
    if criterion == "apoz":
        return {n: 1.0 - s["apoz"] for n, s in stats.items()}
    return {n: s["mean_abs"] for n, s in stats.items()}


def oracle_neuron_loss_increase(model: nn.Module, layer_name: str, data, loss_fn=None,
                                num_batches: Optional[int] = None, max_batch: int = 8192) -> torch.Tensor:
    """The true loss increase of removing each neuron of one layer: ``(out,)`` tensor with entries
    ``L(model without neuron j) - L(model)``.

    Removing neuron j means zeroing row j of the layer's weight and its bias j, which makes the neuron's output
    exactly zero; the loss is the batch-size-weighted mean of ``loss_fn`` over ``data`` (evaluation mode). This is
    the brute-force "oracle" of Molchanov et al. {cite}`molchanov2017pruning` {cite}`molchanov2019importance`
    against which cheaper criteria are ranked (survey §3.3, §3.4).

    Fast: instead of editing the weights once per neuron, the batch is replicated C times and a forward hook
    zeroes neuron c's output in replica c, so C neurons cost one forward pass of ``C * batch`` examples
    (``C * batch <= max_batch``). The model is not changed.
    """
    loss_fn = check_loss_fn(loss_fn)
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    items = batches(data, model, num_batches, need_targets=True)
    with scoring(model) as modules:
        if layer_name not in modules:
            raise ValueError(f"layer_name: unknown layer {layer_name!r}; prunable weights are {list(modules)}")
        module = modules[layer_name]
        n_out = module.weight.shape[0]
        removed_losses = torch.zeros(n_out, dtype=torch.float64)
        base_losses = []
        total = 0
        with torch.no_grad():
            for x, y in items:
                b = batch_size(x)
                base = float(loss_fn(model(x), y))
                base_losses.append((b, torch.tensor(base, dtype=torch.float64)))
                chunk = max(1, max_batch // b)
                for start in range(0, n_out, chunk):
                    idx = torch.arange(start, min(start + chunk, n_out))
                    c = len(idx)
                    keep = torch.ones(c, n_out, dtype=torch.bool, device=x.device)
                    keep[torch.arange(c), idx] = False

                    def zero_neuron(mod, inp, out, keep=keep, c=c):
                        shape = out.shape
                        view = out.reshape(c, shape[0] // c, *shape[1:])
                        if isinstance(mod, nn.Linear):
                            k = keep.reshape(c, 1, *([1] * (view.dim() - 3)), n_out)
                        else:
                            k = keep.reshape(c, 1, n_out, *([1] * (view.dim() - 3)))
                        return (view * k).reshape(shape)

                    handle = module.register_forward_hook(zero_neuron)
                    try:
                        out = model(x.repeat(c, *([1] * (x.dim() - 1))))
                    finally:
                        handle.remove()
                    out = out.reshape(c, b, *out.shape[1:])
                    for i in range(c):
                        removed_losses[int(idx[i])] += b * float(loss_fn(out[i], y))
                total += b
        base_loss = weighted_average(base_losses)
        return (removed_losses / total - base_loss).float()


__all__ = ["activation_statistics", "output_sensitivity_per_neuron", "apoz", "mean_activation", "output_sensitivity",
           "neuron_scores", "oracle_neuron_loss_increase", "NEURON_CRITERIA"]


# ------------------------------------------------------------------------ removing neurons (Chapter 05)
def _alive_neurons(model: nn.Module, layer_name: str) -> torch.Tensor:
    """``(out,)`` bool: neuron j is alive while row j of the layer's mask keeps at least one weight."""
    from ..masks import get_masks

    mask = get_masks(model)[layer_name]
    return mask.reshape(mask.shape[0], -1).any(1)


def _check_layer(model: nn.Module, layer_name: str) -> nn.Module:
    from ..masks import _check_has_prunable

    modules = _check_has_prunable(model)
    if layer_name not in modules:
        raise ValueError(f"layer_name: unknown layer {layer_name!r}; prunable weights are {list(modules)}")
    return modules[layer_name]


def _check_count(count, alive: int) -> int:
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    if count > alive:
        raise ValueError(f"count={count} but only {alive} neurons of the layer are still alive")
    return int(count)


def remove_lowest_neurons(model: nn.Module, layer_name: str, scores: torch.Tensor, count: int) -> torch.Tensor:
    """Remove, in place, the ``count`` *alive* neurons of one layer with the lowest ``scores``; return their
    indices (lowest score first, ties broken by the lower index).

    Removing neuron j of layer ``l`` means ``W_l[j, :] = 0`` (a :class:`sparsity_lib.masks.Mask` on row j,
    added to the masks already there) and ``b_l[j] = 0``, so that the neuron's output ``z_j`` is exactly zero
    on every input: the removal whose loss change :func:`oracle_neuron_loss_increase` measures, and whose
    first-order estimate is the group Taylor score of Molchanov et al. {cite}`molchanov2019importance`
    (survey §3.3, §3.4). A neuron is alive while its row keeps at least one weight; removed neurons are
    skipped, so repeated calls remove more (use it on a copy to keep the original).

    ``scores``: ``(out,)`` tensor, higher = keep (e.g. ``neuron_scores(model, "taylor", data)[layer_name]``).
    The bias is set to zero, not masked: this is a removal for evaluation; if you train afterwards, the bias of
    a removed neuron can grow again (use ``sl.prune(..., structure="neuron")`` to prune rows for training).
    Arguments are checked before anything changes. Defined in Chapter 05.
    """
    from ..masks import apply_masks, get_masks

    module = _check_layer(model, layer_name)
    n_out = module.weight.shape[0]
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor of shape ({n_out},), got {type(scores).__name__}")
    if tuple(scores.shape) != (n_out,):
        raise ValueError(f"scores must have shape ({n_out},) (one per neuron of {layer_name}), got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contains NaN")
    alive = _alive_neurons(model, layer_name)
    count = _check_count(count, int(alive.sum()))
    candidates = torch.nonzero(alive.cpu()).reshape(-1)
    order = torch.sort(scores.detach().cpu().double()[candidates], stable=True).indices
    removed = candidates[order[:count]]
    if count == 0:
        return removed
    mask = get_masks(model)[layer_name].clone()
    mask[removed.to(mask.device)] = False
    apply_masks(model, {layer_name: mask})
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor):
        with torch.no_grad():
            bias[removed.to(bias.device)] = 0.0
    return removed


def prune_neurons_iteratively(model: nn.Module, layer_name: str, count: int, criterion: str = "taylor", data=None,
                              loss_fn=None, step: int = 1, **options) -> torch.Tensor:
    """Remove ``count`` neurons of one layer in rounds, re-scoring after every round; return the removed indices
    in the order they went.

    Each round scores the alive neurons with ``criterion`` on the *current* (already thinned) network and
    removes the ``step`` lowest (:func:`remove_lowest_neurons`; the last round removes what is left of
    ``count``)::

        repeat until count neurons are gone:   s = score(model);   remove the step alive neurons with lowest s

    This is the iterative procedure of Molchanov et al. {cite}`molchanov2017pruning`
    {cite}`molchanov2019importance` without their fine-tuning between rounds (survey §3.4): a score is a
    statement about removing *one* neuron from the network it was computed on, so after a few removals it is
    computed again. ``criterion``: one of :data:`NEURON_CRITERIA` (through :func:`neuron_scores`, with
    ``options``), or ``"oracle"`` (:func:`oracle_neuron_loss_increase` of this layer: greedy removal by the true
    loss increase; expensive). ``step >= count`` is one-shot removal. In place, like
    :func:`remove_lowest_neurons`. Defined in Chapter 05.
    """
    _check_layer(model, layer_name)
    if criterion not in NEURON_CRITERIA + ("oracle",):
        raise ValueError(f"criterion must be one of {NEURON_CRITERIA + ('oracle',)}, got {criterion!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be a positive integer, got {step!r}")
    count = _check_count(count, int(_alive_neurons(model, layer_name).sum()))
    if criterion not in ("l1_norm",) and data is None:
        raise ValueError(f"criterion {criterion!r} is data-driven: pass data (an iterable of (inputs, targets) batches)")
    if criterion == "oracle" and options:
        raise TypeError(f"criterion 'oracle' takes no options here, got {sorted(options)}")
    removed = []
    done = 0
    while done < count:
        if criterion == "oracle":
            scores = oracle_neuron_loss_increase(model, layer_name, data, loss_fn)
        else:
            scores = neuron_scores(model, criterion, data, loss_fn, **options)[layer_name]
        k = min(step, count - done)
        removed.append(remove_lowest_neurons(model, layer_name, scores, k))
        done += k
    return torch.cat(removed) if removed else torch.zeros(0, dtype=torch.long)


__all__ += ["remove_lowest_neurons", "prune_neurons_iteratively"]
