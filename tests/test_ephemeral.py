"""Tests of sparsity_lib.ephemeral, sparsity_lib.moe and sparsity_lib.ephemeral_runs (Chapter 11)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib import ephemeral as eph
from sparsity_lib import moe


# ------------------------------------------------------------------------------------------------ top_mask
def test_top_mask_matches_stable_sort_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 40), generator=g).float()     # many ties
    for k in (0, 1, 7, 20, 39, 40, 45):
        for largest in (True, False):
            mask = eph.top_mask(scores, k, largest=largest)
            order = torch.sort(scores, dim=1, descending=largest, stable=True).indices[:, :min(k, 40)]
            oracle = torch.zeros_like(mask).scatter_(1, order, True)
            assert torch.equal(mask, oracle), (k, largest)
            assert (mask.sum(1) == min(k, 40)).all()


# ------------------------------------------------------------------------------------------- compressors
@pytest.mark.parametrize("ratio,n,k", [(0.01, 8192, 82), (0.001, 8192, 9), (0.5, 3, 2), (1e-6, 10, 1), (1.0, 7, 7)])
def test_kept_count(ratio, n, k):
    assert eph.kept_count(n, ratio) == k


def test_topk_keeps_exactly_k_largest_and_breaks_ties_by_index():
    c = eph.TopK(0.1, error_feedback=False)
    g = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    u = c.compress(g)
    assert u.nnz == 10 and u.shape == (10, 10)
    oracle = torch.topk(g.abs().flatten(), 10).indices.sort().values
    assert torch.equal(u.indices, oracle)
    assert torch.equal(u.values, g.flatten()[oracle])
    dense = u.to_dense()
    assert int((dense != 0).sum()) == 10 and torch.equal(dense[u.mask()], g[u.mask()])
    ties = eph.TopK(0.25, error_feedback=False).compress(torch.ones(8))
    assert ties.indices.tolist() == [0, 1]
    assert c.residual("") is None                        # no memory without error feedback


@pytest.mark.parametrize("cls", [eph.TopK, eph.RandomK])
def test_error_feedback_loses_nothing(cls):
    torch.manual_seed(0)
    c = cls(0.05, error_feedback=True)
    raw_sum = torch.zeros(20, 30, dtype=torch.float64)
    sent_sum = torch.zeros_like(raw_sum)
    for _ in range(25):
        g = torch.randn(20, 30, dtype=torch.float64)
        kept = g.clone()
        u = c.compress(g, "w")
        assert torch.equal(g, kept)                      # the caller's gradient is never written to
        assert u.nnz == eph.kept_count(600, 0.05) == len(set(u.indices.tolist()))
        raw_sum += g
        sent_sum += u.to_dense()
    residual = c.residual("w").reshape(20, 30)
    assert torch.allclose(sent_sum + residual, raw_sum, atol=1e-12, rtol=0)
    c.reset()
    assert c.residual("w") is None


def test_error_feedback_sends_accumulated_entries():
    c = eph.TopK(0.5, error_feedback=True)
    u1 = c.compress(torch.tensor([3.0, 1.0]), "a")          # sends 3, keeps 1
    u2 = c.compress(torch.tensor([0.0, 0.5]), "a")          # accumulator [0, 1.5] -> sends 1.5 at index 1
    assert u1.indices.tolist() == [0] and u2.indices.tolist() == [1]
    assert u2.values.tolist() == [1.5] and c.residual("a").tolist() == [0.0, 0.0]


def test_ratio_one_is_lossless_and_randomk_is_reproducible():
    g = torch.randn(5, 4)
    assert torch.equal(eph.TopK(1.0).compress(g, "x").to_dense(), g)
    a = eph.RandomK(0.25, error_feedback=False, seed=3).compress(g)
    b = eph.RandomK(0.25, error_feedback=False, seed=3).compress(g)
    assert torch.equal(a.indices, b.indices) and a.nnz == 5
    assert torch.equal(a.values, g.flatten()[a.indices])


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        eph.TopK(ratio)
    with pytest.raises(ValueError, match="ratio"):
        eph.RandomK(ratio)


def test_bad_gradient_and_flag():
    with pytest.raises(TypeError, match="error_feedback"):
        eph.TopK(0.1, error_feedback=1)
    with pytest.raises(ValueError, match="NaN"):
        eph.TopK(0.1).compress(torch.tensor([1.0, float("nan")]))
    c = eph.TopK(0.1)
    c.compress(torch.ones(4), "w")
    with pytest.raises(ValueError, match="residual"):
        c.compress(torch.ones(5), "w")


def test_gradient_compression_callback_in_fit():
    task = sl.data.teacher_student(n_train=64, n_test=32, in_features=8, hidden=4, seed=0)
    model = sl.models.mlp(8, (16,), task.num_classes, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    counts = []

    class Check:
        def on_after_backward(self, state):
            counts.append({n: int((p.grad != 0).sum()) for n, p in state.model.named_parameters()})

    compression = eph.GradientCompression(eph.TopK(0.1, error_feedback=True))
    sl.train.fit(model, task, epochs=1, batch_size=64, lr=0.1, momentum=0.0, lr_schedule="constant",
                 callbacks=[compression, Check()], progress=False)
    expected = {n: eph.kept_count(p.numel(), 0.1) for n, p in model.named_parameters()}
    assert counts[0] == expected                        # the optimizer saw only the sent entries
    for name, p in model.named_parameters():            # plain SGD: w1 = w0 - lr * sent update
        sent = compression.last_updates[name].to_dense()
        assert torch.allclose(p.detach(), before[name] - 0.1 * sent, atol=1e-7)
    assert compression.steps == 1 and compression.values_sent == sum(expected.values())
    bits = eph.update_bits(compression.last_updates, "coo")
    oracle = sum(sl.formats.storage_bits(u.mask(), "coo") for u in compression.last_updates.values())
    assert bits == oracle
    assert eph.update_bits(compression.last_updates, "dense") == 32 * sum(p.numel() for p in model.parameters())
    with pytest.raises(TypeError, match="compressor"):
        eph.GradientCompression("topk")


# ------------------------------------------------------------------------------------------- activations
def test_activation_sparsity_matches_manual_count_and_cleans_up():
    model = sl.models.mlp(10, (20, 15), 3, seed=0)
    x = torch.randn(50, 10)
    model.train()
    result = eph.activation_sparsity(model, x)
    h1 = F.relu(model.fc1(x))
    h2 = F.relu(model.fc2(h1))
    assert list(result) == ["fc2", "fc3"]
    assert result["fc2"] == pytest.approx(float((h1 == 0).float().mean()))
    assert result["fc3"] == pytest.approx(float((h2 == 0).float().mean()))
    overall = eph.activation_sparsity(model, x, per_layer=False)
    assert overall == pytest.approx(float(((h1 == 0).sum() + (h2 == 0).sum()) / (h1.numel() + h2.numel())))
    assert model.training                                # mode restored
    assert all(not m._forward_pre_hooks for m in model.modules())
    with_input = eph.activation_sparsity(model, x, include_input=True)
    assert list(with_input) == ["fc1", "fc2", "fc3"] and with_input["fc1"] == 0.0
    with pytest.raises(ValueError, match="single"):
        eph.activation_sparsity(nn.Linear(4, 2), torch.randn(3, 4))


def test_activation_penalties_match_formulas_and_validate():
    model = sl.models.mlp(6, (8,), 3, seed=1)
    x = torch.randn(12, 6)
    h = F.relu(model.fc1(x))
    with eph.activation_l1(model, 0.5) as penalty:
        model(x)
        value = penalty(model)
        assert value.item() == pytest.approx(0.5 * h.abs().mean().item())
        value.backward()
        assert model.fc1.weight.grad is not None and model.fc1.weight.grad.abs().sum() > 0
    assert all(not m._forward_pre_hooks for m in model.modules())
    with eph.activation_hoyer(model, 2.0) as penalty:
        model(x)
        hoyer = ((h.abs().sum(1) ** 2) / (h ** 2).sum(1).clamp_min(1e-12))
        hoyer = torch.where((h ** 2).sum(1) > 1e-12, hoyer, torch.zeros_like(hoyer)).mean()
        assert penalty(model).item() == pytest.approx(2.0 * hoyer.item(), rel=1e-5)
    assert eph.hoyer_regularizer(torch.tensor([[0.0, 3.0, 0.0]])).item() == pytest.approx(1.0)
    assert eph.hoyer_regularizer(torch.ones(1, 4)).item() == pytest.approx(4.0)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="strength"):
            eph.activation_l1(model, bad)
    assert all(not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------------------ dropout
def test_drop_connect_eval_identity_and_expected_activation():
    torch.manual_seed(0)
    model = sl.models.mlp(5, (7,), 3, seed=0)
    reference = copy.deepcopy(model)
    keys = set(model.state_dict())
    eph.add_drop_connect(model, 0.4)
    assert type(model.fc1) is eph.DropConnect and set(model.state_dict()) == keys
    x = torch.randn(4, 5)
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.train()
    layer = model.fc1
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, F.linear(x, layer.weight, layer.bias), atol=0.05)
    assert not torch.equal(layer(x), layer(x))           # a new mask per forward pass
    eph.remove_weight_dropout(model)
    assert type(model.fc1) is nn.Linear and torch.equal(model(x), reference(x))


def test_targeted_dropout_only_touches_targets_and_keeps_expectation():
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    count = math.ceil(0.3 * 10)
    target = torch.zeros_like(w, dtype=torch.bool).scatter_(1, w.abs().argsort(1)[:, :count], True)
    draws = torch.stack([eph.targeted_dropout(w, 0.5, 0.3, generator=gen) for _ in range(4000)])
    assert torch.equal(draws[:, ~target], w[~target].expand(4000, -1))     # non-targets unchanged
    assert ((draws[:, target] == 0) | (draws[:, target] == 2 * w[target])).all()
    assert torch.allclose(draws.mean(0), w, atol=0.1)
    unit = eph.targeted_dropout(w, 0.99, 0.5, structure="unit", generator=gen)
    weakest = w.norm(dim=1).argsort()[:3]
    dropped = (unit == 0).all(1)
    assert 0 < int(dropped.sum()) and set(dropped.nonzero().flatten().tolist()) <= set(weakest.tolist())
    others = ~torch.isin(torch.arange(6), weakest)
    assert torch.equal(unit[others], w[others])             # units outside the targets pass unchanged


def test_targeted_dropout_layer_eval_identity():
    model = sl.models.mlp(5, (7,), 3, seed=0)
    reference = copy.deepcopy(model)
    eph.add_targeted_dropout(model, 0.5, 0.5)
    x = torch.randn(4, 5)
    model.eval()
    assert torch.equal(model(x), reference(x))
    model.train()
    assert not torch.equal(model(x), reference(x))


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan")])
def test_bad_dropout_probabilities(p):
    model = sl.models.mlp(5, (7,), 3, seed=0)
    with pytest.raises(ValueError, match="p must"):
        eph.add_drop_connect(model, p)
    with pytest.raises(ValueError, match="alpha"):
        eph.add_targeted_dropout(model, p, 0.5)
    with pytest.raises(ValueError, match="p must"):
        eph.DropConnect(3, 2, p=p)
    assert type(model.fc1) is nn.Linear


def test_weight_dropout_refuses_bad_layers_and_masked_layers_without_change():
    model = sl.models.mlp(5, (7,), 3, seed=0)
    with pytest.raises(ValueError, match="gamma"):
        eph.add_targeted_dropout(model, 0.5, 1.5)
    with pytest.raises(ValueError, match="unknown Linear layer"):
        eph.add_drop_connect(model, 0.5, layers=["fc9"])
    sl.prune(model, 0.5, scope="layerwise")
    with pytest.raises(ValueError, match="parametrized"):
        eph.add_drop_connect(model, 0.5)
    assert all(type(m) is not eph.DropConnect for m in model.modules())
    dropped = eph.add_drop_connect(sl.models.mlp(5, (7,), 3, seed=0), 0.5)
    sl.prune(dropped, 0.5, scope="layerwise")                # masks on top of DropConnect: refuse to convert
    with pytest.raises(ValueError, match="remove_weight_dropout before"):
        eph.remove_weight_dropout(dropped)
    assert isinstance(dropped.fc1, eph.DropConnect) and isinstance(dropped.fc2, eph.DropConnect)


# -------------------------------------------------------------------------------------------------- meProp
def test_meprop_gradient_matches_manual_topk():
    model = sl.models.mlp(6, (10,), 4, seed=0)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    pre = model.fc1(x)
    pre.retain_grad()
    F.cross_entropy(model.fc2(F.relu(pre)), y).backward()
    delta = eph.topk_rows(pre.grad, 3)
    assert ((delta != 0).sum(1) <= 3).all()
    expected_w, expected_b = delta.t() @ x, delta.sum(0)
    model.zero_grad()
    with eph.meprop(model, 3):
        out = model(x)
        F.cross_entropy(out, y).backward()
    assert torch.allclose(model.fc1.weight.grad, expected_w, atol=1e-6)
    assert torch.allclose(model.fc1.bias.grad, expected_b, atol=1e-6)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()                 # hooks removed: dense gradient again
    assert torch.allclose(model.fc1.bias.grad, pre.grad.sum(0), atol=1e-6)
    with pytest.raises(ValueError, match="k must"):
        eph.meprop(model, 0)
    with pytest.raises(ValueError, match="unknown Linear layer"):
        eph.meprop(model, 2, layers=["fc7"])


# ----------------------------------------------------------------------------------------------------- MoE
def test_moe_routes_each_token_to_k_experts_and_matches_dense_oracle():
    torch.manual_seed(0)
    layer = moe.TopKMoE(6, num_experts=5, k=2, hidden=4, out_dim=3)
    layer.eval()
    x = torch.randn(30, 6)
    out = layer(x)
    experts, gates = layer.last_experts, layer.last_gates
    assert experts.shape == (30, 2) and (experts[:, 0] != experts[:, 1]).all()
    assert torch.allclose(gates.sum(1), torch.ones(30))
    scores = layer.router(x)
    top = scores.topk(2, dim=1)
    assert torch.equal(experts, top.indices)
    oracle = torch.zeros(30, 3)
    all_out = torch.stack([e(x) for e in layer.experts], 1)       # every expert on every token
    probs = torch.softmax(top.values, 1)
    for j in range(2):
        oracle += probs[:, j:j + 1] * all_out[torch.arange(30), top.indices[:, j]]
    assert torch.allclose(out, oracle, atol=1e-6)
    assert layer.last_load.sum() == 60 and layer.last_load.tolist() == \
        [int((experts == e).sum()) for e in range(5)]
    p = torch.softmax(scores, 1).mean(0).detach()
    f = layer.last_load.float() / 60
    assert layer.balance_loss.detach().item() == pytest.approx(5 * float((f * p).sum()), rel=1e-5)


def test_moe_expert_gets_no_gradient_from_tokens_it_did_not_process():
    torch.manual_seed(1)
    layer = moe.TopKMoE(4, num_experts=6, k=1, hidden=5)
    layer.train()                                       # noisy routing
    x = torch.randn(12, 4)
    out = layer(x)
    chosen = int(layer.last_experts[0, 0])
    out[0].sum().backward()                             # the loss of token 0 only
    for e, expert in enumerate(layer.experts):
        grads = [p.grad for p in expert.parameters()]
        if e == chosen:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None or (g == 0).all() for g in grads)


def test_moe_switch_and_validation():
    layer = moe.TopKMoE(4, num_experts=3, k=1, hidden=2, noisy=False)
    assert layer(torch.randn(5, 4)).shape == (5, 4) and layer.last_experts.shape == (5, 1)
    cost = layer.cost()
    assert cost["expert_parameters"] == 4 * 2 + 2 + 2 * 4 + 4
    assert cost["macs_per_token"] == 4 * 3 + (4 * 2 + 2 * 4)
    assert cost["dense_macs_per_token"] == 4 * 3 + 3 * (4 * 2 + 2 * 4)
    for k in (0, 4, 1.0, True):
        with pytest.raises(ValueError, match="k must"):
            moe.TopKMoE(4, num_experts=3, k=k)
    with pytest.raises(ValueError, match="coefficient"):
        moe.balance_penalty(-1.0)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(5, 3))
    assert moe.load_imbalance([2, 2, 2]) == 1.0 and moe.load_imbalance([6, 0, 0]) == 3.0


def test_balance_penalty_in_fit_and_expert_load():
    task = sl.data.teacher_student(n_train=64, n_test=32, in_features=8, hidden=4, seed=0)
    torch.manual_seed(0)
    model = moe.MoEClassifier(8, task.num_classes, dim=6, num_experts=4, k=2, hidden=5)
    penalty = moe.balance_penalty(0.01)
    history = sl.train.fit(model, task, epochs=1, batch_size=32, penalty=penalty, progress=False)
    assert math.isfinite(history[-1]["train_loss"])
    load = moe.expert_load(model, task.x_test)
    assert int(load.sum()) == 2 * task.n_test and model.training


# ------------------------------------------------------------------------------------------------- runners
def test_runs_return_records():
    task = sl.data.teacher_student(n_train=64, n_test=32, in_features=8, hidden=4, seed=0)
    records = sl.ephemeral_runs.grid(task, [{}, {"gradient": ("topk", 0.1, True)}, {"dropout": ("targeted", 0.5, 0.5)},
                                            {"activation": ("l1", 0.1)}, {"meprop": 2}], [0], epochs=2,
                                     hidden=(8,), prune_sparsities=(0.0, 0.5))
    assert [r["label"] for r in records] == ["dense", "topk 10% EF", "targeted 0.5 0.5", "l1 0.1", "meprop k=2"]
    assert records[1]["bits"]["dense"] > records[1]["bits"]["coo"] and len(records[0]["test_acc"]) == 2
    assert set(records[2]["pruned"]) == {0.0, 0.5} and records[2]["pruned"][0.0] == records[2]["accuracy"]
    assert 0 <= records[3]["activation_trained_all"] <= 1
    with pytest.raises(ValueError, match="unknown setting"):
        sl.ephemeral_runs.run(task, {"gradients": ("topk", 0.1, True)}, 0)
