"""Fine-tuning ViTs (models/vit.py) and loading pretraining checkpoints into them (util/pretrained.py)."""
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import models  # noqa: F401  (registers vit_* and MIM_vit_*)
from util.pretrained import load_pretrained

TAP_NORMS = {f'norm.{k}.{p}' for k in range(4) for p in ('weight', 'bias')}


pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


def vit(global_pool=True, img_size=64, num_classes=10, **kw):
    return timm.create_model('vit_tiny_patch16', global_pool=global_pool, img_size=img_size,
                             num_classes=num_classes, **kw)


def save(tmp_path, sd, name='ckpt.pth'):
    path = tmp_path / name
    torch.save({'model': sd, 'epoch': 3, 'args': {'model': 'x'}}, path)
    return str(path)


@pytest.fixture(scope='module')
def localmim_sd():
    torch.manual_seed(0)
    return timm.create_model('MIM_vit_tiny_patch16', img_size=64).state_dict()


def test_key_layout_of_both_pooling_modes():
    gp, cls = set(vit(True).state_dict()), set(vit(False).state_dict())
    assert {'fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias'} <= gp
    assert not any(k.startswith('norm.') for k in gp)
    assert {'norm.weight', 'norm.bias', 'head.weight', 'head.bias'} <= cls
    assert not any(k.startswith('fc_norm.') for k in cls)
    assert gp - {'fc_norm.weight', 'fc_norm.bias'} == cls - {'norm.weight', 'norm.bias'}
    encoder = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias'}
    assert encoder <= gp and sum(k.startswith('blocks.11.') for k in gp) == 12


@pytest.mark.parametrize('global_pool', [True, False])
@pytest.mark.parametrize('size', [32, 64])
def test_forward_shape(global_pool, size):
    model = vit(global_pool, img_size=size, num_classes=7, drop_path_rate=0.1).eval()
    assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


def test_factory_kwargs():
    model = timm.create_model('vit_tiny_patch16', num_classes=5, img_size=32, drop_path_rate=0.2)
    assert model.head.out_features == 5 and model.global_pool == 'avg'
    assert abs(model.blocks[-1].drop_path1.drop_prob - 0.2) < 1e-6
    assert model.blocks[0].norm1.eps == 1e-6 and model.fc_norm.eps == 1e-6 and model.blocks[0].attn.qkv.bias is not None
    with pytest.raises(ValueError, match='no pretrained'):
        timm.create_model('vit_tiny_patch16', pretrained=True)


@pytest.mark.parametrize('global_pool', [True, False])
def test_localmim_checkpoint_loads_in_both_pooling_modes(tmp_path, localmim_sd, global_pool, capsys):
    path = save(tmp_path, localmim_sd)
    torch.manual_seed(1)
    model = vit(global_pool)
    report = load_pretrained(model, path)
    out = capsys.readouterr().out
    sd = model.state_dict()

    encoder = [k for k in localmim_sd if not k.startswith(('decoder.', 'hog_enc.')) and k not in TAP_NORMS]
    assert sorted(report['loaded']) == sorted(encoder)
    for k in encoder:
        assert torch.equal(sd[k], localmim_sd[k]), k
    assert set(report['dropped']) == set(localmim_sd) - set(encoder)
    assert TAP_NORMS <= set(report['dropped'])
    assert report['resampled'] == []
    assert abs(model.head.weight.std().item() - 2e-5) < 5e-6
    assert torch.all(model.head.bias == 0)
    norm = 'fc_norm' if global_pool else 'norm'
    assert set(report['initialised']) == {'head.weight', 'head.bias', f'{norm}.weight', f'{norm}.bias'}
    assert torch.all(sd[f'{norm}.weight'] == 1) and torch.all(sd[f'{norm}.bias'] == 0)
    assert 'head.weight' in out and f'{norm}.weight' in out
    if not global_pool:
        assert 'no final norm' in out
    model.eval()(torch.randn(1, 3, 64, 64))


def test_mae_checkpoint_uses_its_norm_in_cls_mode(tmp_path):
    src = vit(False, num_classes=1000).state_dict()
    src['norm.weight'] = torch.rand(192) + 0.5
    src['norm.bias'] = torch.randn(192)
    for k in ('head.weight', 'head.bias'):
        del src[k]
    src['mask_token'] = torch.zeros(1, 1, 128)
    src['decoder_embed.weight'] = torch.randn(128, 192)
    src['decoder_pos_embed'] = torch.randn(1, 17, 128)
    src['decoder_blocks.0.norm1.weight'] = torch.ones(128)
    src['decoder_pred.weight'] = torch.randn(768, 128)
    src = {f'module.{k}': v for k, v in src.items()}  # a DDP-wrapped save
    path = save(tmp_path, src)

    model = vit(False)
    report = load_pretrained(model, path, verbose=False)
    assert torch.equal(model.norm.weight, src['module.norm.weight'])
    assert torch.equal(model.norm.bias, src['module.norm.bias'])
    assert set(report['initialised']) == {'head.weight', 'head.bias'}
    assert {'mask_token', 'decoder_embed.weight', 'decoder_pos_embed', 'decoder_pred.weight'} <= set(report['dropped'])

    # under global pooling MAE's final norm is unused: dropped, fc_norm initialised
    gp = vit(True)
    report = load_pretrained(gp, path, verbose=False)
    assert {'norm.weight', 'norm.bias'} <= set(report['dropped'])
    assert {'fc_norm.weight', 'fc_norm.bias'} <= set(report['initialised'])


def test_pos_embed_resampled_from_14x14(tmp_path, capsys):
    torch.manual_seed(2)
    src = vit(True, img_size=256).state_dict()
    src['pos_embed'] = torch.randn(1, 1 + 14 * 14, 192)
    src['head.weight'] = torch.randn(1000, 192)
    src['head.bias'] = torch.randn(1000)
    path = save(tmp_path, src)

    model = vit(True, img_size=256)
    report = load_pretrained(model, path)
    assert report['resampled'] == ['pos_embed']
    assert '14x14 -> 16x16' in capsys.readouterr().out
    pos = model.pos_embed.detach()
    assert pos.shape == (1, 1 + 16 * 16, 192)
    assert torch.equal(pos[:, :1], src['pos_embed'][:, :1])
    expect = resample_abs_pos_embed(src['pos_embed'], [16, 16], num_prefix_tokens=1,
                                    interpolation='bicubic', antialias=False, align_corners=False)
    assert torch.equal(pos, expect)
    assert {'head.weight', 'head.bias'} <= set(report['dropped'])  # 1000 classes vs 10


def test_same_shape_head_is_kept(tmp_path):
    src = vit(True, img_size=32).state_dict()
    report = load_pretrained(vit(True, img_size=32), save(tmp_path, src), verbose=False)
    assert report['initialised'] == [] and report['dropped'] == []


def test_other_architecture_does_not_fit(tmp_path):
    src = timm.create_model('vit_small_patch16', img_size=32, num_classes=0).state_dict()
    with pytest.raises(ValueError, match='does not fit') as e:
        load_pretrained(vit(True, img_size=32), save(tmp_path, src))
    assert 'shape mismatch' in str(e.value) and '\n' not in str(e.value)

    src = vit(True, img_size=32).state_dict()
    del src['blocks.0.attn.qkv.weight']
    with pytest.raises(ValueError, match='does not fit.*missing blocks.0.attn.qkv.weight'):
        load_pretrained(vit(True, img_size=32), save(tmp_path, src))

    resnet = timm.create_model('resnet18', num_classes=0).state_dict()  # another model family: it says so
    with pytest.raises(ValueError, match=r'does not fit model FinetuneViT\(.*\): it holds a ResNet \('):
        load_pretrained(vit(True, img_size=32), save(tmp_path, resnet))


def test_spark_resnet_encoder_into_timm_resnet(tmp_path, capsys):
    torch.manual_seed(3)
    src = {k: v for k, v in timm.create_model('resnet18').state_dict().items() if not k.startswith('fc.')}
    path = tmp_path / 'resnet18_1kpretrained_timm_style.pth'
    torch.save(src, path)  # SparK's timm-style file: the raw encoder state dict
    model = timm.create_model('resnet18', num_classes=10)
    report = load_pretrained(model, str(path))
    assert set(report['initialised']) == {'fc.weight', 'fc.bias'}
    assert 'fc.weight' in capsys.readouterr().out
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in src.items())
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_official_checkpoint_with_namespace_args(tmp_path):
    import argparse
    path = tmp_path / 'official.pth'
    torch.save({'model': vit(True, img_size=32).state_dict(), 'args': argparse.Namespace(lr=1e-3)}, path)
    assert load_pretrained(vit(True, img_size=32), str(path), verbose=False)['dropped'] == []
