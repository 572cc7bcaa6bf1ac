"""util/export/read.py's recognition of what a checkpoint holds: the model names it tries, EMA weights in
run_finetune.py's layout, the SLaK size a run names, SparK's custom CNNs, and the notes it prints."""
import argparse

import pytest
import timm
import torch

import models  # noqa: F401  (registers SLaK_*, the SparK custom CNNs)
from test_export import exported, randomize, run_lines, save_ours
from util.export.read import CONVNEXTS, RESNETS, SLAKS, read_backbone

pytestmark = pytest.mark.usefixtures('one_thread')


def test_every_name_export_tries_is_a_timm_model():
    assert [n for n in RESNETS + CONVNEXTS + tuple(SLAKS) if not timm.is_model(n)] == []


@pytest.mark.parametrize('name', list(SLAKS))
def test_slak_sizes_are_told_apart_by_their_third_stage_and_stem(name):
    blocks, stem = SLAKS[name]
    with torch.device('meta'):
        model = timm.create_model(name, kernel_size=[7, 7, 5, 3, 3])
    assert len(model.stages[2]) == blocks and model.downsample_layers[0][0].out_channels == stem


def test_run_finetune_ema_weights_are_read_from_extra(tmp_path):
    model = randomize(timm.create_model('resnet18', num_classes=4))
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({'model': model.state_dict(), 'extra': {'ema': {f'module.{k}': v for k, v in ema.items()}}},
               tmp_path / 'ft.pth')
    state = read_backbone(str(tmp_path / 'ft.pth'), ema=True).state
    assert state.keys() == ema.keys() and all(torch.equal(state[k], ema[k]) for k in ema)


def test_the_slak_size_a_run_names_wins_over_a_smaller_one_of_the_same_layout(tmp_path):
    """SLaK_base at width 0.25 has SLaK_small's layout at width 1/3: the name in the run's args decides."""
    kwargs = dict(width_factor=0.25, kernel_size=[7, 7, 5, 3, 3], Decom=True)
    model = timm.create_model('SLaK_base', num_classes=3, **kwargs)
    path = save_ours(tmp_path, 'base.pth', model, model='SLaK_base', **kwargs)
    backbone = read_backbone(str(path))
    assert backbone.timm_name == 'SLaK_base' and backbone.timm_kwargs['width_factor'] == 0.25


def test_a_spark_custom_cnn_exports_to_its_registered_name(tmp_path):
    model = randomize(timm.create_model('your_convnet_32px', num_classes=5))
    path = save_ours(tmp_path, 'custom.pth', model, model='your_convnet_32px')
    backbone, lines = exported(path, 'timm', tmp_path / 'custom_timm.pth')
    assert (backbone.family, backbone.timm_name, backbone.num_classes) == ('custom', 'your_convnet_32px', 5)
    assert backbone.what == 'your_convnet_32px (models/spark_custom_cnn.py), fine-tuned (5 classes)'
    assert lines[0].startswith('import timm, torch, models  #')  # a .pth needs no safetensors
    printed = run_lines(lines)['model'].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(printed(x), model(x))


def test_a_folded_linear_probe_is_named_in_the_notes(tmp_path):
    model = timm.create_model('resnet18', num_classes=3)
    model.fc = torch.nn.Sequential(torch.nn.BatchNorm1d(512, affine=False, eps=1e-6), model.fc)  # --linprobe
    torch.save({'model': randomize(model).state_dict(), 'args': vars(argparse.Namespace(model='resnet18'))},
               tmp_path / 'lin.pth')
    assert read_backbone(str(tmp_path / 'lin.pth')).notes == [
        'linear probe: fc.0.* (BatchNorm1d) folded into fc.weight/bias']
