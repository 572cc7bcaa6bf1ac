"""main_slak.py: official flags, schedules, param groups, the evaluation resize, a tiny sparse SLaK on the demo
data with EMA and AMP, masks in checkpoints, resume, --eval, official checkpoints, one-line errors."""
import math
import shlex
import sys

import numpy as np
import pytest
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint

import main_slak
from engine_finetune import evaluate
from helpers import log_entries, slak_args, straight_and_resumed
from official_files import slak_checkpoint
from util.checkpoint import LAST
from util.classification import convnext_param_groups
from util.data.samplers import build_eval_loader
from util.lr_sched import IterationSchedule, cosine_scheduler
from util.runtime import resume_path, run_cli
from util.train_step import AMP_DTYPES

COMMON = ('--Decom True --sparse --width_factor 1.3 --sparsity 0.4 --sparse_init snip --growth random '
          '--epochs 300 --lr 4e-3 --update_freq 8 --model_ema true --model_ema_eval true '
          '--data_path /path/to/imagenet-1k --num_workers 40 --kernel_size 51 49 47 13 5 '
          '--output_dir /path/to/save_results')
# the commands of https://github.com/VITA-Group/SLaK/blob/main/README.md, after `main.py` -> `main_slak.py`
README_TRAIN = {
    'SLaK_tiny': '-u 2000 --prune_rate 0.5 --model SLaK_tiny --drop_path 0.1 --batch_size 128',
    'SLaK_small': '-u 100 --prune_rate 0.3 --model SLaK_small --drop_path 0.4 --batch_size 64',
    'SLaK_base': '-u 100 --prune_rate 0.3 --model SLaK_base --drop_path 0.5 --batch_size 32',
}
README_EVAL = ('--model SLaK_tiny --eval true --Decom True --kernel_size 51 49 47 13 5 --width_factor 1.3 '
               '--resume path/to/checkpoint --input_size 224 --drop_path 0.2 --data_path /path/to/imagenet-1k')
parse = main_slak.get_args_parser().parse_args
pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py


@pytest.mark.parametrize('model', sorted(README_TRAIN))
def test_readme_training_commands_parse(model):
    args = parse(shlex.split(f'{COMMON} {README_TRAIN[model]}') + ['--local-rank=2'])
    assert args.model == model and args.local_rank == 2 and args.sparse and args.Decom is True
    assert (args.width_factor, args.sparsity, args.sparse_init, args.growth, args.epochs, args.lr) == \
        (1.3, 0.4, 'snip', 'random', 300, 4e-3)
    assert args.update_freq == 8 and args.model_ema is True and args.model_ema_eval is True
    assert args.kernel_size == [51, 49, 47, 13, 5] and args.num_workers == 40
    assert (args.update_frequency, args.prune_rate) == ((2000, 0.5) if model == 'SLaK_tiny' else (100, 0.3))


@pytest.mark.parametrize('launcher', [[], ['--local_rank=5']])
def test_readme_eval_command_parses(launcher):
    args = parse(shlex.split(README_EVAL) + launcher)
    assert args.eval is True and args.resume == 'path/to/checkpoint' and args.drop_path == 0.2 and not args.sparse
    assert args.Decom is True and args.width_factor == 1.3 and args.input_size == 224


def test_official_defaults_and_string_booleans():
    args = parse([])
    assert (args.batch_size, args.epochs, args.update_freq, args.model, args.drop_path, args.input_size) == \
        (64, 300, 1, 'SLaK_tiny', 0, 224)
    assert (args.opt, args.opt_eps, args.opt_betas, args.clip_grad, args.weight_decay, args.weight_decay_end) == \
        ('adamw', 1e-8, None, None, 0.05, None)
    assert (args.lr, args.layer_decay, args.min_lr, args.warmup_epochs, args.warmup_steps) == (4e-3, 1.0, 1e-6, 20, -1)
    assert (args.mixup, args.cutmix, args.smoothing, args.reprob, args.aa, args.color_jitter) == \
        (0.8, 1.0, 0.1, 0.25, 'rand-m9-mstd0.5-inc1', 0.4)
    assert args.auto_resume is True and args.save_ckpt is True and args.dist_eval is True and args.bn is True
    assert (args.save_ckpt_freq, args.save_ckpt_num, args.model_ema_decay, args.nb_classes) == (10, 3, 0.9999, 1000)
    assert args.model_ema is args.use_amp is args.eval is args.Decom is args.sparse is False
    assert (args.sparsity, args.sparse_init, args.prune, args.growth, args.prune_rate, args.update_frequency) == \
        (0.4, 'snip', 'magnitude', 'random', 0.3, 100)
    flags = parse(shlex.split('--use_amp true --auto_resume false --model_ema --bn False --eval TRUE'))
    assert flags.use_amp is True and flags.auto_resume is False and flags.model_ema is True
    assert flags.bn is False and flags.eval is True
    with pytest.raises(SystemExit):
        parse(['--model_ema', 'maybe'])


def test_lr_and_wd_schedules_match_the_official_formula():
    base, final, spe = 4e-3, 1e-6, 5
    lrs = cosine_scheduler(base, final, 4, spe, warmup_epochs=1)
    assert len(lrs) == 20 and lrs[0] == 0 and lrs[4] == pytest.approx(base)
    assert lrs[:5] == pytest.approx([base * i / 4 for i in range(5)])  # np.linspace(0, base, 5)
    cosine = [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / 15)) for i in range(15)]
    assert lrs[5:] == pytest.approx(cosine, rel=1e-12)
    steps = cosine_scheduler(base, final, 4, spe, warmup_epochs=1, warmup_steps=3)
    assert len(steps) == 20 and steps[:3] == pytest.approx([0, base / 2, base]) and steps[3] == pytest.approx(base)
    assert np.all(cosine_scheduler(0.05, 0.05, 4, spe) == 0.05)
    with pytest.raises(ValueError, match='warmup'):
        cosine_scheduler(base, final, 1, spe, warmup_epochs=2)

    groups = [{'params': [torch.nn.Parameter(torch.zeros(2))], 'weight_decay': 0.05, 'lr_scale': 0.5},
              {'params': [torch.nn.Parameter(torch.zeros(2))], 'weight_decay': 0.0, 'lr_scale': 1.0}]
    optimizer = torch.optim.SGD(groups, lr=1.0)
    schedule = IterationSchedule(lrs, np.linspace(0.05, 0.1, 20), batches_per_epoch=11, accum_iter=2)  # 5 steps
    for batch in (0, 2, 4, 6, 8):  # window starts of epoch 2: it = 2 * 5 + batch // 2
        lr = schedule.adjust(optimizer, 2 + batch / 11)
        it = 10 + batch // 2
        assert lr == lrs[it] and optimizer.param_groups[0]['lr'] == lrs[it] * 0.5
        assert optimizer.param_groups[0]['weight_decay'] == pytest.approx(0.05 + 0.05 * it / 19)
        assert optimizer.param_groups[1]['weight_decay'] == 0.0
    assert schedule.index(3 + 10 / 11) == 19  # the last epoch's unfinished window is clamped


def tiny_slak(**kwargs):
    import timm
    return timm.create_model('SLaK_tiny', width_factor=0.25, kernel_size=[7, 7, 5, 3, 3], Decom=True, num_classes=6,
                             **kwargs)


def test_param_groups_no_decay_and_convnext_layer_decay():
    model = tiny_slak()
    groups = convnext_param_groups(model, 0.05, layer_decay=1.0)
    assert [g['weight_decay'] for g in groups] == [0.05, 0.0] and all(g['lr_scale'] == 1 for g in groups)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups[1]['params']}
    assert no_decay == {n for n, p in model.named_parameters() if p.ndim == 1 or n.endswith('.bias')}
    scale = {names[id(p)]: g['lr_scale'] for g in convnext_param_groups(model, 0.05, 0.9) for p in g['params']}
    expected_depth = {'downsample_layers.0.0.weight': 0, 'stages.0.1.pwconv1.weight': 1, 'downsample_layers.1.0.weight': 2,
                      'stages.1.2.gamma': 2, 'downsample_layers.2.1.bias': 3, 'stages.2.7.large_kernel.LoRA1.conv.weight':
                      5, 'downsample_layers.3.1.weight': 12, 'stages.3.0.norm.weight': 12, 'norm.weight': 13,
                      'head.weight': 13}
    for name, depth in expected_depth.items():
        assert scale[name] == pytest.approx(0.9 ** (13 - depth)), name


SPARSE = ('--sparse', '-u', '2', '--prune_rate', '0.3', '--update_freq', '2', '--model_ema', 'true',
          '--model_ema_eval', 'true', '--model_ema_decay', '0.9', '--use_amp', 'true')


@pytest.fixture(scope='module')
def runs(module_tmp):
    """A straight 2-epoch sparse run (AMP, EMA, accumulation; 4 optimizer steps and 2 prune/grow events per epoch)
    and the same run killed before epoch 1 and auto-resumed."""
    tmp = module_tmp
    mp = pytest.MonkeyPatch()
    mp.setenv('DEMO_DATA_ROOT', str(tmp / 'demo'))
    straight_and_resumed(main_slak, lambda out: slak_args(out, *SPARSE, '--log_dir', str(out / 'tb')), 1, tmp)
    yield tmp
    mp.undo()


def test_sparse_demo_run_trains_and_evaluates_with_ema(runs):
    out = runs / 'straight'
    log = log_entries(out)
    assert [e['epoch'] for e in log] == [0, 1]
    assert all(0 <= e['test_acc1'] <= 100 and 0 <= e['test_acc1_ema'] <= 100 and e['test_count'] == 36 for e in log)
    # it learned: the same evaluation of the untrained model (main_slak's seeded init) scores measurably lower
    args = slak_args(out, *SPARSE)
    torch.manual_seed(args.seed)
    untrained = main_slak.build_model(args)
    val_loader = build_eval_loader(main_slak.build_dataset(False, args), int(1.5 * args.batch_size), 0, False, False)
    chance = evaluate(val_loader, untrained, 'cpu', AMP_DTYPES['bf16'])
    print(f"test_acc1: untrained {chance['acc1']:.1f}, trained {[e['test_acc1'] for e in log]}")
    assert chance['count'] == 36 and max(e['test_acc1'] for e in log) >= chance['acc1'] + 100 * 5 / 36
    assert all(e['sparse_density'] == pytest.approx(0.6, abs=0.01) for e in log)
    for name in ('checkpoint-1.pth', 'checkpoint-best.pth', 'checkpoint-best-ema.pth', LAST):
        assert (out / name).exists(), name
    assert any((out / 'tb').iterdir())


def test_eval_freq_skips_the_evaluation_of_other_epochs(tmp_path, monkeypatch):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo'))
    main_slak.main(slak_args(tmp_path / 'out', '--eval_freq', '2', '--epochs', '3', '--warmup_epochs', '0'))
    assert ['test_acc1' in e for e in log_entries(tmp_path / 'out')] == [False, True, True]


def test_the_batches_of_an_unfinished_update_freq_window_never_run(tmp_path, monkeypatch):
    """As the official engine: with --update_freq 2 and 9 batches per epoch, batch 9 is not run at all (its forward
    would move the BatchNorm statistics)."""
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo'))
    real, losses, batches = main_slak.train_one_epoch, [], []

    def counting(loader, trainer, epoch, schedule, compute_loss, *args, **kwargs):
        batches.append(len(loader))
        return real(loader, trainer, epoch, schedule, lambda *a: losses.append(1) or compute_loss(*a), *args, **kwargs)
    monkeypatch.setattr(main_slak, 'train_one_epoch', counting)
    main_slak.main(slak_args(tmp_path / 'out', '--epochs', '1', '--warmup_epochs', '0', '--update_freq', '2',
                             '--disable_eval', 'true'))
    assert batches == [9] and len(losses) == 8


def test_masked_weights_are_zero_in_saved_checkpoint(runs):
    ckpt = torch.load(runs / 'straight' / LAST, weights_only=True)
    masking = ckpt['extra']['masking']
    assert masking['steps'] == ckpt['step'] == 8 and masking['last_event'] and len(masking['masks']) > 10
    for name, mask in masking['masks'].items():
        assert mask.dtype == torch.bool and not mask.all()
        assert torch.all(ckpt['model'][name][~mask] == 0) and torch.all(ckpt['model_ema'][name][~mask] == 0), name


def test_resume_equals_uninterrupted_run_including_masks(runs):
    a = torch.load(runs / 'straight' / LAST, weights_only=True)
    b = torch.load(runs / 'resumed' / LAST, weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['step'] == b['step']
    for key in ('model', 'model_ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    ma, mb = a['extra']['masking'], b['extra']['masking']
    assert ma['masks'].keys() == mb['masks'].keys() and all(torch.equal(ma['masks'][k], mb['masks'][k])
                                                             for k in ma['masks'])
    assert (ma['steps'], ma['prune_rate'], ma['decay']) == (mb['steps'], mb['prune_rate'], mb['decay'])
    assert a['extra']['max_accuracy'] == b['extra']['max_accuracy']
    assert [e['test_acc1'] for e in log_entries(runs / 'straight')] == \
        [e['test_acc1'] for e in log_entries(runs / 'resumed')]


@pytest.mark.parametrize('ema_eval', ['true', 'false'])
def test_eval_resume_returns_the_logged_accuracy(runs, monkeypatch, ema_eval):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(runs / 'demo'))
    out = runs / 'straight'
    stats = main_slak.main(slak_args(runs / f'eval_{ema_eval}', '--use_amp', 'true', '--eval', 'true',
                                     '--resume', str(out / LAST), '--model_ema_eval', ema_eval))
    last = log_entries(out)[-1]
    assert stats['acc1'] == last['test_acc1'] and stats['loss'] == pytest.approx(last['test_loss'])
    if ema_eval == 'true':
        assert stats['acc1_ema'] == last['test_acc1_ema']
    else:
        assert 'acc1_ema' not in stats
    assert not (runs / f'eval_{ema_eval}' / 'log.txt').exists()


@pytest.fixture()
def official_checkpoint(runs):
    """The straight run's last state as the official code saves it: no masks, args as a Namespace, the optimizer
    groups of torch 1.x with numpy-float lr and weight decay, an fp16 GradScaler's state."""
    ours = torch.load(runs / 'straight' / LAST, weights_only=True)
    path = runs / 'official.pth'
    slak_checkpoint(path, ours['model'], ours['optimizer'], 1, ours['model_ema'], model='SLaK_tiny', sparse=True,
                    sparsity=0.4, Decom=True, kernel_size=[7, 7, 5, 3, 3], width_factor=0.25, lr=4e-3)
    assert 'numpy._core.multiarray.scalar' in get_unsafe_globals_in_checkpoint(path)  # as the official run wrote it
    return path, ours


def test_official_checkpoint_resumes_with_its_nonzeros_as_masks(runs, monkeypatch, official_checkpoint, capsys):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(runs / 'demo'))
    path, ours = official_checkpoint
    out = runs / 'from_official'
    main_slak.main(slak_args(out, *SPARSE, '--epochs', '3', '--resume', str(path)))  # default --sparse_init snip
    assert "masks from the checkpoint's non-zero weights" in capsys.readouterr().out
    ckpt = torch.load(out / LAST, weights_only=True)
    assert ckpt['epoch'] == 2 and log_entries(out)[0]['epoch'] == 2
    masks = ckpt['extra']['masking']['masks']
    assert masks.keys() == ours['extra']['masking']['masks'].keys()
    density = float(sum(m.sum() for m in masks.values()) / sum(m.numel() for m in masks.values()))
    # masks started as the non-zeros (weights regrown at the last event are still 0, hence < 0.6); random
    # growth keeps the density in expectation. Masks redrawn by snip over them would give about 0.6 * that.
    nonzero = float(sum(ours['model'][k].count_nonzero() for k in masks) / sum(m.numel() for m in masks.values()))
    assert 0.5 < nonzero <= 0.6 and density == pytest.approx(nonzero, abs=0.02)


def test_official_checkpoint_finetunes_with_a_new_head(runs, official_checkpoint):
    path, ours = official_checkpoint
    model = main_slak.build_model(slak_args(runs / 'ft', '--finetune', str(path), '--nb_classes', '7'))
    state = model.state_dict()
    assert state['head.weight'].shape[0] == 7
    assert all(torch.equal(state[k], v) for k, v in ours['model'].items() if not k.startswith('head.'))


def resume_path_of(args):
    return resume_path(args.resume, args.auto_resume, args.output_dir)


def test_resume_wins_over_auto_resume(runs):
    out = runs / 'straight'
    assert resume_path_of(slak_args(out, '--resume', 'other.pth')) == 'other.pth'  # official: auto_resume won
    assert resume_path_of(slak_args(out)) == str(out / LAST)
    assert resume_path_of(slak_args(out, '--auto_resume', 'false')) is None
    assert resume_path_of(slak_args('')) is None  # official: globbed the working directory


@pytest.mark.parametrize('argv,flag', [(['--model', 'SLaK_huge'], '--model SLaK_huge'),
                                       (['--kernel_size', '51', '49', '47', '13'], '--kernel_size'),
                                       (['--train_interpolation', 'bilinear'], '--train_interpolation')])
def test_bad_input_is_one_clear_line(monkeypatch, argv, flag, capsys):
    monkeypatch.setattr(sys, 'argv', ['main_slak.py', '--device', 'cpu', *argv])
    with pytest.raises(SystemExit) as error:
        run_cli(main_slak.main, main_slak.get_args_parser())
    message = capsys.readouterr().err
    assert error.value.code == 2 and message.startswith('main_slak.py: error:') and flag in message
    assert message.count('\n') == 1


def eval_sizes(tmp_path, *flags):
    """The image size (w, h) after each PIL-level step of main_slak's evaluation transform, on a 200 x 100 image."""
    from PIL import Image
    image = Image.new('RGB', (200, 100), (10, 20, 30))
    (tmp_path / 'val' / 'a').mkdir(parents=True, exist_ok=True)
    image.save(tmp_path / 'val' / 'a' / 'x.png')
    args = parse(['--data_set', 'image_folder', '--data_path', str(tmp_path), '--eval_data_path',
                  str(tmp_path / 'val'), *flags])
    sizes = []
    for step in main_slak.build_dataset(False, args).transform.transforms:
        image = step(image)
        if not isinstance(image, Image.Image):
            return sizes, tuple(image.shape)
        sizes.append(image.size)


SLAK_EVAL_SIZES = [
    (['--input_size', '224'], [(512, 256), (224, 224)]),                    # 224 / 0.875 = 256, centre crop
    (['--input_size', '288'], [(658, 329), (288, 288)]),                    # int(288 / 0.875) = 329 (MAE: 288)
    (['--input_size', '288', '--crop_pct', '0.95'], [(606, 303), (288, 288)]),
    (['--input_size', '384'], [(384, 384)]),                                # warped to 384 x 384, no crop
    (['--input_size', '384', '--crop_pct', '0.95'], [(384, 384)]),
]


def test_eval_transform_resizes_as_slak(tmp_path):
    for flags, sizes in SLAK_EVAL_SIZES:
        got, tensor_shape = eval_sizes(tmp_path, *flags)
        assert got == sizes and tensor_shape == (3, sizes[-1][1], sizes[-1][0]), flags
