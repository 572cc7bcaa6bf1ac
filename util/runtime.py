"""Run plumbing shared by every entry script: seeding, the training loader, logs, clean errors."""
import argparse
import contextlib
import json
import os
import random
import sys
import traceback

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from util.dist import get_rank, get_world_size, init_distributed_mode, is_main_process
from util.train_step import NonFiniteLossError


def str2bool(value):
    """argparse type for the official scripts' `--flag=True` / `--flag false` booleans."""
    text = str(value).lower()
    if text in ('true', 't', 'yes', 'y', '1'):
        return True
    if text in ('false', 'f', 'no', 'n', '0'):
        return False
    raise argparse.ArgumentTypeError(f'expected true or false, got {value!r}')


def add_bool_arg(parser, name, default, help=None):
    """`--name` (= true), `--name true|false|True|False|1|0`."""
    parser.add_argument(name, type=str2bool, default=default, nargs='?', const=True, help=help)


def setup_run(args):
    """Process group, default autocast dtype, per-rank seeds, output folder: the start of every entry script."""
    init_distributed_mode(args)
    args.amp = args.amp or ('bf16' if args.device.startswith('cuda') else 'none')
    seed_everything(args.seed)
    torch.backends.cudnn.benchmark = True
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    return torch.device(args.device)


def seed_everything(seed):
    """Per-rank seeds, so masks and augmentations differ across processes."""
    seed = seed + get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_train_loader(dataset, args):
    """Shuffled, drop_last loader; the sampler is distributed even for one process (set_epoch always works)."""
    world = get_world_size()
    if len(dataset) < args.batch_size * world:
        raise ValueError(f'the data set has {len(dataset)} images, fewer than one batch of {args.batch_size} x '
                         f'{world} processes; lower --batch_size or add data')
    sampler = DistributedSampler(dataset, num_replicas=world, rank=get_rank(), shuffle=True, seed=args.seed)
    # Workers are not persistent: each epoch's workers are seeded from the main RNG, which checkpoints
    # save, so a resumed run replays the same augmentations.
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=True)


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
    """Parses flags and runs main; a user mistake ends with one clear line instead of a traceback."""
    args = parser.parse_args()
    try:
        main(args)
    except (FileNotFoundError, ValueError, NonFiniteLossError) as error:
        origin = traceback.extract_tb(error.__traceback__)[-1]  # so a bug is not mistaken for a bad flag
        sys.exit(f'{os.path.basename(sys.argv[0])}: error: {error} '
                 f'[{os.path.basename(origin.filename)}:{origin.lineno}]')


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
