"""util/preemption.py piece by piece (test_preemption.py runs whole scripts): what a stop saves and says, the
stop flag all-reduced on a CPU group inside a process group, and SLURM requeueing."""
import re
import subprocess
import types

import pytest
import torch.distributed as dist

from util import preemption
from util.preemption import MidEpochCheckpoints, Preempted, request_stop, requeue_if_asked


@pytest.fixture(autouse=True)
def no_stop_left():
    preemption._received.clear()
    yield
    preemption._received.clear()


def printed(capsys):
    """The lines printed, without the time stamp a script's print may add ([12:00:00])."""
    return [re.sub(r'^\[\d\d:\d\d:\d\d\] ', '', line) for line in capsys.readouterr().out.splitlines()]


def stop_at_step(checkpoints, steps_done=5):
    with pytest.raises(Preempted) as stopped:
        checkpoints.after_step(types.SimpleNamespace(num_updates=3), 2, steps_done, lambda: {'loss': 1.5})
    assert stopped.value.code == preemption.PREEMPTED_EXIT_CODE


def test_a_requested_stop_saves_the_position_and_says_how_to_resume(capsys):
    saved = []
    checkpoints = MidEpochCheckpoints(lambda epoch, mid: saved.append((epoch, mid)))
    checkpoints.epoch_start_rng = 'rng at the epoch start'
    request_stop()
    stop_at_step(checkpoints)
    assert saved == [(2, {'epoch': 2, 'step': 5, 'ranks': [{'epoch_start_rng': 'rng at the epoch start',
                                                             'metrics': {'loss': 1.5}}]})]
    assert printed(capsys) == ['SIGTERM: saved a checkpoint at epoch 2, step 5; run the same command to resume there']
    assert not preemption._received  # a later run in this process starts afresh


def test_a_stop_asked_on_another_process_is_named_so(monkeypatch, capsys):
    checkpoints = MidEpochCheckpoints(lambda epoch, mid: None)
    monkeypatch.setattr(checkpoints, '_stop_requested', lambda: True)  # what the all-reduce says: some rank was
    stop_at_step(checkpoints)
    assert printed(capsys)[0].startswith('a signal on another process: saved a checkpoint at epoch 2, step 5')


def test_inside_a_process_group_the_flag_is_all_reduced_on_a_cpu_group(one_process_group, monkeypatch):
    reduced, saved = [], []
    all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, 'all_reduce', lambda t, op, group: (reduced.append(group), all_reduce(t, op, group)))
    checkpoints = MidEpochCheckpoints(lambda epoch, mid: saved.append(mid['ranks']))
    assert checkpoints._group is dist.group.WORLD  # gloo already: no second group
    checkpoints.after_step(types.SimpleNamespace(num_updates=3), 2, 5, dict)
    assert reduced == [dist.group.WORLD] and saved == []
    request_stop('SIGUSR1')
    stop_at_step(checkpoints)
    assert saved == [[{'epoch_start_rng': None, 'metrics': {'loss': 1.5}}]]  # one entry per rank


def test_under_nccl_the_flag_gets_a_gloo_group(one_process_group, monkeypatch):
    created = []
    monkeypatch.setattr(dist, 'get_backend', lambda: 'nccl')
    monkeypatch.setattr(dist, 'new_group', lambda backend: created.append(backend) or 'a gloo group')
    assert MidEpochCheckpoints(lambda epoch, mid: None)._group == 'a gloo group' and created == ['gloo']


class Scontrol:
    """subprocess.run for `scontrol`: records each call; `show job` prints the job with Requeue=`requeue`."""

    def __init__(self, requeue, fail=False):
        self.requeue, self.fail, self.calls = requeue, fail, []

    def __call__(self, argv, **kwargs):
        self.calls.append((argv, kwargs))
        if self.fail:
            raise FileNotFoundError('scontrol')
        return types.SimpleNamespace(stdout=f'JobId=42 JobName=pretrain Requeue={self.requeue} Restarts=0\n')


def test_a_slurm_job_submitted_with_requeue_is_requeued(monkeypatch, capsys):
    scontrol = Scontrol(requeue=1)
    monkeypatch.setattr(subprocess, 'run', scontrol)
    monkeypatch.setenv('SLURM_JOB_ID', '42')
    requeue_if_asked()
    assert scontrol.calls == [
        (['scontrol', 'show', 'job', '-o', '42'], dict(capture_output=True, text=True, timeout=30)),
        (['scontrol', 'requeue', '42'], dict(check=True, timeout=30))]
    assert printed(capsys) == ['requeued SLURM job 42']


def test_slurm_jobs_without_requeue_and_runs_outside_slurm_are_left_alone(monkeypatch, capsys):
    scontrol = Scontrol(requeue=0)
    monkeypatch.setattr(subprocess, 'run', scontrol)
    monkeypatch.delenv('SLURM_JOB_ID', raising=False)
    requeue_if_asked()
    assert scontrol.calls == []
    monkeypatch.setenv('SLURM_JOB_ID', '42')
    requeue_if_asked()
    assert [argv for argv, _ in scontrol.calls] == [['scontrol', 'show', 'job', '-o', '42']]
    monkeypatch.setattr(subprocess, 'run', Scontrol(requeue=1, fail=True))
    requeue_if_asked()
    assert printed(capsys) == ['could not requeue SLURM job 42: scontrol']


def test_a_mid_epoch_checkpoint_of_another_process_count_restarts_its_epoch(monkeypatch, capsys):
    """Saved by 2 processes, resumed by 1: the position and random states do not fit, the epoch starts again."""
    ckpt = {'epoch': 3, 'extra': {'mid_epoch': {'epoch': 4, 'step': 10, 'ranks': [{}, {}]}}}
    checkpoints = MidEpochCheckpoints(lambda epoch, mid: None)
    assert checkpoints.resume_from(ckpt) == 4 and checkpoints.resume is None
    assert printed(capsys) == ['the mid-epoch checkpoint was written by 2 processes, this run has 1: restarting '
                               'epoch 4 from its start']
