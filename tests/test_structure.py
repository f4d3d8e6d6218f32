"""sparsity_lib.structure: coupled channel groups and compaction, checked against the masked model."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sparsity_lib as sl
from sparsity_lib import structure as st


def _randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


class ConvChain(nn.Module):
    """Conv2d + BN + ReLU, Conv2d with bias, flatten, Linear, ReLU, Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4, 12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class Conv1dCat(nn.Module):
    """Two Conv1d branches concatenated along channels, BN1d, global average pool, Linear."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 4, 3, padding=1)
        self.b = nn.Conv1d(2, 5, 3, padding=1)
        self.bn = nn.BatchNorm1d(9)
        self.fc = nn.Linear(9, 3)

    def forward(self, x):
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1)))
        return self.fc(F.adaptive_avg_pool1d(x, 1).flatten(1))


def test_residual_groups_couple_the_stream():
    model = sl.models.residual_cnn(channels=6, hidden=5, num_blocks=2, seed=0)
    groups = st.channel_groups(model, torch.randn(2, 64))
    stream = [g for g in groups if "stem" in g.producers][0]
    assert set(stream.producers) == {"stem", "blocks.0.conv2", "blocks.1.conv2"}
    assert set(stream.consumers) == {"blocks.0.conv1", "blocks.1.conv1", "fc"}
    assert set(stream.norms) == {"stem_bn", "blocks.0.bn2", "blocks.1.bn2"}
    assert stream.size == 6 and not stream.frozen.any()
    assert len(stream.consumers["fc"]) == 6 * 16  # flatten: each channel covers 4x4 columns
    inner = [g for g in groups if "blocks.0.conv1" in g.producers][0]
    assert inner.size == 5 and set(inner.consumers) == {"blocks.0.conv2"}
    assert [g for g in groups if "fc" in g.producers][0].frozen.all()   # the output is never removed


def _implied_params(channels, hidden, blocks, classes, c_keep, h_keep):
    stem = 9 * c_keep + 2 * c_keep
    block = [9 * c_keep * h + 2 * h + 9 * h * c_keep + 2 * c_keep for h in h_keep]
    return stem + sum(block) + c_keep * 16 * classes + classes


@pytest.mark.parametrize("score", ["l1_filter", "bn_scale"])
def test_compact_residual_cnn_equals_masked_model(score):
    model = _randomize_bn(sl.models.residual_cnn(channels=8, hidden=6, num_blocks=2, seed=1))
    x = torch.randn(7, 64)
    keeps = st.prune_channels(model, 0.5, torch.randn(2, 64), score=score)
    small = st.compact(model, x)
    x2 = torch.randn(11, 1, 8, 8)
    torch.testing.assert_close(small(x2), model(x2), atol=1e-5, rtol=1e-5)
    c_keep = int(keeps["group0"].sum())
    assert small.stem.out_channels == c_keep == 4
    assert small.fc.in_features == 4 * 16
    h_keep = [small.blocks[i].conv1.out_channels for i in range(2)]
    assert h_keep == [3, 3]
    assert st.count_parameters(small) == _implied_params(8, 6, 2, 10, c_keep, h_keep)
    assert not any(isinstance(m, torch.nn.utils.parametrize.ParametrizationList) for m in small.modules())


def test_compact_keeps_live_channels_of_a_partially_pruned_group():
    """Masking only the stem's rows leaves the stream alive (BN shifts, other producers): nothing is removed."""
    model = _randomize_bn(sl.models.residual_cnn(channels=4, hidden=3, num_blocks=1, seed=0))
    mask = torch.ones_like(model.stem.weight, dtype=torch.bool)
    mask[:2] = False
    sl.apply_masks(model, {"stem.weight": mask})
    x = torch.randn(5, 64)
    small = st.compact(model, x)
    assert small.stem.out_channels == 4
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_compact_conv_chain_with_bias_and_flatten():
    model = _randomize_bn(ConvChain())
    with torch.no_grad():
        model.conv2.weight[[1, 4]] = 0
        model.conv2.bias[[1, 4]] = 0
        model.conv2.bias[2] = 0.3          # zero row but a bias: a constant channel, kept
        model.conv2.weight[2] = 0
        model.bn1.weight[[0, 5]] = 0
        model.bn1.bias[[0, 5]] = 0
    sl.prune(model, 0.5, structure="neuron", scope="layerwise", exclude=["conv1.weight", "conv2.weight",
                                                                          "fc2.weight"])
    with torch.no_grad():   # a masked row with a bias is a constant neuron (kept); zero the bias to remove it
        model.fc1.bias[~sl.get_masks(model)["fc1.weight"][:, 0]] = 0
    x = torch.randn(3, 3, 8, 8)
    small = st.compact(model, x)
    assert (small.conv1.out_channels, small.conv2.in_channels) == (6, 6)
    assert small.conv2.out_channels == 4 and small.fc1.in_features == 4 * 16
    assert small.fc1.out_features == 6 and small.fc2.in_features == 6
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    expected = (3 * 9 * 6) + 2 * 6 + (6 * 9 * 4 + 4) + (64 * 6 + 6) + (6 * 5 + 5)
    assert st.count_parameters(small) == expected


def test_compact_concatenation():
    model = _randomize_bn(Conv1dCat())
    with torch.no_grad():
        model.bn.weight[[1, 6]] = 0
        model.bn.bias[[1, 6]] = 0
    x = torch.randn(4, 2, 10)
    small = st.compact(model, x)
    assert (small.a.out_channels, small.b.out_channels, small.bn.num_features, small.fc.in_features) == (3, 4, 7, 7)
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_compact_delegates():
    model = _randomize_bn(sl.models.residual_cnn(channels=4, hidden=4, num_blocks=1, seed=0))
    st.prune_channels(model, 0.5, torch.randn(2, 64))
    x = torch.randn(3, 64)
    torch.testing.assert_close(sl.export.compact(model, x)(x), model(x), atol=1e-5, rtol=1e-5)


class MeanPooled(nn.Module):
    """Conv, BN, ReLU, global average pooling by x.mean(dim=(2, 3)), Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class BadMean(MeanPooled):
    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=2).mean(dim=2).mean(dim=1, keepdim=True).expand(-1, 6))


def test_compact_global_average_pooling_by_mean():
    model = _randomize_bn(MeanPooled())
    st.prune_channels(model, 0.5, torch.randn(2, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6)
    small = st.compact(model, x)
    assert small.conv.out_channels == 3 and small.fc.in_features == 3
    torch.testing.assert_close(small(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="mean"):
        st.compact(_randomize_bn(BadMean()), x)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, groups=4)

    def forward(self, x):
        return self.dw(x)


class Sigmoidal(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc2(torch.sigmoid(self.fc1(x)))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(self.fc(x))


@pytest.mark.parametrize("model, x, needle", [
    (Grouped(), torch.randn(1, 4, 5, 5), "dw"),
    (Sigmoidal(), torch.randn(2, 3), "sigmoid"),
    (Shared(), torch.randn(2, 3), "fc"),
])
def test_unsupported_patterns_are_refused_by_name(model, x, needle):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NotImplementedError, match=needle):
        st.compact(model, x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_linear_on_sequences_is_refused():
    model = sl.models.tiny_transformer(10, 3, 5, dim=8, num_heads=2, num_layers=1, seed=0)
    with pytest.raises(NotImplementedError):
        st.compact(model, torch.randint(0, 10, (2, 5)))


def test_scores_match_definitions():
    model = _randomize_bn(sl.models.residual_cnn(channels=4, hidden=3, num_blocks=1, seed=0))
    l1 = st.l1_filter(model)
    w = model.blocks[0].conv1.weight
    assert torch.allclose(l1["blocks.0.conv1.weight"][:, 0, 0, 0], w.abs().sum(dim=(1, 2, 3)))
    bn = st.bn_scale(model)
    assert torch.equal(bn["blocks.0.conv1.weight"][:, 0, 0, 0], model.blocks[0].bn1.weight.abs())
    assert torch.isinf(bn["fc.weight"]).all()
    task = sl.data.digits(seed=0)
    data = task.calibration(64)
    t = st.taylor_channel(model, data=data, loss_fn=F.cross_entropy)
    assert t["stem.weight"].shape == model.stem.weight.shape and (t["stem.weight"] >= 0).all()


def test_prune_channels_validates():
    model = sl.models.residual_cnn(channels=4, hidden=3, num_blocks=1, seed=0)
    with pytest.raises(ValueError, match="amount"):
        st.prune_channels(model, 1.0, torch.randn(2, 64))
    with pytest.raises(ValueError, match="score"):
        st.prune_channels(model, 0.5, torch.randn(2, 64), score="nope")
    assert not sl.masks.is_masked(model)


def test_flops_closed_form():
    model = ConvChain()
    expected = 8 * 3 * 9 * 64 + 6 * 8 * 9 * 64 + 96 * 12 + 12 * 5
    assert st.flops(model, torch.randn(2, 3, 8, 8)) == expected


def test_bn_scale_through_prune_names_unscored_layers_and_prunes_the_others_when_excluded():
    """bn_scale gives +inf to a layer with no batch norm after it (the residual CNN's classifier): sl.prune
    refuses, naming that layer and the exclude= that helps; with it, only the BN-followed layers lose channels,
    and those are the channels of smallest |gamma| (an independent ranking of the BN scales)."""
    model = _randomize_bn(sl.models.residual_cnn(channels=8, hidden=6, num_blocks=1, seed=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"'bn_scale' cannot score the layers \['fc.weight'\].*exclude=\['fc.weight'\]"):
        sl.prune(model, 0.3, "bn_scale", structure="neuron")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not any(hasattr(m, "parametrizations") for m in model.modules())
    sl.prune(model, 0.3, "bn_scale", structure="neuron", exclude=["fc.weight"])
    masks = sl.get_masks(model)
    assert bool(masks["fc.weight"].all())
    bn_of = {"stem.weight": model.stem_bn, "blocks.0.conv1.weight": model.blocks[0].bn1,
             "blocks.0.conv2.weight": model.blocks[0].bn2}
    removed_any = False
    for name, bn in bn_of.items():
        rows = masks[name].reshape(masks[name].shape[0], -1).any(1)
        gamma = bn.weight.detach().abs()
        if bool((~rows).any()):
            removed_any = True
            assert float(gamma[~rows].max()) <= float(gamma[rows].min()), name   # smallest |gamma| go first
    assert removed_any
    assert 0.29 <= sl.sparsity(model) <= 0.32
