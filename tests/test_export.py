"""export.py: from a tiny checkpoint of every method to timm, torchvision, detectron2 and safetensors files that load
strictly (the classifier excepted) and compute what our encoders compute."""
import argparse
import pickle
import re
import sys
import types

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file

import export as export_script
import models  # noqa: F401  (registers MIM_vit_*, vit_*_patch16, SLaK_*)
from models.r3d import r3d18_trunk
from models.sce import SCE
from models.spark import build_spark
from official_files import eztorch_checkpoint
from util.checkpoint import CheckpointError, save_checkpoint
from util.export.formats import export, write_detectron2
from util.export.read import Backbone, read_backbone
from util.pretrained import load_pretrained
from util.runtime import run_cli
from util.spark.checkpoint import output_names, save_spark_outputs

pytestmark = pytest.mark.usefixtures('one_thread')


@torch.no_grad()
def randomize(model, seed=0):
    """Every float tensor moved off its init (BN statistics and zero-init weights too), so a misplaced tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            noise = torch.rand(t.shape, generator=g)
            t.copy_(0.5 + noise if name.endswith('running_var') else t + 0.1 * (noise - 0.5))
    return model.eval()


@pytest.fixture
def tmp(module_tmp, request):
    """A folder of its own for each test, removed with module_tmp (exported ResNet-50s and R3D-18s are ~100 MB)."""
    folder = module_tmp / request.node.name
    folder.mkdir()
    return folder


def save_ours(folder, name, net, top_level=None, **args):
    """A checkpoint as the entry scripts write it (util/checkpoint.save_checkpoint)."""
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    save_checkpoint(str(folder), 0, 0, argparse.Namespace(**args), net, opt, name=name, top_level=top_level)
    return folder / name


def exported(ckpt, fmt, out, **kw):
    """export(); returns (backbone, the printed lines that load the file)."""
    lines = []
    backbone = export(str(ckpt), fmt, str(out), log=lines.append, **kw)
    return backbone, [line.strip() for line in lines[lines.index(f'wrote {out}; to load it:') + 1:]]


def run_lines(lines):
    """Runs the printed Python lines; returns their variables."""
    scope = {}
    exec('\n'.join(lines), scope)  # noqa: S102 -- our own printed usage lines
    return scope


def assert_same_tensors(got, expected):
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0, msg=k)


# ---- ViTs: LocalMIM / FreezeOut, MAE layout, fine-tuned, linear probe

@pytest.fixture(scope='module')
def localmim(module_tmp):
    model = randomize(timm.create_model('MIM_vit_tiny_patch16', img_size=32))
    return model, save_ours(module_tmp, 'mim.pth', model, model='MIM_vit_tiny_patch16', how_scale=None)


def test_localmim_to_timm_vit_same_features_and_printed_line_loads(localmim, tmp):
    model, ckpt = localmim
    backbone, lines = exported(ckpt, 'timm', tmp / 'vit.pth')
    assert backbone.timm_name == 'vit_tiny_patch16_224' and backbone.num_classes == 0
    assert backbone.dropped == {'decoder.*': 88, 'norm.<tap>.*': 6, 'hog_enc.*': 4}
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0)
    vit.load_state_dict(torch.load(tmp / 'vit.pth'), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # mask ratio 0 with increasing noise: every patch, in order
        latents, _, _ = model.forward_encoder(x, 0.0, noise=torch.arange(4.0).expand(2, 4))
        torch.testing.assert_close(vit.eval().forward_features(x), latents[-1], rtol=1e-5, atol=1e-5)
    assert "img_size=32" in lines[1] and 'antialiasing' in lines[-1] and lines[-1].startswith('#')
    timm_model = run_lines(lines)['model']  # at the trained 32 px, 1000 classes: pos_embed as trained, head new
    assert timm_model.pretrained_cfg['mean'] == (0.485, 0.456, 0.406)
    torch.testing.assert_close(timm_model.blocks[11].mlp.fc2.weight, model.blocks[11].mlp.fc2.weight)
    torch.testing.assert_close(timm_model.norm.weight, model.norm[3].weight)
    torch.testing.assert_close(timm_model.pos_embed, model.pos_embed, rtol=0, atol=0)
    assert timm_model.head.out_features == 1000


def test_timm_and_our_fine_tuning_resample_pos_embed_differently(localmim, tmp):
    """What the printed note says: at another size timm's antialiased bicubic and MAE's plain bicubic (our
    --finetune) give pos_embeds that differ by about 1e-2."""
    _, ckpt = localmim
    exported(ckpt, 'timm', tmp / 'vit.pth')
    theirs = timm.create_model('vit_tiny_patch16_224', pretrained=True, img_size=64, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(tmp / 'vit.pth'))).pos_embed
    ours = timm.create_model('vit_tiny_patch16', img_size=64, num_classes=0)
    load_pretrained(ours, str(ckpt), verbose=False)
    difference = (theirs - ours.pos_embed).abs().max().item()
    assert 1e-3 < difference < 1e-1


def test_freezeout_checkpoint_exports_like_localmim(localmim, module_tmp, tmp):
    model, _ = localmim
    ckpt = save_ours(module_tmp, 'freezeout.pth', model, model='MIM_vit_tiny_patch16', how_scale='cubic')
    backbone = read_backbone(str(ckpt))
    assert backbone.what.startswith('LocalMIM + FreezeOut')
    assert_same_tensors(backbone.state, read_backbone(str(localmim[1])).state)


def test_mae_layout_drops_decoder_and_mask_token(tmp):
    vit = randomize(timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0))
    state = {**vit.state_dict(), 'mask_token': torch.zeros(1, 1, 128), 'decoder_embed.weight': torch.zeros(128, 192),
             'decoder_pred.bias': torch.zeros(768)}
    torch.save({'model': state}, tmp / 'mae.pth')
    backbone = read_backbone(str(tmp / 'mae.pth'))
    assert backbone.what.startswith('MAE pretraining')
    assert_same_tensors(backbone.state, vit.state_dict())


@pytest.fixture(scope='module')
def finetuned_vit(module_tmp):
    model = randomize(timm.create_model('vit_tiny_patch16', img_size=32, num_classes=6))  # global pool: fc_norm
    return model, save_ours(module_tmp, 'ft.pth', model, model='vit_tiny_patch16')


def test_finetuned_vit_keeps_its_classifier_and_logits(finetuned_vit, tmp):
    model, ckpt = finetuned_vit
    backbone, _ = exported(ckpt, 'timm', tmp / 'ft_timm.pth')
    assert (backbone.timm_name, backbone.timm_kwargs, backbone.num_classes) == \
        ('vit_tiny_patch16_224', {'global_pool': 'avg', 'img_size': 32}, 6)
    vit = timm.create_model('vit_tiny_patch16_224', global_pool='avg', img_size=32, num_classes=6)
    vit.load_state_dict(torch.load(tmp / 'ft_timm.pth'), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), model(x), rtol=1e-5, atol=1e-5)


def test_safetensors_round_trip_and_timm_line(finetuned_vit, tmp):
    model, ckpt = finetuned_vit
    out = tmp / 'ft.safetensors'
    backbone, lines = exported(ckpt, 'safetensors', out)
    assert_same_tensors(load_file(out), backbone.state)
    lines[-1] = lines[-1].replace('num_classes=6,', 'num_classes=6, img_size=32,', 1)
    timm_model = run_lines(lines)['model'].eval()  # 6 classes: the file's classifier is kept
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), model(x), rtol=1e-5, atol=1e-5)


def test_linear_probe_head_is_folded_into_one_linear(tmp):
    model = timm.create_model('vit_tiny_patch16', img_size=32, num_classes=3, global_pool=False)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(192, affine=False, eps=1e-6), model.head)  # --linprobe
    randomize(model)
    torch.save({'model': model.state_dict()}, tmp / 'lin.pth')
    exported(tmp / 'lin.pth', 'timm', tmp / 'lin_timm.pth')
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=3)
    vit.load_state_dict(torch.load(tmp / 'lin_timm.pth'), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), model(x), rtol=1e-4, atol=1e-5)


def vitdet_keys(depth):
    """ViTDet's ViT under SimpleFeaturePyramid (detectron2 projects/ViTDet): backbone.net.{patch_embed.proj,
    pos_embed, blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}}; no cls token, no final norm."""
    keys = {'backbone.net.pos_embed', 'backbone.net.patch_embed.proj.weight', 'backbone.net.patch_embed.proj.bias'}
    for i in range(depth):
        for layer in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'backbone.net.blocks.{i}.{layer}.weight', f'backbone.net.blocks.{i}.{layer}.bias'}
    return keys


def test_vit_to_detectron2_vitdet_layout(localmim, tmp):
    model, ckpt = localmim
    exported(ckpt, 'detectron2', tmp / 'vit.pkl')
    with open(tmp / 'vit.pkl', 'rb') as f:
        payload = pickle.load(f, encoding='latin1')  # as DetectionCheckpointer reads it
    assert payload['matching_heuristics'] is True and payload['__author__']
    weights = payload['model']
    assert set(weights) == vitdet_keys(12)
    assert weights['backbone.net.pos_embed'].shape == (1, 14 * 14 + 1, 192)  # ViTDet's pretrain_img_size=224
    assert weights['backbone.net.pos_embed'][0, 0].tolist() == model.pos_embed[0, 0].tolist()  # the cls slot
    assert (weights['backbone.net.blocks.3.attn.qkv.weight'] == model.blocks[3].attn.qkv.weight.detach().numpy()).all()


# ---- CNNs: SparK ResNet / ConvNeXt, torchvision, detectron2

@pytest.fixture(scope='module')
def spark_outputs(module_tmp):
    """main_spark.py's files for a tiny SparK ResNet-18 and ConvNeXt-atto at 64 px."""
    runs = {}
    for name in ('resnet18', 'convnext_atto'):
        spark = randomize(build_spark(name, input_size=64))
        args = argparse.Namespace(model=name, exp_dir=str(module_tmp), input_size=64)
        save_spark_outputs(args, 0, types.SimpleNamespace(num_updates=0, scaler=None), spark,
                           torch.optim.SGD(spark.parameters(), lr=0.1), {'min_loss': 1.0, 'last_loss': 1.0})
        encoder = {k.removeprefix('sparse_encoder.sp_cnn.'): v for k, v in spark.state_dict().items()
                   if k.startswith('sparse_encoder.sp_cnn.')}
        files = {what: module_tmp / file for what, file in output_names(name).items()}
        files['official'] = module_tmp / f'{name}_official_spark_style.pth'  # the official file: `module` only
        torch.save({'module': torch.load(files['resume'])['module'], 'arch': name}, files['official'])
        runs[name] = (files, encoder)
    return runs


@pytest.mark.parametrize('name, file', [('resnet18', 'resume'), ('resnet18', 'encoder'),
                                        ('convnext_atto', 'resume'), ('convnext_atto', 'encoder_new'),
                                        ('convnext_atto', 'official')])
def test_spark_files_load_strictly_into_timm(spark_outputs, name, file, tmp):
    files, encoder = spark_outputs[name]
    backbone, lines = exported(files[file], 'timm', tmp / 'cnn.pth')
    assert backbone.timm_name == name
    assert backbone.what.endswith('SparK pretraining (encoder kept)' if file in ('resume', 'official') else 'encoder')
    state = torch.load(tmp / 'cnn.pth')
    assert_same_tensors({k: v for k, v in state.items() if not k.startswith('head.norm.')}, encoder)
    cnn = timm.create_model(name, num_classes=10)
    result = cnn.load_state_dict(state, strict=False)
    classifier = {'resnet18': ['fc.weight', 'fc.bias'], 'convnext_atto': ['head.fc.weight', 'head.fc.bias']}[name]
    assert result.missing_keys == classifier and not result.unexpected_keys
    printed = run_lines(lines)['model']
    assert_same_tensors({k: v for k, v in printed.state_dict().items() if k in state}, state)


def test_resnet_in_torchvision_same_features_as_timm(spark_outputs, tmp):
    files, _ = spark_outputs['resnet18']
    exported(files['resume'], 'timm', tmp / 'r18.pth')
    exported(files['resume'], 'torchvision', tmp / 'r18_tv.pth')
    ours, tv = timm.create_model('resnet18', num_classes=0), torchvision.models.resnet18()
    ours.load_state_dict(torch.load(tmp / 'r18.pth'), strict=True)
    result = tv.load_state_dict(torch.load(tmp / 'r18_tv.pth'), strict=False)
    assert result.missing_keys == ['fc.weight', 'fc.bias'] and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tv_features = torch.nn.Sequential(*list(tv.eval().children())[:-2])(x)
        torch.testing.assert_close(tv_features, ours.eval().forward_features(x), rtol=1e-5, atol=1e-5)


def test_finetuned_convnext_keeps_its_trained_head_norm(tmp):
    model = randomize(timm.create_model('convnext_atto', num_classes=10))
    torch.save({'model': model.state_dict()}, tmp / 'ft_convnext.pth')
    exported(tmp / 'ft_convnext.pth', 'timm', tmp / 'ft_convnext_timm.pth')
    state = torch.load(tmp / 'ft_convnext_timm.pth')
    assert_same_tensors(state, model.state_dict())  # head.norm included, not reset to 1 / 0
    again = timm.create_model('convnext_atto', num_classes=10)
    again.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_finetuned_resnet_keeps_fc_for_timm_and_drops_it_for_torchvision(tmp):
    model = randomize(timm.create_model('resnet18', num_classes=10))
    torch.save({'model': model.state_dict()}, tmp / 'ft.pth')
    backbone, _ = exported(tmp / 'ft.pth', 'timm', tmp / 'ft_timm.pth')
    assert (backbone.timm_name, backbone.num_classes) == ('resnet18', 10)
    exported(tmp / 'ft.pth', 'torchvision', tmp / 'ft_tv.pth')
    body = torchvision.models._utils.IntermediateLayerGetter(torchvision.models.resnet18(), {'layer4': '0'})
    body.load_state_dict(torch.load(tmp / 'ft_tv.pth'), strict=True)  # an FPN backbone's body


def detectron2_resnet_keys(depths, bottleneck):
    """detectron2's ResNet names (detectron2/modeling/backbone/resnet.py, as its convert-torchvision-to-d2.py
    produces): stem.conv1 + its norm; res2..res5 blocks with conv1..conv3 (bottleneck) or conv1..conv2, each with
    a .norm, and in the first block of a stage whose shape changes a shortcut conv + norm. BN tensors: weight,
    bias, running_mean, running_var, num_batches_tracked (SyncBN keeps it; SparK's R-50 file has 318 entries)."""
    bn = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')
    keys = {'stem.conv1.weight'} | {f'stem.conv1.norm.{t}' for t in bn}
    for stage, depth in enumerate(depths, start=2):
        for block in range(depth):
            convs = ['conv1', 'conv2', 'conv3'] if bottleneck else ['conv1', 'conv2']
            if block == 0 and (bottleneck or stage > 2):
                convs.append('shortcut')
            for conv in convs:
                keys |= {f'res{stage}.{block}.{conv}.weight'} | {f'res{stage}.{block}.{conv}.norm.{t}' for t in bn}
    return keys


def read_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f, encoding='latin1')


def test_resnet18_detectron2_names_and_shapes(spark_outputs, tmp):
    files, encoder = spark_outputs['resnet18']
    exported(files['encoder'], 'detectron2', tmp / 'r18.pkl')
    payload = read_pickle(tmp / 'r18.pkl')
    assert payload['matching_heuristics'] is True and payload['__author__']
    weights = payload['model']
    assert set(weights) == detectron2_resnet_keys((2, 2, 2, 2), bottleneck=False)
    assert weights['stem.conv1.weight'].shape == (64, 3, 7, 7)
    assert (weights['res3.0.shortcut.norm.running_var'] == encoder['layer2.0.downsample.1.running_var'].numpy()).all()
    assert (weights['res5.1.conv2.weight'] == encoder['layer4.1.conv2.weight'].numpy()).all()


@pytest.fixture(scope='module')
def resnet50_encoder(module_tmp):
    """A SparK `resnet50_1kpretrained.pth`-style file: the timm ResNet-50 without classifier."""
    model = randomize(timm.create_model('resnet50', num_classes=0, global_pool=''))
    torch.save(model.state_dict(), module_tmp / 'resnet50_1kpretrained.pth')
    return model, module_tmp / 'resnet50_1kpretrained.pth'


def test_resnet50_detectron2_layout_and_mask_rcnn_body(resnet50_encoder, tmp):
    model, path = resnet50_encoder
    exported(path, 'detectron2', tmp / 'r50.pkl')
    weights = read_pickle(tmp / 'r50.pkl')['model']
    assert len(weights) == 318 and set(weights) == detectron2_resnet_keys((3, 4, 6, 3), bottleneck=True)
    assert weights['res2.0.shortcut.weight'].shape == (256, 64, 1, 1)
    assert weights['res5.2.conv3.norm.weight'].shape == (2048,)
    assert (weights['res4.5.conv2.norm.running_mean'] == model.layer3[5].bn2.running_mean.numpy()).all()
    _, lines = exported(path, 'torchvision', tmp / 'r50_tv.pth')
    assert 'maskrcnn_resnet50_fpn(weights=None, weights_backbone=None' in lines[-2]
    detector = run_lines(lines)['detector']
    torch.testing.assert_close(detector.backbone.body.layer3[5].bn2.running_mean, model.layer3[5].bn2.running_mean)


# ---- SLaK, SCE

@pytest.fixture(scope='module')
def slak(module_tmp):
    kwargs = dict(width_factor=0.25, kernel_size=[7, 7, 5, 3, 3], Decom=True)
    model = randomize(timm.create_model('SLaK_tiny', num_classes=6, **kwargs))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = save_ours(module_tmp, 'slak.pth', model, top_level={'model_ema': ema}, model='SLaK_tiny', **kwargs)
    return model, ema, kwargs, path


def test_slak_exports_to_our_registered_name_with_its_kernels(slak, tmp):
    model, ema, kwargs, path = slak
    backbone, lines = exported(path, 'timm', tmp / 'slak.pth')
    assert backbone.timm_name == 'SLaK_tiny' and backbone.timm_kwargs == dict(kwargs, bn=True)
    printed = run_lines(lines)['model'].eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(printed(x), model(x), rtol=1e-5, atol=1e-5)
    assert_same_tensors(read_backbone(str(path), ema=True).state, ema)


def test_slak_without_args_is_recognised_from_its_shapes(slak, tmp):
    model, _, kwargs, _ = slak
    torch.save({'model': model.state_dict()}, tmp / 'official.pth')
    backbone = read_backbone(str(tmp / 'official.pth'))
    assert backbone.timm_name == 'SLaK_tiny' and backbone.timm_kwargs == dict(kwargs, bn=True)


def test_resnet_depth_detectron2_cannot_build_is_refused(tmp):
    backbone = Backbone('ResNet encoder', 'resnet', {}, timm_name='resnet200')
    with pytest.raises(ValueError, match=r'^--format detectron2: detectron2 builds ResNets of depth 18, 34, 50, 101, '
                                         r'152; this checkpoint holds a resnet200: use --format timm$'):
        write_detectron2(backbone, str(tmp / 'r200.pkl'))
    assert not (tmp / 'r200.pkl').exists()


def test_eztorch_lightning_checkpoint_exports_its_trunk(tmp):
    trunk = randomize(r3d18_trunk())
    state = {f'trunk.model.{k}': v for k, v in trunk.model.state_dict().items()}
    path = eztorch_checkpoint(tmp / 'eztorch.ckpt', state)
    backbone, _ = exported(path, 'timm', tmp / 'r3d.pth')
    assert backbone.family == 'r3d'
    assert_same_tensors(torch.load(tmp / 'r3d.pth', weights_only=True), trunk.model.state_dict())


def test_sce_trunk_in_r3d_layout(module_tmp, tmp):
    sce = SCE(queue_size=64)
    randomize(sce.trunk)
    sce.momentum_trunk = sce.trunk  # a real key set; shared tensors keep the file at one trunk's size
    path = save_ours(module_tmp, 'sce.pth', sce, model='sce')
    backbone, lines = exported(path, 'timm', tmp / 'r3d.pth')
    assert backbone.family == 'r3d' and {'queue', 'projector.*', 'predictor.*', 'momentum_trunk.*'} <= set(
        backbone.dropped)
    trunk = run_lines(lines)['trunk'].eval()
    reference = r3d18_trunk()
    reference.model.load_state_dict(torch.load(tmp / 'r3d.pth'), strict=True)
    x = torch.randn(1, 3, 2, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(trunk(x), sce.trunk(x), rtol=1e-5, atol=1e-5)


# ---- errors

def test_unknown_or_unsuitable_checkpoints_are_one_line_errors(localmim, tmp):
    torch.save({'model': {'encoder.layers.0.weight': torch.zeros(2, 2)}}, tmp / 'other.pth')
    with pytest.raises(ValueError, match=r'holds no model export knows .*first keys: encoder\.layers\.0\.weight'):
        read_backbone(str(tmp / 'other.pth'))
    (tmp / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='cannot be read'):
        read_backbone(str(tmp / 'junk.pth'))
    with pytest.raises(FileNotFoundError, match='no such checkpoint file'):
        read_backbone(str(tmp / 'missing.pth'))
    with pytest.raises(ValueError, match='takes the ResNets torchvision has'):
        export(str(localmim[1]), 'torchvision', str(tmp / 'x.pth'), log=lambda line: None)
    with pytest.raises(ValueError, match='must end with .pkl'):
        export(str(localmim[1]), 'detectron2', str(tmp / 'x.pth'), log=lambda line: None)
    with pytest.raises(ValueError, match='no EMA weights'):
        read_backbone(str(localmim[1]), ema=True)


def test_command_line_error_is_one_line_with_exit_code_2(tmp, monkeypatch, capsys):
    torch.save({'state_dict': {'w': torch.zeros(1)}}, tmp / 'other.pth')
    monkeypatch.setattr(sys, 'argv', ['export.py', str(tmp / 'other.pth'), '--format', 'timm', '--out',
                                      str(tmp / 'x.pth')])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(export_script.main, export_script.get_args_parser())
    assert exit_info.value.code == 2
    assert re.fullmatch(r'export\.py: error: .*holds no model export knows.*\n', capsys.readouterr().err)
    assert not (tmp / 'x.pth').exists()
