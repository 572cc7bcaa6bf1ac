"""Mid-epoch checkpoints: a SIGTERM / SIGUSR1 inside an epoch saves and exits, the same command resumes at the next
batch and ends exactly as the run that was not interrupted, in every entry script; --save_every_steps likewise."""
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import main_sce
import main_slak
import main_spark
import run_finetune
import run_pretrain
from helpers import REPO, finetune_args, free_port, log_entries, pretrain_args, slak_args, write_images
from util import preemption
from util.train_step import TrainStep


@pytest.fixture
def signal_handlers():
    """The handlers run_cli installs, restored afterwards."""
    saved = preemption.install_signal_handlers()
    yield
    preemption.restore_signal_handlers(saved)


def signal_at_step(monkeypatch, step, sig=signal.SIGTERM):
    """Sends `sig` to this process right after optimizer step number `step` (1-based) of the run."""
    real, count = TrainStep.step, [0]

    def step_then_signal(self, hooks=()):
        real(self, hooks)
        count[0] += 1
        if count[0] == step:
            os.kill(os.getpid(), sig)
    monkeypatch.setattr(TrainStep, 'step', step_then_signal)
    return lambda: monkeypatch.setattr(TrainStep, 'step', real)


def sce_args(out, *extra):
    argv = shlex.split('--data_path demo --device cpu --amp none --crop_size 32 --num_frames 4 --global_batch_size 8 '
                       '--queue_size 64 --epochs 2 --warmup_epochs 1 --num_workers 0 --print_freq 100')
    return main_sce.get_args_parser().parse_args(argv + ['--output_dir', str(out), *extra])


def spark_args(data, out, *extra):
    argv = ['--exp_name=t', f'--exp_dir={out}', f'--data_path={data}', '--model=resnet18', '--input_size=64',
            '--bs=4', '--ep=2', '--wp_ep=1', '--num_workers=0', '--device=cpu', '--print_freq=100', *extra]
    return main_spark.get_args_parser().parse_args(argv)


# script, args(data, out), the resumable file, the step to signal at (inside epoch 1)
SCRIPTS = {
    'localmim_freezeout': (run_pretrain, lambda data, out: pretrain_args(
        data, out, '--epochs', '3', '--warmup_epochs', '0', '--how_scale', 'linear', '--t_0', '0.3',
        '--num_workers', '2', '--print_freq', '100'), 'checkpoint-last.pth', 6),
    'finetune_ema': (run_finetune, lambda data, out: finetune_args(
        out, '--epochs', '2', '--model_ema', '--model_ema_decay', '0.9', '--mixup', '0.8', '--batch_size', '8',
        '--num_workers', '2'), 'checkpoint-last.pth', 8),
    'spark': (main_spark, lambda data, out: spark_args(data, out), 'resnet18_still_pretraining.pth', 3),
    'slak_sparse': (main_slak, lambda data, out: slak_args(
        out, '--sparse', '--sparse_init', 'ERK', '--sparsity', '0.5', '-u', '2', '--model_ema', 'true',
        '--batch_size', '8'), 'checkpoint-last.pth', 5),
    'sce': (main_sce, lambda data, out: sce_args(out, '--epochs', '1', '--warmup_epochs', '0'), 'checkpoint-last.pth',
            3),
}
FAST = {'localmim_freezeout'}  # the other scripts' cases run with the slow tests


def assert_same_state(a, b):
    for key in ('model', 'optimizer', 'step', 'epoch'):
        assert key in a
    assert a['step'] == b['step'] and a['epoch'] == b['epoch']
    for k, v in a['model'].items():
        assert torch.equal(v, b['model'][k]), k
    for (i, sa), sb in zip(a['optimizer']['state'].items(), b['optimizer']['state'].values()):
        for k, v in sa.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sb[k])), (i, k)


@pytest.mark.parametrize('name', [name if name in FAST else pytest.param(name, marks=pytest.mark.slow)
                                  for name in SCRIPTS])
def test_signal_mid_epoch_resumes_as_if_never_stopped(name, tmp_path, monkeypatch, signal_handlers):
    monkeypatch.setenv('DEMO_DATA_ROOT', str(tmp_path / 'demo'))
    script, make_args, resumable, step = SCRIPTS[name]
    data = write_images(tmp_path / 'images', 16, size=64)
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    script.main(make_args(data, straight))
    restore = signal_at_step(monkeypatch, step, signal.SIGUSR1 if name == 'sce' else signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        script.main(make_args(data, resumed))
    assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE
    mid = torch.load(resumed / resumable, weights_only=True)
    assert mid['extra']['mid_epoch']['step'] > 0 and mid['step'] == step
    restore()
    script.main(make_args(data, resumed))
    a, b = (torch.load(folder / resumable, weights_only=True) for folder in (straight, resumed))
    assert b['extra']['mid_epoch'] is None
    assert_same_state(a, b)
    if name != 'spark':  # spark logs to pretrain_log.txt
        losses = [[entry['train_loss'] for entry in log_entries(folder)] for folder in (straight, resumed)]
        assert losses[0] == losses[1]


def test_preempted_twice_in_one_epoch_resumes_as_if_never_stopped(tmp_path, monkeypatch, signal_handlers):
    """The second mid-epoch checkpoint is written by a resumed run: it must still hold the epoch's starting RNG (the
    data order) and the metric sums of both parts of the epoch."""
    script, make_args, resumable, _ = SCRIPTS['localmim_freezeout']
    data = write_images(tmp_path / 'images', 16, size=64)
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    script.main(make_args(data, straight))
    # 4 steps per epoch: stopped after step 5 (epoch 1, its 1st step), then 2 steps later (epoch 1, its 3rd)
    for after, total, in_epoch in ((5, 5, 1), (2, 7, 3)):
        restore = signal_at_step(monkeypatch, after)
        with pytest.raises(SystemExit):
            script.main(make_args(data, resumed))
        restore()
        mid = torch.load(resumed / resumable, weights_only=True)
        assert (mid['step'], mid['extra']['mid_epoch']['epoch'], mid['extra']['mid_epoch']['step']) == \
            (total, 1, in_epoch)
    script.main(make_args(data, resumed))
    a, b = (torch.load(folder / resumable, weights_only=True) for folder in (straight, resumed))
    assert_same_state(a, b)
    logs = [log_entries(folder) for folder in (straight, resumed)]
    assert [e['train_loss'] for e in logs[0]] == [e['train_loss'] for e in logs[1]]


def test_save_every_steps_resumes_inside_the_epoch(tmp_path, monkeypatch):
    data = write_images(tmp_path / 'images', 16)
    args = lambda out: pretrain_args(data, out, '--epochs', '2', '--num_workers', '0', '--save_every_steps', '3')  # noqa: E731
    run_pretrain.main(args(tmp_path / 'straight'))
    real, count = TrainStep.step, [0]

    def step_then_die(self, hooks=()):
        real(self, hooks)
        count[0] += 1
        if count[0] == 7:  # a host that dies without a signal, after the save at step 6 (epoch 1, step 2)
            raise KeyboardInterrupt
    monkeypatch.setattr(TrainStep, 'step', step_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain.main(args(tmp_path / 'resumed'))
    mid = torch.load(tmp_path / 'resumed' / 'checkpoint-last.pth', weights_only=True)
    assert (mid['epoch'], mid['step'], mid['extra']['mid_epoch']['epoch'], mid['extra']['mid_epoch']['step']) == \
        (0, 6, 1, 2)
    monkeypatch.setattr(TrainStep, 'step', real)
    run_pretrain.main(args(tmp_path / 'resumed'))
    a, b = (torch.load(tmp_path / f / 'checkpoint-last.pth', weights_only=True) for f in ('straight', 'resumed'))
    assert_same_state(a, b)


def test_sigterm_from_outside_saves_and_exits_with_the_preempted_code(tmp_path):
    """A real process: SIGTERM while it trains -> one line, exit code 3, a resumable mid-epoch checkpoint."""
    data = write_images(tmp_path / 'images', 64)
    out = tmp_path / 'run'
    cmd = [sys.executable, 'run_pretrain.py', '--data_path', str(data), '--output_dir', str(out), '--model',
           'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', '2', '--epochs', '50', '--warmup_epochs', '1',
           '--num_workers', '2', '--device', 'cpu', '--print_freq', '1', '--vis_freq', '0']
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = 0
    for line in proc.stdout:  # wait until it has trained two steps
        seen += 'Epoch: [0]' in line
        if seen == 2:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == preemption.PREEMPTED_EXIT_CODE, rest
    assert 'Traceback' not in rest and 'SIGTERM: saved a checkpoint at epoch' in rest
    mid = torch.load(out / 'checkpoint-last.pth', weights_only=True)
    assert mid['extra']['mid_epoch']['step'] == mid['step'] > 0


@pytest.mark.slow
def test_two_process_launch_stops_together_and_resumes_exactly(tmp_path, monkeypatch):
    """torchrun, 2 gloo processes: rank 1 alone gets SIGTERM inside epoch 1; both ranks stop at the same step, the
    rerun resumes there and ends with the weights of the launch that was not stopped."""
    data = write_images(tmp_path / 'images', 16)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}

    def launch(out, **extra_env):
        dump = out / 'dump'
        dump.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
               str(REPO / 'tests' / 'launch_dump.py'), 'run_pretrain.py', '--data_path', str(data), '--output_dir',
               str(out), '--model', 'MIM_vit_tiny_patch16', '--input_size', '32', '--batch_size', '2', '--epochs', '2',
               '--warmup_epochs', '0', '--num_workers', '1', '--device', 'cpu', '--print_freq', '100',
               '--vis_freq', '0']
        return subprocess.run(cmd, cwd=REPO, env={**env, 'RANK_DUMP_DIR': str(dump), **extra_env},
                              capture_output=True, text=True, timeout=600)

    straight = launch(tmp_path / 'straight')
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = launch(tmp_path / 'resumed', SIGNAL_AT_STEP='1:6')  # 4 steps per epoch: epoch 1, step 2
    assert stopped.returncode != 0
    assert 'a signal on another process' in stopped.stdout + stopped.stderr or 'SIGTERM: saved' in stopped.stdout
    mid = torch.load(tmp_path / 'resumed' / 'checkpoint-last.pth', weights_only=True)
    assert (mid['step'], mid['extra']['mid_epoch']['epoch'], mid['extra']['mid_epoch']['step']) == (6, 1, 2)
    assert len(mid['extra']['mid_epoch']['ranks']) == 2
    resumed = launch(tmp_path / 'resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'resuming epoch 1 at step 2' in resumed.stdout
    assert_same_state(*(torch.load(tmp_path / f / 'checkpoint-last.pth', weights_only=True)
                        for f in ('straight', 'resumed')))
    for rank in range(2):  # every rank, not only the one that writes the checkpoint
        a, b = (torch.load(tmp_path / f / 'dump' / f'rank{rank}_epoch1.pt', weights_only=True)['params']
                for f in ('straight', 'resumed'))
        assert all(torch.equal(v, b[k]) for k, v in a.items())
