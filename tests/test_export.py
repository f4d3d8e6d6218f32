"""Tests of sparsity_lib.export: real sparse inference.

Oracles: the masked model itself (a sparse model must compute the same function, to float rounding), the bytes of
the stored torch.sparse tensors, and the closed forms of sparsity_lib.formats (with fixed-width indices).
"""

import copy

import pytest
import torch
from torch import nn

import sparsity_lib as sl
from sparsity_lib import export
from sparsity_lib.formats import expected_bits, storage_bits

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _pruned_mlp(sparsity=0.9, seed=0):
    net = sl.models.lenet_300_100(seed=seed)
    sl.prune(net, sparsity, method="magnitude", scope="layerwise")
    return net


@pytest.mark.parametrize("fmt", ["dense", "csr", "bsr"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_sparse_mlp_computes_the_masked_function(fmt, index_dtype):
    net = _pruned_mlp(0.9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sparse = export.to_sparse(net, fmt, blocksize=(2, 2), index_dtype=index_dtype)
    x = _x(17, 64)
    torch.testing.assert_close(sparse(x), net(x), atol=1e-5, rtol=1e-5)
    # any leading shape, as nn.Linear: one unbatched vector, and a (2, 3, in) tensor
    torch.testing.assert_close(sparse.fc1(x[0]), net.fc1(x[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.fc1(x[:6].reshape(2, 3, 64)), net.fc1(x[:6].reshape(2, 3, 64)), atol=1e-5,
                               rtol=1e-5)
    # the original model is untouched: still masked, same state
    assert sl.masks.is_masked(net) and set(net.state_dict()) == set(before)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in before.items())
    expected_type = nn.Linear if fmt == "dense" else export.SparseLinear
    assert all(type(layer) is expected_type for layer in (sparse.fc1, sparse.fc2, sparse.fc3))
    assert not sl.masks.is_masked(sparse)
    if fmt != "dense":
        assert sparse.fc1.weight.layout == (torch.sparse_csr if fmt == "csr" else torch.sparse_bsr)
        assert sparse.fc1.weight.col_indices().dtype == index_dtype
        assert sparse.fc1.nnz == int(sl.get_masks(net)["fc1.weight"].sum())


def test_only_pruned_weights_are_dropped_and_dense_weight_round_trips():
    net = _pruned_mlp(0.8, seed=1)
    sparse = export.to_sparse(net, "csr")
    for i in (1, 2, 3):
        torch.testing.assert_close(getattr(sparse, f"fc{i}").dense_weight(), getattr(net, f"fc{i}").weight.detach())


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_sparse_convolutions_by_im2col(fmt, cnn):
    sl.prune(cnn, 0.8, method="magnitude", scope="layerwise")
    sparse = export.to_sparse(cnn, fmt, blocksize=(4, 4), fallback="dense")
    x = _x(3, 1, 6, 6)
    torch.testing.assert_close(sparse(x), cnn(x), atol=1e-5, rtol=1e-5)
    assert isinstance(sparse[2], export.SparseConv)          # 16 x 72: divisible by 4x4
    if fmt == "csr":
        assert isinstance(sparse[0], export.SparseConv)


@pytest.mark.parametrize("kwargs", [dict(stride=2, padding=2), dict(stride=1, padding=0, dilation=2),
                                    dict(stride=3, padding="valid"), dict(stride=1, padding=1, bias=False)])
def test_conv1d_and_conv2d_hyperparameters(kwargs):
    torch.manual_seed(0)
    for conv, x in [(nn.Conv1d(3, 5, 5, **kwargs), _x(2, 3, 23)), (nn.Conv2d(3, 5, 3, **kwargs), _x(2, 3, 11, 9))]:
        sl.prune(conv, 0.7, method="random", seed=0)
        sparse = export.to_sparse(conv, "csr")
        assert isinstance(sparse, export.SparseConv)
        torch.testing.assert_close(sparse(x), conv(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sparse(x[0]), conv(x[0]), atol=1e-5, rtol=1e-5)   # unbatched


def test_book_cnns():
    for model, x in [(sl.models.digits_cnn(seed=0), _x(4, 1, 8, 8)), (sl.models.mnist1d_cnn(seed=0), _x(4, 1, 40))]:
        sl.prune(model, 0.9)
        torch.testing.assert_close(export.to_sparse(model, "csr")(x), model(x), atol=1e-5, rtol=1e-5)


def test_storage_equals_tensor_bytes_and_formats_closed_forms():
    net = _pruned_mlp(0.9, seed=2)
    masks = sl.get_masks(net)
    for index_dtype, bits in [(torch.int32, 32), (torch.int64, 64)]:
        csr = export.to_sparse(net, "csr", index_dtype=index_dtype)
        bsr = export.to_sparse(net, "bsr", blocksize=(2, 2), index_dtype=index_dtype)
        for i in (1, 2, 3):
            name = f"fc{i}"
            w = getattr(net, name).weight.detach()
            for model, fmt, block in [(csr, "csr", (4, 4)), (bsr, "bsr", (2, 2))]:
                layer = getattr(model, name)
                t = layer.weight
                nbytes = sum(v.numel() * v.element_size() for v in (t.values(), t.col_indices(), t.crow_indices()))
                assert layer.storage_bits() == 8 * nbytes
                assert layer.storage_bits() == storage_bits(w, fmt, index_bits=bits, block=block)
            # CSR stores exactly the kept weights
            assert csr.get_submodule(name).weight.values().numel() == int(masks[f"{name}.weight"].sum())
        report = {r["name"]: r for r in export.storage_report(csr)}
        assert report["fc2"]["format"] == "csr" and report["fc2"]["dense_bits"] == 100 * 300 * 32
        assert report["fc2"]["bits"] == storage_bits(net.fc2.weight.detach(), "csr", index_bits=bits)
    dense_report = export.storage_report(net)   # a masked model stores every weight
    assert all(r["format"] == "dense" and r["bits"] == r["dense_bits"] for r in dense_report)


def test_storage_of_a_random_mask_is_close_to_the_expected_closed_form():
    g = torch.Generator().manual_seed(0)
    for s in (0.5, 0.9, 0.99):
        w = torch.randn(512, 512, generator=g) * (torch.rand(512, 512, generator=g) >= s)
        layer = export.SparseLinear(w, format="csr")
        expected = expected_bits("csr", (512, 512), s, index_bits=32)
        assert abs(layer.storage_bits() / expected - 1) < 0.05
        blocked = export.SparseLinear(w, format="bsr", blocksize=(4, 4))
        expected_b = expected_bits("bsr", (512, 512), s, index_bits=32, block=(4, 4))
        assert abs(blocked.storage_bits() / expected_b - 1) < 0.05


def test_min_sparsity_layers_and_fallback(mlp):
    budget = {"0.weight": 0.9, "2.weight": 0.3, "4.weight": 0.9}
    sl.apply_masks(mlp, {name: sl.speed.random_mask(tuple(w.shape), budget[name], seed=0)
                         for name, w in sl.prunable(mlp).items()})
    x = _x(6, 16)
    partial = export.to_sparse(mlp, "csr", min_sparsity=0.5)
    assert isinstance(partial[0], export.SparseLinear) and type(partial[2]) is nn.Linear
    torch.testing.assert_close(partial(x), mlp(x), atol=1e-5, rtol=1e-5)
    chosen = export.to_sparse(mlp, "csr", layers=["2.weight"])
    assert type(chosen[0]) is nn.Linear and isinstance(chosen[2], export.SparseLinear)
    # 5 x 24 cannot be cut into 4x4 blocks: an error naming the layer, or a dense layer with fallback="dense"
    with pytest.raises(ValueError, match=r"4\.weight.*blocksize"):
        export.to_sparse(mlp, "bsr", blocksize=(4, 4))
    kept = export.to_sparse(mlp, "bsr", blocksize=(4, 4), fallback="dense")
    assert type(kept[4]) is nn.Linear and isinstance(kept[0], export.SparseLinear)
    torch.testing.assert_close(kept(x), mlp(x), atol=1e-5, rtol=1e-5)


def test_unsupported_convolutions_are_refused_or_kept_dense():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Conv2d(8, 8, 1, padding_mode="zeros"))
    with pytest.raises(ValueError, match=r"0\.weight.*groups"):
        export.to_sparse(model, "csr")
    kept = export.to_sparse(model, "csr", fallback="dense")
    assert type(kept[0]) is nn.Conv2d and isinstance(kept[1], export.SparseConv)
    x = _x(2, 4, 7, 7)
    torch.testing.assert_close(kept(x), model(x), atol=1e-5, rtol=1e-5)
    for bad in (nn.Conv3d(2, 2, 3), nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), nn.Conv2d(2, 2, 3, padding="same")):
        with pytest.raises(ValueError):
            export.to_sparse(bad, "csr")


@pytest.mark.parametrize("kwargs, match", [
    (dict(format="coo"), "format must be one of"),
    (dict(blocksize=(0, 4)), "blocksize"),
    (dict(blocksize=4), "blocksize"),
    (dict(index_dtype=torch.int16), "index_dtype"),
    (dict(fallback="skip"), "fallback"),
    (dict(min_sparsity=1.5), "min_sparsity"),
    (dict(layers=["fc9.weight"]), "unknown layers"),
])
def test_bad_arguments_raise_clear_errors_and_leave_the_model_unchanged(kwargs, match):
    net = _pruned_mlp(0.5)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        export.to_sparse(net, **kwargs)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(TypeError):
        export.to_sparse("not a model")
    with pytest.raises(ValueError, match="no Linear or Conv"):
        export.to_sparse(nn.Sequential(nn.ReLU()))


def test_mode_deepcopy_and_state_dict_round_trip():
    net = _pruned_mlp(0.9).eval()
    sparse = export.to_sparse(net, "csr")
    assert not sparse.training and not sparse.fc1.training
    twin = copy.deepcopy(sparse)
    x = _x(5, 64)
    torch.testing.assert_close(twin(x), sparse(x))
    assert twin.fc1.weight is not sparse.fc1.weight
    reloaded = export.to_sparse(net, "csr")
    reloaded.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(reloaded(x), sparse(x))
    assert not any(p.requires_grad for p in sparse.fc1.buffers())   # inference only: weights are buffers
    assert list(sparse.fc1.parameters()) == []


def test_dense_model_and_single_layer():
    layer = nn.Linear(12, 7)
    with torch.no_grad():
        layer.weight[:, :6] = 0
    sparse = export.to_sparse(layer, "csr")
    assert isinstance(sparse, export.SparseLinear) and sparse.nnz == 7 * 6 and sparse.sparsity == pytest.approx(0.5)
    x = _x(3, 12)
    torch.testing.assert_close(sparse(x), layer(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="features"):
        sparse(_x(3, 11))


def test_compact_is_row_compaction_of_mlps():
    net = sl.models.lenet_300_100(seed=0)
    sl.prune(net, 0.9, structure="neuron", scope="layerwise", exclude=["fc3.weight"])
    small = export.compact(net)
    assert small.hidden == (30, 10)
    x = _x(9, 64)
    torch.testing.assert_close(small(x), net(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError, match="Chapter 12"):
        export.compact(sl.models.digits_cnn(seed=0))
