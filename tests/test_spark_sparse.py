"""SparK sparse encoder (models/spark_sparse.py): masked dense layers against dense references on
the visible positions, conversion of timm models, and the encoder-owned mask."""
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.spark_sparse import (
    ActiveMask, SparseAvgPooling, SparseBatchNorm2d, SparseConv2d, SparseConvNeXtBlock, SparseEncoder,
    SparseLayerNorm, SparseLayerNorm2d, SparseMaxPooling, SparseSyncBatchNorm2d, dense_model_to_sparse,
    hierarchical_forward)


def _mask(b=2, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, f, f, generator=g) > 0.5
    m[:, :, 0, 0] = True                      # at least one visible patch per image
    m[:, :, -1, -1] = False                   # and one masked
    return m


def _holder(mask):
    h = ActiveMask()
    h.set(mask)
    return h


def _up(mask, h, w):
    return F.interpolate(mask.float(), size=(h, w), mode='nearest')


def _masked_input(b=2, c=6, s=16, f=4, seed=0):
    torch.manual_seed(seed)
    mask = _mask(b, f, seed)
    x = torch.randn(b, c, s, s) * 2 + 0.5
    return x * _up(mask, s, s), mask


def _model(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=0, global_pool='', **kw)


MODELS = [('resnet18', {}), ('convnext_atto', {}), ('convnext_atto', {'conv_mlp': False})]


# ---------------------------------------------------------------- layers

@pytest.mark.parametrize('stride', [1, 2])
def test_conv_is_dense_times_mask(stride):
    x, mask = _masked_input()
    dense = nn.Conv2d(6, 5, 3, stride=stride, padding=1)
    sp = SparseConv2d(6, 5, 3, stride=stride, padding=1, holder=_holder(mask))
    sp.load_state_dict(dense.state_dict())
    y = sp(x)
    ref = dense(x) * _up(mask, *y.shape[2:])
    torch.testing.assert_close(y, ref)
    assert (y * (1 - _up(mask, *y.shape[2:])) == 0).all()
    assert (y[(_up(mask, *y.shape[2:]) == 0).expand_as(y)] == 0).all()


@pytest.mark.parametrize('cls,dense', [(SparseMaxPooling, nn.MaxPool2d(3, 2, 1)),
                                       (SparseAvgPooling, nn.AvgPool2d(2, 2))])
def test_pooling_is_dense_times_mask(cls, dense):
    x, mask = _masked_input()
    sp = cls(dense.kernel_size, dense.stride, dense.padding, holder=_holder(mask))
    y = sp(x)
    up = _up(mask, *y.shape[2:])
    torch.testing.assert_close(y, dense(x) * up)
    assert (y[(up == 0).expand_as(y)] == 0).all()


@pytest.mark.parametrize('cls', [SparseBatchNorm2d, SparseSyncBatchNorm2d])
def test_batchnorm_statistics_over_visible_positions(cls):
    x, mask = _masked_input(c=5)
    bn = cls(5, holder=_holder(mask))
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)                               # non-zero bias: masked must stay 0
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    bn.train()
    y = bn(x)

    vis = _up(mask, 16, 16)[:, 0].bool()                      # [B, H, W]
    rows = x.permute(0, 2, 3, 1)[vis]                         # [N_visible, C]
    n = rows.shape[0]
    mean = rows.sum(0) / n
    var_b = ((rows - mean) ** 2).sum(0) / n
    var_u = ((rows - mean) ** 2).sum(0) / (n - 1)
    ref = (rows - mean) / torch.sqrt(var_b + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y.permute(0, 2, 3, 1)[vis], ref, rtol=1e-5, atol=1e-5)
    assert (y.permute(0, 2, 3, 1)[~vis] == 0).all()
    torch.testing.assert_close(bn.running_mean, 0.9 * rm0 + 0.1 * mean)
    torch.testing.assert_close(bn.running_var, 0.9 * rv0 + 0.1 * var_u)
    assert bn.num_batches_tracked.item() == 1
    # statistics differ from a dense BN that would count the masked zeros
    assert not torch.allclose(mean, x.mean((0, 2, 3)))

    bn.eval()
    y = bn(x)
    ref = (rows - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y.permute(0, 2, 3, 1)[vis], ref, rtol=1e-5, atol=1e-5)
    assert (y.permute(0, 2, 3, 1)[~vis] == 0).all()


def _ln_reference(rows, ln):
    mu = rows.mean(-1, keepdim=True)
    var = ((rows - mu) ** 2).mean(-1, keepdim=True)
    return (rows - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


@pytest.mark.parametrize('channels_last', [False, True])
def test_layernorm_per_visible_position(channels_last):
    x, mask = _masked_input(c=7)
    cls = SparseLayerNorm if channels_last else SparseLayerNorm2d
    ln = cls(7, eps=1e-6, holder=_holder(mask))
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(0.2, 1)                              # masked positions must not get the bias
    y = ln(x.permute(0, 2, 3, 1) if channels_last else x)
    y_bhwc = y if channels_last else y.permute(0, 2, 3, 1)
    vis = _up(mask, 16, 16)[:, 0].bool()
    torch.testing.assert_close(y_bhwc[vis], _ln_reference(x.permute(0, 2, 3, 1)[vis], ln))
    assert (y_bhwc[~vis] == 0).all()


def test_layers_without_mask_are_dense():
    x = torch.randn(2, 6, 16, 16)
    h = ActiveMask()                                          # mask None
    conv = SparseConv2d(6, 4, 3, padding=1, holder=h)
    dense = nn.Conv2d(6, 4, 3, padding=1)
    dense.load_state_dict(conv.state_dict())
    torch.testing.assert_close(conv(x), dense(x))
    bn, dbn = SparseBatchNorm2d(6, holder=h), nn.BatchNorm2d(6)
    torch.testing.assert_close(bn(x), dbn(x))
    torch.testing.assert_close(bn.running_var, dbn.running_var)


# ---------------------------------------------------------------- conversion

@pytest.mark.parametrize('name,kw', MODELS)
def test_conversion_keeps_weights_and_keys(name, kw):
    dense = _model(name, **kw)
    dense_sd = {k: v.clone() for k, v in dense.state_dict().items()}
    types_before = [type(m) for m in dense.modules()]
    rng = torch.get_rng_state()
    sp = dense_model_to_sparse(dense, ActiveMask())
    assert torch.equal(rng, torch.get_rng_state())            # no re-initialisation
    assert [type(m) for m in dense.modules()] == types_before  # input model untouched
    sp_sd = sp.state_dict()
    assert list(sp_sd) == list(dense_sd)
    for k in dense_sd:
        assert torch.equal(sp_sd[k], dense_sd[k]), k
    sp.load_state_dict(dense.state_dict(), strict=True)
    _model(name, **kw).load_state_dict(sp.state_dict(), strict=True)
    kinds = {type(m) for m in sp.modules()}
    assert SparseConv2d in kinds
    assert nn.Conv2d not in kinds and nn.BatchNorm2d not in kinds
    if name.startswith('resnet'):
        assert {SparseBatchNorm2d, SparseMaxPooling} <= kinds
    else:
        assert {SparseLayerNorm2d, SparseConvNeXtBlock} <= kinds
        assert (SparseLayerNorm in kinds) == (kw.get('conv_mlp') is False)


def test_sbn_conversion_and_running_stats_copied():
    dense = _model('resnet18')
    with torch.no_grad():
        dense.bn1.running_mean.uniform_()
    sp = dense_model_to_sparse(dense, ActiveMask(), sbn=True)
    assert type(sp.bn1) is SparseSyncBatchNorm2d
    assert torch.equal(sp.bn1.running_mean, dense.bn1.running_mean)
    assert type(SparseEncoder(_model('resnet18'), 64, sbn=True).sp_cnn.bn1) is SparseSyncBatchNorm2d  # --sbn


def test_a_batchnorm_without_affine_parameters_converts():
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False)).double()
    with torch.no_grad():
        dense[1].running_var.uniform_(0.5, 2)
    sp = dense_model_to_sparse(dense, None, sbn=False)
    assert sp[1].running_var.dtype == torch.float64 and torch.equal(sp[1].running_var, dense[1].running_var)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(sp.eval()(x), dense.eval()(x))


def test_a_batchnorm_without_running_statistics_converts():
    dense = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False))
    sp = dense_model_to_sparse(dense, None, sbn=False)
    assert not sp[1].track_running_stats and sp[1].running_mean is None
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(sp.eval()(x), dense.eval()(x))  # batch statistics in eval mode too


def test_a_mask_of_the_wrong_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r'^active_b1ff must have shape \(1, 1, 2, 2\), got \(1, 2, 2, 2\)$'):
        SparseEncoder(_model('resnet18'), 64)(torch.randn(1, 3, 64, 64), torch.ones(1, 2, 2, 2, dtype=torch.bool))


def test_a_feature_map_off_the_mask_grid_is_a_clear_error():
    holder = ActiveMask()
    holder.mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r'^feature map 7x8 is not a multiple of the mask grid 2x2; the input size '
                                         r'must be a multiple of the downsample ratio$'):
        holder.expand(7, 8)


# ---------------------------------------------------------------- encoder

def _dense_feats(model, x):
    return model.forward_intermediates(x, indices=[1, 2, 3, 4] if isinstance(model, timm.models.ResNet) else 4,
                                       intermediates_only=True)


@pytest.mark.parametrize('name,kw', MODELS)
def test_all_ones_mask_equals_dense(name, kw):
    dense = _model(name, **kw).eval()
    enc = SparseEncoder(dense, 64).eval()
    assert enc.get_downsample_ratio() == 32
    assert enc.get_feature_map_channels() == [i['num_chs'] for i in dense.feature_info][-4:]
    x = torch.randn(2, 3, 64, 64)
    ones = torch.ones(2, 1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        ref = _dense_feats(dense, x)
        for got in (enc(x, ones), enc(x)):
            assert len(got) == 4
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_all_ones_mask_equals_dense_in_train_mode():
    dense = _model('resnet18').train()
    enc = SparseEncoder(dense, 64).train()
    x = torch.randn(2, 3, 64, 64)
    got = enc(x, torch.ones(2, 1, 2, 2, dtype=torch.bool))
    ref = _dense_feats(dense, x)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(enc.sp_cnn.layer1[0].bn1.running_var, dense.layer1[0].bn1.running_var)


@pytest.mark.parametrize('name,kw', MODELS)
def test_masked_features_exact_zeros_and_visible_only(name, kw):
    enc = SparseEncoder(_model(name, **kw), 64).train()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    mask = _mask(2, 2, seed=3)
    feats = enc(x, mask)
    for f in feats:
        up = _up(mask, *f.shape[2:]).expand_as(f)
        assert (f[up == 0] == 0).all()
        assert (f[up == 1] != 0).any()
    # gradients reach only visible input pixels
    sum(f.sum() for f in feats).backward()
    up = _up(mask, 64, 64).expand_as(x)
    assert (x.grad[up == 0] == 0).all() and (x.grad[up == 1] != 0).any()


@pytest.mark.parametrize('fmt', [torch.contiguous_format, torch.channels_last])
def test_masked_resnet_keeps_the_memory_format_of_its_input(fmt):
    """A sparse BN whose output turned channels-last would make every later conv (and the decoder) run
    channels-last with contiguous weights, which is slower on CPU."""
    enc = SparseEncoder(_model('resnet18'), 64).train().to(memory_format=fmt)
    seen = []

    def record(module, args, out):
        seen.append((type(module).__name__, out.is_contiguous(memory_format=fmt)))
    for m in enc.modules():
        if not list(m.children()):
            m.register_forward_hook(record)
    enc(torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt), _mask(2, 2, seed=3))
    assert {'SparseConv2d', 'SparseBatchNorm2d', 'SparseMaxPooling'} <= {n for n, _ in seen}
    assert all(ok for _, ok in seen), [n for n, ok in seen if not ok]


def test_output_at_visible_positions_ignores_masked_content():
    enc = SparseEncoder(_model('resnet18'), 64).eval()
    mask = _mask(2, 2, seed=1)
    x = torch.randn(2, 3, 64, 64)
    x2 = x + 5 * torch.randn_like(x) * (1 - _up(mask, 64, 64))   # change only masked pixels
    with torch.no_grad():
        for a, b in zip(enc(x, mask), enc(x2, mask)):
            torch.testing.assert_close(a, b)


def test_two_encoders_do_not_interfere():
    enc_a = SparseEncoder(_model('resnet18'), 64).eval()
    enc_b = SparseEncoder(_model('convnext_atto'), 64).eval()
    x = torch.randn(2, 3, 64, 64)
    m_a, m_b = _mask(2, 2, seed=1), ~_mask(2, 2, seed=1)
    with torch.no_grad():
        ref_a = enc_a(x, m_a)
        ref_b = enc_b(x, m_b)
        # run B (other mask) in the middle of A's forward, from a hook
        inner = {}

        def run_b(*_):
            inner['b'] = enc_b(x, m_b)                        # returns None: A's output unchanged
        hook = enc_a.sp_cnn.layer2.register_forward_hook(run_b)
        got_a = enc_a(x, m_a)
        hook.remove()
    for a, b in zip(got_a, ref_a):
        assert torch.equal(a, b)
    for a, b in zip(inner['b'], ref_b):
        assert torch.equal(a, b)
    assert enc_a.holder is not enc_b.holder
    assert enc_a.holder.mask is None and enc_b.holder.mask is None


def test_no_mask_behaviour_and_cleared_after_errors():
    dense = _model('convnext_atto').eval()
    enc = SparseEncoder(dense, 64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = _dense_feats(dense, x)
        # the converted model used on its own, outside a masked forward, is the dense model
        for a, b in zip(hierarchical_forward(enc.sp_cnn, x), ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match='active_b1ff'):
            enc(x, torch.ones(1, 1, 3, 3, dtype=torch.bool))
        assert enc.holder.mask is None
        hook = enc.sp_cnn.stages[1].register_forward_hook(lambda *_: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            enc(x, torch.ones(1, 1, 2, 2, dtype=torch.bool))
        hook.remove()
        assert enc.holder.mask is None


def test_input_size_not_divisible_raises():
    with pytest.raises(ValueError, match='divisible by the downsample ratio 32'):
        SparseEncoder(_model('resnet18'), 48)
    enc = SparseEncoder(_model('resnet18'), 64)
    for h, w in ((48, 48), (64, 48), (48, 64)):
        with pytest.raises(ValueError, match=f'input {h}x{w} is not divisible'):
            enc(torch.randn(1, 3, h, w))


def test_a_custom_cnn_gives_its_own_hierarchical_features():
    import models.spark_custom_cnn  # noqa: F401  (registers your_convnet_32px)
    cnn = timm.create_model('your_convnet_32px').eval()
    x = torch.randn(2, 3, 32, 32)
    feats = SparseEncoder(cnn, 32).eval()(x)
    with torch.no_grad():
        expected = cnn(x, hierarchical=True)
    assert len(feats) == len(expected) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(feats, expected))


def test_unsupported_backbone_raises():
    with pytest.raises(TypeError, match='not a supported SparK backbone'):
        SparseEncoder(nn.Sequential(nn.Conv2d(3, 8, 3)), 64)
