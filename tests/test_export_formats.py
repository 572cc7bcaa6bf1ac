"""util/export/formats.py: the printed lines that load each file run as printed (safetensors for our own factories
too), and the detectron2 files and flags of a fine-tuned ResNet and a ViT."""
import pytest
import timm
import torch

import models  # noqa: F401  (registers the SparK custom CNNs)
from test_export import exported, randomize, read_pickle, run_lines

pytestmark = pytest.mark.usefixtures('one_thread')


def test_a_custom_cnn_in_safetensors_loads_with_the_printed_lines(tmp_path):
    model = randomize(timm.create_model('your_convnet_32px', num_classes=5))
    torch.save({'model': model.state_dict(), 'args': {'model': 'your_convnet_32px'}}, tmp_path / 'custom.pth')
    _, lines = exported(tmp_path / 'custom.pth', 'safetensors', tmp_path / 'custom.safetensors')
    assert 'safetensors.torch.load_file(' in lines[-1]
    printed = run_lines(lines)['model'].eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(printed(x), model(x))


def test_a_fine_tuned_resnet_goes_to_detectron2_without_its_classifier_and_with_its_width_flag(tmp_path):
    for name, flag in (('resnet18', True), ('resnet50', False)):
        model = timm.create_model(name, num_classes=7)
        torch.save({'model': model.state_dict()}, tmp_path / f'{name}.pth')
        _, (line,) = exported(tmp_path / f'{name}.pth', 'detectron2', tmp_path / f'{name}.pkl')
        weights = read_pickle(tmp_path / f'{name}.pkl')['model']
        assert not [k for k in weights if 'fc.' in k] and 'stem.conv1.weight' in weights
        assert f'MODEL.RESNETS.DEPTH {name[6:]} ' in line
        assert ('MODEL.RESNETS.RES2_OUT_CHANNELS 64' in line) == flag  # detectron2's default (256) is for depth >= 50


def test_the_vitdet_line_names_the_vits_width_and_depth(tmp_path):
    model = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=0)
    torch.save({'model': model.state_dict()}, tmp_path / 'vit.pth')
    _, (line,) = exported(tmp_path / 'vit.pth', 'detectron2', tmp_path / 'vit.pkl')
    assert 'embed_dim=192, depth=12, img_size=1024, pretrain_img_size=224' in line
    assert read_pickle(tmp_path / 'vit.pkl')['model']['backbone.net.pos_embed'].shape == (1, 14 * 14 + 1, 192)


def test_detectron2_refuses_what_it_cannot_build(tmp_path):
    model = timm.create_model('convnext_atto', num_classes=0)
    torch.save({'model': model.state_dict()}, tmp_path / 'convnext.pth')
    with pytest.raises(ValueError, match=r'^--format detectron2 takes ResNets and ViTs; this checkpoint holds ConvNeXt '
                                         r'encoder: use --format timm$'):
        exported(tmp_path / 'convnext.pth', 'detectron2', tmp_path / 'convnext.pkl')
    assert not (tmp_path / 'convnext.pkl').exists()
