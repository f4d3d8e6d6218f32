"""Conditional computation: a small sparsely-gated mixture of experts (survey §5.5).

A mixture-of-experts layer holds :math:`E` expert networks :math:`f_1, \\dots, f_E` and a router. For each
token (here: each example) :math:`x` the router scores the experts, keeps the :math:`k` best and mixes only
their outputs,

.. math::
    h(x) = W_g x + \\epsilon \\odot \\operatorname{softplus}(W_n x), \\quad \\epsilon \\sim \\mathcal N(0, I)
    \\text{ (training only)}, \\qquad
    \\mathcal T(x) = \\operatorname{top}_k(h(x)), \\qquad
    g_e(x) = \\frac{e^{h_e(x)}}{\\sum_{j \\in \\mathcal T(x)} e^{h_j(x)}} \\;(e \\in \\mathcal T(x)), \\qquad
    y = \\sum_{e \\in \\mathcal T(x)} g_e(x) f_e(x),

the noisy top-k gating of Shazeer et al. {cite}`shazeer2017outrageously`; :math:`k = 1` is Switch routing
(Fedus et al. {cite}`fedus2021switch`). The gate vector is :math:`E - k` zeros per token: ephemeral, structured
sparsity, recomputed for every input. The layer has :math:`E` experts' parameters but computes :math:`k` of
them per token.

Load balancing: with nothing to stop it, the router tends to send most tokens to a few experts. The auxiliary
loss of Switch (Fedus et al., eq. 4), for a batch of :math:`N` tokens,

.. math:: \\mathcal L_{\\text{bal}} = E \\sum_{e=1}^{E} f_e P_e, \\qquad
    f_e = \\frac{1}{kN} \\sum_x [e \\in \\mathcal T(x)], \\qquad P_e = \\frac1N \\sum_x p_e(x),

with :math:`p(x) = \\operatorname{softmax}(h(x))` over all experts, is 1 under uniform routing and grows with
imbalance; only :math:`P_e` carries gradient. :func:`balance_penalty` adds it to the loss of
``sl.train.fit``. Defined in Chapter 11.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from .ephemeral import check_strength


def _check_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class TopKMoE(nn.Module):
    """A mixture of ``num_experts`` two-layer experts ``dim -> hidden -> out_dim`` (ReLU) with noisy top-k gating.

    Arguments:
        dim: input size; ``out_dim``: output size (default ``dim``); ``hidden``: hidden width of an expert
            (default ``dim``).
        num_experts: :math:`E \\ge 1`; ``k``: experts per token, :math:`1 \\le k \\le E`.
        noisy: add the trained Gaussian noise :math:`\\epsilon \\odot \\operatorname{softplus}(W_n x)` to the
            router's scores in training mode (Shazeer et al.); never in eval mode.

    ``forward(x)`` takes ``(N, dim)`` and returns ``(N, out_dim)``, running each expert only on the tokens routed
    to it. After every forward the layer keeps: ``balance_loss`` (:math:`\\mathcal L_{\\text{bal}}`, a 0-d tensor
    with gradient), ``last_experts`` (``(N, k)`` chosen experts, best first), ``last_gates`` (``(N, k)``, rows
    sum to 1) and ``last_load`` (tokens per expert, ``(E,)``).
    """

    def __init__(self, dim: int, num_experts: int, k: int = 1, hidden: Optional[int] = None,
                 out_dim: Optional[int] = None, noisy: bool = True):
        super().__init__()
        dim = _check_int(dim, "dim")
        num_experts = _check_int(num_experts, "num_experts")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_experts:
            raise ValueError(f"k must be an integer with 1 <= k <= num_experts = {num_experts}, got {k!r}")
        hidden = dim if hidden is None else _check_int(hidden, "hidden")
        out_dim = dim if out_dim is None else _check_int(out_dim, "out_dim")
        self.dim, self.num_experts, self.k, self.hidden, self.out_dim = dim, num_experts, k, hidden, out_dim
        self.noisy = bool(noisy)
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.noise = nn.Linear(dim, num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim)) for _ in range(num_experts))
        self.balance_loss: Optional[torch.Tensor] = None
        self.last_experts = self.last_gates = self.last_load = None

    def route(self, x: torch.Tensor):
        """``(experts, gates, probs)``: the ``(N, k)`` chosen experts (highest score first, ties to the lower
        index), their gates (softmax over the chosen scores) and the ``(N, E)`` softmax over all scores."""
        scores = self.router(x)
        if self.noisy and self.training:
            scores = scores + torch.randn_like(scores) * F.softplus(self.noise(x))
        order = torch.sort(scores.detach(), dim=1, descending=True, stable=True).indices[:, :self.k]
        gates = torch.softmax(scores.gather(1, order), dim=1)
        return order, gates, torch.softmax(scores, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"TopKMoE expects inputs of shape (N, {self.dim}), got {tuple(x.shape)}")
        experts, gates, probs = self.route(x)
        out = x.new_zeros(x.shape[0], self.out_dim)
        load = torch.zeros(self.num_experts, dtype=torch.long, device=x.device)
        for e, expert in enumerate(self.experts):
            token, slot = (experts == e).nonzero(as_tuple=True)
            load[e] = token.numel()
            if token.numel() == 0:
                continue  # the expert does no work, and gets no gradient
            out = out.index_add(0, token, gates[token, slot, None] * expert(x[token]))
        fraction = load.to(x.dtype) / (self.k * x.shape[0])
        self.balance_loss = self.num_experts * (fraction * probs.mean(0)).sum()
        self.last_experts, self.last_gates, self.last_load = experts.detach(), gates.detach(), load
        return out

    # ------------------------------------------------------------------------------------------- accounting
    def expert_parameters(self) -> int:
        """Parameters of one expert."""
        return sum(p.numel() for p in self.experts[0].parameters())

    def cost(self) -> Dict[str, int]:
        """Parameters and multiply-adds per token: ``parameters`` (all experts and the router), ``macs_per_token``
        (router plus :math:`k` experts), ``dense_macs_per_token`` (what running every expert would cost)."""
        expert_macs = self.dim * self.hidden + self.hidden * self.out_dim
        router_macs = self.dim * self.num_experts * (2 if self.noisy else 1)
        return {"parameters": sum(p.numel() for p in self.parameters()),
                "expert_parameters": self.expert_parameters(),
                "macs_per_token": router_macs + self.k * expert_macs,
                "dense_macs_per_token": router_macs + self.num_experts * expert_macs}

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, k={self.k}, hidden={self.hidden}, " \
               f"out_dim={self.out_dim}, noisy={self.noisy}"


def moe_layers(model: nn.Module):
    """Every :class:`TopKMoE` in ``model``."""
    return [m for m in model.modules() if isinstance(m, TopKMoE)]


def balance_penalty(coefficient: float):
    """``penalty(model) = coefficient * sum of the balance losses`` of the model's :class:`TopKMoE` layers after
    its last forward pass, for ``sl.train.fit(..., penalty=...)`` (Switch uses 0.01). ``coefficient >= 0``."""
    coefficient = check_strength(coefficient, "coefficient")

    def penalty(model: nn.Module) -> torch.Tensor:
        layers = moe_layers(model)
        if not layers:
            raise ValueError("model has no TopKMoE layer")
        if any(layer.balance_loss is None for layer in layers):
            raise RuntimeError("run a forward pass before asking for the balance penalty")
        return coefficient * sum(layer.balance_loss for layer in layers)

    return penalty


def load_imbalance(load) -> float:
    """Max over mean load: 1 when every expert gets the same number of tokens, :math:`E` when one gets all."""
    load = torch.as_tensor(load, dtype=torch.float64)
    if load.sum() <= 0:
        raise ValueError("load is empty")
    return float(load.max() / load.mean())


class MoEClassifier(nn.Module):
    """``Linear(in, dim) -> ReLU -> TopKMoE(dim, E, k, hidden, out=classes)``: a classifier whose second half is
    a mixture of experts. ``num_experts=1, k=1`` is an ordinary MLP ``in -> dim -> hidden -> classes``."""

    def __init__(self, in_features: int, num_classes: int, dim: int = 32, num_experts: int = 8, k: int = 1,
                 hidden: int = 32, noisy: bool = True):
        super().__init__()
        self.embed = nn.Linear(_check_int(in_features, "in_features"), _check_int(dim, "dim"))
        self.moe = TopKMoE(dim, num_experts, k, hidden=hidden, out_dim=_check_int(num_classes, "num_classes"),
                           noisy=noisy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(F.relu(self.embed(x.flatten(1))))


def expert_load(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Tokens per expert of the (first) :class:`TopKMoE` of ``model`` on ``inputs``, in eval mode (no noise)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("model has no TopKMoE layer")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(inputs.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
    return layers[0].last_load.detach().cpu().clone()


__all__ = ["TopKMoE", "MoEClassifier", "balance_penalty", "moe_layers", "load_imbalance", "expert_load"]
