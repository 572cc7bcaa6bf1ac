"""main_sce.py: the reference run's settings as defaults, a tiny SCE run on the demo videos (outputs, TensorBoard,
clip-pair picture, online validation against a hand computation), resume equal to the uninterrupted run (target
network, queue and pointer included), validation skipped without val.csv or evaluator, one-line errors, DDP."""
import json
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import main_sce
from helpers import REPO, log_entries, straight_and_resumed
from util.checkpoint import LAST
from util.runtime import run_cli
from util.sce.augment import SCEVideoAugment
from util.sce.optim import warmup_cosine_lr
from util.video.demo import make_demo_videos

parse = main_sce.get_args_parser().parse_args
pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py
TINY = ('--data_path demo --device cpu --amp none --crop_size 32 --num_frames 4 --global_batch_size 8 '
        '--queue_size 64 --epochs 2 --warmup_epochs 1 --num_workers 0 --print_freq 2')
VAL_SIZE = 37  # default --val_crop_size for --crop_size 32: round(32 * 256 / 224)


def test_defaults_are_the_reference_run():
    args = parse([])
    assert (args.epochs, args.warmup_epochs, args.warmup_start_lr, args.min_lr) == (200, 35, 0.0, 0.0)
    assert (args.queue_size, args.queue_feature_dim, args.temp, args.temp_m, args.coeff) == (32768, 256, 0.1, 0.05, 0.5)
    assert (args.initial_momentum, args.scheduler_momentum, args.sym, args.use_keys) == (0.99, 'cosine', True, False)
    assert (args.num_clips, args.clip_duration, args.num_frames, args.fps, args.time_difference_prob) == \
        (2, 2.56, 8, 30, 0.2)
    assert (args.crop_size, args.crop_scale, args.crop_ratio) == (224, [0.2, 0.766], [0.75, 1.3333])
    assert (args.weight_decay, args.momentum, args.trust_coefficient) == (1e-6, 0.9, 1e-3)
    assert (args.exclude_wd_norm, args.exclude_wd_bias, args.clip_grad) == (False, False, None)
    assert (args.seed, args.amp, args.sync_bn, args.global_batch_size, args.lr) == (42, 'fp16', True, 512, 2.4)
    assert (args.num_workers, args.pin_mem, args.auto_resume, args.jitter_strength) == (5, True, True, 'strong')
    assert main_sce.resolve_batch_and_lr(args, 1) == 512 and args.abs_lr == pytest.approx(4.8)
    assert main_sce.resolve_batch_and_lr(args, 8) == 64 and args.abs_lr == pytest.approx(4.8)
    augment = SCEVideoAugment(0)  # the augmentation's own defaults are the reference run's "strength 1" jitter
    assert {k: (1 - lo if k != 'hue' else hi) for k, (lo, hi) in augment.jitter.items()} == \
        pytest.approx(main_sce.JITTER['strong'])


@pytest.mark.parametrize('launcher', [[], ['--local-rank=3'], ['--local_rank=3']])
def test_launcher_command_parses(launcher):
    args = parse(shlex.split('--data_path /data/k200 --output_dir out --jitter_strength baseline '
                             '--time_difference_prob 0 --temp_m 0.07') + launcher)
    assert (args.data_path, args.output_dir, args.jitter_strength, args.time_difference_prob, args.temp_m) == \
        ('/data/k200', 'out', 'baseline', 0.0, 0.07)
    assert args.local_rank == (3 if launcher else -1)


def test_global_batch_must_divide():
    args = parse(['--global_batch_size', '512', '--accum_iter', '2'])
    assert main_sce.resolve_batch_and_lr(args, 8) == 32
    with pytest.raises(ValueError, match='--global_batch_size 512 .* processes \\(3\\)'):
        main_sce.resolve_batch_and_lr(args, 3)


@pytest.fixture(scope='module')
def runs(module_tmp):
    """One straight 2-epoch run, and one interrupted after epoch 0 then auto-resumed (6 steps per epoch)."""
    tmp = module_tmp
    straight_and_resumed(main_sce, lambda out: parse(shlex.split(TINY) + ['--output_dir', str(out)]), 1, tmp)
    return tmp


def test_demo_run_writes_outputs(runs):
    out = runs / 'straight'
    ckpt = torch.load(out / LAST, weights_only=True)
    assert ckpt['epoch'] == 1 and ckpt['step'] == 12  # 48 demo videos / 8
    model = ckpt['model']
    assert model['queue'].shape == (256, 64) and model['queue_ptr'].item() == 12 * 16 % 64
    assert torch.allclose(model['queue'].norm(dim=0), torch.ones(64))
    assert any(k.startswith('momentum_trunk.') for k in model) and 'online_evaluator.linear.weight' in model
    target, online = (model[f'{net}.model.blocks.0.conv.weight'] for net in ('momentum_trunk', 'trunk'))
    assert not torch.equal(target, online)  # the EMA lags the online trunk
    assert ckpt['extra']['online_evaluator_optimizer']['state']
    # lr at the last of 12 steps: linear warmup over 6 steps from 0, cosine to 0; base 2.4 * 8 / 256
    assert ckpt['optimizer']['param_groups'][0]['lr'] == pytest.approx(warmup_cosine_lr(11, 0.075, 6, 12))
    assert (out / 'checkpoint-1.pth').exists()
    lines = log_entries(out)
    assert [x['epoch'] for x in lines] == [0, 1] and [x['step'] for x in lines] == [6, 12]
    assert all(k in lines[0] for k in ('train_loss', 'train_pos_weight', 'train_queue_fill', 'train_z_std',
                                       'train_k_std', 'train_online_acc1', 'train_lr'))
    assert lines[1]['train_queue_fill'] == 1.0
    assert sorted(p.name for p in (out / 'vis').iterdir()) == ['clip_pairs_epoch0000.png', 'clip_pairs_epoch0001.png']
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tensorboard')).Reload()
    scalars = set(events.Tags()['scalars'])
    assert {'train_loss', 'lr', 'train/pos_weight', 'train/queue_fill', 'train/z_std', 'train/k_std',
            'train/online_acc1', 'epoch/loss'} <= scalars
    assert events.Tags()['images'] == ['sce/clip_pairs'] and len(events.Images('sce/clip_pairs')) == 2


def hand_val_stats(ckpt_path, root, size=VAL_SIZE, num_frames=4):
    """(top-1, top-5 accuracy as fractions, mean cross-entropy, videos) of the checkpoint's online evaluator on
    the centre 2.56 s clip of each video in <root>/val.csv, computed here from the frames (PIL) and the weights."""
    ckpt = torch.load(ckpt_path, weights_only=True)
    rows = [line.rsplit(None, 2) for line in (root / 'val.csv').read_text().splitlines()]
    model = main_sce.build_sce(parse(shlex.split(TINY)), num_classes=ckpt['model']['online_evaluator.linear.bias'].numel())
    model.load_state_dict(ckpt['model'])
    model.eval()
    logits, labels = [], []
    for path, label, n in rows:
        n = int(n)
        start = max(n - 2.56 * 30, 0) / 2  # in frames; the clip is [start, start + 76.8) within the video
        frames = [i for i in range(n) if start <= i < start + 2.56 * 30]
        kept = [frames[k * (len(frames) - 1) // (num_frames - 1)] for k in range(num_frames)]
        clip = torch.from_numpy(np.stack([np.asarray(Image.open(root / 'val' / path / f'{i + 1:08d}.jpg')
                                                     .convert('RGB')) for i in kept]))
        clip = clip.permute(3, 0, 1, 2).float()  # [3, T, H, W]
        h, w = clip.shape[-2:]
        new = (size, math.floor(w * size / h)) if h <= w else (math.floor(h * size / w), size)
        clip = F.interpolate(clip, size=new, mode='bilinear', align_corners=False).round().clamp(0, 255)
        top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)
        clip = clip[..., top:top + size, left:left + size]
        with torch.no_grad():
            feature = model.trunk(((clip / 255 - 0.45) / 0.225)[None])
            logits.append(model.online_evaluator.linear(feature)[0])
        labels.append(int(label))
    logits, labels = torch.stack(logits), torch.tensor(labels)
    top5 = (logits.topk(min(5, logits.shape[1]), 1).indices == labels[:, None]).any(1)
    return ((logits.argmax(1) == labels).sum().item() / len(rows), top5.sum().item() / len(rows),
            F.cross_entropy(logits, labels).item(), len(rows))


def test_online_val_accuracy_is_that_of_the_saved_evaluator(runs):
    """Every epoch the online evaluator is validated on the centre clips of val.csv (the demo's 12 videos)."""
    lines = log_entries(runs / 'straight')
    assert all({'online_val_acc1', 'online_val_acc5', 'online_val_loss'} <= set(x) for x in lines)
    acc1, acc5, loss, count = hand_val_stats(runs / 'straight' / LAST, make_demo_videos())
    assert count == 12 and lines[1]['online_val_acc1'] == pytest.approx(acc1, abs=1e-9)
    assert lines[1]['online_val_acc5'] == pytest.approx(acc5, abs=1e-9)
    assert lines[1]['online_val_loss'] == pytest.approx(loss, rel=1e-5)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(runs / 'straight' / 'tensorboard')).Reload()
    assert [e.value for e in events.Scalars('epoch/online_val_acc1')] == \
        pytest.approx([x['online_val_acc1'] for x in lines])


def small_video_data(folder, train_rows=8, val_rows=4):
    """Rows spread over the demo's classes (every 6th / 3rd) of its CSVs, over its frame folders (linked);
    no val split if val_rows is 0."""
    demo = make_demo_videos()
    folder.mkdir()
    for split, rows, every in (('train', train_rows, 6), ('val', val_rows, 3)):
        if rows:
            lines = (demo / f'{split}.csv').read_text().splitlines()[::every][:rows]
            (folder / f'{split}.csv').write_text('\n'.join(lines) + '\n')
            (folder / split).symlink_to(demo / split)
    return folder


def test_online_validation_is_skipped_without_val_csv_or_evaluator_and_never_changes_training(tmp_path, capsys):
    with_val, without_val = small_video_data(tmp_path / 'with_val'), small_video_data(tmp_path / 'no_val', val_rows=0)
    logs = {}
    for name, data, extra in (('val', with_val, []), ('no_val', without_val, []),
                              ('no_eval', with_val, ['--online_eval', 'false', '--epochs', '1'])):
        main_sce.main(parse(shlex.split(TINY) + ['--data_path', str(data), '--output_dir', str(tmp_path / name),
                                                 '--warmup_epochs', '0', *extra]))
        logs[name] = (log_entries(tmp_path / name), capsys.readouterr().out)
    (val, val_out), (no_val, no_val_out), (no_eval, no_eval_out) = logs.values()
    assert len(val) == 2 and val[1]['online_val_acc1'] == pytest.approx(hand_val_stats(tmp_path / 'val' / LAST,
                                                                                       with_val)[0], abs=1e-9)
    assert val_out.count('online evaluator on 4 val videos') == 2 and 'not validated' not in val_out
    assert no_val_out.count(f'no {without_val / "val.csv"}: the online evaluator is trained but not validated') == 1
    assert len(no_val) == 2 and not any(k.startswith('online_val') for x in no_val for k in x)
    assert len(no_eval) == 1 and not any(k.startswith('online') or k.startswith('train_online') for k in no_eval[0])
    assert 'online evaluator on' not in no_eval_out and 'not validated' not in no_eval_out
    # validation draws no random numbers from the training's streams: the same training with or without it
    assert [x['train_loss'] for x in val] == [x['train_loss'] for x in no_val]
    a, b = (torch.load(tmp_path / name / LAST, weights_only=True)['model'] for name in ('val', 'no_val'))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_uninterrupted_run(runs):
    a = torch.load(runs / 'straight' / LAST, weights_only=True)
    b = torch.load(runs / 'resumed' / LAST, weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['step'] == b['step'] == 12
    assert a['model'].keys() == b['model'].keys()
    different = [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert not different  # trunk, heads, target network, queue, pointer, BN statistics, online evaluator
    for opt in ('optimizer', ('extra', 'online_evaluator_optimizer')):
        sa, sb = (a[opt], b[opt]) if isinstance(opt, str) else (a[opt[0]][opt[1]], b[opt[0]][opt[1]])
        for pid, state in sa['state'].items():
            assert all(torch.equal(v, sb['state'][pid][k]) for k, v in state.items() if torch.is_tensor(v))
    log_a, log_b = [log_entries(runs / r) for r in ('straight', 'resumed')]
    assert [x['train_loss'] for x in log_a] == [x['train_loss'] for x in log_b]
    assert [x['train_pos_weight'] for x in log_a] == [x['train_pos_weight'] for x in log_b]


def test_eztorch_accumulation_mode_resumes_exactly_through_partial_windows(tmp_path):
    """--teacher_update micro_batch, accumulation 2 over 9 micro-batches of 5 per epoch (4 windows and a partial
    one): killed after epoch 0 and resumed, it ends as the uninterrupted run."""
    flags = shlex.split(TINY) + ['--global_batch_size', '10', '--accum_iter', '2', '--teacher_update', 'micro_batch']
    straight, resumed = straight_and_resumed(
        main_sce, lambda out: parse(flags + ['--output_dir', str(out)]), 1, tmp_path)
    a, b = (torch.load(folder / LAST, weights_only=True) for folder in (straight, resumed))
    assert a['step'] == b['step'] == 10  # 5 optimizer steps per epoch, the last on one micro-batch
    assert not [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert [x['train_loss'] for x in log_entries(straight)] == [x['train_loss'] for x in log_entries(resumed)]


@pytest.mark.parametrize('argv,flag', [(['--data_path', '/no/such/folder'], '--data_path /no/such/folder'),
                                       ([], '--data_path is required'),
                                       (['--data_path', 'demo', '--global_batch_size', '8', '--accum_iter', '3'],
                                        '--global_batch_size 8'),
                                       (['--data_path', 'demo', '--num_clips', '3'], '--num_clips 3')])
def test_bad_input_is_one_clear_line(monkeypatch, tmp_path, argv, flag, capsys):
    monkeypatch.setattr(sys, 'argv', ['main_sce.py', '--device', 'cpu', '--output_dir', str(tmp_path), *argv])
    with pytest.raises(SystemExit) as error:
        run_cli(main_sce.main, main_sce.get_args_parser())
    message = capsys.readouterr().err
    assert error.value.code == 2 and message.startswith('main_sce.py: error:') and flag in message
    assert message.count('\n') == 1


def test_two_processes_with_torchrun(tmp_path):
    """gloo on CPU: the global batch is split over the ranks, and only rank 0 writes."""
    out = tmp_path / 'ddp'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', 'main_sce.py',
                             *shlex.split(TINY), '--epochs', '1', '--warmup_epochs', '0', '--output_dir', str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'global batch 8 = 2 x 4 x 1' in result.stdout
    ckpt = torch.load(out / LAST, weights_only=True)
    assert ckpt['step'] == 6 and ckpt['model']['queue_ptr'].item() == 6 * 16 % 64
    assert len(ckpt['rng']) == 2 and len((out / 'log.txt').read_text().splitlines()) == 1
    # the 12 val videos are split over the ranks, each counted once, with rank 0's (saved) BN statistics
    assert 'online evaluator on 12 val videos' in result.stdout
    logged = json.loads((out / 'log.txt').read_text())
    acc1, _, loss, _ = hand_val_stats(out / LAST, make_demo_videos())
    assert logged['online_val_acc1'] == pytest.approx(acc1, abs=1e-9)
    assert logged['online_val_loss'] == pytest.approx(loss, rel=1e-5)
