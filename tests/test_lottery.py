"""Tests of sparsity_lib.lottery: rewinding, IMP, the controls, the retraining schedules and edge-popup."""

import copy
import math

import pytest
import torch
from torch import nn

import sparsity_lib as sl
from sparsity_lib import lottery as lt


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))


def _jiggle(model):
    """A stand-in for training: move every trainable value (masked weights get no change through the mask)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return {"moved": True}


def _weights_and_biases(model):
    return {k: v.detach().clone() for k, v in sl.prunable(model).items()} | {
        n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}


def _task(n=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = (x[:, :5].argmax(1)).long()
    return sl.data.Task(name="toy", x_train=x, y_train=y, x_test=x[:32], y_test=y[:32], num_classes=5)


# ----------------------------------------------------------------------------------------------- rewind
@pytest.mark.parametrize("masked_state", [False, True])
def test_rewind_restores_captured_values_and_keeps_masks(masked_state):
    model = _net()
    if masked_state:
        sl.prune(model, 0.3)
    theta0 = lt.capture(model)
    expected = {k: v.clone() for k, v in _weights_and_biases(model).items()}
    _jiggle(model)
    masks = sl.prune(model, 0.7)
    _jiggle(model)
    lt.rewind(model, theta0)
    assert all(torch.equal(masks[n], m) for n, m in sl.get_masks(model).items())
    for name, weight in sl.prunable(model).items():
        keep = masks[name]
        assert torch.equal(weight[keep], expected[name][keep])  # surviving: exactly the captured values
        assert (weight[~keep] == 0).all()                       # pruned: exactly zero
        original = dict(model.named_parameters())[name.replace(".weight", ".parametrizations.weight.original")]
        assert (original[~keep] == 0).all()
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.equal(p, expected[name])


def test_rewind_matches_masked_oracle_and_leaves_model_usable():
    model = _net()
    theta0 = lt.capture(model)
    dense_copy = copy.deepcopy(model)
    _jiggle(model)
    masks = sl.prune(model, 0.8, method="random", seed=3)
    lt.rewind(model, theta0)
    sl.apply_masks(dense_copy, masks)  # oracle: the initial network with the same masks
    x = torch.randn(7, 16)
    assert torch.equal(model(x), dense_copy(x))
    assert abs(sl.sparsity(model) - 0.8) < 1e-3


def test_rewound_state_round_trips_through_state_dict():
    model = _net()
    theta0 = lt.capture(model)
    lt.imp(model, _jiggle, rounds=2, rate=0.5, rewind_state=theta0)
    saved = lt.capture(model)
    clone = _net(seed=7)
    sl.apply_masks(clone, sl.get_masks(model))
    clone.load_state_dict(saved)
    x = torch.randn(5, 16)
    assert torch.equal(clone(x), model(x))
    other = _net(seed=8)
    sl.apply_masks(other, sl.get_masks(model))
    lt.rewind(other, saved)  # a masked state goes through rewind as well
    assert torch.equal(other(x), model(x))
    sl.remove_masks(clone)
    assert set(clone.state_dict()) == set(_net().state_dict())
    assert torch.equal(clone(x), model(x))


@pytest.mark.parametrize("change", ["missing", "unexpected", "shape", "not_a_mapping"])
def test_rewind_rejects_mismatched_state_and_leaves_model_unchanged(change):
    model = _net()
    sl.prune(model, 0.5)
    state = lt.capture(_net(seed=1))
    if change == "missing":
        del state["2.bias"]
    elif change == "unexpected":
        state["9.weight"] = torch.zeros(3)
    elif change == "shape":
        state["0.weight"] = torch.zeros(40, 15)
    else:
        state = [1, 2]
    before = lt.capture(model)
    with pytest.raises((ValueError, TypeError), match="state"):
        lt.rewind(model, state)
    after = lt.capture(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------- IMP
@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_imp_sparsity_after_r_rounds(scope, rate):
    model = _net()
    total = sl.masks.count_params(model)
    records = lt.imp(model, _jiggle, rounds=4, rate=rate, scope=scope)
    for record in records:
        expected = 1 - (1 - rate) ** record["round"]
        assert abs(record["sparsity"] - expected) <= (1.5 if scope == "global" else 3.5) / total
        assert record["moved"] is True
    assert abs(sl.sparsity(model) - (1 - (1 - rate) ** 4)) <= 3.5 / total
    assert [r["trained_sparsity"] for r in records[1:]] == [r["sparsity"] for r in records[:-1]]
    for earlier, later in zip(records, records[1:]):  # masks are nested: pruning never brings a weight back
        for name in earlier["masks"]:
            assert not (later["masks"][name] & ~earlier["masks"][name]).any()


def test_imp_with_per_layer_rates_prunes_output_layer_at_half_rate():
    model = _net()
    rates = lt.per_layer_rates(model, 0.4)
    assert rates == {"0.weight": 0.4, "2.weight": 0.4, "4.weight": 0.2}
    lt.imp(model, _jiggle, rounds=3, rate=0.4, scope=rates)
    for name, weight in sl.prunable(model).items():
        expected = 1 - (1 - rates[name]) ** 3
        assert abs(float((weight == 0).float().mean()) - expected) <= 1 / weight.numel()


def test_imp_rewinds_to_theta0_and_magnitude_mask_is_of_trained_weights():
    model = _net()
    theta0 = lt.capture(model)
    seen = {}

    def train_fn(m):
        _jiggle(m)
        seen["trained"] = {k: v.detach().clone() for k, v in sl.prunable(m).items()}

    records = lt.imp(model, train_fn, rounds=1, rate=0.6, rewind_state=theta0)
    oracle = _net()
    oracle.load_state_dict({**theta0})
    trained = nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))
    sl.set_weights(trained, seen["trained"])
    oracle_masks = sl.prune(trained, 0.6)  # global magnitude on the trained weights
    assert all(torch.equal(records[0]["masks"][n], oracle_masks[n]) for n in oracle_masks)
    for name, weight in sl.prunable(model).items():
        keep = oracle_masks[name]
        assert torch.equal(weight[keep], theta0[name][keep])


def test_imp_without_rewind_keeps_trained_weights():
    model = _net()
    seen = {}

    def train_fn(m):
        _jiggle(m)
        seen["trained"] = {k: v.detach().clone() for k, v in sl.prunable(m).items()}
        return 0.5

    records = lt.imp(model, train_fn, rounds=1, rate=0.5)
    assert records[0]["metrics"] == 0.5
    for name, weight in sl.prunable(model).items():
        keep = records[0]["masks"][name]
        assert torch.equal(weight[keep], seen["trained"][name][keep])


@pytest.mark.parametrize("kwargs, match", [
    ({"rate": 0.0}, "rate"), ({"rate": 1.0}, "rate"), ({"rate": -0.2}, "rate"), ({"rate": float("nan")}, "rate"),
    ({"rounds": 0}, "rounds"), ({"rounds": 2.5}, "rounds"), ({"scope": "everywhere"}, "scope"),
    ({"scope": {"nope.weight": 0.2}}, "unknown layer"), ({"scope": {"0.weight": 1.2}}, "scope"),
    ({"method": "no_such_method"}, "method"), ({"rewind_state": {"0.weight": torch.zeros(40, 16)}}, "missing"),
    ({"rewind_state": "theta0"}, "rewind_state"),
])
def test_imp_rejects_bad_input_before_training(kwargs, match):
    model = _net()
    calls = []
    before = lt.capture(model)
    args = {"rounds": 2, "rate": 0.2} | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        lt.imp(model, lambda m: calls.append(1), **args)
    assert calls == []
    assert not sl.masks.is_masked(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_imp_rejects_shape_mismatch_in_rewind_state():
    model = _net()
    state = lt.capture(model)
    state["2.weight"] = torch.zeros(24, 41)
    with pytest.raises(ValueError, match="shape"):
        lt.imp(model, _jiggle, rounds=1, rewind_state=state)


def test_rate_for_and_round_target_are_inverse():
    rate = lt.rate_for(0.98, 5)
    assert math.isclose(lt.round_target(rate, 5), 0.98)
    assert math.isclose(lt.round_target(0.2, 3), 1 - 0.8 ** 3)


# --------------------------------------------------------------------------------------------- controls
def test_reinitialize_equals_a_fresh_model_under_the_same_mask():
    model = sl.models.mlp(16, (40, 24), 5, seed=0)
    _jiggle(model)
    masks = sl.prune(model, 0.75)
    lt.reinitialize(model, seed=11)
    fresh = sl.models.mlp(16, (40, 24), 5, seed=11)  # oracle: the factory with that seed
    assert all(torch.equal(masks[n], m) for n, m in sl.get_masks(model).items())
    for name, weight in sl.prunable(model).items():
        keep = masks[name]
        assert torch.equal(weight[keep], sl.prunable(fresh)[name][keep])
        assert (weight[~keep] == 0).all()
    assert torch.equal(model.fc1.bias, fresh.fc1.bias)
    model(torch.randn(3, 16))  # the model is still usable (a copy's unmasking must not touch its class)
    with pytest.raises(ValueError, match="seed"):
        lt.reinitialize(model, seed=-1)


def test_mask_budget_gives_random_pruning_with_the_same_per_layer_counts():
    model = _net()
    masks = sl.prune(model, 0.9, scope=lt.per_layer_rates(model, 0.9) | {"4.weight": 0.5})
    budget = lt.mask_budget(masks)
    control = _net(seed=1)
    random_masks = sl.prune(control, 1 - lt.density(masks), method="random", scope=budget, seed=0)
    for name in masks:
        assert int(random_masks[name].sum()) == int(masks[name].sum())
        assert not torch.equal(random_masks[name], masks[name])
    with pytest.raises(TypeError):
        lt.mask_budget({"0.weight": torch.ones(2, 2)})


def test_shuffle_masks_keeps_per_layer_counts_even_for_an_empty_layer():
    masks = sl.get_masks(_net())
    masks["0.weight"][:, :10] = False
    masks["2.weight"][:] = False  # a collapsed layer: sl.prune cannot express a layer sparsity of 1
    shuffled = lt.shuffle_masks(masks, seed=0)
    again = lt.shuffle_masks(masks, seed=0)
    for name in masks:
        assert int(shuffled[name].sum()) == int(masks[name].sum())
        assert torch.equal(shuffled[name], again[name])
    assert not torch.equal(shuffled["0.weight"], masks["0.weight"])
    assert not shuffled["2.weight"].any()
    fraction_in_first_columns = float(shuffled["0.weight"][:, :10].float().mean())
    assert 0.25 < fraction_in_first_columns < 0.5  # uniform: about 240/640 = 0.375, not 0 as in the mask


# ----------------------------------------------------------------------------------- checkpoints, retrain
def test_checkpoints_capture_the_state_after_k_steps():
    task = _task()
    model = sl.models.mlp(16, (12,), 5, seed=0)
    reference = copy.deepcopy(model)
    ckpt = lt.Checkpoints(steps=[0], epochs=[1])
    sl.train.fit(model, task, epochs=3, lr=0.05, batch_size=32, lr_schedule="constant", seed=4, callbacks=[ckpt],
                 progress=False)
    assert ckpt.steps_per_epoch == 3
    assert all(torch.equal(ckpt[0][k], v) for k, v in reference.state_dict().items())
    sl.train.fit(reference, task, epochs=1, lr=0.05, batch_size=32, lr_schedule="constant", seed=4, progress=False)
    assert all(torch.allclose(ckpt.at_epoch(1)[k], v) for k, v in reference.state_dict().items())
    with pytest.raises(KeyError):
        ckpt.at_step(5)
    with pytest.raises(ValueError):
        lt.Checkpoints()


def test_retrain_schedules_replay_the_tail_of_the_original_schedule():
    total = 40  # retraining steps; the original had 40 * 8 / 2 = 160
    replay = lt.retrain_schedule("lr_rewind", train_epochs=8, retrain_epochs=2)
    assert replay is not None
    for step in range(total):
        assert math.isclose(replay(step, total), sl.train.lr_multiplier("cosine", 120 + step, 160))
    full = lt.retrain_schedule("weight_rewind", train_epochs=8, retrain_epochs=8)
    assert math.isclose(full(0, 160), 1.0)
    assert lt.retrain_schedule("finetune", 8, 4, finetune_factor=0.02)(7, 80) == 0.02
    for bad in [dict(strategy="rewind"), dict(retrain_epochs=9), dict(retrain_epochs=0), dict(finetune_factor=0)]:
        with pytest.raises(ValueError):
            lt.retrain_schedule(**({"strategy": "finetune", "train_epochs": 8, "retrain_epochs": 4} | bad))


def test_retrain_strategies_differ_only_as_specified():
    task = _task()
    model = sl.models.mlp(16, (12,), 5, seed=0)
    ckpt = lt.Checkpoints(epochs=[2])
    sl.train.fit(model, task, epochs=4, lr=0.05, batch_size=32, seed=1, callbacks=[ckpt], progress=False)
    sl.prune(model, 0.5)
    pruned = lt.capture(model)
    with pytest.raises(ValueError, match="rewind_state"):
        lt.retrain(model, task, "weight_rewind", train_epochs=4, retrain_epochs=2)
    with pytest.raises(ValueError, match="rewind_state"):
        lt.retrain(model, task, "finetune", train_epochs=4, retrain_epochs=2, rewind_state=ckpt.at_epoch(2))
    with pytest.raises(ValueError, match="batch_size"):
        lt.retrain(model, task, "weight_rewind", train_epochs=4, retrain_epochs=2, rewind_state=ckpt.at_epoch(2),
                   batch_size=0)
    assert all(torch.equal(pruned[k], v) for k, v in model.state_dict().items())
    lrs = {}
    for strategy in lt.RETRAIN_STRATEGIES:
        m = sl.models.mlp(16, (12,), 5, seed=0)
        sl.apply_masks(m, sl.get_masks(model))
        m.load_state_dict(pruned)
        seen = []
        lt.retrain(m, task, strategy, train_epochs=4, retrain_epochs=2, lr=0.05, batch_size=32, seed=1,
                   rewind_state=ckpt.at_epoch(2) if strategy == "weight_rewind" else None,
                   callbacks=[lambda s: seen.append(s.lr)], progress=False)
        lrs[strategy] = seen
        assert abs(sl.sparsity(m) - 0.5) < 0.01
    assert lrs["lr_rewind"] == lrs["weight_rewind"]
    assert math.isclose(lrs["lr_rewind"][0], 0.05 * sl.train.lr_multiplier("cosine", 7, 12))
    assert all(math.isclose(v, 0.05 * 0.01) for v in lrs["finetune"])


# ------------------------------------------------------------------------------------------- supermasks
def test_signed_constant_init_keeps_signs_and_masks():
    model = _net()
    masks = sl.prune(model, 0.5, method="random", seed=0)
    signs = {n: torch.sign(w.detach()) for n, w in sl.prunable(model).items()}
    lt.signed_constant_init(model)
    for name, weight in sl.prunable(model).items():
        sigma = math.sqrt(2 / weight.shape[1])
        assert torch.allclose(weight[masks[name]].abs(), torch.full_like(weight[masks[name]], sigma))
        assert torch.equal(torch.sign(weight), signs[name])
    lt.signed_constant_init(model, scale_fan=True)
    w = sl.prunable(model)["0.weight"]
    d = float(masks["0.weight"].float().mean())
    assert torch.allclose(w[masks["0.weight"]].abs(), torch.full_like(w[masks["0.weight"]], math.sqrt(2 / (16 * d))))


def test_supermask_straight_through_gradient():
    torch.manual_seed(0)
    weight, scores = torch.randn(6, 5), torch.randn(6, 5)
    layer = lt._TopKSupermask(scores.clone(), torch.ones(6, 5, dtype=torch.bool), keep=12)
    effective = layer(weight)
    hard = sl.select.topk_mask(scores.abs(), 12)
    assert torch.equal(effective, weight * hard)  # forward: the 0/1 top-k mask
    upstream = torch.randn(6, 5)
    (effective * upstream).sum().backward()
    assert torch.allclose(layer.scores.grad, upstream * weight * torch.sign(scores))  # backward: straight through


def test_edgepopup_learns_a_mask_without_changing_weights():
    task = _task(n=256)
    model = sl.models.mlp(16, (64,), 5, seed=0)
    sl.prune(model, 0.2, method="random", scope="layerwise", seed=1)  # already masked: these stay masked
    before_masks = sl.get_masks(model)
    values = {n: w.detach().clone() for n, w in sl.prunable(model).items()}
    biases = model.fc1.bias.detach().clone()
    with pytest.raises(ValueError, match="edgepopup"):  # it trains: a procedure (recipe), not a method of sl.prune
        sl.prune(model, 0.6, method="edgepopup", scope="layerwise", data=task)
    masks = lt.edge_popup(model, task, 0.6, epochs=15, lr=0.2, progress=False)
    assert sl.get_masks(model).keys() == before_masks.keys()
    assert all(torch.equal(sl.get_masks(model)[n], before_masks[n]) for n in masks)  # the model is not changed
    sl.apply_masks(model, masks)
    for name, weight in sl.prunable(model).items():
        assert int(masks[name].sum()) == weight.numel() - round(0.6 * weight.numel())
        assert not (masks[name] & ~before_masks[name]).any()
        assert torch.equal(weight[masks[name]], values[name][masks[name]])  # no weight was trained
    assert torch.equal(model.fc1.bias, biases)
    learned = sl.train.evaluate(model, task, split="train")["loss"]
    control = sl.models.mlp(16, (64,), 5, seed=0)
    sl.apply_masks(control, before_masks)
    sl.prune(control, 0.6, method="random", scope="layerwise", seed=2)
    assert learned < sl.train.evaluate(control, task, split="train")["loss"] - 0.1


def test_edge_popup_accepts_batches_and_rejects_bad_sparsity():
    task = _task()
    model = sl.models.mlp(16, (12,), 5, seed=0)
    masks = lt.edge_popup(model, task.calibration(64, 32), {"fc1.weight": 0.5}, epochs=1, progress=False)
    assert int(masks["fc1.weight"].sum()) == 96 and bool(masks["fc2.weight"].all())
    assert not sl.masks.is_masked(model)
    with pytest.raises(ValueError):
        lt.edge_popup(model, task, 1.0)
    with pytest.raises(ValueError, match="unknown layer"):
        lt.edge_popup(model, task, {"fc9.weight": 0.5})
