"""Mid-epoch checkpoints: on SIGTERM / SIGUSR1 (cluster preemption, a time limit) and every --save_every_steps.

A signal only sets a flag; the engine asks `MidEpochCheckpoints.after_step` at each optimizer step, all ranks
agree (one small all-reduce on a CPU group), the script's `save` writes checkpoint-last.pth with the position
in the epoch, and the run exits with PREEMPTED_EXIT_CODE. The next run resumes at the next batch: it replays the
epoch's loader from the random state the epoch started with, discards the batches already trained on (data
loading only; exact, since each loader worker's augmentations depend on the samples it drew before), then
restores the random state of the interrupted step. So the remaining batches, masks and augmentations are those
of the run that was not interrupted.
"""
import os
import signal
import subprocess

import torch
import torch.distributed as dist

from util.checkpoint import rng_state, set_rng_state
from util.dist import get_rank, get_world_size, is_dist_avail_and_initialized, is_main_process
from util.stop_signals import STOP_SIGNALS

PREEMPTED_EXIT_CODE = 3
_received = []  # names of the signals received by this process


def _on_signal(signum, frame):
    _received.append(signal.Signals(signum).name)


def install_signal_handlers():
    """SIGTERM and SIGUSR1 ask for a mid-epoch checkpoint and a clean exit (main thread only; run_cli calls it).
    Returns the previous handlers, for `restore_signal_handlers`."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    _received.clear()
    return saved


def restore_signal_handlers(saved):
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def request_stop(name='SIGTERM'):
    """What a stop signal does; for tests and for code that wants to stop the run at the next step."""
    _received.append(name)


class Preempted(SystemExit):
    pass


class MidEpochCheckpoints:
    """`save(epoch, mid_epoch)` is the script's checkpoint writer: it saves the run as after epoch - 1 plus
    `mid_epoch` (in `extra`), so any resume logic that ignores the position still resumes correctly."""

    def __init__(self, save, every_steps=0):
        self.save_fn, self.every_steps = save, every_steps
        self.resume = None  # the mid_epoch state of the checkpoint resumed from
        self.epoch_start_rng = None
        self._group = None
        if is_dist_avail_and_initialized():  # collective: every rank builds it here
            self._group = dist.new_group(backend='gloo') if dist.get_backend() != 'gloo' else dist.group.WORLD

    def resume_from(self, ckpt):
        """The epoch to start at: the interrupted one for a mid-epoch checkpoint, else the one after the saved."""
        mid = (ckpt.get('extra') or {}).get('mid_epoch')
        if mid and len(mid['ranks']) != get_world_size():
            print(f'the mid-epoch checkpoint was written by {len(mid["ranks"])} processes, this run has '
                  f'{get_world_size()}: restarting epoch {mid["epoch"]} from its start')
            mid = None
        self.resume = mid
        return mid['epoch'] if mid else ckpt['epoch'] + 1

    def batches(self, data_loader, epoch):
        """(iterator, first step, metric sums so far) for this epoch; for the interrupted epoch the iterator
        has passed the batches already trained on."""
        mid = self.resume if self.resume and self.resume['epoch'] == epoch else None
        self.resume = None
        if mid is None:
            self.epoch_start_rng = rng_state()
            return iter(data_loader), 0, None
        mine = mid['ranks'][get_rank()]
        now = rng_state()
        set_rng_state(mine['epoch_start_rng'])
        self.epoch_start_rng = mine['epoch_start_rng']
        iterator = iter(data_loader)
        for _ in range(mid['step']):
            next(iterator)
        set_rng_state(now)
        print(f'resuming epoch {epoch} at step {mid["step"]} of {len(data_loader)}')
        return iterator, mid['step'], mine['metrics']

    def _stop_requested(self):
        if self._group is None:
            return bool(_received)
        flag = torch.tensor([1 if _received else 0], dtype=torch.int32)  # on the CPU: no device sync
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def after_step(self, trainer, epoch, steps_done, metrics):
        """At an optimizer step: save if a stop was asked for (on any rank) or every `every_steps`; then stop."""
        stop = self._stop_requested()
        if not (stop or (self.every_steps and trainer.num_updates % self.every_steps == 0)):
            return
        mine = {'epoch_start_rng': self.epoch_start_rng, 'metrics': metrics()}
        ranks = [mine]
        if is_dist_avail_and_initialized():
            ranks = [None] * get_world_size()
            dist.all_gather_object(ranks, mine)
        self.save_fn(epoch, {'epoch': epoch, 'step': steps_done, 'ranks': ranks})
        if stop:
            reason = _received[0] if _received else 'a signal on another process'
            _received.clear()  # a later run in this process starts afresh
            if is_main_process():
                print(f'{reason}: saved a checkpoint at epoch {epoch}, step {steps_done}; run the same command '
                      f'to resume there', flush=True)
                requeue_if_asked()
            raise Preempted(PREEMPTED_EXIT_CODE)


def requeue_if_asked():
    """Under SLURM, requeues the job if it was submitted with --requeue (scontrol shows Requeue=1)."""
    job = os.environ.get('SLURM_JOB_ID')
    if not job:
        return
    try:
        info = subprocess.run(['scontrol', 'show', 'job', '-o', job], capture_output=True, text=True, timeout=30)
        if 'Requeue=1' in info.stdout.split():
            subprocess.run(['scontrol', 'requeue', job], check=True, timeout=30)
            print(f'requeued SLURM job {job}', flush=True)
    except (OSError, subprocess.SubprocessError) as error:
        print(f'could not requeue SLURM job {job}: {error}', flush=True)
