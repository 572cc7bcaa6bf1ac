"""Checkpoints never lose a good state: auto-resume skips a damaged file for the next newest, a model holding NaN or
inf and a failed write (a full disk) leave the previous checkpoint byte for byte, and each case ends in one line."""
import argparse
import errno
import os
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.multiprocessing as mp

from helpers import REPO, free_port, gloo_group, write_images
from util.checkpoint import (LAST, CheckpointError, NonFiniteStateError, latest_checkpoint, load_checkpoint,
                             save_checkpoint)
from util.runtime import resume_path
from util.train_step import NonFiniteLossError

pytestmark = pytest.mark.usefixtures('one_thread')  # conftest.py

DAMAGE = ['truncated', 'garbage', 'empty', 'no_central_directory']


def damage(path, how):
    data = path.read_bytes()
    path.write_bytes({'truncated': data[:len(data) // 2], 'garbage': os.urandom(len(data)), 'empty': b'',
                      'no_central_directory': data[:data.find(b'PK\x01\x02')]}[how])


def tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def save(folder, epoch, model, optimizer, **kwargs):
    save_checkpoint(str(folder), epoch, 10 * epoch, argparse.Namespace(), model, optimizer, **kwargs)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def lines_with(text, printed):
    return [line for line in printed.splitlines() if text in line]


# ------------------------------------------------------------------------------------------------ damaged files

@pytest.mark.parametrize('how', DAMAGE)
def test_auto_resume_skips_a_damaged_last_checkpoint(tmp_path, capsys, how):
    model, optimizer = tiny_model()
    save(tmp_path, 0, model, optimizer, keep=True)  # checkpoint-0.pth and checkpoint-last.pth
    save(tmp_path, 1, model, optimizer)             # checkpoint-last.pth of epoch 1
    damage(tmp_path / LAST, how)
    capsys.readouterr()
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-0.pth')
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and f'{tmp_path / LAST} cannot be read' in printed[0], printed
    assert {'empty': 'empty file', 'truncated': 'truncated at', 'no_central_directory': 'truncated at'}.get(how, '') \
        in printed[0]


def test_a_damaged_last_checkpoint_falls_back_to_the_newest_numbered_one(tmp_path):
    model, optimizer = tiny_model()
    for epoch in range(3):
        save(tmp_path, epoch, model, optimizer, keep=True)  # checkpoint-0/1/2.pth
    save(tmp_path, 3, model, optimizer)
    damage(tmp_path / LAST, 'truncated')
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / 'checkpoint-2.pth')


def test_damaged_files_are_skipped_newest_first(tmp_path, capsys):
    model, optimizer = tiny_model()
    save(tmp_path, 0, model, optimizer, keep=True)
    save(tmp_path, 1, model, optimizer)
    shutil.copy(tmp_path / LAST, tmp_path / 'checkpoint-2.pth')
    damage(tmp_path / 'checkpoint-2.pth', 'truncated')  # newer than checkpoint-last.pth, but unreadable
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / LAST)
    damage(tmp_path / LAST, 'garbage')
    damage(tmp_path / 'checkpoint-0.pth', 'empty')
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=f'^no checkpoint in {tmp_path} can be resumed .* start over on purpose '
                                              f'with --auto_resume false') as error:
        latest_checkpoint(str(tmp_path))  # never None: the run would start over and overwrite them
    assert '\n' not in str(error.value)
    printed = capsys.readouterr().out
    assert len(lines_with('cannot be read', printed)) == 3
    assert lines_with('empty file: damaged', printed) and lines_with('truncated at', printed)
    assert lines_with('neither a zip archive nor a pickle', printed)


def test_explicit_resume_of_a_damaged_file_is_a_one_line_value_error(tmp_path):
    model, optimizer = tiny_model()
    save(tmp_path, 0, model, optimizer)
    damage(tmp_path / LAST, 'truncated')
    with pytest.raises(ValueError, match='cannot be read') as error:
        load_checkpoint(str(tmp_path / LAST), model, optimizer)
    assert isinstance(error.value, CheckpointError) and str(tmp_path / LAST) in str(error.value)
    assert '\n' not in str(error.value)


def test_stale_temporary_files_are_removed_at_start(tmp_path):
    ended = int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                               text=True, check=True).stdout)  # a process that no longer runs
    stale, live = tmp_path / f'{LAST}.tmp.{ended}', tmp_path / f'{LAST}.tmp.{os.getpid()}'
    other = tmp_path / 'notes.tmp.txt'
    for path in (stale, live, other):
        path.write_bytes(b'half a checkpoint')
    assert resume_path('', True, str(tmp_path)) is None
    assert not stale.exists() and live.exists() and other.exists()


def spark_file(path, epoch):
    torch.save({'model': {}, 'epoch': epoch}, path)


def test_spark_skips_a_damaged_checkpoint(tmp_path, capsys):
    from util.spark.checkpoint import latest_spark_checkpoint, output_names, resume_spark
    names = output_names('resnet18')
    ours, official = tmp_path / names['resume'], tmp_path / names['resume_new']
    spark_file(ours, 3)
    damage(ours, 'truncated')
    official.symlink_to(ours.name)  # as SparK writes it: the same file, reported once
    capsys.readouterr()
    with pytest.raises(CheckpointError, match=f'no checkpoint in {tmp_path} can be resumed \\({ours.name}: .*'
                                              f'--resume_from FILE.*--auto_resume false'):
        latest_spark_checkpoint(str(tmp_path), 'resnet18')  # never a silent restart over them
    printed = capsys.readouterr().out
    assert len(lines_with('cannot be read', printed)) == 1
    official.unlink()
    spark_file(official, 2)  # an intact official-name file beside it is the fallback
    assert latest_spark_checkpoint(str(tmp_path), 'resnet18') == str(official)
    with pytest.raises(CheckpointError, match=f'{ours.name} cannot be read'):
        resume_spark(str(ours), None, None)


# ------------------------------------------------------------------------------------------------ non-finite state

@pytest.mark.parametrize('tensor,value,later', [('0.weight', float('nan'), '1.running_mean'),
                                                ('1.running_var', float('inf'), None)])
def test_non_finite_model_is_not_saved(tmp_path, tensor, value, later):
    model, optimizer = tiny_model()
    save(tmp_path, 0, model, optimizer, keep=True)
    before = files(tmp_path)
    with torch.no_grad():
        model.state_dict()[tensor].view(-1)[1] = value
        if later:  # also bad, but the message names the first one
            model.state_dict()[later].fill_(float('nan'))
    with pytest.raises(NonFiniteLossError, match=f'^{tensor} holds NaN or inf') as error:
        save(tmp_path, 1, model, optimizer, keep=True, best=True)
    assert isinstance(error.value, NonFiniteStateError)
    assert f'the last good checkpoint is {tmp_path / LAST}' in str(error.value) and '\n' not in str(error.value)
    assert files(tmp_path) == before


class TinySpark(torch.nn.Module):
    """What save_spark_outputs uses of a SparK model, with a BatchNorm in the encoder."""
    official_convnext = False

    def __init__(self):
        super().__init__()
        self.sparse_encoder = torch.nn.Module()
        self.sparse_encoder.sp_cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))

    def official_state_dict(self, with_config=False):
        return self.state_dict()


def spark_save(folder, model, epoch):
    from util.spark.checkpoint import save_spark_outputs  # imported here: the spawned workers skip the models
    args = argparse.Namespace(model='resnet18', exp_dir=str(folder), input_size=32)
    trainer = types.SimpleNamespace(num_updates=epoch, scaler=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    save_spark_outputs(args, epoch, trainer, model, optimizer, {'min_loss': 1.0, 'last_loss': 1.0})


def test_spark_saves_nothing_for_a_non_finite_model(tmp_path):
    from util.spark.checkpoint import output_names
    model = TinySpark()
    spark_save(tmp_path, model, 0)
    before = files(tmp_path)
    assert set(output_names('resnet18').values()) <= set(before)
    model.sparse_encoder.sp_cnn[1].running_var[2] = float('inf')
    with pytest.raises(NonFiniteLossError, match='sparse_encoder.sp_cnn.1.running_var') as error:
        spark_save(tmp_path, model, 1)
    assert str(tmp_path / output_names('resnet18')['resume']) in str(error.value)
    assert files(tmp_path) == before


# ------------------------------------------------------------------------------------------------ full disk

def fill_disk_after(monkeypatch, free_bytes):
    """torch.save's file object accepts `free_bytes`, then each write fails as on a full disk."""
    real_save = torch.save

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, data):
            if self.file.tell() + len(data) > free_bytes:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(torch, 'save', lambda obj, f, *args, **kwargs: real_save(obj, FullDisk(f), *args, **kwargs))


def test_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optimizer = tiny_model()
    save(tmp_path, 0, model, optimizer)
    before = files(tmp_path)
    fill_disk_after(monkeypatch, 300)
    with pytest.raises(CheckpointError) as error:
        save(tmp_path, 1, model, optimizer)
    message = str(error.value)
    assert message == (f'could not write {tmp_path / LAST}: No space left on device; the last good checkpoint is '
                       f'{tmp_path / LAST}, unchanged')
    assert files(tmp_path) == before  # and no temporary file left


def test_full_disk_while_writing_spark_encoder_files(tmp_path, monkeypatch):
    from util.spark.checkpoint import output_names
    model = TinySpark()
    spark_save(tmp_path, model, 0)
    before = files(tmp_path)
    real_save, calls = torch.save, []

    def encoder_write_fails(obj, f, *args, **kwargs):  # the resumable checkpoint is written, then the disk is full
        calls.append(obj)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', encoder_write_fails)
    names = output_names('resnet18')
    with pytest.raises(CheckpointError, match=f'could not write .*{names["encoder"]}: No space left on device; '
                                              f'the last good checkpoint is .*{names["resume"]}'):
        spark_save(tmp_path, model, 1)
    after = files(tmp_path)
    assert set(after) == set(before) and after[names['encoder']] == before[names['encoder']]


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs the right to mount, e.g. root in a container); skipped where it cannot be mounted."""
    folder = tmp_path / 'disk'
    folder.mkdir()
    mount = shutil.which('mount')
    if not mount or subprocess.run([mount, '-t', 'tmpfs', '-o', 'size=256k', 'tmpfs', str(folder)],
                                   capture_output=True).returncode:
        pytest.skip('cannot mount a tmpfs here')
    yield folder
    subprocess.run(['umount', str(folder)], check=True)


def test_real_full_disk(small_disk):
    model, optimizer = tiny_model()
    save(small_disk, 0, model, optimizer)
    before = files(small_disk)
    with pytest.raises(CheckpointError, match='No space left on device') as error:
        save(small_disk, 1, model, optimizer, extra={'too_big': torch.zeros(100_000)})
    assert f'the last good checkpoint is {small_disk / LAST}, unchanged' in str(error.value)
    assert files(small_disk) == before


# ------------------------------------------------------------------------------------------------ every rank agrees

def _disk_full(obj, path):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _two_rank_worker(rank, port, folder):
    from util import checkpoint
    outcome = []
    with gloo_group(rank, 2, port):
        model, optimizer = tiny_model()
        with torch.no_grad():
            model[0].weight[0, 0] = float('nan') if rank == 1 else 0.0  # only rank 1 went bad
        try:
            save(folder, 0, model, optimizer)
        except NonFiniteLossError as error:
            outcome.append(str(error))
        model, optimizer = tiny_model()
        if rank == 0:  # only the main process writes: its full disk must stop rank 1 too
            checkpoint.atomic_save = _disk_full
        try:
            save(folder, 1, model, optimizer)
        except CheckpointError as error:
            outcome.append(str(error))
    torch.save(outcome, os.path.join(folder, f'outcome{rank}.pt'))


def test_every_rank_stops_when_one_cannot_save(tmp_path):
    mp.spawn(_two_rank_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    outcomes = [torch.load(tmp_path / f'outcome{rank}.pt') for rank in range(2)]
    for rank, (non_finite, write) in enumerate(outcomes):
        assert non_finite.startswith('0.weight holds NaN or inf'), rank
        assert 'could not write' in write if rank == 0 else 'main process could not write' in write
    assert not (tmp_path / LAST).exists()


# ------------------------------------------------------------------------------------------------ whole runs

def pretrain_argv(data, out, *extra):
    return ['--data_path', str(data), '--output_dir', str(out), '--model', 'MIM_vit_tiny_patch16', '--input_size',
            '32', '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '1', '--blr', '1e-3', '--num_workers', '0',
            '--device', 'cpu', '--print_freq', '1', '--vis_freq', '0', *extra]


def run_pretrain_main(*argv):
    import run_pretrain
    run_pretrain.main(run_pretrain.get_args_parser().parse_args(argv))


@pytest.fixture(scope='module')
def finished_run(module_tmp):
    """A 2-epoch run: checkpoint-0.pth, checkpoint-1.pth and checkpoint-last.pth (epoch 1)."""
    tmp = module_tmp
    data = write_images(tmp / 'flat', 4)  # one step per epoch
    run_pretrain_main(*pretrain_argv(data, tmp / 'out'))
    return data, tmp / 'out'


def test_run_falls_back_to_the_older_checkpoint(finished_run, tmp_path, capsys):
    data, finished = finished_run
    out = shutil.copytree(finished, tmp_path / 'out')
    (out / 'checkpoint-1.pth').unlink()
    damage(out / LAST, 'truncated')
    capsys.readouterr()
    run_pretrain_main(*pretrain_argv(data, out, '--epochs', '3'))
    printed = capsys.readouterr().out
    assert len(lines_with('cannot be read', printed)) == 1 and LAST in lines_with('cannot be read', printed)[0]
    assert f'resumed from {out / "checkpoint-0.pth"} (epoch 0 done' in printed
    assert torch.load(out / LAST, weights_only=True)['epoch'] == 2


def test_run_with_nan_weights_at_the_end_of_an_epoch_saves_nothing(finished_run, tmp_path, monkeypatch):
    import run_pretrain
    data, finished = finished_run
    out = shutil.copytree(finished, tmp_path / 'out')
    before = files(out)
    real = run_pretrain.train_one_epoch

    def blows_up_in_the_last_step(loader, trainer, epoch, *args, **kwargs):
        stats = real(loader, trainer, epoch, *args, **kwargs)
        with torch.no_grad():
            trainer.model.blocks[3].attn.qkv.weight[0, 0] = float('nan')
        return stats
    monkeypatch.setattr(run_pretrain, 'train_one_epoch', blows_up_in_the_last_step)
    with pytest.raises(NonFiniteLossError, match=f'^blocks.3.attn.qkv.weight holds NaN or inf .*{out / LAST}'):
        run_pretrain_main(*pretrain_argv(data, out, '--epochs', '3'))
    assert files(out) == before


def test_resuming_with_another_model_is_a_value_error(finished_run, tmp_path):
    data, finished = finished_run
    out = shutil.copytree(finished, tmp_path / 'out')
    with pytest.raises(ValueError, match=f'checkpoint {out / LAST} does not fit this model') as error:
        run_pretrain_main(*pretrain_argv(data, out, '--model', 'MIM_vit_small_patch16', '--epochs', '3'))
    assert '\n' not in str(error.value)


def test_command_line_resume_of_a_damaged_file_is_one_line(tmp_path):
    data = write_images(tmp_path / 'flat', 4)
    damaged = tmp_path / 'old' / LAST
    damaged.parent.mkdir()
    damaged.write_bytes(b'PK\x03\x04' + bytes(100))  # the start of a zip, cut short
    result = subprocess.run([sys.executable, 'run_pretrain.py', *pretrain_argv(data, tmp_path / 'out'), '--resume',
                             str(damaged)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and 'Traceback' not in result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f'run_pretrain.py: error: {damaged} cannot be read'), errors
