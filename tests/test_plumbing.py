"""Tests of sparsity_lib.plumbing: calibration batches, eval mode, input capture, conv unfolding, flattening, checks.

Oracles: the layers' own forward passes (a convolution equals its weight times the unfolded patches), the
original tensors (flatten/unflatten round trip), the modules' training flags and hooks before and after."""

import numpy as np
import pytest
import torch
from torch import nn

from sparsity_lib import plumbing


def test_batches_forms_and_errors():
    model = nn.Linear(3, 2)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    assert len(plumbing.batches((x, y), model)) == 1                       # one (inputs, targets) tuple
    assert len(plumbing.batches([x, y], model)) == 1                       # ... or list
    assert len(plumbing.batches([x, x], model)) == 2                       # two input batches
    assert plumbing.batches(x, model)[0][1] is None                        # inputs only
    gen = ((x[i:i + 2], y[i:i + 2]) for i in range(0, 5, 2))               # a one-shot generator: consumed once
    items = plumbing.batches(gen, model)
    assert [b[0].shape[0] for b in items] == [2, 2, 1]
    with pytest.raises(ValueError, match="empty.*already consumed"):
        plumbing.batches(gen, model)
    assert len(plumbing.batches([(x, y)] * 4, model, num_batches=np.int64(2))) == 2
    with pytest.raises(ValueError, match="num_batches must be a positive integer or None"):
        plumbing.batches([(x, y)], model, num_batches=0)
    with pytest.raises(ValueError, match="has no targets"):
        plumbing.batches(x, model, need_targets=True)
    with pytest.raises(ValueError, match="data is required"):
        plumbing.batches(None, model)
    with pytest.raises(TypeError, match="iterable"):
        plumbing.batches(3, model)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inputs of batch 0 contains? 1 non-finite"):
        plumbing.batches((bad, y), model)
    assert plumbing.batches((bad, y), model, finite=False)[0][0].isnan().any()


def test_eval_mode_restores_each_module_flag_even_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[2].eval()                                                      # a mixed model
    flags = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):
        with plumbing.eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == flags


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.b(input=torch.relu(self.a(x)))                       # b is called with a keyword


def test_capture_inputs_keyword_calls_stop_early_and_hooks_removed():
    torch.manual_seed(0)
    model = KeywordCall()
    model.train()
    x = torch.randn(6, 3)
    seen = {}
    plumbing.capture_inputs(model, {"a": model.a, "b": model.b}, [(x, None)],
                            lambda n, m, inp: seen.setdefault(n, inp))
    assert torch.equal(seen["a"], x)
    assert torch.allclose(seen["b"], torch.relu(model.a(x)).detach())
    assert model.training and not model.a._forward_pre_hooks and not model.b._forward_pre_hooks
    calls = []
    plumbing.capture_inputs(model, {"a": model.a}, [(x, None)] * 3, lambda n, m, inp: calls.append(n),
                            stop_early=True)
    assert calls == ["a"] * 3
    unused = nn.Linear(1, 1)
    with pytest.raises(ValueError, match="never called"):
        plumbing.capture_inputs(model, {"a": model.a, "unused": unused}, [(x, None)], lambda *a: None)
    with pytest.raises(ZeroDivisionError):
        plumbing.capture_inputs(model, {"a": model.a}, [(x, None)], lambda *a: 1 / 0)
    assert not model.a._forward_pre_hooks


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, padding=1, stride=2),
    nn.Conv2d(4, 6, 3, padding="same", groups=2, padding_mode="reflect"),
    nn.Conv2d(4, 4, (2, 3), padding="same", dilation=(1, 2), groups=4, padding_mode="circular"),
    nn.Conv1d(4, 6, 4, padding="same", padding_mode="replicate"),
    nn.Conv1d(4, 2, 3, stride=2, bias=False),
])
def test_unfold_conv_input_reproduces_the_convolution(conv):
    torch.manual_seed(1)
    x = torch.randn(3, 4, 7, 8) if isinstance(conv, nn.Conv2d) else torch.randn(3, 4, 9)
    patches = plumbing.unfold_conv_input(conv, x)                          # (groups, positions, fan_in)
    W = plumbing.weight_matrix(conv.weight.detach())
    g, out = conv.groups, conv.out_channels
    per_group = [patches[i] @ W[i * out // g:(i + 1) * out // g].T for i in range(g)]   # (positions, out/g)
    y = torch.cat(per_group, 1)
    ref = conv(x).detach()
    ref = ref.reshape(ref.shape[0], out, -1).transpose(1, 2).reshape(-1, out)
    if conv.bias is not None:
        ref = ref - conv.bias.detach()
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    if g == 1:
        assert torch.equal(plumbing.layer_rows(conv, x), patches[0])
    else:
        with pytest.raises(ValueError, match="groups=1"):
            plumbing.layer_rows(conv, x)


def test_flatten_unflatten_round_trip_and_checks():
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4).double()}
    flat = plumbing.flatten(tensors)
    assert flat.shape == (10,)
    back = plumbing.unflatten(flat, tensors)
    assert all(torch.equal(back[n].to(t.dtype), t) and back[n].dtype == t.dtype for n, t in tensors.items())
    masks = plumbing.unflatten(torch.ones(10, dtype=torch.bool), tensors)
    assert masks["b"].dtype == torch.bool and masks["a"].shape == (2, 3)
    with pytest.raises(ValueError, match="10"):
        plumbing.unflatten(torch.zeros(9), tensors)
    assert plumbing.check_positive_int(np.int32(3), "k") == 3
    for bad in (0, -1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            plumbing.check_positive_int(bad, "k")
    assert plumbing.check_number(0, "damp", minimum=0.0) == 0.0
    for bad in (-0.1, float("nan"), float("inf"), "x", False):
        with pytest.raises(ValueError, match="damp must be a number >= 0"):
            plumbing.check_number(bad, "damp", minimum=0.0)


def test_evaluate_gives_every_module_its_own_training_flag_back():
    """sl.train.evaluate runs in eval mode and restores each module's own flag (a model may mix both: e.g. a
    frozen batch norm kept in eval mode inside a model that trains)."""
    import sparsity_lib as sl
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.train()
    model[1].eval()
    before = {name: m.training for name, m in model.named_modules()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    sl.train.evaluate(model, (x, y))
    assert {name: m.training for name, m in model.named_modules()} == before
