"""Masks as parametrizations: zeros that survive training, saving, copying, and a clean removal."""

import copy
import io

import pytest
import torch
from torch import nn

import sparsity_lib as sl


def random_masks(model, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=g) < density for n, w in sl.prunable(model).items()}


def test_prunable_names_and_order(mlp, cnn):
    assert list(sl.prunable(mlp)) == ["0.weight", "2.weight", "4.weight"]
    assert list(sl.prunable(cnn)) == ["0.weight", "2.weight", "5.weight"]
    sl.apply_masks(mlp, random_masks(mlp))
    assert list(sl.prunable(mlp)) == ["0.weight", "2.weight", "4.weight"], "dense names survive masking"


def test_apply_and_get_masks(mlp):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    got = sl.get_masks(mlp)
    for name, w in sl.prunable(mlp).items():
        assert torch.equal(got[name], masks[name])
        assert (w[~masks[name]] == 0).all()
        assert (w[masks[name]] != 0).all()
    expected = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert sl.sparsity(mlp) == pytest.approx(expected)


@pytest.mark.parametrize("opt", ["sgd_momentum_wd", "adam_wd"])
def test_masked_weights_stay_zero_through_training(mlp, opt):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    params = list(mlp.parameters())
    optimizer = (torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=1e-2) if opt == "sgd_momentum_wd"
                 else torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2))
    x, y = torch.randn(32, 16), torch.randint(0, 5, (32,))
    for _ in range(20):
        optimizer.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        optimizer.step()
    for name, w in sl.prunable(mlp).items():
        assert (w[~masks[name]] == 0).all()
        assert (w[masks[name]] != 0).all()


def test_gradient_of_masked_entries_is_zero(mlp):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    nn.functional.cross_entropy(mlp(torch.randn(8, 16)), torch.randint(0, 5, (8,))).backward()
    original = mlp[0].parametrizations.weight.original
    assert (original.grad[~masks["0.weight"]] == 0).all()


def test_state_dict_round_trip_and_deepcopy(mlp):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    buffer = io.BytesIO()
    torch.save(mlp.state_dict(), buffer)
    fresh = copy.deepcopy(mlp)  # same parametrized structure
    for p in fresh.parameters():
        p.data.normal_()
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    x = torch.randn(4, 16)
    assert torch.equal(fresh(x), mlp(x))
    for name in masks:
        assert torch.equal(sl.get_masks(fresh)[name], masks[name])
    clone = copy.deepcopy(mlp)
    assert torch.equal(clone(x), mlp(x))
    assert sl.sparsity(clone) == sl.sparsity(mlp)


def test_remove_masks_restores_dense_keys(mlp):
    dense_keys = list(mlp.state_dict())
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    assert any("parametrizations" in k for k in mlp.state_dict())
    x = torch.randn(4, 16)
    before = mlp(x)
    s = sl.sparsity(mlp)
    sl.remove_masks(mlp)
    assert list(mlp.state_dict()) == dense_keys
    assert isinstance(mlp[0].weight, nn.Parameter)
    assert torch.equal(mlp(x), before)
    assert sl.sparsity(mlp) == s
    plain = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))
    plain.load_state_dict(mlp.state_dict())  # loads into an ordinary model


def test_replacing_a_mask(mlp):
    sl.apply_masks(mlp, random_masks(mlp, 0.5, seed=1))
    new = random_masks(mlp, 0.2, seed=2)
    sl.apply_masks(mlp, new)
    assert torch.equal(sl.get_masks(mlp)["2.weight"], new["2.weight"])
    assert len(mlp[2].parametrizations.weight) == 1, "a mask is replaced, not stacked"


def test_set_weights_keeps_masks(mlp):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    sl.set_weights(mlp, {"0.weight": torch.ones(40, 16)})
    w = sl.prunable(mlp)["0.weight"]
    assert torch.equal(w, masks["0.weight"].float())


@pytest.mark.parametrize("bad, error", [
    ({"nope.weight": torch.ones(40, 16, dtype=torch.bool)}, ValueError),
    ({"0.weight": torch.ones(16, 40, dtype=torch.bool)}, ValueError),
    ({"0.weight": torch.ones(40, 16)}, TypeError),
    ({"0.weight": [[True]]}, TypeError),
])
def test_bad_masks_leave_model_unchanged(mlp, bad, error):
    state = copy.deepcopy(mlp.state_dict())
    with pytest.raises(error, match="masks"):
        sl.apply_masks(mlp, bad)
    assert not sl.masks.is_masked(mlp)
    for k, v in mlp.state_dict().items():
        assert torch.equal(v, state[k])


def test_model_without_prunable_weights():
    with pytest.raises(ValueError, match="no prunable weights"):
        sl.prune(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)), 0.5)
    with pytest.raises(ValueError, match="no prunable weights"):
        sl.sparsity(nn.ReLU())


def test_sparsity_report(mlp):
    sl.prune(mlp, 0.5, scope="layerwise")
    report = sl.sparsity_report(mlp)
    assert list(report.index) == ["0.weight", "2.weight", "4.weight", "total"]
    assert report.loc["total", "params"] == 16 * 40 + 40 * 24 + 24 * 5
    assert report.loc["0.weight", "nonzeros"] == 320
    assert report["sparsity"].tolist() == pytest.approx([0.5, 0.5, 0.5, 0.5], abs=1e-3)


def test_mask_changes_are_followed_by_forward(mlp):
    """The float multiplier kept for speed must follow every change of the boolean mask."""
    sl.apply_masks(mlp, random_masks(mlp, 0.5, seed=1))
    other = copy.deepcopy(mlp)
    sl.apply_masks(other, random_masks(other, 0.2, seed=2))
    x = torch.randn(3, 16)
    mlp(x)  # the multiplier is in use
    mlp.load_state_dict(other.state_dict())
    assert torch.equal(mlp(x), other(x))
    mlp[0].parametrizations.weight[0].mask.zero_()  # an in-place edit
    assert (mlp[0].weight == 0).all()
    mlp.double()
    assert mlp(x.double()).dtype == torch.float64


def test_unmasking_a_deepcopy_leaves_the_original_masked(mlp):
    """A deep copy shares torch's generated ParametrizedLinear class with the original: unmasking one must not
    strip the other's weight property."""
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    x = torch.randn(3, 16)
    before = mlp(x)
    clone = sl.remove_masks(copy.deepcopy(mlp))
    assert not sl.masks.is_masked(clone) and sl.masks.is_masked(mlp)
    assert torch.equal(mlp(x), before) and torch.equal(clone(x), before)
    assert torch.equal(sl.get_masks(mlp)["0.weight"], masks["0.weight"])
    sl.remove_masks(mlp)
    assert torch.equal(mlp(x), before)
    assert type(mlp[0]) is nn.Linear and type(clone[0]) is nn.Linear


def test_remove_masks_keeps_the_parameter_object(mlp):
    sl.apply_masks(mlp, random_masks(mlp))
    original = mlp[0].parametrizations.weight.original
    optimizer = torch.optim.SGD(mlp.parameters(), lr=0.1)
    sl.remove_masks(mlp)
    assert mlp[0].weight is original
    assert any(p is original for group in optimizer.param_groups for p in group["params"])


# ------------------------------------------------------------------------------ the masked weight's fast getter
def _torch_weight(layer, attr="weight"):
    """The masked weight as torch's own parametrization machinery computes it (ParametrizationList called)."""
    return layer.parametrizations[attr]()


def test_fast_getter_equals_torch_getter_values_and_gradients(mlp):
    sl.apply_masks(mlp, random_masks(mlp, 0.6, seed=4))
    layer = mlp[0]
    assert getattr(type(layer).__dict__["weight"].fget, "_sl_fast", False)
    fast, slow = layer.weight, _torch_weight(layer)
    assert torch.equal(fast, slow)
    original = layer.parametrizations.weight.original
    g_fast, = torch.autograd.grad(fast.sum() * 3, original)
    g_slow, = torch.autograd.grad(slow.sum() * 3, original)
    assert torch.equal(g_fast, g_slow)
    assert torch.equal(g_fast, 3 * layer.parametrizations.weight[0].mask.float())   # closed form: 3 * mask


def test_fast_getter_honours_hooks_cache_and_later_parametrizations(mlp):
    sl.apply_masks(mlp, random_masks(mlp, 0.5, seed=5))
    layer = mlp[0]
    mask_module = layer.parametrizations.weight[0]
    calls = []
    handle = mask_module.register_forward_hook(lambda m, args, out: calls.append(1))
    layer.weight
    assert calls == [1]                      # a hook on the mask module is called: torch's path is taken
    handle.remove()
    global_handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(2))
    try:
        layer.weight
    finally:
        global_handle.remove()
    assert 2 in calls                        # global module hooks see the parametrization call too
    with torch.nn.utils.parametrize.cached():
        assert layer.weight is layer.weight  # parametrize.cached() still caches
    assert layer.weight is not layer.weight
    # a user's parametrization after the mask composes: weight = 2 * (original * mask)
    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Double())
    original = layer.parametrizations.weight.original
    assert torch.equal(layer.weight, 2 * original * mask_module.mask)
