"""Engine: LR schedule, accumulation, non-finite steps, and DDP against one process."""
import argparse
import math
import os
import socket

import pytest
import timm
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import models  # noqa: F401
from engine_pretrain import train_one_epoch
from util.lr_sched import adjust_learning_rate, cosine_lr
from util.train_step import NonFiniteLossError, TrainStep


def closed_form_lr(t, base, min_lr, warmup, epochs):
    if t < warmup:
        return base * t / warmup
    return min_lr + (base - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup))) / 2


def test_lr_schedule_matches_formula_and_spec_values():
    for t in [0, 0.25, 1, 3.5, 7.2, 10]:
        assert cosine_lr(t, 1e-3, 1e-6, 2, 10) == pytest.approx(closed_form_lr(t, 1e-3, 1e-6, 2, 10), abs=1e-15)
    # spec 3.2: base 1e-3, warmup 1, epochs 3, min 1e-6
    assert cosine_lr(0.5, 1e-3, 1e-6, 1, 3) == pytest.approx(5e-4)
    assert cosine_lr(1, 1e-3, 1e-6, 1, 3) == pytest.approx(1e-3)
    assert cosine_lr(2, 1e-3, 1e-6, 1, 3) == pytest.approx(5.005e-4)
    assert cosine_lr(0, 1e-3, 1e-6, 1, 3) == 0.0


def test_adjust_learning_rate_applies_group_scales():
    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{'params': [p1], 'lr_scale': 0.1}, {'params': [p2]}], lr=1.0)
    args = argparse.Namespace(lr=2e-3, min_lr=0.0, warmup_epochs=1, epochs=5)
    lr = adjust_learning_rate(opt, 0.5, args)
    assert lr == pytest.approx(1e-3)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([1e-4, 1e-3])


class LinearRegression(torch.nn.Module):
    """No batch-dependent layers: a batch's mean loss equals the mean of its halves' losses."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(6, 3)

    def forward(self, x, mask_ratio=None):
        return (self.fc(x) - x[:, :3].flip(1)).pow(2).mean(), {'aux': x.mean()}


def regression_data(n=16):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.zeros(n))


def engine_args(**kw):
    base = dict(batch_size=8, accum_iter=1, lr=1e-2, min_lr=0.0, warmup_epochs=0, epochs=3, mask_ratio=0.75,
                print_freq=1)
    base.update(kw)
    return argparse.Namespace(**base)


def run_epochs(model, dataset, args, world=1, rank=0, epochs=1, wrap=None, max_nonfinite=5):
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=True)
    net = wrap(model) if wrap else model
    trainer = TrainStep(net, opt, 'cpu', 'none', args.accum_iter, max_nonfinite=max_nonfinite)
    losses = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        losses.append(train_one_epoch(loader, trainer, torch.device('cpu'), epoch, args)['loss'])
    return losses, trainer


def test_accumulation_equals_large_batch():
    data = regression_data(8)
    torch.manual_seed(0)
    big = LinearRegression()
    small = LinearRegression()
    small.load_state_dict(big.state_dict())
    run_epochs(big, data, engine_args(batch_size=8, accum_iter=1))
    _, trainer = run_epochs(small, data, engine_args(batch_size=4, accum_iter=2))
    assert trainer.num_updates == 1
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, LinearRegression().fc.weight) if a.ndim == 2 else True


class Exploding(LinearRegression):
    def forward(self, x, mask_ratio=None):
        loss, logs = super().forward(x)
        return loss * float('nan'), logs


def test_nonfinite_steps_are_skipped_then_stop():
    torch.manual_seed(0)
    model = Exploding()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match='non-finite for 2 optimizer steps in a row'):
        run_epochs(model, regression_data(16), engine_args(batch_size=8), max_nonfinite=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_isolated_nonfinite_step_is_skipped_and_training_continues():
    torch.manual_seed(0)
    model = LinearRegression()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    trainer = TrainStep(model, opt, 'cpu', 'none', max_nonfinite=3)
    x = torch.randn(4, 6)
    w = model.fc.weight.detach().clone()
    trainer.backward(model(x)[0] * float('inf'))
    trainer.step()
    assert torch.equal(w, model.fc.weight) and int(trainer.skipped) == 1
    trainer.backward(model(x)[0])
    trainer.step()
    trainer.check()
    assert not torch.equal(w, model.fc.weight) and opt.state[model.fc.weight]['step'].item() == 1


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class MIMWithPerSampleMask(torch.nn.Module):
    """Tiny LocalMIM whose mask depends only on the sample, not on how the batch is split."""

    def __init__(self):
        super().__init__()
        self.mim = timm.create_model('MIM_vit_tiny_patch16', img_size=32)

    def forward(self, x, mask_ratio=0.75):
        return self.mim(x, mask_ratio, noise=x[:, 0, ::16, ::16].flatten(1))


def image_data(n=16):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.zeros(n))


def _ddp_worker(rank, world, port, state, out_path):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    torch.distributed.init_process_group('gloo', rank=rank, world_size=world)
    try:
        model = MIMWithPerSampleMask()
        model.load_state_dict(state)
        args = engine_args(batch_size=2, accum_iter=2, lr=1e-3)
        losses, _ = run_epochs(model, image_data(), args, world, rank, epochs=3,
                               wrap=torch.nn.parallel.DistributedDataParallel)
        if rank == 0:
            torch.save({'losses': losses, 'state': model.state_dict()}, out_path)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_match_one_process(tmp_path):
    torch.manual_seed(0)
    model = MIMWithPerSampleMask()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = tmp_path / 'ddp.pt'
    mp.spawn(_ddp_worker, args=(2, _free_port(), state, str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    # one process, same global batch: 2 processes x batch 2 x accum 2 == 1 process x batch 4 x accum 2
    single_losses, _ = run_epochs(model, image_data(), engine_args(batch_size=4, accum_iter=2, lr=1e-3), epochs=3)
    assert len(set(single_losses)) == 3  # the loss moves, so the comparison means something
    assert ddp['losses'] == pytest.approx(single_losses, rel=1e-5)
    for k, v in model.state_dict().items():  # Adam's g / sqrt(v) magnifies float-order noise in tiny grads
        torch.testing.assert_close(ddp['state'][k], v, rtol=1e-3, atol=2e-4)
