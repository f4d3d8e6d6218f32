"""Tests of sparsity_lib.data, sparsity_lib.models and sparsity_lib.train."""

import math
import random

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib import data, models, train


@pytest.fixture(scope="module")
def digits():
    return data.digits(seed=0)


# ================================================================================================== data
def test_digits_shapes_dtypes_and_sizes(digits):
    assert digits.x_train.shape == (1347, 64) and digits.x_test.shape == (450, 64)
    assert digits.y_train.shape == (1347,) and digits.y_test.shape == (450,)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.num_classes == 10 and digits.input_shape == (64,) and digits.in_features == 64
    assert set(digits.y_train.tolist()) == set(range(10))


def test_digits_split_is_stratified(digits):
    from sklearn.datasets import load_digits

    counts = np.bincount(load_digits().target, minlength=10)
    test_counts = torch.bincount(digits.y_test, minlength=10).numpy()
    # a stratified split puts 25% of every class in the test set, up to rounding
    assert np.all(np.abs(test_counts - 0.25 * counts) <= 1.0)
    assert np.array_equal(test_counts + torch.bincount(digits.y_train, minlength=10).numpy(), counts)


def test_digits_standardized_with_train_statistics(digits):
    from sklearn.datasets import load_digits

    assert digits.x_train.mean(0).abs().max() < 1e-5
    std = digits.x_train.std(0, unbiased=False)
    varying = std > 0
    # every pixel whose raw std is at least one intensity level has unit std; the others are scaled by 1
    assert torch.all(std[varying] <= 1 + 1e-4) and torch.isclose(std.max(), torch.tensor(1.0), atol=1e-4)
    # independent check: undoing the standardization with the raw train statistics gives back raw rows
    raw = load_digits().data
    mean, raw_std = None, None
    from sklearn.model_selection import train_test_split

    x_train, x_test, _, _ = train_test_split(raw, load_digits().target, test_size=0.25, random_state=0,
                                             stratify=load_digits().target)
    mean, raw_std = x_train.mean(0), np.maximum(x_train.std(0), 1.0)
    np.testing.assert_allclose(digits.x_test.numpy() * raw_std + mean, x_test, atol=1e-4)


def test_digits_determinism_and_seed(digits):
    again = data.digits(seed=0)
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    other = data.digits(seed=1)
    assert not torch.equal(other.y_train, digits.y_train)


def test_mnist1d_is_generated_locally_without_network(monkeypatch):
    import requests
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("mnist1d must be generated, not downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data._mnist1d_arrays.cache_clear()
    np_state, py_state = np.random.get_state(), random.getstate()
    task = data.mnist1d(num_samples=500, seed=3)
    # the generator reseeds numpy's and Python's global RNGs: mnist1d() must restore them
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert task.x_train.shape == (400, 40) and task.x_test.shape == (100, 40)
    assert task.x_train.dtype == torch.float32 and task.y_train.dtype == torch.int64
    assert task.num_classes == 10 and set(task.y_train.tolist()) == set(range(10))
    again = data.mnist1d(num_samples=500, seed=3)  # from the cache, but a copy
    assert torch.equal(again.x_train, task.x_train) and again.x_train.data_ptr() != task.x_train.data_ptr()
    assert not torch.equal(data.mnist1d(num_samples=500, seed=4).x_train, task.x_train)


def test_teacher_student_labels_are_teacher_argmax():
    before = torch.get_rng_state()
    task = data.teacher_student(n_train=500, n_test=200, in_features=10, hidden=16, num_classes=3,
                                teacher_sparsity=0.5, seed=2)
    assert torch.equal(torch.get_rng_state(), before)
    teacher = task.meta["teacher"]
    with torch.no_grad():
        assert torch.equal(teacher(task.x_test).argmax(1), task.y_test)
        assert torch.equal(teacher(task.x_train).argmax(1), task.y_train)
    assert (teacher[0].weight == 0).float().mean().item() == pytest.approx(0.5, abs=1 / 160)
    assert torch.bincount(task.y_train, minlength=3).min() > 0.1 * 500  # centring keeps classes balanced
    again = data.teacher_student(n_train=500, n_test=200, in_features=10, hidden=16, num_classes=3,
                                 teacher_sparsity=0.5, seed=2)
    assert torch.equal(again.x_train, task.x_train) and torch.equal(again.y_train, task.y_train)


def test_batches_cover_the_split_once_and_follow_the_seed(digits):
    batches = digits.batches(100, seed=5)
    assert len(batches) == math.ceil(1347 / 100) == digits.num_batches(100)
    assert [b[0].shape[0] for b in batches] == [100] * 13 + [47]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    # the same rows in a new order: sort both by their contents
    order_a = np.lexsort(x.numpy().T)
    order_b = np.lexsort(digits.x_train.numpy().T)
    assert torch.equal(x[order_a], digits.x_train[order_b]) and torch.equal(y[order_a], digits.y_train[order_b])
    assert torch.equal(digits.batches(100, seed=5)[0][1], batches[0][1])
    assert not torch.equal(digits.batches(100, seed=6)[0][1], batches[0][1])
    generator = torch.Generator().manual_seed(5)
    first, second = digits.batches(100, generator=generator), digits.batches(100, generator=generator)
    assert torch.equal(first[0][1], batches[0][1]) and not torch.equal(second[0][1], first[0][1])
    assert len(digits.batches(100, drop_last=True)) == 13
    unshuffled = digits.batches(1000, shuffle=False, split="test")
    assert torch.equal(unshuffled[0][1], digits.y_test)


def test_calibration_and_reshaped(digits):
    calib = digits.calibration(num_samples=150, batch_size=64, seed=0)
    assert [b[0].shape for b in calib] == [(64, 64), (64, 64), (22, 64)]
    images = digits.reshaped((1, 8, 8))
    assert images.input_shape == (1, 8, 8) and images.in_features == 64
    assert torch.equal(images.x_test.reshape(450, 64), digits.x_test)
    assert digits.input_shape == (64,)  # the original task is unchanged
    with pytest.raises(ValueError, match="shape"):
        digits.reshaped((1, 7, 8))


@pytest.mark.parametrize("call, argument", [
    (lambda: data.digits(test_fraction=1.0), "test_fraction"),
    (lambda: data.digits(test_fraction=0), "test_fraction"),
    (lambda: data.mnist1d(num_samples=500, test_fraction=1.5), "test_fraction"),
    (lambda: data.mnist1d(num_samples=0), "num_samples"),
    (lambda: data.teacher_student(teacher_sparsity=1.0), "teacher_sparsity"),
    (lambda: data.teacher_student(num_classes=1), "num_classes"),
])
def test_data_bad_arguments(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


def test_task_bad_split_and_batch_size(digits):
    with pytest.raises(ValueError, match="split"):
        digits.batches(10, split="validation")
    with pytest.raises(ValueError, match="batch_size"):
        digits.batches(0)


# ================================================================================================ models
def test_mlp_layer_names_shapes_and_activations():
    model = models.lenet_300_100(seed=0)
    shapes = {name: tuple(w.shape) for name, w in sl.prunable(model).items()}
    assert shapes == {"fc1.weight": (300, 64), "fc2.weight": (100, 300), "fc3.weight": (10, 100)}
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        manual = model.fc3(F.relu(model.fc2(F.relu(model.fc1(x)))))
        assert torch.allclose(model(x), manual)
        assert torch.allclose(model(x.reshape(5, 1, 8, 8)), manual)  # inputs are flattened
    outputs = {}
    for act in models.ACTIVATIONS:
        m = models.mlp(64, (32,), 10, activation=act, seed=1)
        with torch.no_grad():
            outputs[act] = m(x)
    tanh_model = models.mlp(64, (32,), 10, activation="tanh", seed=1)
    with torch.no_grad():
        assert torch.allclose(outputs["tanh"], tanh_model.fc2(torch.tanh(tanh_model.fc1(x))))
    assert not torch.allclose(outputs["relu"], outputs["tanh"])
    no_bias = models.mlp(64, (32, 16), 10, bias=False)
    assert [n for n, _ in no_bias.named_parameters()] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    linear = models.mlp(64, (), 10)
    assert list(sl.prunable(linear)) == ["fc1.weight"]


def test_model_seed_is_reproducible_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b = models.mlp(seed=3), models.mlp(seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c = models.mlp(seed=4)
    assert not torch.equal(a.fc1.weight, c.fc1.weight)
    for factory in (models.digits_cnn, models.mnist1d_cnn, models.lenet_300_100):
        m1, m2 = factory(seed=7), factory(seed=7)
        assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert torch.equal(torch.get_rng_state(), before)


def test_cnns_accept_flat_and_shaped_inputs():
    cnn = models.digits_cnn(seed=0)
    assert list(sl.prunable(cnn)) == ["conv1.weight", "conv2.weight", "fc.weight"]
    assert cnn.fc.in_features == 32 * 4 * 4
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert cnn(x).shape == (3, 10) and torch.allclose(cnn(x), cnn(x.reshape(3, 1, 8, 8)))
    cnn1d = models.mnist1d_cnn(seed=0)
    assert list(sl.prunable(cnn1d)) == ["conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"]
    assert cnn1d.fc.in_features == 32 * 5
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert cnn1d(x).shape == (3, 10) and torch.allclose(cnn1d(x), cnn1d(x.reshape(3, 1, 40)))


@pytest.mark.parametrize("call, argument", [
    (lambda: models.mlp(activation="sigmoid"), "activation"),
    (lambda: models.mlp(hidden=(32, 0)), "hidden"),
    (lambda: models.mlp(in_features=0), "in_features"),
    (lambda: models.mlp(seed=-1), "seed"),
    (lambda: models.digits_cnn(channels=(16,)), "channels"),
])
def test_models_bad_arguments(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


# ================================================================================================= train
def test_fit_mlp_on_digits_reaches_90_percent(digits):
    model = models.mlp(64, (128,), 10, seed=0)
    before = torch.get_rng_state()
    history = train.fit(model, digits, epochs=4, lr=0.05, progress=False, seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # the batch order has its own generator
    assert len(history) == 4 and [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert history[-1]["step"] == 4 * 22
    assert history[-1]["test_acc"] > 0.90
    assert history[-1]["test_acc"] == pytest.approx(train.accuracy(model, digits))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(h["sparsity"] == 0.0 for h in history)
    assert model.training


def test_fit_is_deterministic_given_seed(digits):
    runs = []
    for seed in (0, 0, 1):
        model = models.mlp(64, (16,), 10, seed=0)
        train.fit(model, digits, epochs=1, lr=0.05, seed=seed, progress=False)
        runs.append(model.fc1.weight.detach().clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("optimizer, options", [
    ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=5e-3)),
    ("adam", dict(lr=3e-3, weight_decay=1e-3)),
    ("adamw", dict(lr=3e-3, weight_decay=1e-2)),
])
def test_masked_weights_stay_exactly_zero(digits, optimizer, options):
    model = models.mlp(64, (64,), 10, seed=0)
    masks = sl.prune(model, 0.8, method="magnitude", scope="global")
    history = train.fit(model, digits, epochs=2, optimizer=optimizer, progress=False, **options)
    assert all(h["sparsity"] == pytest.approx(0.8, abs=1e-3) for h in history)
    for name, weight in sl.prunable(model).items():
        layer = getattr(model, name.split(".")[0])
        original = layer.parametrizations.weight.original
        assert (weight[~masks[name]] == 0).all() and (original[~masks[name]] == 0).all()
        assert (weight[masks[name]] != 0).float().mean() > 0.99  # the survivors did train
    # the gradient of the stored weight is zero exactly where the mask is
    model.zero_grad()
    x, y = digits.batches(64)[0]
    F.cross_entropy(model(x), y).backward()
    grad = model.fc1.parametrizations.weight.original.grad
    assert (grad[~masks["fc1.weight"]] == 0).all() and (grad[masks["fc1.weight"]] != 0).any()


def test_callbacks_are_called_at_every_step_and_epoch(digits):
    calls = {"fn": 0, "begin": 0, "after_backward": 0, "step_end": 0, "epoch_end": 0, "end": 0}
    steps_seen = []

    def fn(state):
        calls["fn"] += 1
        steps_seen.append(state.step)

    class Recorder:
        def on_train_begin(self, state):
            calls["begin"] += 1
            assert state.step == 0

        def on_after_backward(self, state):
            calls["after_backward"] += 1
            assert state.model.fc1.weight.grad is not None

        def on_step_end(self, state):
            calls["step_end"] += 1

        def on_epoch_end(self, state):
            calls["epoch_end"] += 1
            assert state.history[-1]["epoch"] == state.epoch + 1

        def on_train_end(self, state):
            calls["end"] += 1

    model = models.mlp(64, (16,), 10, seed=0)
    train.fit(model, digits, epochs=3, batch_size=128, callbacks=[fn, Recorder()], progress=False)
    total = 3 * math.ceil(1347 / 128)
    assert calls == {"fn": total, "begin": 1, "after_backward": total, "step_end": total, "epoch_end": 3,
                     "end": 1}
    assert steps_seen == list(range(1, total + 1))


def test_callback_can_stop_training(digits):
    def stop_at_five(state):
        if state.step == 5:
            state.stop = True

    history = train.fit(models.mlp(64, (16,), 10), digits, epochs=3, callbacks=stop_at_five, progress=False)
    assert len(history) == 1 and history[0]["step"] == 5 and not math.isnan(history[0]["test_acc"])


def test_cosine_schedule_matches_closed_form_and_ends_at_zero(digits):
    used = []

    def record_lr(state):  # the learning rate the optimizer step is about to use
        used.append(state.optimizer.param_groups[0]["lr"])

    class LrRecorder:
        on_after_backward = staticmethod(record_lr)

    history = train.fit(models.mlp(64, (16,), 10), digits, epochs=2, lr=0.2, lr_schedule="cosine",
                        callbacks=LrRecorder(), progress=False)
    total = len(used)
    expected = [0.2 * 0.5 * (1 + math.cos(math.pi * t / total)) for t in range(total)]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[-1] < 0.2 * 1e-2 and history[-1]["lr"] == pytest.approx(0.0, abs=1e-15)

    seen = []

    def schedule(step, total_steps):
        seen.append((step, total_steps))
        return 0.5

    used.clear()
    train.fit(models.mlp(64, (16,), 10), digits, epochs=1, lr=0.2, lr_schedule=schedule,
              callbacks=LrRecorder(), progress=False)
    assert seen[0] == (0, 22) and seen[-1] == (22, 22) and used == pytest.approx([0.1] * 22)


def test_eval_every_and_evaluate(digits):
    model = models.mlp(64, (16,), 10, seed=0)
    history = train.fit(model, digits, epochs=5, eval_every=2, lr=0.05, progress=False)
    evaluated = [not math.isnan(h["test_acc"]) for h in history]
    assert evaluated == [False, True, False, True, True]
    # evaluate against a direct computation
    with torch.no_grad():
        logits = model(digits.x_test)
    result = train.evaluate(model, digits, batch_size=100)
    assert result["accuracy"] == pytest.approx((logits.argmax(1) == digits.y_test).float().mean().item())
    assert result["loss"] == pytest.approx(F.cross_entropy(logits, digits.y_test).item(), rel=1e-5)
    assert train.accuracy(model, (digits.x_test, digits.y_test)) == result["accuracy"]
    assert train.accuracy(model, digits.batches(50, split="test")) == pytest.approx(result["accuracy"])
    # eval mode inside, the caller's mode restored
    seen = []
    net = torch.nn.Sequential(torch.nn.Dropout(0.5), models.mlp(64, (16,), 10))
    net.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    train.evaluate(net, digits)
    assert seen and not any(seen) and net.training
    net.eval()
    train.evaluate(net, digits)
    assert not net.training


def test_progress_bar_only_when_asked(digits, capsys):
    train.fit(models.mlp(64, (8,), 10), digits, epochs=1, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    train.fit(models.mlp(64, (8,), 10), digits, epochs=1, progress=True)
    assert "epochs" in capsys.readouterr().err


@pytest.mark.parametrize("options, argument", [
    (dict(epochs=0), "epochs"),
    (dict(batch_size=0), "batch_size"),
    (dict(lr=-0.1), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(optimizer="lbfgs"), "optimizer"),
    (dict(lr_schedule="exponential"), "lr_schedule"),
    (dict(eval_every=0), "eval_every"),
    (dict(seed=-1), "seed"),
])
def test_fit_bad_arguments_leave_model_unchanged(digits, options, argument):
    model = models.mlp(64, (8,), 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=argument):
        train.fit(model, digits, progress=False, **options)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fit_wrong_types(digits):
    with pytest.raises(TypeError, match="task"):
        train.fit(models.mlp(), (digits.x_train, digits.y_train), progress=False)
    with pytest.raises(TypeError, match="callbacks"):
        train.fit(models.mlp(), digits, callbacks=[42], progress=False)
