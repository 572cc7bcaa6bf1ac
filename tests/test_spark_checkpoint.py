"""SparK beyond the core module: the custom-model route, official file names and formats (util/spark/checkpoint.py)
checked against the official modules' layout (fixtures/spark_official_layout.json: spark_style resume both ways,
official ConvNeXt keys), a 2-process launch, reconstruction pictures, --accum_iter, drop path defaults."""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from timm.optim import Lamb
import torch

import main_spark
from helpers import REPO
from models.convnext_keys import convnext_official_to_timm
from models.spark import build_spark, spark_default_drop_path
from util.data.datasets import ImageFolderOrFlat
from util.export.frozen_eval import build_frozen_encoder
from util.export.read import read_backbone
from util.data.vis_batch import vis_transform
from util.pretrained import load_pretrained
from util.spark.checkpoint import resume_spark, save_spark_outputs
from util.spark.schedule import spark_param_groups
from util.spark.vis import spark_figure
from util.train_step import TrainStep


@pytest.fixture(scope='module')
def custom_run(module_tmp):
    """--model=your_convnet on the demo data, 2 epochs, 2 micro-steps per optimizer step."""
    tmp = module_tmp
    mp = pytest.MonkeyPatch()
    mp.setenv('DEMO_DATA_ROOT', str(tmp / 'demo'))
    out = tmp / 'out'
    argv = ['--exp_name=c', f'--exp_dir={out}', '--data_path=demo', '--model=your_convnet', '--input_size=64',
            '--bs=48', '--accum_iter=2', '--ep=2', '--wp_ep=1', '--num_workers=0', '--device=cpu', '--print_freq=2',
            '--vis_freq=1', '--base_lr=8e-2']  # 6 steps: a high lr, so that the model measurably learns
    main_spark.main(main_spark.get_args_parser().parse_args(argv))
    mp.undo()
    return out


def fixed_batch_loss(state, images):
    """SparK's masked reconstruction loss of `your_convnet` (fresh from main_spark's seeded init, or `state`) on fixed
    images and a fixed mask, in training mode (batch statistics) as during pretraining."""
    torch.manual_seed(0)  # main_spark: setup_run seeds 0, then builds the model
    model = build_spark('your_convnet', 64, 0.6, False, spark_default_drop_path('your_convnet'))
    if state is not None:
        model.load_state_dict(state)
    mask = model.mask(len(images), 'cpu', generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(model.train()(images, mask))


def test_custom_model_pretrains_on_demo_data(custom_run, monkeypatch):
    ckpt = torch.load(custom_run / 'your_convnet_still_pretraining.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['step'] == 2 * (144 // 48)       # 144 demo images, one step per 48
    assert ckpt['args']['batch_size'] == 24
    # it learned: on the same images and mask, the pretrained model reconstructs better than the untrained one
    monkeypatch.setenv('DEMO_DATA_ROOT', str(custom_run.parent / 'demo'))
    data = ImageFolderOrFlat(main_spark.data_root('demo'), vis_transform(64))
    images = torch.stack([data[i][0] for i in range(0, len(data), 3)])
    untrained, trained = fixed_batch_loss(None, images), fixed_batch_loss(ckpt['model'], images)
    print(f'fixed-batch loss: untrained {untrained:.4f}, trained {trained:.4f}')
    assert trained < untrained - 0.01  # not learning leaves it unchanged: batch statistics, same weights
    encoder = torch.load(custom_run / 'your_convnet_1kpretrained.pth', weights_only=True)
    result = timm.create_model('your_convnet', num_classes=6).load_state_dict(encoder, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    assert sorted(p.name for p in (custom_run / 'vis').iterdir()) == ['epoch0000.png', 'epoch0001.png']


def test_a_custom_model_checkpoint_is_scored_and_exported_as_its_registered_model(custom_run):
    """eval_knn.py and export.py find a models/spark_custom_cnn.py model by the name the SparK checkpoint stores
    (`arch`)."""
    backbone = read_backbone(str(custom_run / 'your_convnet_still_pretraining.pth'))
    encoder = torch.load(custom_run / 'your_convnet_1kpretrained.pth', weights_only=True)
    assert backbone.family == 'custom' and backbone.timm_name == 'your_convnet' and backbone.num_classes == 0
    assert backbone.state.keys() == encoder.keys() and all(torch.equal(backbone.state[k], v) for k, v in encoder.items())
    frozen, what = build_frozen_encoder(str(custom_run / 'your_convnet_still_pretraining.pth'))
    model = timm.create_model('your_convnet', num_classes=0).eval()
    model.load_state_dict(encoder)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(frozen(images), model(images))  # the template's pooled features
    assert 'your_convnet' in what


def test_32px_custom_model_masks_a_4x4_grid_with_a_narrow_decoder():
    """your_convnet_32px: total stride 8, so SparK at 32 px masks a 4x4 grid; --dec_width sets the decoder width
    (the official 768 is the default) and the densify projections follow it."""
    torch.manual_seed(0)
    model = build_spark('your_convnet_32px', 32, decoder_width=64)
    assert (model.fmap_h, model.fmap_w) == (4, 4) and model.dense_decoder.width == 64
    assert len(model.dense_decoder.dec) == 3 and model.dense_decoder.proj.in_channels == 64 // 8
    maps = model.sparse_encoder.sp_cnn(torch.randn(2, 3, 32, 32), hierarchical=True)
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 16, 16), (64, 8, 8), (128, 4, 4)]
    model(torch.randn(2, 3, 32, 32)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    args = main_spark.get_args_parser().parse_args([])
    assert args.dec_width == 768 and build_spark('resnet18', 64).dense_decoder.width == 768
    classifier = timm.create_model('your_convnet_32px', num_classes=10)
    assert classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10) and classifier.get_classifier() is classifier.fc
    with pytest.raises(ValueError, match='stem_stride must be 4'):
        timm.create_model('your_convnet', stem_stride=2)


def test_official_file_names_and_keys(custom_run):
    spark_style = custom_run / 'your_convnet_withdecoder_1kpretrained_spark_style.pth'
    timm_style = custom_run / 'your_convnet_1kpretrained_timm_style.pth'
    assert os.path.realpath(spark_style) == os.path.realpath(custom_run / 'your_convnet_still_pretraining.pth')
    assert os.path.realpath(timm_style) == os.path.realpath(custom_run / 'your_convnet_1kpretrained.pth')
    ckpt = torch.load(spark_style, weights_only=True)
    # what the official resume/visualisation code reads
    assert ckpt['is_pretrain'] and ckpt['arch'] == 'your_convnet' and ckpt['input_size'] == 64
    assert ckpt['module']['config']['mask_ratio'] == 0.6 and len(ckpt['performance_desc'].split()) == 2
    assert all(torch.equal(ckpt['module'][k], v) for k, v in ckpt['model'].items())
    # one copy of the tensors on disk, not two
    assert os.path.getsize(spark_style) < 1.3 * sum(v.numel() * v.element_size() for v in ckpt['model'].values()) \
        + 2 * sum(v.numel() * v.element_size() for s in ckpt['optimizer']['state'].values() for v in s.values()
                  if torch.is_tensor(v))


def one_step_model(name, seed=0):
    torch.manual_seed(seed)
    model = build_spark(name, 64)
    optimizer = Lamb(spark_param_groups(model), lr=1e-3, betas=(0.9, 0.95), max_grad_norm=5.0)
    trainer = TrainStep(model, optimizer, 'cpu')
    trainer.backward(model(torch.randn(2, 3, 64, 64)))
    trainer.step()
    return model, optimizer, trainer


OFFICIAL_CONVNEXT = [  # timm -> official FB ConvNeXt names (written out here, independent of the library)
    (r'^stem\.(\d)\.', r'downsample_layers.0.\1.'),
    (r'^stages\.(\d)\.downsample\.(\d)\.', r'downsample_layers.\1.\2.'),
    (r'^stages\.(\d)\.blocks\.(\d+)\.conv_dw\.', r'stages.\1.\2.dwconv.'),
    (r'^stages\.(\d)\.blocks\.(\d+)\.mlp\.fc(\d)\.', r'stages.\1.\2.pwconv\3.'),
    (r'^stages\.(\d)\.blocks\.(\d+)\.', r'stages.\1.\2.'),
]
# The official SparK modules' layout (parameter order, keys, shapes, param groups, encoder file), generated once from
# the official code by fixtures/spark_official_layout_gen.py.
OFFICIAL = json.loads((Path(__file__).parent / 'fixtures' / 'spark_official_layout.json').read_text())['models']


def to_official(name):
    prefix = 'sparse_encoder.sp_cnn.'
    if not name.startswith(prefix) or 'head.' in name:
        return name
    rest = name[len(prefix):]
    for pattern, repl in OFFICIAL_CONVNEXT:
        rest, n = re.subn(pattern, repl, rest)
        if n:
            break
    return prefix + rest


def by_official_name(model):
    """{official name: our tensor} for every parameter and buffer, checked against the official key set and shapes."""
    ours = {to_official(k): v for k, v in model.state_dict().items()}
    ours.update({to_official(k): p for k, p in model.named_parameters()})
    return ours


def official_optimizer_index(layout):
    """{official parameter name: its index in the official optimizer state}: torch numbers the parameters group by
    group, each group in the module's parameter order."""
    flat = [name for group in layout['param_groups'] for name in group['params']]
    assert sorted(flat) == sorted(name for name, _ in layout['parameters'])
    return {name: i for i, name in enumerate(flat)}


def official_file(model, optimizer, arch):
    """What the official SparK writes as <arch>_withdecoder_1kpretrained_spark_style.pth: official key names, and the
    optimizer state indexed in the official module's parameter order, grouped as the official get_param_groups."""
    layout = OFFICIAL[arch]
    tensors = by_official_name(model)
    assert {k: list(v.shape) for k, v in tensors.items()} == dict(layout['state_dict'])  # what strict=True demands
    index = official_optimizer_index(layout)
    ours = {id(p): s for p, s in optimizer.state.items()}
    state = {index[name]: {k: v.clone() for k, v in ours[id(tensors[name])].items()}
                      for name, _ in layout['parameters'] if id(tensors[name]) in ours}
    step = optimizer.param_groups[0].get('step', 1)
    groups = [{'lr': 1e-3, 'betas': (0.9, 0.95), 'eps': 1e-6, 'weight_decay': 0.0, 'grad_averaging': True,
               'max_grad_norm': 5.0, 'trust_clip': False, 'always_adapt': False, 'bias_correction': True,
               'step': int(step), 'weight_decay_scale': g['weight_decay_scale'], 'lr_scale': 1.0,
               'params': [index[n] for n in g['params']]} for g in layout['param_groups']]
    module = {k: tensors[k].clone() for k, _ in layout['state_dict']}
    module['config'] = dict(layout['config'])
    return {'args': 'Namespace(...)', 'arch': arch, 'input_size': 64, 'epoch': 6, 'performance_desc': '0.5 0.6',
            'module': module, 'optimizer': {'state': state, 'param_groups': groups}, 'is_pretrain': True}


@pytest.mark.parametrize('arch', ['resnet18', 'convnext_tiny'])
def test_resume_from_official_spark_style_file(tmp_path, arch):
    """An official spark_style file (official names and parameter order) resumes: every parameter gets its own
    weights and optimizer state, and training goes on."""
    source, source_opt, _ = one_step_model(arch)
    path = tmp_path / f'{arch}_withdecoder_1kpretrained_spark_style.pth'
    torch.save(official_file(source, source_opt, arch), path)
    model, optimizer, trainer = one_step_model(arch, seed=1)
    epoch, step, _ = resume_spark(str(path), model, trainer)
    assert epoch == 6 and step is None
    theirs = dict(source.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[name]), name
        mine_state, their_state = optimizer.state.get(p, {}), source_opt.state.get(theirs[name], {})
        assert mine_state.keys() == their_state.keys() == {'exp_avg', 'exp_avg_sq'}, name
        assert all(torch.equal(mine_state[k], their_state[k]) for k in mine_state), name
    trainer.backward(model(torch.randn(2, 3, 64, 64)))  # the first LAMB step after resuming
    trainer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize('arch', ['resnet18', 'convnext_tiny'])
def test_written_files_have_the_official_layout(tmp_path, arch):
    """Our spark_style file loads strictly into the official SparK module (key set and shapes), its optimizer state
    is the official one (each official index holds the state of the right tensor), and the timm_style file is the
    official encoder's state dict; _1kpretrained.pth stays in timm names."""
    source, source_opt, trainer = one_step_model(arch)
    args = argparse.Namespace(model=arch, exp_dir=str(tmp_path), input_size=64)
    save_spark_outputs(args, 3, trainer, source, source_opt, {'min_loss': 0.5, 'last_loss': 0.6})
    layout, tensors = OFFICIAL[arch], by_official_name(source)

    ckpt = torch.load(tmp_path / f'{arch}_withdecoder_1kpretrained_spark_style.pth', weights_only=True)
    module = dict(ckpt['module'])
    assert module.pop('config') == layout['config']
    assert {k: list(v.shape) for k, v in module.items()} == dict(layout['state_dict'])
    assert all(torch.equal(v, tensors[k]) for k, v in module.items())
    assert ckpt['epoch'] == 3 and ckpt['is_pretrain'] and ckpt['arch'] == arch

    opt = ckpt['optimizer']
    index = official_optimizer_index(layout)
    assert [len(g['params']) for g in opt['param_groups']] == [len(g['params']) for g in layout['param_groups']]
    assert [g['weight_decay_scale'] for g in opt['param_groups']] == [g['weight_decay_scale']
                                                                       for g in layout['param_groups']]
    assert [i for g in opt['param_groups'] for i in g['params']] == list(range(len(index)))
    shapes = dict(layout['parameters'])
    for name, i in index.items():
        expected = source_opt.state[tensors[name]]
        assert list(opt['state'][i]['exp_avg'].shape) == shapes[name], name
        assert all(torch.equal(opt['state'][i][k], expected[k]) for k in ('exp_avg', 'exp_avg_sq')), name

    official_encoder = torch.load(tmp_path / f'{arch}_1kpretrained_timm_style.pth', weights_only=True)
    assert {k: list(v.shape) for k, v in official_encoder.items()} == dict(layout['encoder_state_dict'])
    assert all(torch.equal(v, tensors['sparse_encoder.sp_cnn.' + k]) for k, v in official_encoder.items())
    encoder = torch.load(tmp_path / f'{arch}_1kpretrained.pth', weights_only=True)
    result = timm.create_model(arch, num_classes=5).load_state_dict(encoder, strict=False)
    assert not result.unexpected_keys and {k.rsplit('.', 1)[0] for k in result.missing_keys} <= {'fc', 'head.fc',
                                                                                                  'head.norm'}
    assert os.path.islink(tmp_path / f'{arch}_1kpretrained_timm_style.pth') == arch.startswith('resnet')

    # and our own tools still read all of them
    model, optimizer, trainer = one_step_model(arch, seed=1)
    assert resume_spark(str(tmp_path / f'{arch}_still_pretraining.pth'), model, trainer)[:2] == (3, 1)
    assert all(torch.equal(p, dict(source.named_parameters())[n]) for n, p in model.named_parameters())
    assert all(torch.equal(optimizer.state[p]['exp_avg'], source_opt.state[q]['exp_avg'])
               for p, q in zip(model.parameters(), source.parameters()))
    for path in (f'{arch}_1kpretrained_timm_style.pth', f'{arch}_1kpretrained.pth'):
        fine = timm.create_model(arch, num_classes=5)
        report = load_pretrained(fine, str(tmp_path / path), verbose=False)
        assert len(report['loaded']) == len(encoder) and all(torch.equal(fine.state_dict()[k], v)
                                                             for k, v in encoder.items())


def test_official_convnext_keys_map_to_timm():
    model = timm.create_model('convnext_tiny', num_classes=10)
    official = {to_official('sparse_encoder.sp_cnn.' + k)[len('sparse_encoder.sp_cnn.'):]: v
                for k, v in model.state_dict().items() if not k.startswith('head.')}
    official.update({'norm.weight': model.head.norm.weight, 'norm.bias': model.head.norm.bias,
                     'head.weight': model.head.fc.weight, 'head.bias': model.head.fc.bias})
    assert 'downsample_layers.2.1.weight' in official and 'stages.2.8.pwconv2.bias' in official
    mapped = convnext_official_to_timm(official)
    assert mapped.keys() == model.state_dict().keys()
    assert all(mapped[k] is v or torch.equal(mapped[k], v) for k, v in model.state_dict().items())


def test_picture_rows_and_model_state_untouched():
    torch.manual_seed(0)
    model = build_spark('your_convnet', 64).train()
    imgs = torch.randn(3, 3, 64, 64)
    mask = model.mask(3, 'cpu', generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = spark_figure(model, imgs, mask)
    assert grid.shape == (3, 3 * 66 + 2, 3 * 66 + 2) and 0 <= grid.min() and grid.max() <= 1
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # second column = masked input: a masked patch shows the (de-normalised) zero, i.e. the ImageNet mean colour
    r, c = torch.nonzero(~mask[0, 0])[0].tolist()
    patch = grid[:, 2 + r * 32: 2 + (r + 1) * 32, 66 + 2 + c * 32: 66 + 2 + (c + 1) * 32]
    assert torch.allclose(patch.mean((1, 2)), torch.tensor([0.485, 0.456, 0.406]), atol=1e-6)


def test_drop_path_defaults_follow_the_official_table():
    assert spark_default_drop_path('resnet50') == 0.05 and spark_default_drop_path('convnext_large') == 0.4
    assert spark_default_drop_path('resnet18') == 0.0
    rates = [m.drop_prob for m in build_spark('resnet18', 64, dp=0.1).modules() if hasattr(m, 'drop_prob')]
    assert rates and max(rates) == pytest.approx(0.1)


def test_unready_model_and_bad_sizes_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match='not a supported SparK backbone.*custom'):
        build_spark('mobilenetv3_small_050', 64)
    with pytest.raises(ValueError, match='unknown SparK model'):
        build_spark('your_convnet_huge', 64)
    with pytest.raises(ValueError, match='input_size=48 is not divisible by the downsample ratio 32'):
        build_spark('your_convnet', 48)
    with pytest.raises(ValueError, match='--input_size 32 gives a 1x1 mask grid .* leaves no patch visible'):
        build_spark('your_convnet', 32)


@pytest.mark.slow
def test_two_process_launch_with_a_convnext(tmp_path):
    """`python -m torch.distributed.launch --nproc_per_node=2 main_spark.py ...` on gloo with timm's ConvNeXt (DDP
    without find_unused_parameters: any parameter the SparK forward does not use breaks the second iteration); one
    set of outputs, the global batch split over the processes, no stray head keys in the encoder."""
    env = {**os.environ, 'DEMO_DATA_ROOT': str(tmp_path / 'demo'), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', str(REPO / 'main_spark.py'),
           '--exp_name=ddp', '--data_path=demo', '--model=convnext_atto', '--input_size=64', '--bs=64', '--ep=1',
           '--num_workers=0', '--print_freq=1', '--vis_freq=0']
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, '\n'.join(line for line in done.stderr.splitlines() if 'Error' in line)[-2000:]
    out = tmp_path / 'output_ddp'
    ckpt = torch.load(out / 'convnext_atto_still_pretraining.pth', weights_only=True)
    assert ckpt['step'] == 144 // 64 and ckpt['args']['batch_size'] == 32 and ckpt['args']['world_size'] == 2
    assert len(ckpt['rng']) == 2
    for name in ('convnext_atto_1kpretrained.pth', 'convnext_atto_1kpretrained_timm_style.pth'):
        assert not [k for k in torch.load(out / name, weights_only=True) if 'head' in k or 'norm_pre' in k]
    log = (out / 'pretrain_log.txt').read_text().splitlines()
    assert len(log) == 3 and json.loads(log[2])['cur_ep'] == '1/1'


def test_official_convnext_encoder_file_fine_tunes(tmp_path):
    """An official convnext_*_1kpretrained_timm_style.pth (FB ConvNeXt names, no norm/head) into timm's ConvNeXt."""
    torch.manual_seed(0)
    source = timm.create_model('convnext_tiny', num_classes=0)
    prefix = 'sparse_encoder.sp_cnn.'
    official = {to_official(prefix + k)[len(prefix):]: v for k, v in source.state_dict().items()
                if not k.startswith('head.')}
    path = tmp_path / 'convnext_tiny_1kpretrained_timm_style.pth'
    torch.save(official, path)
    model = timm.create_model('convnext_tiny', num_classes=6)
    report = load_pretrained(model, str(path), verbose=False)
    assert set(report['initialised']) == {'head.norm.weight', 'head.norm.bias', 'head.fc.weight', 'head.fc.bias'}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items() if 'head.' not in k)


def test_whole_spark_checkpoint_fine_tunes(custom_run):
    """--finetune with the resumable SparK file (decoder and all) takes just its encoder."""
    model = timm.create_model('your_convnet', num_classes=6)
    report = load_pretrained(model, str(custom_run / 'your_convnet_withdecoder_1kpretrained_spark_style.pth'),
                             verbose=False)
    assert set(report['initialised']) == {'fc.weight', 'fc.bias'}
    encoder = torch.load(custom_run / 'your_convnet_1kpretrained.pth', weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in encoder.items())
