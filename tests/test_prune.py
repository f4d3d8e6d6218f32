"""sl.prune against independent oracles (torch.nn.utils.prune) and closed forms, plus its error handling."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import sparsity_lib as sl


def torch_masks_global(model, amount):
    clone = copy.deepcopy(model)
    layers = [(m, "weight") for m in clone.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    torch_prune.global_unstructured(layers, pruning_method=torch_prune.L1Unstructured, amount=amount)
    return [m.weight_mask.bool() for m, _ in layers]


@pytest.mark.parametrize("amount", [0.1, 0.5, 0.9, 0.97])
def test_global_magnitude_equals_torch_global_unstructured(mlp, amount):
    expected = torch_masks_global(mlp, amount)
    masks = sl.prune(mlp, amount, method="magnitude", scope="global")
    for got, want in zip(masks.values(), expected):
        assert torch.equal(got, want)


def test_global_magnitude_on_conv_equals_torch(cnn):
    expected = torch_masks_global(cnn, 0.8)
    masks = sl.prune(cnn, 0.8)
    for got, want in zip(masks.values(), expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize("amount", [0.3, 0.75, 0.95])
def test_layerwise_magnitude_equals_torch_l1_unstructured(mlp, amount):
    clone = copy.deepcopy(mlp)
    masks = sl.prune(mlp, amount, scope="layerwise")
    for (name, got), module in zip(masks.items(), [clone[0], clone[2], clone[4]]):
        torch_prune.l1_unstructured(module, "weight", amount=amount)
        assert torch.equal(got, module.weight_mask.bool()), name


def test_budget_scope_gives_each_layer_its_sparsity(mlp):
    budget = {"0.weight": 0.2, "2.weight": 0.9, "4.weight": 0.5}
    sl.prune(mlp, 0.6, scope=budget)
    for name, w in sl.prunable(mlp).items():
        assert float((w == 0).float().mean()) == pytest.approx(budget[name], abs=1 / w.numel())


def test_random_is_seeded_and_reaches_target(mlp):
    a = sl.prune(copy.deepcopy(mlp), 0.7, method="random", seed=3)
    b = sl.prune(copy.deepcopy(mlp), 0.7, method="random", seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)
    sl.prune(mlp, 0.7, method="random", scope="layerwise", seed=4)
    assert sl.sparsity(mlp) == pytest.approx(0.7, abs=2e-3)


def test_pruning_is_cumulative(mlp):
    first = sl.prune(mlp, 0.5, method="random", seed=0)
    second = sl.prune(mlp, 0.8, method="magnitude")
    for n in first:
        assert not (second[n] & ~first[n]).any(), "a pruned weight came back"
    assert sl.sparsity(mlp) == pytest.approx(0.8, abs=1e-3)
    third = sl.prune(mlp, 0.3)  # a lower target never un-prunes
    assert all(torch.equal(third[n], second[n]) for n in third)


def test_n_m_keeps_top_n_of_every_group(mlp):
    scores = {n: w.detach().abs() for n, w in sl.prunable(mlp).items()}
    masks = sl.prune(mlp, 0.5, structure=(2, 4))
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, 4)
        assert (groups.sum(-1) == 2).all()
        s = scores[name].reshape(mask.shape[0], -1, 4)
        kept_min = torch.where(groups, s, torch.full_like(s, math.inf)).min(-1).values
        dropped_max = torch.where(~groups, s, torch.full_like(s, -math.inf)).max(-1).values
        assert (kept_min >= dropped_max).all(), "every kept weight outranks every dropped one in its group"


def test_n_m_on_conv_uses_flattened_input(cnn):
    masks = sl.prune(cnn, 0.75, structure=(1, 4), exclude=["0.weight"])  # conv1 has fan-in 9: not a multiple of 4
    m = masks["2.weight"].reshape(16, -1, 4)
    assert (m.sum(-1) == 1).all()
    assert masks["0.weight"].all()


def test_n_m_errors(mlp, cnn):
    with pytest.raises(ValueError, match="0 < n < m"):
        sl.prune(mlp, 0.0, structure=(4, 4))
    with pytest.raises(ValueError, match="1 - n/m"):
        sl.prune(mlp, 0.7, structure=(2, 4))
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        sl.prune(cnn, 0.5, structure=(2, 4))
    assert not sl.masks.is_masked(cnn)


def test_neuron_structure_removes_whole_rows(mlp, cnn):
    masks = sl.prune(mlp, 0.5, structure="neuron", scope="layerwise")
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        assert ((rows.all(1)) | (~rows.any(1))).all()
        assert float((~rows.all(1)).double().mean()) == pytest.approx(0.5, abs=0.5 / mask.shape[0] + 1e-6)
    # layer-wise neuron pruning by magnitude keeps the channels of largest L1 norm, as torch's ln_structured(n=1)
    masks = sl.prune(cnn, 0.5, structure="neuron", scope="layerwise")
    conv = masks["2.weight"]
    assert conv.shape == (16, 8, 3, 3)
    kept_channels = conv.reshape(16, -1).all(1)
    assert int(kept_channels.sum()) == 8
    # compare against torch's ln_structured on a fresh copy (n=1 norm, dim 0)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1))
    torch_prune.ln_structured(fresh[2], "weight", amount=0.5, n=1, dim=0)
    assert torch.equal(fresh[2].weight_mask.bool(), conv)


def test_global_neuron_reaches_target_within_one_row(mlp):
    sl.prune(mlp, 0.6, structure="neuron", scope="global")
    largest_row = max(w.shape[1] for w in sl.prunable(mlp).values())
    total = sum(w.numel() for w in sl.prunable(mlp).values())
    assert abs(sl.sparsity(mlp) - 0.6) <= largest_row / total


def test_block_structure(mlp):
    masks = sl.prune(mlp, 0.5, structure=("block", 4, 4), scope="layerwise", exclude=["4.weight"])
    tiles = masks["0.weight"].reshape(10, 4, 4, 4).permute(0, 2, 1, 3).reshape(10, 4, 16)
    assert ((tiles.all(-1)) | (~tiles.any(-1))).all()
    with pytest.raises(ValueError, match="does not tile"):
        sl.prune(mlp, 0.5, structure=("block", 7, 4), scope="layerwise")


def test_exclude_keeps_layer_and_counts_it(mlp):
    sl.prune(mlp, 0.5, exclude=["4.weight"])
    report = sl.sparsity_report(mlp)
    assert report.loc["4.weight", "sparsity"] == 0
    assert sl.sparsity(mlp) == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="cannot be reached"):
        sl.prune(mlp, 0.99, exclude=["0.weight", "2.weight"])


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(sparsity=float("nan")), ValueError, r"sparsity must be in \[0, 1\)"),
    (dict(sparsity="0.5"), TypeError, "sparsity must be a number"),
    (dict(sparsity=0.5, method="nope"), ValueError, "method must be one of .*magnitude.*random"),
    (dict(sparsity=0.5, scope="local"), ValueError, "scope must be"),
    (dict(sparsity=0.5, scope={"fc9.weight": 0.5}), ValueError, "unknown layer name 'fc9.weight'"),
    (dict(sparsity=0.5, scope={"0.weight": 1.5}), ValueError, r"scope\['0.weight'\] must be in \[0, 1\)"),
    (dict(sparsity=0.5, structure="rows"), ValueError, "structure must be one of"),
    (dict(sparsity=0.5, structure=(3, 2)), ValueError, "0 < n < m"),
    (dict(sparsity=0.5, exclude=["x.weight"]), ValueError, "exclude: unknown layer name"),
    (dict(sparsity=0.5, method="random", sed=1), TypeError, "has no option 'sed'"),
])
def test_bad_arguments_raise_and_leave_model_unchanged(mlp, kwargs, error, text):
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(error, match=text):
        sl.prune(mlp, **kwargs)
    assert not sl.masks.is_masked(mlp)
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())


def test_nan_scores_rejected(mlp):
    @sl.scores.register("test_nan_scores")
    def nan_scores(model):
        return {n: torch.full(w.shape, float("nan")) for n, w in sl.prunable(model).items()}

    try:
        with pytest.raises(ValueError, match="NaN"):
            sl.prune(mlp, 0.5, method="test_nan_scores")
        assert not sl.masks.is_masked(mlp)
    finally:
        sl.scores.METHODS.pop("test_nan_scores")


def test_data_method_needs_data(mlp):
    @sl.scores.register("test_needs_data", needs_data=True)
    def needs(model, data, loss_fn):
        return {n: w.detach().abs() for n, w in sl.prunable(model).items()}

    try:
        with pytest.raises(ValueError, match="pass data"):
            sl.prune(mlp, 0.5, method="test_needs_data")
    finally:
        sl.scores.METHODS.pop("test_needs_data")


def test_scoring_does_not_change_training_mode_or_grads(mlp):
    @sl.scores.register("test_side_effects", needs_data=True)
    def side_effects(model, data, loss_fn):
        model.eval()
        x, y = next(iter(data))
        loss_fn(model(x), y).backward()
        return {n: w.detach().abs() for n, w in sl.prunable(model).items()}

    try:
        mlp.train()
        sl.prune(mlp, 0.5, method="test_side_effects", data=[(torch.randn(4, 16), torch.randint(0, 5, (4,)))])
        assert mlp.training
        assert all(p.grad is None for p in mlp.parameters())
    finally:
        sl.scores.METHODS.pop("test_side_effects")
