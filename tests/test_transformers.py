"""Issue 10 item 4: the standard transformer layers are first-class.

One test (or group) per sub-item: (1) ``nn.MultiheadAttention``'s in-projection is prunable by its dense name and
every mask function honours it, the masked attention computing what a dense one with ``W * M`` computes (fast and
slow path); (2) ``plumbing.attention_math`` equals PyTorch's attention and lets input-hook methods see ``out_proj``
and the in-projection's input (cross-attention refused, naming the layer); (3) GraSP and OBD take second
derivatives through attention; (4) every registered ``sl.prune`` method on an ``nn.TransformerEncoder`` either
prunes every weight matrix to the reported sparsity or refuses clearly, leaving the model unchanged.
"""

import copy
import io

import pytest
import torch
from torch import nn

import sparsity_lib as sl
from sparsity_lib.plumbing import attention_math, capture_inputs, batches
from test_reliability import assert_unchanged, snapshot


def encoder(seed=0, layers=1):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False)


def classifier(seed=0, layers=2):
    return nn.Sequential(encoder(seed, layers), nn.Flatten(), nn.Linear(40, 3))


def token_data(seed=0, n=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 5, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(n)]


def random_masks(model, density=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(w.shape, generator=g) < density for n, w in sl.prunable(model).items()}


def no_math_left(model):
    return all("forward" not in m.__dict__ for m in model.modules() if isinstance(m, nn.MultiheadAttention))


# ------------------------------------------------------------------- 1: the in-projection is a prunable weight
def test_in_projection_is_prunable_by_its_dense_name():
    names = list(sl.prunable(encoder(layers=2)))
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in
                     ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")]
    separate = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert list(sl.prunable(separate)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    every_matrix = {n for n, p in encoder().named_parameters() if p.dim() >= 2}
    assert set(sl.prunable(encoder())) == every_matrix


@pytest.mark.parametrize("kind", ["stacked", "separate"])
def test_masks_on_attention_round_trip(kind):
    model = encoder() if kind == "stacked" else nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
    masks = random_masks(model)
    sl.apply_masks(model, masks)
    got = sl.get_masks(model)
    assert got.keys() == masks.keys() and all(torch.equal(got[n], masks[n]) for n in masks)
    zeros = sum(int((~m).sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert sl.sparsity(model) == zeros / total
    report = sl.sparsity_report(model)
    for n, m in masks.items():
        assert report.loc[n, "nonzeros"] == int(m.sum())
    for n, w in sl.prunable(model).items():   # the effective weights are zero where masked
        assert torch.equal(w != 0, masks[n] & (w != 0)) and not bool(w[~masks[n]].any())
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh = encoder(seed=1) if kind == "stacked" else nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=True)
    sl.apply_masks(fresh, {n: torch.ones_like(m) for n, m in masks.items()})
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    for other in (clone, fresh):
        assert all(torch.equal(sl.get_masks(other)[n], masks[n]) for n in masks)
    dense_keys = list(encoder().state_dict()) if kind == "stacked" else \
        list(nn.MultiheadAttention(8, 2, kdim=4, vdim=6).state_dict())
    sl.remove_masks(clone)
    assert list(clone.state_dict()) == dense_keys, "remove_masks gives back the dense keys, in order"
    assert all(torch.equal(sl.prunable(clone)[n] == 0, sl.prunable(model)[n] == 0) for n in masks)
    assert sl.masks.is_masked(model) and not sl.masks.is_masked(clone)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("grad", [True, False])
def test_masked_attention_equals_dense_attention_with_masked_weight(batch_first, training, need_weights, grad):
    """Independent oracle: a plain nn.MultiheadAttention whose in_proj_weight is W * M. In eval mode without
    gradients and with need_weights=False, PyTorch takes its fused fast path (both models alike)."""
    torch.manual_seed(0)
    masked = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    dense = copy.deepcopy(masked)
    masks = random_masks(masked)
    sl.apply_masks(masked, masks)
    with torch.no_grad():
        dense.in_proj_weight.mul_(masks["in_proj_weight"])
        dense.out_proj.weight.mul_(masks["out_proj.weight"])
    x = torch.randn(3, 5, 8) if batch_first else torch.randn(5, 3, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    for model in (masked, dense):
        model.train(training)
    with torch.set_grad_enabled(grad):
        for kwargs in ({}, {"key_padding_mask": padding}):
            out, weights = masked(x, x, x, need_weights=need_weights, **kwargs)
            ref, ref_weights = dense(x, x, x, need_weights=need_weights, **kwargs)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
            if need_weights:
                torch.testing.assert_close(weights, ref_weights, rtol=0, atol=1e-6)


def test_pruning_an_encoder_counts_every_weight_matrix():
    model = encoder(layers=2)
    sl.prune(model, 0.7, scope="layerwise")
    for name, p in model.named_parameters():
        if "original" in name:
            assert p.dim() == 2
    matrices = [w for w in sl.prunable(model).values()]
    assert len(matrices) == 8
    for w in matrices:
        assert float((w == 0).float().mean()) == pytest.approx(0.7, abs=0.01)


# --------------------------------------------------- 2: the math attention path and input-hook methods
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("options", [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 4, "vdim": 6},
                                     {"bias": False}])
def test_attention_math_equals_pytorch(batch_first, options):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, **options)
    sl.apply_masks(mha, random_masks(mha))
    shape = (3, 5) if batch_first else (5, 3)
    x = torch.randn(*shape, 8)
    k = torch.randn(*shape, options.get("kdim", 8)) if "kdim" in options else x
    v = torch.randn(*shape, options.get("vdim", 8)) if "vdim" in options else x
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[1, -2:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    cases = [{}, {"key_padding_mask": padding}, {"attn_mask": causal}, {"attn_mask": torch.randn(5, 5)},
             {"attn_mask": causal, "key_padding_mask": padding}, {"average_attn_weights": False},
             {"attn_mask": torch.randn(6, 5, 5)}]
    for training in (True, False):
        mha.train(training)
        for grad in (True, False):
            with torch.set_grad_enabled(grad):
                for kwargs in cases:
                    for need in (True, False):
                        ref = mha(x, k, v, need_weights=need, **kwargs)
                        with attention_math(mha):
                            got = mha(x, k, v, need_weights=need, **kwargs)
                        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-6)
                        if need:
                            torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-6)
    unbatched = x[0] if batch_first else x[:, 0]
    with attention_math(mha):
        got = mha(unbatched, unbatched, unbatched) if "kdim" not in options else None
    if got is not None:
        torch.testing.assert_close(got[0], mha(unbatched, unbatched, unbatched)[0], rtol=0, atol=1e-6)
    assert no_math_left(mha) and torch.backends.mha.get_fastpath_enabled()


def test_capture_inputs_sees_out_proj_and_the_in_projection_input():
    model = encoder()
    attn = model.layers[0].self_attn
    modules = {n: m for n, m in sl.masks._prunable_modules(model).items() if "self_attn" in n}
    seen = {}
    capture_inputs(model, modules, batches(token_data()[0], model), lambda n, m, x: seen.setdefault(n, x))
    x = token_data()[0][0]
    # independent: the in-projection multiplies the encoder layer's input; out_proj multiplies the concatenated
    # heads, recomputed here from softmax(Q K^T / sqrt(d)) V
    torch.testing.assert_close(seen["layers.0.self_attn.in_proj_weight"], x)
    with torch.no_grad():
        q, k, v = torch.nn.functional.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads = lambda t: t.reshape(6, 5, 2, 4).transpose(1, 2)   # noqa: E731
        att = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / 2.0, dim=-1) @ heads(v)
    # (the math path runs attention sequence-first, as F.multi_head_attention_forward does)
    torch.testing.assert_close(seen["layers.0.self_attn.out_proj.weight"],
                               att.transpose(1, 2).reshape(6, 5, 8).transpose(0, 1), rtol=0, atol=1e-6)
    assert no_math_left(model)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "obc", "apoz", "mean_activation"])
def test_input_hook_methods_prune_every_attention_matrix(method):
    model = classifier(layers=1)
    sl.prune(model, 0.5, method, scope="layerwise", data=token_data(), loss_fn=nn.functional.cross_entropy,
             **({"structure": "neuron"} if method in ("apoz", "mean_activation") else {}))
    for name in ("0.layers.0.self_attn.in_proj_weight", "0.layers.0.self_attn.out_proj.weight"):
        w = sl.prunable(model)[name]
        assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.05), name
    assert no_math_left(model)


def cross_attention_model():
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, 2 * x, 2 * x)[0]

    return Cross()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "obc", "apoz"])
def test_cross_attention_in_projection_is_refused_naming_the_layer(method):
    model = cross_attention_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"attn\.in_proj_weight.*cross-attention"):
        sl.prune(model, 0.5, method, scope="layerwise", data=token_data(), loss_fn=lambda out, y: out.sum())
    assert_unchanged(before, model)
    assert no_math_left(model)
    # leaving it out works, and the out_proj is pruned from its captured input
    sl.prune(model, 0.5, "sparsegpt", scope="layerwise", data=token_data(), exclude=["attn.in_proj_weight"])
    assert float((model.attn.out_proj.weight == 0).float().mean()) == 0.5


# --------------------------------------------------------------- 3: second derivatives through attention
@pytest.mark.parametrize("method", ["grasp", "obd"])
def test_second_order_methods_run_through_attention(method):
    model = classifier(layers=1)
    sl.prune(model, 0.5, method, data=token_data(), loss_fn=nn.functional.cross_entropy)
    assert sl.sparsity(model) == pytest.approx(0.5, abs=1e-3)
    assert no_math_left(model) and torch.backends.mha.get_fastpath_enabled()


def test_obd_curvature_through_attention_matches_finite_differences():
    """The OBD diagonal of in_proj_weight (through the math path) against central differences of the loss."""
    model = classifier(layers=1).double()
    x, y = token_data()[0]
    x = x.double()
    scores = sl.obs.obd(model, data=[(x, y)], loss_fn=nn.functional.cross_entropy)
    name = "0.layers.0.self_attn.in_proj_weight"
    w = sl.prunable(model)[name]
    attn = model[0].layers[0].self_attn
    eps = 1e-4
    model.eval()
    with torch.no_grad():
        for (i, j) in [(0, 0), (9, 3), (20, 7)]:
            base = float(nn.functional.cross_entropy(model(x), y))
            old = float(attn.in_proj_weight[i, j])
            attn.in_proj_weight[i, j] = old + eps
            plus = float(nn.functional.cross_entropy(model(x), y))
            attn.in_proj_weight[i, j] = old - eps
            minus = float(nn.functional.cross_entropy(model(x), y))
            attn.in_proj_weight[i, j] = old
            h = (plus - 2 * base + minus) / eps ** 2
            assert float(scores[name][i, j].detach()) == pytest.approx(0.5 * h * old ** 2, rel=1e-3, abs=1e-9)
    assert float(w.abs().sum()) > 0


# ------------------------------------------------------------- 4: every registered sl.prune method
def prune_methods():
    cat = sl.catalogue()
    return list(cat[cat.kind.isin(["score", "pruner"])].name)


EXTRA = {"synflow": {"input_shape": (5, 8)}}


@pytest.mark.parametrize("method", prune_methods())
def test_every_method_prunes_every_matrix_of_an_encoder_or_refuses(method):
    model = classifier(layers=2)
    before = snapshot(model)
    try:
        returned = sl.prune(model, 0.5, method, data=token_data(), loss_fn=nn.functional.cross_entropy,
                            **EXTRA.get(method, {}))
    except ValueError as error:
        assert str(error), method
        assert_unchanged(before, model)
        assert no_math_left(model)
        return
    masks = sl.get_masks(model)
    weights = sl.prunable(model)
    assert len(weights) == 9 and all(n in masks for n in weights)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    matrices = [p for n, p in model.named_parameters() if p.dim() >= 2]
    assert total == sum(p.numel() for p in matrices), "every weight matrix is prunable"
    assert sl.sparsity(model) == zeros / total
    assert sl.sparsity(model) == pytest.approx(0.5, abs=0.01)
    for n, w in weights.items():
        assert torch.equal(masks[n], w != 0) or not bool(w[~masks[n]].any()), n
        assert torch.equal(returned[n], masks[n]) if n in returned else True
    assert no_math_left(model)


@pytest.mark.parametrize("training", [True, False])
def test_masked_encoder_equals_dense_encoder_with_masked_weights(training):
    """The whole encoder layer, whose eval-mode no-grad forward is PyTorch's fused fast path
    (torch._transformer_encoder_layer_fwd), against a dense copy holding W * M."""
    masked = encoder(layers=2)
    dense = copy.deepcopy(masked)
    masks = random_masks(masked, density=0.4)
    sl.apply_masks(masked, masks)
    with torch.no_grad():
        for name, w in sl.prunable(dense).items():
            w.mul_(masks[name])
    x = torch.randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[2, -1] = True
    for model in (masked, dense):
        model.train(training)
    with torch.no_grad():
        for kwargs in ({}, {"src_key_padding_mask": padding}):
            torch.testing.assert_close(masked(x, **kwargs), dense(x, **kwargs), rtol=0, atol=1e-6)
    out = masked(x)
    out.sum().backward()
    grad = masked.layers[0].self_attn.parametrizations.in_proj_weight.original.grad
    assert grad is not None and not bool(grad[~masks["layers.0.self_attn.in_proj_weight"]].any())


def test_bn_scale_refuses_an_encoder_without_batch_norm_naming_the_layers():
    model = classifier(layers=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"method 'bn_scale' cannot score the layers \[.*in_proj_weight.*\].*exclude="):
        sl.prune(model, 0.5, "bn_scale", structure="neuron")
    assert_unchanged(before, model)


def test_bn_scale_refuses_an_untraceable_model_naming_the_alternatives():
    """nn.TransformerEncoder's forward cannot be traced by torch.fx, which bn_scale needs to find the batch norm
    after each layer: a clear ValueError naming the scores that need no trace, and the model unchanged."""
    model = encoder(layers=1)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"method 'bn_scale'.*cannot be traced.*'l1_filter'.*'taylor_channel'"):
        sl.prune(model, 0.5, "bn_scale", structure="neuron")
    assert_unchanged(before, model)
