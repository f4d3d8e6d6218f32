"""Dynamic sparse training (sparsity_lib.growth): counts, zero-initialized growth, optimizer-state reset, RigL's
grown set against an independent dense gradient, schedules, state round-trips and refusals."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib import growth, growth_runs
from sparsity_lib.select import drop_and_grow


def make(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 5))


def batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=g), torch.randint(0, 5, (n,), generator=g)


def train_steps(model, opt, dst, steps, start=0, check=None):
    """The textbook loop with dst.step() between backward and the optimizer step; check(t, record) after it."""
    for t in range(start, start + steps):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        record = dst.step()
        if check is not None:
            check(t, record)
        opt.step()


def counts(model):
    return {n: int(m.sum()) for n, m in sl.get_masks(model).items()}


# ---------------------------------------------------------------------------------------- pure functions
def test_cosine_fraction_closed_form():
    for step in (0, 1, 7, 25, 49, 50, 51, 80):
        expected = 0.3 / 2 * (1 + math.cos(math.pi * step / 50)) if step < 50 else 0.0
        assert growth.cosine_fraction(step, 0.3, 50) == pytest.approx(expected, abs=1e-15)
    assert growth.cosine_fraction(0, 0.5, 10) == 0.5
    assert growth.cosine_fraction(5, 0.5, 10) == pytest.approx(0.25)
    assert growth.cosine_fraction(3, 1.0, 0) == 0.0
    for bad in (dict(alpha=0.0), dict(alpha=1.5), dict(end=-1), dict(step=-1)):
        args = dict(step=1, alpha=0.3, end=10) | bad
        with pytest.raises(ValueError, match=list(bad)[0]):
            growth.cosine_fraction(**args)


def test_apportion_is_exact_proportional_and_capped():
    out = growth.apportion(10, {"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 100, "b": 100, "c": 100})
    assert sum(out.values()) == 10 and out["c"] == 5 and {out["a"], out["b"]} == {2, 3}
    out = growth.apportion(10, {"a": 1.0, "b": 9.0}, {"a": 100, "b": 4})   # b is full: the rest goes to a
    assert out == {"a": 6, "b": 4}
    out = growth.apportion(7, {"a": 0.0, "b": 0.0}, {"a": 3, "b": 5})        # no claims: share by room
    assert sum(out.values()) == 7 and out["a"] <= 3 and out["b"] <= 5
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        w = {k: float(v) for k, v in zip("abcd", torch.rand(4, generator=g))}
        cap = {k: int(v) for k, v in zip("abcd", torch.randint(0, 30, (4,), generator=g))}
        total = int(torch.randint(0, sum(cap.values()) + 1, (1,), generator=g))
        out = growth.apportion(total, w, cap)
        assert sum(out.values()) == total and all(0 <= out[k] <= cap[k] for k in w)
    with pytest.raises(ValueError, match="room"):
        growth.apportion(10, {"a": 1.0}, {"a": 3})


def test_drop_then_grow_generalizes_drop_and_grow():
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(20, 30, generator=g) < 0.3
    d, gr = torch.randn(20, 30, generator=g), torch.randn(20, 30, generator=g)
    a = int(mask.sum())
    assert torch.equal(growth.drop_then_grow(mask, d, gr, 17, 17), drop_and_grow(mask, d, gr, 17))
    for n_drop, n_grow in ((10, 25), (25, 10), (0, 5), (5, 0)):
        new = growth.drop_then_grow(mask, d, gr, n_drop, n_grow)
        assert int(new.sum()) == a - n_drop + n_grow
        # independent oracle: keep the best a - n_drop active by d, then the best n_grow of the rest by g
        flat_m, flat_d, flat_g = mask.reshape(-1), d.reshape(-1), gr.reshape(-1)
        kept = torch.zeros_like(flat_m)
        kept[torch.topk(torch.where(flat_m, flat_d, torch.tensor(-math.inf)), a - n_drop).indices] = True
        grown = torch.zeros_like(flat_m)
        if n_grow:
            grown[torch.topk(torch.where(kept, torch.tensor(-math.inf), flat_g), n_grow).indices] = True
        assert torch.equal(new.reshape(-1), kept | grown)


# ------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("cls", [growth.SET, growth.RigL, growth.DeepR, growth.TopKAST])
@pytest.mark.parametrize("distribution", ["uniform", "erk"])
def test_per_layer_counts_constant_across_every_update(cls, distribution):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dst = cls(model, opt, 0.8, distribution=distribution, update_every=2, end=40, alpha=0.4)
    budget = getattr(sl.budgets, distribution)(model, 0.8)
    start = counts(model)
    for n, w in sl.prunable(model).items():
        assert start[n] == w.numel() - round(budget[n] * w.numel())
    updates = []

    def check(t, record):
        assert counts(model) == start
        if record is not None:
            updates.append(record)
            assert record["active"] == start
    train_steps(model, opt, dst, 40, check=check)
    assert len(updates) == 19 if cls is not growth.DeepR else len(updates) >= 1
    if cls is not growth.DeepR:
        assert sum(r["grown"] for r in updates) > 0


@pytest.mark.parametrize("cls", [growth.SNFS, growth.DSR])
def test_redistribution_keeps_the_total_exact_and_moves_weights_between_layers(cls):
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    dst = cls(model, opt, 0.8, update_every=2, end=60, alpha=0.5)
    start = counts(model)
    total = sum(start.values())
    seen = []
    train_steps(model, opt, dst, 60, check=lambda t, r: seen.append(counts(model)))
    assert all(sum(c.values()) == total for c in seen)
    assert any(c != start for c in seen), "redistribution never moved a weight between layers"
    assert all(0 < v for c in seen for v in c.values())


@pytest.mark.parametrize("cls", [growth.SET, growth.RigL, growth.SNFS, growth.DSR])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_grown_weights_start_at_zero_and_their_optimizer_state_is_reset(cls, optimizer):
    model = make()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    dst = cls(model, opt, 0.8, update_every=3, end=30, alpha=0.5)
    params = sl.trainable(model)
    checked = 0
    for t in range(30):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = sl.get_masks(model)
        record = dst.step()
        if record is not None:
            after = sl.get_masks(model)
            grown = {n: after[n] & ~before[n] for n in after}
            dropped = {n: before[n] & ~after[n] for n in after}
            for n, p in params.items():
                changed = grown[n] | dropped[n]
                assert (p.detach()[grown[n]] == 0).all() and (p.detach()[dropped[n]] == 0).all()
                assert (p.grad[changed] == 0).all()
                for key in ("momentum_buffer", "exp_avg", "exp_avg_sq"):
                    if key in opt.state.get(p, {}):
                        assert (opt.state[p][key][changed] == 0).all()
                checked += int(grown[n].sum())
            opt.step()
            for n, p in params.items():            # still exactly zero after the optimizer step
                assert (p.detach()[grown[n]] == 0).all()
        else:
            opt.step()
        for n, w in sl.prunable(model).items():     # pruned weights zero, stored and effective
            m = sl.get_masks(model)[n]
            assert (w.detach()[~m] == 0).all() and (params[n].detach()[~m] == 0).all()
    assert checked > 0


def dense_gradient_oracle(model, x, y):
    """dL/d(W*M) by functional_call on an unmasked copy with the effective weights as leaves."""
    dense = sl.remove_masks(copy.deepcopy(model))
    leaves = {n: w.detach().clone().requires_grad_(True) for n, w in sl.prunable(model).items()}
    loss = F.cross_entropy(functional_call(dense, leaves, (x,)), y)
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def test_rigl_grows_the_top_dense_gradient_inactive_positions():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    dst = growth.RigL(model, opt, 0.85, update_every=1, end=10, alpha=0.3, schedule="constant")
    for t in range(5):
        x, y = batch(t)
        oracle = dense_gradient_oracle(model, x, y)
        weights = {n: p.detach().clone() for n, p in sl.trainable(model).items()}
        before = sl.get_masks(model)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dst.step()
        after = sl.get_masks(model)
        for n in before:
            m = before[n].reshape(-1)
            a = int(m.sum())
            c = int(math.floor(0.3 * a))
            kept = torch.zeros_like(m)
            kept[torch.topk(torch.where(m, weights[n].abs().reshape(-1), torch.tensor(-1.0)), a - c).indices] = True
            grow = torch.where(kept, torch.tensor(-1.0), oracle[n].abs().reshape(-1))
            expected = kept.clone()
            expected[torch.topk(grow, c).indices] = True
            assert torch.equal(after[n].reshape(-1), expected), (t, n)
        opt.step()


def test_mask_is_final_after_end_and_static_never_moves():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = growth.SET(model, opt, 0.9, update_every=1, end=10, alpha=0.5)
    train_steps(model, opt, dst, 10)
    final = sl.get_masks(model)
    assert len(dst.history) == 9 and dst.fraction(10) == 0.0
    train_steps(model, opt, dst, 20, start=10)
    assert all(torch.equal(final[n], m) for n, m in sl.get_masks(model).items())
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    static = growth.Static(model, opt, 0.9, update_every=1, end=10)
    first = sl.get_masks(model)
    train_steps(model, opt, static, 10)
    assert all(torch.equal(first[n], m) for n, m in sl.get_masks(model).items())
    assert static.explored() == pytest.approx(1 - 0.9, abs=1e-3) and dst.explored() > 0.2


def test_deepr_keeps_signs():
    model = make()
    signs = {n: torch.where(w >= 0, 1.0, -1.0) for n, w in sl.prunable(model).items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dst = growth.DeepR(model, opt, 0.8, update_every=1, end=50, temperature=1e-4)
    flips = []
    for t in range(50):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        r = dst.step()
        flips.append(r["dropped"] if r else 0)
        for n, p in sl.trainable(model).items():   # right after an update no active weight has the wrong sign
            m = sl.get_masks(model)[n]
            if r is None:
                continue
            assert ((signs[n] * p.detach())[m] >= 0).all()
        opt.step()
    assert sum(flips) > 0


def test_topkast_forward_set_is_topk_and_backward_set_learns():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = growth.TopKAST(model, opt, 0.8, update_every=5, end=40)
    params = sl.trainable(model)
    for t in range(40):
        x, y = batch(t)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        used = {n: b.clone() for n, b in dst.backward.items()}   # the backward set of this step
        r = dst.step()
        masks = sl.get_masks(model)
        if r is not None:
            for n, p in params.items():
                keep = int(masks[n].sum())
                top = torch.zeros(p.numel(), dtype=torch.bool)
                top[torch.topk(p.detach().abs().reshape(-1), keep).indices] = True
                assert torch.equal(masks[n].reshape(-1), top)
        opt.step()
        for n, p in params.items():
            B, A = dst.backward[n], masks[n]
            assert torch.equal(B | A, B)
            moved = p.detach() != before[n]
            assert not moved[~used[n]].any(), "weights outside the backward set do not learn"
            if r is None and dst.last_step < 40:      # until end, B outside A learns
                assert moved[B & ~A].any(), "weights of B outside A learn from the dense gradient"
            w = sl.prunable(model)[n]
            assert (w.detach()[~A] == 0).all()


def test_state_dict_round_trip_resumes_identically():
    for cls in (growth.SET, growth.SNFS, growth.DSR):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        dst = cls(model, opt, 0.8, update_every=2, end=40)
        train_steps(model, opt, dst, 9)
        model2 = make(seed=5)                            # a resumed run: fresh objects, saved states
        opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
        dst2 = cls(model2, opt2, 0.8, update_every=2, end=40, seed=3)
        model2.load_state_dict(model.state_dict())
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))   # torch would share the momentum tensors
        dst2.load_state_dict(copy.deepcopy(dst.state_dict()))
        train_steps(model, opt, dst, 15, start=9)
        train_steps(model2, opt2, dst2, 15, start=9)
        a, b = sl.get_masks(model), sl.get_masks(model2)
        assert all(torch.equal(a[n], b[n]) for n in a), cls.__name__
        assert dst.history == dst2.history


def test_fit_callback_and_prebuilt_optimizer():
    task = sl.data.teacher_student(n_train=256, n_test=128, in_features=16, seed=0)
    model = make()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    dst = growth.RigL(model, opt, 0.9, update_every=4, end=30)
    sl.train.fit(model, task, epochs=2, optimizer=opt, batch_size=16, callbacks=[dst], progress=False)
    assert dst.last_step == 32 and len(dst.history) == 7
    assert sl.sparsity(model) >= 0.9 - 1e-3


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("bad, match", [
    (dict(sparsity=1.0), "sparsity"), (dict(sparsity=-0.1), "sparsity"),
    (dict(update_every=0), "update_every"), (dict(end=-1), "end"),
    (dict(alpha=0.0), "alpha"), (dict(alpha=1.2), "alpha"),
    (dict(distribution="gaussian"), "distribution"),
    (dict(distribution={"nope.weight": 0.5}), "unknown layer"),
    (dict(schedule="linear"), "schedule"),
])
def test_bad_input_is_refused_and_nothing_changes(bad, match):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = copy.deepcopy(model.state_dict())
    opt_state = copy.deepcopy(opt.state_dict())
    args = dict(sparsity=0.9, update_every=10, end=100, alpha=0.3) | bad
    with pytest.raises((ValueError, TypeError), match=match):
        growth.RigL(model, opt, **args)
    assert not sl.masks.is_masked(model)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    assert opt.state_dict() == opt_state


def test_other_refusals():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer does not update"):
        growth.SET(model, torch.optim.SGD(make().parameters(), lr=0.1), 0.9, end=10)
    with pytest.raises(ValueError, match="overall sparsity"):
        growth.SET(model, opt, 0.9, end=10, distribution={"0.weight": 0.5})
    with pytest.raises(ValueError, match="init"):
        growth.SET(model, opt, 0.9, end=10, init="normal")
    with pytest.raises(ValueError, match="backward_sparsity"):
        growth.TopKAST(model, opt, 0.9, end=10, backward_sparsity=0.95)
    assert not sl.masks.is_masked(model)
    sl.prune(model, 0.5)
    with pytest.raises(ValueError, match="already carries masks"):
        growth.RigL(model, opt, 0.9, end=10)


# ----------------------------------------------------------------------------------------- experiment records
def test_compare_records_costs_and_exploration():
    task = sl.data.teacher_student(n_train=256, n_test=128, in_features=16, seed=0)
    records = growth_runs.compare(task, lambda seed: make(seed), ["static", "rigl", "snfs", "gmp"], [0.8], ["uniform"],
                             seeds=[0], epochs=2, batch_size=32, update_every=2, optimizer="sgd", lr=0.05)
    by = {r["method"]: r for r in records}
    sizes = {n: w.numel() for n, w in sl.prunable(make()).items()}
    for r in records:
        assert len(r["curve"]) == 2 and len(r["iou"]) == len(r["explored"]) == 3 and r["iou"][-1] == 1.0
        assert r["steps"] == 16 and r["end"] == 12
        kept = sum(r["density"][n] * sizes[n] for n in sizes)
        assert kept == pytest.approx(0.2 * sum(sizes.values()), abs=1)
    assert by["static"]["cost"] == pytest.approx(0.2, abs=1e-3) and by["static"]["explored"][-1] == pytest.approx(0.2, abs=1e-3)
    assert by["static"]["iou"] == [1.0, 1.0, 1.0] and by["static"]["updates"] == []
    # RigL: 3 f_S per step plus one dense weight gradient (1 - f_S) on each of its 5 update steps, over 3 per step
    assert by["rigl"]["cost"] == pytest.approx((16 * 3 * 0.2 + 5 * 0.8) / 3 / 16, abs=1e-3)
    assert by["snfs"]["cost"] == pytest.approx((2 * 0.2 + 1.0) / 3, abs=1e-3)
    assert 0.2 < by["gmp"]["cost"] < 1.0 and by["gmp"]["explored"][0] == 1.0     # dense at the start
    assert by["rigl"]["explored"][-1] > 0.2 and len(by["rigl"]["updates"]) == 5
    with pytest.raises(ValueError, match="method must be one of"):
        growth_runs.train_sparse("magic", task, make(), 0.8, epochs=1)


def test_dst_step_benchmark_rows():
    from sparsity_lib.bench.growth import dst_step_benchmark
    rows = dst_step_benchmark(steps=2, warmup=1)
    assert [r["method"] for r in rows][0] == "static mask" and rows[0]["vs static"] == 1.0
    assert len(rows) == 5 and all(r["ms"] > 0 for r in rows)


def test_set_random_init_option_draws_grown_weights_like_the_default_init():
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dst = growth.SET(model, opt, 0.8, update_every=1, end=10, init="random")
    x, y = batch(0)
    F.cross_entropy(model(x), y).backward()
    before = sl.get_masks(model)
    dst.step()
    for n, p in sl.trainable(model).items():
        grown = sl.get_masks(model)[n] & ~before[n]
        values = p.detach()[grown]
        bound = 1 / math.sqrt(p.shape[1])
        assert grown.any() and (values != 0).all() and (values.abs() <= bound).all()
