"""sparsity_lib.attention: patterns against their definitions, head importance and pruning, the tiny transformer."""

import pytest
import torch
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib import attention as at


def _oracle(length, allowed):
    return torch.tensor([[bool(allowed(i, j)) for j in range(length)] for i in range(length)])


def test_patterns_match_their_definitions():
    L = 13
    assert torch.equal(at.local_window(L, 2), _oracle(L, lambda i, j: abs(i - j) <= 2))
    assert torch.equal(at.local_window(L, 2, causal=True), _oracle(L, lambda i, j: abs(i - j) <= 2 and j <= i))
    assert torch.equal(at.strided(L, 1, 4), _oracle(L, lambda i, j: abs(i - j) <= 1 or (i - j) % 4 == 0))
    g = (0, -1)
    assert torch.equal(at.global_window(L, 1, g),
                       _oracle(L, lambda i, j: abs(i - j) <= 1 or i in (0, L - 1) or j in (0, L - 1)))
    bb = at.bigbird(L, 1, (0,), num_random=3, seed=5)
    base = at.global_window(L, 1, (0,))
    assert (bb >= base).all()
    extra = bb & ~base
    assert ((bb.sum(1) - base.sum(1)) <= 3).all() and extra.any()
    assert torch.equal(bb, at.bigbird(L, 1, (0,), num_random=3, seed=5))
    assert at.full(L).all() and torch.equal(at.full(L, causal=True), _oracle(L, lambda i, j: j <= i))
    assert at.pattern_density(at.local_window(L, 2)) == pytest.approx(_oracle(L, lambda i, j: abs(i - j) <= 2).float().mean().item())


def test_topk_keeps_exactly_k_per_query():
    scores = torch.randn(2, 3, 7, 9)
    pattern = at.topk_pattern(scores, 4)
    assert (pattern.sum(-1) == 4).all()
    kept_min = scores.masked_fill(~pattern, float("inf")).min(-1).values
    dropped_max = scores.masked_fill(pattern, float("-inf")).max(-1).values
    assert (kept_min > dropped_max).all()


@pytest.mark.parametrize("call, needle", [
    (lambda: at.local_window(5, 0), "window"),
    (lambda: at.strided(5, 1, 0), "stride"),
    (lambda: at.topk_pattern(torch.randn(3, 4), 5), "k must"),
    (lambda: at.global_window(5, 1, (7,)), "global_tokens"),
    (lambda: sl.models.tiny_transformer(10, 2, 5, dim=30, num_heads=4), "num_heads must divide"),
])
def test_bad_input_is_refused(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def _model_and_tokens(seed=0):
    model = sl.models.tiny_transformer(20, 4, 9, dim=16, num_heads=4, num_layers=2, seed=seed).eval()
    tokens = torch.randint(0, 20, (5, 9), generator=torch.Generator().manual_seed(seed))
    return model, tokens


def _reference_attention(attn, x, allowed):
    """Dense attention written out per head, masked by ``allowed``."""
    n, L, d = x.shape
    out = torch.zeros(n, L, d)
    for h in range(attn.num_heads):
        sl_ = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
        q, k, v = attn.q(x)[..., sl_], attn.k(x)[..., sl_], attn.v(x)[..., sl_]
        s = q @ k.transpose(1, 2) / attn.head_dim ** 0.5
        s = s.masked_fill(~allowed, float("-inf"))
        out[..., sl_] = attn.head_gate[h] * torch.softmax(s, -1) @ v
    return attn.out(out)


def test_attention_with_pattern_matches_reference_and_full_equals_dense():
    model, tokens = _model_and_tokens()
    dense = model(tokens)
    at.set_pattern(model, at.full(9))
    torch.testing.assert_close(model(tokens), dense, rtol=0, atol=0)
    attn = model.blocks[0].attn
    x = torch.randn(3, 9, 16)
    pattern = at.bigbird(9, 1, (0,), 2, seed=1)
    attn.pattern = pattern
    torch.testing.assert_close(attn(x), _reference_attention(attn, x, pattern), atol=1e-5, rtol=1e-5)
    assert (attn.last_attention[..., ~pattern] == 0).all()
    attn.pattern, attn.topk = None, 3
    attn(x)
    assert ((attn.last_attention > 0).sum(-1) == 3).all()
    attn.topk = 10
    with pytest.raises(ValueError, match="topk"):
        attn(x)
    at.set_pattern(model, None, None)
    torch.testing.assert_close(model(tokens), dense)


def test_head_importance_is_mean_abs_gate_gradient():
    model, tokens = _model_and_tokens(1)
    y = torch.randint(0, 4, (5,))
    data = [(tokens[:3], y[:3]), (tokens[3:], y[3:])]
    imp = at.head_importance(model, data, normalize=False)
    # oracle: gates as leaf tensors, gradient per batch by autograd, weighted mean of |g|
    expected = {n: torch.zeros(4) for n in imp}
    for xb, yb in data:
        gates = []
        for attn in model.attentions():
            attn.head_gate = torch.ones(4, requires_grad=True)
            gates.append(attn.head_gate)
        grads = torch.autograd.grad(F.cross_entropy(model(xb), yb), gates)
        for n, g in zip(imp, grads):
            expected[n] += g.abs() * len(xb) / 5
    for attn in model.attentions():
        attn.head_gate = torch.ones(4)
    for n in imp:
        torch.testing.assert_close(imp[n], expected[n], atol=1e-6, rtol=1e-5)
    norm = at.head_importance(model, data)
    for n in norm:
        assert norm[n].norm().item() == pytest.approx(1.0)


def test_prune_heads_zeroes_the_least_important_globally():
    model, tokens = _model_and_tokens(2)
    importance = {"blocks.0.attn": torch.tensor([0.5, 0.1, 0.9, 0.3]), "blocks.1.attn": torch.tensor([0.2, 0.8, 0.05, 0.7])}
    gates = at.prune_heads(model, 3, importance)
    assert torch.equal(gates["blocks.0.attn"], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(gates["blocks.1.attn"], torch.tensor([0.0, 1.0, 0.0, 1.0]))
    # a pruned head's output is gone: zeroing its value rows changes nothing
    before = model(tokens)
    with torch.no_grad():
        model.blocks[0].attn.v.weight[4:8] = 0
        model.blocks[0].attn.v.bias[4:8] = 0
    torch.testing.assert_close(model(tokens), before)
    with pytest.raises(ValueError, match="num_heads"):
        at.prune_heads(model, 8, importance)


def test_head_importance_scores_work_with_sl_prune():
    model, tokens = _model_and_tokens(3)
    data = [(tokens, torch.randint(0, 4, (5,)))]
    scores = at.head_importance_scores(model, data)
    assert torch.isinf(scores["blocks.0.fc1.weight"]).all()
    q = scores["blocks.0.attn.q.weight"]
    assert torch.equal(q[0:4], q[0:1].expand(4, 16))
    assert "head_importance" in sl.scores.known_methods()


def test_transformer_layers_are_prunable_and_task_is_well_formed():
    task = sl.data.associative_recall(n_train=50, n_test=20, num_pairs=6, num_keys=8, num_values=4, seed=0)
    x, y = task.x_train, task.y_train
    keys, values = x[:, :-1] // 4, x[:, :-1] % 4
    qkey = x[:, -1] - 8 * 4
    assert all(len(set(k.tolist())) == 6 for k in keys)
    hit = keys == qkey[:, None]
    assert (hit.sum(1) == 1).all() and torch.equal(values[hit], y)
    model = sl.models.tiny_transformer(task.meta["vocab_size"], 4, 7, dim=16, num_heads=2, num_layers=1, seed=0)
    assert {"blocks.0.attn.q.weight", "blocks.0.attn.out.weight", "blocks.0.fc1.weight", "head.weight"} <= set(sl.prunable(model))
    sl.prune(model, 0.5, structure=(2, 4), scope="layerwise")
    assert model(x).shape == (50, 4)


def test_compact_heads_equals_gated_model_with_implied_parameters():
    model, tokens = _model_and_tokens(4)
    sl.prune(model, 0.3, scope="layerwise")                 # unstructured masks are baked in too
    model.blocks[0].attn.head_gate.copy_(torch.tensor([1.0, 0.0, 0.7, 0.0]))
    model.blocks[1].attn.head_gate.zero_()
    small = at.compact_heads(model)
    torch.testing.assert_close(small(tokens), model(tokens), atol=1e-5, rtol=1e-5)
    assert [a.num_heads for a in small.attentions()] == [2, 1]
    assert small.blocks[0].attn.q.weight.shape == (8, 16) and small.blocks[0].attn.out.weight.shape == (16, 8)
    d, dh = 16, 4
    removed = 5 * dh * (4 * d + 3)
    assert sum(p.numel() for p in small.parameters()) == sum(p.numel() for p in model.parameters()) - removed
    assert model.blocks[0].attn.num_heads == 4 and sl.masks.is_masked(model)
    with pytest.raises(ValueError, match="head_gate"):
        at.compact_heads(sl.models.mlp(seed=0))
    torch.testing.assert_close(sl.export.compact(model)(tokens), model(tokens), atol=1e-5, rtol=1e-5)
