"""Schedules as training callbacks (GradualPruner, OneShot, IterativePruner, IHT, DSD) and mask comparison.

Oracles: the closed form of the Zhu & Gupta schedule, torch.ao.pruning's CubicSL driving a WeightNormSparsifier
(levels and masks, step by step), set arithmetic for IoU / Hamming agreement, and the random-mask IoU formula.
"""

import copy

import pytest
import torch
from torch import nn

import sparsity_lib as sl
from sparsity_lib import schedules as S
from sparsity_lib.compare import MaskRecorder, agreement, iou, random_iou, would_prune


def total_params(model):
    return sum(w.numel() for w in sl.prunable(model).values())


def perturb(model, generator, scale=0.05):
    """A stand-in for an optimizer step: add the same noise to every stored weight (masks are kept)."""
    with torch.no_grad():
        sl.set_weights(model, {n: w.detach() + scale * torch.randn(w.shape, generator=generator)
                               for n, w in sl.prunable(model).items()})


# ------------------------------------------------------------------------------------------ GradualPruner
def test_gradual_pruner_hits_polynomial_at_the_pruning_steps(mlp):
    begin, end, frequency, final, initial = 4, 30, 5, 0.9, 0.2
    pruner = S.GradualPruner(mlp, final, begin=begin, end=end, frequency=frequency, initial=initial)
    n = total_params(mlp)
    steps = S.pruning_steps(begin, end, frequency)
    assert steps == [4, 9, 14, 19, 24, 29, 30]
    g = torch.Generator().manual_seed(0)
    held = 0.0
    for t in range(1, 45):
        perturb(mlp, g)
        level = pruner.step()
        if t in steps:
            held = S.polynomial(t, initial, final, begin, end)
        expected = held if t < end else final
        assert level == pytest.approx(expected, abs=1e-12)
        # the model's sparsity is the target rounded to whole weights (global scope)
        assert sl.sparsity(mlp) == pytest.approx(round(expected * n) / n, abs=1e-12), t
    assert [t for t, _ in pruner.events] == steps
    assert sl.sparsity(mlp) == pytest.approx(round(final * n) / n)


def test_gradual_level_function_matches_the_closed_form():
    # linear schedule, frequency 1: s(t) = s_f * (t - t0) / (t1 - t0)
    for t in range(0, 30):
        expected = 0.0 if t < 5 else min(0.8 * (t - 5) / 20, 0.8)
        assert S.gradual(t, 0.8, 5, 25, 1, power=1) == pytest.approx(expected)
    # with initial > 0 the level jumps to `initial` at `begin`
    assert S.gradual(4, 0.8, 5, 25, 1, initial=0.3) == 0.0
    assert S.gradual(5, 0.8, 5, 25, 1, initial=0.3) == pytest.approx(0.3)
    # held between pruning steps
    assert S.gradual(12, 0.8, 5, 25, 5) == pytest.approx(S.polynomial(10, 0.0, 0.8, 5, 25))


def test_a_pruned_weight_never_returns_during_real_training(mlp):
    torch.manual_seed(1)
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    opt = torch.optim.SGD(mlp.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    pruner = S.GradualPruner(mlp, 0.95, begin=2, end=40, frequency=3, initial=0.1)
    previous = sl.get_masks(mlp)
    for t in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(mlp(x), y).backward()
        opt.step()
        pruner.step()
        masks = sl.get_masks(mlp)
        for name, w in sl.prunable(mlp).items():
            assert not (masks[name] & ~previous[name]).any(), f"a pruned weight of {name} came back at step {t}"
            assert (w[~masks[name]] == 0).all()
        previous = masks
    assert sl.sparsity(mlp) == pytest.approx(0.95, abs=1 / total_params(mlp))


def _torch_ao_run(model, final, t0, dt, n, steps, g):
    """Drive WeightNormSparsifier with CubicSL; return the per-layer sparsity levels and masks after each step."""
    from torch.ao.pruning import WeightNormSparsifier
    from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL

    names = list(sl.prunable(model))
    sparsifier = WeightNormSparsifier(sparsity_level=final, sparse_block_shape=(1, 1), zeros_per_block=1)
    sparsifier.prepare(model, config=[{"tensor_fqn": name} for name in names])
    scheduler = CubicSL(sparsifier, init_sl=0.0, init_t=t0, delta_t=dt, total_t=n)
    levels, masks = [], []
    modules = dict(model.named_modules())
    for _ in range(steps):
        level = sparsifier.groups[0]["sparsity_level"]  # the level this step applies (t = 0, 1, ...)
        sparsifier.step()
        scheduler.step()
        levels.append(level)
        masks.append({name: modules[name.rsplit(".", 1)[0]].parametrizations.weight[0].mask.clone().bool()
                      for name in names})
        # the same "training" as the other run: noise on the stored weights (masked ones stay masked)
        with torch.no_grad():
            for name in names:
                module = modules[name.rsplit(".", 1)[0]]
                original = module.parametrizations.weight.original
                original.add_(0.05 * torch.randn(original.shape, generator=g))
    return levels, masks


@pytest.mark.parametrize("frequency", [1, 3])
def test_gradual_pruner_matches_torch_ao_cubic_sl_step_by_step(mlp, frequency):
    """Same settings (t0=2, dt=frequency, n=6, layer-wise magnitude): the same level at every pruning step;
    with frequency 1 the same masks at every step; between pruning steps ours holds the last level (CubicSL
    recomputes it at every step, Zhu & Gupta prune only every dt steps)."""
    t0, n, final, steps = 2, 6, 0.9, 30
    end = t0 + n * frequency
    ours = copy.deepcopy(mlp)
    theirs = copy.deepcopy(mlp)
    levels, their_masks = _torch_ao_run(theirs, final, t0, frequency, n, steps, torch.Generator().manual_seed(0))

    pruner = S.GradualPruner(ours, final, begin=t0, end=end, frequency=frequency, scope="layerwise")
    g = torch.Generator().manual_seed(0)
    pruning = set(S.pruning_steps(t0, end, frequency))
    for t in range(steps):
        # torch.ao applies level(t) at its t-th step; our schedule applies level(t) after t optimizer steps
        if t > 0:
            pruner.step()
        level = pruner.level(t)
        if t in pruning or t >= end or t < t0:
            assert level == pytest.approx(levels[t], abs=1e-9), t
        ours_masks = sl.get_masks(ours)
        for name, w in sl.prunable(ours).items():
            assert float((~ours_masks[name]).double().mean()) == pytest.approx(round(level * w.numel()) / w.numel())
            if frequency == 1:  # CubicSL re-prunes at every step: the same masks only when we do too
                assert torch.equal(ours_masks[name], their_masks[t][name]), (t, name)
        if t not in pruning and t0 < t < end:
            assert level == pruner.level(t - 1)  # held between pruning steps
        # the same noise as the torch.ao run
        with torch.no_grad():
            for name in sl.prunable(ours):
                module = dict(ours.named_modules())[name.rsplit(".", 1)[0]]
                original = module.parametrizations.weight.original if sl.masks.is_masked(ours) else module.weight
                original.add_(0.05 * torch.randn(original.shape, generator=g))
                if sl.masks.is_masked(ours):
                    original.mul_(ours_masks[name])


@pytest.mark.parametrize("method, options", [("random", {"seed": 3}), ("snip", None), ("taylor", None)])
def test_any_registered_method_works_with_the_gradual_pruner(mlp, method, options):
    torch.manual_seed(0)
    data = [(torch.randn(32, 16), torch.randint(0, 5, (32,)))]
    if options is None:
        options = {"data": data}
    pruner = S.GradualPruner(mlp, 0.8, begin=0, end=6, frequency=2, method=method, **options)
    for _ in range(8):
        pruner.step()
    assert sl.sparsity(mlp) == pytest.approx(0.8, abs=1 / total_params(mlp))
    assert len(pruner.events) == 3  # steps 2, 4, 6 (step 0 has level 0)


def test_budget_scope_is_scaled_along_the_schedule(mlp):
    budget = sl.budgets.erk(mlp, 0.9)
    pruner = S.GradualPruner(mlp, 0.9, begin=0, end=10, frequency=5, power=1, scope=budget)
    for _ in range(5):
        pruner.step()
    for name, w in sl.prunable(mlp).items():  # half way on a linear schedule: half of every layer's budget
        assert float((w == 0).double().mean()) == pytest.approx(budget[name] / 2, abs=1 / w.numel())
    for _ in range(5):
        pruner.step()
    for name, w in sl.prunable(mlp).items():
        assert float((w == 0).double().mean()) == pytest.approx(budget[name], abs=1 / w.numel())


def test_state_dict_resumes_exactly(mlp):
    torch.manual_seed(0)
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))

    def train(model, opt, pruner, steps):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            pruner.step()

    settings = dict(final_sparsity=0.9, begin=3, end=25, frequency=4)
    straight = copy.deepcopy(mlp)
    opt = torch.optim.SGD(straight.parameters(), lr=0.1, momentum=0.9)
    train(straight, opt, S.GradualPruner(straight, **settings), 30)

    first = copy.deepcopy(mlp)
    opt = torch.optim.SGD(first.parameters(), lr=0.1, momentum=0.9)
    pruner = S.GradualPruner(first, **settings)
    train(first, opt, pruner, 12)
    saved = {"model": copy.deepcopy(first.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "pruner": copy.deepcopy(pruner.state_dict())}

    resumed = copy.deepcopy(mlp)  # a fresh dense model, optimizer and pruner, built as at the start
    opt = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    pruner = S.GradualPruner(resumed, **settings)
    pruner.load_state_dict(saved["pruner"])  # re-attaches the masks: the model state_dict keys now match
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    assert pruner.last_step == 12
    train(resumed, opt, pruner, 18)
    for name, w in sl.prunable(straight).items():
        assert torch.equal(sl.get_masks(straight)[name], sl.get_masks(resumed)[name])
        assert torch.allclose(w, sl.prunable(resumed)[name], atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        pruner.load_state_dict({"last_step": 3})


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(begin=10, end=10), ValueError, "end .* greater than begin"),
    (dict(begin=10, end=5), ValueError, "end .* greater than begin"),
    (dict(frequency=0), ValueError, "frequency must be an integer >= 1"),
    (dict(frequency=2.5), ValueError, "frequency"),
    (dict(final_sparsity=1.0), ValueError, r"final_sparsity must be in \[0, 1\)"),
    (dict(final_sparsity=-0.1), ValueError, r"final_sparsity must be in \[0, 1\)"),
    (dict(initial=0.95), ValueError, "initial .* at most final_sparsity"),
    (dict(power=0), ValueError, "power must be a positive"),
    (dict(begin=-1), ValueError, "begin must be an integer >= 0"),
    (dict(method="nope"), ValueError, "method must be one of"),
    (dict(scope="everywhere"), ValueError, "scope must be"),
])
def test_gradual_pruner_bad_input_raises_and_leaves_the_model_unchanged(mlp, kwargs, error, text):
    args = dict(final_sparsity=0.9, begin=0, end=10, frequency=1, initial=0.5)
    args.update(kwargs)
    before = copy.deepcopy(mlp.state_dict())
    with pytest.raises(error, match=text):
        S.GradualPruner(mlp, **args)
    assert not sl.masks.is_masked(mlp)
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, before[key])


# ------------------------------------------------------------------------------------------ other schedules
def test_one_shot_prunes_once_at_its_step(mlp):
    n = total_params(mlp)
    pruner = S.OneShot(mlp, 0.8, at=5)
    for t in range(1, 10):
        pruner.step()
        assert sl.sparsity(mlp) == pytest.approx(0.0 if t < 5 else round(0.8 * n) / n)
    assert pruner.events == [(5, 0.8)]
    at_init = copy.deepcopy(mlp)
    sl.remove_masks(at_init)
    with torch.no_grad():
        for w in sl.prunable(at_init).values():
            w.normal_()
    S.OneShot(at_init, 0.5, at=0)  # at=0 prunes when it is built, like an LR scheduler's first step
    assert sl.sparsity(at_init) == pytest.approx(round(0.5 * n) / n)


def test_iterative_pruner_removes_a_fixed_fraction_of_the_survivors_per_round(mlp):
    n = total_params(mlp)
    pruner = S.IterativePruner(mlp, 0.936, rounds=3, begin=2, interval=4)
    assert pruner.rate == pytest.approx(0.6)  # 1 - 0.064 ** (1/3)
    assert pruner.steps == [2, 6, 10]
    survivors = [n]
    for t in range(1, 16):
        pruner.step()
        if t in pruner.steps:
            survivors.append(n - int(round(sl.sparsity(mlp) * n)))
    for before, after in zip(survivors[:-1], survivors[1:]):
        assert after / before == pytest.approx(0.4, abs=2 / before)
    assert sl.sparsity(mlp) == pytest.approx(round(0.936 * n) / n)
    assert [round(pruner.level(t), 6) for t in (1, 2, 5, 6, 10, 99)] == [0.0, 0.6, 0.6, 0.84, 0.936, 0.936]


def test_iht_alternates_sparse_and_dense_phases_with_fresh_top_k(mlp):
    n = total_params(mlp)
    pruner = S.IHT(mlp, 0.7, begin=2, sparse_steps=3, dense_steps=2, cycles=2)
    g = torch.Generator().manual_seed(0)
    phases = []
    for t in range(1, 14):
        perturb(mlp, g, scale=0.3)
        pruner.step()
        masked = sl.masks.is_masked(mlp)
        phases.append(masked)
        assert masked == (pruner.level(t) > 0), t
        if masked:
            assert sl.sparsity(mlp) == pytest.approx(round(0.7 * n) / n)
        if t == 7:  # the second sparse phase starts from the dense weights: a new top-k of |w|
            weights = {k: v.detach() for k, v in sl.prunable(mlp).items()}
            masks = sl.get_masks(mlp)
            kept = torch.cat([weights[k][masks[k]].abs() for k in weights])
            dropped = torch.cat([weights[k][~masks[k]].abs() for k in weights])
            assert dropped.max() <= kept.min()
    assert phases == [False, True, True, True, False, False, True, True, True, False, False, False, False]
    assert [e[1] for e in pruner.events] == [0.7, "dense", 0.7, "dense"]


def test_iht_end_sparse_and_dsd(mlp):
    other = copy.deepcopy(mlp)
    pruner = S.IHT(mlp, 0.5, begin=0, sparse_steps=2, dense_steps=2, cycles=2, end_sparse=True)
    for _ in range(10):
        pruner.step()
    assert sl.masks.is_masked(mlp) and pruner.level(10) == 0.5
    dsd = S.DSD(other, 0.6, sparse_at=3, dense_at=7)
    levels = []
    for t in range(1, 12):
        dsd.step()
        levels.append(sl.masks.is_masked(other))
        assert dsd.level(t) == (0.6 if 3 <= t < 7 else 0.0)
    assert levels == [False, False, True, True, True, True, False, False, False, False, False]
    with pytest.raises(ValueError, match="dense_at"):
        S.DSD(copy.deepcopy(other), 0.6, sparse_at=5, dense_at=5)


@pytest.mark.parametrize("factory, text", [
    (lambda m: S.OneShot(m, 1.2, at=0), r"sparsity must be in \[0, 1\)"),
    (lambda m: S.OneShot(m, 0.5, at=-2), "at must be an integer"),
    (lambda m: S.IterativePruner(m, 0.9, rounds=0, begin=0, interval=5), "rounds must be an integer >= 1"),
    (lambda m: S.IterativePruner(m, 0.9, rounds=3, begin=0, interval=0), "interval must be an integer >= 1"),
    (lambda m: S.IHT(m, 0.9, begin=0, sparse_steps=0, dense_steps=3), "sparse_steps must be an integer >= 1"),
])
def test_other_schedules_bad_input(mlp, factory, text):
    with pytest.raises(ValueError, match=text):
        factory(mlp)
    assert not sl.masks.is_masked(mlp)


def test_schedules_as_callbacks_of_fit():
    task = sl.data.teacher_student(n_train=256, n_test=128, in_features=10, hidden=8, seed=0)
    model = sl.models.mlp(task.in_features, (32,), task.num_classes, seed=0)
    steps_per_epoch = task.num_batches(32)
    pruner = S.GradualPruner(model, 0.75, begin=steps_per_epoch, end=3 * steps_per_epoch, frequency=2)
    recorder = MaskRecorder(model)
    history = sl.train.fit(model, task, epochs=4, batch_size=32, callbacks=[pruner, recorder], progress=False)
    assert pruner.last_step == 4 * steps_per_epoch
    n = total_params(model)
    assert [h["sparsity"] for h in history] == pytest.approx(
        [round(pruner.level(e * steps_per_epoch) * n) / n for e in range(1, 5)], abs=1e-12)
    assert recorder.epochs == [0, 1, 2, 3, 4]
    # the recorded masks shrink epoch after epoch (nothing regrows)
    for a, b in zip(recorder.records[:-1], recorder.records[1:]):
        assert all(not (b["masks"][k] & ~a["masks"][k]).any() for k in a["masks"])


# ---------------------------------------------------------------------------------------- mask comparison
def test_iou_and_agreement_closed_forms():
    a = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 1, 0, 1, 0], dtype=torch.bool)
    assert iou(a, b) == pytest.approx(2 / 4)
    assert agreement(a, b) == pytest.approx(4 / 6)
    assert iou(a, a) == 1.0 and agreement(a, ~a) == 0.0
    none = torch.zeros(6, dtype=torch.bool)
    assert iou(none, none) == 1.0  # both keep nothing: the same (empty) set
    assert iou(a, none) == 0.0


def test_iou_of_dicts_pools_layers_like_sets():
    g = torch.Generator().manual_seed(0)
    a = {"x": torch.rand(7, 5, generator=g) > 0.6, "y": torch.rand(3, 4, generator=g) > 0.3}
    b = {"x": torch.rand(7, 5, generator=g) > 0.5, "y": torch.rand(3, 4, generator=g) > 0.8}
    set_a = {(k, i) for k in a for i in torch.nonzero(a[k].reshape(-1)).reshape(-1).tolist()}
    set_b = {(k, i) for k in b for i in torch.nonzero(b[k].reshape(-1)).reshape(-1).tolist()}
    assert iou(a, b) == pytest.approx(len(set_a & set_b) / len(set_a | set_b))
    n = sum(m.numel() for m in a.values())
    assert agreement(a, b) == pytest.approx(1 - len(set_a ^ set_b) / n)
    per = iou(a, b, per_layer=True)
    assert set(per) == {"x", "y"} and per["x"] == pytest.approx(iou(a["x"], b["x"]))
    assert agreement(a, b, per_layer=True)["y"] == pytest.approx(agreement(a["y"], b["y"]))


def test_random_masks_have_the_chance_iou():
    g = torch.Generator().manual_seed(0)
    for density in (0.02, 0.1, 0.5):
        a = torch.rand(400_000, generator=g) < density
        b = torch.rand(400_000, generator=g) < density
        assert iou(a, b) == pytest.approx(random_iou(density), rel=0.05)
        assert agreement(a, b) == pytest.approx(1 - 2 * density * (1 - density), abs=0.005)
    assert random_iou(0.1, 0.2) == pytest.approx(0.02 / 0.28)


def test_mask_comparison_bad_input():
    a = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="shape"):
        iou(a, torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        agreement(a, torch.ones(3))
    with pytest.raises(ValueError, match="same layers"):
        iou({"x": a}, {"y": a})
    with pytest.raises(TypeError, match="both"):
        iou(a, {"x": a})
    with pytest.raises(ValueError, match="density_a"):
        random_iou(0.0)


def test_would_prune_leaves_the_model_alone_and_equals_prune(mlp):
    before = copy.deepcopy(mlp.state_dict())
    masks = would_prune(mlp, 0.9)
    assert not sl.masks.is_masked(mlp)
    for key, value in mlp.state_dict().items():
        assert torch.equal(value, before[key])
    reference = sl.prune(copy.deepcopy(mlp), 0.9)
    assert all(torch.equal(masks[k], reference[k]) for k in reference)
    with pytest.raises(ValueError, match="sparsity"):
        MaskRecorder(mlp, sparsity=1.5)


def test_mask_recorder_tracks_the_top_k_of_a_dense_model(mlp):
    recorder = MaskRecorder(mlp, sparsity=0.8)
    recorder.record(0)
    g = torch.Generator().manual_seed(0)
    for epoch in range(1, 4):
        perturb(mlp, g, scale=0.02 * epoch)
        recorder.record(epoch)
    assert not sl.masks.is_masked(mlp)
    final = would_prune(mlp, 0.8)
    curve = recorder.iou_with_final()
    assert curve[-1] == 1.0 and len(curve) == 4
    assert curve[0] == pytest.approx(iou(recorder.records[0]["masks"], final))
    assert len(recorder.consecutive_iou()) == 3
    assert recorder.agreement_with_final()[-1] == 1.0
    with pytest.raises(ValueError, match="no masks recorded"):
        MaskRecorder(mlp).iou_with_final()
