"""SparK beyond the core module: the custom-model route, official file names and formats (spark_style resume,
official ConvNeXt keys), reconstruction pictures, --accum_iter, drop path defaults."""
import json
import os
import re
import subprocess
import sys

import pytest
import timm
from timm.optim import Lamb
import torch

import main_spark
from models.convnext_keys import convnext_official_to_timm
from models.spark import build_spark, spark_default_drop_path
from util.pretrained import load_pretrained
from util.spark_checkpoint import resume_spark
from util.spark_sched import spark_param_groups
from util.spark_vis import spark_figure
from util.train_step import TrainStep


@pytest.fixture(scope='module')
def custom_run(tmp_path_factory):
    """--model=your_convnet on the demo data, 2 epochs, 2 micro-steps per optimizer step."""
    tmp = tmp_path_factory.mktemp('custom')
    mp = pytest.MonkeyPatch()
    mp.setenv('DEMO_DATA_ROOT', str(tmp / 'demo'))
    out = tmp / 'out'
    argv = ['--exp_name=c', f'--exp_dir={out}', '--data_path=demo', '--model=your_convnet', '--input_size=64',
            '--bs=48', '--accum_iter=2', '--ep=2', '--wp_ep=1', '--num_workers=0', '--device=cpu', '--print_freq=2',
            '--vis_freq=1']
    main_spark.main(main_spark.get_args_parser().parse_args(argv))
    mp.undo()
    return out


def test_custom_model_pretrains_on_demo_data(custom_run):
    ckpt = torch.load(custom_run / 'your_convnet_still_pretraining.pth', weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['step'] == 2 * (144 // 48)       # 144 demo images, one step per 48
    assert ckpt['args']['batch_size'] == 24 and ckpt['extra']['last_loss'] < 2.0
    encoder = torch.load(custom_run / 'your_convnet_1kpretrained.pth', weights_only=True)
    result = timm.create_model('your_convnet', num_classes=6).load_state_dict(encoder, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight'] and not result.unexpected_keys
    assert sorted(p.name for p in (custom_run / 'vis').iterdir()) == ['epoch0000.png', 'epoch0001.png']


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


def official_file(model, optimizer, arch):
    """What the official SparK writes as <arch>_withdecoder_1kpretrained_spark_style.pth: official key names, and
    optimizer indices in the official parameter order (all ConvNeXt downsample layers before all stages)."""
    def official_rank(name):
        official = to_official(name)
        m = re.match(r'sparse_encoder\.sp_cnn\.(downsample_layers|stages)\.(\d)', official)
        return (0 if m.group(1) == 'downsample_layers' else 1, int(m.group(2))) if m else (2, 0)
    name_of = {id(p): n for n, p in model.named_parameters()}
    own = optimizer.state_dict()
    own_index = {n: i for i, n in enumerate(name_of[id(p)] for g in optimizer.param_groups for p in g['params'])}
    state, groups, next_id = {}, [], 0
    for group, saved in zip(optimizer.param_groups, own['param_groups']):
        names = sorted((name_of[id(p)] for p in group['params'] if 'head.' not in name_of[id(p)]), key=official_rank)
        ids = []
        for name in names:
            if own_index[name] in own['state']:
                state[next_id] = own['state'][own_index[name]]
            ids.append(next_id)
            next_id += 1
        groups.append({**saved, 'params': ids})
    module = {to_official(k): v for k, v in model.state_dict(with_config=True).items() if '.head.' not in k}
    return {'args': 'Namespace(...)', 'arch': arch, 'input_size': 64, 'epoch': 6, 'performance_desc': '0.5 0.6',
            'module': module, 'optimizer': {'state': state, 'param_groups': groups}, 'is_pretrain': True}


@pytest.mark.parametrize('arch', ['resnet18', 'convnext_tiny'])
def test_resume_from_official_spark_style_file(tmp_path, arch):
    source, source_opt, _ = one_step_model(arch)
    path = tmp_path / f'{arch}_withdecoder_1kpretrained_spark_style.pth'
    torch.save(official_file(source, source_opt, arch), path)
    if arch == 'convnext_tiny':
        assert 'sparse_encoder.sp_cnn.downsample_layers.0.0.weight' in torch.load(path)['module']
    model, optimizer, trainer = one_step_model(arch, seed=1)
    epoch, step, _ = resume_spark(str(path), model, trainer)
    assert epoch == 6 and step is None
    theirs = dict(source.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[name]), name
        mine_state, their_state = optimizer.state.get(p, {}), source_opt.state.get(theirs[name], {})
        assert mine_state.keys() == their_state.keys(), name
        assert all(torch.equal(mine_state[k], their_state[k]) for k in ('exp_avg', 'exp_avg_sq') if k in mine_state)


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


def test_two_process_launch_as_in_the_seed(tmp_path):
    """`python -m torch.distributed.launch --nproc_per_node=2 main_spark.py ...` on gloo: one set of outputs,
    the global batch split over the processes."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, 'DEMO_DATA_ROOT': str(tmp_path / 'demo'), 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.launch', '--nproc_per_node=2', os.path.join(repo, 'main_spark.py'),
           '--exp_name=ddp', '--data_path=demo', '--model=your_convnet', '--input_size=32', '--bs=48', '--ep=1',
           '--num_workers=0', '--print_freq=3']
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    ckpt = torch.load(tmp_path / 'output_ddp' / 'your_convnet_still_pretraining.pth', weights_only=True)
    assert ckpt['step'] == 144 // 48 and ckpt['args']['batch_size'] == 24 and ckpt['args']['world_size'] == 2
    assert len(ckpt['rng']) == 2
    log = (tmp_path / 'output_ddp' / 'pretrain_log.txt').read_text().splitlines()
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
