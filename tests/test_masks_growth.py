"""Masks that change (dense gradients, drop-and-grow, replacing masks, optimizer state) and masks that learn
(the mask protocol: any parametrization with hard_mask())."""

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.utils import parametrize

import sparsity_lib as sl
from sparsity_lib.select import drop_and_grow


def random_masks(model, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=g) < density for n, w in sl.prunable(model).items()}


def batch(seed=0, n=32, d=16, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def snapshot(model):
    """Everything that must not change on a refusal: values, parametrizations, hooks."""
    params = {}
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            params[name] = {k: [type(p).__name__ for p in v] for k, v in module.parametrizations.items()}
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, params, hooks


def assert_unchanged(model, before):
    state, params, hooks = snapshot(model)
    assert params == before[1] and hooks == before[2]
    assert state.keys() == before[0].keys()
    for k in state:
        assert torch.equal(state[k], before[0][k]), k


# ------------------------------------------------------------------------------------------ dense gradient
def oracle_dense_gradients(model, x, y):
    """dL/dW_eff by functional_call on an unmasked copy, with the effective weights as dense leaf tensors."""
    dense = sl.remove_masks(copy.deepcopy(model))
    leaves = {n: w.detach().clone().requires_grad_(True) for n, w in sl.prunable(model).items()}
    loss = F.cross_entropy(functional_call(dense, leaves, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return dict(zip(leaves, grads))


@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_dense_gradient_equals_the_gradient_wrt_the_effective_weight(net, request):
    mlp = request.getfixturevalue(net)
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    sl.track_dense_gradients(mlp)
    x, y = batch()
    if net == "cnn":
        x, y = torch.randn(8, 1, 6, 6, generator=torch.Generator().manual_seed(0)), y[:8] % 4
    mlp.zero_grad()
    F.cross_entropy(mlp(x), y).backward()
    dense = sl.dense_gradients(mlp)
    expected = oracle_dense_gradients(mlp, x, y)
    assert list(dense) == list(expected)
    for name in dense:
        torch.testing.assert_close(dense[name], expected[name], rtol=1e-5, atol=1e-7)
        assert (dense[name][~masks[name]] != 0).any(), "pruned positions get their gradient"
        # the optimizer still sees the masked gradient
        torch.testing.assert_close(sl.trainable(mlp)[name].grad, expected[name] * masks[name], rtol=1e-5, atol=1e-7)
        assert (sl.trainable(mlp)[name].grad[~masks[name]] == 0).all()


def test_dense_gradient_rule_last_cycle_and_uses_within_a_forward_add_up():
    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    sl.apply_masks(layer, {"weight": torch.rand(6, 6) < 0.5})
    sl.track_dense_gradients(layer)
    x = torch.randn(3, 6)
    with pytest.raises(RuntimeError, match="no gradient recorded"):
        sl.dense_gradients(layer)
    layer(layer(x)).square().sum().backward()  # the weight is used twice in one forward pass
    w = layer.weight.detach().clone().requires_grad_(True)
    (F.linear(F.linear(x, w, layer.bias), w, layer.bias)).square().sum().backward()
    torch.testing.assert_close(sl.dense_gradients(layer)["weight"], w.grad)
    with torch.no_grad():
        layer(x)  # evaluation without gradients does not touch the record
    torch.testing.assert_close(sl.dense_gradients(layer)["weight"], w.grad)
    layer(x).sum()  # a forward pass that is never backpropagated does not count
    x2 = torch.randn(4, 6)
    layer(x2).pow(3).sum().backward()  # a new cycle replaces the record (no accumulation over backward passes)
    w2 = layer.weight.detach().clone().requires_grad_(True)
    F.linear(x2, w2, layer.bias).pow(3).sum().backward()
    torch.testing.assert_close(sl.dense_gradients(layer)["weight"], w2.grad)
    sl.track_dense_gradients(layer, enabled=False)
    with pytest.raises(RuntimeError, match="not.*tracked|no masked layer"):
        sl.dense_gradients(layer)


def test_tracking_needs_masks_and_is_off_by_default(mlp):
    with pytest.raises(ValueError, match="no masked layer"):
        sl.track_dense_gradients(mlp)
    sl.apply_masks(mlp, random_masks(mlp))
    assert not any(m.track_dense_grad for m in mlp.modules() if isinstance(m, sl.masks.Mask))
    x, y = batch()
    F.cross_entropy(mlp(x), y).backward()
    assert all(m._dense_grad is None for m in mlp.modules() if isinstance(m, sl.masks.Mask))


# ------------------------------------------------------------------------------------------- drop and grow
def brute_force_drop_and_grow(mask, drop, grow, count):
    flat_m, flat_d, flat_g = mask.reshape(-1).tolist(), drop.reshape(-1).tolist(), grow.reshape(-1).tolist()
    active = [i for i, m in enumerate(flat_m) if m]
    keep = sorted(active, key=lambda i: (-flat_d[i], i))[:len(active) - count]
    free = [i for i in range(len(flat_m)) if i not in set(keep)]
    grown = sorted(free, key=lambda i: (-flat_g[i], i))[:count]
    out = [False] * len(flat_m)
    for i in keep + grown:
        out[i] = True
    return torch.tensor(out).reshape(mask.shape)


@pytest.mark.parametrize("seed", range(6))
def test_drop_and_grow_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    shape = [(7, 5), (3, 2, 3, 3), (40,)][seed % 3]
    mask = torch.rand(shape, generator=g) < [0.2, 0.5, 0.9][seed % 3]
    # integer-valued scores: many ties, to check the documented tie-break (earlier position ranks higher)
    drop = torch.randint(0, 4, shape, generator=g).float()
    grow = torch.randint(0, 3, shape, generator=g).float()
    active = int(mask.sum())
    for count in sorted({0, 1, active // 3, active // 2, active}):
        before = (mask.clone(), drop.clone(), grow.clone())
        got = drop_and_grow(mask, drop, grow, count)
        assert got.dtype == torch.bool and got.shape == mask.shape
        assert torch.equal(got, brute_force_drop_and_grow(mask, drop, grow, count))
        assert int(got.sum()) == active, "the number of active weights is unchanged"
        assert all(torch.equal(a, b) for a, b in zip(before, (mask, drop, grow))), "pure"


def test_drop_and_grow_semantics_and_errors():
    mask = torch.tensor([True, True, True, False, False])
    drop = torch.tensor([3.0, 1.0, 2.0, 9.0, 9.0])
    grow = torch.tensor([0.0, 5.0, 0.0, 1.0, 0.0])
    # drop the lowest active (position 1), then it has the highest grow score among the non-kept: it comes back
    assert drop_and_grow(mask, drop, grow, 1).tolist() == [True, True, True, False, False]
    grow2 = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0])
    assert drop_and_grow(mask, drop, grow2, 2).tolist() == [True, False, False, True, True]
    for count in (-1, 4, 1.0, True):
        with pytest.raises(ValueError, match="count"):
            drop_and_grow(mask, drop, grow, count)
    with pytest.raises(ValueError, match="shape"):
        drop_and_grow(mask, drop[:4], grow, 1)
    with pytest.raises(TypeError, match="mask"):
        drop_and_grow(mask.float(), drop, grow, 1)
    with pytest.raises(ValueError, match="drop_scores contains NaN"):
        drop_and_grow(mask, torch.tensor([float("nan"), 1, 2, 3, 4.0]), grow, 1)
    drop_and_grow(mask, torch.tensor([0, 1, 2, float("nan"), 4.0]), grow, 1)  # NaN at an inactive position: unread
    with pytest.raises(ValueError, match="grow_scores contains NaN"):
        drop_and_grow(mask, drop, torch.tensor([0, 1, 2, float("nan"), 4.0]), 1)


# ------------------------------------------------------------------------------------------ replace masks
def test_replace_masks_revives_weights_at_init(mlp):
    old = random_masks(mlp, seed=0)
    sl.apply_masks(mlp, old)
    new = {n: drop_and_grow(m, torch.rand(m.shape), torch.rand(m.shape), int(m.sum()) // 4) for n, m in old.items()}
    values = {n: w.detach().clone() for n, w in sl.prunable(mlp).items()}
    name0 = "0.weight"
    init = {name0: torch.full(old[name0].shape, 0.125)}
    sl.track_dense_gradients(mlp)
    revived = sl.replace_masks(mlp, {name0: new[name0]}, init=init)
    assert list(revived) == [name0] and torch.equal(revived[name0], new[name0] & ~old[name0])
    revived_rest = sl.replace_masks(mlp, {n: new[n] for n in ["2.weight", "4.weight"]}, init=-0.5)
    revived.update(revived_rest)
    assert torch.equal(sl.get_masks(mlp)[name0], new[name0])
    for name, w in sl.prunable(mlp).items():
        assert torch.equal(sl.get_masks(mlp)[name], new[name])
        fill = 0.125 if name == name0 else -0.5
        assert (w[revived[name]] == fill).all()
        survivors = new[name] & old[name]
        assert torch.equal(w[survivors], values[name][survivors])
        assert (w[~new[name]] == 0).all() and (sl.trainable(mlp)[name][~new[name]] == 0).all()
    assert all(m.track_dense_grad for m in mlp.modules() if isinstance(m, sl.masks.Mask)), "tracking survives"
    assert sl.sparsity(mlp) == pytest.approx(sum(int((~m).sum()) for m in new.values()) / sl.masks.count_params(mlp))


def test_replace_masks_on_an_unmasked_layer_and_default_zero(mlp):
    m = random_masks(mlp)["2.weight"]
    revived = sl.replace_masks(mlp, {"2.weight": m})
    assert not revived["2.weight"].any(), "a dense layer has nothing to revive"
    sl.apply_masks(mlp, {"2.weight": torch.zeros_like(m)})
    revived = sl.replace_masks(mlp, {"2.weight": m})
    assert torch.equal(revived["2.weight"], m) and (sl.prunable(mlp)["2.weight"][m] == 0).all()


@pytest.mark.parametrize("masks, init, error", [
    ({"0.weight": "ok", "nope.weight": "ok"}, 0.0, "unknown layer"),
    ({"0.weight": "ok", "2.weight": "short"}, 0.0, "shape"),
    ({"0.weight": "ok"}, {"2.weight": "ok"}, "not a layer of masks"),
    ({"0.weight": "ok"}, {"0.weight": "short"}, "init"),
    ({"0.weight": "ok"}, float("nan"), "finite"),
    ({"0.weight": "ok"}, "zero", "init must be"),
])
def test_replace_masks_refuses_bad_input_before_changing_anything(mlp, masks, init, error):
    sl.apply_masks(mlp, random_masks(mlp))
    ok = {n: torch.ones(w.shape, dtype=torch.bool) for n, w in sl.prunable(mlp).items()}

    def make(name, what):
        return ok[name] if what == "ok" else torch.ones(3, dtype=torch.bool) if what == "short" else what
    masks = {n: make(n if n in ok else "0.weight", v) for n, v in masks.items()}
    if isinstance(init, dict):
        init = {n: torch.ones(ok[n].shape) if v == "ok" else torch.ones(2) for n, v in init.items()}
    before = snapshot(mlp)
    with pytest.raises((ValueError, TypeError), match=error):
        sl.replace_masks(mlp, masks, init=init)
    assert_unchanged(mlp, before)


def test_trainable_names_the_tensors_the_optimizer_updates(mlp):
    sl.apply_masks(mlp, {"2.weight": random_masks(mlp)["2.weight"]})
    t = sl.trainable(mlp)
    assert list(t) == ["0.weight", "2.weight", "4.weight"]
    assert t["0.weight"] is mlp[0].weight and t["2.weight"] is mlp[2].parametrizations.weight.original
    assert all(isinstance(p, nn.Parameter) for p in t.values())


# -------------------------------------------------------------------------------------- optimizer state
@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
], ids=["sgd", "adam", "adamw_amsgrad"])
def test_reset_optimizer_state_zeroes_exactly_the_given_positions(mlp, make):
    sl.apply_masks(mlp, random_masks(mlp, density=0.7))
    opt = make(mlp.parameters())
    for seed in range(3):
        x, y = batch(seed)
        opt.zero_grad()
        F.cross_entropy(mlp(x), y).backward()
        opt.step()
    g = torch.Generator().manual_seed(1)
    positions = {n: torch.rand(w.shape, generator=g) < 0.3 for n, w in sl.prunable(mlp).items() if n != "4.weight"}
    before = {id(p): {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
              for p, s in opt.state.items()}
    sl.reset_optimizer_state(opt, mlp, positions)
    params = sl.trainable(mlp)
    by_id = {id(p): n for n, p in params.items()}
    moments = 0
    for p, state in opt.state.items():
        name = by_id.get(id(p))
        for key, value in state.items():
            old = before[id(p)][key]
            if key in sl.masks.OPTIMIZER_MOMENTS and name in positions:
                moments += 1
                where = positions[name]
                assert (value[where] == 0).all() and torch.equal(value[~where], old[~where])
                assert (old[where] != 0).any(), "the test resets something that was nonzero"
            else:
                assert torch.equal(value, old) if isinstance(value, torch.Tensor) else value == old
    assert moments == {"SGD": 1, "Adam": 2, "AdamW": 3}[type(opt).__name__] * len(positions)


def test_reset_optimizer_state_refusals(mlp):
    sl.apply_masks(mlp, random_masks(mlp))
    where = {"0.weight": torch.ones(40, 16, dtype=torch.bool)}
    rms = torch.optim.RMSprop(mlp.parameters(), lr=1e-2)
    x, y = batch()
    F.cross_entropy(mlp(x), y).backward()
    rms.step()
    state = {k: v.clone() for k, v in rms.state[sl.trainable(mlp)["0.weight"]].items()}
    with pytest.raises(ValueError, match="square_avg"):
        sl.reset_optimizer_state(rms, mlp, where)
    assert all(torch.equal(v, state[k]) for k, v in rms.state[sl.trainable(mlp)["0.weight"]].items())
    sgd = torch.optim.SGD([sl.trainable(mlp)["2.weight"]], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="does not update"):
        sl.reset_optimizer_state(sgd, mlp, where)
    with pytest.raises(ValueError, match="unknown layer"):
        sl.reset_optimizer_state(sgd, mlp, {"x.weight": where["0.weight"]})
    with pytest.raises(ValueError, match="shape"):
        sl.reset_optimizer_state(sgd, mlp, {"2.weight": where["0.weight"]})


# ---------------------------------------------------------------------------------------- masks that learn
class Gate(nn.Module):
    """A learned gate defined here, not by the library: weight * sigmoid(logits), noisy while training,
    with the hard mask logits > 0 (zero below)."""

    def __init__(self, shape, seed=0):
        super().__init__()
        self.logits = nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))

    def hard_mask(self):
        return self.logits.detach() > 0

    def forward(self, weight):
        gate = torch.sigmoid(self.logits) * (self.logits > 0)
        if self.training:
            gate = gate * (0.5 + torch.rand_like(gate)) + 0.01  # stochastic and never exactly zero
        return weight * gate


class Scale(nn.Module):
    """A user's parametrization that is not a mask."""

    def forward(self, weight):
        return 2.0 * weight


def test_a_custom_parametrization_with_hard_mask_is_a_mask(mlp):
    parametrize.register_parametrization(mlp[2], "weight", Gate(mlp[2].weight.shape), unsafe=True)
    gate = mlp[2].parametrizations.weight[0]
    hard = gate.logits.detach() > 0
    assert sl.masks.is_masked(mlp)
    masks = sl.get_masks(mlp)
    assert torch.equal(masks["2.weight"], hard) and masks["0.weight"].all() and masks["4.weight"].all()
    mlp.train()
    assert (sl.prunable(mlp)["2.weight"] != 0).all(), "in training mode the gate is noisy and never zero"
    removed = int((~hard).sum())
    assert sl.sparsity(mlp) == pytest.approx(removed / sl.masks.count_params(mlp)), "the hard mask is reported"
    report = sl.sparsity_report(mlp)
    assert report.loc["2.weight", "nonzeros"] == int(hard.sum()) and report.loc["0.weight", "nonzeros"] == 40 * 16
    assert mlp.training and gate.training, "reading the sparsity restores the training mode"
    # the library's own mask composes with it: the layer's mask is the AND
    extra = random_masks(mlp, density=0.7)["2.weight"]
    sl.apply_masks(mlp, {"2.weight": extra})
    assert torch.equal(sl.get_masks(mlp)["2.weight"], hard & extra)
    expected = mlp[2].parametrizations.weight.original.detach() * torch.sigmoid(gate.logits.detach()) * hard * extra
    sl.remove_masks(mlp)
    assert not parametrize.is_parametrized(mlp[2]) and isinstance(mlp[2].weight, nn.Parameter)
    assert list(mlp.state_dict())[:4] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    torch.testing.assert_close(mlp[2].weight.detach(), expected, rtol=0, atol=0)


def test_topk_supermask_is_public_and_a_mask():
    torch.manual_seed(0)
    layer = nn.Linear(5, 6)
    scores = torch.randn(6, 5)
    alive = torch.rand(6, 5) < 0.8
    param = sl.lottery.TopKSupermask(scores.clone(), alive, keep=10)
    w = layer.weight.detach().clone()
    parametrize.register_parametrization(layer, "weight", param, unsafe=True)
    a = scores.abs().masked_fill(~alive, -float("inf"))
    hard = sl.select.topk_mask(a, 10)
    assert torch.equal(sl.get_masks(layer)["weight"], hard) and sl.sparsity(layer) == pytest.approx(1 - 10 / 30)
    sl.remove_masks(layer)
    assert torch.equal(layer.weight.detach(), w * hard)
    with pytest.raises(ValueError, match="keep"):
        sl.lottery.TopKSupermask(scores.clone(), alive, keep=int(alive.sum()) + 1)


def test_remove_masks_keeps_a_users_parametrization_registered_after_the_mask(mlp):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    spectral = torch.nn.utils.parametrizations.spectral_norm(mlp[2])
    assert [type(p).__name__ for p in spectral.parametrizations.weight] == ["Mask", "_SpectralNorm"]
    mlp.eval()
    before = mlp[2].weight.detach().clone()
    assert (before[~masks["2.weight"]] == 0).all() and sl.get_masks(mlp)["2.weight"].equal(masks["2.weight"])
    sl.remove_masks(mlp)
    assert not parametrize.is_parametrized(mlp[0])
    assert [type(p).__name__ for p in mlp[2].parametrizations.weight] == ["_SpectralNorm"], "the user's stays"
    torch.testing.assert_close(mlp[2].weight.detach(), before)
    assert not sl.masks.is_masked(mlp)


def test_remove_masks_refuses_a_mask_after_a_users_parametrization(mlp):
    sl.apply_masks(mlp, random_masks(mlp))
    parametrize.register_parametrization(mlp[4], "weight", Scale())
    parametrize.register_parametrization(mlp[4], "weight", Gate(mlp[4].weight.shape), unsafe=True)
    before = snapshot(mlp)
    with pytest.raises(ValueError, match="4.weight.*after a parametrization that is not a mask"):
        sl.remove_masks(mlp)
    assert_unchanged(mlp, before)


# ----------------------------------------------- other people's parametrizations, hooks, tied weights, speed
def _weight_norm_param(m):
    torch.nn.utils.parametrizations.weight_norm(m[2])


def _weight_norm_hook(m):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(m[2])


def _spectral_norm_param(m):
    torch.nn.utils.parametrizations.spectral_norm(m[2])


def _spectral_norm_hook(m):
    torch.nn.utils.spectral_norm(m[2])


def _torch_prune(m):
    torch.nn.utils.prune.l1_unstructured(m[2], "weight", 0.3)


@pytest.mark.parametrize("setup", [_weight_norm_param, _weight_norm_hook, _spectral_norm_param,
                                   _spectral_norm_hook, _torch_prune])
def test_foreign_weight_transforms_are_refused_before_anything_changes(mlp, setup):
    setup(mlp)
    mlp.eval()  # spectral norm's power iteration would change its buffers in a training-mode forward
    before = snapshot(mlp)
    with pytest.raises(ValueError, match="2.weight"):
        sl.prune(mlp, 0.5, method="magnitude")
    assert_unchanged(mlp, before)
    with pytest.raises(ValueError, match="2.weight"):
        sl.apply_masks(mlp, random_masks(mlp))
    assert_unchanged(mlp, before)
    sl.remove_masks(mlp)  # nothing of ours to remove: the user's transform stays
    assert_unchanged(mlp, before)
    masks = random_masks(mlp)
    sl.apply_masks(mlp, {n: masks[n] for n in ["0.weight", "4.weight"]})  # the other layers compose
    assert sl.get_masks(mlp)["4.weight"].equal(masks["4.weight"])


def test_apply_masks_is_all_or_nothing_including_devices(mlp):
    masks = random_masks(mlp)
    masks["4.weight"] = torch.ones(sl.prunable(mlp)["4.weight"].shape, dtype=torch.bool, device="meta")
    before = snapshot(mlp)
    with pytest.raises(ValueError, match="4.weight.*meta"):
        sl.apply_masks(mlp, masks)
    assert_unchanged(mlp, before)


def test_tied_weights_are_refused_or_left_alone():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(10, 8)
            self.hidden = nn.Linear(8, 8)
            self.out = nn.Linear(8, 10, bias=False)
            self.out.weight = self.emb.weight  # tied input and output embeddings

        def forward(self, tokens):
            return self.out(torch.relu(self.hidden(self.emb(tokens))))

    model = Tied()
    before = snapshot(model)
    with pytest.raises(ValueError, match="out.weight.*shared.*emb.weight"):
        sl.prune(model, 0.5, method="magnitude")
    assert_unchanged(model, before)
    # leaving the tied layer out works, and the tied weight stays one tensor, dense and honestly reported
    sl.prune(model, 0.5, method="magnitude", scope="layerwise", exclude=["out.weight"])
    assert model.out.weight is model.emb.weight and not parametrize.is_parametrized(model.out)
    assert sl.get_masks(model)["out.weight"].all()
    assert sl.sparsity(model) == pytest.approx(32 / (64 + 80))


def test_functional_call_with_dense_names_on_a_masked_model(mlp):
    masks = random_masks(mlp)
    sl.apply_masks(mlp, masks)
    before = snapshot(mlp)
    original = sl.trainable(mlp)["2.weight"]
    x, y = batch()
    t = torch.randn(24, 40, requires_grad=True)
    given = {"2.weight": t}
    out = functional_call(mlp, given, (x,))
    assert given["2.weight"] is t, "functional_call reads back what it was given"
    h = torch.relu(mlp[0](x))
    expected = mlp[4](torch.relu(F.linear(h, t * masks["2.weight"], mlp[2].bias)))
    torch.testing.assert_close(out, expected)
    F.cross_entropy(out, y).backward()
    assert t.grad is not None and (t.grad[~masks["2.weight"]] == 0).all() and t.grad.abs().sum() > 0
    assert sl.trainable(mlp)["2.weight"] is original
    assert_unchanged(mlp, before)
    # torch.func transforms over the dense names
    params = {n: w.detach() for n, w in sl.prunable(mlp).items()}
    grads = torch.func.grad(lambda p: F.cross_entropy(functional_call(mlp, p, (x,)), y))(params)
    expected = oracle_dense_gradients(mlp, x, y)
    for n in grads:
        torch.testing.assert_close(grads[n], expected[n] * masks[n], rtol=1e-5, atol=1e-7)
    assert_unchanged(mlp, before)
    with pytest.raises(RuntimeError, match="right_inverse"):  # a plain assignment keeps torch's behaviour
        mlp[2].weight = torch.zeros(24, 40)


def test_masked_forward_has_no_graph_breaks_and_frozen_inference_is_exact(mlp):
    sl.apply_masks(mlp, random_masks(mlp))
    x, _ = batch()
    explanation = torch._dynamo.explain(mlp)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    expected = mlp(x)
    with sl.masks.frozen(mlp) as model:
        assert torch.equal(model(x), expected) and torch.equal(model(x), expected)
    masks = random_masks(mlp, seed=3)
    sl.apply_masks(mlp, masks)  # the cache ended with the block: new masks are seen
    with sl.masks.frozen(mlp):
        out = mlp(x)
    torch.testing.assert_close(out, mlp(x), rtol=0, atol=0)


def test_a_rigl_update_inside_fit_keeps_sparsity_and_restarts_revived_weights(mlp):
    """The pieces together, as the callback documentation of train.py describes: dense gradient after backward,
    drop-and-grow, replace_masks, reset_optimizer_state; sparsity is constant and revived weights restart at 0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    task = sl.data.Task(name="toy", x_train=x, y_train=x[:, :5].argmax(1), x_test=x[:32],
                        y_test=x[:32, :5].argmax(1), num_classes=5)
    sl.prune(mlp, 0.8, method="magnitude", scope="layerwise")
    sl.track_dense_gradients(mlp)
    target = sl.sparsity(mlp)
    seen = []

    class RigL:
        def on_after_backward(self, state):
            if state.step % 2:
                return
            grads = sl.dense_gradients(state.model)
            masks, weights = sl.get_masks(state.model), sl.prunable(state.model)
            new = {n: drop_and_grow(masks[n], weights[n].detach().abs(), grads[n].abs(), int(masks[n].sum()) // 5)
                   for n in grads}
            revived = sl.replace_masks(state.model, new)
            sl.reset_optimizer_state(state.optimizer, state.model, revived)
            params = sl.trainable(state.model)
            for n, where in revived.items():
                assert (params[n].detach()[where] == 0).all()
                assert (params[n].grad[~new[n]] == 0).all(), "the gradient the step applies is masked anew"
                if params[n] in state.optimizer.state:
                    assert (state.optimizer.state[params[n]]["momentum_buffer"][where] == 0).all()
            seen.append(sum(int(w.sum()) for w in revived.values()))

    sl.train.fit(mlp, task, epochs=2, batch_size=32, callbacks=[RigL()], progress=False)
    assert sum(seen) > 0, "connections moved"
    assert sl.sparsity(mlp) == pytest.approx(target)


def test_check_maskable_names_the_layer_before_any_scoring(mlp):
    sl.masks.check_maskable(mlp)
    torch.nn.utils.parametrizations.weight_norm(mlp[4])
    before = snapshot(mlp)
    with pytest.raises(ValueError, match="4.weight: cannot mask this layer.*weight_norm"):
        sl.masks.check_maskable(mlp)
    sl.masks.check_maskable(mlp, ["0.weight", "2.weight"])
    assert_unchanged(mlp, before)
