"""Tests of sparsity_lib.models.shrink_mlp: the small dense network that neuron pruning leaves.

The oracle is the masked model itself: the shrunk network must compute the same function (up to float
rounding) while having physically fewer neurons.
"""

import copy

import pytest
import torch

import sparsity_lib as sl
from sparsity_lib.models import MLP, lenet_300_100, mlp, shrink_mlp


def _inputs(n=64, features=64, seed=0):
    return torch.randn(n, features, generator=torch.Generator().manual_seed(seed))


def _with_random_biases(model, seed=1):
    """Nonzero biases everywhere, so that removed neurons output a nonzero constant that must be folded."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers():
            layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.98])
def test_neuron_pruned_lenet_shrinks_to_kept_rows_with_same_outputs(sparsity):
    net = _with_random_biases(lenet_300_100(seed=0))
    sl.prune(net, sparsity, method="magnitude", scope="layerwise", structure="neuron", exclude=["fc3.weight"])
    kept_rows = [int(sl.get_masks(net)[f"fc{i}.weight"].any(dim=1).sum()) for i in (1, 2)]
    assert kept_rows == [300 - round(sparsity * 300), 100 - round(sparsity * 100)]
    small = shrink_mlp(net)
    assert isinstance(small, MLP) and small.hidden == tuple(kept_rows)
    assert [tuple(l.weight.shape) for l in small.layers()] == [(kept_rows[0], 64), (kept_rows[1], kept_rows[0]),
                                                               (10, kept_rows[1])]
    x = _inputs()
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)
    assert not sl.masks.is_masked(small)
    # a dense network: one weight per (kept input, kept output) pair, far fewer than the masked count
    assert sl.masks.count_params(small) == 64 * kept_rows[0] + kept_rows[0] * kept_rows[1] + kept_rows[1] * 10


def test_constant_neurons_are_folded_into_the_next_bias():
    """A neuron with a zero incoming row outputs sigma(b): its contribution must move into the next bias."""
    for activation in ("relu", "tanh", "softplus", "gelu"):
        net = _with_random_biases(mlp(6, (5, 4), 3, activation=activation, seed=0), seed=2)
        masks = sl.get_masks(net)
        masks["fc1.weight"][[0, 2]] = False
        sl.apply_masks(net, masks)
        small = shrink_mlp(net)
        assert small.hidden == (3, 4), activation
        b2 = net.fc2.bias + net.fc2.weight[:, [0, 2]] @ net._act(net.fc1.bias[[0, 2]])
        torch.testing.assert_close(small.fc2.bias, b2.detach())
        x = _inputs(32, 6)
        torch.testing.assert_close(small(x), net(x), atol=1e-6, rtol=1e-5)


def test_neuron_fed_only_by_constant_neurons_becomes_constant_too():
    net = _with_random_biases(mlp(6, (5, 4), 3, seed=0))
    with torch.no_grad():
        net.fc1.weight[[0, 1]] = 0.0           # fc1 neurons 0, 1 are constant
        net.fc2.weight[2, 2:] = 0.0            # fc2 neuron 2 only listens to them
    small = shrink_mlp(net)
    assert small.hidden == (3, 3)
    x = _inputs(32, 6)
    torch.testing.assert_close(small(x), net(x), atol=1e-6, rtol=1e-5)


def test_silent_neurons_are_removed_backwards():
    """A neuron whose outgoing weights are all zero has no effect; removing it can silence the layer below."""
    net = _with_random_biases(mlp(6, (5, 4), 3, seed=0))
    with torch.no_grad():
        net.fc3.weight[:, 1] = 0.0            # fc2 neuron 1 is silent
        net.fc2.weight[:, 4] = 0.0            # fc1 neuron 4 is silent
        net.fc2.weight[[0, 2, 3], 3] = 0.0    # fc1 neuron 3 only feeds fc2 neuron 1, which goes: silent too
    small = shrink_mlp(net)
    assert small.hidden == (3, 3)
    x = _inputs(32, 6)
    torch.testing.assert_close(small(x), net(x), atol=1e-6, rtol=1e-5)


def test_unstructured_sparsity_keeps_every_neuron_and_its_zeros():
    net = lenet_300_100(seed=1)
    sl.prune(net, 0.5, method="magnitude", scope="layerwise")
    small = shrink_mlp(net)
    assert small.hidden == (300, 100)
    assert sl.sparsity(small) == pytest.approx(sl.sparsity(net))
    x = _inputs()
    torch.testing.assert_close(small(x), net(x), atol=1e-6, rtol=1e-6)


def test_an_emptied_layer_keeps_one_placeholder_neuron():
    net = _with_random_biases(mlp(6, (5, 4), 3, seed=0))
    masks = sl.get_masks(net)
    masks["fc2.weight"][:] = False             # every fc2 neuron is constant
    sl.apply_masks(net, masks)
    small = shrink_mlp(net)
    assert small.hidden[1] == 1
    x = _inputs(32, 6)
    out = net(x)
    torch.testing.assert_close(small(x), out, atol=1e-6, rtol=1e-5)
    assert torch.allclose(out, out[:1].expand_as(out))  # the network is constant: a sanity check of the setup


def test_no_bias_nonzero_constant_is_kept():
    """Without biases, a constant softplus neuron (softplus(0) = log 2) cannot be folded away: it stays."""
    net = mlp(6, (5, 4), 3, activation="softplus", bias=False, seed=0)
    masks = sl.get_masks(net)
    masks["fc1.weight"][1] = False
    sl.apply_masks(net, masks)
    small = shrink_mlp(net)
    assert small.hidden == (5, 4)
    x = _inputs(16, 6)
    torch.testing.assert_close(small(x), net(x), atol=1e-6, rtol=1e-5)
    relu_net = mlp(6, (5, 4), 3, activation="relu", bias=False, seed=0)
    sl.apply_masks(relu_net, masks)
    assert shrink_mlp(relu_net).hidden == (4, 4)  # relu(0) = 0: nothing to fold, the neuron goes


def test_model_is_unchanged_and_result_trains():
    net = lenet_300_100(seed=0)
    sl.prune(net, 0.8, scope="layerwise", structure="neuron", exclude=["fc3.weight"])
    before = copy.deepcopy(net.state_dict())
    small = shrink_mlp(net)
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    loss = small(_inputs()).logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None for p in small.parameters())


def test_rejects_models_that_are_not_mlps():
    with pytest.raises(TypeError, match="MLP"):
        shrink_mlp(torch.nn.Sequential(torch.nn.Linear(4, 3)))
