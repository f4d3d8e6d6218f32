"""Score criteria of Chapters 05 and 08 against closed forms and independent oracles.

Activation criteria (APoZ, mean |a|, output sensitivity), first-order (Taylor, movement, Wanda), pruning at
initialization (SNIP, GraSP, SynFlow), the neuron oracle, and the promise that scoring never changes the model.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib.select import global_masks


def make_data(n_batches=3, batch=16, d_in=16, classes=5, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, d_in, generator=g, dtype=dtype), torch.randint(0, classes, (batch,), generator=g))
            for _ in range(n_batches)]


def grads_by_hand(model, x, y, params):
    """Plain .backward() on a copy: the gradient of the mean cross-entropy w.r.t. the given parameter names."""
    model = copy.deepcopy(model)
    named = dict(model.named_parameters())
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: named[n].grad.detach().clone() for n in params}


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ SNIP
def test_snip_is_abs_grad_times_weight_on_one_batch(mlp):
    data = make_data()
    names = ["0.weight", "2.weight", "4.weight"]
    g = grads_by_hand(mlp, *data[0], names)  # the paper's single batch: only the first one is used
    by_hand = {n: (g[n] * dict(mlp.named_parameters())[n].detach()).abs() for n in names}
    raw = sl.scores.snip(mlp, data, normalize=False)
    for n in names:
        torch.testing.assert_close(raw[n], by_hand[n], rtol=1e-5, atol=1e-9)
    normalized = sl.scores.snip(mlp, data)
    total = sum(float(v.sum()) for v in by_hand.values())
    for n in names:
        torch.testing.assert_close(normalized[n], by_hand[n] / total, rtol=1e-5, atol=1e-12)
    # num_batches=None: the gradient of the loss over all batches (equal sizes: the mean of the gradients)
    every = [grads_by_hand(mlp, x, y, names) for x, y in data]
    all_batches = sl.scores.snip(mlp, data, num_batches=None, normalize=False)
    for n in names:
        mean_g = sum(e[n] for e in every) / len(every)
        torch.testing.assert_close(all_batches[n], (mean_g * dict(mlp.named_parameters())[n]).abs(), rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------------------------------ Taylor
def test_taylor_is_accumulated_squared_grad_times_weight(mlp):
    data = make_data()
    names = ["0.weight", "2.weight", "4.weight"]
    params = dict(mlp.named_parameters())
    every = [grads_by_hand(mlp, x, y, names + ["0.bias", "2.bias", "4.bias"]) for x, y in data]
    per_weight = sl.scores.taylor(mlp, data)
    per_neuron = sl.scores.taylor_per_neuron(mlp, data)
    weights_only = sl.scores.taylor_per_neuron(mlp, data, include_bias=False)
    for n in names:
        expected = sum((e[n] * params[n]) ** 2 for e in every) / len(every)
        torch.testing.assert_close(per_weight[n], expected, rtol=1e-4, atol=1e-12)
        b = n.replace("weight", "bias")
        # Molchanov 2019 eq. 7: the square of the *sum* over the neuron, not the sum of squares
        group = [(e[n] * params[n]).sum(1) + e[b] * params[b] for e in every]
        torch.testing.assert_close(per_neuron[n], sum(c ** 2 for c in group) / len(every), rtol=1e-4, atol=1e-12)
        group_w = [(e[n] * params[n]).sum(1) for e in every]
        torch.testing.assert_close(weights_only[n], sum(c ** 2 for c in group_w) / len(every), rtol=1e-4, atol=1e-12)
    broadcast = sl.scores.taylor_neuron(mlp, data)
    for n in names:
        assert torch.equal(broadcast[n], per_neuron[n][:, None].expand_as(params[n]))


# ------------------------------------------------------------------------------------------ GraSP
def _grasp_oracle(model, x, y, temperature):
    """-theta * (H g) from the explicit Hessian of the loss w.r.t. the (flattened) weights."""
    names = [n for n, _ in model.named_parameters() if n.endswith("weight")]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(flat):
        chunks, i = {}, 0
        for n, s in zip(names, shapes):
            chunks[n] = flat[i:i + s.numel()].reshape(s)
            i += s.numel()
        full = {k: v.detach() for k, v in params.items()} | chunks
        return F.cross_entropy(torch.func.functional_call(model, full, (x,)) / temperature, y)

    g = torch.autograd.functional.jacobian(loss, theta)
    hessian = torch.autograd.functional.hessian(loss, theta)
    s = -theta * (hessian @ g)
    out, i = {}, 0
    for n, sh in zip(names, shapes):
        out[n] = s[i:i + sh.numel()].reshape(sh)
        i += sh.numel()
    return out


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_grasp_removes_what_the_paper_removes(temperature):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 4, (12,))
    S = _grasp_oracle(model, x, y, temperature)  # the paper's score: remove the LARGEST -theta*Hg
    keep = sl.scores.grasp(model, (x, y), temperature=temperature)
    for n in S:
        torch.testing.assert_close(keep[n], -S[n], rtol=1e-6, atol=1e-14)
    flat = torch.cat([S[n].reshape(-1) for n in S])
    k = flat.numel() // 2
    paper_removed = torch.zeros(flat.numel(), dtype=torch.bool)
    paper_removed[torch.topk(flat, k).indices] = True

    pruned = copy.deepcopy(model)
    masks = sl.prune(pruned, k / flat.numel(), method="grasp", data=[(x, y)], temperature=temperature)
    removed = torch.cat([~masks[n].reshape(-1) for n in S])
    assert torch.equal(removed, paper_removed)
    # the inverted rule keeps exactly what GraSP removes
    inverted = copy.deepcopy(model)
    masks = sl.prune(inverted, k / flat.numel(), method="grasp", data=[(x, y)], temperature=temperature, invert=True)
    kept = torch.cat([masks[n].reshape(-1) for n in S])
    assert torch.equal(kept, paper_removed)


# ------------------------------------------------------------------------------------------ SynFlow
def test_synflow_two_layer_closed_form_and_conservation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5, bias=False), nn.ReLU(), nn.Linear(5, 3, bias=False))
    w1, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    scores = sl.scores.synflow(model, (7,))
    torch.testing.assert_close(scores["0.weight"], w1.abs() * w2.abs().sum(0)[:, None])
    torch.testing.assert_close(scores["2.weight"], w2.abs() * w1.abs().sum(1)[None, :])
    flow = float((w2.abs() @ w1.abs()).sum())
    for s in scores.values():  # every layer carries the whole flow R
        assert float(s.sum()) == pytest.approx(flow, rel=1e-12)
    normalized = sl.scores.synflow(model, (7,), normalize=True)
    assert float(normalized["0.weight"].sum()) == pytest.approx(1.0, rel=1e-12)
    # biases are zeroed for scoring: the same scores with biases present
    with_bias = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        with_bias[0].weight.copy_(model[0].weight)
        with_bias[2].weight.copy_(model[2].weight)
    for n, s in sl.scores.synflow(with_bias, (7,)).items():
        torch.testing.assert_close(s, scores[n])


def test_biases_cannot_make_a_disconnected_network_look_alive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    sl.apply_masks(model, {"0.weight": torch.zeros(4, 6, dtype=torch.bool)})  # cut the first layer
    info = sl.scores.layer_connectivity(model, (6,))
    assert info["connected"] is False and info["flow"] == 0.0
    assert info["alive_neurons"] == {"0.weight": 0, "2.weight": 0}
    assert all(float(s.abs().sum()) == 0.0 for s in sl.scores.synflow(model, (6,)).values())
    assert model[0].bias.detach().eq(1.0).all(), "the model itself keeps its biases"
    dense = sl.scores.layer_connectivity(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)), (6,))
    assert dense["connected"] and dense["alive_neurons"] == {"0.weight": 4, "2.weight": 3}


def test_synflow_one_round_is_one_shot_global_selection_on_the_closed_form():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(9, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    w1, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    closed = {"0.weight": w1.abs() * w2.abs().sum(0)[:, None], "2.weight": w2.abs() * w1.abs().sum(1)[None, :]}
    current = {n: torch.ones_like(s, dtype=torch.bool) for n, s in closed.items()}
    expected = global_masks(closed, current, 0.7)
    before = state(model)
    masks = sl.prune(copy.deepcopy(model), 0.7, method="synflow", input_shape=(9,), rounds=1)
    for n in closed:
        assert torch.equal(masks[n], expected[n])
    assert_same_state(before, state(model))


def collapse_net(seed):
    """Deep, thin, bias-free: a wide first layer (small init weights, 1000 * 20) before four 20-wide layers."""
    torch.manual_seed(seed)
    layers = [nn.Linear(1000, 20, bias=False), nn.ReLU()]
    for _ in range(3):
        layers += [nn.Linear(20, 20, bias=False), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(20, 10, bias=False))


@pytest.mark.parametrize("seed", [0, 1])
def test_iterative_synflow_avoids_the_layer_collapse_of_magnitude_at_init(seed):
    model = collapse_net(seed)
    magnitude = copy.deepcopy(model)
    sl.prune(magnitude, 0.99, method="magnitude")
    # the first layer's weights (|w| < 1/sqrt(1000)) are all smaller than most of the others': it dies
    assert int(sl.prunable(magnitude)["0.weight"].count_nonzero()) == 0
    assert not sl.scores.layer_connectivity(magnitude, (1000,))["connected"]

    synflow = copy.deepcopy(model)
    sl.prune(synflow, 0.99, method="synflow", input_shape=(1000,), rounds=100)
    assert sl.sparsity(synflow) == pytest.approx(0.99, abs=1e-4)
    info = sl.scores.layer_connectivity(synflow, (1000,))
    assert info["connected"] and info["flow"] > 0
    assert all(v >= 1 for v in info["alive_neurons"].values())


# ------------------------------------------------------------------------------------------ Wanda
def test_wanda_score_and_per_row_selection(mlp):
    data = make_data()
    scores = sl.scores.wanda(mlp, data)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        inputs = {"0.weight": x, "2.weight": F.relu(mlp[0](x)), "4.weight": F.relu(mlp[2](F.relu(mlp[0](x))))}
    for n, w in sl.prunable(mlp).items():
        torch.testing.assert_close(scores[n], w.detach().abs() * inputs[n].norm(dim=0)[None, :], rtol=1e-5, atol=1e-8)

    pruned = copy.deepcopy(mlp)
    masks = sl.prune(pruned, 0.75, method="wanda", data=data)
    for n, m in masks.items():
        fan_in = m.shape[1]
        kept = m.sum(1)
        assert (kept == fan_in - round(0.75 * fan_in)).all(), "every row keeps the same number of weights"
        by_hand = torch.zeros_like(m)
        by_hand.scatter_(1, torch.topk(scores[n], int(kept[0]), dim=1).indices, True)
        assert torch.equal(m, by_hand)
    assert sl.sparsity(pruned) == pytest.approx(0.75, abs=0.01)
    # a global magnitude-like ranking would not give equal rows: the score is compared within rows only
    unrestricted = global_masks(scores, {n: torch.ones_like(m) for n, m in masks.items()}, 0.75)
    assert any(len(set(m.sum(1).tolist())) > 1 for m in unrestricted.values())
    # N:M through the standard selection
    nm = sl.prune(copy.deepcopy(mlp), 0.5, method="wanda", data=data, structure=(2, 4))
    for m in nm.values():
        assert (m.reshape(m.shape[0], -1, 4).sum(-1) == 2).all()


def test_wanda_conv_input_norms_by_explicit_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 2))
    x = torch.randn(2, 4, 5, 5)
    padded = F.pad(x, (1, 1, 1, 1))
    sq = torch.zeros(4, 3, 3, dtype=torch.float64)
    for i in range(3):  # output positions (stride 2, padding 1 on a 5x5 input -> 3x3)
        for j in range(3):
            sq += padded[:, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].double().pow(2).sum(0)
    norms = sq.sqrt().float()  # (in_channels, kh, kw)
    w = conv.weight.detach()
    expected = torch.empty_like(w)
    for o in range(6):
        group = o // 3
        expected[o] = w[o].abs() * norms[2 * group:2 * group + 2]
    torch.testing.assert_close(sl.scores.wanda(model, x)["0.weight"], expected, rtol=1e-5, atol=1e-7)


def test_wanda_rejects_conv3d():
    model = nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Conv3d"):
        sl.scores.wanda(model, torch.randn(1, 1, 2, 2, 2))


# ------------------------------------------------------------------------------------------ activations
def test_activation_statistics_and_output_sensitivity_closed_forms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    data = make_data(n_batches=2, batch=20, d_in=6, classes=3)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        z = model[0](x)
    stats = sl.scores.activation_statistics(model, data)["0.weight"]
    torch.testing.assert_close(stats["apoz"], (z <= 0).float().mean(0))
    torch.testing.assert_close(stats["mean_abs"], F.relu(z).mean(0))
    identity = sl.scores.activation_statistics(model, data, activation=None)["0.weight"]
    torch.testing.assert_close(identity["mean_abs"], z.abs().mean(0))
    # f = W2 relu(z) + b2: d f_k / d z_j = W2_kj [z_j > 0], so S_j^2 = mean_n [z_nj > 0] * mean_k W2_kj^2
    w2 = model[2].weight.detach()
    expected = ((z > 0).float().mean(0) * w2.pow(2).mean(0)).sqrt()
    torch.testing.assert_close(sl.scores.output_sensitivity_per_neuron(model, data)["0.weight"], expected)
    keep = sl.scores.apoz(model, data)
    torch.testing.assert_close(keep["0.weight"], (1 - (z <= 0).float().mean(0))[:, None].expand(8, 6))
    assert torch.equal(sl.scores.neuron_scores(model, "apoz", data)["0.weight"], 1 - stats["apoz"])


@pytest.mark.parametrize("method", ["apoz", "mean_activation", "output_sensitivity", "taylor_neuron"])
def test_neuron_scores_with_structure_neuron_remove_whole_rows(mlp, method):
    data = make_data()
    criterion = "taylor" if method == "taylor_neuron" else method
    per_neuron = sl.scores.neuron_scores(mlp, criterion, data)
    masks = sl.prune(mlp, 0.5, method=method, data=data, structure="neuron", scope="layerwise", exclude=["4.weight"])
    for n in ["0.weight", "2.weight"]:
        rows = masks[n]
        assert ((rows.all(1)) | (~rows.any(1))).all(), "whole rows are kept or removed"
        removed = ~rows.all(1)
        assert int(removed.sum()) == round(0.5 * rows.shape[0])
        assert per_neuron[n][removed].max() <= per_neuron[n][~removed].min()
    assert masks["4.weight"].all()


def test_oracle_equals_brute_force_removal(mlp):
    data = make_data()
    loss = lambda m: sum(F.cross_entropy(m(x), y).item() * len(x) for x, y in data) / sum(len(x) for x, _ in data)
    base = loss(mlp)
    for layer, module in [("0.weight", mlp[0]), ("2.weight", mlp[2])]:
        brute = []
        for j in range(module.out_features):
            w, b = module.weight.detach().clone(), module.bias.detach().clone()
            with torch.no_grad():
                module.weight[j] = 0
                module.bias[j] = 0
            brute.append(loss(mlp) - base)
            with torch.no_grad():
                module.weight.copy_(w)
                module.bias.copy_(b)
        fast = sl.scores.oracle_neuron_loss_increase(mlp, layer, data, max_batch=64)  # several chunks
        torch.testing.assert_close(fast, torch.tensor(brute), rtol=1e-4, atol=1e-6)


def test_oracle_on_a_convolution_zeroes_channels(cnn):
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 4, (4,))
    fast = sl.scores.oracle_neuron_loss_increase(cnn, "0.weight", [(x, y)])
    base = F.cross_entropy(cnn(x), y).item()
    for j in [0, 5]:
        other = copy.deepcopy(cnn)
        with torch.no_grad():
            other[0].weight[j] = 0
            other[0].bias[j] = 0
        assert float(fast[j]) == pytest.approx(F.cross_entropy(other(x), y).item() - base, abs=1e-5)


# ------------------------------------------------------------------------------------------ movement
def test_movement_accumulates_minus_grad_times_weight_before_the_step(mlp):
    data = make_data(n_batches=4)
    ms = sl.scores.MovementScore(mlp)
    opt = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    expected = {n: torch.zeros_like(w) for n, w in sl.prunable(mlp).items()}
    modules = dict(mlp.named_modules())
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(mlp(x), y).backward()
        for n, w in sl.prunable(mlp).items():
            expected[n] -= modules[n.rsplit(".", 1)[0]].weight.grad * w.detach()  # weight before the step
        ms.step()  # between backward and optimizer.step()
        opt.step()
    got = ms.scores()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-7)
    assert ms.steps == 4
    masks = sl.prune(mlp, 0.8, method="movement", movement=ms)
    flat_scores = torch.cat([got[n].reshape(-1) for n in got])
    flat_masks = torch.cat([masks[n].reshape(-1) for n in got])
    assert flat_scores[~flat_masks].max() <= flat_scores[flat_masks].min()
    with pytest.raises(ValueError, match="MovementScore"):
        sl.prune(copy.deepcopy(mlp), 0.5, method="movement")
    with pytest.raises(ValueError, match="another model"):
        sl.prune(copy.deepcopy(mlp), 0.5, method="movement", movement=ms)
    with pytest.raises(RuntimeError, match="no gradients"):
        sl.scores.MovementScore(nn.Sequential(nn.Linear(2, 2))).step()


def test_movement_as_a_callback_of_the_training_loop():
    task = sl.data.teacher_student(n_train=96, n_test=32, in_features=16, hidden=8, num_classes=5, seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    replay = copy.deepcopy(model)
    ms = sl.scores.MovementScore(model)
    sl.train.fit(model, task, epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.0,
                 lr_schedule="constant", callbacks=[ms], progress=False, seed=0)
    assert ms.steps == 6
    # replay the same SGD steps by hand (same batch order: the loop's generator is seeded with seed=0)
    generator = torch.Generator().manual_seed(0)
    expected = {n: torch.zeros_like(w) for n, w in sl.prunable(replay).items()}
    for _ in range(2):
        for x, y in task.batches(32, generator=generator):
            replay.zero_grad()
            F.cross_entropy(replay(x), y).backward()
            with torch.no_grad():
                for n, w in sl.prunable(replay).items():
                    expected[n] -= dict(replay.named_parameters())[n].grad * w
                for p in replay.parameters():
                    p -= 0.05 * p.grad
    for n, s in ms.scores().items():
        torch.testing.assert_close(s, expected[n], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------ the model is unchanged
def bn_dropout_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 5))


SCORERS = {
    "taylor": lambda m, d: sl.scores.taylor(m, d),
    "taylor_per_neuron": lambda m, d: sl.scores.taylor_per_neuron(m, d),
    "snip": lambda m, d: sl.scores.snip(m, d),
    "grasp": lambda m, d: sl.scores.grasp(m, d),
    "wanda": lambda m, d: sl.scores.wanda(m, d),
    "apoz": lambda m, d: sl.scores.apoz(m, d),
    "mean_activation": lambda m, d: sl.scores.mean_activation(m, d),
    "output_sensitivity": lambda m, d: sl.scores.output_sensitivity(m, d),
    "oracle": lambda m, d: sl.scores.oracle_neuron_loss_increase(m, "0.weight", d),
    "synflow": lambda m, d: sl.scores.synflow(m, (16,)),
    "connectivity": lambda m, d: sl.scores.layer_connectivity(m, (16,)),
}


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_scoring_leaves_the_model_unchanged(name):
    model = bn_dropout_net()
    model.train()
    model[4].weight.requires_grad_(False)
    data = make_data()
    F.cross_entropy(model(data[0][0]), data[0][1]).backward()  # existing gradients must survive
    sl.apply_masks(model, {"0.weight": torch.rand(12, 16) > 0.3})
    before, grads = state(model), {n: (p.grad.clone() if p.grad is not None else None)
                                  for n, p in model.named_parameters()}
    SCORERS[name](model, data)
    assert_same_state(before, state(model))  # weights, masks and batch-norm running statistics
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    assert all(m.training for m in model.modules())
    assert model[4].weight.requires_grad is False


@pytest.mark.parametrize("method", ["apoz", "mean_activation", "output_sensitivity", "taylor", "taylor_neuron",
                                    "snip", "grasp", "wanda"])
def test_data_methods_without_data_raise_and_leave_the_model_alone(mlp, method):
    before = state(mlp)
    with pytest.raises(ValueError, match="data"):
        sl.prune(mlp, 0.5, method=method)
    assert_same_state(before, state(mlp))
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in mlp.modules())


def test_bad_arguments_name_the_argument(mlp):
    data = make_data()
    with pytest.raises(ValueError, match="input_shape"):
        sl.prune(mlp, 0.5, method="synflow")
    with pytest.raises(ValueError, match="input_shape"):
        sl.scores.synflow(mlp, (0, 3))
    with pytest.raises(ValueError, match="rounds"):
        sl.prune(mlp, 0.5, method="synflow", input_shape=(16,), rounds=0)
    with pytest.raises(ValueError, match="temperature"):
        sl.scores.grasp(mlp, data, temperature=0)
    with pytest.raises(ValueError, match="activation"):
        sl.scores.apoz(mlp, data, activation="swishy")
    with pytest.raises(ValueError, match="criterion"):
        sl.scores.neuron_scores(mlp, "entropy", data)
    with pytest.raises(ValueError, match="layer_name"):
        sl.scores.oracle_neuron_loss_increase(mlp, "9.weight", data)
    with pytest.raises(ValueError, match="num_batches"):
        sl.scores.taylor(mlp, data, num_batches=0)
    with pytest.raises(ValueError, match="targets"):
        sl.scores.taylor(mlp, [b[0] for b in data])
    with pytest.raises(TypeError, match="option"):
        sl.prune(mlp, 0.5, method="snip", data=data, tempurature=3)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in mlp.modules())
