"""Issue 10, practitioner-grade reliability of sl.prune: no silent wrong results.

Items covered here: 1 (the default loss only where meaningful; no selection from all-equal scores), 2 (structured
selection never empties a layer unless allowed; the sparsity reported is the one reached), 6 (bad values: numpy
scalars, a string loss_fn, one-shot generators, seed="abc", non-finite data and scores for every method), and 4
(transformer layers; in depth in test_transformers.py). Every refusal is checked to leave the model unchanged: state_dict,
parametrizations, hooks, requires_grad, training flags and gradients.
"""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib.select import global_masks, layerwise_masks, n_m_masks


# ------------------------------------------------------------------------------------------------ helpers
def snapshot(model):
    """Everything sl.prune could change on a model, as comparable values."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {}
    for name, module in model.named_modules():
        plist = getattr(module, "parametrizations", None)
        params[name] = {k: [type(p).__name__ for p in v] for k, v in plist.items()} if plist is not None else {}
    hooks = {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                    len(getattr(m, "_backward_pre_hooks", {}))) for name, m in model.named_modules()}
    flags = {name: m.training for name, m in model.named_modules()}
    grads = {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return state, params, hooks, flags, grads


def assert_unchanged(before, model):
    state, params, hooks, flags, grads = snapshot(model)
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]) or (torch.isnan(state[k]).any() and torch.equal(
            torch.nan_to_num(state[k]), torch.nan_to_num(before[0][k]))), k
    assert params == before[1]
    assert hooks == before[2]
    assert flags == before[3]
    assert grads.keys() == before[4].keys()
    for n, (req, g) in grads.items():
        assert req == before[4][n][0], n
        assert (g is None) == (before[4][n][1] is None), n
        if g is not None:
            assert torch.equal(g, before[4][n][1]), n


def refuses(model, exc, match, *args, **kwargs):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        sl.prune(model, *args, **kwargs)
    assert_unchanged(before, model)


def regression_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 1))


def regression_data(seed=0, batches=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(16, 6, generator=g)
        out.append((x, x[:, :1] * 2 - x[:, 1:2]))
    return out


def classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def class_data(seed=0, batches=2, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 8, generator=g), torch.randint(0, classes, (16,), generator=g)) for _ in range(batches)]


LOSS_METHODS = ["snip", "taylor", "grasp", "obd", "obs", "woodfisher"]
METHOD_OPTIONS = {"edgepopup": {"epochs": 1}, "obs": {"max_params": 10_000, "negative_curvature": "abs"}}


def data_methods():
    return [n for n in sl.scores.known_methods() if sl.scores.get_method(n).needs_data]


# ----------------------------------------------------------------------------------------- item 1: the loss
@pytest.mark.parametrize("method", LOSS_METHODS)
def test_regression_head_without_loss_fn_is_refused(method):
    model = regression_mlp()
    refuses(model, ValueError, "loss_fn is required.*dtype torch.float32", 0.5, method, data=regression_data())


def test_default_loss_refused_when_targets_do_not_fit_the_outputs():
    model = classifier()
    data = [(x, y + 4) for x, y in class_data()]           # classes 4..7, the model has 4 outputs
    refuses(model, ValueError, r"not class indices of the model's 4 outputs", 0.5, "snip", data=data)
    seq = nn.Sequential(nn.Linear(8, 4))                   # (batch, time, classes) outputs, (batch, time) targets
    data = [(torch.randn(5, 3, 8), torch.randint(0, 4, (5, 3)))]
    refuses(seq, ValueError, "reads dim 1 of the outputs", 0.5, "taylor", data=data)


def test_default_loss_on_class_targets_is_cross_entropy():
    model, data = classifier(), class_data()
    default = sl.prune(copy.deepcopy(model), 0.6, "snip", data=data)
    explicit = sl.prune(copy.deepcopy(model), 0.6, "snip", data=data, loss_fn=F.cross_entropy)
    assert all(torch.equal(default[n], explicit[n]) for n in default)


def test_regression_with_loss_fn_matches_hand_computed_snip():
    model, data = regression_mlp(), regression_data()
    masks = sl.prune(copy.deepcopy(model), 0.7, "snip", data=data, loss_fn=F.mse_loss, num_batches=None)
    # independent SNIP: |dL/dw * w| of the mean loss over the batches, by plain autograd, then global top-k
    weights = [model[0].weight, model[2].weight, model[4].weight]
    total = [torch.zeros_like(w) for w in weights]
    for x, y in data:
        grads = torch.autograd.grad(F.mse_loss(model(x), y), weights)
        total = [t + g * len(x) for t, g in zip(total, grads)]
    n = sum(len(x) for x, _ in data)
    scores = {k: (t / n * w).abs().detach() for k, t, w in zip(["0.weight", "2.weight", "4.weight"], total, weights)}
    expected = global_masks(scores, {k: torch.ones_like(v, dtype=torch.bool) for k, v in scores.items()}, 0.7)
    for k in expected:
        agree = (masks[k] == expected[k]).float().mean()
        assert agree > 0.99, (k, float(agree))     # ties at the threshold at most (float summation order)


def test_loss_free_methods_need_no_loss_fn_on_a_regression_head():
    model = regression_mlp()
    sl.prune(model, 0.5, "wanda", scope="layerwise", data=regression_data())
    assert sl.sparsity(model) == pytest.approx(0.5, abs=0.01)


def test_a_loss_that_ignores_the_outputs_gives_all_equal_scores_and_is_refused():
    model = classifier()
    refuses(model, ValueError, "all equal", 0.5, "taylor", data=class_data(),
            loss_fn=lambda out, y: (out * 0).sum())


def test_select_refuses_all_equal_scores_but_not_partial_ties():
    current = {"a": torch.ones(4, 6, dtype=torch.bool), "b": torch.ones(3, 4, dtype=torch.bool)}
    flat = {"a": torch.full((4, 6), 0.5), "b": torch.full((3, 4), 0.5)}
    with pytest.raises(ValueError, match="all layers"):
        global_masks(flat, current, 0.5)
    ranked = {"a": torch.rand(4, 6), "b": torch.full((3, 4), 0.5)}
    with pytest.raises(ValueError, match="layer 'b'"):
        layerwise_masks(ranked, current, {"a": 0.5, "b": 0.5})
    with pytest.raises(ValueError, match="layer 'a'"):
        n_m_masks({"a": torch.zeros(4, 8)}, {"a": torch.ones(4, 8, dtype=torch.bool)}, 2, 4)
    # ties among some candidates (e.g. dead neurons) are fine; a layer at sparsity 0 chooses nothing
    partial = {"a": torch.cat([torch.zeros(4, 3), torch.rand(4, 3) + 1], 1), "b": torch.rand(3, 4)}
    masks = global_masks(partial, current, 0.3)           # round(0.3 * 36) = 11 of the 12 zero scores go
    assert int(masks["a"][:, :3].sum()) == 1 and masks["a"][:, 3:].all() and masks["b"].all()
    layerwise_masks(ranked, current, {"a": 0.5, "b": 0.0})


# ------------------------------------------------------------------------------------- item 2: structure
def rows_alive(mask):
    return int(mask.reshape(mask.shape[0], -1).any(1).sum())


def count_sparsity(model):
    """Independent count: zeros among the weights of every Linear/Conv layer."""
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def test_layerwise_neurons_at_90_keeps_one_neuron_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 20), nn.ReLU(), nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 3))
    dense = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"4\.weight: 0\.6667 instead of 0\.9000"):
        masks = sl.prune(model, 0.9, scope="layerwise", structure="neuron")
    assert [rows_alive(m) for m in masks.values()] == [2, 1, 1]   # 20 -> 2, 10 -> 1, and 3 -> 1 (not 0)
    best = dense[4].weight.detach().abs().mean(1).argmax()
    assert masks["4.weight"][best].all()                           # the kept output neuron is the best one
    assert sl.sparsity(model) == pytest.approx(count_sparsity(model))
    x = torch.randn(5, 8)
    assert not torch.allclose(model(x), model(x + 1))              # the output still depends on the input
    # explicitly allowed: the old behaviour, the output layer goes
    emptied = sl.prune(copy.deepcopy(dense), 0.9, scope="layerwise", structure="neuron", allow_empty_layers=True)
    assert rows_alive(emptied["4.weight"]) == 0


def test_global_neurons_at_50_keeps_every_layer_and_reaches_the_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 64))
    with torch.no_grad():                      # two small-magnitude layers: global ranking empties both
        model[0].weight.mul_(0.01)
        model[2].weight.mul_(0.01)
    emptied = sl.prune(copy.deepcopy(model), 0.5, structure="neuron", allow_empty_layers=True)
    assert rows_alive(emptied["0.weight"]) == 0 and rows_alive(emptied["2.weight"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # reachable: no warning
        masks = sl.prune(model, 0.5, structure="neuron")
    assert all(rows_alive(m) >= 1 for m in masks.values())
    total = 8 * 16 + 16 * 16 + 16 * 64
    assert abs(count_sparsity(model) * total - 0.5 * total) <= 16          # within one neuron of the target
    assert sl.sparsity(model) == pytest.approx(count_sparsity(model))


def test_global_neurons_unreachable_target_warns_with_the_sparsity_reached():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match="target was not reached"):
        masks = sl.prune(model, 0.95, structure="neuron")
    assert [rows_alive(m) for m in masks.values()] == [1, 1, 1]
    assert sl.sparsity(model) == pytest.approx(1 - (8 + 4 + 4) / (32 + 16 + 8))


def test_channels_and_blocks_keep_one_group_per_layer(cnn):
    with pytest.warns(UserWarning):
        masks = sl.prune(cnn, 0.9, scope="layerwise", structure="channel")
    assert [rows_alive(m) for m in masks.values()] == [1, 2, 1]            # 8 -> 1, 16 -> 2, 4 -> 1 (not 0)
    layer = nn.Linear(4, 2)
    with pytest.warns(UserWarning):
        masks = sl.prune(layer, 0.9, scope="layerwise", structure=("block", 2, 2))
    assert int(masks["weight"].sum()) == 4                                 # one 2x2 block of the two kept


def test_global_channels_at_50_on_a_cnn_keep_every_layer(cnn):
    with torch.no_grad():                      # the first convolution ranks lowest: global selection empties it
        cnn[0].weight.mul_(0.001)
    emptied = sl.prune(copy.deepcopy(cnn), 0.5, structure="channel", allow_empty_layers=True)
    assert rows_alive(emptied["0.weight"]) == 0
    masks = sl.prune(cnn, 0.5, structure="channel")
    assert [rows_alive(m) >= 1 for m in masks.values()] == [True, True, True]
    assert rows_alive(masks["0.weight"]) == 1
    assert sl.sparsity(cnn) == pytest.approx(count_sparsity(cnn))
    total = sum(m.numel() for m in masks.values())
    assert abs(count_sparsity(cnn) - 0.5) * total <= 16 * 6 * 6             # within one group of the target


def test_unstructured_selection_is_unchanged_by_the_guard(mlp):
    # layer collapse under unstructured global pruning is taught in Chapter 04: no protection there
    expected = global_masks({n: w.detach().abs() for n, w in sl.prunable(mlp).items()},
                            {n: torch.ones_like(w, dtype=torch.bool) for n, w in sl.prunable(mlp).items()}, 0.9)
    masks = sl.prune(mlp, 0.9)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)


# ------------------------------------------------------------------------------------- item 6: bad values
@pytest.mark.parametrize("value", [np.float32(0.5), np.float64(0.5), np.array(0.5), torch.tensor(0.5)])
def test_numpy_and_tensor_scalars_are_numbers(mlp, value):
    expected = sl.prune(copy.deepcopy(mlp), 0.5)
    masks = sl.prune(mlp, value)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)


@pytest.mark.parametrize("value", ["0.5", np.bool_(True), torch.tensor([0.5, 0.5]), None])
def test_non_numbers_as_sparsity_are_refused(mlp, value):
    refuses(mlp, TypeError, "sparsity must be a number", value)


def test_string_loss_fn_is_refused():
    model = classifier()
    refuses(model, TypeError, "loss_fn must be a callable.*string 'cross_entropy'", 0.5, "snip", data=class_data(),
            loss_fn="cross_entropy")
    refuses(model, TypeError, "loss_fn must be a callable", 0.5, "snip", data=class_data(), loss_fn=3)


@pytest.mark.parametrize("method", ["obd", "obs", "snip", "grasp"])
def test_one_shot_generator_sees_every_batch(method):
    model, data = classifier(), class_data(batches=3)
    options = METHOD_OPTIONS.get(method, {})
    expected = sl.prune(copy.deepcopy(model), 0.6, method, data=data, **options)
    masks = sl.prune(model, 0.6, method, data=(b for b in data), **options)
    assert all(torch.equal(masks[n], expected[n]) for n in masks)


def test_exhausted_generator_is_refused():
    model, data = classifier(), class_data()
    gen = (b for b in data)
    list(gen)
    refuses(model, ValueError, "yielded no batches", 0.5, "snip", data=gen)


@pytest.mark.parametrize("seed", ["abc", 1.5, True])
def test_non_integer_seed_is_refused(mlp, seed):
    refuses(mlp, TypeError, "seed must be an integer", 0.5, "random", seed=seed)


def test_numpy_integer_seed_is_an_integer(mlp):
    a = sl.prune(copy.deepcopy(mlp), 0.5, "random", seed=np.int64(3))
    b = sl.prune(copy.deepcopy(mlp), 0.5, "random", seed=3)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("method", data_methods())
@pytest.mark.parametrize("where", ["inputs", "targets", "generator"])
def test_non_finite_data_is_refused_by_every_method(method, where):
    model = classifier()
    data = class_data()
    if where == "targets":   # a regression-style float target with inf, with an explicit loss
        data = [(x, F.one_hot(y, 4).float()) for x, y in data]
        data[1][1][3, 2] = float("inf")
        loss = lambda out, y: F.mse_loss(out, y)  # noqa: E731
    else:
        data[1][0][2, 5] = float("nan")
        loss = None
    if where == "generator":
        data = (b for b in data)
    refuses(model, ValueError, "non-finite", 0.5, method, data=data, loss_fn=loss,
            **METHOD_OPTIONS.get(method, {}))


@pytest.mark.parametrize("structure,sparsity", [(None, 0.5), ("neuron", 0.5), ((2, 4), 0.5), (("block", 2, 2), 0.5)])
def test_non_finite_scores_are_refused_on_every_path(structure, sparsity):
    model = classifier()
    with torch.no_grad():
        model[2].weight[3, 5] = float("nan")
    refuses(model, ValueError, r"scores\['2.weight'\] contains 1 non-finite", sparsity, "magnitude",
            scope="layerwise", structure=structure)
    with torch.no_grad():
        model[2].weight[3, 5] = float("inf")
    refuses(model, ValueError, "non-finite values \\(inf\\)", sparsity, "magnitude", structure=structure,
            scope="layerwise" if structure == (2, 4) else "global")


def test_allow_empty_layers_must_be_a_bool(mlp):
    refuses(mlp, TypeError, "allow_empty_layers must be True or False", 0.5, structure="neuron",
            allow_empty_layers="yes")


def test_bad_sync_is_refused(mlp):
    refuses(mlp, ValueError, "sync must be", 0.5, sync="all")


# ------------------------------------------------------------------------ item 4: transformers
def encoder(seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


def test_attention_in_projection_is_prunable():
    model = encoder()
    names = list(sl.prunable(model))
    assert any(n.endswith("in_proj_weight") for n in names), names


def test_transformer_sparsity_counts_every_weight_matrix():
    model = encoder()
    sl.prune(model, 0.5)
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2]
    zeros = sum(int((p == 0).sum()) for p in matrices)
    total = sum(p.numel() for p in matrices)
    assert zeros / total == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_input_hook_methods_work_on_out_proj(method):
    model = encoder()
    data = [(torch.randn(4, 5, 8), torch.zeros(4, dtype=torch.long))]
    sl.prune(model, 0.5, method, scope="layerwise", data=data)
    out_proj = model.layers[0].self_attn.out_proj.weight
    assert float((out_proj == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


# ------------------------------------------------------------------ foreign transforms refused before scoring
@pytest.mark.parametrize("method", ["magnitude", "snip", "obd"])
def test_prune_refuses_a_weight_norm_layer_before_scoring(method):
    """A layer under someone else's weight transform is refused by sl.prune up front, naming the layer, whatever the
    method (a data-driven one used to fail inside scoring with a message that could not name it)."""
    model = classifier()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    data = class_data()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"0\.weight"):
        sl.prune(model, 0.5, method=method, data=data if method != "magnitude" else None)
    assert_unchanged(before, model)
