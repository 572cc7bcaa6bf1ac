"""SLaK model (models/slak.py): forward against its operations written out, parameter counts, conv routes, keys."""
import pytest
import timm
import torch
import torch.nn.functional as F

from models.slak import SLaK, SLaK_base, SLaK_small, SLaK_tiny, ReparamLargeKernelConv, depthwise_convs, \
    rename_old_keys

KS = [13, 11, 9, 7, 3]  # at 64 x 96 input the maps are 16x24, 8x12, 4x6, 2x3: stages 3-4 crop their kernels


def small_slak(**kw):
    args = dict(depths=(1, 2, 1, 1), dims=(8, 12, 16, 20), kernel_size=KS, Decom=True, num_classes=5)
    return SLaK(**{**args, **kw})


def randomise(model, seed=0):
    """Non-trivial BN statistics, affines and layer scales, so that no block is close to the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith('running_var') or name.endswith('gamma') or name.endswith('norm.weight'):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point() and (name.endswith('bias') or 'bn.' in name or 'running_mean' in name):
                t.copy_(0.3 * torch.randn(t.shape, generator=g))
    return model


def reference_forward(sd, x, depths):
    """SLaK's eval forward (https://github.com/VITA-Group/SLaK/blob/main/models/SLaK.py) written out with
    torch.nn.functional on the state dict."""
    def ln_channels_first(x, p):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        return sd[p + '.weight'][:, None, None] * (x - u) / torch.sqrt(s + 1e-6) + sd[p + '.bias'][:, None, None]

    def branch(x, p):
        w = sd[p + '.conv.weight']
        y = F.conv2d(x, w, padding=(w.shape[2] // 2, w.shape[3] // 2), groups=x.shape[1])
        return F.batch_norm(y, sd[p + '.bn.running_mean'], sd[p + '.bn.running_var'], sd[p + '.bn.weight'],
                            sd[p + '.bn.bias'], False, 0., 1e-5)

    x = ln_channels_first(F.conv2d(x, sd['downsample_layers.0.0.weight'], sd['downsample_layers.0.0.bias'], stride=4),
                          'downsample_layers.0.1')
    for i, depth in enumerate(depths):
        if i:
            x = ln_channels_first(x, f'downsample_layers.{i}.0')
            x = F.conv2d(x, sd[f'downsample_layers.{i}.1.weight'], sd[f'downsample_layers.{i}.1.bias'], stride=2)
        for j in range(depth):
            p = f'stages.{i}.{j}.'
            y = sum(branch(x, p + 'large_kernel.' + n) for n in ('LoRA1', 'LoRA2', 'small_conv'))
            y = F.layer_norm(y.permute(0, 2, 3, 1), (x.shape[1],), sd[p + 'norm.weight'], sd[p + 'norm.bias'], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[p + 'pwconv1.weight'], sd[p + 'pwconv1.bias'])),
                         sd[p + 'pwconv2.weight'], sd[p + 'pwconv2.bias'])
            x = x + (sd[p + 'gamma'] * y).permute(0, 3, 1, 2)
    x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), sd['norm.weight'], sd['norm.bias'], 1e-6)
    return F.linear(x, sd['head.weight'], sd['head.bias'])


@pytest.mark.parametrize('impl', ['dense', 'crop', 'fft', 'auto'])
def test_forward_matches_functional_reference(impl):
    torch.manual_seed(0)
    model = randomise(small_slak(conv_impl=impl)).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref = reference_forward(model.state_dict(), x, (1, 2, 1, 1))
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
        reparam_out = model.reparameterize()(x)
    torch.testing.assert_close(reparam_out, ref, rtol=1e-4, atol=1e-5)


def test_stage_shapes():
    model = small_slak()
    x = torch.randn(1, 3, 64, 96)
    for i, (down, stage) in enumerate(zip(model.downsample_layers, model.stages)):
        x = stage(down(x))
        assert x.shape == (1, model.dims[i], 16 >> i, 24 >> i)
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 5)


def test_parameter_counts_at_width_1_3():
    with torch.device('meta'):
        counts = [sum(p.numel() for p in f(Decom=True, width_factor=1.3).parameters())
                  for f in (SLaK_tiny, SLaK_small, SLaK_base)]
    assert counts == [50_703_838, 91_131_820, 157_950_792]


@pytest.mark.parametrize('hw,k', [((14, 14), (47, 5)), ((7, 9), (13, 13)), ((5, 3), (5, 51)), ((6, 6), (3, 3))])
def test_conv_routes_equal(hw, k):
    x = torch.randn(2, 4, *hw, dtype=torch.float64)
    w = torch.randn(4, 1, *k, dtype=torch.float64)
    dense = F.conv2d(x, w, padding=(k[0] // 2, k[1] // 2), groups=4)
    for impl in ('dense', 'crop', 'fft'):
        torch.testing.assert_close(depthwise_convs(x, [w], impl)[0], dense)


def test_unit_routes_equal_in_training_and_after_merge():
    torch.manual_seed(0)
    unit = randomise(ReparamLargeKernelConv(6, 6, 15, small_kernel=5, Decom=True))
    x = torch.randn(3, 6, 9, 11, requires_grad=True)
    outs, grads = [], []
    for impl in ('dense', 'crop', 'fft'):  # train mode: each branch with its BN batch statistics
        unit.conv_impl = impl
        out = unit(x)
        outs.append(out)
        grads.append(torch.autograd.grad((out * torch.linspace(0, 1, 11)).sum(), [x, unit.LoRA1.conv.weight]))
    for out, grad in zip(outs[1:], grads[1:]):
        torch.testing.assert_close(out, outs[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad, grads[0], rtol=1e-4, atol=1e-5)
    unit.eval()
    unit.conv_impl = 'dense'
    with torch.no_grad():
        three = unit(x)
        unit.conv_impl = 'fft'  # in eval the FFT route folds the BNs into one kernel
        torch.testing.assert_close(unit(x), three, rtol=1e-4, atol=1e-5)
        unit.reparameterize()
        assert set(unit.state_dict()) == {'lkb_reparam.weight', 'lkb_reparam.bias'}
        for impl in ('dense', 'crop', 'fft'):
            unit.conv_impl = impl
            torch.testing.assert_close(unit(x), three, rtol=1e-4, atol=1e-5)


def test_official_state_dict_keys():
    with torch.device('meta'):
        sd = SLaK_tiny(Decom=True, width_factor=1.3).state_dict()
        plain = SLaK_tiny(kernel_size=[7, 7, 7, 7, 100]).state_dict()  # the ConvNeXt baseline: no small branch
    assert len(sd) == 470
    p = 'stages.0.0.large_kernel.'
    assert sd[p + 'LoRA1.conv.weight'].shape == (124, 1, 51, 5)
    assert sd[p + 'LoRA2.conv.weight'].shape == (124, 1, 5, 51)
    assert sd[p + 'small_conv.conv.weight'].shape == (124, 1, 5, 5)
    bn_keys = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    assert {p + f'LoRA1.bn.{n}' for n in bn_keys} <= set(sd)
    assert sd['stages.3.2.large_kernel.LoRA2.conv.weight'].shape == (998, 1, 5, 13)
    assert {'downsample_layers.0.0.weight', 'downsample_layers.0.1.bias', 'downsample_layers.3.0.weight',
            'downsample_layers.3.1.weight', 'stages.2.8.gamma', 'norm.weight', 'head.bias'} <= set(sd)
    assert plain['stages.1.0.large_kernel.lkb_origin.conv.weight'].shape == (192, 1, 7, 7)
    assert not any('small_conv' in k for k in plain)


def test_old_decom_checkpoint_loads():
    src = randomise(small_slak())
    old = {k.replace('LoRA', 'Decom'): v for k, v in src.state_dict().items()}
    assert any('.Decom1.' in k for k in old)
    assert rename_old_keys(old).keys() == src.state_dict().keys()
    dst = small_slak()
    dst.load_state_dict(old, strict=True)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_timm_create_model_and_options():
    model = timm.create_model('SLaK_tiny', num_classes=10, width_factor=0.1, kernel_size=[7, 7, 7, 7, 3], Decom=True,
                              drop_path_rate=0.2, layer_scale_init_value=0, head_init_scale=0.5, in_chans=1,
                              bn=False)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.stages[0][0].gamma is None and not hasattr(model.stages[0][0].large_kernel.LoRA1, 'bn')
    assert model.stages[3][2].drop_path.drop_prob == pytest.approx(0.2)
    with pytest.raises(ValueError, match='pretrained'):
        timm.create_model('SLaK_small', pretrained=True)


@pytest.mark.parametrize('kw,match', [(dict(kernel_size=[51, 49, 47, 5]), 'kernel_size'),
                                      (dict(kernel_size=[13, 11, 9, 7, 4]), 'odd'),
                                      (dict(conv_impl='cutlass'), 'conv_impl')])
def test_bad_arguments_raise_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        small_slak(**kw)
