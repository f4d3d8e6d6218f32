"""Chapter 05 additions to sparsity_lib.scores: removing neurons (one-shot and iteratively re-scored).

Checked against independent oracles: plain weight edits on an unmasked copy, the loss increase measured by
``oracle_neuron_loss_increase``, and a greedy loop written out by hand.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl


def make_data(n_batches=2, batch=32, d_in=16, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def mean_loss(model, data):
    with torch.no_grad():
        total = sum(float(F.cross_entropy(model(x), y)) * len(y) for x, y in data)
    return total / sum(len(y) for _, y in data)


def zeroed_by_hand(model, layer, neurons):
    """Independent removal: a copy of an *unmasked* model whose weight rows and biases are overwritten with zeros.

    (Not via ``sl.remove_masks`` on a deep copy of a masked model: the copy shares torch's parametrized class with
    the original, and removing the parametrization from one breaks the other.)"""
    assert not sl.masks.is_masked(model)
    plain = copy.deepcopy(model)
    module = dict(plain.named_modules())[layer.rsplit(".", 1)[0]]
    with torch.no_grad():
        module.weight[list(neurons)] = 0.0
        module.bias[list(neurons)] = 0.0
    return plain


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------- remove_lowest_neurons
def test_remove_lowest_neurons_removes_the_lowest_and_zeroes_their_outputs(mlp):
    scores = torch.tensor([5.0, -1.0, 3.0, 0.5] + [10.0 + i for i in range(36)])
    reference = zeroed_by_hand(mlp, "0.weight", [1, 2, 3])
    removed = sl.scores.remove_lowest_neurons(mlp, "0.weight", scores, 3)
    assert removed.tolist() == [1, 3, 2]  # lowest score first
    mask = sl.get_masks(mlp)["0.weight"]
    assert not mask[[1, 2, 3]].any() and mask[[0] + list(range(4, 40))].all()
    assert torch.all(mlp[0].bias[[1, 2, 3]] == 0)
    x = torch.randn(50, 16)
    out = mlp[0](x)
    assert torch.all(out[:, [1, 2, 3]] == 0)  # the removed neurons output exactly zero on every input
    torch.testing.assert_close(mlp(x), reference(x))


def test_removing_one_neuron_changes_the_loss_by_the_oracle(mlp):
    data = make_data()
    oracle = sl.scores.oracle_neuron_loss_increase(mlp, "2.weight", data)
    base = mean_loss(mlp, data)
    for j in (0, 7, 23):
        pruned = copy.deepcopy(mlp)
        scores = torch.ones(24)
        scores[j] = -1.0
        assert sl.scores.remove_lowest_neurons(pruned, "2.weight", scores, 1).tolist() == [j]
        assert mean_loss(pruned, data) - base == pytest.approx(float(oracle[j]), abs=1e-5)


def test_removal_is_cumulative_and_skips_removed_neurons(mlp):
    scores = torch.arange(24, dtype=torch.float32)
    first = sl.scores.remove_lowest_neurons(mlp, "2.weight", scores, 4)
    second = sl.scores.remove_lowest_neurons(mlp, "2.weight", scores, 4)  # the same scores: the next four
    assert first.tolist() == [0, 1, 2, 3] and second.tolist() == [4, 5, 6, 7]
    alive = sl.get_masks(mlp)["2.weight"].any(1)
    assert alive.sum() == 16 and not alive[:8].any()
    # ties: the lower index goes first
    tied = copy.deepcopy(mlp)
    assert sl.scores.remove_lowest_neurons(tied, "4.weight", torch.zeros(5), 2).tolist() == [0, 1]
    assert sl.scores.remove_lowest_neurons(mlp, "4.weight", torch.zeros(5), 0).numel() == 0


def test_remove_lowest_neurons_on_a_convolution_removes_channels(cnn):
    removed = sl.scores.remove_lowest_neurons(cnn, "0.weight", torch.arange(8.0).flip(0), 3)
    assert sorted(removed.tolist()) == [5, 6, 7]
    out = cnn[0](torch.randn(2, 1, 6, 6))
    assert torch.all(out[:, 5:] == 0) and torch.all(out[:, :5] != 0)


@pytest.mark.parametrize("layer, scores, count, error", [
    ("9.weight", torch.zeros(40), 1, ValueError),
    ("0.weight", torch.zeros(39), 1, ValueError),
    ("0.weight", torch.full((40,), float("nan")), 1, ValueError),
    ("0.weight", torch.zeros(40), 41, ValueError),
    ("0.weight", torch.zeros(40), -1, ValueError),
    ("0.weight", torch.zeros(40), 1.5, ValueError),
    ("0.weight", [0.0] * 40, 1, TypeError),
])
def test_remove_lowest_neurons_rejects_bad_input_and_leaves_the_model_unchanged(mlp, layer, scores, count, error):
    before = state(mlp)
    with pytest.raises(error):
        sl.scores.remove_lowest_neurons(mlp, layer, scores, count)
    assert not sl.masks.is_masked(mlp)
    after = state(mlp)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- prune_neurons_iteratively
def test_iterative_taylor_equals_a_greedy_loop_written_by_hand(mlp):
    data = make_data()
    pruned = copy.deepcopy(mlp)
    order = sl.scores.prune_neurons_iteratively(pruned, "2.weight", 5, "taylor", data, step=1)
    # by hand: rescore an unmasked, zero-edited copy with the group Taylor score and take the lowest alive
    plain, gone = copy.deepcopy(mlp), []
    for _ in range(5):
        s = sl.scores.taylor_per_neuron(plain, data)["2.weight"].clone()
        s[gone] = float("inf")
        gone.append(int(torch.argmin(s)))
        plain = zeroed_by_hand(plain, "2.weight", gone)
    assert order.tolist() == gone
    x = torch.randn(20, 16)
    torch.testing.assert_close(pruned(x), plain(x))


def test_iterative_oracle_is_greedy_by_the_true_loss(mlp):
    data = make_data()
    pruned = copy.deepcopy(mlp)
    order = sl.scores.prune_neurons_iteratively(pruned, "4.weight", 3, "oracle", data, step=1)
    gone = []
    for _ in range(3):  # brute force: try every alive neuron, keep the removal with the smallest loss
        losses = {j: mean_loss(zeroed_by_hand(mlp, "4.weight", gone + [j]), data) for j in range(5) if j not in gone}
        gone.append(min(losses, key=losses.get))
    assert order.tolist() == gone


def test_one_shot_and_l1_special_cases(mlp):
    data = make_data()
    # step >= count: one round, the same as remove_lowest_neurons with the scores of the dense model
    a, b = copy.deepcopy(mlp), copy.deepcopy(mlp)
    one_shot = sl.scores.prune_neurons_iteratively(a, "0.weight", 10, "mean_activation", data, step=10)
    scores = sl.scores.neuron_scores(mlp, "mean_activation", data)["0.weight"]
    assert one_shot.tolist() == sl.scores.remove_lowest_neurons(b, "0.weight", scores, 10).tolist()
    # the L1 norm of a row does not depend on the other rows: re-scoring changes nothing, and needs no data
    c, d = copy.deepcopy(mlp), copy.deepcopy(mlp)
    iterative = sl.scores.prune_neurons_iteratively(c, "0.weight", 10, "l1_norm", step=1)
    l1 = sl.scores.neuron_scores(mlp, "l1_norm")["0.weight"]
    assert iterative.tolist() == sl.scores.remove_lowest_neurons(d, "0.weight", l1, 10).tolist()


@pytest.mark.parametrize("kwargs, error", [
    (dict(criterion="hessian"), ValueError),
    (dict(step=0), ValueError),
    (dict(count=41), ValueError),
    (dict(data=None), ValueError),
    (dict(criterion="oracle", num_batches=1), TypeError),
])
def test_prune_neurons_iteratively_rejects_bad_input(mlp, kwargs, error):
    args = dict(layer_name="0.weight", count=3, criterion="taylor", data=make_data(), step=1) | kwargs
    before = state(mlp)
    with pytest.raises(error):
        sl.scores.prune_neurons_iteratively(mlp, **args)
    assert not sl.masks.is_masked(mlp) and all(torch.equal(v, state(mlp)[k]) for k, v in before.items())
