"""Helpers shared by the test modules (not collected: no test_ prefix); fixtures live in conftest.py.

Workers started with torch.multiprocessing.spawn re-import their test module and so this one: its top-level
imports stay light, and the builders that need an entry script or the model registry import it when called.
"""
import argparse
import contextlib
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]


# ---- processes

def free_port():
    """A TCP port that is free on localhost now (MASTER_PORT, a launcher's --master_port)."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank, world, port, init=True):
    """The process group of a spawned worker: gloo on localhost, one intra-op thread (the workers share two
    cores), destroyed on leaving the block. With init=False the code under test creates the group itself from
    the launcher's variables (RANK, WORLD_SIZE, LOCAL_RANK), set here."""
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    if not init:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if init:
        torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        yield
        if torch.distributed.is_initialized():  # a rank that leaves first could tear down gloo's pairs while its
            torch.distributed.barrier()          # peer still finishes the last collective (SIGABRT there)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# ---- interrupted runs

class Interrupted(Exception):
    """A run killed between two epochs."""


@contextlib.contextmanager
def killed_at_epoch(script, epoch):
    """Within the block, `script.train_one_epoch` raises Interrupted on reaching `epoch` (after the previous
    epoch's checkpoint was written), and the block must end with that interruption."""
    real = script.train_one_epoch

    def train_until(loader, trainer, current, *args, **kwargs):
        if current == epoch:
            raise Interrupted
        return real(loader, trainer, current, *args, **kwargs)

    script.train_one_epoch = train_until
    try:
        with pytest.raises(Interrupted):
            yield
    finally:
        script.train_one_epoch = real


def straight_and_resumed(script, make_args, kill_at, folder):
    """`script.main(make_args(out))` without interruption into folder/straight, and into folder/resumed the same
    run killed on reaching epoch `kill_at` then started again (it auto-resumes). Returns the two folders."""
    straight, resumed = folder / 'straight', folder / 'resumed'
    script.main(make_args(straight))
    with killed_at_epoch(script, kill_at):
        script.main(make_args(resumed))
    script.main(make_args(resumed))
    return straight, resumed


def log_entries(folder):
    """The JSON lines of `folder`/log.txt, one dict per epoch."""
    return [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]


# ---- entry-script arguments

def write_images(folder, n, size=48, seed=0):
    """`n` random RGB images of size x size in a flat folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f'img{i}.png')
    return folder


def pretrain_args(data, out, *extra):
    """run_pretrain.py on the CPU: the tiny LocalMIM ViT at 32 px, batch 4, 2 epochs; `extra` flags win."""
    import run_pretrain
    argv = ['--data_path', str(data), '--output_dir', str(out), '--model', 'MIM_vit_tiny_patch16', '--input_size',
            '32', '--batch_size', '4', '--epochs', '2', '--warmup_epochs', '1', '--blr', '1e-3', '--num_workers', '1',
            '--device', 'cpu', '--print_freq', '1', '--vis_freq', '0', *extra]
    return run_pretrain.get_args_parser().parse_args(argv)


def finetune_args(out, *extra):
    """run_finetune.py on the CPU: a ViT-Tiny at 32 px on the demo data (6 classes), 4 epochs; `extra` flags win."""
    import run_finetune
    argv = ['--data_path', 'demo', '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '16',
            '--epochs', '4', '--warmup_epochs', '1', '--blr', '2e-3', '--nb_classes', '6', '--num_workers', '0',
            '--device', 'cpu', '--output_dir', str(out), '--print_freq', '100', '--drop_path', '0', '--reprob', '0',
            '--aa', 'none', '--layer_decay', '0.9', *extra]
    return run_finetune.get_args_parser().parse_args(argv)


def slak_args(out, *extra):
    """main_slak.py on the CPU: a quarter-width SLaK-T with small kernels at 32 px on the demo data, 2 epochs."""
    import main_slak
    argv = ['--data_path', 'demo', '--model', 'SLaK_tiny', '--width_factor', '0.25', '--kernel_size', '7', '7', '5',
            '3', '3', '--Decom', 'True', '--input_size', '32', '--batch_size', '16', '--nb_classes', '6',
            '--epochs', '2', '--warmup_epochs', '1', '--num_workers', '0', '--device', 'cpu', '--print_freq', '100',
            '--aa', 'none', '--reprob', '0', '--output_dir', str(out), *extra]
    return main_slak.get_args_parser().parse_args(argv)


# ---- engine models and data

def engine_args(**kw):
    """The arguments the pretraining engine loop reads; `kw` overrides."""
    base = dict(batch_size=8, accum_iter=1, lr=1e-2, min_lr=0.0, warmup_epochs=0, epochs=3, mask_ratio=0.75,
                print_freq=1)
    base.update(kw)
    return argparse.Namespace(**base)


class LinearRegression(torch.nn.Module):
    """No batch-dependent layers: a batch's mean loss equals the mean of its halves' losses."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x, mask_ratio=None):
        return (self.fc(x) - x[:, :3].flip(1)).pow(2).mean(), {'aux': x.mean()}


class MIMWithPerSampleMask(torch.nn.Module):
    """Tiny LocalMIM whose mask depends only on the sample, not on how the batch is split."""

    def __init__(self):
        super().__init__()
        import timm
        import models  # noqa: F401  (registers MIM_vit_*)
        self.mim = timm.create_model('MIM_vit_tiny_patch16', img_size=32)

    def forward(self, x, mask_ratio=0.75):
        return self.mim(x, mask_ratio, noise=x[:, 0, ::16, ::16].flatten(1))


def image_data(n=16):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n))


class GradRecorder:
    """A hook that keeps a copy of every parameter's gradient at each optimizer step (after DDP's all-reduce)."""

    def __init__(self, model):
        self.params, self.grads = list(model.parameters()), []

    def after_step(self, trainer):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for p in self.params])


def assert_same_grads(got, expected, rtol=1e-4, atol=1e-7):
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected)):
        for i, (x, y) in enumerate(zip(a, b)):
            assert (x is None) == (y is None), (step, i)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f'step {step}, param {i}: {m}')
