"""Run plumbing shared by every entry script: seeding, the training loader, logs, clean errors (the flags and their
checks: util/cli.py)."""
import contextlib
import json
import os
import random
import sys
import traceback

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from util.checkpoint import latest_checkpoint, load_checkpoint, remove_stale_temp_files
from util.data.samplers import RankStickySampler, labels_of
from util.dist import (finish_distributed, get_rank, get_world_size, init_distributed_mode,
                       is_dist_avail_and_initialized, is_main_process, unwrap)
from util.preemption import install_signal_handlers, restore_signal_handlers
from util.stop_signals import ignore_stop_signals
from util.train_step import NonFiniteLossError

USAGE_EXIT_CODE = 2  # argparse's code for bad usage
_created_folders = []  # the folders setup_run created, deepest first


def setup_run(args):
    """Process group, default autocast dtype, per-rank seeds, output folder: the start of every entry script."""
    init_distributed_mode(args)
    args.amp = args.amp or ('bf16' if args.device.startswith('cuda') else 'none')
    seed_everything(args.seed)
    torch.backends.cudnn.benchmark = True
    if args.output_dir:  # last, so that a failure above leaves no folder behind
        _make_folder(args.output_dir)
    return torch.device(args.device)


def _make_folder(path):
    """os.makedirs, remembering the folders it creates: run_cli removes them again, if still empty, when the run
    stops on a user error."""
    missing, folder = [], os.path.abspath(path)
    while not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    _created_folders.extend(missing)


def _remove_created_folders():
    for folder in _created_folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty (it holds the run's files, or another rank's): keep it and its parents
            break
    _created_folders.clear()


def seed_everything(seed):
    """Per-rank seeds, so masks and augmentations differ across processes."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def per_process_batch(global_batch, world_size, accum_iter=1, flag='--bs'):
    """The loader's batch of one process and micro-step, for scripts whose batch flag is global (SparK, SCE)."""
    if accum_iter < 1:
        raise ValueError(f'--accum_iter must be >= 1, got {accum_iter}')
    if global_batch <= 0 or global_batch % (world_size * accum_iter):
        raise ValueError(f'{flag} {global_batch} is the global batch size and must be a positive multiple of the '
                         f'number of processes ({world_size}) times --accum_iter ({accum_iter})')
    return global_batch // (world_size * accum_iter)


def build_train_loader(dataset, batch_size, num_workers, pin_mem, seed, batch_flag='--batch_size', rank_sticky=False):
    """Shuffled, drop_last loader of `batch_size` per process; the sampler is distributed even for one process
    (set_epoch always works). `rank_sticky`, with several processes: each sample stays on one process for the whole
    run (util.data.samplers.RankStickySampler), for per-process caches; one process keeps the standard order."""
    world = get_world_size()
    if len(dataset) < batch_size * world:
        raise ValueError(f'the data set has {len(dataset)} samples, fewer than one batch of {batch_size} x '
                         f'{world} processes; lower {batch_flag} or add data')
    if rank_sticky and world > 1:
        sampler = RankStickySampler(dataset, world, get_rank(), seed, labels_of(dataset))
    else:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=True, seed=seed)
    # Workers are not persistent: each epoch's workers are seeded from the main RNG, which checkpoints
    # save, so a resumed run replays the same augmentations.
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                      pin_memory=pin_mem and torch.cuda.is_available(), drop_last=True,
                      worker_init_fn=ignore_stop_signals)


def attach_ddp(trainer, device, schedule=None, **ddp_kwargs):
    """Under a process group, the trainer trains its model wrapped in DistributedDataParallel (checkpoints and
    evaluation keep the bare model). With a FreezeOut schedule it is wrapped anew after each freeze, so frozen
    parameters are neither bucketed nor all-reduced."""
    if not is_dist_avail_and_initialized():
        return
    model = unwrap(trainer.model)

    def wrap():
        trainer.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None,
                                                **ddp_kwargs)
    wrap()
    if hasattr(schedule, 'on_freeze'):
        schedule.on_freeze.append(wrap)


def resume_path(explicit, auto_resume, output_dir, find_latest=latest_checkpoint):
    """The checkpoint to resume: `explicit` (--resume) wins; else, with auto-resume, the newest readable one in
    output_dir. Also deletes the temporary files of checkpoint writes killed midway."""
    remove_stale_temp_files(output_dir)
    if explicit:
        return explicit
    return find_latest(output_dir) if auto_resume and output_dir else None


def resume_training(args, path, model, trainer, before_optimizer=None, checkpoints=None):
    """Restores model, optimizer, GradScaler and RNG from `path`, sets args.start_epoch (the epoch after the saved
    one, or with `checkpoints` the interrupted one of a mid-epoch checkpoint) and trainer.num_updates; returns the
    checkpoint (for the method's own state)."""
    ckpt = load_checkpoint(path, model, trainer.optimizer, trainer.scaler, before_optimizer=before_optimizer)
    if not isinstance(ckpt.get('epoch'), int):  # e.g. an official SLaK checkpoint-best.pth ('best')
        raise ValueError(f'--resume {path} is the "{ckpt.get("epoch")}" checkpoint; resume from '
                         'checkpoint-<epoch>.pth or checkpoint-last.pth (or use it with --eval true / --finetune)')
    args.start_epoch = checkpoints.resume_from(ckpt) if checkpoints is not None else ckpt['epoch'] + 1
    trainer.num_updates = ckpt.get('step', 0)
    print(f'resumed from {path} (epoch {ckpt["epoch"]} done, {trainer.num_updates} optimizer steps)')
    return ckpt


def keeps_checkpoint(epoch, every, epochs):
    """Whether epoch `epoch` also writes checkpoint-<epoch>.pth: every `every` epochs counting from the first
    (MAE's and LocalMIM's rule: 0, every, 2 every, ...) and the last one."""
    return (every > 0 and epoch % every == 0) or epoch + 1 == epochs


def evaluates_epoch(epoch, every, epochs):
    """Whether epoch `epoch` is evaluated under --eval_freq `every`: after every `every` epochs and after the last."""
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def make_log_writer(log_dir):
    if not log_dir or not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def append_log_line(output_dir, stats):
    """One JSON line per epoch in output_dir/log.txt (main process only)."""
    if output_dir and is_main_process():
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(stats) + '\n')


def run_cli(main, parser):
    """Parses flags and runs main; a user mistake (a ValueError, a missing file) ends with one clear line, exit code
    2 and no empty output folder left behind; a diverged run with one line and exit code 1. SIGTERM and SIGUSR1 save
    a mid-epoch checkpoint and exit (util/preemption.py)."""
    args = parser.parse_args()
    saved_handlers = install_signal_handlers()
    _created_folders.clear()
    try:
        main(args)
        finish_distributed()
    except (FileNotFoundError, ValueError, NonFiniteLossError) as error:
        origin = traceback.extract_tb(error.__traceback__)[-1]  # so a bug is not mistaken for a bad flag
        # sys.stderr, not print: under DDP print is silenced on all ranks but the first, which may not be the one
        sys.stderr.write(f'{os.path.basename(sys.argv[0])}: error: {error} '
                         f'[{os.path.basename(origin.filename)}:{origin.lineno}]\n')
        if isinstance(error, NonFiniteLossError):
            sys.exit(1)
        _remove_created_folders()
        sys.exit(USAGE_EXIT_CODE)
    finally:
        restore_signal_handlers(saved_handlers)


class _Tee:
    """A text stream that also appends everything written to it to a file."""

    def __init__(self, stream, path):
        self.stream, self.file = stream, open(path, 'a', buffering=1)

    def write(self, text):
        self.file.write(text)
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


@contextlib.contextmanager
def tee_console(folder):
    """Copies the main process's stdout and stderr into folder/stdout_backup.txt and stderr_backup.txt."""
    if not is_main_process():
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout = _Tee(sys.stdout, os.path.join(folder, 'stdout_backup.txt'))
    sys.stderr = _Tee(sys.stderr, os.path.join(folder, 'stderr_backup.txt'))
    try:
        yield
    finally:
        for tee in (sys.stdout, sys.stderr):
            tee.file.close()
        sys.stdout, sys.stderr = saved
