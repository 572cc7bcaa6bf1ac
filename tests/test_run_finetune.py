"""run_finetune.py: MAE's layer-decay groups, the command lines in use, demo pretrain -> fine-tune / probe, resume."""
import shlex

import pytest
import timm
import torch

import models  # noqa: F401
import run_finetune
import run_pretrain
from helpers import finetune_args, log_entries, straight_and_resumed
from util.checkpoint import LAST

# LocalMIM's ViT-B fine-tuning command (its README) and a fine-tuning of a FreezeOut checkpoint, after `run_finetune.py`
REFERENCE_FINETUNE_COMMANDS = [
    '--batch_size 128 --model vit_base_patch16 --finetune /path/to/checkpoint.pth --epochs 100 --warmup_epochs 20 '
    '--lr 2e-3 --min_lr 1e-5 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 --reprob 0.25 --mixup 0.8 '
    '--cutmix 1.0 --dist_eval --data_path /path/to/imagenet/ --output_dir /output_dir/',
    '--world_size 4 --accum_iter 2 --batch_size 128 --model vit_base_patch16 --finetune '
    '/raid/home_yedek/utku/freezeout_localmim_rho/ViT/full_pretrain_out_freezeout_cubic_t0_8_fast/checkpoint-99.pth '
    '--epochs 100 --warmup_epochs 20 --lr 4e-3 --min_lr 1e-6 --layer_decay 0.75 --weight_decay 0.05 --drop_path 0.1 '
    '--reprob 0.25 --mixup 0.8 --cutmix 1.0 --dist_eval --data_path /raid/utku/datasets/imagenet/classification/ '
    '--output_dir full_finetune_out_freezeout_cubic_t0_8_fast/ --log_dir full_finetune_out_freezeout_cubic_t0_8_fast',
]


@pytest.mark.parametrize('line', REFERENCE_FINETUNE_COMMANDS)
def test_reference_finetune_commands_parse(line):
    args = run_finetune.get_args_parser().parse_args(shlex.split(line) + ['--local-rank=1'])
    assert args.model == 'vit_base_patch16' and args.mixup == 0.8 and args.cutmix == 1.0 and args.dist_eval
    assert args.global_pool and args.smoothing == 0.1 and args.aa == 'rand-m9-mstd0.5-inc1' and args.local_rank == 1
    assert args.layer_decay in (0.65, 0.75) and args.epochs == 100 and args.warmup_epochs == 20


def mae_layer_id(name, num_layers):
    """MAE's layer id: 0 for cls_token, pos_embed, patch_embed; j + 1 for blocks.j; num_layers otherwise."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks.'):
        return int(name.split('.')[1]) + 1
    return num_layers


@pytest.mark.parametrize('global_pool', [True, False])
def test_layer_decay_groups_equal_mae_formula(global_pool):
    model = timm.create_model('vit_tiny_patch16', img_size=32, num_classes=5, global_pool=global_pool)
    args = run_finetune.get_args_parser().parse_args(['--layer_decay', '0.65', '--weight_decay', '0.05'])
    args.lr = 1e-3
    optimizer = run_finetune.build_optimizer(args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)]: (g['lr_scale'], g['weight_decay']) for g in optimizer.param_groups for p in g['params']}
    num_layers = len(model.blocks) + 1
    expected = {n: (0.65 ** (num_layers - mae_layer_id(n, num_layers)),
                    0.0 if p.ndim == 1 or n in ('pos_embed', 'cls_token') else 0.05)
                for n, p in model.named_parameters()}
    assert got.keys() == expected.keys()
    for n in expected:
        assert got[n] == pytest.approx(expected[n], rel=1e-12), n
    assert len({(s, wd) for s, wd in got.values()}) == len(optimizer.param_groups) == 2 * (num_layers + 1)


@pytest.fixture(scope='module')
def demo_pretrained(module_tmp):
    """A short demo pretraining of the tiny LocalMIM ViT at 32 px (its checkpoint is what we fine-tune)."""
    root = module_tmp
    mp = pytest.MonkeyPatch()
    mp.setenv('DEMO_DATA_ROOT', str(root / 'demo'))
    args = run_pretrain.get_args_parser().parse_args(
        ['--data_path', 'demo', '--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', '48',
         '--epochs', '1', '--warmup_epochs', '0', '--num_workers', '0', '--device', 'cpu', '--vis_freq', '0',
         '--output_dir', str(root / 'out')])
    run_pretrain.main(args)
    yield root / 'out' / LAST
    mp.undo()


def accuracies(out):
    return [entry['test_acc1'] for entry in log_entries(out)]


@pytest.mark.parametrize('mode', [[], ['--cls_token'], ['--linprobe', '--blr', '0.5', '--weight_decay', '0']])
def test_demo_pretrain_then_finetune_beats_chance(tmp_path, monkeypatch, capsys, demo_pretrained, mode):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(demo_pretrained.parents[1] / 'demo'))
    out = tmp_path / 'ft'
    run_finetune.main(finetune_args(out, '--finetune', str(demo_pretrained), *mode))
    # a LARS probe at a small batch is told to use AdamW instead
    assert ('use --opt adamw' in capsys.readouterr().out) == ('--linprobe' in mode)
    acc = accuracies(out)
    assert len(acc) == 4 and max(acc) > 100 / 6 + 15  # six classes: chance is 16.7%
    assert (out / 'checkpoint-best.pth').exists() and (out / 'checkpoint-3.pth').exists()
    # --eval with --resume only evaluates the saved weights: the last epoch's logged accuracy again
    args = finetune_args(tmp_path / 'eval', '--eval', '--resume', str(out / LAST), *mode)
    assert run_finetune.main(args)['acc1'] == pytest.approx(acc[-1], abs=1e-6)
    assert not (tmp_path / 'eval' / 'log.txt').exists()


def test_resume_equals_uninterrupted_with_ema(tmp_path, monkeypatch, demo_pretrained):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(demo_pretrained.parents[1] / 'demo'))
    flags = ('--epochs', '2', '--model_ema', '--model_ema_decay', '0.9', '--mixup', '0.8', '--cutmix', '1.0')
    straight, resumed = straight_and_resumed(run_finetune, lambda out: finetune_args(out, *flags), 1, tmp_path)
    a = torch.load(straight / LAST, weights_only=True)
    b = torch.load(resumed / LAST, weights_only=True)
    assert a['epoch'] == b['epoch'] == 1
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert all(torch.equal(a['extra']['ema'][k], b['extra']['ema'][k]) for k in a['extra']['ema'])
    assert not all(torch.equal(a['extra']['ema'][k], a['model'][k]) for k in a['model'])


def test_eval_freq_evaluates_every_n_epochs_and_after_the_last(tmp_path, monkeypatch):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo'))
    out = tmp_path / 'ft'
    run_finetune.main(finetune_args(out, '--epochs', '3', '--eval_freq', '2', '--model', 'vit_tiny_patch16'))
    entries = log_entries(out)
    assert [e['epoch'] for e in entries] == [0, 1, 2]
    assert ['test_acc1' in e for e in entries] == [False, True, True]
    assert entries[2]['max_accuracy'] == max(entries[1]['test_acc1'], entries[2]['test_acc1'])


@pytest.mark.parametrize('name,stages', [('resnet18', ['conv1', 'layer1', 'layer2', 'layer3', 'layer4', 'fc']),
                                         ('regnetx_002', ['stem', 's1', 's2', 's3', 's4', 'head'])])
def test_cnn_layer_decay_is_stagewise(name, stages):
    """CNNs without SparK's depths (tests/test_run_finetune_recipes.py: ResNet-50/101/152/200, ConvNeXts)."""
    model = timm.create_model(name, num_classes=5)
    args = run_finetune.get_args_parser().parse_args(['--model', name, '--layer_decay', '0.5'])
    args.lr = 1e-3
    optimizer = run_finetune.build_optimizer(args, model)
    names = {id(p): n for n, p in model.named_parameters()}
    scale = {names[id(p)]: g['lr_scale'] for g in optimizer.param_groups for p in g['params']}
    assert len(scale) == sum(1 for _ in model.parameters())
    for depth, stage in enumerate(stages):  # one scale per stage, halving towards the input
        assert {s for n, s in scale.items() if n.startswith(stage + '.')} == {0.5 ** (len(stages) - 1 - depth)}
