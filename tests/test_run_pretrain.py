"""run_pretrain.py end to end: the command lines in use, the demo run, exact resume, bad inputs."""
import shlex
import subprocess
import sys

import pytest
import torch

import run_pretrain
import util.runtime
from helpers import REPO, log_entries, pretrain_args, straight_and_resumed, write_images
from util.checkpoint import LAST

# LocalMIM's pretraining commands (its README: ViT-B and ViT-L) and two full ImageNet runs, after `run_pretrain.py`;
# torch.distributed.launch appends --local-rank=N (torch >= 2.0) or --local_rank=N.
REFERENCE_COMMANDS = [
    '--batch_size 256 --model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 --epochs 1600 '
    '--warmup_epochs 40 --blr 2e-4 --weight_decay 0.05 --data_path /path/to/imagenet/ --output_dir /output_dir/',
    '--batch_size 128 --accum_iter 4 --model MIM_vit_large_patch16 --hog_nbins 18 --hog_bias --mask_ratio 0.75 '
    '--epochs 800 --warmup_epochs 40 --blr 1.5e-4 --weight_decay 0.05 --data_path /path/to/imagenet/ '
    '--output_dir /output_dir/',
    '--epochs 100 --batch_size 256 --warmup_epochs 10 --blr 2e-4 --world_size 4 --accum_iter 2 --weight_decay 0.05 '
    '--model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 '
    '--data_path /raid/utku/datasets/imagenet/classification/train/image_folders '
    '--output_dir full_pretrain_out --log_dir full_pretrain_out',
    '--epochs 100 --batch_size 256 --warmup_epochs 10 --blr 2e-4 --world_size 8 --accum_iter 1 --weight_decay 0.05 '
    '--model MIM_vit_base_patch16 --hog_nbins 9 --mask_ratio 0.75 '
    '--data_path /raid/utku/datasets/imagenet/classification/train/image_folders '
    '--output_dir full_pretrain_out_fast --log_dir full_pretrain_out_fast',
]
EXPECTED = [
    dict(batch_size=256, model='MIM_vit_base_patch16', hog_nbins=9, hog_bias=False, mask_ratio=0.75, epochs=1600,
         warmup_epochs=40, blr=2e-4, weight_decay=0.05, accum_iter=1, output_dir='/output_dir/'),
    dict(batch_size=128, accum_iter=4, model='MIM_vit_large_patch16', hog_nbins=18, hog_bias=True, epochs=800,
         blr=1.5e-4),
    dict(epochs=100, batch_size=256, warmup_epochs=10, blr=2e-4, world_size=4, accum_iter=2, log_dir='full_pretrain_out',
         data_path='/raid/utku/datasets/imagenet/classification/train/image_folders'),
    dict(world_size=8, accum_iter=1, output_dir='full_pretrain_out_fast', log_dir='full_pretrain_out_fast'),
]


@pytest.mark.parametrize('line,expected', list(zip(REFERENCE_COMMANDS, EXPECTED)))
@pytest.mark.parametrize('launcher_flag', ['--local-rank=3', '--local_rank=3', None])
def test_reference_commands_parse(line, expected, launcher_flag):
    argv = shlex.split(line) + ([launcher_flag] if launcher_flag else [])
    args = run_pretrain.get_args_parser().parse_args(argv)
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    assert args.local_rank == (3 if launcher_flag else -1)
    assert args.min_lr == 1e-6 and args.lr is None and args.auto_resume and args.pin_mem and args.seed == 0


def test_official_defaults_and_switches():
    parser = run_pretrain.get_args_parser()
    args = parser.parse_args([])
    assert (args.batch_size, args.epochs, args.input_size, args.blr, args.warmup_epochs, args.num_workers) == \
        (128, 400, 224, 1e-3, 40, 12)
    assert args.log_dir is None and args.clip_grad is None and args.dist_url == 'env://'
    assert not parser.parse_args(['--no_auto_resume']).auto_resume
    assert not parser.parse_args(['--no_pin_mem']).pin_mem


def test_resume_is_bit_exact(tmp_path, monkeypatch):
    """Also: each epoch visits the images in a new order (the sampler's shuffle of epoch e is torch.randperm with
    generator seed `--seed + e`), and the resumed run replays the order of the epoch it resumes at."""
    orders = []

    class RecordingSampler(util.runtime.DistributedSampler):
        def __iter__(self):
            order = list(super().__iter__())
            orders.append(order)
            return iter(order)

    monkeypatch.setattr(util.runtime, 'DistributedSampler', RecordingSampler)
    data = write_images(tmp_path / 'flat', 8)  # flat folder: 2 steps per epoch at batch 4

    def args_of(out):
        orders.append(out.name)  # marks where the orders of each run start
        return pretrain_args(data, out)

    straight, resumed = straight_and_resumed(run_pretrain, args_of, 1, tmp_path)
    expected = [torch.randperm(8, generator=torch.Generator().manual_seed(epoch)).tolist() for epoch in (0, 1)]
    assert expected[0] != expected[1]
    # the straight run's two epochs; epoch 0 of the interrupted run, then epoch 1 after the resume
    assert orders == ['straight', *expected, 'resumed', expected[0], 'resumed', expected[1]]

    a = torch.load(straight / LAST, weights_only=True)
    b = torch.load(resumed / LAST, weights_only=True)
    assert a['epoch'] == b['epoch'] == 1 and a['step'] == b['step'] == 4
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    for pid, state in a['optimizer']['state'].items():
        assert all(torch.equal(state[k], b['optimizer']['state'][pid][k]) for k in state)
    assert [entry['train_loss'] for entry in log_entries(straight)] == \
        [entry['train_loss'] for entry in log_entries(resumed)]


def test_no_auto_resume_starts_over(tmp_path):
    data = write_images(tmp_path / 'flat', 4)
    for _ in range(2):
        run_pretrain.main(pretrain_args(data, tmp_path / 'out', '--epochs', '1', '--no_auto_resume'))
    assert [entry['epoch'] for entry in log_entries(tmp_path / 'out')] == [0, 0]


def test_demo_run_writes_every_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo_cache'))
    out = tmp_path / 'run'
    args = pretrain_args('demo', out, '--log_dir', str(out / 'tb'), '--vis_freq', '1', '--batch_size', '48',
                         '--print_freq', '2', '--save_freq', '1')
    run_pretrain.main(args)
    assert {p.name for p in out.glob('checkpoint-*.pth')} == {'checkpoint-0.pth', 'checkpoint-1.pth', LAST}
    ckpt = torch.load(out / 'checkpoint-1.pth', weights_only=True)
    assert {'model', 'optimizer', 'epoch', 'step', 'args', 'rng', 'extra'} <= set(ckpt)
    assert 'scaler' not in ckpt  # no fp16 GradScaler on the CPU: the official resume would choke on a None
    assert ckpt['args']['model'] == 'MIM_vit_tiny_patch16' and ckpt['step'] == 6  # 144 images / 48 x 2 epochs
    log = log_entries(out)
    assert [entry['epoch'] for entry in log] == [0, 1]
    assert {'train_loss', 'train_lr', 'train_loss_scale4', 'train_loss_scale0.5', 'epoch_time'} <= set(log[0])
    assert log[1]['train_loss'] < log[0]['train_loss']
    assert len(list((out / 'vis').glob('epoch0001_scale*.png'))) == 4

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tb')).Reload()
    tags = set(events.Tags()['scalars'])
    assert {'train_loss', 'lr', 'train/loss_scale4', 'perf/images_per_s'} <= tags
    assert {'mim/scale4', 'mim/scale0.5'} <= set(events.Tags()['images'])


def test_corrupt_image_is_skipped_with_warning(tmp_path):
    data = write_images(tmp_path / 'flat', 4)
    (data / 'broken.jpg').write_bytes(b'not a jpeg at all')
    args = pretrain_args(data, tmp_path / 'out', '--epochs', '1', '--num_workers', '0', '--batch_size', '5')
    with pytest.warns(UserWarning, match='broken.jpg'):
        run_pretrain.main(args)
    assert (tmp_path / 'out' / 'log.txt').exists()


@pytest.mark.parametrize('extra,error,message', [
    (['--data_path', '/no/such/folder'], FileNotFoundError, '--data_path'),
    (['--model', 'MIM_vit_gigantic'], ValueError, 'unknown --model'),
    (['--input_size', '40'], ValueError, '--input_size'),
    (['--batch_size', '64'], ValueError, '--batch_size'),
])
def test_bad_inputs_raise_clear_errors(tmp_path, extra, error, message):
    data = write_images(tmp_path / 'flat', 4)
    with pytest.raises(error, match=message):
        run_pretrain.main(pretrain_args(data, tmp_path / 'out', *extra))


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='no images found'):
        run_pretrain.main(pretrain_args(tmp_path / 'empty', tmp_path / 'out'))


def test_command_line_error_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, 'run_pretrain.py', '--data_path', str(tmp_path / 'missing'),
                             '--device', 'cpu', '--output_dir', str(tmp_path / 'out')],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith('run_pretrain.py: error: --data_path')
